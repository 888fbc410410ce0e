#!/usr/bin/env python3
"""chart.py RESULTS.csv OUT.svg: renders the cache comparison written by compare.sh as an SVG of bar
panels (one panel per metric, one bar per target). Pure standard library.

CSV columns: target,metric,value,unit; lines starting with '#' are notes (shown under the title)."""
import csv
import html
import sys

TARGETS = [("upstream", "upstream (direct)", "#9e9e9e"),
           ("ours", "registry-proxy", "#1f77b4"),
           ("dist", "distribution 2.8", "#ff7f0e"),
           ("nginx", "nginx proxy_cache", "#2ca02c")]
# metric, panel title, better ("higher"/"lower"), value format
PANELS = [("warm_big_mibs", "Warm 200 MiB blob, wrk -c4 (MiB/s)", "higher", "{:.0f}"),
          ("warm_small_rps", "Warm 1 MiB blob, wrk -c16 (req/s)", "higher", "{:.0f}"),
          ("cold_ttfb_ms", "Cold 200 MiB, time to first byte (ms)", "lower", "{:.1f}"),
          ("cold8_wall_s", "8 concurrent cold pulls, wall time (s)", "lower", "{:.2f}"),
          ("cold8_upstream_gets", "8 concurrent cold pulls, upstream GETs", "lower", "{:.0f}"),
          ("rss_cold_mib", "Peak RSS, 16 clients x 200 MiB, cold (MiB)", "lower", "{:.0f}"),
          ("rss_warm_mib", "Peak RSS, 16 clients x 200 MiB, warm (MiB)", "lower", "{:.0f}")]

PANEL_W, PANEL_H, COLS = 420, 220, 2
MARGIN_TOP, PAD = 90, 20


def read(path):
    notes, values = [], {}
    with open(path, newline="") as f:
        rows = [line for line in f if line.strip()]
    for line in rows:
        if line.startswith("#"):
            notes.append(line[1:].strip())
    for r in csv.DictReader(line for line in rows if not line.startswith("#")):
        try:
            values[(r["target"], r["metric"])] = float(r["value"])
        except (TypeError, ValueError):
            continue
    return notes, values


def panel(x0, y0, title, better, fmt, bars):
    out = [f'<g transform="translate({x0},{y0})">',
           f'<text x="0" y="14" font-size="13" font-weight="bold">{html.escape(title)}</text>',
           f'<text x="{PANEL_W - PAD}" y="14" font-size="10" text-anchor="end" fill="#666">'
           f'{better} is better</text>']
    top, bottom, left = 28, PANEL_H - 40, 10
    height = bottom - top
    vmax = max((v for _, _, _, v in bars), default=0) or 1.0
    slot = (PANEL_W - PAD - left) / max(len(bars), 1)
    bw = slot * 0.6
    out.append(f'<line x1="{left}" y1="{bottom}" x2="{PANEL_W - PAD}" y2="{bottom}" stroke="#333"/>')
    for i, (_, label, color, v) in enumerate(bars):
        h = height * v / vmax
        x = left + i * slot + (slot - bw) / 2
        out.append(f'<rect x="{x:.1f}" y="{bottom - h:.1f}" width="{bw:.1f}" height="{h:.1f}" fill="{color}"/>')
        out.append(f'<text x="{x + bw / 2:.1f}" y="{bottom - h - 4:.1f}" font-size="11" '
                   f'text-anchor="middle">{html.escape(fmt.format(v))}</text>')
        out.append(f'<text x="{x + bw / 2:.1f}" y="{bottom + 14}" font-size="10" '
                   f'text-anchor="middle">{html.escape(label)}</text>')
    out.append("</g>")
    return out


def render(notes, values):
    shown = [(m, t, b, f) for m, t, b, f in PANELS if any((k, m) in values for k, _, _ in TARGETS)]
    rows = (len(shown) + COLS - 1) // COLS
    width = COLS * PANEL_W + PAD
    height = MARGIN_TOP + rows * (PANEL_H + PAD)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{PAD}" y="26" font-size="17" font-weight="bold">Pull-through cache: registry-proxy vs '
           f'distribution 2.8 vs nginx proxy_cache (loopback)</text>']
    for i, n in enumerate(notes[:3]):
        out.append(f'<text x="{PAD}" y="{46 + 14 * i}" font-size="11" fill="#444">{html.escape(n)}</text>')
    for i, (metric, title, better, fmt) in enumerate(shown):
        bars = [(k, label, color, values[(k, metric)]) for k, label, color in TARGETS if (k, metric) in values]
        x0 = PAD + (i % COLS) * PANEL_W
        y0 = MARGIN_TOP + (i // COLS) * (PANEL_H + PAD)
        out.extend(panel(x0, y0, title, better, fmt, bars))
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv):
    if len(argv) != 3:
        sys.stderr.write(__doc__)
        return 2
    notes, values = read(argv[1])
    if not values:
        sys.stderr.write(f"no values in {argv[1]}\n")
        return 1
    with open(argv[2], "w") as f:
        f.write(render(notes, values))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
