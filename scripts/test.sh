#!/usr/bin/env bash
# Runs every test against real services: unit tests, the integration tests (PostgreSQL with
# wal_level=logical, an extra wal_level=replica cluster for the bad-input tests, Apache Kafka,
# Apicurio Registry for the Avro tests), and a short cargo-fuzz run of each fuzz target (pgoutput
# decoder, JSON and Avro event decoders, config loader).
#
#   scripts/test.sh                 everything
#   FUZZ_SECONDS=0 scripts/test.sh  skip the fuzz run (it needs a nightly toolchain)
#   scripts/test.sh -- NAME         only tests whose name contains NAME
set -euo pipefail
cd "$(dirname "$0")/.."

FUZZ_SECONDS=${FUZZ_SECONDS:-30}
filter=()
if [[ ${1:-} == -- ]]; then
    shift
    filter=("$@")
fi

scripts/deps.sh
scripts/services.sh up
PG_INSTANCE=pg-replica PG_WAL_LEVEL=replica PGPORT=${REPLICA_PGPORT:-55433} scripts/services.sh start-pg
eval "$(scripts/services.sh env)"
export REPLICA_DATABASE_URL="postgres://postgres:postgres@127.0.0.1:${REPLICA_PGPORT:-55433}/trusst"

# Slots left by an interrupted earlier run would hold WAL and count against max_replication_slots.
scripts/services.sh drop-slots '^slot_'

echo "test: building" >&2
cargo build --locked --all-targets
echo "test: unit and integration tests" >&2
# Four at a time: each integration test runs its own source process, slot and topic.
cargo test --locked -- --test-threads 4 "${filter[@]}"

if ((FUZZ_SECONDS > 0)) && ((${#filter[@]} == 0)); then
    if cargo +nightly --version >/dev/null 2>&1; then
        export PATH=$PWD/.cache/tools/bin:$PATH
        command -v cargo-fuzz >/dev/null || cargo install --root .cache/tools cargo-fuzz --locked -q
        for target in pgoutput event_json event_avro config; do
            echo "test: fuzzing $target for ${FUZZ_SECONDS}s" >&2
            cargo +nightly fuzz run "$target" -- -max_total_time="$FUZZ_SECONDS"
        done
    else
        echo "test: no nightly toolchain, fuzz run skipped (the decoder's random-bytes unit test still ran)" >&2
    fi
fi
echo "test: all passed" >&2
