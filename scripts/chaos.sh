#!/usr/bin/env bash
# Chaos suite: the whole pipeline runs on a three-broker Kafka cluster (RF 3,
# min.insync.replicas 2) while a workload changes the database the way production does, and a
# nemesis injects faults chosen and timed at random from a seed.
#
# Pipeline: two sources for one slot (one streams, the other stands by and takes over;
# takeover_after 10 s, message.timeout.ms 5 s so a Kafka outage outlasts the producer), the
# Salesforce, Dynamics and MuleSoft sinks, the CRM emulator.
#
# Workload: contacts completed continuously (TRANSCRIPTION, INFERENCE, COMPLETED in three
# transactions, so a contact's answers precede its completion), and, every second, one of: an
# answer changed on a completed contact, an answer deleted (its field must be cleared), a
# completed contact deleted (deleted in every CRM), a contact written in a transaction that
# commits 20 s later (older timestamps than what was committed meanwhile).
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
# Then the workload stops, the script waits for quiet (the slot confirmed everything, every sink's
# lag 0) and compares each CRM with the guide's pivoted query (COMPLETED contacts) run directly in
# PostgreSQL: contacts missing, stale values, answers not cleared, duplicate records, records of
# contacts not COMPLETED (or deleted), and dead letters. Exits 1 unless all are 0; a failing run
# prints its seed, and the same SEED and ROUNDS replay the same schedule.
#
#   scripts/chaos.sh     SEED=random ROUNDS=20 RATE=8 FAULT_SECONDS=20 PRELOAD=20000 QUIET_TIMEOUT=600
#                        CHAOS_KAFKA_PORT=19400 (brokers P..P+2, controllers P+10..P+12)
#                        BENCH_PROFILE=release|debug
#
# Uses PostgreSQL of scripts/services.sh (PGPORT, PG_INSTANCE as there; left running) and a
# cluster of its own in .run/kafka-chaos (stopped at the end). A full run (20 faults) takes about
# 15 minutes; scripts/test.sh runs a short one (ROUNDS=10, FAULT_SECONDS=8, PRELOAD=5000).
set -euo pipefail
cd "$(dirname "$0")/.."

SEED=${SEED:-$((RANDOM * 32768 + RANDOM))}
ROUNDS=${ROUNDS:-20}
RATE=${RATE:-8}
FAULT_SECONDS=${FAULT_SECONDS:-20}
export QUIET_TIMEOUT=${QUIET_TIMEOUT:-600}
CHAOS_KAFKA_PORT=${CHAOS_KAFKA_PORT:-19400}
PRELOAD=${PRELOAD:-20000}
DB=trusst_chaos
SLOT=chaos
FAULTS=(source-kill source-freeze sink-kill broker-kill kafka-outage kafka-outage-source-kill pg-restart
    crm-errors crm-slow allowance-rebalance)

log() { echo "chaos: $(date +%H:%M:%S) $*" >&2; }
cluster() { KAFKA_INSTANCE=kafka-chaos KAFKA_PORT=$CHAOS_KAFKA_PORT KAFKA_BROKERS_N=3 scripts/services.sh "$@"; }

# shellcheck source=scripts/lib/bench.sh
source scripts/lib/bench.sh
bench_cleanup() {
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

scripts/services.sh drop-slots "^$SLOT\$"
bench_fresh_db $DB
start_emulator
log "CRM emulator at $base"
run=$(date +%s)
topic=trusst.chaos.$run

# Two sources, a and b, with one config (each its own state folder and log).
declare -A src_pid src_port
source_up() {
    local name=$1
    mkdir -p "$work/state-$name"
    # One log per start (source-a.log, then source-a.1.log, ...), so the port read is this one's.
    [[ -f $work/source-$name.log ]] && mv "$work/source-$name.log" "$work/source-$name.$(date +%s%N).log"
    cat >"$work/source-$name.toml" <<TOML
[kafka]
topic = "$topic"
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
source_up a
source_up b
if ((PRELOAD > 0)); then
    deadline=$((SECONDS + 120))
    until grep -qs "initial snapshot started" "$work"/source-[ab].log; do
        ((SECONDS < deadline)) || fail "no source started the initial snapshot"
        sleep 0.1
    done
    sleep 1
    faults=1
    grep -qs "initial snapshot done" "$work"/source-[ab].log && during="after it ended (too few contacts)" || during=during
    log "fault $faults: restart of PostgreSQL $during the initial snapshot"
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
# restart, is skipped).
(
    n=0
    completed="SELECT contact_id FROM contacts WHERE current_stage = 'COMPLETED' AND contact_id NOT LIKE 'late-%' ORDER BY random() LIMIT 1"
    while [[ -f $work/generate ]]; do
        n=$((n + 1))
        case $((n % 4)) in
        0) sql="UPDATE inferences SET result = (1 + $n % 10)::text, updated_at = now()
                WHERE question_id = 'q-quality-score' AND contact_id = ($completed)" ;;
        1) sql="DELETE FROM inferences WHERE question_id = 'q-resolution' AND contact_id = ($completed)" ;;
        2) sql="DELETE FROM contacts WHERE contact_id = ($completed)" ;;
        3)
            # A contact copied from a completed one in a transaction that commits 20 s later.
            id=late-$run-$n
            {
                echo "BEGIN;
                CREATE TEMP TABLE pick ON COMMIT DROP AS
                    SELECT contact_id FROM contacts c WHERE current_stage = 'COMPLETED' AND contact_id NOT LIKE 'late-%'
                    AND EXISTS (SELECT 1 FROM s3_conversations s WHERE s.contact_id = c.contact_id) LIMIT 1;
                INSERT INTO contacts (contact_id, stream_id, external_id, start_time, direction, current_stage, agent_id)
                    SELECT '$id', stream_id, 'ext-$id', start_time, direction, 'COMPLETED', agent_id
                    FROM contacts WHERE contact_id = (SELECT contact_id FROM pick);
                INSERT INTO s3_conversations (conversation_id, contact_id, stream_id, conn_id, agent_id, call_time)
                    SELECT 'conv-$id-' || conversation_id, '$id', stream_id, conn_id, agent_id, call_time - interval '1 hour'
                    FROM s3_conversations WHERE contact_id = (SELECT contact_id FROM pick);
                INSERT INTO inferences (inference_id, contact_id, question_id, result, updated_at)
                    SELECT 'inf-$id-' || inference_id, '$id', question_id, result, updated_at - interval '1 hour'
                    FROM inferences WHERE contact_id = (SELECT contact_id FROM pick);"
                sleep 20
                echo "COMMIT;"
            } | psqlb -d $DB >/dev/null 2>>"$work/changes.log" &
            sql=
            ;;
        esac
        [[ -n $sql ]] && { psqlb -d $DB -c "$sql" >/dev/null 2>>"$work/changes.log" || true; }
        sleep 1
    done
    wait
) &
changes_pid=$!

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
        log "fault $faults: kill -9 of the streaming source ($s)"
        kill -KILL "${src_pid[$s]}"
        sleep 2
        restart_source "$s"
        ;;
    source-freeze)
        s=$(active_source)
        log "fault $faults: SIGSTOP of the streaming source ($s) for 15 s"
        kill -STOP "${src_pid[$s]}"
        sleep 15
        kill -CONT "${src_pid[$s]}"
        ;;
    sink-kill)
        log "fault $faults: kill -9 of the $victim sink"
        kill -KILL "${sinks[$victim]}"
        wait "${sinks[$victim]}" 2>/dev/null || true
        sleep 2
        start_target "$victim"
        ;;
    broker-kill)
        leader=$(leader_of_p0)
        [[ $leader =~ ^[1-3]$ ]] || leader=$((faults % 3 + 1))
        log "fault $faults: kill -9 of broker $leader (partition 0's leader), down ${FAULT_SECONDS}s"
        cluster kill-broker "$leader"
        sleep "$FAULT_SECONDS"
        cluster start-broker "$leader"
        ;;
    kafka-outage)
        log "fault $faults: every broker killed for 15 s (message.timeout.ms is 5 s)"
        kill_all_brokers
        sleep 15
        start_all_brokers
        ;;
    kafka-outage-source-kill)
        s=$(active_source)
        log "fault $faults: every broker killed, and the streaming source ($s) killed while Kafka is away"
        kill_all_brokers
        sleep 5
        kill -KILL "${src_pid[$s]}"
        sleep 10
        start_all_brokers
        restart_source "$s"
        ;;
    pg-restart)
        log "fault $faults: restart of PostgreSQL"
        scripts/services.sh restart-pg
        ;;
    crm-errors)
        log "fault $faults: the emulator failing 30% of data calls (20% 503, 10% dropped) for ${FAULT_SECONDS}s"
        admin POST faults '{"rate_503": 0.2, "drop_rate": 0.1}'
        sleep "$FAULT_SECONDS"
        admin DELETE faults
        ;;
    crm-slow)
        log "fault $faults: every CRM call 2 s slower for ${FAULT_SECONDS}s"
        admin POST faults '{"latency_ms": 2000}'
        sleep "$FAULT_SECONDS"
        admin DELETE faults
        ;;
    allowance-rebalance)
        used=$(curl -sf "$base/__admin/stats" | python3 -c 'import json, sys; print(json.load(sys.stdin)["salesforce_api_usage"]["used"])')
        log "fault $faults: the API allowance spent for ${FAULT_SECONDS}s, and a second Salesforce sink joining and leaving the group meanwhile"
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
    esac
done <<<"$schedule"
sleep "$FAULT_SECONDS"
alive

log "stopping the workload"
rm "$work/generate"
wait $gen_pid $changes_pid
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

python3 - "$work" "$written" "$faults" "$stats" "$dead" <<'PY' || fail "the CRMs differ from the database"
import csv, json, sys
work, written, faults, stats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
dead = dict(zip(["salesforce", "dataverse", "mulesoft"], [int(x) for x in sys.argv[5].split()]))
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
    stale, uncleared = [], []
    for c, want in expected.items():
        if c not in by_id:
            continue
        got = by_id[c][-1]
        diffs, kept = [], []
        for k in questions:
            key, rt = k.split(":")
            have, should = held(system, got, key), typed(system, rt, want[k])
            if not same(have, should):
                (kept if should is None else diffs).append(key)
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
          + (f"  (deleted contacts kept, on_delete = \"ignore\": {kept_deleted})" if kept_deleted else ""))
    for c in missing[:5]:
        print(f"chaos:   missing {c}")
    for c, diffs in stale[:5]:
        print(f"chaos:   stale {c}: {', '.join(diffs)}")
    for c, keys in uncleared[:5]:
        print(f"chaos:   not cleared {c}: {', '.join(keys)}")
    for c in unexpected[:5]:
        print(f"chaos:   not COMPLETED or deleted {c}")
sys.exit(1 if failed else 0)
PY
log "ok: seed $SEED, $faults faults, nothing missing, stale, uncleared or duplicated"
