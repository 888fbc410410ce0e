#!/usr/bin/env python3
"""targets.py RESULTS.csv...: the issue 14 targets, judged on one run's results.

Reads the CSVs written by compare.sh (docs/bench-cache.csv) and/or tls.sh (docs/bench-tls.csv),
columns target,metric,value,unit ('#' lines are notes), and prints one line per target row:
what ours measured, what the faster peer (distribution or nginx, or nginx alone where the
target names it) measured, the ratio as the target defines it, and met / MISSED. Rows whose
metrics are absent from the given files are counted, not printed. Pure standard library."""
import csv
import sys


def read(paths):
    values = {}
    for path in paths:
        with open(path, newline="") as f:
            rows = [line for line in f if line.strip() and not line.startswith("#")]
        for row in csv.DictReader(rows):
            try:
                values[(row["target"], row["metric"])] = float(row["value"])
            except (KeyError, ValueError):
                continue
    return values


def main():
    v = read(sys.argv[1:])

    def get(t, m):
        return v.get((t, m))

    def peer(m, best, peers=("dist", "nginx")):
        got = [(get(p, m), p) for p in peers if get(p, m) is not None]
        return best(got) if got else (None, None)

    rows = []

    def ratio(label, metric, bound, peers, best, of, at_least):
        # One row: ratio of(ours, best peer) against bound, where "best" is the faster peer.
        ours = get("ours", metric)
        p, who = peer(metric, best, peers)
        if ours is None or p is None or p == 0 or ours == 0:
            rows.append((label, "not measured", "", "", ""))
            return
        r = of(ours, p)
        ok = r >= bound if at_least else r <= bound
        rows.append((label, f"{ours:g}", f"{who} {p:g}",
                     f"{r:.2f}x ({'>=' if at_least else '<='} {bound})", "met" if ok else "MISSED"))

    def lower(label, metric, bound, peers=("dist", "nginx")):
        # time-like: ours / faster peer <= bound
        ratio(label, metric, bound, peers, min, lambda o, p: o / p, False)

    def higher_rate(label, metric, bound, peers=("dist", "nginx")):
        # throughput: ours / faster peer >= bound
        ratio(label, metric, bound, peers, max, lambda o, p: o / p, True)

    def faster_time(label, metric, bound, peers=("dist", "nginx")):
        # time-like, stated as a speed-up: faster peer / ours >= bound
        ratio(label, metric, bound, peers, min, lambda o, p: p / o, True)

    lower("cold 1 GiB total, s", "huge_cold_total_s", 0.8)
    lower("cold 200 MiB total, s", "cold_total_s", 1.0)
    lower("cold 200 MiB TTFB, ms (vs nginx)", "cold_ttfb_ms", 1.0, ("nginx",))
    lower("cold 1 GiB TTFB, ms (vs nginx)", "huge_cold_ttfb_ms", 1.0, ("nginx",))
    gets = get("ours", "cold8_upstream_gets")
    if gets is not None:
        rows.append(("8 cold clients: upstream GETs", f"{gets:g}", "", "== 1",
                     "met" if gets == 1 else "MISSED"))
    lower("8 cold clients: wall, s", "cold8_wall_s", 0.75)
    pr = get("pass", "pass_ratio_to_direct")
    if pr is not None:
        rows.append(("pass-through 200 MiB, direct/proxy", f"{pr:g}", "", ">= 0.9",
                     "met" if pr >= 0.9 else "MISSED"))
    higher_rate("warm 200 MiB, MiB/s (wrk -c4)", "warm_big_mibs", 1.1)
    faster_time("warm 1 GiB, mean ms", "huge_warm_mean_ms", 1.1)
    for proto in ("http2", "http1.1"):
        faster_time(f"TLS {proto} warm 200 MiB, mean ms (vs nginx)",
                    f"warm_big_{proto}_mean_ms", 1.0, ("nginx",))
        faster_time(f"TLS {proto} warm 1 MiB, mean ms (vs nginx)",
                    f"warm_small_{proto}_mean_ms", 1.2, ("nginx",))
        lower(f"TLS {proto} cold 200 MiB, median ms", f"cold_big_{proto}_median_ms", 1.0)
    rss = get("ours", "rss_huge_cold_mib")
    if rss is not None:
        rows.append(("RSS, 16 clients x cold 1 GiB, MiB", f"{rss:g}", "", "< 64",
                     "met" if rss < 64 else "MISSED"))

    budget = cpu_budget(get)

    absent = sum(1 for r in rows if r[1] == "not measured")
    rows = [r for r in rows if r[1] != "not measured"]
    print("# issue 14 targets (one run; ratios as the issue defines them)"
          + (f"; {absent} rows not in these results" if absent else ""))
    if not rows:
        return
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    for line in budget:
        print(line)


def cpu_budget(get):
    """What bounds the cold 1 GiB row: CPU seconds per proxy and the upstream during one cold
    GET (medians), the busy share of the box, and what SHA-256 alone costs at the measured
    speed. Informational lines, not targets."""
    lines = []
    sha = get("box", "sha256_mb_s")
    for t in ("ours", "dist", "nginx"):
        cpu, up = get(t, "huge_cold_cpu_s"), get(t, "huge_cold_upstream_cpu_s")
        busy, wall = get(t, "huge_cold_box_busy"), get(t, "huge_cold_total_s")
        if cpu is None or up is None or busy is None or wall is None:
            continue
        lines.append(f"  {t:<6} wall {wall:.2f} s   proxy CPU {cpu:.2f} s   upstream CPU {up:.2f} s"
                     f"   box busy {busy * 100:.0f} %")
    if not lines:
        return []
    head = "# cold 1 GiB CPU budget (median of the cold GETs; 2 cores = 2 CPU-s per wall second)"
    if sha:
        head += f"; SHA-256 {sha:g} MB/s = {1073.741824 / sha:.2f} CPU-s per GiB, ours only"
    return [head] + lines


if __name__ == "__main__":
    main()
