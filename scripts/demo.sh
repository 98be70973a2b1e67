#!/usr/bin/env bash
# The whole pipeline on this machine, from nothing: local PostgreSQL and Kafka, the Trusst schema
# with demo contacts, the CRM emulator, the source streaming them into Kafka (snapshot first), the
# events printed as they arrive, three sinks (Salesforce, Dynamics 365, MuleSoft) upserting them
# into the emulator, then more contacts completing live; at the end, what each CRM holds.
#
#   scripts/demo.sh                  DEMO_CONTACTS=200 LIVE_CONTACTS=50 LIVE_RATE=5
set -euo pipefail
cd "$(dirname "$0")/.."

DEMO_CONTACTS=${DEMO_CONTACTS:-200}
LIVE_CONTACTS=${LIVE_CONTACTS:-50}
LIVE_RATE=${LIVE_RATE:-5}
DEMO_DB=${DEMO_DB:-trusst_demo}

scripts/deps.sh
scripts/services.sh up
eval "$(scripts/services.sh env)"
cargo build --release --locked -q
bin=target/release/trusst-cdc

# A fresh demo database each run, so the demo always starts from the same place.
scripts/services.sh drop-slots '^trusst_demo$'
scripts/services.sh psql -q -c "DROP DATABASE IF EXISTS $DEMO_DB" -c "CREATE DATABASE $DEMO_DB"
export DATABASE_URL=${DATABASE_URL%/*}/$DEMO_DB
export TRUSST_TOPIC=trusst.demo.$(date +%s) TRUSST_SLOT=trusst_demo TRUSST_PUBLICATION=trusst_demo
# Four processes on one machine: each serves /metrics on a free port, logged in its log file.
export TRUSST_METRICS_LISTEN=127.0.0.1:0
state=$(mktemp -d)
# The demo's slot goes with the demo: left behind it would hold WAL until dropped.
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null; scripts/services.sh drop-slots "^trusst_demo$" || true; rm -rf "$state"' EXIT

echo "demo: loading the Trusst schema and $DEMO_CONTACTS completed contacts" >&2
$bin generate --contacts "$DEMO_CONTACTS" --seed 1

echo "demo: preflight" >&2
$bin check

echo "demo: starting the CRM emulator (Salesforce, Dataverse and MuleSoft APIs on one local port)" >&2
$bin crm-emulator --config connector-config/crm-emulator.toml --listen 127.0.0.1:0 >"$state/emulator.out" 2>"$state/emulator.log" &
until grep -q listening "$state/emulator.out"; do sleep 0.1; done
crm=$(sed -n 's/^listening on //p' "$state/emulator.out")
echo "demo: CRM emulator at $crm" >&2

echo "demo: starting the source (it publishes the $DEMO_CONTACTS contacts as its initial snapshot)" >&2
sed "s|^state_dir = .*|state_dir = \"$state\"|" connector-config/source.toml >"$state/source.toml"
$bin source --config "$state/source.toml" 2>"$state/source.log" &

export SALESFORCE_LOGIN_URL=$crm SALESFORCE_CLIENT_SECRET=trusst-sf-secret \
    DYNAMICS_URL=$crm DYNAMICS_TOKEN_URL=$crm/trusst-tenant/oauth2/v2.0/token DYNAMICS_CLIENT_SECRET=trusst-dv-secret \
    MULESOFT_URL=$crm/api/trusst-crm-sync MULESOFT_CLIENT_SECRET=trusst-mule-secret
for target in salesforce dynamics mulesoft; do
    echo "demo: starting the $target sink (consumer group trusst-cdc-demo-$target)" >&2
    sed "s|^topic = .*|topic = \"$TRUSST_TOPIC\"\ngroup_id = \"trusst-cdc-demo-$target-$(date +%s)\"|" \
        connector-config/$target.toml >"$state/$target.toml"
    $bin sink --config "$state/$target.toml" 2>"$state/$target.log" &
done
sleep 1 # let the source create the topic first
$bin tail --topic "$TRUSST_TOPIC" --from-beginning --idle 15s &
tail_pid=$!
sleep 5
echo "demo: $LIVE_CONTACTS more contacts complete live at $LIVE_RATE/s" >&2
$bin generate --contacts "$LIVE_CONTACTS" --rate "$LIVE_RATE" --chunk 1 --seed "$(date +%s)"
wait $tail_pid || true
sleep 2
echo "demo: what each CRM holds now (read back from the emulator):" >&2
python3 - "$crm" <<'PY'
import json, sys, urllib.request
base = sys.argv[1]
for system, obj, key in [("salesforce", "Contact", "Trusst_Contact_ID__c"), ("dataverse", "contact", "trusst_contact_id"), ("mulesoft", "contacts", "trusst_contact_id")]:
    recs = json.load(urllib.request.urlopen(f"{base}/__admin/records/{system}/{obj}"))
    print(f"  {system:10} {len(recs)} records")
    if recs:
        r = recs[0]
        sample = {k: (v[:40] + "...") if isinstance(v, str) and len(v) > 40 else v for k, v in r.items() if k != "universal_questions"}
        print(f"  {'':10} e.g. {json.dumps(sample)[:400]}")
PY
echo "demo: done; logs: source, sinks and emulator were in $state (removed on exit)" >&2
tail -n 3 "$state/source.log" >&2
