#!/usr/bin/env bash
# Source benchmark, in one run on one machine against the same WAL:
#   (a) PostgreSQL's own ceiling: pg_recvlogical draining the workload with pgoutput to /dev/null;
#   (b) trusst-cdc's source draining the same WAL into Kafka as enriched per-contact events;
#   (c) commit-to-Kafka latency p50/p99 at a steady LATENCY_RATE contacts/s.
# Every slot is created before the workload is written, so every run drains exactly the same
# changes; ROUNDS rounds alternate (a) and (b) and the median of each is reported.
#
#   scripts/bench-source.sh            N=50000 LATENCY_RATE=1000 LATENCY_SECONDS=30 ROUNDS=3
# Results are printed and written to BENCHMARKS.md (section "Source").
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-50000}
LATENCY_RATE=${LATENCY_RATE:-1000}
LATENCY_SECONDS=${LATENCY_SECONDS:-30}
ROUNDS=${ROUNDS:-3}
DB=trusst_bench

scripts/deps.sh
scripts/services.sh up
eval "$(scripts/services.sh env)"
cargo build --release --locked -q --bins --benches
bin=$PWD/target/release/trusst-cdc
latency_bin=$(ls -t target/release/deps/latency-* | grep -v '\.d$' | head -1)
url=${DATABASE_URL%/*}/$DB
psqlb() { PGPASSWORD=postgres "$PGBIN/psql" -X -q -h 127.0.0.1 -p "${PGPORT:-55432}" -U postgres "$@"; }
work=$(mktemp -d)
SLOTS='^bench_(recv|cdc)_[0-9]+$'
# Slots left behind would hold WAL (gigabytes after a run) until dropped.
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null; scripts/services.sh drop-slots "$SLOTS" || true; rm -rf "$work"' EXIT

echo "bench: fresh database $DB" >&2
scripts/services.sh drop-slots "$SLOTS"
psqlb -d postgres -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB"
$bin generate --database-url "$url" --schema-only
psqlb -d $DB -c "CREATE PUBLICATION bench_pub FOR TABLE contacts, inferences, questions, s3_conversations" >/dev/null
for r in $(seq 1 "$ROUNDS"); do
    psqlb -d $DB -c "SELECT pg_create_logical_replication_slot('bench_recv_$r', 'pgoutput')" \
        -c "SELECT pg_create_logical_replication_slot('bench_cdc_$r', 'pgoutput')" >/dev/null
done

echo "bench: writing $N completed contacts" >&2
$bin generate --database-url "$url" --contacts "$N" --chunk 500 --seed 42 2>/dev/null
end=$(psqlb -d $DB -tAc "SELECT pg_current_wal_lsn()")
rows=$(psqlb -d $DB -tAc "SELECT (SELECT count(*) FROM contacts) * 3 + (SELECT count(*) FROM s3_conversations) + (SELECT count(*) FROM inferences)")
# What autovacuum would do soon after such a load: hint bits set and statistics fresh, so no run
# pays the first reader's cost for the others.
psqlb -d $DB -c "VACUUM (ANALYZE) contacts, inferences, questions, s3_conversations"
echo "bench: $rows row changes up to $end; $ROUNDS rounds, alternating (a) and (b)" >&2

tick=$(getconf CLK_TCK)
recv_runs=()
cdc_runs=()
for r in $(seq 1 "$ROUNDS"); do
    echo "bench: round $r: (a) pg_recvlogical" >&2
    /usr/bin/time -f "%e %M %U %S" -o "$work/recv.time" \
        env PGPASSWORD=postgres "$PGBIN/pg_recvlogical" -h 127.0.0.1 -p "${PGPORT:-55432}" -U postgres -d $DB \
        --slot "bench_recv_$r" --start -o proto_version=1 -o publication_names=bench_pub --endpos "$end" -f /dev/null
    read -r recv_s recv_kb recv_u recv_sys <"$work/recv.time"
    recv_runs+=("$recv_s $recv_kb $(python3 -c "print(f'{$recv_u + $recv_sys:.2f}')")")

    echo "bench: round $r: (b) trusst-cdc source" >&2
    topic=trusst.bench.$(date +%s).$r
    cat >"$work/source.toml" <<TOML
[kafka]
topic = "$topic"
[source]
slot = "bench_cdc_$r"
publication = "bench_pub"
snapshot = "never"
state_dir = "$work/state"
TOML
    # Drained = every contact's event is in Kafka (read back by a consumer), timed from the start.
    "$latency_bin" drain "$KAFKA_BROKERS" "$topic" "$N" >"$work/drain.json" &
    drain_pid=$!
    t0=$(date +%s%3N)
    DATABASE_URL=$url $bin source --config "$work/source.toml" 2>"$work/source.log" &
    pid=$!
    while kill -0 $drain_pid 2>/dev/null; do
        kill -0 $pid 2>/dev/null || { cat "$work/source.log" >&2; exit 1; }
        sleep 0.1
    done
    t1=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['done_ms'])" "$work/drain.json")
    cdc_s=$(python3 -c "print(f'{($t1 - $t0) / 1000:.2f}')")
    cdc_kb=$(awk '/VmHWM/ {print $2}' /proc/$pid/status)
    cdc_cpu=$(awk -v t="$tick" '{printf "%.2f", ($14 + $15) / t}' /proc/$pid/stat)
    cdc_runs+=("$cdc_s $cdc_kb $cdc_cpu")
    echo "bench: round $r: (a) ${recv_s} s, (b) ${cdc_s} s" >&2
    # The last round's source stays up for the latency run.
    if [[ $r -lt $ROUNDS ]]; then
        kill -TERM $pid
        wait $pid || true
    fi
done

echo "bench: (c) latency at $LATENCY_RATE contacts/s for ${LATENCY_SECONDS}s" >&2
expected=$((LATENCY_RATE * LATENCY_SECONDS))
"$latency_bin" "$KAFKA_BROKERS" "$topic" "$expected" 15 >"$work/latency.json" &
lat_pid=$!
until grep -q ready "$work/latency.json" 2>/dev/null; do sleep 0.2; done
$bin generate --database-url "$url" --contacts "$expected" --chunk 50 --connections 2 --rate "$LATENCY_RATE" --seed 7 2>"$work/gen.log"
wait $lat_pid
lat=$(tail -1 "$work/latency.json")
steady_kb=$(awk '/VmHWM/ {print $2}' /proc/$pid/status)
kill -TERM $pid
wait $pid || true

python3 - "$N" "$rows" "$(printf '%s;' "${recv_runs[@]}")" "$(printf '%s;' "${cdc_runs[@]}")" "$lat" "$steady_kb" "$LATENCY_RATE" <<'PY'
import json, sys, platform, os, re, subprocess, datetime
n, rows = int(sys.argv[1]), int(sys.argv[2])
parse = lambda arg: [tuple(float(x) for x in run.split()) for run in arg.split(';') if run.strip()]
recv_runs, cdc_runs = parse(sys.argv[3]), parse(sys.argv[4])
lat, steady_kb, rate = json.loads(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
# The median round by time, reported whole (its RSS and CPU belong to that run).
median = lambda runs: sorted(runs)[len(runs) // 2]
recv_s, recv_kb, recv_cpu = median(recv_runs)
cdc_s, cdc_kb, cdc_cpu = median(cdc_runs)
rounds = len(cdc_runs)
all_runs = lambda runs: ", ".join(f"{r[0]:.2f}" for r in runs)
cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')), platform.processor())
mem = int(next(l.split()[1] for l in open('/proc/meminfo') if l.startswith('MemTotal'))) // 1024 // 1024
table = f"""## Source (scripts/bench-source.sh)

Run {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC on {os.cpu_count()} cores ({cpu}), {mem} GiB RAM; PostgreSQL and Kafka
local on the same machine. Command: `N={n} LATENCY_RATE={rate} scripts/bench-source.sh`.
Workload: {n} contacts, each TRANSCRIPTION -> INFERENCE -> COMPLETED, {rows} row changes, then
`VACUUM (ANALYZE)` as autovacuum would. {rounds} rounds alternate (a) and (b), each on a slot of its
own created before the workload; the table shows the median round of each.

| | time to drain | row changes/s | contacts/s | CPU s | peak RSS | all rounds (s) |
|---|---|---|---|---|---|---|
| (a) pg_recvlogical, pgoutput -> /dev/null | {recv_s:.2f} s | {rows/recv_s:,.0f} | {n/recv_s:,.0f} | {recv_cpu:.2f} | {recv_kb/1024:.0f} MB | {all_runs(recv_runs)} |
| (b) trusst-cdc source -> Kafka (enriched events, acked) | {cdc_s:.2f} s | {rows/cdc_s:,.0f} | {n/cdc_s:,.0f} | {cdc_cpu:.2f} | {cdc_kb/1024:.0f} MB | {all_runs(cdc_runs)} |
| ratio (b) / (a) | | {recv_s/cdc_s:.2f} | | | | |

Commit-to-Kafka latency at a steady {rate} contacts/s ({lat['events']} events over {lat['span_s']} s; the generator on the same
machine, two connections, 50 contacts per transaction):
p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms, max {lat['max_ms']} ms; source peak RSS after the steady run {steady_kb/1024:.0f} MB.
Targets: (b) >= 0.8 x (a); p99 < 200 ms; RSS < 100 MB.
"""
print(table)
path = 'BENCHMARKS.md'
old = open(path).read() if os.path.exists(path) else "# Benchmarks\n\nFigures come from the scripts named in each section; re-run them to reproduce.\n\n"
old = re.sub(r"## Source \(scripts/bench-source.sh\).*?(?=\n## |\Z)", "", old, flags=re.S).rstrip() + "\n\n"
old = re.sub(r"\n{3,}", "\n\n", old)
open(path, 'w').write(old + table)
PY
