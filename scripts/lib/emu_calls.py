"""The CRM emulator's call counters (`/__admin/stats`) sorted the way the benchmarks report them,
shared by scripts/bench-sink.sh and scripts/bench-million.sh.

GETs are the start-up checks (describe, attribute metadata) and, for a Bulk job, its status polls
and result files; every other call except a token request writes (Collections, a Bulk job's create,
upload and close, Dataverse UpsertMultiple or $batch, the MuleSoft POST)."""
import json
import sys

# The sink's target name -> the emulator's system name.
SYSTEMS = {"salesforce": "salesforce", "dynamics": "dataverse", "mulesoft": "mulesoft"}


def sort(stats, target):
    """(writes, reads, tokens, bulk jobs) of TARGET in the emulator's stats (a dict)."""
    calls = {route: sum(by_status.values())
             for route, by_status in stats.get("calls", {}).get(SYSTEMS[target], {}).items()}
    tokens = sum(v for k, v in calls.items() if "token" in k)
    reads = sum(v for k, v in calls.items() if "token" not in k and k.startswith("GET "))
    writes = sum(v for k, v in calls.items() if "token" not in k and not k.startswith("GET "))
    jobs = sum(v for k, v in calls.items() if k.startswith("POST ") and k.endswith("/jobs/ingest"))
    return writes, reads, tokens, jobs


if __name__ == "__main__":
    # emu_calls.py STATS_FILE TARGET: prints "WRITES READS TOKENS JOBS".
    print(*sort(json.load(open(sys.argv[1])), sys.argv[2]))
