#!/usr/bin/env bash
# Highest sustainable rate: a steady load stepped up, commit-to-Kafka latency at each step for
# trusst-cdc's source and for Debezium tuned for throughput (scripts/lib/debezium.sh), and
# commit-to-CRM latency for trusst-cdc with the Salesforce sink and the CRM emulator (no added
# latency). Each contender runs alone on a fresh slot, after a warm-up step; each step offers
# STEP_SECONDS of contacts at its rate (the load every latency run measures: two connections, 50
# contacts per transaction), then waits until the contender has delivered all of them (at most
# DRAIN_SECONDS; a contender that cannot is saturated and runs no higher step). Draws
# docs/img/steps.png (with matplotlib in a venv under .cache/) and rewrites the section "Highest
# sustainable rate" of BENCHMARKS.md.
#
#   scripts/bench-steps.sh     STEPS="100 250 500 1000 2000 4000 8000" STEP_SECONDS=30 WARMUP_SECONDS=15
#
# Per step: the rate the generator achieved (contacts / its wall time: it may fall short at the top
# steps), p50 and p99 of commit to the broker's append time (each topic switched to
# message.timestamp.type=LogAppendTime during the warm-up) and of commit to a consumer reading it;
# for the CRM pass, commit (pg_xact_commit_timestamp of the COMPLETED row) to the record's
# SystemModstamp in the emulated Salesforce, for up to CRM_SAMPLE contacts of the step read back by
# GET. Sustainable = every contact delivered and p99 under 200 ms (Kafka) or 1 s (CRM).
#
# Environment: PASSES ("cdc dbz crm": which runs), WARMUP_RATE (500), DRAIN_SECONDS (30), CRM_SAMPLE
# (2000), PLOT (docs/img/steps.png), plus Debezium's settings as for scripts/bench-compare.sh and
# PGPORT, KAFKA_PORT as for scripts/services.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

STEPS=${STEPS:-100 250 500 1000 2000 4000 8000}
STEP_SECONDS=${STEP_SECONDS:-30}
WARMUP_SECONDS=${WARMUP_SECONDS:-15}
WARMUP_RATE=${WARMUP_RATE:-500}
DRAIN_SECONDS=${DRAIN_SECONDS:-30}
CRM_SAMPLE=${CRM_SAMPLE:-2000}
PASSES=${PASSES:-cdc dbz crm}
PLOT=${PLOT:-docs/img/steps.png}
STAGE_PORT=${STAGE_PORT:-9479}
DB=trusst_steps

# shellcheck source=scripts/lib/bench.sh
source scripts/lib/bench.sh
# shellcheck source=scripts/lib/debezium.sh
source scripts/lib/debezium.sh
SLOTS='^steps_(cdc|dbz|crm)$'
bench_cleanup() {
    scripts/services.sh drop-slots "$SLOTS"
    [[ -n ${BENCH_KEEP:-} ]] || psqlb -d postgres -c "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1 || true
    rm -f connector-config/.bench-emulator.toml
}
bench_init --benches
[[ $PASSES == *dbz* ]] && debezium_fetch

# matplotlib in a venv of its own (git-ignored), made once.
venv=$PWD/.cache/plot-venv
if [[ ! -x $venv/bin/python ]] || ! "$venv/bin/python" -c "import matplotlib" 2>/dev/null; then
    echo "bench: installing matplotlib into $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q matplotlib
fi

if [[ $PASSES == *crm* && $(psqlb -d postgres -tAc "SHOW track_commit_timestamp") != on ]]; then
    echo "bench: restarting PostgreSQL to turn on track_commit_timestamp (scripts/services.sh sets it)" >&2
    scripts/services.sh stop-pg
    scripts/services.sh start-pg
fi
scripts/services.sh drop-slots "$SLOTS"
bench_fresh_db $DB
psqlb -d $DB -c "CREATE PUBLICATION bench_pub FOR TABLE contacts, inferences, questions, s3_conversations" >/dev/null

stop() {
    kill -TERM "$1"
    wait "$1" || true
}
seed=20

# Events of SAMPLES (commit us, latency ms, ...) committed between A and B (ms since the epoch).
delivered() { awk -F, -v a="$1" -v b="$2" '$1 >= a * 1000 && $1 <= b * 1000 { n++ } END { print n + 0 }' "$3"; }

# One pass: NAME's events on TOPIC (FORMAT trusst or debezium) while PID runs; writes
# $work/steps-NAME.txt, one line per step: "OFFERED CONTACTS START_MS END_MS DELIVERED" (the
# warm-up is step 0). WAIT_MORE, if set, is a command that must also succeed before a step counts
# as drained (the CRM pass waits for the sink).
step_pass() {
    local name=$1 topic=$2 format=$3 pid=$4 samples=$work/samples-$1.csv lat_pid rate contacts t0 t1 n cpu0
    local out=$work/steps-$name.txt deadline
    : >"$out"
    bench_checkpoint
    for rate in 0 $STEPS; do
        if ((rate == 0)); then
            contacts=$((WARMUP_SECONDS * WARMUP_RATE))
            echo "bench: $name: warm-up, $contacts contacts at $WARMUP_RATE/s" >&2
        else
            contacts=$((STEP_SECONDS * rate))
            echo "bench: $name: $rate contacts/s for ${STEP_SECONDS}s" >&2
        fi
        # A seed of its own per step (the generator's contact ids follow from it).
        seed=$((seed + 1))
        t0=$(date +%s%3N)
        if ((rate == 0)); then
            # Its end time from the generator's side: the waits below may outlast it.
            {
                LATENCY_RATE=$WARMUP_RATE steady_load "$contacts" $seed
                date +%s%3N >"$work/gen.end"
            } &
            local gen=$!
            # Once the topic has its first event: append-time stamps, and the reader subscribes.
            timeout 120 "$latency_bin" watermarks "$KAFKA_BROKERS" "$topic" 1 >/dev/null ||
                { echo "bench: $name: nothing on $topic after 120 s; end of $work/gen.log:" >&2; tail -5 "$work/gen.log" >&2; exit 1; }
            scripts/services.sh kafka-configs --alter --entity-type topics --entity-name "$topic" \
                --add-config message.timestamp.type=LogAppendTime >/dev/null
            # From the topic's start: the warm-up's first events may come before the reader is there.
            LATENCY_FROM=earliest LATENCY_SAMPLES=$samples "$latency_bin" "$KAFKA_BROKERS" "$topic" 100000000 3600 0 "$format" \
                >"$work/latency-$name.json" &
            lat_pid=$!
            wait $gen
            t1=$(cat "$work/gen.end")
        else
            # A step lasts STEP_SECONDS even when the machine cannot write at its rate: the
            # generator stops then, and the step is the contacts it wrote.
            [[ -n ${METRICS:-} ]] && curl -sf "$METRICS" >"$work/metrics-$name-$rate-before.txt"
            cpu0=$(proc_cpu "$pid")
            LATENCY_RATE=$rate GEN_DURATION=${STEP_SECONDS}s steady_load "$contacts" $seed
            t1=$(date +%s%3N)
            contacts=$(steady_load_written)
        fi
        # A JVM starting meanwhile may take longer over the warm-up.
        deadline=$((SECONDS + (rate == 0 && DRAIN_SECONDS < 60 ? 60 : DRAIN_SECONDS)))
        until n=$(delivered "$t0" "$t1" "$samples" 2>/dev/null) && ((n >= contacts)) && { [[ -z ${WAIT_MORE:-} ]] || $WAIT_MORE; }; do
            kill -0 "$pid" 2>/dev/null || { echo "bench: $name ended during the steps" >&2; exit 1; }
            ((SECONDS < deadline)) || break
            sleep 1
        done
        if ((rate > 0)); then
            echo "$rate $(awk -v a="$cpu0" -v b="$(proc_cpu "$pid")" 'BEGIN { printf "%.2f", b - a }') $(($(date +%s%3N) - t0))" >>"$work/cpu-$name.txt"
            [[ -n ${METRICS:-} ]] && curl -sf "$METRICS" >"$work/metrics-$name-$rate-after.txt"
        fi
        echo "$rate $contacts $t0 $t1 $n" >>"$out"
        if ((rate == 0)); then
            ((n >= contacts)) || { echo "bench: $name: $n of the warm-up's $contacts contacts delivered within ${DRAIN_SECONDS}s" >&2; exit 1; }
            continue
        fi
        echo "bench: $name: $rate/s offered, $(awk -v c="$contacts" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", c / ((b - a) / 1000) }')/s achieved, $n of $contacts delivered" >&2
        if ((n < contacts)); then
            echo "bench: $name: not drained within ${DRAIN_SECONDS}s: saturated, no higher step" >&2
            break
        fi
    done
    stop $lat_pid
}

if [[ $PASSES == *cdc* ]]; then
    psqlb -d $DB -c "SELECT pg_create_logical_replication_slot('steps_cdc', 'pgoutput')" >/dev/null
    topic=trusst.steps.cdc.$(date +%s)
    # Its metrics endpoint: each step's stage times come from there.
    start_source steps_cdc bench_pub "$topic" never "$(printf '[metrics]\nlisten = "127.0.0.1:%s"' "$STAGE_PORT")"
    METRICS=http://127.0.0.1:$STAGE_PORT/metrics step_pass trusst-cdc "$topic" trusst $source_pid
    stop $source_pid
    # A slot left behind holds every later pass's WAL (tens of GB at the top steps).
    scripts/services.sh drop-slots '^steps_cdc$'
fi

if [[ $PASSES == *dbz* ]]; then
    psqlb -d $DB -c "SELECT pg_create_logical_replication_slot('steps_dbz', 'pgoutput')" >/dev/null
    prefix=steps_dbz_$(date +%s)
    debezium_start steps_dbz "$prefix" "$DEBEZIUM_TUNED_HEAP" "$DEBEZIUM_TUNED_PROPS"
    step_pass debezium-tuned "$prefix.public.contacts" debezium $dbz_pid
    stop $dbz_pid
    scripts/services.sh drop-slots '^steps_dbz$'
fi

if [[ $PASSES == *crm* ]]; then
    # Reading the records back is one API call per sampled contact: the emulated daily allowance
    # is lifted for the run, as in scripts/bench-sink.sh e2e.
    sed 's|^daily_api_limit = 15000|daily_api_limit = 100000000|' \
        connector-config/crm-emulator.toml >connector-config/.bench-emulator.toml
    emulator_config=connector-config/.bench-emulator.toml start_emulator
    psqlb -d $DB -c "SELECT pg_create_logical_replication_slot('steps_crm', 'pgoutput')" >/dev/null
    topic=trusst.steps.crm.$(date +%s)
    group=bench-steps-$(date +%s)
    start_source steps_crm bench_pub "$topic"
    wait_for "$work/source.log" "streaming changes" $source_pid
    start_sink salesforce "$topic" "$group"
    wait_for "$work/sink-salesforce.log" "sink started" $sink_pid
    sink_caught_up() { [[ $("$latency_bin" lag "$KAFKA_BROKERS" "$topic" "$group" 2>/dev/null) == 0 ]]; }
    WAIT_MORE=sink_caught_up step_pass crm "$topic" trusst $source_pid
    psqlb -d $DB -tA -F ' ' -c "SELECT contact_id, (extract(epoch FROM pg_xact_commit_timestamp(xmin)) * 1000)::bigint
        FROM contacts WHERE current_stage = 'COMPLETED' AND pg_xact_commit_timestamp(xmin) IS NOT NULL" >"$work/commits.txt"
    # Per step: up to CRM_SAMPLE contacts committed in it, commit to SystemModstamp.
    python3 - "$work/commits.txt" "$work/steps-crm.txt" "$base" "$CRM_SAMPLE" >"$work/crm.txt" <<'PY'
import datetime, json, random, sys
sys.path.insert(0, "scripts/lib")
import sf_modstamp
from concurrent.futures import ThreadPoolExecutor
commits_file, steps_file, base, sample = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
commits = [(c, int(ms)) for c, ms in (l.split() for l in open(commits_file) if l.strip())]
modstamp = sf_modstamp.reader(base)
random.seed(1)
with ThreadPoolExecutor(8) as pool:
    for line in open(steps_file):
        rate, _, t0, t1, _ = (int(x) for x in line.split())
        if rate == 0:
            continue
        step = [(c, ms) for c, ms in commits if t0 <= ms <= t1]
        picked = dict(random.sample(step, min(sample, len(step))))
        stamps = dict(pool.map(modstamp, picked))
        lat = sorted(stamps[c] - picked[c] if stamps[c] is not None else float("inf") for c in picked)
        pct = lambda p: lat[round((len(lat) - 1) * p)] if lat else float("nan")
        print(rate, len(lat), sum(1 for s in stamps.values() if s is None), f"{pct(0.5):.1f}", f"{pct(0.99):.1f}")
PY
    stop $sink_pid
    stop $source_pid
    stop $emu_pid
fi

cmd="STEPS=\"$STEPS\" STEP_SECONDS=$STEP_SECONDS WARMUP_SECONDS=$WARMUP_SECONDS scripts/bench-steps.sh"
[[ $PASSES == "cdc dbz crm" ]] || cmd="PASSES=\"$PASSES\" $cmd"
mkdir -p "$(dirname "$PLOT")"
"$venv/bin/python" - "$work" "$PLOT" "$cmd" "$(bench_machine)" "$STEP_SECONDS" "$WARMUP_SECONDS" "$WARMUP_RATE" \
    "$DRAIN_SECONDS" "$DEBEZIUM_TUNED_HEAP" "$(tr '\n' ' ' <<<"$DEBEZIUM_TUNED_PROPS")" <<'PY' |
import datetime, math, os, sys
sys.path.insert(0, "scripts/lib")
import stage_metrics
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
work, plot, cmd, machine = sys.argv[1:5]
step_s, warmup_s, warmup_rate, drain_s = (int(x) for x in sys.argv[5:9])
heap, props = sys.argv[9], sys.argv[10].split()
STAGES = ["delivery", "gather", "queue", "reread", "handoff", "produce", "ack"]

def cpu(name):
    """Per step: cores the contender's process used from the step's start until it was drained."""
    path = f"{work}/cpu-{name}.txt"
    if not os.path.exists(path):
        return {}
    out = {}
    for line in open(path):
        rate, secs, wall_ms = line.split()
        out[int(rate)] = float(secs) / (int(wall_ms) / 1000) if int(wall_ms) else float("nan")
    return out

def stages(name, rates):
    """Per step: mean ms and count per stage, from the metrics before and after it."""
    out = {}
    for rate in rates:
        a, b = f"{work}/metrics-{name}-{rate}-before.txt", f"{work}/metrics-{name}-{rate}-after.txt"
        if not (os.path.exists(a) and os.path.exists(b)):
            continue
        before, after = stage_metrics.scrape(open(a)), stage_metrics.scrape(open(b))
        row = {}
        for stage, (s1, c1) in after.items():
            s0, c0 = before.get(stage, (0.0, 0.0))
            if c1 > c0:
                row[stage] = ((s1 - s0) / (c1 - c0) * 1000, c1 - c0)
        out[rate] = row
    return out
KAFKA_TARGET, CRM_TARGET = 200.0, 1000.0

def pct(values, p):
    return values[round((len(values) - 1) * p)] if values else float("nan")

def load(name):
    """Per step: offered, achieved, delivered/contacts, p50/p99 (append time, consumer)."""
    path = f"{work}/steps-{name}.txt"
    if not os.path.exists(path):
        return None
    samples = []
    with open(f"{work}/samples-{name}.csv") as f:
        for line in f:
            parts = line.strip().split(",")
            if len(parts) == 3:
                samples.append((int(parts[0]) / 1000, float(parts[1]), float(parts[2])))
    steps = []
    for line in open(path):
        rate, contacts, t0, t1, n = (int(x) for x in line.split())
        if rate == 0:
            continue
        inside = [s for s in samples if t0 <= s[0] <= t1]
        # A contact not delivered within the drain wait counts as infinitely late.
        missing = max(contacts - len(inside), 0)
        read = sorted([s[1] for s in inside] + [math.inf] * missing)
        append = sorted([s[2] for s in inside if not math.isnan(s[2])] + [math.inf] * missing)
        steps.append(dict(rate=rate, achieved=contacts / ((t1 - t0) / 1000), contacts=contacts, delivered=n,
                          p50=pct(append, 0.5), p99=pct(append, 0.99), read_p50=pct(read, 0.5), read_p99=pct(read, 0.99)))
    return steps

def load_crm():
    path = f"{work}/crm.txt"
    if not os.path.exists(path):
        return {}
    out = {}
    for line in open(path):
        rate, n, missing, p50, p99 = line.split()
        if int(rate):
            out[int(rate)] = dict(n=int(n), missing=int(missing), p50=float(p50), p99=float(p99))
    return out

NAMES = {"trusst-cdc": "trusst-cdc", "Debezium tuned": "debezium-tuned", "trusst-cdc, sink running": "crm"}
contenders = [(label, load(name)) for label, name in NAMES.items()]
contenders = [(label, steps) for label, steps in contenders if steps]
crm = load_crm()
crm_steps = next((steps for label, steps in contenders if label == "trusst-cdc, sink running"), [])

def ms(v):
    if math.isinf(v):
        return f"> {drain_s} s"
    return f"{v:,.0f} ms" if v >= 10 else f"{v:.1f} ms"

def best(steps, key, target):
    """The highest step up to which every step held (delivered in full, p99 under target), and the
    higher steps that held again (where the generator beside the contender may have offered less)."""
    held = [s["delivered"] >= s["contacts"] and s[key] < target for s in steps]
    top = None
    for s, ok in zip(steps, held):
        if not ok:
            break
        top = s
    again = [s for s, ok in zip(steps, held) if ok and top is not None and s["rate"] > top["rate"]]
    if top is None:
        again = [s for s, ok in zip(steps, held) if ok]
    return top, again

def sustained(label, b, again, key, target):
    again = ", ".join(f"{s['rate']:,} ({s['achieved']:,.0f} achieved, {ms(s[key])})" for s in again) or "-"
    if not b:
        return f"| {label} | none of the steps | - | - | {target} | {again} |"
    return f"| {label} | {b['rate']:,} contacts/s | {b['achieved']:,.0f} contacts/s | {ms(b[key])} | {target} | {again} |"

fig, ax = plt.subplots(figsize=(10, 5), dpi=110)
colors = {"trusst-cdc": "tab:blue", "Debezium tuned": "tab:red", "trusst-cdc, sink running": "tab:green"}
for label, steps in contenders:
    if label == "trusst-cdc, sink running":
        continue
    x = [s["rate"] for s in steps]
    ax.plot(x, [s["p99"] for s in steps], "o-", color=colors[label], label=f"{label}, commit to Kafka p99")
    ax.plot(x, [s["p50"] for s in steps], "o--", color=colors[label], alpha=0.6, label=f"{label}, commit to Kafka p50")
if crm:
    x = sorted(crm)
    ax.plot(x, [crm[r]["p99"] for r in x], "s-", color=colors["trusst-cdc, sink running"], label="trusst-cdc, commit to CRM p99")
    ax.plot(x, [crm[r]["p50"] for r in x], "s--", color=colors["trusst-cdc, sink running"], alpha=0.6, label="trusst-cdc, commit to CRM p50")
ax.axhline(KAFKA_TARGET, color="grey", lw=0.8, ls=":")
ax.text(0.01, KAFKA_TARGET, " 200 ms", transform=ax.get_yaxis_transform(), va="bottom", color="grey")
ax.axhline(CRM_TARGET, color="grey", lw=0.8, ls=":")
ax.text(0.01, CRM_TARGET, " 1 s", transform=ax.get_yaxis_transform(), va="bottom", color="grey")
ax.set_xscale("log")
ax.set_yscale("log")
ax.set_xlabel("offered rate (contacts/s)")
ax.set_ylabel("latency (ms)")
ax.set_title("Latency against offered load (a step missing: not drained in time)")
ax.grid(True, which="both", alpha=0.3)
ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
fig.tight_layout()
fig.savefig(plot)

lines = [f"""## Highest sustainable rate (scripts/bench-steps.sh)

Run {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC on {machine}; PostgreSQL, Kafka, the generator and each
contender on the same machine. Command: `{cmd}`.

![Latency against offered rate]({plot})

A steady load stepped up: each contender alone, fresh on its own slot, {warmup_s} s of warm-up at
{warmup_rate} contacts/s first (not counted), then {step_s} s at each offered rate (the generator: two
connections, 50 contacts per transaction, each contact TRANSCRIPTION -> INFERENCE -> COMPLETED),
and a pause after each step until every contact of it was delivered. A contender that had not
delivered a step within {drain_s} s of its end is saturated there and runs no higher step; its
undelivered contacts count as infinitely late. Commit to Kafka: the broker's append time (topics
with `message.timestamp.type=LogAppendTime`) minus the commit time in the event (trusst-cdc's
`source.commit_ts`, Debezium's `source.ts_us` on the contact's COMPLETED row event); "read" is the
moment a consumer read it instead. Achieved: the contacts written / the generator's wall time;
at the top steps the generator, sharing the cores, may offer less than asked.
Debezium tuned: `{heap}`, {", ".join(f"`{p}`" for p in props)} (section "Debezium tuning").
"""]
for label, steps in contenders:
    lines.append(f"\n**{label}**" + (" (the Salesforce sink and the CRM emulator running; commit to the record "
                 "readable in the emulated Salesforce: `pg_xact_commit_timestamp` of the COMPLETED row to the "
                 "record's `SystemModstamp`, for a sample of the step's contacts read back by GET)" if label == "trusst-cdc, sink running" else "") + "\n")
    head = "| offered contacts/s | achieved | delivered | p50 | p99 | read p50 | read p99 | cores used |"
    rule = "|---|---|---|---|---|---|---|---|"
    cores = cpu(NAMES[label])
    if label == "trusst-cdc, sink running":
        head += " CRM contacts sampled | CRM p50 | CRM p99 |"
        rule += "---|---|---|"
    lines += [head, rule]
    for s in steps:
        row = (f"| {s['rate']:,} | {s['achieved']:,.0f} | {s['delivered']:,} of {s['contacts']:,} | {ms(s['p50'])} | {ms(s['p99'])} "
               f"| {ms(s['read_p50'])} | {ms(s['read_p99'])} | {cores.get(s['rate'], float('nan')):.2f} |")
        if label == "trusst-cdc, sink running":
            c = crm.get(s["rate"])
            if c:
                missing = f" ({c['missing']} not found)" if c["missing"] else ""
                row += f" {c['n']:,}{missing} | {ms(c['p50'])} | {ms(c['p99'])} |"
            else:
                row += " - | - | - |"
        lines.append(row)
lines.append("\n| | highest offered rate sustained | achieved there | p99 there | target | higher steps that held again |\n|---|---|---|---|---|---|")
for label, steps in contenders:
    if label == "trusst-cdc, sink running":
        continue
    lines.append(sustained(f"{label}, commit to Kafka", *best(steps, "p99", KAFKA_TARGET), "p99", "p99 < 200 ms"))
if crm:
    for s in crm_steps:
        s["crm_p99"] = crm.get(s["rate"], {}).get("p99", math.inf)
    lines.append(sustained("trusst-cdc, commit to CRM", *best(crm_steps, "crm_p99", CRM_TARGET), "crm_p99", "p99 < 1 s"))
cdc = next((steps for label, steps in contenders if label == "trusst-cdc"), [])
by_stage = stages("trusst-cdc", [s["rate"] for s in cdc])
if by_stage:
    lines.append("\n**Where trusst-cdc's time goes** (mean per stage in ms, from the source's "
                 "`trusst_cdc_source_stage_seconds` over each step; the last column is its mean commit to "
                 "Kafka's acknowledgement, `trusst_cdc_commit_to_publish_seconds`)\n")
    lines.append("| offered contacts/s | " + " | ".join(STAGES) + " | batches | commit to ack |")
    lines.append("|---|" + "---|" * (len(STAGES) + 2))
    for rate, row in by_stage.items():
        cells = [f"{row[st][0]:.1f}" if st in row else "-" for st in STAGES]
        batches = f"{row['reread'][1]:,.0f}" if "reread" in row else "-"
        total = f"{row['total'][0]:.1f}" if "total" in row else "-"
        lines.append(f"| {rate:,} | " + " | ".join(cells) + f" | {batches} | {total} |")
    lines.append("\nStages: delivery, a commit to its commit message read from the slot (PostgreSQL's "
                 "decoding and sending: the floor under any reader); gather, a batch's first change read to "
                 "the batch handed to the pipeline (batching while the previous batch is in flight); queue, "
                 "waiting for the re-read stage; reread, the visibility wait and the one batched query; "
                 "handoff, waiting for the produce stage; produce, building, encoding and enqueuing the events; "
                 "ack, enqueued to Kafka's acknowledgement (acks=all). Stages of successive batches overlap, "
                 "so they need not add up to the last column. Cores used: the contender's process CPU over "
                 "the step and its drain.")
lines.append("\nSustained: the highest step up to which every step was delivered in full with p99 under the "
             "target; a higher step that held again after a miss is listed beside it with the rate the generator "
             "achieved there.")
print("\n".join(lines))
PY
    tee /dev/stderr | bench_write_section "Highest sustainable rate (scripts/bench-steps.sh)"
echo "bench: plot in $PLOT" >&2
echo "bench: reproduce with: $cmd" >&2
