#!/usr/bin/env bash
# Source benchmark, in one run on one machine against the same WAL:
#   (a) PostgreSQL's own ceiling: pg_recvlogical draining the workload with pgoutput to /dev/null;
#   (b) trusst-cdc's source draining the same WAL into Kafka as enriched per-contact events;
#   (c) commit-to-Kafka latency p50/p99 at a steady LATENCY_RATE contacts/s;
#   (c2) the same with the source's tasks on a one-worker tokio pool, for comparison;
#   (d) the floor under (c): PostgreSQL's own commit-to-slot-reader delay at the same rate.
# Every slot is created before the workload is written, so every run drains exactly the same
# changes; ROUNDS rounds alternate (a) and (b) and the median of each is reported.
#
#   scripts/bench-source.sh            N=50000 LATENCY_RATE=1000 LATENCY_SECONDS=30 WARMUP_SECONDS=5 ROUNDS=3
# Results are printed and written to BENCHMARKS.md (section "Source").
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-50000}
LATENCY_RATE=${LATENCY_RATE:-1000}
LATENCY_SECONDS=${LATENCY_SECONDS:-30}
WARMUP_SECONDS=${WARMUP_SECONDS:-5}
ROUNDS=${ROUNDS:-3}
DB=trusst_bench

# shellcheck source=scripts/lib/bench.sh
source scripts/lib/bench.sh
SLOTS='^bench_(recv|cdc|floor)_[0-9]+$'
bench_cleanup() { scripts/services.sh drop-slots "$SLOTS"; }
bench_init --benches

scripts/services.sh drop-slots "$SLOTS"
bench_fresh_db $DB
psqlb -d $DB -c "CREATE PUBLICATION bench_pub FOR TABLE contacts, inferences, questions, s3_conversations" >/dev/null
for r in $(seq 1 "$ROUNDS"); do
    psqlb -d $DB -c "SELECT pg_create_logical_replication_slot('bench_recv_$r', 'pgoutput')" \
        -c "SELECT pg_create_logical_replication_slot('bench_cdc_$r', 'pgoutput')" >/dev/null
done

bench_workload $DB "$N"
echo "bench: $rows row changes up to $end; $ROUNDS rounds, alternating (a) and (b)" >&2

recv_runs=()
cdc_runs=()
for r in $(seq 1 "$ROUNDS"); do
    echo "bench: round $r: (a) pg_recvlogical" >&2
    recv_runs+=("$(recvlogical_drain $DB "bench_recv_$r" bench_pub "$end")")
    read -r recv_s _ <<<"${recv_runs[-1]}"

    echo "bench: round $r: (b) trusst-cdc source" >&2
    topic=trusst.bench.$(date +%s).$r
    cdc_drain "bench_cdc_$r" bench_pub "$N" "$topic"
    cdc_runs+=("$drained")
    read -r cdc_s _ <<<"$drained"
    pid=$source_pid
    echo "bench: round $r: (a) ${recv_s} s, (b) ${cdc_s} s" >&2
    # The last round's source stays up for the latency run.
    if [[ $r -lt $ROUNDS ]]; then
        kill -TERM $pid
        wait $pid || true
    fi
done

echo "bench: (c) latency at $LATENCY_RATE contacts/s, ${WARMUP_SECONDS}s warm-up + ${LATENCY_SECONDS}s" >&2
expected=$((LATENCY_RATE * LATENCY_SECONDS))
generated=$((LATENCY_RATE * (WARMUP_SECONDS + LATENCY_SECONDS + 3)))
# The broker stamps each record with its append time, so "reached Kafka" is measured at the
# broker as well as at a consumer.
scripts/services.sh kafka-configs --alter --entity-type topics --entity-name "$topic" \
    --add-config message.timestamp.type=LogAppendTime >/dev/null
# latency_run OUT SEED PID: the steady load against the running source PID, figures in OUT;
# sets $cpu to "CPU_SECONDS WALL_SECONDS" of the source over the load.
latency_run() {
    local c0 c1 t0
    bench_checkpoint
    "$latency_bin" "$KAFKA_BROKERS" "$topic" "$expected" 15 "$WARMUP_SECONDS" >"$1" &
    lat_pid=$!
    wait_for "$1" ready $lat_pid
    c0=$(proc_figures "$3" | cut -d' ' -f2)
    t0=$EPOCHREALTIME
    steady_load "$generated" "$2"
    c1=$(proc_figures "$3" | cut -d' ' -f2)
    cpu="$(python3 -c "print(f'{$c1 - $c0:.2f} {$EPOCHREALTIME - $t0:.1f}')")"
    wait $lat_pid
}
latency_run "$work/latency.json" 7 $pid
lat=$(tail -1 "$work/latency.json")
lat_cpu=$cpu
steady_kb=$(awk '/VmHWM/ {print $2}' /proc/$pid/status)
kill -TERM $pid
wait $pid || true

# (c2) The same with the source's tasks on a worker pool of one thread beside the main thread
# (the runtime before it became single-threaded): what the cross-thread hand-offs cost.
echo "bench: (c2) latency, source on a one-worker pool" >&2
mv "$work/source.log" "$work/source-c.log"
TOKIO_WORKER_THREADS=1 start_source "bench_cdc_$ROUNDS" bench_pub "$topic"
wait_for "$work/source.log" "streaming changes" $source_pid
latency_run "$work/latency-pool.json" 8 $source_pid
lat_pool=$(tail -1 "$work/latency-pool.json")
pool_cpu=$cpu
kill -TERM $source_pid
wait $source_pid || true

# (d) The floor under (c): how late PostgreSQL itself delivers each commit to a slot reader that
# does nothing with it, under the same load, with the source stopped.
echo "bench: (d) PostgreSQL's delivery latency at $LATENCY_RATE contacts/s" >&2
psqlb -d $DB -c "SELECT pg_create_logical_replication_slot('bench_floor_1', 'pgoutput')" >/dev/null
bench_checkpoint
"$latency_bin" slot "$url" bench_floor_1 bench_pub $((WARMUP_SECONDS + LATENCY_SECONDS)) "$WARMUP_SECONDS" >"$work/floor.json" &
floor_pid=$!
wait_for "$work/floor.json" ready $floor_pid
steady_load "$generated" 9
wait $floor_pid
floor=$(tail -1 "$work/floor.json")

python3 - "$N" "$rows" "$(printf '%s;' "${recv_runs[@]}")" "$(printf '%s;' "${cdc_runs[@]}")" "$lat" "$steady_kb" "$LATENCY_RATE" "$(bench_machine)" "$floor" "$WARMUP_SECONDS" "$lat_pool" "$lat_cpu" "$pool_cpu" <<'PY' | tee /dev/stderr | bench_write_section "Source (scripts/bench-source.sh)"
import json, sys, datetime
n, rows, machine = int(sys.argv[1]), int(sys.argv[2]), sys.argv[8]
parse = lambda arg: [tuple(float(x) for x in run.split()) for run in arg.split(';') if run.strip()]
recv_runs, cdc_runs = parse(sys.argv[3]), parse(sys.argv[4])
lat, steady_kb, rate = json.loads(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
floor, warmup, pool = json.loads(sys.argv[9]), int(sys.argv[10]), json.loads(sys.argv[11])
cpu_share = lambda arg: (lambda c, s: f"{c:.1f} CPU s in {s:.0f} s, {100 * c / s:.0f}% of a core")(*map(float, arg.split()))
# The median round by time, reported whole (its RSS and CPU belong to that run).
median = lambda runs: sorted(runs)[len(runs) // 2]
recv_s, recv_kb, recv_cpu = median(recv_runs)
cdc_s, cdc_kb, cdc_cpu, *_ = median(cdc_runs)
rounds = len(cdc_runs)
all_runs = lambda runs: ", ".join(f"{r[0]:.2f}" for r in runs)
table = f"""## Source (scripts/bench-source.sh)

Run {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC on {machine}; PostgreSQL and Kafka
local on the same machine. Command: `N={n} LATENCY_RATE={rate} scripts/bench-source.sh`.
Workload: {n} contacts, each TRANSCRIPTION -> INFERENCE -> COMPLETED, {rows} row changes, then
`VACUUM (ANALYZE)` as autovacuum would. {rounds} rounds alternate (a) and (b), each on a slot of its
own created before the workload; the table shows the median round of each.

| | time to drain | row changes/s | contacts/s | CPU s | peak RSS | all rounds (s) |
|---|---|---|---|---|---|---|
| (a) pg_recvlogical, pgoutput -> /dev/null | {recv_s:.2f} s | {rows/recv_s:,.0f} | {n/recv_s:,.0f} | {recv_cpu:.2f} | {recv_kb/1024:.0f} MB | {all_runs(recv_runs)} |
| (b) trusst-cdc source -> Kafka (enriched events, acked) | {cdc_s:.2f} s | {rows/cdc_s:,.0f} | {n/cdc_s:,.0f} | {cdc_cpu:.2f} | {cdc_kb/1024:.0f} MB | {all_runs(cdc_runs)} |
| ratio (b) / (a) | | {recv_s/cdc_s:.2f} | | | | |

Commit-to-Kafka latency at a steady {rate} contacts/s ({lat['events']} events over {lat['span_s']} s after {warmup} s of warm-up;
the generator on the same machine, two connections, 50 contacts per transaction; a `CHECKPOINT`
first, so the drain rounds' load is not still being written out), from the commit time
PostgreSQL put in the stream (the event's `source.commit_ts`) to:

| | p50 | p99 | max |
|---|---|---|---|
| (c) the broker's append time (topic with `message.timestamp.type=LogAppendTime`, record timestamp: {lat.get('record_ts')}) | {lat.get('record_p50_ms')} ms | {lat.get('record_p99_ms')} ms | {lat.get('record_max_ms')} ms |
| (c) a consumer reading it (librdkafka, `fetch.wait.max.ms=100`) | {lat['p50_ms']} ms | {lat['p99_ms']} ms | {lat['max_ms']} ms |
| (c2) the broker's append time, source on a one-worker tokio pool (`TOKIO_WORKER_THREADS=1`) instead of one thread | {pool.get('record_p50_ms')} ms | {pool.get('record_p99_ms')} ms | {pool.get('record_max_ms')} ms |
| (d) floor: the Commit message reaching a slot reader that does nothing else ({floor['commits']} commits; same load, source stopped) | {floor['p50_ms']} ms | {floor['p99_ms']} ms | {floor['max_ms']} ms |

(d) is PostgreSQL's part alone: the commit's WAL flushed, decoded by the walsender and sent.
The source's CPU over the steady load (generator start to end): (c) {cpu_share(sys.argv[12])};
(c2) {cpu_share(sys.argv[13])}. Source peak RSS after the steady run {steady_kb/1024:.0f} MB.
Targets: (b) >= 0.8 x (a); commit-to-Kafka p99 < 200 ms; RSS < 100 MB.
"""
print(table)
PY
