#!/usr/bin/env python3
"""moat's gvisor tier against `runsc do` and against the native tier, in one run, alternating
(see ../../shared/BENCH.md; the target: gvisor create -> first exec <= 1.1 x `runsc do true`).

Usage: bench/gvisor.py [--rounds N] [--execs N] [--phases N] [--moat PATH] [--out FILE]

Run as root (runsc needs it). Measures, in this order:

1. one-shot, whole process (posix_spawn to reap), every round runs each once in a rotating
   order:  `moat run --tier gvisor -- /bin/true`  |  `runsc --network=none do /bin/true`
   (gVisor's own one-shot, the peer, run from an empty scratch directory)  |
   `moat run -- /bin/true` (the native tier).
2. where a one-shot gvisor start's time goes: `MOAT_TRACE=1 moat run --tier gvisor` N times,
   the median time since the backend's spawn began at which each phase is reached.
3. daemon, no pool: its own `moat serve` (fresh state directory, admin key read from it); each
   round, in a rotating order: POST /v1/sandboxes {"tier":"gvisor"} then POST .../exec
   {"cmd":["true"]} then DELETE (each timed); the same with {"tier":"native"}; and
   `runsc --network=none do true` as the reference for create -> first exec.
4. exec round trip on a warm sandbox (one per tier, kept-alive HTTP connection), against
   `runsc exec` into a running `runsc run --detach` container (root `/` read-only, `sleep`):
   every round runs each once, rotating.
5. daemon, warm pool: a second `moat serve --pool gvisor=1 --pool native=1`; each round, in a
   rotating order, once both pools are full again (untimed): create -> first exec -> DELETE
   of each tier (every create must be a pool hit), and `runsc --network=none do true`.

A gvisor sandbox is checked to really be gVisor (/proc/version in it differs from the host's),
and after the daemon stops the runsc processes and state directories under /run/moat/gvisor
of its sandboxes (ids moat-g<spawner pid hex>-...) are counted: there should be none. Prints markdown tables
(median, p90, p99, ratios to the runsc peer and gvisor / native) and writes them next to the
JSON figures (results/gvisor.json and results/gvisor.md by default).
"""
import argparse, glob, json, os, platform, shutil, signal, socket, statistics
import subprocess, sys, tempfile, time
from common import default_moat, pct, Client, await_daemon, free_port, stop_daemon

HERE = os.path.dirname(os.path.abspath(__file__))


def summary(name, xs):
    return {"name": name, "n": len(xs), "median_ms": statistics.median(xs),
            "p90_ms": pct(xs, 90), "p99_ms": pct(xs, 99), "min_ms": min(xs), "max_ms": max(xs)}


def once(argv, cwd=None):
    """Whole-process wall time of argv in ms (posix_spawn to reap), output to /dev/null."""
    devnull = os.open(os.devnull, os.O_RDWR)
    fa = [(os.POSIX_SPAWN_DUP2, devnull, 0), (os.POSIX_SPAWN_DUP2, devnull, 1),
          (os.POSIX_SPAWN_DUP2, devnull, 2)]
    old = os.getcwd()
    if cwd:
        os.chdir(cwd)
    try:
        t0 = time.perf_counter_ns()
        pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=fa)
        _, status = os.waitpid(pid, 0)
        t1 = time.perf_counter_ns()
    finally:
        os.chdir(old)
        os.close(devnull)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{argv} failed with {status}")
    return (t1 - t0) / 1e6


def start_daemon(moat, extra=()):
    state = tempfile.mkdtemp(prefix="moat-bench-gvisor-")
    port = free_port()
    proc = subprocess.Popen([moat, "serve", "--listen", f"127.0.0.1:{port}", "--state-dir", state,
                             *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    key = await_daemon(proc, port, state)
    return proc, port, key, state


def descendants(pid):
    """pid and every process below it."""
    kids = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                st = open(f"/proc/{p}/stat").read()
                kids.setdefault(int(st.rsplit(")", 1)[1].split()[1]), []).append(int(p))
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        q = todo.pop()
        out.append(q)
        todo += kids.get(q, [])
    return out


def gvisor_ids(prefixes):
    """runsc ids (`moat-g<spawner pid hex>-...`) with one of prefixes that a process's command
    line names or that have a state directory under /run/moat/gvisor: what a daemon left."""
    hits = set()
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) == os.getpid():
            continue
        try:
            cl = open(f"/proc/{p}/cmdline", "rb").read().decode(errors="replace")
        except OSError:
            continue
        for w in cl.replace("/", " ").replace("=", " ").split("\0"):
            for part in w.split():
                if any(part.startswith(x) for x in prefixes):
                    hits.add(part)
    try:
        hits.update(e for e in os.listdir("/run/moat/gvisor") if any(e.startswith(x) for x in prefixes))
    except OSError:
        pass
    return sorted(hits)


def runsc_container(runsc, scratch):
    """A running `runsc run --detach` container (root / read-only, sleep): the exec peer."""
    bundle = os.path.join(scratch, "bundle")
    root = os.path.join(scratch, "runsc-root")
    os.makedirs(bundle)
    os.makedirs(root)
    spec = {"ociVersion": "1.0.0",
            "process": {"user": {"uid": 0, "gid": 0}, "args": ["sleep", "100000"],
                        "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                        "cwd": "/", "terminal": False},
            "root": {"path": "/", "readonly": True}, "hostname": "runsc",
            "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                       {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"}],
            "linux": {"namespaces": [{"type": t} for t in
                                     ("pid", "network", "ipc", "uts", "mount")]}}
    with open(os.path.join(bundle, "config.json"), "w") as f:
        json.dump(spec, f)
    cid = f"moatbench{os.getpid()}"
    subprocess.run([runsc, f"--root={root}", "--network=none", "run", "--detach", "--bundle",
                    bundle, cid], check=True, stdout=subprocess.DEVNULL, cwd=scratch)
    return root, cid


def runsc_container_gone(runsc, root, cid):
    subprocess.run([runsc, f"--root={root}", "kill", cid, "KILL"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    subprocess.run([runsc, f"--root={root}", "delete", "-force", cid],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def create_exec_destroy(c, tier):
    """POST /v1/sandboxes, a first exec of `true`, DELETE: each one's ms."""
    t0 = time.perf_counter_ns()
    sb = c.call("POST", "/v1/sandboxes", {"tier": tier})
    t1 = time.perf_counter_ns()
    x = c.call("POST", f"/v1/sandboxes/{sb['id']}/exec", {"cmd": ["true"]})
    t2 = time.perf_counter_ns()
    if x.get("exit_code") != 0:
        raise SystemExit(f"{tier}: exec true: {x}")
    c.call("DELETE", f"/v1/sandboxes/{sb['id']}")
    t3 = time.perf_counter_ns()
    return (t1 - t0) / 1e6, (t2 - t1) / 1e6, (t3 - t2) / 1e6


def rotate(names, r):
    return names[r % len(names):] + names[:r % len(names)]


def loadavg():
    return open("/proc/loadavg").read().split()[:3]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30, help="rounds of the one-shot and daemon figures")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds before each figure")
    ap.add_argument("--execs", type=int, default=100, help="rounds of the warm exec figure")
    ap.add_argument("--phases", type=int, default=10, help="traced gvisor one-shots")
    ap.add_argument("--moat", default=default_moat())
    ap.add_argument("--out", default=os.path.join(HERE, "results", "gvisor.json"))
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: runsc (the peer and moat's gvisor tier) needs it")
    runsc = shutil.which("runsc")
    if not runsc:
        raise SystemExit("runsc is the peer and the gvisor tier's runtime: apt-get install runsc")
    moat = os.path.abspath(a.moat)
    if not os.access(moat, os.X_OK):
        raise SystemExit(f"{moat}: no moat binary; build it: cargo build --release -p moat")
    scratch = tempfile.mkdtemp(prefix="moat-bench-gvisor-scratch-")
    rv = subprocess.run([runsc, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    results = {"bench": "gvisor", "rounds": a.rounds, "execs": a.execs,
               "command": "bench/gvisor.py " + " ".join(sys.argv[1:]),
               "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "machine": {"kernel": platform.release(), "cpus": os.cpu_count(),
                           "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                                        if l.startswith("model name")), "?")},
               "runsc": rv, "gvisor_platform": os.environ.get("MOAT_GVISOR_PLATFORM", "ptrace"),
               "moat": moat, "load": [" ".join(loadavg())]}
    RUNSC_DO = "runsc --network=none do /bin/true"

    # 1. One-shot.
    cmds = {"moat run --tier gvisor -- /bin/true": [moat, "run", "--tier", "gvisor", "--", "/bin/true"],
            RUNSC_DO: [runsc, "--network=none", "do", "/bin/true"],
            "moat run -- /bin/true (native)": [moat, "run", "--", "/bin/true"]}
    names = list(cmds)
    times = {n: [] for n in names}
    for r in range(a.warmup + a.rounds):
        for n in rotate(names, r):
            t = once(cmds[n], cwd=scratch)
            if r >= a.warmup:
                times[n].append(t)
    results["one_shot"] = [summary(n, times[n]) for n in names]
    print("one-shot done", file=sys.stderr, flush=True)

    # 2. Phases of a one-shot gvisor start.
    phases = {}
    for _ in range(a.phases):
        p = subprocess.run([moat, "run", "--tier", "gvisor", "--", "/bin/true"], cwd=scratch,
                           env=dict(os.environ, MOAT_TRACE="1"), capture_output=True, text=True)
        for line in p.stderr.splitlines():
            f = line.split()
            if len(f) == 4 and f[0] == "moat-trace:" and f[1] == "gvisor":
                phases.setdefault(f[2], []).append(int(f[3]) / 1000)
    results["gvisor_phases_ms"] = {k: statistics.median(v) for k, v in phases.items()}

    # 3 and 4. The daemon.
    proc, port, key, state = start_daemon(moat)
    peer = None
    prefixes, live = [], []
    try:
        c = Client(port, key)
        # The gvisor tier really is gVisor.
        sb = c.call("POST", "/v1/sandboxes", {"tier": "gvisor"})
        r = c.call("POST", f"/v1/sandboxes/{sb['id']}/exec", {"cmd": ["cat", "/proc/version"]})
        inside = (r.get("stdout") or "").strip()
        c.call("DELETE", f"/v1/sandboxes/{sb['id']}")
        host = open("/proc/version").read().strip()
        if not inside or inside == host:
            raise SystemExit(f"the gvisor sandbox does not look like gVisor: {inside!r}")
        results["gvisor_proc_version"] = inside
        results["host_proc_version"] = host

        figs = {k: [] for k in ("gvisor create", "gvisor first exec", "gvisor both", "gvisor destroy",
                                "native create", "native first exec", "native both", "native destroy",
                                "runsc do")}
        kinds = ["gvisor", "native", "runsc"]
        for r in range(a.warmup + a.rounds):
            for k in rotate(kinds, r):
                if k == "runsc":
                    t = once([runsc, "--network=none", "do", "true"], cwd=scratch)
                    if r >= a.warmup:
                        figs["runsc do"].append(t)
                    continue
                create, first, destroy = create_exec_destroy(c, k)
                if r >= a.warmup:
                    figs[f"{k} create"].append(create)
                    figs[f"{k} first exec"].append(first)
                    figs[f"{k} both"].append(create + first)
                    figs[f"{k} destroy"].append(destroy)
        results["create_first_exec"] = [
            summary("gvisor: create -> first exec done", figs["gvisor both"]),
            summary("  of which create (POST /v1/sandboxes)", figs["gvisor create"]),
            summary("  of which first exec", figs["gvisor first exec"]),
            summary("native: create -> first exec done", figs["native both"]),
            summary("  of which create (POST /v1/sandboxes)", figs["native create"]),
            summary("  of which first exec", figs["native first exec"]),
            summary("runsc --network=none do true", figs["runsc do"])]
        results["destroy"] = [summary("gvisor: DELETE /v1/sandboxes/{id}", figs["gvisor destroy"]),
                              summary("native: DELETE /v1/sandboxes/{id}", figs["native destroy"])]
        print("create -> first exec done", file=sys.stderr, flush=True)

        # 4. Warm exec round trip.
        warm = {}
        for k in ("gvisor", "native"):
            warm[k] = c.call("POST", "/v1/sandboxes", {"tier": k})["id"]
        # The runsc ids of the daemon's sandboxes start with moat-g<pid of the process that
        # spawned them, the daemon or one of its children>-: the leak check's key.
        prefixes = [f"moat-g{q:x}-" for q in descendants(proc.pid)]
        live = gvisor_ids(prefixes)
        peer = runsc_container(runsc, scratch)
        peer_exec = [runsc, f"--root={peer[0]}", "exec", peer[1], "/bin/true"]
        ex = {k: [] for k in ("gvisor", "native", "runsc")}
        first_peer_exec = None
        for r in range(max(5, a.warmup) + a.execs):
            for k in rotate(list(ex), r):
                if k == "runsc":
                    t = once(peer_exec, cwd=scratch)
                    if first_peer_exec is None:
                        first_peer_exec = t
                else:
                    t0 = time.perf_counter_ns()
                    x = c.call("POST", f"/v1/sandboxes/{warm[k]}/exec", {"cmd": ["true"]})
                    t = (time.perf_counter_ns() - t0) / 1e6
                    if x.get("exit_code") != 0:
                        raise SystemExit(f"{k}: exec true: {x}")
                if r >= max(5, a.warmup):
                    ex[k].append(t)
        for k in ("gvisor", "native"):
            c.call("DELETE", f"/v1/sandboxes/{warm[k]}")
        results["exec_round_trip"] = [
            summary("gvisor: POST .../exec {\"cmd\":[\"true\"]}, warm sandbox", ex["gvisor"]),
            summary("native: POST .../exec {\"cmd\":[\"true\"]}, warm sandbox", ex["native"]),
            summary("runsc exec (running container) /bin/true", ex["runsc"])]
        results["first_runsc_exec_ms"] = first_peer_exec
    finally:
        if peer:
            runsc_container_gone(runsc, *peer)
        stop_daemon(proc, 30)
        time.sleep(1)
        left = gvisor_ids(prefixes) if prefixes else None
        shutil.rmtree(state, ignore_errors=True)
    # 5. The daemon with warm pools.
    proc, port, key, state = start_daemon(moat, ["--pool", "gvisor=1", "--pool", "native=1"])
    try:
        c = Client(port, key)

        def ready(tier):
            return int(c.metric(f'moat_pool_ready{{tier="{tier}"}}') or 0)

        def full():
            t0 = time.time()
            while not (ready("gvisor") >= 1 and ready("native") >= 1):
                if time.time() - t0 > 60:
                    raise SystemExit("the warm pools did not fill in 60 s")
                time.sleep(0.005)

        pf = {k: [] for k in ("gvisor create", "gvisor both", "native create", "native both",
                              "runsc do")}
        hits = 0
        for r in range(a.warmup + a.rounds):
            for k in rotate(["gvisor", "native", "runsc"], r):
                full()
                if k == "runsc":
                    t = once([runsc, "--network=none", "do", "true"], cwd=scratch)
                    if r >= a.warmup:
                        pf["runsc do"].append(t)
                    continue
                create, first, _ = create_exec_destroy(c, k)
                hits += 1
                if r >= a.warmup:
                    pf[f"{k} create"].append(create)
                    pf[f"{k} both"].append(create + first)
        got = int(c.metric("moat_pool_hits_total") or 0)
        if got != hits:
            raise SystemExit(f"{hits} creates but {got} pool hits: the pool figures are not pooled")
        results["pool_hits"] = got
        results["pool_create_first_exec"] = [
            summary("gvisor, pool: create -> first exec done", pf["gvisor both"]),
            summary("  of which create (POST /v1/sandboxes)", pf["gvisor create"]),
            summary("native, pool: create -> first exec done", pf["native both"]),
            summary("  of which create (POST /v1/sandboxes)", pf["native create"]),
            summary("runsc --network=none do true", pf["runsc do"])]
        prefixes = [f"moat-g{q:x}-" for q in descendants(proc.pid)]
    finally:
        stop_daemon(proc, 60)
        time.sleep(1)
        pool_left = gvisor_ids(prefixes)
        shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
    results["pool_gvisor_ids_left_after_stop"] = pool_left
    print("warm pool done", file=sys.stderr, flush=True)

    results["gvisor_ids_while_warm"] = live
    results["gvisor_ids_left_after_stop"] = left
    results["load"].append(" ".join(loadavg()))

    # Tables.
    def row(r, ref):
        cells = [r["name"], f"{r['median_ms']:.1f}", f"{r['p90_ms']:.1f}", f"{r['p99_ms']:.1f}",
                 f"{r['median_ms'] / ref['median_ms']:.2f}", f"{r['p99_ms'] / ref['p99_ms']:.2f}"]
        return "| " + " | ".join(cells) + " |"

    one = results["one_shot"]
    cfe = results["create_first_exec"]
    er = results["exec_round_trip"]
    ratio = cfe[0]["median_ms"] / cfe[-1]["median_ms"]
    ratio99 = cfe[0]["p99_ms"] / cfe[-1]["p99_ms"]
    ratio1 = one[0]["median_ms"] / one[1]["median_ms"]
    L = [f"`{results['command']}` ({a.rounds} rounds, {a.execs} warm execs; {rv}, platform "
         f"{results['gvisor_platform']}; {os.cpu_count()} CPUs, {results['machine']['cpu']}, "
         f"kernel {platform.release()}; {results['when']})", "",
         f"load average before / after: {results['load'][0]} / {results['load'][1]}", "",
         "One-shot, whole process:", "",
         "| command | median ms | p90 ms | p99 ms | median / runsc do | p99 / runsc do |",
         "|---|---|---|---|---|---|"]
    L += [row(r, one[1]) for r in one]
    L += ["", f"gvisor / native one-shot: {one[0]['median_ms'] / one[2]['median_ms']:.1f} x (median)", "",
          "Where a one-shot gvisor start's time goes (median ms since the backend's spawn began, "
          f"`MOAT_TRACE=1`, {a.phases} runs): " +
          ", ".join(f"{k} {v:.1f}" for k, v in results["gvisor_phases_ms"].items()), "",
          "Daemon, no pool: create -> first exec done (HTTP, keep-alive connection):", "",
          "| figure | median ms | p90 ms | p99 ms | median / runsc do | p99 / runsc do |",
          "|---|---|---|---|---|---|"]
    L += [row(r, cfe[-1]) for r in cfe]
    L += ["", "| destroy | median ms | p90 ms | p99 ms | median / runsc do | p99 / runsc do |",
          "|---|---|---|---|---|---|"]
    L += [row(r, cfe[-1]) for r in results["destroy"]]
    L += ["", "Exec round trip into a warm sandbox:", "",
          "| figure | median ms | p90 ms | p99 ms | median / runsc exec | p99 / runsc exec |",
          "|---|---|---|---|---|---|"]
    L += [row(r, er[-1]) for r in er]
    pce = results["pool_create_first_exec"]
    pratio = pce[0]["median_ms"] / pce[-1]["median_ms"]
    L += ["", f"Daemon, warm pool (`--pool gvisor=1 --pool native=1`, {results['pool_hits']} creates, "
          "all pool hits; timed once both pools were full again):", "",
          "| figure | median ms | p90 ms | p99 ms | median / runsc do | p99 / runsc do |",
          "|---|---|---|---|---|---|"]
    L += [row(r, pce[-1]) for r in pce]
    L += ["", f"Target: gvisor create -> first exec <= 1.1 x `runsc do true`: from a warm pool "
          f"median {pratio:.2f} x, p99 {pce[0]['p99_ms'] / pce[-1]['p99_ms']:.2f} x: "
          f"{'met' if pratio <= 1.1 else 'not met'}; without a pool "
          f"median {ratio:.2f} x, "
          f"p99 {ratio99:.2f} x: {'met' if ratio <= 1.1 else 'not met'} (one-shot `moat run --tier "
          f"gvisor`: {ratio1:.2f} x). Price of the stronger tier: create -> first exec "
          f"{cfe[0]['median_ms'] / cfe[3]['median_ms']:.1f} x native, warm exec "
          f"{er[0]['median_ms'] / er[1]['median_ms']:.1f} x native (medians).",
          f"gVisor checked: /proc/version in a gvisor sandbox is `{results['gvisor_proc_version'][:60]}`; "
          f"runsc ids of the daemon's warm gvisor sandbox seen while it ran: {len(live)}, "
          f"runsc processes or state directories of the daemon's left after it stopped: "
          f"{len(left) if left is not None else '?'} (the pooled daemon's, ready sandboxes "
          f"included: {len(pool_left)})."]
    table = "\n".join(L)
    print()
    print(table)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(results, f, indent=1)
    md = os.path.splitext(a.out)[0] + ".md"
    with open(md, "w") as f:
        f.write(table + "\n")
    print(f"\nwritten to {a.out} and {md}")


if __name__ == "__main__":
    main()
