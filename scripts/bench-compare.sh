#!/usr/bin/env bash
# Side-by-side source benchmark: one run, one machine, one PostgreSQL, one WAL, three contenders
# and three limits:
#   (d) decoding alone: pg_logical_slot_peek_binary_changes with pgoutput (the source's options)
#       counting the messages in SQL, nothing sent over a replication connection;
#   (n) the null streaming reader: the source's replication client reading the slot and
#       acknowledging every commit, doing nothing else (the walsender's limit for any reader);
#   (a) pg_recvlogical draining the workload with pgoutput to /dev/null;
#   (b) Debezium's PostgreSQL connector (Maven Central) in Kafka Connect standalone: pgoutput,
#       JSON converter, the same broker, one topic per table, connector defaults;
#   (b2) the same connector tuned for throughput as its users tune it (DEBEZIUM_TUNED_PROPS,
#       DEBEZIUM_TUNED_HEAP: bigger batches and queue, a shorter poll interval, and the Connect
#       producer's batching and compression through producer.override.*);
#   (c) trusst-cdc's source: enriched per-contact events, acknowledged by Kafka.
# For each: time to drain N completed contacts, row changes/s, contacts/s, CPU seconds and peak RSS;
# then commit-to-Kafka latency p50/p99 at a steady LATENCY_RATE contacts/s for (b), (b2) and (c).
# The ratios are printed and the section "Side by side" of BENCHMARKS.md is rewritten.
#
#   scripts/bench-compare.sh       N=50000 ROUNDS=3 LATENCY_RATE=1000 LATENCY_SECONDS=30 WARMUP_SECONDS=10
#   scripts/bench-compare.sh tune  N=20000 ROUNDS=2: only Debezium, once per candidate setting in
#                                  TUNE_CANDIDATES below, on the same WAL; rewrites the section
#                                  "Debezium tuning" (how DEBEZIUM_TUNED_PROPS was chosen)
#
# Fairness: every slot is created on the same publication before the workload is written, so each
# run decodes exactly the same WAL from the same start; Debezium runs with snapshot.mode=no_data on
# its own slot, `-Xmx1g` and Kafka's stock G1 flags, its drain ends when its topics hold every row
# change (high watermarks, so the check reads nothing), and its start-up (JVM, worker, connector) is
# reported in a column of its own beside the time to drain. Rounds alternate the contenders; the
# median round of each is reported. The latency runs start each process fresh on a new slot and
# count events only after WARMUP_SECONDS of steady load, so a JVM is measured once its hot paths
# are compiled.
#
# Environment: DEBEZIUM_VERSION (3.6.1.Final), DEBEZIUM_HEAP (-Xmx1g), DEBEZIUM_PROPS (extra
# connector properties for (b), one per line), DEBEZIUM_TUNED_PROPS and DEBEZIUM_TUNED_HEAP (b2's,
# defaults in scripts/lib/debezium.sh), CONNECT_PORT (18083, the Connect worker's REST listener), plus PGPORT and
# KAFKA_PORT as for scripts/services.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=${1:-compare}
case $MODE in compare | tune) ;; *) echo "usage: scripts/bench-compare.sh [compare|tune]" >&2; exit 2 ;; esac
if [[ $MODE == tune ]]; then
    N=${N:-20000}
    ROUNDS=${ROUNDS:-2}
fi
N=${N:-50000}
ROUNDS=${ROUNDS:-3}
LATENCY_RATE=${LATENCY_RATE:-1000}
LATENCY_SECONDS=${LATENCY_SECONDS:-30}
WARMUP_SECONDS=${WARMUP_SECONDS:-10}
DB=trusst_compare

# shellcheck source=scripts/lib/bench.sh
source scripts/lib/bench.sh
# shellcheck source=scripts/lib/debezium.sh
source scripts/lib/debezium.sh
SLOTS='^cmp_(recv|cdc|dbz|dbzt|null|dec|tune)_[0-9a-z_]+$'
bench_cleanup() { scripts/services.sh drop-slots "$SLOTS"; }
bench_init --benches

debezium_fetch

# Candidates for `tune`: "label|heap|properties" (space-separated; producer.* means
# producer.override.*). Each drains the same WAL on a slot of its own.
TUNE_CANDIDATES=(
    "connector defaults|-Xmx1g|"
    "first try: batches 20480, queue 81920, poll 50 ms; linger 20 ms, batch 1 MiB, lz4, 5 in flight|-Xmx1g|max.batch.size=20480 max.queue.size=81920 poll.interval.ms=50 producer.linger.ms=20 producer.batch.size=1048576 producer.compression.type=lz4 producer.max.in.flight.requests.per.connection=5"
    "the same, compression none|-Xmx1g|max.batch.size=20480 max.queue.size=81920 poll.interval.ms=50 producer.linger.ms=20 producer.batch.size=1048576 producer.compression.type=none producer.max.in.flight.requests.per.connection=5"
    "the first try with -Xmx2g|-Xmx2g|max.batch.size=20480 max.queue.size=81920 poll.interval.ms=50 producer.linger.ms=20 producer.batch.size=1048576 producer.compression.type=lz4 producer.max.in.flight.requests.per.connection=5"
    "larger: batches 65536, queue 262144, poll 10 ms; linger 50 ms, batch 4 MiB, 256 MiB buffer, lz4|-Xmx2g|max.batch.size=65536 max.queue.size=262144 poll.interval.ms=10 producer.linger.ms=50 producer.batch.size=4194304 producer.buffer.memory=268435456 producer.compression.type=lz4 producer.max.in.flight.requests.per.connection=5"
    # Uncompressed, a producer batch must fit the broker's message.max.bytes (1 MiB by default): 4 MiB
    # ones are refused and split and retried without end.
    "larger, compression none, batch 1000000 bytes|-Xmx2g|max.batch.size=65536 max.queue.size=262144 poll.interval.ms=10 producer.linger.ms=50 producer.batch.size=1000000 producer.buffer.memory=268435456 producer.compression.type=none producer.max.in.flight.requests.per.connection=5"
)
# A candidate's properties, one per line, producer.* spelled out.
candidate_props() { tr ' ' '\n' <<<"$1" | sed 's/^producer\./producer.override./'; }

scripts/services.sh drop-slots "$SLOTS"
bench_fresh_db $DB
psqlb -d $DB -c "CREATE PUBLICATION bench_pub FOR TABLE contacts, inferences, questions, s3_conversations" >/dev/null
for r in $(seq 1 "$ROUNDS"); do
    if [[ $MODE == tune ]]; then
        for i in "${!TUNE_CANDIDATES[@]}"; do
            psqlb -d $DB -c "SELECT pg_create_logical_replication_slot('cmp_tune_${i}_$r', 'pgoutput')" >/dev/null
        done
        continue
    fi
    for who in recv cdc dbz dbzt null; do
        psqlb -d $DB -c "SELECT pg_create_logical_replication_slot('cmp_${who}_$r', 'pgoutput')" >/dev/null
    done
done

# Peeking does not consume: one slot serves every round of (d).
[[ $MODE == tune ]] || psqlb -d $DB -c "SELECT pg_create_logical_replication_slot('cmp_dec_0', 'pgoutput')" >/dev/null

bench_workload $DB "$N"
echo "bench: $rows row changes up to $end; $ROUNDS rounds" >&2

stop() {
    kill -TERM "$1"
    wait "$1" || true
}

# Decoding alone, up to the workload's end: seconds (wall clock of the query) and messages.
decode_only() {
    local t0 t1 count
    t0=$(date +%s%3N)
    count=$(psqlb -d $DB -tAc "SELECT count(*) FROM pg_logical_slot_peek_binary_changes('cmp_dec_0', '$end', NULL,
        'proto_version', '1', 'publication_names', 'bench_pub')")
    t1=$(date +%s%3N)
    echo "$(seconds_between "$t0" "$t1") $count"
}

# The null reader on its own slot: seconds (its own clock, connect to the last commit), peak
# RSS (KB), CPU seconds, messages.
null_drain() {
    local s kb u sys
    /usr/bin/time -f "%e %M %U %S" -o "$work/null.time" "$latency_bin" null "$url" "$1" bench_pub "$end" \
        >"$work/null.json"
    read -r _ kb u sys <"$work/null.time"
    read -r s messages < <(json_fields "$work/null.json" seconds messages)
    echo "$s $kb $(python3 -c "print(f'{$u + $sys:.2f}')") $messages"
}

# Debezium (JVM flags HEAP, connector properties PROPS) draining SLOT until its topics hold every
# row change, then stopped; sets $dbz_drained to "SECONDS PEAK_RSS_KB CPU_SECONDS START_UP_SECONDS".
dbz_drain() {
    local slot=$1 heap=$2 props=$3 prefix marks_pid t0 first_ms done_ms records
    prefix=${slot}_$(date +%s)
    "$latency_bin" watermarks "$KAFKA_BROKERS" "$(debezium_topics "$prefix")" "$rows" 60 >"$work/dbz-drain.json" &
    marks_pid=$!
    t0=$(date +%s%3N)
    debezium_start "$slot" "$prefix" "$heap" "$props"
    while kill -0 $marks_pid 2>/dev/null; do
        kill -0 $dbz_pid 2>/dev/null || {
            tail -40 "$work/debezium.log" >&2
            exit 1
        }
        sleep 0.1
    done
    read -r first_ms done_ms records < <(json_fields "$work/dbz-drain.json" first_ms done_ms records)
    ((records >= rows)) || {
        tail -40 "$work/debezium.log" >&2
        echo "bench: Debezium's topics hold $records records, $rows row changes were written" >&2
        exit 1
    }
    dbz_drained="$(seconds_between "$t0" "$done_ms") $(proc_figures $dbz_pid) $(seconds_between "$t0" "$first_ms")"
    stop $dbz_pid
}

if [[ $MODE == tune ]]; then
    declare -A tune_runs
    for r in $(seq 1 "$ROUNDS"); do
        for i in "${!TUNE_CANDIDATES[@]}"; do
            IFS='|' read -r label heap props <<<"${TUNE_CANDIDATES[$i]}"
            echo "bench: round $r: Debezium, $label" >&2
            dbz_drain "cmp_tune_${i}_$r" "$heap" "$(candidate_props "$props")"
            tune_runs[$i]+="$dbz_drained;"
            echo "bench: round $r: $label: ${dbz_drained%% *} s" >&2
        done
    done
    cmd="N=$N ROUNDS=$ROUNDS scripts/bench-compare.sh tune"
    for i in "${!TUNE_CANDIDATES[@]}"; do
        echo "${TUNE_CANDIDATES[$i]}|${tune_runs[$i]}"
    done >"$work/tune.txt"
    python3 - "$N" "$rows" "$(bench_machine)" "$cmd" "$DEBEZIUM_VERSION" "$work/tune.txt" <<'PY' | tee /dev/stderr | bench_write_section "Debezium tuning (scripts/bench-compare.sh tune)"
import sys, datetime
n, rows, machine, cmd, version = int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:6]
lines = []
for line in open(sys.argv[6]):
    label, heap, props, runs = line.rstrip("\n").split("|")
    runs = [tuple(float(x) for x in r.split()) for r in runs.split(";") if r.strip()]
    s, kb, cpu, start = sorted(runs)[len(runs) // 2]
    settings = ", ".join(f"`{p}`" for p in props.split()) or "-"
    lines.append(f"| {label} | `{heap}` | {settings} | {s:.2f} s | {start:.2f} s | {rows / s:,.0f} | {rows / (s - start):,.0f} | {cpu:.2f} | {kb / 1024:,.0f} MB | {', '.join(f'{r[0]:.2f}' for r in runs)} |")
print(f"""## Debezium tuning (scripts/bench-compare.sh tune)

Run {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC on {machine}. Command: `{cmd}`.
How the tuned Debezium of the side-by-side run ((b2), `DEBEZIUM_TUNED_PROPS`) was chosen: Debezium
{version} drained the same WAL ({n} contacts, {rows} row changes) once per candidate per round, each
on its own slot, as in the side-by-side run; the table shows each candidate's median round.
`producer.*` stands for `producer.override.*` (the worker runs with
`connector.client.config.override.policy=All`).

| candidate | heap | settings | time to drain | start-up | row changes/s | streaming row changes/s | CPU s | peak RSS | all rounds (s) |
|---|---|---|---|---|---|---|---|---|---|
""" + "\n".join(lines))
PY
    echo "bench: reproduce with: $cmd" >&2
    exit
fi
dec_runs=()
null_runs=()
recv_runs=()
dbz_runs=()
dbzt_runs=()
cdc_runs=()
for r in $(seq 1 "$ROUNDS"); do
    echo "bench: round $r: (d) decoding alone" >&2
    dec_runs+=("$(decode_only)")
    echo "bench: round $r: (n) null streaming reader" >&2
    null_runs+=("$(null_drain "cmp_null_$r")")
    echo "bench: round $r: (a) pg_recvlogical" >&2
    recv_runs+=("$(recvlogical_drain $DB "cmp_recv_$r" bench_pub "$end")")

    echo "bench: round $r: (b) Debezium $DEBEZIUM_VERSION in Kafka Connect $KAFKA_VERSION" >&2
    dbz_drain "cmp_dbz_$r" "$DEBEZIUM_HEAP" "$DEBEZIUM_PROPS"
    dbz_runs+=("$dbz_drained")
    echo "bench: round $r: (b2) Debezium tuned" >&2
    dbz_drain "cmp_dbzt_$r" "$DEBEZIUM_TUNED_HEAP" "$DEBEZIUM_TUNED_PROPS"
    dbzt_runs+=("$dbz_drained")

    echo "bench: round $r: (c) trusst-cdc source" >&2
    cdc_drain "cmp_cdc_$r" bench_pub "$N" "trusst.cmp.$(date +%s).$r"
    cdc_runs+=("$drained")
    stop $source_pid
    echo "bench: round $r: (a) ${recv_runs[-1]%% *} s, (b) ${dbz_runs[-1]%% *} s, (b2) ${dbzt_runs[-1]%% *} s, (c) ${drained%% *} s" >&2
done

# Latency at a steady rate, each contender alone and fresh on a new slot: the generator runs for
# WARMUP_SECONDS + LATENCY_SECONDS (+5 s of slack); events committed in the first WARMUP_SECONDS
# after the first one read are not counted.
latency_run() {
    local name=$1 topic=$2 format=$3 pid=$4 seed=$5 gen_pid lat_pid
    echo "bench: latency of $name at $LATENCY_RATE contacts/s, ${WARMUP_SECONDS}s warm-up + ${LATENCY_SECONDS}s" >&2
    bench_checkpoint
    steady_load $(((WARMUP_SECONDS + LATENCY_SECONDS + 5) * LATENCY_RATE)) "$seed" &
    gen_pid=$!
    # Subscribed once the topic exists and has its first event.
    "$latency_bin" watermarks "$KAFKA_BROKERS" "$topic" 1 >/dev/null
    # From now on the broker stamps records with their append time (the warm-up covers the switch).
    scripts/services.sh kafka-configs --alter --entity-type topics --entity-name "$topic" \
        --add-config message.timestamp.type=LogAppendTime >/dev/null
    "$latency_bin" "$KAFKA_BROKERS" "$topic" $((LATENCY_RATE * LATENCY_SECONDS)) 15 "$WARMUP_SECONDS" "$format" \
        >"$work/latency-$name.json" &
    lat_pid=$!
    wait $lat_pid
    wait $gen_pid
    kill -0 "$pid" 2>/dev/null || { echo "bench: $name ended during the latency run" >&2; exit 1; }
    echo "$(tail -1 "$work/latency-$name.json" | tr -d '\n') $(proc_figures "$pid")"
}

psqlb -d $DB -c "SELECT pg_create_logical_replication_slot('cmp_dbz_lat', 'pgoutput')" >/dev/null
prefix=cmp_dbz_lat_$(date +%s)
debezium_start cmp_dbz_lat "$prefix" "$DEBEZIUM_HEAP" "$DEBEZIUM_PROPS"
dbz_lat=$(latency_run debezium "$prefix.public.contacts" debezium $dbz_pid 7)
stop $dbz_pid

psqlb -d $DB -c "SELECT pg_create_logical_replication_slot('cmp_dbzt_lat', 'pgoutput')" >/dev/null
prefix=cmp_dbzt_lat_$(date +%s)
debezium_start cmp_dbzt_lat "$prefix" "$DEBEZIUM_TUNED_HEAP" "$DEBEZIUM_TUNED_PROPS"
dbzt_lat=$(latency_run debezium-tuned "$prefix.public.contacts" debezium $dbz_pid 9)
stop $dbz_pid

psqlb -d $DB -c "SELECT pg_create_logical_replication_slot('cmp_cdc_lat', 'pgoutput')" >/dev/null
topic=trusst.cmp.lat.$(date +%s)
start_source cmp_cdc_lat bench_pub "$topic"
cdc_lat=$(latency_run trusst-cdc "$topic" trusst $source_pid 8)
stop $source_pid

cmd="N=$N ROUNDS=$ROUNDS LATENCY_RATE=$LATENCY_RATE LATENCY_SECONDS=$LATENCY_SECONDS WARMUP_SECONDS=$WARMUP_SECONDS scripts/bench-compare.sh"
python3 - "$N" "$rows" "$(bench_machine)" "$cmd" "$DEBEZIUM_VERSION" "$KAFKA_VERSION" "$DEBEZIUM_HEAP" \
    "$(printf '%s;' "${recv_runs[@]}")" "$(printf '%s;' "${dbz_runs[@]}")" "$(printf '%s;' "${cdc_runs[@]}")" \
    "$dbz_lat" "$cdc_lat" "$LATENCY_RATE" "$WARMUP_SECONDS" \
    "$(printf '%s;' "${dec_runs[@]}")" "$(printf '%s;' "${null_runs[@]}")" \
    "$(printf '%s;' "${dbzt_runs[@]}")" "$dbzt_lat" "$DEBEZIUM_TUNED_HEAP" "$(tr '\n' ' ' <<<"$DEBEZIUM_TUNED_PROPS")" <<'PY' | tee /dev/stderr | bench_write_section "Side by side (scripts/bench-compare.sh)"
import json, sys, datetime
n, rows, machine, cmd, dbz_version, kafka_version, heap = int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:8]
parse = lambda arg: [tuple(float(x) for x in run.split()) for run in arg.split(';') if run.strip()]
recv_runs, dbz_runs, cdc_runs = parse(sys.argv[8]), parse(sys.argv[9]), parse(sys.argv[10])
def lat(arg):
    head, _, figures = arg.rpartition('} ')
    kb, cpu = figures.split()
    return json.loads(head + '}'), int(kb)
(dbz_lat, dbz_steady_kb), (cdc_lat, cdc_steady_kb) = lat(sys.argv[11]), lat(sys.argv[12])
rate, warmup = int(sys.argv[13]), int(sys.argv[14])
dec_runs, null_runs = parse(sys.argv[15]), parse(sys.argv[16])
dbzt_runs = parse(sys.argv[17])
dbzt_lat, dbzt_steady_kb = lat(sys.argv[18])
tuned_heap, tuned_props = sys.argv[19], sys.argv[20].split()
# The median round by time, reported whole (its RSS and CPU belong to that run).
median = lambda runs: sorted(runs)[len(runs) // 2]
recv_s, recv_kb, recv_cpu = median(recv_runs)
dbz_s, dbz_kb, dbz_cpu, dbz_start = median(dbz_runs)
dbzt_s, dbzt_kb, dbzt_cpu, dbzt_start = median(dbzt_runs)
cdc_s, cdc_kb, cdc_cpu, cdc_start = median(cdc_runs)
dec_s, dec_messages = median(dec_runs)
null_s, null_kb, null_cpu, null_messages = median(null_runs)
all_runs = lambda runs: ", ".join(f"{r[0]:.2f}" for r in runs)
mb = lambda kb: f"{kb / 1024:,.0f} MB"
def row(name, s, kb, cpu, start, runs):
    streaming = f"{rows / (s - start):,.0f}" if start is not None else "-"
    start = f"{start:.2f} s" if start is not None else "-"
    cpu = f"{cpu:.2f}" if cpu is not None else "-"
    kb = mb(kb) if kb is not None else "-"
    return f"| {name} | {s:.2f} s | {start} | {rows / s:,.0f} | {streaming} | {n / s:,.0f} | {cpu} | {kb} | {all_runs(runs)} |"
table = f"""## Side by side (scripts/bench-compare.sh)

Run {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC on {machine}; PostgreSQL, Kafka and every
contender on the same machine. Command: `{cmd}`.

Workload: {n} contacts, each TRANSCRIPTION -> INFERENCE -> COMPLETED with about 12 inferences,
{rows} row changes, then `VACUUM (ANALYZE)` as autovacuum would. Every slot was created on one
publication before the workload, so each contender decoded the same WAL from the same start;
{len(cdc_runs)} rounds ran (d), (n), (a), (b), (b2), (c) in turn and the table shows each one's median round.

- (d) Decoding alone: `SELECT count(*) FROM pg_logical_slot_peek_binary_changes(...)` with
  pgoutput and the source's options (protocol 1, the publication), up to the workload's end:
  {dec_messages:,.0f} messages decoded in a backend and counted, nothing sent to a client.
- (n) The null streaming reader (`latency null`): the source's own replication client reads the
  slot over a replication connection and acknowledges every commit, and does nothing else: the
  ceiling for a reader built on that client, which the source is held to. `pg_recvlogical` (a)
  is faster than it, so part of (n)'s time is the client's own cost per message (it parses each
  one into an event), not the walsender's.
- (a) `pg_recvlogical`, pgoutput, to `/dev/null`: PostgreSQL's own streaming client.
- (b) Debezium {dbz_version} PostgreSQL connector in Kafka Connect {kafka_version} standalone (`{heap}`, G1),
  pgoutput, `snapshot.mode=no_data` on its own slot, JSON converter without schemas, one topic per
  table (6 partitions), connector defaults otherwise: one change event per row. Drained = its topics'
  high watermarks add up to the row changes. Start-up (JVM, worker, connector) counts in the time
  to drain, and is also shown on its own; "streaming" is row changes/s after it.
- (b2) The same Debezium tuned for throughput as its users tune it (`{tuned_heap}`;
  chosen among the candidates of the section "Debezium tuning"): {", ".join(f"`{p}`" for p in tuned_props)}.
  The `producer.override.*` settings reach the Connect producer because the worker runs with
  `connector.client.config.override.policy=All`.
- (c) trusst-cdc source: one enriched event per completed contact (re-read with the seed's join),
  produced idempotently with `acks=all`. Drained = a consumer has read every contact's event.

CPU is user + system time of the process (`/proc/PID/stat`, or `/usr/bin/time` for (a)); peak RSS
is its `VmHWM`.

| | time to drain | start-up | row changes/s | streaming row changes/s | contacts/s | CPU s | peak RSS | all rounds (s) |
|---|---|---|---|---|---|---|---|---|
{row("(d) decoding alone (peek, in SQL)", dec_s, None, None, None, dec_runs)}
{row("(n) null streaming reader", null_s, null_kb, null_cpu, None, null_runs)}
{row("(a) pg_recvlogical -> /dev/null", recv_s, recv_kb, recv_cpu, None, recv_runs)}
{row(f"(b) Debezium -> Kafka (row events)", dbz_s, dbz_kb, dbz_cpu, dbz_start, dbz_runs)}
{row(f"(b2) Debezium tuned -> Kafka (row events)", dbzt_s, dbzt_kb, dbzt_cpu, dbzt_start, dbzt_runs)}
{row("(c) trusst-cdc -> Kafka (enriched contact events)", cdc_s, cdc_kb, cdc_cpu, cdc_start, cdc_runs)}

Commit-to-Kafka latency at a steady {rate} contacts/s (generator on the same machine, two
connections, 50 contacts per transaction; each contender started fresh on a new slot after a
`CHECKPOINT`, events of the first {warmup} s not counted). Latency = the moment a consumer (librdkafka, the same settings
for both) reads the event minus the commit time PostgreSQL put in the stream: Debezium's
`source.ts_us` on the contact's COMPLETED row event, trusst-cdc's `source.commit_ts` on the
contact's event. "At the broker" uses the record's append time instead (the topic switched to
`message.timestamp.type=LogAppendTime` once it existed).

| | events | p50 | p99 | max | p50 at the broker | p99 at the broker | peak RSS after the steady run |
|---|---|---|---|---|---|---|---|
| (b) Debezium | {dbz_lat['events']} | {dbz_lat['p50_ms']} ms | {dbz_lat['p99_ms']} ms | {dbz_lat['max_ms']} ms | {dbz_lat.get('record_p50_ms')} ms | {dbz_lat.get('record_p99_ms')} ms | {mb(dbz_steady_kb)} |
| (b2) Debezium tuned | {dbzt_lat['events']} | {dbzt_lat['p50_ms']} ms | {dbzt_lat['p99_ms']} ms | {dbzt_lat['max_ms']} ms | {dbzt_lat.get('record_p50_ms')} ms | {dbzt_lat.get('record_p99_ms')} ms | {mb(dbzt_steady_kb)} |
| (c) trusst-cdc | {cdc_lat['events']} | {cdc_lat['p50_ms']} ms | {cdc_lat['p99_ms']} ms | {cdc_lat['max_ms']} ms | {cdc_lat.get('record_p50_ms')} ms | {cdc_lat.get('record_p99_ms')} ms | {mb(cdc_steady_kb)} |

| ratio | trusst-cdc / null reader | trusst-cdc / pg_recvlogical | trusst-cdc / Debezium | trusst-cdc / Debezium tuned | target |
|---|---|---|---|---|---|
| row changes/s (time to drain) | {null_s / cdc_s:.2f} | {recv_s / cdc_s:.2f} | {dbz_s / cdc_s:.2f} | {dbzt_s / cdc_s:.2f} | >= 0.9 x null reader; >= 2 x Debezium |
| row changes/s, start-up left out | {null_s / (cdc_s - cdc_start):.2f} | - | {(dbz_s - dbz_start) / (cdc_s - cdc_start):.2f} | {(dbzt_s - dbzt_start) / (cdc_s - cdc_start):.2f} | |
| CPU seconds | {cdc_cpu / null_cpu:.2f} | {cdc_cpu / recv_cpu:.2f} | {cdc_cpu / dbz_cpu:.2f} | {cdc_cpu / dbzt_cpu:.2f} | |
| peak RSS (drain) | {cdc_kb / null_kb:.2f} | {cdc_kb / recv_kb:.2f} | {cdc_kb / dbz_kb:.2f} | {cdc_kb / dbzt_kb:.2f} | <= 0.1 x Debezium |
| peak RSS (steady run) | - | - | {cdc_steady_kb / dbz_steady_kb:.2f} | {cdc_steady_kb / dbzt_steady_kb:.2f} | |
| latency p99 | - | - | {cdc_lat['p99_ms'] / dbz_lat['p99_ms']:.2f} | {cdc_lat['p99_ms'] / dbzt_lat['p99_ms']:.2f} | |

The null reader against decoding alone ({null_s / dec_s:.1f} x its time) is the cost of streaming
itself: the walsender writes every message into the replication protocol's CopyData frames and
waits for the socket, and the client reads and parses them; decoding alone runs the same
pgoutput plugin in one backend and only counts its output. Everything a streaming reader adds on
top of the walsender's limit shows as the gap between (c) or (a) and (n).

Debezium emits one event per row change and leaves joining them into a contact to the consumer;
trusst-cdc's figures include that work (the re-read) and publish one event per contact.
"""
print(table)
PY
echo "bench: reproduce with: $cmd" >&2
