# Sourced, not run: Debezium's PostgreSQL connector in Kafka Connect standalone, for the benchmark
# scripts that run it beside the source (bench-compare.sh, bench-steps.sh). Needs $work, $DB and
# KAFKA_BROKERS (scripts/lib/bench.sh's bench_init sets them).
#
#   debezium_fetch             Kafka Connect (KAFKA_VERSION, the broker's) and the connector plugin
#                              (DEBEZIUM_VERSION) from Maven Central into .cache/kafka-connect/
#   debezium_start SLOT PREFIX HEAP PROPS
#                              Connect standalone with the connector on SLOT (publication
#                              DEBEZIUM_PUBLICATION, bench_pub), topics PREFIX.public.<table>, JVM
#                              flags HEAP, extra connector properties PROPS (one per line; any
#                              producer.override.* also sets the worker's
#                              connector.client.config.override.policy=All); sets $dbz_pid
#   debezium_topics PREFIX     its topics, comma-separated
#
# Environment: DEBEZIUM_VERSION (3.6.1.Final), DEBEZIUM_HEAP (-Xmx1g) and DEBEZIUM_PROPS (the
# defaults row: connector defaults), DEBEZIUM_TUNED_HEAP and DEBEZIUM_TUNED_PROPS (the tuned row,
# below), CONNECT_PORT (18083, the worker's REST listener), KAFKA_VERSION (4.1.2).

# shellcheck source=scripts/lib/maven.sh
source scripts/lib/maven.sh

DEBEZIUM_VERSION=${DEBEZIUM_VERSION:-3.6.1.Final}
DEBEZIUM_HEAP=${DEBEZIUM_HEAP:--Xmx1g}
DEBEZIUM_PROPS=${DEBEZIUM_PROPS:-}
# The settings Debezium's users tune for throughput: the connector's batch and queue and its poll
# interval, and the Connect producer's batching and compression through producer.override.*.
# Chosen with `scripts/bench-compare.sh tune` (BENCHMARKS.md, "Debezium tuning").
# Uncompressed (on two cores shared with the broker, lz4 cost more CPU than it saved), so a
# producer batch stays under the broker's message.max.bytes (1 MiB).
DEBEZIUM_TUNED_HEAP=${DEBEZIUM_TUNED_HEAP:--Xmx2g}
DEBEZIUM_TUNED_PROPS=${DEBEZIUM_TUNED_PROPS:-max.batch.size=65536
max.queue.size=262144
poll.interval.ms=10
producer.override.linger.ms=50
producer.override.batch.size=1000000
producer.override.buffer.memory=268435456
producer.override.compression.type=none
producer.override.max.in.flight.requests.per.connection=5}
DEBEZIUM_PUBLICATION=${DEBEZIUM_PUBLICATION:-bench_pub}
CONNECT_PORT=${CONNECT_PORT:-18083}
KAFKA_VERSION=${KAFKA_VERSION:-4.1.2}
DEBEZIUM_TABLES=(contacts inferences questions s3_conversations)

debezium_fetch() {
    # Kafka Connect matching the broker, and Debezium's connector plugin unpacked into a plugin.path.
    CACHE=$PWD/.cache
    connect=$CACHE/kafka-connect
    maven_fetch "kafka-connect $KAFKA_VERSION debezium $DEBEZIUM_VERSION" scripts/kafka-connect/pom.xml "$connect/lib" \
        -Dkafka.version="$KAFKA_VERSION" -Ddebezium.version="$DEBEZIUM_VERSION"
    plugins=$connect/plugins-$DEBEZIUM_VERSION
    if [[ ! -d $plugins ]]; then
        rm -rf "$plugins.tmp"
        mkdir -p "$plugins.tmp"
        tar -xzf "$connect/lib/debezium-connector-postgres-$DEBEZIUM_VERSION-plugin.tar.gz" -C "$plugins.tmp"
        mv "$plugins.tmp" "$plugins"
    fi
}

# Starts Debezium in Kafka Connect standalone on SLOT with topic prefix PREFIX, JVM flags HEAP and
# connector properties PROPS (one per line); sets $dbz_pid.
debezium_start() {
    local slot=$1 prefix=$2 heap=$3 props=$4 dir=$work/connect-$2 policy=
    mkdir -p "$dir"
    # The worker lets a connector override its producer's settings only when told to.
    [[ $props == *producer.override.* ]] && policy=connector.client.config.override.policy=All
    cat >"$dir/worker.properties" <<EOF
bootstrap.servers=$KAFKA_BROKERS
# The JSON converter without the schema envelope: the lighter of its two settings.
key.converter=org.apache.kafka.connect.json.JsonConverter
value.converter=org.apache.kafka.connect.json.JsonConverter
key.converter.schemas.enable=false
value.converter.schemas.enable=false
offset.storage.file.filename=$dir/offsets
offset.flush.interval.ms=10000
plugin.path=$plugins
listeners=http://127.0.0.1:$CONNECT_PORT
# The broker does not create topics on first use; Connect creates the connector's.
topic.creation.enable=true
$policy
EOF
    cat >"$dir/debezium.properties" <<EOF
name=$prefix
connector.class=io.debezium.connector.postgresql.PostgresConnector
tasks.max=1
plugin.name=pgoutput
database.hostname=127.0.0.1
database.port=${PGPORT:-55432}
database.user=postgres
database.password=postgres
database.dbname=$DB
topic.prefix=$prefix
slot.name=$slot
publication.name=$DEBEZIUM_PUBLICATION
publication.autocreate.mode=disabled
snapshot.mode=no_data
table.include.list=$(printf 'public.%s,' "${DEBEZIUM_TABLES[@]}" | sed 's/,$//')
topic.creation.default.partitions=6
topic.creation.default.replication.factor=1
$props
EOF
    # shellcheck disable=SC2086 # heap is a list of JVM flags
    java $heap -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 \
        -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true \
        -Dlog4j2.configurationFile="$PWD/scripts/kafka-connect/log4j2.properties" \
        -cp "$connect/lib/*" org.apache.kafka.connect.cli.ConnectStandalone \
        "$dir/worker.properties" "$dir/debezium.properties" 2>"$work/debezium.log" &
    dbz_pid=$!
}

# Debezium's topics for PREFIX: one per table, comma-separated.
debezium_topics() {
    local t out=
    for t in "${DEBEZIUM_TABLES[@]}"; do out+="$1.public.$t,"; done
    echo "${out%,}"
}
