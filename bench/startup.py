#!/usr/bin/env python3
"""moat run -- /bin/true against its peers, alternating A B C D ... in every round.

Usage: bench/startup.py [--rounds N] [--moat PATH] [--out FILE]

Each round runs every command once, in a rotating order, timing the whole process (spawn to
reap) with posix_spawn + waitpid. Prints medians, p90 and p99 per command and the ratio of
each median to bubblewrap's, and writes the figures as JSON. See ../../shared/BENCH.md.
"""
import argparse, glob, json, os, platform, shutil, statistics, subprocess, sys, time
from common import default_moat, pct


def cmds(moat):
    bwrap = shutil.which("bwrap")
    c = {
        "moat run -- /bin/true": [moat, "run", "--", "/bin/true"],
        "bwrap --unshare-all (ro /usr, /proc, /dev, tmpfs /tmp)": [
            bwrap, "--unshare-all", "--die-with-parent",
            "--ro-bind", "/usr", "/usr",
            "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib",
            "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/sbin", "/sbin",
            "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
            "/bin/true"] if bwrap else None,
        "unshare (user,pid,mount,ipc,uts,net) true": [
            shutil.which("unshare"), "--user", "--map-root-user", "--pid", "--fork",
            "--mount", "--ipc", "--uts", "--net", "/bin/true"],
        "/bin/true": ["/bin/true"],
    }
    return {k: v for k, v in c.items() if v and v[0]}

def once(argv):
    devnull = os.open(os.devnull, os.O_RDWR)
    fa = [(os.POSIX_SPAWN_DUP2, devnull, 0), (os.POSIX_SPAWN_DUP2, devnull, 1),
          (os.POSIX_SPAWN_DUP2, devnull, 2)]
    t0 = time.perf_counter_ns()
    pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=fa)
    _, status = os.waitpid(pid, 0)
    t1 = time.perf_counter_ns()
    os.close(devnull)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{argv} failed with {status}")
    return (t1 - t0) / 1e6

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--moat", default=default_moat())
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    moat = os.path.abspath(a.moat)
    c = cmds(moat)
    names = list(c)
    times = {n: [] for n in names}
    for r in range(a.warmup + a.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t = once(c[n])
            if r >= a.warmup:
                times[n].append(t)
    bw = next((n for n in names if n.startswith("bwrap")), None)
    rows = []
    for n in names:
        med = statistics.median(times[n])
        rows.append({"command": n, "median_ms": round(med, 3), "p90_ms": round(pct(times[n], 90), 3),
                     "p99_ms": round(pct(times[n], 99), 3),
                     "ratio_to_bwrap": round(med / statistics.median(times[bw]), 3) if bw else None})
    print(f"| command | median ms | p90 ms | p99 ms | median / bwrap |")
    print(f"|---|---|---|---|---|")
    for r in rows:
        print(f"| `{r['command']}` | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | {r['p99_ms']:.2f} | {r['ratio_to_bwrap']:.2f} |")
    doc = {"bench": "startup", "rounds": a.rounds, "machine": {
        "kernel": platform.release(), "cpus": os.cpu_count(),
        "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")},
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "results": rows}
    out = a.out or os.path.join(os.path.dirname(__file__), "results", "startup.json")
    with open(out, "w") as f:
        json.dump(doc, f, indent=2)
    print(f"\nwritten to {out}", file=sys.stderr)

if __name__ == "__main__":
    main()
