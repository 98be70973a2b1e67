#!/usr/bin/env bash
# Runs every test against real services: unit tests, the integration tests (PostgreSQL with
# wal_level=logical, an extra wal_level=replica cluster for the bad-input tests, an extra cluster
# that accepts only TLS, Apache Kafka with its SSL listener, Apicurio Registry for the Avro tests,
# moto's Secrets Manager server), the vendors' own client libraries (Microsoft's Dataverse SDK,
# simple-salesforce) against the CRM emulator over HTTPS (scripts/vendor-clients.sh), the deployment
# files (scripts/deploy-check.sh: the Helm chart linted, rendered and validated against the
# Kubernetes schemas, the alert rules' promtool tests; tests/helm.rs then checks the rendered
# chart), the README's shell blocks run in order as a new user would (tests/readme.rs, on the
# services already up), a short seeded chaos run (scripts/chaos.sh on a three-broker Kafka cluster,
# every kind of fault once, about five minutes), and a short cargo-fuzz run of each fuzz target
# (pgoutput decoder, JSON and Avro event decoders, config loader).
#
# Ports: PGPORT, REPLICA_PGPORT (25433), TLS_PGPORT (25435), KAFKA_PORT (+1 controller, +2 SSL,
# +3 SASL_SSL), SLOTS_PGPORT (25436), FAULT_KAFKA_PORT (19192 to +3: the broker the fault tests stop and
# start), REGISTRY_PORT (18081). The clusters the tests start sit below Linux's ephemeral range
# (32768-60999): there an outgoing connection can hold the port first, and start-up fails with
# "Address already in use".
#
#   scripts/test.sh                 everything
#   FUZZ_SECONDS=0 scripts/test.sh  skip the fuzz run (it needs a nightly toolchain)
#   scripts/test.sh -- NAME         only tests whose name contains NAME (pytest -k NAME for the
#                                   vendor client suite)
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
PG_INSTANCE=pg-replica PG_WAL_LEVEL=replica PGPORT=${REPLICA_PGPORT:-25433} scripts/services.sh start-pg
scripts/services.sh tls-certs
PG_INSTANCE=pg-tls PG_SSL_CERT=.run/tls/server.pem PG_SSL_KEY=.run/tls/server.key PGPORT=${TLS_PGPORT:-25435} \
    scripts/services.sh start-pg
# A cluster of its own for the lost-slot test, which lowers max_slot_wal_keep_size (tests/slot_lost.rs).
export SLOTS_PGPORT=${SLOTS_PGPORT:-25436}
PG_INSTANCE=pg-slots PGPORT=$SLOTS_PGPORT scripts/services.sh start-pg
# A broker of its own for tests that stop Kafka (tests/source_faults.rs), so the shared one stays up.
export FAULT_KAFKA_PORT=${FAULT_KAFKA_PORT:-19192}
KAFKA_INSTANCE=kafka-faults KAFKA_PORT=$FAULT_KAFKA_PORT KAFKA_HEAP_OPTS="-Xms256m -Xmx512m" \
    scripts/services.sh start-kafka
eval "$(scripts/services.sh env)"
export REPLICA_DATABASE_URL="postgres://postgres:postgres@127.0.0.1:${REPLICA_PGPORT:-25433}/trusst"
export TLS_DATABASE_URL="postgres://postgres:postgres@127.0.0.1:${TLS_PGPORT:-25435}/trusst"

# moto's server mode stands in for AWS Secrets Manager (tests/secrets.rs starts it per test).
MOTO_VERSION=5.2.5
# (pip's output is read whole: grep -q would close the pipe early, and pipefail would see pip fail.)
if [[ ! -x .cache/moto-venv/bin/moto_server ]] ||
    [[ $(.cache/moto-venv/bin/pip show moto 2>/dev/null) != *"Version: $MOTO_VERSION"* ]]; then
    echo "test: installing moto $MOTO_VERSION from PyPI into .cache/moto-venv" >&2
    rm -rf .cache/moto-venv
    python3 -m venv .cache/moto-venv
    .cache/moto-venv/bin/pip install -q "moto[server]==$MOTO_VERSION" >&2
fi
export MOTO_SERVER=$PWD/.cache/moto-venv/bin/moto_server

# Slots left by an interrupted earlier run would hold WAL and count against max_replication_slots.
scripts/services.sh drop-slots '^slot_'
# Each test makes a database of its own; those of earlier runs only take disk.
scripts/services.sh drop-dbs '^test_'
PGPORT=${TLS_PGPORT:-25435} scripts/services.sh drop-slots '^slot_'
PGPORT=${TLS_PGPORT:-25435} scripts/services.sh drop-dbs '^test_'
PGPORT=$SLOTS_PGPORT scripts/services.sh drop-slots '^slot_'
PGPORT=$SLOTS_PGPORT scripts/services.sh drop-dbs '^test_'
# The version matrix's clusters (tests/pg_versions.rs starts them, PostgreSQL 13 to 18 from npm
# on ports 255NN) and the replica and failover pairs, when an earlier run left them running.
for port in 25513 25514 25516 25517 25518 25616 25617 25636 25638; do
    PGPORT=$port scripts/services.sh drop-dbs '^test_' 2>/dev/null || true
done

echo "test: deployment files (Helm chart, alert rules, Prometheus config)" >&2
scripts/deploy-check.sh

echo "test: building" >&2
cargo build --locked --all-targets
echo "test: unit and integration tests" >&2
# Four at a time: each integration test runs its own source process, slot and topic.
cargo test --locked -- --test-threads 4 "${filter[@]}"

echo "test: vendor client libraries against the emulator over HTTPS" >&2
vendor_args=()
if ((${#filter[@]} > 0)); then
    vendor_args=(-k "$(printf '%s or ' "${filter[@]}" | sed 's/ or $//')")
fi
# The binary cargo just built; exit status 5 is pytest's "no test matched the filter".
status=0
TRUSST_CDC_BIN=${CARGO_TARGET_DIR:-$PWD/target}/debug/trusst-cdc \
    scripts/vendor-clients.sh "${vendor_args[@]}" || status=$?
((status == 0 || status == 5)) || exit "$status"

if ((${#filter[@]} == 0)); then
    # Every kind of fault once, in an order and with pauses drawn from the seed (printed; a
    # failing run says how to replay it). CHAOS_SEED fixes it; CHAOS_ROUNDS=0 skips the run.
    if ((${CHAOS_ROUNDS:-11} > 0)); then
        echo "test: a short seeded chaos run" >&2
        SEED=${CHAOS_SEED:-$((RANDOM * 32768 + RANDOM))} ROUNDS=${CHAOS_ROUNDS:-11} FAULT_SECONDS=8 RATE=4 PRELOAD=5000 \
            QUESTION_EVERY=40 QUIET_TIMEOUT=400 BENCH_PROFILE=debug scripts/chaos.sh
    fi
fi

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
