#!/usr/bin/env bash
# The whole pipeline on this machine, from nothing: local PostgreSQL and Kafka, the Trusst schema
# with demo contacts, the source streaming them into Kafka (snapshot first), the events printed as
# they arrive, then more contacts completing live.
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
scripts/services.sh psql -q -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = 'trusst_demo'" >/dev/null
scripts/services.sh psql -q -c "DROP DATABASE IF EXISTS $DEMO_DB" -c "CREATE DATABASE $DEMO_DB"
export DATABASE_URL=${DATABASE_URL%/*}/$DEMO_DB
export TRUSST_TOPIC=trusst.demo.$(date +%s) TRUSST_SLOT=trusst_demo TRUSST_PUBLICATION=trusst_demo
state=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$state"' EXIT

echo "demo: loading the Trusst schema and $DEMO_CONTACTS completed contacts" >&2
$bin generate --contacts "$DEMO_CONTACTS" --seed 1

echo "demo: preflight" >&2
$bin check

echo "demo: starting the source (it publishes the $DEMO_CONTACTS contacts as its initial snapshot)" >&2
sed "s|^state_dir = .*|state_dir = \"$state\"|" connector-config/source.toml >"$state/source.toml"
$bin source --config "$state/source.toml" 2>"$state/source.log" &

sleep 1 # let the source create the topic first
$bin tail --topic "$TRUSST_TOPIC" --from-beginning --idle 15s &
tail_pid=$!
sleep 5
echo "demo: $LIVE_CONTACTS more contacts complete live at $LIVE_RATE/s" >&2
$bin generate --contacts "$LIVE_CONTACTS" --rate "$LIVE_RATE" --chunk 1 --seed "$(date +%s)"
wait $tail_pid || true
echo "demo: done; the source's log is below" >&2
tail -n 5 "$state/source.log" >&2
