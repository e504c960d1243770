#!/usr/bin/env python3
"""Scale (issue 12): N idle native sandboxes held at once by one `moat serve` (see
../../shared/BENCH.md; targets: create rate with 10,000 live >= 0.8 x with none, <= 1 MiB per
idle sandbox kernel included).

Usage: bench/scale.py [--total N] [--batch N] [--clients N] [--execs N] [--moat PATH] [--out FILE]

Starts its own `moat serve` (free port, fresh state directory, admin key read from it, in a
session of its own so that a Ctrl-C reaches only this script), then:

1. creates one held sandbox H and runs --execs `POST .../exec {"cmd":["/bin/true"]}` in it on
   one kept-alive connection: exec latency with a single sandbox (the reference);
2. creates --total idle sandboxes (timeout_s 3600, default policy) in batches of --batch, each
   batch with --clients concurrent clients (one kept-alive connection each); after each batch,
   prints creates per second, create latency, MemAvailable drop per live sandbox (against
   /proc/meminfo read before H was created), Slab per live sandbox, the daemon's RSS per live
   sandbox, and exec p50/p99 into H against the single-sandbox figure;
3. deletes every sandbox but H (timed: deletes per second), measures exec into H again (alone
   once more: a second reference, against drift of the machine), deletes H, stops the daemon.

Before the first create, after each batch and at the end it also makes and removes 20 empty
memory cgroups of its own, for what one costs the kernel then: each memcg's shrinker info is
sized by the most superblocks (tmpfs, proc, devpts, mqueue: several per sandbox) ever alive at
once since boot and never shrinks, so a sandbox's memcg costs more the more sandboxes there are,
and an earlier big run on the same boot raises every later figure (reboot to compare runs).

Creation stops early (and says so) when MemAvailable falls below --min-available-mib. Every
sandbox is deleted and the daemon stopped on the way out, also on Ctrl-C or an error; what is
left is then looked for (the daemon's spawners' cgroups, sandbox inits) and removed by force,
and the script says so. With --out, writes the figures as JSON and the table next to them as
markdown (results/scale.json and results/scale.md is the usual place). Run as root.
"""
import argparse, glob, json, os, shutil, signal, statistics, subprocess, sys
import tempfile, threading, time
from common import default_moat, pct, Client, await_daemon, free_port, stop_daemon

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 3600
MEMINFO_KEYS = ("MemAvailable", "Slab", "SUnreclaim", "PageTables", "KernelStack", "Percpu")


def meminfo():
    """The /proc/meminfo fields of MEMINFO_KEYS (and MemTotal), in KiB."""
    out = {}
    for line in open("/proc/meminfo"):
        k, v = line.split(":", 1)
        if k in MEMINFO_KEYS or k == "MemTotal":
            out[k] = int(v.split()[0])
    return out


def slab_bytes():
    total = 0
    for line in open("/proc/slabinfo").readlines()[2:]:
        f = line.split()
        total += int(f[1]) * int(f[3])
    return total


def memcg_probe(n=20):
    """Slab bytes one new, empty memory cgroup costs now (KiB), from n made and removed in this
    process's own memory cgroup; None where that cannot be done. Its per-node shrinker info
    is sized by the most memcg-aware shrinkers (one per superblock: every tmpfs, proc, devpts
    and mqueue instance) that were ever alive at once since boot, so it shows both how far a
    run like this one grows it and what an earlier run on the same boot left."""
    base = None
    for line in open("/proc/self/cgroup"):
        _, ctrls, path = line.strip().split(":", 2)
        if "memory" in ctrls.split(","):
            base = os.path.join("/sys/fs/cgroup/memory", path.lstrip("/"))
        elif ctrls == "" and base is None and os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
            d = os.path.join("/sys/fs/cgroup", path.lstrip("/"))
            if "memory" in open(os.path.join(d, "cgroup.subtree_control")).read().split():
                base = d
    if not base:
        return None
    made = []
    try:
        s0 = slab_bytes()
        for i in range(n):
            d = os.path.join(base, f"moat-bench-probe-{os.getpid()}-{i}")
            os.mkdir(d)
            made.append(d)
        s1 = slab_bytes()
    except OSError:
        return None
    finally:
        for d in made:
            try:
                os.rmdir(d)
            except OSError:
                pass
    return (s1 - s0) / n / 1024


def rss_kib(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid):
    """The pids whose parent is pid."""
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                st = open(f"/proc/{p}/stat").read()
                if int(st.rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(p))
            except (OSError, IndexError, ValueError):
                pass
    return out


def start_daemon(moat, state, port, log):
    """`moat serve` on port with state dir `state`, in a new session (a terminal's Ctrl-C goes
    to this script, which then deletes the sandboxes through the daemon)."""
    proc = subprocess.Popen([moat, "serve", "--listen", f"127.0.0.1:{port}", "--state-dir", state,
                             "--default-ttl", str(TIMEOUT_S), "--max-ttl", str(4 * TIMEOUT_S)],
                            stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    key = await_daemon(proc, port, state)
    return proc, key


def cgroup_kib(c, ids, n=20):
    """Mean memory charged to the cgroups of up to n of ids (spread over them), in KiB: what
    the sandboxes' own cgroups see (the agent's pages and the kernel memory charged to them;
    not what was allocated before init joined its cgroup, such as its namespaces)."""
    if not ids:
        return None
    pick = [ids[int(i * (len(ids) - 1) / max(n - 1, 1))] for i in range(min(n, len(ids)))]
    xs = [c.call("GET", f"/v1/sandboxes/{i}/metrics").get("memory_bytes") for i in dict.fromkeys(pick)]
    xs = [x for x in xs if x is not None]
    return statistics.mean(xs) / 1024 if xs else None


def exec_latencies(c, sid, n):
    xs = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        r = c.call("POST", f"/v1/sandboxes/{sid}/exec", {"cmd": ["/bin/true"]})
        xs.append((time.perf_counter_ns() - t0) / 1e6)
        if r.get("exit_code") != 0:
            raise RuntimeError(f"exec /bin/true in {sid}: {r}")
    return xs


def parallel(n, clients, port, key, job, stop, threads=None):
    """Runs job(client, i) for i in range(n) on `clients` threads (one connection each);
    returns the latencies in ms and the first error (None when there was none). The threads
    are added to `threads` (so that an interrupted caller can wait for them)."""
    lock = threading.Lock()
    state = {"next": 0, "error": None}
    lat = []

    def worker():
        try:
            c = Client(port, key)
            while not stop.is_set():
                with lock:
                    if state["error"] is not None or state["next"] >= n:
                        return
                    i = state["next"]
                    state["next"] += 1
                t0 = time.perf_counter_ns()
                job(c, i)
                t = (time.perf_counter_ns() - t0) / 1e6
                with lock:
                    lat.append(t)
        except BaseException as e:  # SystemExit from Client.call included
            with lock:
                if state["error"] is None:
                    state["error"] = e

    ts = [threading.Thread(target=worker, daemon=True) for _ in range(min(clients, max(n, 1)))]
    if threads is not None:
        threads.extend(ts)
    for t in ts:
        t.start()
    for t in ts:
        while t.is_alive():
            t.join(0.2)  # a short join: Ctrl-C reaches the main thread
    return lat, state["error"]


class Run:
    """The daemon and what it holds; `cleanup` leaves nothing behind."""

    def __init__(self, a):
        self.a = a
        self.state = tempfile.mkdtemp(prefix="moat-bench-scale-")
        self.port = free_port()
        self.log = open(os.path.join(self.state, "serve.log"), "ab")
        try:
            self.proc, self.key = start_daemon(a.moat, self.state, self.port, self.log)
        except BaseException:
            self.log.close()
            shutil.rmtree(self.state, ignore_errors=True)
            raise
        time.sleep(0.2)
        self.spawners = children(self.proc.pid)
        self.ids = []  # every sandbox a create answered, H first
        self.gone = set()  # those deleted since
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = []  # the create clients' threads

    def create(self, c, _i=None):
        sb = c.call("POST", "/v1/sandboxes", {"timeout_s": TIMEOUT_S})
        with self.lock:
            self.ids.append(sb["id"])
        return sb["id"]

    def delete_all(self, ids, clients):
        """Deletes ids (one already gone counts as deleted); returns (seconds, error)."""
        def job(c, i):
            try:
                c.call("DELETE", f"/v1/sandboxes/{ids[i]}")
            except SystemExit as e:
                if ": 404 " not in str(e):
                    raise
            with self.lock:
                self.gone.add(ids[i])
        t0 = time.perf_counter()
        _, err = parallel(len(ids), clients, self.port, self.key, job, threading.Event())
        return time.perf_counter() - t0, err

    def listed(self):
        return [s["id"] for s in Client(self.port, self.key).call("GET", "/v1/sandboxes")["sandboxes"]]

    def cgroup_leftovers(self):
        """Cgroup directories of this daemon's spawners' sandboxes (moat-<tag>-<pid hex>-...)."""
        tags = [f"-{p:x}-" for p in self.spawners]
        parents = set()
        for line in open("/proc/self/cgroup"):
            _, _, path = line.strip().split(":", 2)
            for root in glob.glob("/sys/fs/cgroup/*/") + ["/sys/fs/cgroup/"]:
                parents.add(os.path.normpath(root + path.lstrip("/")))
        parents.add("/sys/fs/cgroup/moat")  # cgroup v2: the fallback parent
        out = []
        for p in sorted(parents):
            for d in glob.glob(os.path.join(p, "moat-*")):
                if os.path.isdir(d) and any(t in os.path.basename(d) for t in tags):
                    out.append(d)
        return out

    def cleanup(self):
        """Deletes every sandbox through the daemon (restarting it on the same state directory
        once if it died: it re-attaches to its sandboxes), stops it, then removes by force
        whatever is still there. Returns what it had to force (should be nothing)."""
        self.stop.set()
        for t in self.threads:  # creates in flight: wait for their answers
            t.join(60)
        report = {"api_deleted": 0, "restarted_daemon": False, "forced": []}
        for attempt in range(2):
            try:
                if self.proc.poll() is not None:
                    if attempt == 0 and os.path.exists(os.path.join(self.state, "admin.key")):
                        report["restarted_daemon"] = True
                        self.proc, self.key = start_daemon(self.a.moat, self.state, self.port, self.log)
                    else:
                        break
                with self.lock:
                    ids = [i for i in dict.fromkeys(self.ids) if i not in self.gone]
                _, err = self.delete_all(ids, self.a.clients)
                rest = self.listed()  # creates answered after we stopped listening
                if rest:
                    _, err2 = self.delete_all(rest, self.a.clients)
                    err = err or err2
                report["api_deleted"] = len(ids) + len(rest)
                if err is None and not self.listed():
                    break
            except BaseException as e:
                print(f"cleanup through the API: {e!r}", file=sys.stderr)
        if self.proc.poll() is None:
            self.spawners = sorted(set(self.spawners) | set(children(self.proc.pid)))
            stop_daemon(self.proc, 15)
        # The spawners die with the daemon (parent-death signal): wait until they are gone.
        deadline = time.time() + 5
        while time.time() < deadline and any(os.path.exists(f"/proc/{p}") for p in self.spawners):
            time.sleep(0.05)
        for p in self.spawners:
            try:
                if open(f"/proc/{p}/comm").read().strip() == "moat":
                    os.kill(p, signal.SIGKILL)
                    report["forced"].append(f"spawner {p}")
            except OSError:
                pass
        # What should not be there: cgroups of our spawners' sandboxes and what runs in them.
        for d in self.cgroup_leftovers():
            try:
                pids = open(os.path.join(d, "cgroup.procs")).read().split()
            except OSError:
                pids = []
            for p in pids:
                try:
                    os.kill(int(p), signal.SIGKILL)
                except OSError:
                    pass
            for _ in range(100):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)
            report["forced"].append(d + (f" ({len(pids)} processes killed)" if pids else ""))
        self.log.close()
        shutil.rmtree(self.state, ignore_errors=True)
        return report


def precheck(a):
    warn = []
    need = a.total + 1
    for ns in ("user", "mnt", "pid", "net", "ipc", "uts", "cgroup"):
        try:
            lim = int(open(f"/proc/sys/user/max_{ns}_namespaces").read())
            if lim < need:
                warn.append(f"user.max_{ns}_namespaces = {lim} < {need}")
        except OSError:
            pass
    pid_max = int(open("/proc/sys/kernel/pid_max").read())
    if pid_max < 2 * need:
        warn.append(f"kernel.pid_max = {pid_max}: each sandbox takes a host pid")
    import resource
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard < need + 1000:
        warn.append(f"RLIMIT_NOFILE hard limit {hard}: the daemon holds one fd per sandbox")
    for w in warn:
        print(f"warning: {w}", file=sys.stderr)
    return warn


HEADER = ("| batch | live | creates/s | create p50 ms | create p99 ms | MemAvailable KiB/sbx | "
          "Slab KiB/sbx | daemon RSS KiB/sbx | cgroup KiB/sbx | exec p50 ms | exec p99 ms | "
          "exec p50 / single |", "|---|---|---|---|---|---|---|---|---|---|---|---|")


def row_md(b, single_p50):
    return (f"| {b['batch']} | {b['live']} | {b['creates_per_s']:.0f} | {b['create_p50_ms']:.1f} | "
            f"{b['create_p99_ms']:.1f} | {b['mem_kib_per_sandbox']:.0f} | "
            f"{b['slab_kib_per_sandbox']:.0f} | {b['daemon_rss_kib_per_sandbox']:.1f} | "
            f"{b['cgroup_kib_per_sandbox'] or 0:.0f} | "
            f"{b['exec_p50_ms']:.2f} | {b['exec_p99_ms']:.2f} | {b['exec_p50_ms'] / single_p50:.2f} |")


def report(results):
    s = results.get("single") or {"p50_ms": float("nan"), "p99_ms": float("nan")}
    L = [f"Scale: {results['live_at_end']} idle native sandboxes (batches of {results['batch']}, "
         f"{results['clients']} clients, {results['execs']} execs of /bin/true into one held "
         f"sandbox after each batch); {results['cpus']} CPUs, {results['kernel']}, MemTotal "
         f"{results.get('mem_total_mib', 0):.0f} MiB." +
         (f" Ended early: {results['interrupted']}." if results.get("interrupted") else ""), "",
         "Per live sandbox: MemAvailable drop and Slab growth against /proc/meminfo before the "
         "first create, the daemon's RSS growth likewise, and the mean memory charged to the "
         "cgroups of up to 20 of the idle sandboxes (KiB). MemAvailable is machine-wide: "
         "anything else running moves it.", "",
         *HEADER,
         f"| single | 1 | | | | | | | | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | 1.00 |"]
    L += [row_md(b, s["p50_ms"]) for b in results["batches"]]
    if results.get("single_after"):
        sa = results["single_after"]
        L.append(f"| single again (the others deleted) | 1 | | | | | | | | {sa['p50_ms']:.2f} | "
                 f"{sa['p99_ms']:.2f} | {sa['p50_ms'] / s['p50_ms']:.2f} |")
    last = results["batches"][-1] if results["batches"] else None
    if last:
        k = last["kernel_kib_per_sandbox"]
        L += ["", f"At {last['live']} live, per sandbox (KiB): " +
              ", ".join(f"{n} {v:.0f}" for n, v in k.items()) + "."]
    nm = [results.get("new_memcg_kib_before")] + [b.get("new_memcg_kib") for b in results["batches"]] \
        + [results.get("new_memcg_kib_after")]
    if any(x is not None for x in nm):
        f = lambda x: "?" if x is None else f"{x:.0f}"
        L.append("Kernel memory of one new empty memory cgroup (KiB; grows with the most superblocks "
                 "ever alive at once since boot, and never shrinks): before the first create "
                 f"{f(nm[0])}, after each batch {', '.join(f(x) for x in nm[1:-1])}, after "
                 f"the cleanup {f(nm[-1])}. A sandbox's own memory cgroup pays this once more.")
    if results.get("deletes_per_s"):
        L.append(f"Deleting {results['deleted']} sandboxes: {results['deletes_per_s']:.0f}/s "
                 f"with {results['clients']} clients.")
    if results.get("stopped_early"):
        L.append(f"Stopped early: {results['stopped_early']}.")
    t = results["targets"]
    if t:
        L += ["", "| target" + (" (partial run)" if results.get("interrupted") else "") +
              " | measured | |", "|---|---|---|"]
        for name, got, ok in t:
            L.append(f"| {name} | {got} | {'met' if ok else 'NOT met'} |")
    c = results.get("cleanup", {})
    L += ["", f"Cleanup: {c.get('api_deleted', 0)} sandboxes deleted through the API"
          + ("; the daemon had died and was restarted to re-attach" if c.get("restarted_daemon") else "")
          + f"; left behind and removed by force: {len(c.get('forced', []))}"
          + (f" ({'; '.join(c['forced'][:5])})" if c.get("forced") else "") + "."]
    return "\n".join(L)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--total", type=int, default=10_000, help="idle sandboxes to hold")
    ap.add_argument("--batch", type=int, default=1_000)
    ap.add_argument("--clients", type=int, default=16, help="concurrent create clients")
    ap.add_argument("--execs", type=int, default=50, help="execs into the held sandbox each time")
    ap.add_argument("--settle", type=float, default=1.0,
                    help="seconds to wait after a batch before reading memory and timing execs")
    ap.add_argument("--min-available-mib", type=int, default=2048,
                    help="stop creating when MemAvailable falls below this")
    ap.add_argument("--moat", default=default_moat())
    ap.add_argument("--out", default=None,
                    help="write the figures here as JSON and the table next to it as .md "
                         "(e.g. bench/results/scale.json)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (the native tier's uid ranges and cgroups)")
    if not os.access(a.moat, os.X_OK):
        raise SystemExit(f"{a.moat}: no moat binary (cargo build --release, or --moat PATH)")
    def on_term(*_):
        raise KeyboardInterrupt()

    signal.signal(signal.SIGTERM, on_term)  # SIGTERM too ends the run through the cleanup
    warnings = precheck(a)
    uname = os.uname()
    results = {"kernel": f"{uname.sysname} {uname.release}", "machine": uname.machine,
               "cpus": os.cpu_count(), "total": a.total, "batch": a.batch, "clients": a.clients,
               "execs": a.execs, "timeout_s": TIMEOUT_S, "warnings": warnings, "batches": [],
               "targets": []}
    run = Run(a)
    interrupted = None
    try:
        results["new_memcg_kib_before"] = memcg_probe()
        time.sleep(a.settle)
        m0 = meminfo()  # the daemon up, no sandbox yet
        rss0 = rss_kib(run.proc.pid)
        results["mem_total_mib"] = m0["MemTotal"] / 1024
        results["meminfo_before_kib"] = m0
        c = Client(run.port, run.key)
        held = run.create(c)
        exec_latencies(c, held, 5)  # warm the connection and the agent
        single = exec_latencies(c, held, a.execs)
        results["single"] = {"p50_ms": statistics.median(single), "p99_ms": pct(single, 99)}
        print(f"single sandbox: exec p50 {results['single']['p50_ms']:.2f} ms, "
              f"p99 {results['single']['p99_ms']:.2f} ms", flush=True)
        print("\n".join(HEADER), flush=True)
        made = 0
        nb = 0
        while made < a.total:
            n = min(a.batch, a.total - made)
            t0 = time.perf_counter()
            lat, err = parallel(n, a.clients, run.port, run.key, run.create, run.stop,
                                run.threads)
            dt = time.perf_counter() - t0
            if err is not None:
                raise RuntimeError(f"batch {nb + 1}: create failed: {err}")
            made += len(lat)
            nb += 1
            time.sleep(a.settle)
            m = meminfo()
            live = len(run.ids)
            ex = exec_latencies(c, held, a.execs)
            with run.lock:
                idle = [i for i in run.ids[1:] if i not in run.gone]
            cg = cgroup_kib(c, idle)
            nm = memcg_probe()
            per = {k: (m[k] - m0[k]) / live for k in MEMINFO_KEYS if k != "MemAvailable"}
            b = {"batch": nb, "live": live, "created": len(lat), "seconds": dt,
                 "creates_per_s": len(lat) / dt,
                 "create_p50_ms": statistics.median(lat), "create_p99_ms": pct(lat, 99),
                 "mem_kib_per_sandbox": (m0["MemAvailable"] - m["MemAvailable"]) / live,
                 "slab_kib_per_sandbox": per["Slab"],
                 "kernel_kib_per_sandbox": per,
                 "daemon_rss_kib_per_sandbox": (rss_kib(run.proc.pid) - rss0) / live,
                 "cgroup_kib_per_sandbox": cg,
                 "new_memcg_kib": nm,
                 "exec_p50_ms": statistics.median(ex), "exec_p99_ms": pct(ex, 99),
                 "meminfo_kib": m}
            results["batches"].append(b)
            print(row_md(b, results["single"]["p50_ms"]), flush=True)
            if m["MemAvailable"] < a.min_available_mib * 1024 and made < a.total:
                results["stopped_early"] = (f"MemAvailable {m['MemAvailable'] // 1024} MiB < "
                                            f"--min-available-mib {a.min_available_mib} "
                                            f"after {live} sandboxes")
                print(f"stopping early: {results['stopped_early']}", file=sys.stderr)
                break
        results["live_at_end"] = len(run.ids)
        others = [i for i in run.ids if i != held]
        secs, err = run.delete_all(others, a.clients)
        if err is not None:
            raise RuntimeError(f"delete failed: {err}")
        results["deleted"] = len(others)
        results["deletes_per_s"] = len(others) / secs if secs > 0 else None
        time.sleep(a.settle)
        after = exec_latencies(c, held, a.execs)
        results["single_after"] = {"p50_ms": statistics.median(after), "p99_ms": pct(after, 99)}
    except KeyboardInterrupt:
        interrupted = "interrupted"
        print("\ninterrupted: deleting every sandbox and stopping the daemon", file=sys.stderr)
    except BaseException as e:
        interrupted = f"error: {e}"
        print(f"\n{e}: deleting every sandbox and stopping the daemon", file=sys.stderr)
        try:
            print("daemon log (tail):\n" + open(os.path.join(run.state, "serve.log"),
                                                errors="replace").read()[-2000:], file=sys.stderr)
        except OSError:
            pass
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut cleanup short
        results["cleanup"] = run.cleanup()
        signal.signal(signal.SIGINT, signal.default_int_handler)
    results.setdefault("live_at_end", len(run.ids))
    results["new_memcg_kib_after"] = memcg_probe()
    results["interrupted"] = interrupted

    bs = results["batches"]
    if bs and "single" in results:
        first, last = bs[0], bs[-1]
        rate = last["creates_per_s"] / first["creates_per_s"]
        single = results["single"]["p50_ms"]
        results["targets"] = [] if len(bs) < 2 else [
            (f"create rate, last batch ({last['live']} live) / first batch", f"{rate:.2f} x "
             f"({last['creates_per_s']:.0f}/s vs {first['creates_per_s']:.0f}/s)", rate >= 0.8)]
        results["targets"] += [
            (f"<= 1 MiB per idle sandbox (MemAvailable drop, {last['live']} live)",
             f"{last['mem_kib_per_sandbox'] / 1024:.2f} MiB", last["mem_kib_per_sandbox"] <= 1024),
            (f"exec p50 with {last['live']} live <= 1.2 x with one",
             f"{last['exec_p50_ms'] / single:.2f} x ({last['exec_p50_ms']:.2f} vs {single:.2f} ms)",
             last["exec_p50_ms"] <= 1.2 * single),
        ]
    left = run.cgroup_leftovers()
    results["cgroups_left_after_cleanup"] = left
    table = report(results)
    print()
    print(table)
    if left:
        print(f"warning: cgroups still there: {left}", file=sys.stderr)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)
        md = os.path.splitext(a.out)[0] + ".md"
        with open(md, "w") as f:
            f.write(table + "\n")
        print(f"\nwritten to {a.out} and {md}")
    if interrupted:
        sys.exit(130 if interrupted == "interrupted" else 1)


if __name__ == "__main__":
    main()
