#!/usr/bin/env python3
"""moat serve against its peers, in one run, alternating A B A B (see ../../shared/BENCH.md).

Usage: bench/daemon.py [--rounds N] [--moat PATH] [--out FILE]

Starts its own `moat serve` on a free port with a fresh state directory, then measures:

1. create -> first exec done: POST /v1/sandboxes, then POST .../exec {"cmd":["true"]}, then
   DELETE (not timed), against `bwrap ... /bin/true` (a one-shot sandbox start, the closest peer)
   in alternating rounds.
2. exec round trip into a running sandbox over the HTTP API (keep-alive connection) against
   `nsenter` into a running `unshare` namespace set + exec /bin/true.
3. sandboxes created and destroyed per second with 2 concurrent clients, against bwrap runs per
   second with 2 concurrent workers.
4. memory per idle sandbox: MemAvailable before and after holding N idle sandboxes (moat) and
   N idle `bwrap ... sleep` (peer), divided by N.

Prints medians, p99 and ratios; writes the figures as JSON.
"""
import argparse, glob, json, os, shutil, signal, socket, statistics, subprocess
import sys, tempfile, threading, time
from common import default_moat, pct, Client, await_daemon, free_port, stop_daemon


BWRAP = ["--unshare-all", "--die-with-parent", "--ro-bind", "/usr", "/usr",
         "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib",
         "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/sbin", "/sbin",
         "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]


def run_once(argv):
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


def start_daemon(moat):
    state = tempfile.mkdtemp(prefix="moat-bench-")
    port = free_port()
    proc = subprocess.Popen([moat, "serve", "--listen", f"127.0.0.1:{port}", "--state-dir", state],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    key = await_daemon(proc, port, state)
    return proc, port, key, state


def mem_available_kb():
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    return 0


def summary(name, xs):
    return {"name": name, "n": len(xs), "median_ms": statistics.median(xs),
            "p99_ms": pct(xs, 99), "p90_ms": pct(xs, 90)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--moat", default=default_moat())
    ap.add_argument("--idle", type=int, default=200, help="sandboxes held for the memory figure")
    ap.add_argument("--rate-seconds", type=float, default=5.0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results", "daemon.json"))
    a = ap.parse_args()
    bwrap = shutil.which("bwrap")
    if not bwrap:
        raise SystemExit("bwrap (bubblewrap) is the peer: apt-get install bubblewrap")
    proc, port, key, state = start_daemon(a.moat)
    results = {"machine": os.uname()._asdict() if hasattr(os.uname(), "_asdict") else str(os.uname()),
               "cpus": os.cpu_count()}
    try:
        c = Client(port, key)
        # 1. create -> first exec, against a one-shot bwrap.
        create, first, both, peer = [], [], [], []
        for i in range(a.rounds):
            t0 = time.perf_counter_ns()
            sb = c.call("POST", "/v1/sandboxes", {})
            t1 = time.perf_counter_ns()
            r = c.call("POST", f"/v1/sandboxes/{sb['id']}/exec", {"cmd": ["true"]})
            t2 = time.perf_counter_ns()
            assert r["exit_code"] == 0, r
            c.call("DELETE", f"/v1/sandboxes/{sb['id']}")
            create.append((t1 - t0) / 1e6)
            first.append((t2 - t1) / 1e6)
            both.append((t2 - t0) / 1e6)
            peer.append(run_once([bwrap] + BWRAP + ["/bin/true"]))
        results["create_first_exec"] = [summary("moat create -> first exec done", both),
                                        summary("  of which create", create),
                                        summary("  of which first exec", first),
                                        summary("bwrap /bin/true (one-shot)", peer)]
        # 2. exec round trip, against nsenter into a live namespace set.
        sb = c.call("POST", "/v1/sandboxes", {})
        ns = subprocess.Popen(["unshare", "--user", "--map-root-user", "--pid", "--fork",
                               "--mount", "--ipc", "--uts", "--net", "sleep", "1000"])
        time.sleep(0.2)
        child = None
        for p in os.listdir("/proc"):
            if p.isdigit():
                try:
                    if open(f"/proc/{p}/stat").read().split()[3] == str(ns.pid):
                        child = p
                except OSError:
                    pass
        target = child or str(ns.pid)
        nsenter = [shutil.which("nsenter"), "-t", target, "-U", "-p", "-m", "-i", "-u", "-n",
                   "--preserve-credentials", "/bin/true"]
        ex, ne = [], []
        for i in range(a.rounds):
            t0 = time.perf_counter_ns()
            r = c.call("POST", f"/v1/sandboxes/{sb['id']}/exec", {"cmd": ["true"]})
            ex.append((time.perf_counter_ns() - t0) / 1e6)
            ne.append(run_once(nsenter))
        ns.kill()
        ns.wait()
        c.call("DELETE", f"/v1/sandboxes/{sb['id']}")
        results["exec_round_trip"] = [summary("moat exec round trip (HTTP API)", ex),
                                      summary("nsenter + exec /bin/true", ne)]
        # 3. create + destroy per second, 2 clients; against bwrap runs per second, 2 workers.
        def moat_worker(out, stop):
            cl = Client(port, key)
            n = 0
            while time.time() < stop:
                s = cl.call("POST", "/v1/sandboxes", {})
                cl.call("DELETE", f"/v1/sandboxes/{s['id']}")
                n += 1
            out.append(n)

        def bwrap_worker(out, stop):
            n = 0
            while time.time() < stop:
                run_once([bwrap] + BWRAP + ["/bin/true"])
                n += 1
            out.append(n)

        rates = {}
        for name, fn in [("moat create+destroy", moat_worker), ("bwrap run", bwrap_worker)]:
            out = []
            stop = time.time() + a.rate_seconds
            ts = [threading.Thread(target=fn, args=(out, stop)) for _ in range(2)]
            t0 = time.time()
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            rates[name] = sum(out) / (time.time() - t0)
        results["per_second"] = rates
        # 4. memory per idle sandbox.
        time.sleep(1)
        m0 = mem_available_kb()
        ids = [c.call("POST", "/v1/sandboxes", {})["id"] for _ in range(a.idle)]
        time.sleep(2)
        m1 = mem_available_kb()
        for i in ids:
            c.call("DELETE", f"/v1/sandboxes/{i}")
        time.sleep(2)
        b0 = mem_available_kb()
        held = [subprocess.Popen([bwrap] + BWRAP + ["sleep", "1000"]) for _ in range(a.idle)]
        time.sleep(2)
        b1 = mem_available_kb()
        for h in held:
            h.kill()
            h.wait()
        results["idle_memory_mib"] = {"moat": (m0 - m1) / a.idle / 1024,
                                      "bwrap sleep": (b0 - b1) / a.idle / 1024, "n": a.idle}
    finally:
        stop_daemon(proc, 10)
        shutil.rmtree(state, ignore_errors=True)

    def table(rows, ref):
        print(f"| command | median ms | p99 ms | median / {ref['name'].split()[0]} |")
        print("|---|---|---|---|")
        for r in rows:
            print(f"| {r['name']} | {r['median_ms']:.2f} | {r['p99_ms']:.2f} | "
                  f"{r['median_ms'] / ref['median_ms']:.2f} |")
    print("\ncreate -> first exec (no pool)")
    table(results["create_first_exec"], results["create_first_exec"][-1])
    print("\nexec round trip into a running sandbox")
    table(results["exec_round_trip"], results["exec_round_trip"][-1])
    print("\nper second, 2 concurrent clients")
    for k, v in results["per_second"].items():
        print(f"  {k}: {v:.0f}/s")
    print("\nmemory per idle sandbox (MemAvailable delta / N)")
    for k, v in results["idle_memory_mib"].items():
        print(f"  {k}: {v:.2f}" + (" MiB" if k != "n" else ""))
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwritten to {a.out}")


if __name__ == "__main__":
    main()
