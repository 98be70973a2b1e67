#!/usr/bin/env bash
# Chaos suite: the whole pipeline (source, the Salesforce, Dynamics and MuleSoft sinks, the CRM
# emulator) runs while a generator writes contacts continuously, and faults are injected in turn:
#   kill -9 of the source (then restart), kill -9 of each sink (then restart), kill -9 of the Kafka
#   broker (down for FAULT_SECONDS, then restarted), a restart of PostgreSQL, the emulator failing
#   30% of data calls (503s and dropped connections) for FAULT_SECONDS, and the API allowance
#   running out (Salesforce's daily allowance spent: 403 REQUEST_LIMIT_EXCEEDED; Dataverse and
#   MuleSoft answering 429) until it is renewed FAULT_SECONDS later.
# Then the generator stops, the script waits for quiet (the slot has confirmed everything, every
# sink group's lag is 0) and compares each target's records, read through the emulator's API, with
# the seed's pivoted query (COMPLETED contacts, one column per universal question) run directly in
# PostgreSQL. It reports contacts written, faults injected, contacts missing, stale records (a
# value differs from the database) and duplicates (more than one CRM record per external id), and
# exits 1 unless the last three are all 0 (and no CRM holds a contact that is not COMPLETED).
#
#   scripts/chaos.sh          RATE=8 FAULT_SECONDS=20 QUIET_TIMEOUT=600
#
# RATE is contacts/s written throughout (each contact: TRANSCRIPTION, INFERENCE, COMPLETED in three
# transactions). Uses the services of scripts/services.sh (PGPORT, KAFKA_PORT as there) and leaves
# them running. Not part of scripts/test.sh: it takes about ten minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

RATE=${RATE:-8}
FAULT_SECONDS=${FAULT_SECONDS:-20}
export QUIET_TIMEOUT=${QUIET_TIMEOUT:-600}
DB=trusst_chaos
SLOT=chaos

# shellcheck source=scripts/lib/bench.sh
source scripts/lib/bench.sh
bench_cleanup() { scripts/services.sh drop-slots "^$SLOT\$"; }
bench_init --benches

log() { echo "chaos: $(date +%H:%M:%S) $*" >&2; }
faults=0
fault() {
    faults=$((faults + 1))
    log "fault $faults: $*"
}

scripts/services.sh drop-slots "^$SLOT\$"
bench_fresh_db $DB
start_emulator
log "CRM emulator at $base"
run=$(date +%s)
topic=trusst.chaos.$run
# The initial snapshot (of an empty database) then the stream; a short heartbeat so the slot's
# confirmed position catches up soon once the generator stops.
source_up() { start_source $SLOT $SLOT "$topic" initial 'heartbeat_interval = "2s"'; }

targets=(salesforce dynamics mulesoft)
declare -A sinks
# A short pause once the Salesforce allowance is (nearly) spent, so the run does not sit out the
# shipped five minutes after the allowance is renewed.
sf_edit='text = text.replace("limit_pause = \"5m\"", "limit_pause = \"5s\"")'
start_target() {
    local edit=pass
    [[ $1 == salesforce ]] && edit=$sf_edit
    start_sink "$1" "$topic" "chaos-$1-$run" "$edit"
    sinks[$1]=$sink_pid
}

source_up
wait_for "$work/source.log" "streaming changes" $source_pid
for t in "${targets[@]}"; do start_target "$t"; done

# The generator: batches of ten seconds' worth of contacts, each with a seed of its own (so new
# ids), until the stop file appears. A batch that fails (PostgreSQL restarting) is followed by the
# next one; its unfinished contacts stay short of COMPLETED, which the comparison allows for.
touch "$work/generate"
(
    i=0
    while [[ -f $work/generate ]]; do
        i=$((i + 1))
        $bin generate --database-url "$url" --contacts $((RATE * 10)) --chunk 2 --rate "$RATE" --seed $((run + i)) \
            2>>"$work/gen.log" || sleep 1
    done
) &
gen_pid=$!

pause() { sleep "$FAULT_SECONDS"; }
alive() {
    kill -0 $source_pid 2>/dev/null || { log "the source died:"; tail -30 "$work/source.log" >&2; exit 1; }
    for t in "${targets[@]}"; do
        kill -0 "${sinks[$t]}" 2>/dev/null || { log "the $t sink died:"; tail -30 "$work/sink-$t.log" >&2; exit 1; }
    done
}
# METHOD PATH [JSON BODY]: a call to the emulator's admin API.
admin() {
    local body=()
    [[ $# -gt 2 ]] && body=(-H 'content-type: application/json' -d "$3")
    curl -sf -X "$1" "$base/__admin/$2" "${body[@]}" >/dev/null
}

log "generating $RATE contacts/s; the first fault in ${FAULT_SECONDS}s"
pause
alive

fault "kill -9 of the source"
kill -KILL $source_pid
wait $source_pid 2>/dev/null || true
sleep 2
source_up
pause
alive

for t in "${targets[@]}"; do
    fault "kill -9 of the $t sink"
    kill -KILL "${sinks[$t]}"
    wait "${sinks[$t]}" 2>/dev/null || true
    sleep 2
    start_target "$t"
    pause
    alive
done

fault "kill -9 of the Kafka broker, down for ${FAULT_SECONDS}s"
scripts/services.sh kill-kafka
pause
scripts/services.sh start-kafka
pause
alive

fault "restart of PostgreSQL"
scripts/services.sh restart-pg
pause
alive

fault "the emulator failing 30% of data calls (20% 503, 10% dropped connections) for ${FAULT_SECONDS}s"
admin POST faults '{"rate_503": 0.2, "drop_rate": 0.1}'
pause
admin DELETE faults
pause
alive

used=$(curl -sf "$base/__admin/stats" | python3 -c 'import json, sys; print(json.load(sys.stdin)["salesforce_api_usage"]["used"])')
fault "the API allowance running out for ${FAULT_SECONDS}s (Salesforce: $used of $((used + 3)) calls used; Dataverse and MuleSoft: 429)"
admin POST faults "{\"sf_daily_limit\": $((used + 3)), \"dataverse\": {\"burst_429\": 1000}, \"mulesoft\": {\"burst_429\": 1000}}"
pause
admin DELETE faults
admin POST reset-limits
pause
alive

log "stopping the generator"
rm "$work/generate"
wait $gen_pid
groups=()
for t in "${targets[@]}"; do groups+=("chaos-$t-$run"); done
log "waiting for quiet (slot caught up, every sink's lag 0)"
wait_quiet $DB $SLOT "$topic" "${groups[@]}"
alive
stats=$(curl -sf "$base/__admin/stats")

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
for s in salesforce/Contact dataverse/contact mulesoft/contacts; do
    curl -sf "$base/__admin/records/$s" >"$work/records-${s%%/*}.json"
done

python3 - "$work" "$written" "$faults" "$stats" <<'PY'
import csv, json, sys
work, written, faults, stats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
expected = {r["contact_id"]: r for r in csv.DictReader(open(f"{work}/expected.csv"))}
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
print(f"chaos: contacts written (COMPLETED in PostgreSQL): {written}")
failed_calls = {s: sum(by_kind.values()) for s, by_kind in stats.get("injected", {}).items()}
print(f"chaos: faults injected: {faults}; calls the emulator failed on purpose: {json.dumps(failed_calls)}")
for system, (ext, agent) in systems.items():
    records = json.load(open(f"{work}/records-{system}.json"))
    by_id = {}
    for r in records:
        by_id.setdefault(r.get(ext), []).append(r)
    duplicates = sum(len(rs) - 1 for rs in by_id.values())
    missing = [c for c in expected if c not in by_id]
    unexpected = [c for c in by_id if c not in expected]
    stale = []
    for c, want in expected.items():
        if c not in by_id:
            continue
        got = by_id[c][-1]
        diffs = [k for k in questions
                 if not same(held(system, got, k.split(":")[0]), typed(system, k.split(":")[1], want[k]))]
        if got.get(agent) != (want["agent_id"] or None):
            diffs.append("agent")
        if diffs:
            stale.append((c, diffs))
    bad = bool(missing or stale or duplicates or unexpected)
    failed |= bad
    print(f"chaos: {system:<10} records {len(records):>6}  missing {len(missing)}  stale {len(stale)}  "
          f"duplicates {duplicates}  not COMPLETED in the database {len(unexpected)}  {'FAIL' if bad else 'ok'}")
    for c in missing[:5]:
        print(f"chaos:   missing {c}")
    for c, diffs in stale[:5]:
        print(f"chaos:   stale {c}: {', '.join(diffs)}")
sys.exit(1 if failed else 0)
PY
