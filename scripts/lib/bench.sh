# Sourced, not run: what the benchmark scripts (bench-source.sh, bench-sink.sh, bench-compare.sh,
# bench-slots.sh, bench-steps.sh) share. Sourcing it from the repository root sets up the services and the release
# build:
#
#   bench_init [--benches]     deps, services up (BENCH_SERVICES=pg: PostgreSQL only), env
#                              (DATABASE_URL, KAFKA_BROKERS, PGBIN), release build (BENCH_PROFILE=debug:
#                              the debug one); sets $bin (and $latency_bin with --benches) and $work (a temp
#                              folder removed on exit, with every background job and bench_cleanup)
#   psqlb ARGS                 psql as postgres on the local cluster
#   bench_fresh_db DB          drop and create DB with the Trusst schema; sets $url
#   proc_figures PID           "PEAK_RSS_KB CPU_SECONDS" of a running process (VmHWM, utime+stime)
#   proc_cpu PID               CPU_SECONDS of a process (0 once it is gone)
#   recvlogical_drain DB SLOT PUBLICATION END_LSN
#                              pg_recvlogical (pgoutput) from SLOT to END_LSN into /dev/null;
#                              prints "SECONDS PEAK_RSS_KB CPU_SECONDS"
#   start_source SLOT PUBLICATION TOPIC [SNAPSHOT [MORE KEYS]]
#                              trusst-cdc's source on $url (snapshot "never" unless given; MORE KEYS
#                              are [source] lines); sets $source_pid, logs to $work/source.log
#   bench_workload DB N        N completed contacts, then VACUUM (ANALYZE); sets $end (the WAL
#                              position after them), $rows (the row changes written) and
#                              $workload_seconds (the writing alone)
#   steady_load N SEED         N contacts completed at a steady $LATENCY_RATE/s (two connections,
#                              50 contacts per transaction: the load every latency run measures)
#   cdc_drain SLOT PUBLICATION N TOPIC
#                              trusst-cdc's source from SLOT into TOPIC until N contacts' events are
#                              there; leaves it running as $source_pid and sets $drained to
#                              "SECONDS PEAK_RSS_KB CPU_SECONDS START_UP_SECONDS"
#   wait_for FILE PATTERN PID  until FILE has PATTERN; fails (showing LOG_OF_PID) if PID died
#   wait_quiet DB SLOT TOPIC GROUP...
#                              until SLOT has confirmed everything written so far and each consumer
#                              GROUP has committed everything on TOPIC (fails after QUIET_TIMEOUT s)
#   start_emulator [FLAGS]     the CRM emulator on a free port (shipped config, or $emulator_config);
#                              sets $emu_pid, $base
#   start_sink TARGET TOPIC GROUP [EDIT [SINK FLAGS]]
#                              a sink: connector-config/TARGET.toml on TOPIC as GROUP, against the
#                              emulator at $base (EDIT: a Python statement changing `text`, the
#                              config); sets $sink_pid, logs to $work/sink-TARGET.log
#   bench_machine              "N cores (model), M GiB RAM"
#   bench_write_section TITLE  replace the "## TITLE" section of BENCHMARKS.md by stdin

bench_init() {
    scripts/deps.sh
    # BENCH_SERVICES=pg: only PostgreSQL (for a caller that runs a Kafka of its own).
    if [[ ${BENCH_SERVICES:-all} == pg ]]; then
        scripts/services.sh start-pg
    else
        scripts/services.sh up
    fi
    eval "$(scripts/services.sh env)"
    # BENCH_PROFILE=debug uses the debug build (what scripts/test.sh already built) instead of
    # building a release.
    local profile=${BENCH_PROFILE:-release} flags=(--release) target
    [[ $profile == debug ]] && flags=()
    target=$(realpath -m "${CARGO_TARGET_DIR:-target}")/$profile
    if [[ ${1:-} == --benches ]]; then
        # Only the latency bench: `--benches` would also build the library as a bench harness.
        cargo build "${flags[@]}" --locked -q --bins --bench latency
        latency_bin=$(find "$target/deps" -maxdepth 1 -type f -executable -name 'latency-*' -printf '%T@ %p\n' |
            sort -rn | head -1 | cut -d' ' -f2)
    else
        cargo build "${flags[@]}" --locked -q --bins
    fi
    bin=$target/trusst-cdc
    work=$(mktemp -d)
    # Slots left behind would hold WAL (gigabytes after a run) until dropped; bench_cleanup is the
    # caller's hook for that.
    # BENCH_KEEP=1 keeps the work folder (configs, every process's log) for a look afterwards.
    trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null; bench_cleanup || true
          if [[ -n ${BENCH_KEEP:-} ]]; then echo "bench: logs and configs kept in $work" >&2; else rm -rf "$work"; fi' EXIT
}

# Overridden by the caller for what it must undo (slots, temporary configs).
bench_cleanup() { :; }

psqlb() { PGPASSWORD=postgres "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "${PGPORT:-55432}" -U postgres "$@"; }

bench_fresh_db() {
    url=${DATABASE_URL%/*}/$1
    echo "bench: fresh database $1" >&2
    psqlb -d postgres -c "DROP DATABASE IF EXISTS $1" -c "CREATE DATABASE $1"
    "$bin" generate --database-url "$url" --schema-only
}

proc_figures() {
    echo "$(awk '/VmHWM/ {print $2}' "/proc/$1/status") $(proc_cpu "$1")"
}

# CPU seconds (user + system) PID used so far; 0 once it is gone.
proc_cpu() {
    awk -v t="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / t }' "/proc/$1/stat" 2>/dev/null || echo 0
}

recvlogical_drain() {
    local db=$1 slot=$2 publication=$3 end=$4 s kb u sys
    /usr/bin/time -f "%e %M %U %S" -o "$work/recv.time" \
        env PGPASSWORD=postgres "$PGBIN/pg_recvlogical" -h 127.0.0.1 -p "${PGPORT:-55432}" -U postgres -d "$db" \
        --slot "$slot" --start -o proto_version=1 -o publication_names="$publication" --endpos "$end" -f /dev/null
    read -r s kb u sys <"$work/recv.time"
    echo "$s $kb $(python3 -c "print(f'{$u + $sys:.2f}')")"
}

start_source() {
    local slot=$1 publication=$2 topic=$3 snapshot=${4:-never} extra=${5:-}
    cat >"$work/source.toml" <<TOML
[kafka]
topic = "$topic"
[source]
slot = "$slot"
publication = "$publication"
snapshot = "$snapshot"
state_dir = "$work/state"
$extra
TOML
    DATABASE_URL=$url "$bin" source --config "$work/source.toml" 2>>"$work/source.log" &
    source_pid=$!
}

# COUNT contacts at LATENCY_RATE with SEED; with GEN_DURATION (e.g. 30s) it stops after that long
# even short of COUNT. A generator that fails stops the run with the end of its log.
steady_load() {
    "$bin" generate --database-url "$url" --contacts "$1" --chunk 50 --connections 2 \
        --rate "$LATENCY_RATE" --seed "$2" ${GEN_DURATION:+--duration "$GEN_DURATION"} 2>"$work/gen.log" ||
        { echo "bench: the generator failed; end of $work/gen.log:" >&2; tail -5 "$work/gen.log" >&2; return 1; }
}

# The contacts the last steady_load wrote, from its closing log line.
steady_load_written() {
    sed 's/\x1b\[[0-9;]*m//g' "$work/gen.log" | grep -o 'contacts=[0-9]*' | tail -1 | cut -d= -f2
}

bench_workload() {
    echo "bench: writing $2 completed contacts" >&2
    local w0
    w0=$(date +%s%3N)
    "$bin" generate --database-url "$url" --contacts "$2" --chunk 500 --seed 42 2>/dev/null
    workload_seconds=$(seconds_between "$w0" "$(date +%s%3N)")
    end=$(psqlb -d "$1" -tAc "SELECT pg_current_wal_lsn()")
    rows=$(psqlb -d "$1" -tAc "SELECT (SELECT count(*) FROM contacts) * 3 + (SELECT count(*) FROM s3_conversations) + (SELECT count(*) FROM inferences)")
    # What autovacuum would do soon after such a load: hint bits set and statistics fresh, so no
    # run pays the first reader's cost for the others.
    psqlb -d "$1" -c "VACUUM (ANALYZE) contacts, inferences, questions, s3_conversations"
    bench_checkpoint
}

# Flush the dirty pages a load left behind now: the checkpoint a bulk load triggers otherwise
# writes them for minutes afterwards, and the runs measured meanwhile pay for its I/O.
bench_checkpoint() {
    psqlb -d postgres -c "CHECKPOINT" >/dev/null
}

cdc_drain() {
    local slot=$1 publication=$2 n=$3 topic=$4 drain_pid t0
    # Drained = every contact's event is in Kafka (read back by a consumer), timed from the start.
    "$latency_bin" drain "$KAFKA_BROKERS" "$topic" "$n" >"$work/drain.json" &
    drain_pid=$!
    t0=$(date +%s%3N)
    start_source "$slot" "$publication" "$topic"
    while kill -0 $drain_pid 2>/dev/null; do
        kill -0 $source_pid 2>/dev/null || {
            cat "$work/source.log" >&2
            return 1
        }
        sleep 0.1
    done
    local first_ms done_ms
    read -r first_ms done_ms < <(json_fields "$work/drain.json" first_ms done_ms)
    drained="$(seconds_between "$t0" "$done_ms") $(proc_figures $source_pid) $(seconds_between "$t0" "$first_ms")"
}

# Seconds, two decimals, from one wall-clock time in ms to another.
seconds_between() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b - a) / 1000 }'; }

# The named top-level fields of a JSON file's last line, space-separated.
json_fields() {
    tail -1 "$1" | python3 -c 'import json, sys; d = json.load(sys.stdin); print(*(d[k] for k in sys.argv[1:]))' "${@:2}"
}

wait_for() {
    local file=$1 pattern=$2 pid=$3 log=${4:-$1}
    until grep -qs "$pattern" "$file"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "bench: process $pid ended before '$pattern' appeared; end of $log:" >&2
            tail -30 "$log" >&2
            return 1
        fi
        sleep 0.1
    done
}

wait_quiet() {
    local db=$1 slot=$2 topic=$3 group lsn deadline=$((SECONDS + ${QUIET_TIMEOUT:-300})) lag=
    shift 3
    lsn=$(psqlb -d "$db" -tAc "SELECT pg_current_wal_lsn()")
    until [[ $(psqlb -d "$db" -tAc "SELECT confirmed_flush_lsn >= '$lsn' FROM pg_replication_slots WHERE slot_name = '$slot'") == t ]]; do
        ((SECONDS < deadline)) || { echo "bench: slot $slot did not reach $lsn" >&2; return 1; }
        sleep 1
    done
    for group in "$@"; do
        until lag=$("$latency_bin" lag "$KAFKA_BROKERS" "$topic" "$group" 2>/dev/null) && [[ $lag == 0 ]]; do
            ((SECONDS < deadline)) || { echo "bench: group $group still lags by ${lag:-?} on $topic" >&2; return 1; }
            sleep 1
        done
    done
}

start_emulator() {
    "$bin" crm-emulator --config "${emulator_config:-connector-config/crm-emulator.toml}" --listen 127.0.0.1:0 "$@" \
        >"$work/emu.out" 2>"$work/emu.log" &
    emu_pid=$!
    wait_for "$work/emu.out" listening $emu_pid "$work/emu.log"
    base=$(sed -n 's/^listening on //p' "$work/emu.out")
}

start_sink() {
    local target=$1 topic=$2 group=$3 edit=${4:-pass}
    python3 - "connector-config/$target.toml" "$work/$target.toml" "$topic" "$group" "$edit" <<'EOF'
import re, sys
src, dst, topic, group, edit = sys.argv[1:]
text = open(src).read()
text = re.sub(r'(?m)^topic = .*$', f'topic = "{topic}"', text, count=1)
text = text.replace('[kafka]\n', f'[kafka]\ngroup_id = "{group}"\n', 1)
exec(edit)
open(dst, 'w').write(text)
EOF
    SALESFORCE_LOGIN_URL=$base SALESFORCE_CLIENT_SECRET=trusst-sf-secret \
    DYNAMICS_URL=$base DYNAMICS_TOKEN_URL=$base/trusst-tenant/oauth2/v2.0/token DYNAMICS_CLIENT_SECRET=trusst-dv-secret \
    MULESOFT_URL=$base/api/trusst-crm-sync MULESOFT_CLIENT_SECRET=trusst-mule-secret \
        "$bin" sink --config "$work/$target.toml" "${@:5}" 2>>"$work/sink-$target.log" &
    sink_pid=$!
}

bench_machine() {
    local model mem
    model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
    mem=$(awk '/MemTotal/ {print int($2 / 1024 / 1024)}' /proc/meminfo)
    echo "$(nproc) cores (${model:-unknown CPU}), $mem GiB RAM"
}

bench_write_section() {
    python3 -c '
import os, re, sys
title, text = sys.argv[1], sys.stdin.read().strip() + "\n"
path = "BENCHMARKS.md"
old = open(path).read() if os.path.exists(path) else "# Benchmarks\n\nFigures come from the scripts named in each section; re-run them to reproduce.\n\n"
old = re.sub(r"## " + re.escape(title) + r".*?(?=\n## |\Z)", "", old, flags=re.S).rstrip() + "\n\n"
open(path, "w").write(re.sub(r"\n{3,}", "\n\n", old) + text)
' "$1"
}
