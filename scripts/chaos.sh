#!/usr/bin/env bash
# Chaos suite: the whole pipeline runs on a three-broker Kafka cluster (RF 3,
# min.insync.replicas 2) while a workload changes the database the way production does, and a
# nemesis injects faults chosen and timed at random from a seed.
#
# Pipeline: two sources for one slot (one streams, the other stands by and takes over;
# takeover_after 10 s, message.timeout.ms 5 s so a Kafka outage outlasts the producer), source b
# publishing Avro through the schema registry and source a JSON, so the topic holds both as
# takeovers alternate (the sinks read either); the Salesforce, Dynamics and MuleSoft sinks; the
# CRM emulator (its schema extended with the fields of the renamed and newly universal questions).
#
# Schema: SCHEMA=variant (default) loads the tables with uuid ids, timestamptz times, an enum
# stage and an identity index on inferences instead of REPLICA IDENTITY FULL
# (tests/fixtures/trusst_schema_variant.sql); SCHEMA=guide the integration guide's.
#
# Workload: contacts completed continuously (TRANSCRIPTION, INFERENCE, COMPLETED in three
# transactions, so a contact's answers precede its completion), and, every second, one of: an
# answer changed on a completed contact, an answer deleted (its field must be cleared), a
# completed contact deleted (deleted in every CRM), a contact written in a transaction that
# commits 20 s later (older timestamps than what was committed meanwhile); every tenth of those
# an answer of 1.25 MB (over the broker's message size: the source shortens it, each CRM holds
# what its field takes). Every QUESTION_EVERY seconds a question changes, in turn: empathy_rating
# renamed (and back: its old field must be cleared everywhere), compliance_check stops (then
# starts again) being universal, product_knowledge starts (then stops) being universal; each
# re-emits every completed contact that answers it.
#
# Faults: first a restart of PostgreSQL during the initial snapshot (of PRELOAD contacts written
# before the sources start); then the nemesis picks ROUNDS of these from the seed, and the pause
# before each:
#   source-kill       kill -9 of the streaming source (the standby takes over; the killed one
#                     restarts as the new standby)
#   source-freeze     SIGSTOP of the streaming source for 15 s (PostgreSQL ends its walsender
#                     after takeover_after, the standby takes over), then SIGCONT
#   sink-kill         kill -9 of one sink, restarted 2 s later
#   broker-kill       kill -9 of the leader of the event topic's partition 0, down FAULT_SECONDS
#   kafka-outage      every broker killed for 15 s (longer than message.timeout.ms)
#   kafka-outage-source-kill
#                     the same, and the streaming source killed while Kafka is away
#   pg-restart        a restart of PostgreSQL
#   crm-errors        the emulator failing 30% of data calls for FAULT_SECONDS
#   crm-slow          every CRM call taking 2 s longer for FAULT_SECONDS
#   allowance-rebalance
#                     the CRMs' API allowance spent (Salesforce 403 REQUEST_LIMIT_EXCEEDED,
#                     Dataverse and MuleSoft 429) for FAULT_SECONDS, and meanwhile a second
#                     Salesforce sink joins the group and leaves it (two rebalances)
#   registry-down     the schema registry unreachable (SIGSTOP: its storage here is in memory,
#                     so a kill would lose the schemas) for FAULT_SECONDS, and meanwhile the
#                     streaming source and one sink killed and restarted, so both need it
# Then the workload stops, the script waits for quiet (the slot confirmed everything, every sink's
# lag 0) and compares each CRM with the guide's pivoted query (COMPLETED contacts) run directly in
# PostgreSQL: contacts missing, stale values, answers not cleared, duplicate records, records of
# contacts not COMPLETED (or deleted), and dead letters; a field of a question that is no longer
# universal (renamed, or no longer universal) must be empty. A text longer than a CRM field (or
# than the broker's message) counts as equal when the CRM holds its beginning, as much as fits.
# Exits 1 unless all are 0; a failing run prints its seed, and the same SEED and ROUNDS replay
# the same schedule. REPORT=1 writes the run's report to the "Chaos" section of BENCHMARKS.md.
#
#   scripts/chaos.sh     SEED=random ROUNDS=22 RATE=8 FAULT_SECONDS=20 PRELOAD=20000 QUIET_TIMEOUT=900
#                        QUESTION_EVERY=90 SCHEMA=variant|guide REPORT=0|1
#                        CHAOS_KAFKA_PORT=19400 (brokers P..P+2, controllers P+10..P+12)
#                        BENCH_PROFILE=release|debug
#
# Uses PostgreSQL of scripts/services.sh (PGPORT, PG_INSTANCE as there; left running) and a
# cluster of its own in .run/kafka-chaos (stopped at the end). A full run (20 faults) takes about
# 15 minutes; scripts/test.sh runs a short one (ROUNDS=11, FAULT_SECONDS=8, PRELOAD=5000).
set -euo pipefail
cd "$(dirname "$0")/.."

SEED=${SEED:-$((RANDOM * 32768 + RANDOM))}
ROUNDS=${ROUNDS:-22}
RATE=${RATE:-8}
FAULT_SECONDS=${FAULT_SECONDS:-20}
export QUIET_TIMEOUT=${QUIET_TIMEOUT:-900}
QUESTION_EVERY=${QUESTION_EVERY:-90}
SCHEMA=${SCHEMA:-variant}
REPORT=${REPORT:-0}
started_at=$(date -u +"%Y-%m-%d %H:%M")
CHAOS_KAFKA_PORT=${CHAOS_KAFKA_PORT:-19400}
PRELOAD=${PRELOAD:-20000}
DB=trusst_chaos
SLOT=chaos
FAULTS=(source-kill source-freeze sink-kill broker-kill kafka-outage kafka-outage-source-kill pg-restart
    crm-errors crm-slow allowance-rebalance registry-down)

log() { echo "chaos: $(date +%H:%M:%S) $*" >&2; }
# A fault, logged and kept for the report.
fault_log() {
    log "fault $faults: $*"
    echo "$*" >>"$work/faults.txt"
}
cluster() { KAFKA_INSTANCE=kafka-chaos KAFKA_PORT=$CHAOS_KAFKA_PORT KAFKA_BROKERS_N=3 scripts/services.sh "$@"; }

# shellcheck source=scripts/lib/bench.sh
source scripts/lib/bench.sh
bench_cleanup() {
    [[ -n ${registry_pid:-} ]] && kill -CONT "$registry_pid" 2>/dev/null
    scripts/services.sh drop-slots "^$SLOT\$" || true
    cluster stop-kafka-cluster || true
}
export BENCH_SERVICES=pg
bench_init --benches
fail() {
    log "$*"
    log "FAILED: replay with SEED=$SEED ROUNDS=$ROUNDS FAULT_SECONDS=$FAULT_SECONDS scripts/chaos.sh"
    exit 1
}

# The schedule: from the seed only, so a replay injects the same faults in the same order, with
# the same pauses and the same victims.
schedule=$(python3 - "$SEED" "$ROUNDS" "$FAULT_SECONDS" "${FAULTS[@]}" <<'PY'
import random, sys
seed, rounds, pause = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
kinds = sys.argv[4:]
rng = random.Random(seed)
# Every kind once before any repeats (in random order), so a run of len(kinds) rounds has them all.
order = []
while len(order) < rounds:
    batch = kinds[:]
    rng.shuffle(batch)
    order += batch
for kind in order[:rounds]:
    wait = rng.randint(pause // 2, pause)
    victim = rng.choice(["salesforce", "dynamics", "mulesoft"])
    print(kind, wait, victim)
PY
)
log "seed $SEED, $ROUNDS faults:"
echo "$schedule" | nl -w2 -s'. ' | sed 's/^/chaos:   /' >&2

# A fresh cluster each run: brokers start in seconds and nothing of an earlier run is in it.
cluster stop-kafka-cluster
rm -rf .run/kafka-chaos
cluster start-kafka-cluster
KAFKA_BROKERS=$(cluster cluster-brokers)
export KAFKA_BROKERS

# The registry for source b's Avro (and every sink, which reads either format).
scripts/services.sh start-registry
registry_pid=$(<.run/registry/registry.pid)

scripts/services.sh drop-slots "^$SLOT\$"
if [[ $SCHEMA == variant ]]; then
    url=${DATABASE_URL%/*}/$DB
    log "fresh database $DB, the variant schema (uuid ids, timestamptz, an enum stage)"
    psqlb -d postgres -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB" >/dev/null
    psqlb -d $DB -q -f tests/fixtures/trusst_schema_variant.sql
    "$bin" generate --database-url "$url" --schema-only
    # The generator's setup makes inferences REPLICA IDENTITY FULL; the variant keeps its index.
    psqlb -d $DB -c "ALTER TABLE inferences REPLICA IDENTITY USING INDEX inferences_cdc_identity" >/dev/null
else
    bench_fresh_db $DB
fi
# The shipped emulator schema, plus the fields of the questions the workload renames or makes
# universal (a CRM admin adds them before such a change).
emulator_config=$work/crm-emulator.toml
python3 - connector-config/crm-emulator.toml "$emulator_config" <<'PY'
import sys
import os
# Paths in the file are relative to it: the copy elsewhere names them from here.
text = open(sys.argv[1]).read().replace('"../tests/', '"%s/tests/' % os.getcwd())
text = text.replace('Empathy_Rating__c = { type = "double" }\n',
    'Empathy_Rating__c = { type = "double" }\nEmpathy_Score__c = { type = "double" }\nProduct_Knowledge__c = { type = "double" }\n', 1)
text = text.replace('empathy_rating = { type = "integer" }\n',
    'empathy_rating = { type = "integer" }\nempathy_score = { type = "integer" }\nproduct_knowledge = { type = "integer" }\n', 1)
assert text.count("Empathy_Score__c") == 1 and text.count("empathy_score") == 1
open(sys.argv[2], "w").write(text)
PY
start_emulator
log "CRM emulator at $base"
run=$(date +%s)
topic=trusst.chaos.$run

# Two sources, a (JSON) and b (Avro), with one config otherwise (each its own state folder and
# log).
declare -A src_pid src_port
declare -A src_format=([a]=json [b]=avro)
source_up() {
    local name=$1
    mkdir -p "$work/state-$name"
    # One log per start (source-a.log, then source-a.1.log, ...), so the port read is this one's.
    [[ -f $work/source-$name.log ]] && mv "$work/source-$name.log" "$work/source-$name.$(date +%s%N).log"
    cat >"$work/source-$name.toml" <<TOML
[kafka]
topic = "$topic"
format = "${src_format[$name]}"
replication_factor = 3
min_insync_replicas = 2
[kafka.properties]
"message.timeout.ms" = "5000"
[source]
slot = "$SLOT"
publication = "$SLOT"
snapshot = "initial"
state_dir = "$work/state-$name"
heartbeat_interval = "2s"
takeover_after = "10s"
[metrics]
listen = "127.0.0.1:0"
TOML
    DATABASE_URL=$url "$bin" source --config "$work/source-$name.toml" 2>>"$work/source-$name.log" &
    src_pid[$name]=$!
    wait_for "$work/source-$name.log" "metrics endpoint on" "${src_pid[$name]}"
    src_port[$name]=$(sed -n 's/.*metrics endpoint on http:\/\/127.0.0.1:\([0-9]*\).*/\1/p' "$work/source-$name.log" | tail -1)
}
# The source that streams now (its /ready answers 200), waiting up to 60 s for one.
active_source() {
    local name deadline=$((SECONDS + 60))
    while ((SECONDS < deadline)); do
        for name in a b; do
            if [[ $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:${src_port[$name]}/ready") == 200 ]]; then
                echo "$name"
                return
            fi
        done
        sleep 0.5
    done
    fail "no source streams"
}

targets=(salesforce dynamics mulesoft)
declare -A sinks
# A short pause once the Salesforce allowance is (nearly) spent, so the run does not sit out the
# shipped five minutes after the allowance is renewed; the sinks' dead-letter topics replicated
# as the cluster's other topics.
sink_edit='text = text.replace("limit_pause = \"5m\"", "limit_pause = \"5s\""); text = text.replace("[kafka]\n", "[kafka]\ndlq_replication_factor = 3\n", 1)'
start_target() {
    start_sink "$1" "$topic" "chaos-$1-$run" "$sink_edit"
    sinks[$1]=$sink_pid
}

faults=0
# Contacts written before the sources start, so their initial snapshot takes a while: PostgreSQL
# is restarted in the middle of it.
if ((PRELOAD > 0)); then
    log "writing $PRELOAD completed contacts for the initial snapshot"
    "$bin" generate --database-url "$url" --contacts "$PRELOAD" --chunk 500 --seed "$SEED" 2>>"$work/gen.log"
fi
# b first: the initial snapshot goes out in Avro.
source_up b
source_up a
if ((PRELOAD > 0)); then
    deadline=$((SECONDS + 120))
    until grep -qs "initial snapshot started" "$work"/source-[ab].log; do
        ((SECONDS < deadline)) || fail "no source started the initial snapshot"
        sleep 0.1
    done
    sleep 1
    faults=1
    grep -qs "initial snapshot done" "$work"/source-[ab].log && during="after it ended (too few contacts)" || during=during
    fault_log "restart of PostgreSQL $during the initial snapshot"
    scripts/services.sh restart-pg
fi
active_source >/dev/null
for t in "${targets[@]}"; do start_target "$t"; done

# The generator: batches of ten seconds' worth of contacts, each with a seed of its own (so new
# ids), until the stop file appears. A batch that fails (PostgreSQL restarting) is followed by the
# next one; its unfinished contacts stay short of COMPLETED, which the comparison allows for.
touch "$work/generate"
(
    i=0
    while [[ -f $work/generate ]]; do
        i=$((i + 1))
        "$bin" generate --database-url "$url" --contacts $((RATE * 10)) --chunk 2 --rate "$RATE" --seed $((SEED + i)) \
            2>>"$work/gen.log" || sleep 1
    done
) &
gen_pid=$!

# The changes beside the stream of new contacts, one a second (a failed one, during a PostgreSQL
# restart, is skipped). Ids and times are written as literals and functions PostgreSQL casts to
# the columns' types, so the same statements run on either schema.
(
    n=0
    completed="SELECT contact_id FROM contacts WHERE current_stage = 'COMPLETED' AND external_id NOT LIKE 'ext-late-%' ORDER BY random() LIMIT 1"
    while [[ -f $work/generate ]]; do
        n=$((n + 1))
        case $((n % 4)) in
        0) sql="UPDATE inferences SET result = (1 + $n % 10)::text, updated_at = now()
                WHERE question_id = 'q-quality-score' AND contact_id = ($completed)" ;;
        1) sql="DELETE FROM inferences WHERE question_id = 'q-resolution' AND contact_id = ($completed)" ;;
        2) sql="DELETE FROM contacts WHERE contact_id = ($completed)" ;;
        3)
            # A contact copied from a completed one in a transaction that commits 20 s later.
            id=$(</proc/sys/kernel/random/uuid)
            {
                echo "BEGIN;
                CREATE TEMP TABLE pick ON COMMIT DROP AS
                    SELECT contact_id FROM contacts c WHERE current_stage = 'COMPLETED' AND external_id NOT LIKE 'ext-late-%'
                    AND EXISTS (SELECT 1 FROM s3_conversations s WHERE s.contact_id = c.contact_id) LIMIT 1;
                INSERT INTO contacts (contact_id, stream_id, external_id, start_time, direction, current_stage, agent_id)
                    SELECT '$id', stream_id, 'ext-late-$id', start_time, direction, 'COMPLETED', agent_id
                    FROM contacts WHERE contact_id = (SELECT contact_id FROM pick);
                INSERT INTO s3_conversations (conversation_id, contact_id, stream_id, conn_id, agent_id, call_time)
                    SELECT 'conv-late-$id-' || conversation_id, '$id', stream_id, conn_id, agent_id, call_time - interval '1 hour'
                    FROM s3_conversations WHERE contact_id = (SELECT contact_id FROM pick);
                INSERT INTO inferences (inference_id, contact_id, question_id, result, updated_at)
                    SELECT gen_random_uuid(), '$id', question_id, result, updated_at - interval '1 hour'
                    FROM inferences WHERE contact_id = (SELECT contact_id FROM pick);"
                sleep 20
                echo "COMMIT;"
            } | psqlb -d $DB >/dev/null 2>>"$work/changes.log" &
            sql=
            ;;
        esac
        # Every tenth change also gives a completed contact a summary of 1.25 MB.
        if ((n % 10 == 5)); then
            psqlb -d $DB -c "UPDATE inferences SET result = repeat(md5(random()::text), 40000), updated_at = now()
                WHERE question_id = 'q-summary' AND contact_id = ($completed)" >/dev/null 2>>"$work/changes.log" || true
        fi
        [[ -n $sql ]] && { psqlb -d $DB -c "$sql" >/dev/null 2>>"$work/changes.log" || true; }
        sleep 1
    done
    wait
) &
changes_pid=$!

# The question changes, one every QUESTION_EVERY seconds, in turn (each is undone by its next
# turn): a rename, a universal question that stops being one, a question that becomes universal.
(
    k=0
    while [[ -f $work/generate ]]; do
        for ((t = 0; t < QUESTION_EVERY; t++)); do
            [[ -f $work/generate ]] || break 2
            sleep 1
        done
        case $((k % 3)) in
        0) sql="UPDATE questions SET key = CASE key WHEN 'empathy_rating' THEN 'empathy_score' ELSE 'empathy_rating' END
                WHERE question_id = 'q-empathy' RETURNING 'empathy renamed to ' || key" ;;
        1) sql="UPDATE questions SET is_universal = NOT is_universal WHERE question_id = 'q-compliance-check'
                RETURNING 'compliance_check universal: ' || is_universal" ;;
        2) sql="UPDATE questions SET is_universal = NOT is_universal WHERE question_id = 'q-product'
                RETURNING 'product_knowledge universal: ' || is_universal" ;;
        esac
        # Retried through a PostgreSQL restart, so the turn is not lost.
        for _ in 1 2 3 4 5; do
            if change=$(psqlb -d $DB -tAc "$sql" 2>>"$work/changes.log"); then
                log "question change: $change"
                echo "$change" >>"$work/questions.log"
                k=$((k + 1))
                break
            fi
            sleep 3
        done
    done
) &
questions_pid=$!

alive() {
    local name t
    for name in a b; do
        kill -0 "${src_pid[$name]}" 2>/dev/null || fail "source $name died: $(tail -30 "$work/source-$name.log")"
    done
    for t in "${targets[@]}"; do
        kill -0 "${sinks[$t]}" 2>/dev/null || fail "the $t sink died: $(tail -30 "$work/sink-$t.log")"
    done
}
# METHOD PATH [JSON BODY]: a call to the emulator's admin API.
admin() {
    local body=()
    [[ $# -gt 2 ]] && body=(-H 'content-type: application/json' -d "$3")
    curl -sf -X "$1" "$base/__admin/$2" "${body[@]}" >/dev/null
}
restart_source() {
    wait "${src_pid[$1]}" 2>/dev/null || true
    source_up "$1"
}
kill_all_brokers() { for n in 1 2 3; do cluster kill-broker $n; done; }
# Starts the brokers that are down, all at once (a lone broker waits for a quorum).
start_all_brokers() { cluster start-kafka-cluster; }
# The leader of the event topic's partition 0 (a broker id, 1 to 3).
leader_of_p0() {
    cluster kafka-topics --describe --topic "$topic" 2>/dev/null |
        sed -n 's/.*Partition: 0[[:space:]]*Leader: \([0-9]*\).*/\1/p' | head -1
}

log "generating $RATE contacts/s with changes; first fault soon"
sleep 5
alive
while read -r kind wait victim; do
    sleep "$wait"
    alive
    faults=$((faults + 1))
    case $kind in
    source-kill)
        s=$(active_source)
        fault_log "kill -9 of the streaming source ($s)"
        kill -KILL "${src_pid[$s]}"
        sleep 2
        restart_source "$s"
        ;;
    source-freeze)
        s=$(active_source)
        fault_log "SIGSTOP of the streaming source ($s) for 15 s"
        kill -STOP "${src_pid[$s]}"
        sleep 15
        kill -CONT "${src_pid[$s]}"
        ;;
    sink-kill)
        fault_log "kill -9 of the $victim sink"
        kill -KILL "${sinks[$victim]}"
        wait "${sinks[$victim]}" 2>/dev/null || true
        sleep 2
        start_target "$victim"
        ;;
    broker-kill)
        leader=$(leader_of_p0)
        [[ $leader =~ ^[1-3]$ ]] || leader=$((faults % 3 + 1))
        fault_log "kill -9 of broker $leader (partition 0's leader), down ${FAULT_SECONDS}s"
        cluster kill-broker "$leader"
        sleep "$FAULT_SECONDS"
        cluster start-broker "$leader"
        ;;
    kafka-outage)
        fault_log "every broker killed for 15 s (message.timeout.ms is 5 s)"
        kill_all_brokers
        sleep 15
        start_all_brokers
        ;;
    kafka-outage-source-kill)
        s=$(active_source)
        fault_log "every broker killed, and the streaming source ($s) killed while Kafka is away"
        kill_all_brokers
        sleep 5
        kill -KILL "${src_pid[$s]}"
        sleep 10
        start_all_brokers
        restart_source "$s"
        ;;
    pg-restart)
        fault_log "restart of PostgreSQL"
        scripts/services.sh restart-pg
        ;;
    crm-errors)
        fault_log "the emulator failing 30% of data calls (20% 503, 10% dropped) for ${FAULT_SECONDS}s"
        admin POST faults '{"rate_503": 0.2, "drop_rate": 0.1}'
        sleep "$FAULT_SECONDS"
        admin DELETE faults
        ;;
    crm-slow)
        fault_log "every CRM call 2 s slower for ${FAULT_SECONDS}s"
        admin POST faults '{"latency_ms": 2000}'
        sleep "$FAULT_SECONDS"
        admin DELETE faults
        ;;
    allowance-rebalance)
        used=$(curl -sf "$base/__admin/stats" | python3 -c 'import json, sys; print(json.load(sys.stdin)["salesforce_api_usage"]["used"])')
        fault_log "the API allowance spent for ${FAULT_SECONDS}s, and a second Salesforce sink joining and leaving the group meanwhile"
        admin POST faults "{\"sf_daily_limit\": $((used + 3)), \"dataverse\": {\"burst_429\": 1000}, \"mulesoft\": {\"burst_429\": 1000}}"
        sleep 3
        first=${sinks[salesforce]}
        start_target salesforce
        extra=${sinks[salesforce]}
        sinks[salesforce]=$first
        sleep $((FAULT_SECONDS - 3))
        kill -TERM "$extra"
        wait "$extra" 2>/dev/null || true
        admin DELETE faults
        admin POST reset-limits
        ;;
    registry-down)
        s=$(active_source)
        fault_log "the schema registry unreachable (SIGSTOP) for ${FAULT_SECONDS}s; meanwhile the streaming source ($s) and the $victim sink killed and restarted"
        kill -STOP "$registry_pid"
        sleep 2
        kill -KILL "${src_pid[$s]}" "${sinks[$victim]}"
        wait "${sinks[$victim]}" 2>/dev/null || true
        restart_source "$s"
        start_target "$victim"
        sleep $((FAULT_SECONDS > 4 ? FAULT_SECONDS - 2 : 2))
        kill -CONT "$registry_pid"
        ;;
    esac
done <<<"$schedule"
sleep "$FAULT_SECONDS"
alive

log "stopping the workload"
rm "$work/generate"
wait $gen_pid $changes_pid $questions_pid
groups=()
for t in "${targets[@]}"; do groups+=("chaos-$t-$run"); done
log "waiting for quiet (slot caught up, every sink's lag 0)"
wait_quiet $DB $SLOT "$topic" "${groups[@]}" || fail "no quiet"
alive
stats=$(curl -sf "$base/__admin/stats")
dead=$(for t in "${targets[@]}"; do
    "$latency_bin" lag "$KAFKA_BROKERS" "$topic.dlq.$t" "chaos-count-$run" 2>/dev/null || echo 0
done | paste -sd' ')

# The seed's pivoted query, one column per universal question, with the COMPLETED filter.
keys=$(psqlb -d $DB -tAc "SELECT string_agg(key || ':' || result_type, ' ' ORDER BY key) FROM questions WHERE is_universal")
pivot="SELECT c.contact_id, c.agent_id"
for kt in $keys; do pivot+=", MAX(CASE WHEN q.key = '${kt%%:*}' THEN i.result END) AS \"$kt\""; done
pivot+=" FROM contacts c
    INNER JOIN inferences i ON c.contact_id = i.contact_id
    INNER JOIN questions q ON i.question_id = q.question_id
    LEFT JOIN s3_conversations s3c ON c.contact_id = s3c.contact_id
    WHERE q.is_universal = TRUE AND c.current_stage = 'COMPLETED'
    GROUP BY c.contact_id, c.agent_id"
psqlb -d $DB -c "\\copy ($pivot) TO '$work/expected.csv' WITH (FORMAT csv, HEADER)"
written=$(psqlb -d $DB -tAc "SELECT count(*) FROM contacts WHERE current_stage = 'COMPLETED'")
psqlb -d $DB -tAc "SELECT contact_id FROM contacts" >"$work/existing.txt"
for s in salesforce/Contact dataverse/contact mulesoft/contacts; do
    curl -sf "$base/__admin/records/$s" >"$work/records-${s%%/*}.json"
done

# Keys the workload made stop being universal at some point: the ones not universal at the end
# must be empty in every CRM.
retired=$(psqlb -d $DB -tAc "SELECT string_agg(k, ' ') FROM unnest(ARRAY['empathy_rating', 'empathy_score', 'compliance_check', 'product_knowledge']) k
    WHERE k NOT IN (SELECT key FROM questions WHERE is_universal)")
python3 - "$work" "$written" "$faults" "$stats" "$dead" "$retired" <<'PY' >"$work/verdict.txt" || { cat "$work/verdict.txt" >&2; fail "the CRMs differ from the database"; }
import csv, json, sys
csv.field_size_limit(1 << 30)
work, written, faults, stats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
dead = dict(zip(["salesforce", "dataverse", "mulesoft"], [int(x) for x in sys.argv[5].split()]))
retired = sys.argv[6].split()
# The longest text each CRM field takes (MuleSoft's API takes the event's document whole); and
# the least the source keeps of an answer over the broker's message size.
FIELD_LIMIT = {"salesforce": 131_072, "dataverse": 1_048_576, "mulesoft": None}
EVENT_KEEPS = 900_000
expected = {r["contact_id"]: r for r in csv.DictReader(open(f"{work}/expected.csv"))}
existing = set(open(f"{work}/existing.txt").read().split())
# The guide's MuleSoft API has no delete: its sink keeps deleted contacts (on_delete = "ignore").
keeps_deleted = {"mulesoft"}
questions = [k for k in next(iter(expected.values()), {}) if ":" in k] if expected else []
LABELS = ["Excellent", "Good", "Fair", "Poor"]

def sf_field(key):
    return "_".join(w[:1].upper() + w[1:] for w in key.split("_")) + "__c"

# How each CRM holds a raw result, written out from the CRMs' rules, not the connector's code.
def typed(system, result_type, raw):
    if raw is None or raw == "":
        return None
    if system == "mulesoft":
        return raw
    if result_type == "Boolean":
        return raw == "true"
    if result_type == "Rating":
        return int(raw) if system == "dataverse" else float(raw)
    if result_type == "Label" and system == "dataverse":
        return 100_000_000 + LABELS.index(raw)
    return raw

def shortened(system, have, should):
    """A text the CRM holds cut to its field (or to what the event kept under the broker's limit)."""
    if not (isinstance(have, str) and isinstance(should, str)) or not should.startswith(have):
        return False
    limit = FIELD_LIMIT[system]
    return len(have) == limit if limit and len(should) > limit and limit < EVENT_KEEPS else len(have) >= EVENT_KEEPS

def same(a, b):
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b

def held(system, record, key):
    if system == "salesforce":
        return record.get(sf_field(key))
    if system == "dataverse":
        return record.get(key)
    q = next((q for q in record.get("universal_questions", []) if q.get("question_key") == key), None)
    return q.get("result") if q else None

systems = {"salesforce": ("Trusst_Contact_ID__c", "Agent_ID__c"), "dataverse": ("trusst_contact_id", "agentid"),
           "mulesoft": ("trusst_contact_id", "contact_agent_id")}
failed = False
print(f"chaos: contacts COMPLETED in PostgreSQL at the end: {written}")
failed_calls = {s: sum(by_kind.values()) for s, by_kind in stats.get("injected", {}).items()}
print(f"chaos: faults injected: {faults}; calls the emulator failed on purpose: {json.dumps(failed_calls)}")
for system, (ext, agent) in systems.items():
    records = json.load(open(f"{work}/records-{system}.json"))
    by_id = {}
    for r in records:
        by_id.setdefault(r.get(ext), []).append(r)
    duplicates = sum(len(rs) - 1 for rs in by_id.values())
    missing = [c for c in expected if c not in by_id]
    unexpected = [c for c in by_id if c not in expected and (c in existing or system not in keeps_deleted)]
    kept_deleted = sum(1 for c in by_id if c not in existing) if system in keeps_deleted else 0
    stale, uncleared, cut = [], [], 0
    for c, want in expected.items():
        if c not in by_id:
            continue
        got = by_id[c][-1]
        diffs, kept = [], []
        for k in questions:
            key, rt = k.split(":")
            have, should = held(system, got, key), typed(system, rt, want[k])
            if shortened(system, have, should):
                cut += 1
            elif not same(have, should):
                (kept if should is None else diffs).append(key)
        # A question no longer universal (renamed, or not universal any more) keeps no value.
        kept += [key for key in retired if held(system, got, key) not in (None, "")]
        if got.get(agent) != (want["agent_id"] or None):
            diffs.append("agent")
        if diffs:
            stale.append((c, diffs))
        if kept:
            uncleared.append((c, kept))
    bad = bool(missing or stale or uncleared or duplicates or unexpected or dead[system])
    failed |= bad
    print(f"chaos: {system:<10} records {len(records):>6}  missing {len(missing)}  stale {len(stale)}  "
          f"not cleared {len(uncleared)}  duplicates {duplicates}  not COMPLETED or deleted {len(unexpected)}  "
          f"dead letters {dead[system]}  {'FAIL' if bad else 'ok'}"
          + (f"  (texts held shortened to the field: {cut})" if cut else "")
          + (f"  (deleted contacts kept, on_delete = \"ignore\": {kept_deleted})" if kept_deleted else ""))
    for c in missing[:5]:
        print(f"chaos:   missing {c}")
    for c, diffs in stale[:5]:
        print(f"chaos:   stale {c}: {', '.join(diffs)}")
    for c, keys in uncleared[:5]:
        print(f"chaos:   not cleared {c}: {', '.join(keys)}")
    for c in unexpected[:5]:
        print(f"chaos:   not COMPLETED or deleted {c}")
print(f"chaos: question keys retired at the end (empty everywhere): {' '.join(retired) or 'none'}")
sys.exit(1 if failed else 0)
PY
cat "$work/verdict.txt" >&2
log "ok: seed $SEED, $faults faults, nothing missing, stale, uncleared or duplicated"

if [[ $REPORT == 1 ]]; then
    streams=$(cat "$work"/source-*.log | grep -c "streaming changes" || true)
    avro=$(cat "$work"/source-b*.log | grep -c "streaming changes" || true)
    minutes=$(((SECONDS + 59) / 60))
    {
        echo "## Chaos (scripts/chaos.sh)"
        echo
        echo "Command: \`SEED=$SEED ROUNDS=$ROUNDS FAULT_SECONDS=$FAULT_SECONDS RATE=$RATE PRELOAD=$PRELOAD"
        echo "QUESTION_EVERY=$QUESTION_EVERY SCHEMA=$SCHEMA BENCH_PROFILE=${BENCH_PROFILE:-release} REPORT=1 scripts/chaos.sh\`"
        echo "($started_at UTC, $minutes minutes; $(bench_machine); ${BENCH_PROFILE:-release} binaries). Not a speed"
        echo "figure: the report of the last full run, written by the script. Two sources for one slot (one"
        echo "standing by, \`takeover_after = \"10s\"\`, \`message.timeout.ms = 5000\`; b publishes Avro through"
        echo "the schema registry, a JSON), the three sinks, a three-broker cluster (RF 3,"
        echo "\`min.insync.replicas=2\`)."
        echo
        echo "| | |"
        echo "|---|---|"
        echo "| seed | $SEED (the same seed replays the same schedule) |"
        echo "| schema | $([[ $SCHEMA == variant ]] && echo "variant: uuid ids, timestamptz times, an enum stage, an identity index on inferences" || echo "the integration guide's") |"
        echo "| workload | $PRELOAD contacts before the start (the initial snapshot), then $RATE contacts/s and one change a second: answers changed and deleted, contacts deleted, contacts committed 20 s late, every tenth a 1.25 MB answer; a question change every ${QUESTION_EVERY}s ($(wc -l <"$work/questions.log" 2>/dev/null || echo 0): $(paste -sd$'\x1f' "$work/questions.log" 2>/dev/null | sed 's/\x1f/; /g')) |"
        echo "| contacts COMPLETED at the end | $written |"
        echo "| faults injected | $faults: $(nl -w1 -s'. ' "$work/faults.txt" | paste -sd$'\x1f' | sed 's/\x1f/; /g') |"
        echo "| streaming sessions | $streams (each start or takeover of a source; $avro of them source b, in Avro) |"
        sed -n 's/^chaos: \(salesforce\|dataverse\|mulesoft\) *\(.*\)$/| \1 | \2 |/p' "$work/verdict.txt" | tr -s ' '
        echo
        echo "\`scripts/test.sh\` runs a short version (\`ROUNDS=11 FAULT_SECONDS=8 RATE=4 PRELOAD=5000"
        echo "QUESTION_EVERY=40\`, a random seed it prints, debug binaries): every kind of fault once."
        echo
        echo "Faults this suite found, all fixed: the source stopped when PostgreSQL answered \"the database"
        echo "system is shutting down\" during its reconnect; a sink stopped when an offset commit failed while"
        echo "a broker came back; a renamed question's old field stayed filled in Salesforce and Dataverse"
        echo "when a later event of the contact, from a source session that had not seen the rename, rode in"
        echo "the same sink batch (the sink wrote only the newest event and dropped the older one's clear)."
    } | bench_write_section "Chaos (scripts/chaos.sh)"
    log "report written to BENCHMARKS.md"
fi
