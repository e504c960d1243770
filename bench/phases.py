#!/usr/bin/env python3
"""Where the time of `moat run -- /bin/true` goes: median of each phase over N runs.

Usage: bench/phases.py [--runs N] [--moat PATH]

Runs moat with MOAT_TRACE=1, which prints `moat-trace: SIDE PHASE MICROSECONDS` (time since
`moat run` started) on stderr, and prints the median time of each mark and of each step
between consecutive marks.
"""
import argparse, glob, collections, os, statistics, subprocess
from common import default_moat


ap = argparse.ArgumentParser()
ap.add_argument("--runs", type=int, default=200)
ap.add_argument("--moat", default=default_moat())
a = ap.parse_args()
marks = collections.defaultdict(list)
order = []
for _ in range(a.runs):
    p = subprocess.run([a.moat, "run", "--", "/bin/true"], capture_output=True, text=True,
                       env={**os.environ, "MOAT_TRACE": "1"})
    for line in p.stderr.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0] == "moat-trace:":
            key = f"{parts[1]} {parts[2]}"
            if key not in order:
                order.append(key)
            marks[key].append(int(parts[3]))
order.sort(key=lambda k: statistics.median(marks[k]))
print("| mark | median µs since start | step µs |")
print("|---|---|---|")
prev = 0
for k in order:
    m = statistics.median(marks[k])
    print(f"| {k} | {m:.0f} | {m - prev:.0f} |")
    prev = m
