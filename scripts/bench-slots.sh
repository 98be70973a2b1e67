#!/usr/bin/env bash
# Past one walsender: does reading the workload through two slots at once drain it faster than
# through one? Every reader of one slot is bound by that slot's walsender (decoding and sending run
# in one backend process), so the only way past it is more slots. This measures the walsenders'
# side of it with the null streaming reader (`latency null`: the source's replication client
# reading and acknowledging, nothing else), on the same WAL:
#   (1) one slot, one publication with the four tables;
#   (2) two slots read at once, with complementary publications: inferences on one, contacts,
#       questions and s3_conversations on the other; the pair is done when both are;
#   (3) two slots at once, split evenly: inferences by a row filter on its key's hash, half of them
#       with the three other tables on one slot, the other half on the other.
# Each round reads (1), (2), (3), every slot created before the workload; the median round of each
# is reported with the readers' CPU and the walsenders' (utime + stime of PostgreSQL's walsender
# processes, sampled from /proc while they run). The decision weighs the pair's gain against the
# rate the database wrote the workload at (the generator alone, as fast as it can): a second slot
# only pays when one walsender can fall behind the writes. Rewrites the section "Past one
# walsender" of BENCHMARKS.md.
#
#   scripts/bench-slots.sh    N=50000 ROUNDS=3
#
# Environment: PGPORT as for scripts/services.sh (PostgreSQL only is started).
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-50000}
ROUNDS=${ROUNDS:-3}
DB=trusst_slots
export BENCH_SERVICES=${BENCH_SERVICES:-pg}

# shellcheck source=scripts/lib/bench.sh
source scripts/lib/bench.sh
SLOTS='^slt_(all|inf|rest|even|odd)_[0-9]+$'
bench_cleanup() { scripts/services.sh drop-slots "$SLOTS"; }
bench_init --benches

scripts/services.sh drop-slots "$SLOTS"
bench_fresh_db $DB
psqlb -d $DB -c "CREATE PUBLICATION slots_all FOR TABLE contacts, inferences, questions, s3_conversations" \
    -c "CREATE PUBLICATION slots_inf FOR TABLE inferences" \
    -c "CREATE PUBLICATION slots_rest FOR TABLE contacts, questions, s3_conversations" \
    -c "CREATE PUBLICATION slots_even FOR TABLE contacts, questions, s3_conversations, inferences WHERE (hashtext(inference_id) & 1 = 0)" \
    -c "CREATE PUBLICATION slots_odd FOR TABLE inferences WHERE (hashtext(inference_id) & 1 = 1)" >/dev/null
for r in $(seq 1 "$ROUNDS"); do
    for s in all inf rest even odd; do
        psqlb -d $DB -c "SELECT pg_create_logical_replication_slot('slt_${s}_$r', 'pgoutput')" >/dev/null
    done
done
bench_workload $DB "$N"
# The walsenders are the postmaster's children, as the checkpointer is.
postmaster=$(awk '{print $4}' "/proc/$(psqlb -d $DB -tAc "SELECT pid FROM pg_stat_activity WHERE backend_type = 'checkpointer'")/stat")
echo "bench: $rows row changes up to $end; $ROUNDS rounds of one slot, then two" >&2

# Until stopped (SIGTERM): the CPU seconds the postmaster's walsender children used, each
# process's last sample counted; prints the sum.
walsender_cpu() {
    exec python3 - "$1" <<'PY'
import os, signal, sys, time
parent, tick, seen = sys.argv[1], os.sysconf("SC_CLK_TCK"), {}
done = False
def stop(*_):
    global done
    done = True
signal.signal(signal.SIGTERM, stop)
while not done:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            if stat[1] != parent or b"walsender" not in open(f"/proc/{pid}/cmdline", "rb").read():
                continue
            seen[pid] = (int(stat[11]) + int(stat[12])) / tick
        except OSError:
            pass
    time.sleep(0.05)
print(f"{sum(seen.values()):.2f}")
PY
}

# Null readers on "SLOT:PUBLICATION" pairs at once: "WALL_SECONDS READERS_CPU WALSENDERS_CPU
# SECONDS_OF_EACH..." (wall: from the start until the last one is done).
read_at_once() {
    local t0 t1 i=0 pids=() spec cpu=0 each=() u s ws_pid
    walsender_cpu "$postmaster" >"$work/ws.cpu" &
    ws_pid=$!
    t0=$(date +%s%3N)
    for spec in "$@"; do
        /usr/bin/time -f "%U %S" -o "$work/null-$i.time" "$latency_bin" null "$url" "${spec%%:*}" "${spec#*:}" "$end" \
            >"$work/null-$i.json" &
        pids+=($!)
        i=$((i + 1))
    done
    wait "${pids[@]}"
    t1=$(date +%s%3N)
    sleep 0.2
    kill -TERM $ws_pid
    wait $ws_pid
    for ((i = 0; i < $#; i++)); do
        read -r u s <"$work/null-$i.time"
        cpu=$(python3 -c "print(f'{$cpu + $u + $s:.2f}')")
        each+=("$(json_fields "$work/null-$i.json" seconds)")
    done
    echo "$(seconds_between "$t0" "$t1") $cpu $(cat "$work/ws.cpu") ${each[*]}"
}

one_runs=()
two_runs=()
even_runs=()
for r in $(seq 1 "$ROUNDS"); do
    echo "bench: round $r: one slot, four tables" >&2
    one_runs+=("$(read_at_once "slt_all_$r:slots_all")")
    echo "bench: round $r: two slots at once" >&2
    two_runs+=("$(read_at_once "slt_inf_$r:slots_inf" "slt_rest_$r:slots_rest")")
    echo "bench: round $r: two slots at once, split evenly" >&2
    even_runs+=("$(read_at_once "slt_even_$r:slots_even" "slt_odd_$r:slots_odd")")
    echo "bench: round $r: one slot ${one_runs[-1]%% *} s, two slots ${two_runs[-1]%% *} s, split evenly ${even_runs[-1]%% *} s" >&2
done

cmd="N=$N ROUNDS=$ROUNDS scripts/bench-slots.sh"
python3 - "$N" "$rows" "$(bench_machine)" "$cmd" "$(printf '%s;' "${one_runs[@]}")" "$(printf '%s;' "${two_runs[@]}")" \
    "$(printf '%s;' "${even_runs[@]}")" "$workload_seconds" <<'PY' |
import sys, datetime
n, rows, machine, cmd = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
parse = lambda arg: [[float(x) for x in run.split()] for run in arg.split(";") if run.strip()]
one, two, even = parse(sys.argv[5]), parse(sys.argv[6]), parse(sys.argv[7])
write_s = float(sys.argv[8])
median = lambda runs: sorted(runs)[len(runs) // 2]
o, t, e = median(one), median(two), median(even)
rounds = lambda runs: ", ".join(f"{r[0]:.2f}" for r in runs)
ratio = o[0] / min(t[0], e[0])
pair_cpu = min((t, e), key=lambda r: r[0])[2]
# How much faster one slot drains than the database wrote: below 1.5 x, one walsender can fall
# behind a sustained load and a second one raises the ceiling that matters.
headroom = write_s / o[0]
rates = (f"({n / o[0]:,.0f} contacts/s drained against {n / write_s:,.0f} written, the generator alone on a "
         "fresh database)")
# Adopted only if the pair clearly beats one slot (a quarter faster or more) and one slot can
# fall behind the writes.
if ratio < 1.25:
    verdict = (f"The faster pair drained the workload at {ratio:.2f} x the rate of one slot, under the 1.25 x bar set for taking on "
               f"two slots' ordering: not adopted. One slot also drains {headroom:.1f} x as fast as the database wrote the workload "
               f"{rates}, so one walsender does not hold back a load this server sustains. The source stays on one slot.")
elif headroom < 1.5:
    verdict = (f"The faster pair drained the workload {ratio:.2f} x as fast as one slot, and one slot drains only {headroom:.2f} x as "
               "fast as the database wrote: one walsender can fall behind the writes, so a two-slot source is worth building "
               "(see the cost below).")
else:
    verdict = (f"The faster pair drained the workload {ratio:.2f} x as fast as one slot, past the 1.25 x bar, but one slot already "
               f"drains {headroom:.1f} x as fast as the database wrote the workload {rates}: one walsender cannot fall behind "
               "a load this server sustains, so a second slot would only shorten the catch-up after an outage, and "
               f"every second slot decodes the whole WAL again on the primary ({pair_cpu:.2f} walsender CPU seconds against "
               f"{o[2]:.2f}). Not adopted: the source stays on one slot (the stepped load, section \"Highest sustainable "
               "rate\", shows its latency at the highest rate the machine could write). On a server whose writers outpace one walsender the script's own run decides again.")
print(f"""## Past one walsender (scripts/bench-slots.sh)

Run {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC on {machine}. Command: `{cmd}`.

Every reader of a slot is bound by its walsender: one backend process decodes the WAL and sends
it. The only way past it is more slots, each with its own walsender. Workload: {n} contacts,
{rows} row changes, written once after every slot was created. Null streaming readers
(`latency null`: the source's replication client reading and acknowledging, nothing else) read it:
(1) one slot with a publication of the four tables; (2) two slots at once, one with a publication
`FOR TABLE inferences` (about three quarters of the row changes), the other `FOR TABLE contacts,
questions, s3_conversations`; (3) two slots at once split evenly: `inferences WHERE
(hashtext(inference_id) & 1 = 0)` with the three other tables on one, the other half of
`inferences` on the other (row filters, PostgreSQL 15+). A pair's time is until both are done.
Each walsender still decodes the whole WAL and filters it by its publication. {len(one)} rounds,
(1), (2), (3) in turn; the median round of each. Writing the workload (`trusst-cdc generate`,
500 contacts per transaction, alone on the machine) took {write_s:.2f} s: {n / write_s:,.0f}
contacts/s, {rows / write_s:,.0f} row changes/s.
CPU: user + system seconds of the readers (`/usr/bin/time`) and of PostgreSQL's walsender processes.

| | time to drain | row changes/s | readers' CPU s | walsenders' CPU s | each reader (s) | all rounds (s) |
|---|---|---|---|---|---|---|
| (1) one slot, four tables | {o[0]:.2f} s | {rows / o[0]:,.0f} | {o[1]:.2f} | {o[2]:.2f} | {o[3]:.2f} | {rounds(one)} |
| (2) two slots at once, by table | {t[0]:.2f} s | {rows / t[0]:,.0f} | {t[1]:.2f} | {t[2]:.2f} | {t[3]:.2f}, {t[4]:.2f} | {rounds(two)} |
| (3) two slots at once, split evenly | {e[0]:.2f} s | {rows / e[0]:,.0f} | {e[1]:.2f} | {e[2]:.2f} | {e[3]:.2f}, {e[4]:.2f} | {rounds(even)} |

One walsender used {o[2] / o[0]:.2f} of a core over its drain (on an idle machine close to 1: the
slot's limit is that process). The pairs' two walsenders used {t[2] / t[0]:.2f} and {e[2] / e[0]:.2f} of a core together, and
{t[2]:.2f} and {e[2]:.2f} CPU seconds against one's {o[2]:.2f}: each decodes the whole WAL (the
publication only filters what it sends), so the second repeats most of the first one's work, and
the slot with the larger share still takes nearly as long as the single slot did.

Decision: {verdict}

What a two-slot source would cost. A contact's rows are split across the slots (its answers on
one, the contact row on the other), and the re-read reads a contact's committed state, so the
merge must not re-read a contact until every slot has passed the commit that changed it: each
slot's position is confirmed on its own, a contact touched on both is re-read only after both
have passed its commit LSN (the slower slot holds the faster one's contacts back), the order of
events per contact has to come from the commit LSN across two streams rather than from one
stream's order, and a restart resumes two positions that must be reconciled before publishing.
On two cores the two walsenders and their two readers share the same CPU, so a second walsender
adds at most the part of a core the first left idle; the walsenders' CPU column shows what each
slot's decoding and filtering of the whole WAL costs on top.
""")
PY
    tee /dev/stderr | bench_write_section "Past one walsender (scripts/bench-slots.sh)"
echo "bench: reproduce with: $cmd" >&2
