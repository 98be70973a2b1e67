"""The source's time per stage from its /metrics text, shared by scripts/bench-steps.sh and
scripts/bench-million.sh: sum and count of `trusst_cdc_source_stage_seconds` per stage, and of
`trusst_cdc_commit_to_publish_seconds` as stage "total"."""
import sys


def scrape(lines):
    """{stage: [sum seconds, count]} from the lines of a /metrics text."""
    out = {}
    for line in lines:
        if line.startswith("#"):
            continue
        name, _, value = line.strip().rpartition(" ")
        for suffix, i in (("_sum", 0), ("_count", 1)):
            if name.startswith("trusst_cdc_source_stage_seconds" + suffix + "{"):
                stage = name.split('stage="', 1)[1].split('"', 1)[0]
            elif name.startswith("trusst_cdc_commit_to_publish_seconds" + suffix):
                stage = "total"
            else:
                continue
            out.setdefault(stage, [0.0, 0.0])[i] += float(value)
    return out


if __name__ == "__main__":
    # stage_metrics.py < METRICS: prints the mean ms per page of each pipeline stage,
    # "reread=12.3 produce=4.5 ...".
    print(" ".join(f"{k}={s / c * 1000:.1f}" for k, (s, c) in scrape(sys.stdin).items()
                   if k != "total" and c > 0))
