#!/usr/bin/env python3
"""moat's egress proxy against a direct connection, in one run, alternating A B B A (see
../../shared/BENCH.md).

Usage: bench/egress.py [--rounds N] [--requests N] [--mib N] [--moat PATH] [--out FILE]

An upstream HTTP server (this script, `upstream` mode: blocking sockets, a thread per
connection, keep-alive, TCP_NODELAY) listens on 127.0.0.2. The same client program (this
script, `client` mode, which reads commands on stdin and answers one JSON line each) runs
twice for the whole run:

  direct  on the host, connecting straight to 127.0.0.2:PORT;
  moat    inside `moat run --net allow:up.test --egress-host up.test=127.0.0.2
          --egress-allow-cidr 127.0.0.2/32`, connecting to the proxy named by $HTTP_PROXY
          (127.0.0.1:3128 in the sandbox), whose agent relays each connection to the egress
          proxy in the `moat run` process, which connects to 127.0.0.2:PORT.

Every round runs each measurement on both clients, the order flipping every round:

  keep-alive    N sequential `GET /` on one connection (moat: in an HTTPS_PROXY-style CONNECT
                tunnel to up.test:PORT, set up before timing): the relay path per request.
  new conn      N sequential `GET /`, one new connection each, timed from connect() to the
                last byte (moat: `GET http://up.test:PORT/` to the proxy: relay setup, rule
                check, upstream connect, all included).
  download      `GET /zeros/SIZE` streaming zeros (moat: through a CONNECT tunnel).
  upload        `PUT /sink` with SIZE bytes (moat: through a CONNECT tunnel).

For the bulk transfers the CPU time (utime + stime from /proc) of the `moat run` process (the
egress proxy) and of the sandbox's other processes (init and agent: the in-sandbox relay; the
client is not counted) is read before and after, so the table can state Gbit/s per core of
moat's own work. The sandbox gets `cpus = <host CPUs>` so that its cgroup quota (default
1 core, shared by the client and the agent) is not what is measured; bytes and timeout limits
are raised for the run. Prints medians, p99 and ratios; writes the figures as JSON and the
table as markdown next to it.
"""
import argparse, glob, json, os, platform, resource, select, socket, statistics, subprocess
import sys, tempfile, threading, time
from common import default_moat, pct

HERE = os.path.dirname(os.path.abspath(__file__))
NAME = "up.test"
UPSTREAM_IP = "127.0.0.2"
CHUNK = 1 << 20
# One interpreter for the upstream and both clients: the system's, which the sandbox sees
# (its /usr is the host's, read-only).
PYTHON = "/usr/bin/python3"


# ---------------------------------------------------------------------------------------
# upstream: `egress.py upstream HOST PORT` (prints "ready" once listening)

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"
OK_CLOSE = (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n"
            b"Connection: close\r\n\r\nok")


def upstream_conn(s):
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    zeros = memoryview(bytearray(CHUNK))
    sink = bytearray(CHUNK)
    buf = b""
    try:
        while True:
            while b"\r\n\r\n" not in buf:
                d = s.recv(65536)
                if not d:
                    return
                buf += d
            head, buf = buf.split(b"\r\n\r\n", 1)
            lines = head.split(b"\r\n")
            method, path = lines[0].split(b" ")[:2]
            hdrs = {}
            for l in lines[1:]:
                k, _, v = l.partition(b":")
                hdrs[k.strip().lower()] = v.strip()
            close = hdrs.get(b"connection", b"").lower() == b"close"
            body = int(hdrs.get(b"content-length", b"0"))
            # Discard a request body (the upload), from what is buffered, then the socket.
            take = min(body, len(buf))
            buf = buf[take:]
            body -= take
            view = memoryview(sink)
            while body:
                n = s.recv_into(view, min(body, CHUNK))
                if not n:
                    return
                body -= n
            if path.startswith(b"/zeros/"):
                n = int(path[7:])
                s.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                          b"Content-Length: %d\r\n%s\r\n" % (n, b"Connection: close\r\n" if close else b""))
                while n:
                    k = min(n, CHUNK)
                    s.sendall(zeros[:k])
                    n -= k
            else:
                s.sendall(OK_CLOSE if close else OK)
            if close:
                return
    except OSError:
        pass
    finally:
        s.close()


def upstream_main(host, port):
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((host, int(port)))
    ls.listen(512)
    print("ready", flush=True)
    while True:
        c, _ = ls.accept()
        threading.Thread(target=upstream_conn, args=(c,), daemon=True).start()


# ---------------------------------------------------------------------------------------
# client: `egress.py client direct HOST:PORT` or `egress.py client proxy NAME:PORT`
# Commands on stdin, one JSON line answered on stdout each:
#   ka N | new N | down BYTES | up BYTES | quit

class Reader:
    """A socket with a read buffer: response heads and Content-Length bodies."""

    def __init__(self, s):
        self.s, self.buf = s, b""

    def head(self):
        while b"\r\n\r\n" not in self.buf:
            d = self.s.recv(65536)
            if not d:
                raise SystemExit(f"connection closed before a response head: {self.buf[:200]!r}")
            self.buf += d
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        length = 0
        for l in lines[1:]:
            k, _, v = l.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v.strip())
        return status, length, head

    def body(self, n):
        """Reads n body bytes, into a scratch buffer."""
        take = min(n, len(self.buf))
        self.buf = self.buf[take:]
        n -= take
        if n:
            scratch = memoryview(bytearray(min(n, CHUNK)))
            while n:
                k = self.s.recv_into(scratch, min(n, len(scratch)))
                if not k:
                    raise SystemExit("connection closed in a response body")
                n -= k

    def response(self, want=200):
        status, length, head = self.head()
        if status != want:
            raise SystemExit(f"status {status}: {head[:300]!r}")
        self.body(length)


class Client:
    def __init__(self, mode, target):
        self.mode = mode
        self.host, port = target.rsplit(":", 1)
        self.port = int(port)
        if mode == "proxy":
            p = os.environ.get("HTTP_PROXY") or os.environ.get("http_proxy") or "http://127.0.0.1:3128"
            hp = p.split("://", 1)[-1].rstrip("/")
            ph, pp = hp.rsplit(":", 1)
            self.proxy = (ph, int(pp))
        self.authority = f"{self.host}:{self.port}"

    def sock(self, addr):
        s = socket.create_connection(addr)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def tunnel(self):
        """A connection on which origin-form requests reach the upstream."""
        if self.mode == "direct":
            return Reader(self.sock((self.host, self.port)))
        r = Reader(self.sock(self.proxy))
        r.s.sendall(f"CONNECT {self.authority} HTTP/1.1\r\nHost: {self.authority}\r\n\r\n".encode())
        status, _, head = r.head()
        if status != 200:
            raise SystemExit(f"CONNECT {self.authority}: {head[:300]!r}")
        return r

    def keepalive(self, n):
        r = self.tunnel()
        req = f"GET / HTTP/1.1\r\nHost: {self.authority}\r\n\r\n".encode()
        out = []
        for _ in range(n):
            t0 = time.perf_counter_ns()
            r.s.sendall(req)
            r.response()
            out.append((time.perf_counter_ns() - t0) / 1e3)
        r.s.close()
        return {"us": out}

    def new(self, n):
        if self.mode == "direct":
            addr, target = (self.host, self.port), "/"
        else:
            addr, target = self.proxy, f"http://{self.authority}/"
        req = f"GET {target} HTTP/1.1\r\nHost: {self.authority}\r\nConnection: close\r\n\r\n".encode()
        out = []
        for _ in range(n):
            t0 = time.perf_counter_ns()
            r = Reader(self.sock(addr))
            r.s.sendall(req)
            r.response()
            out.append((time.perf_counter_ns() - t0) / 1e3)
            r.s.close()
        return {"us": out}

    def down(self, size):
        r = self.tunnel()
        t0 = time.perf_counter_ns()
        r.s.sendall(f"GET /zeros/{size} HTTP/1.1\r\nHost: {self.authority}\r\n\r\n".encode())
        r.response()
        dt = (time.perf_counter_ns() - t0) / 1e9
        r.s.close()
        return {"s": dt, "bytes": size}

    def up(self, size):
        r = self.tunnel()
        zeros = memoryview(bytearray(CHUNK))
        t0 = time.perf_counter_ns()
        r.s.sendall(f"PUT /sink HTTP/1.1\r\nHost: {self.authority}\r\n"
                    f"Content-Type: application/octet-stream\r\nContent-Length: {size}\r\n\r\n".encode())
        n = size
        while n:
            k = min(n, CHUNK)
            r.s.sendall(zeros[:k])
            n -= k
        r.response()
        dt = (time.perf_counter_ns() - t0) / 1e9
        r.s.close()
        return {"s": dt, "bytes": size}


def client_main(mode, target):
    c = Client(mode, target)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        res = {"ka": c.keepalive, "new": c.new, "down": c.down, "up": c.up}[cmd[0]](int(cmd[1]))
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        res["cpu_s"] = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        print(json.dumps(res), flush=True)


# ---------------------------------------------------------------------------------------
# the harness

TICK = os.sysconf("SC_CLK_TCK")


def proc_tree_cpu(root):
    """CPU seconds (utime + stime) of `root` and of its descendants other than the client,
    as {"moat": s, "sandbox": s}."""
    stats = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            raw = open(f"/proc/{p}/stat").read()
            cmd = open(f"/proc/{p}/cmdline", "rb").read()
        except OSError:
            continue
        f = raw[raw.rindex(")") + 2:].split()
        stats[int(p)] = (int(f[1]), (int(f[11]) + int(f[12])) / TICK, b"egress.py" in cmd)
    kids = {}
    for pid, (ppid, _, _) in stats.items():
        kids.setdefault(ppid, []).append(pid)
    out = {"moat": stats.get(root, (0, 0.0, False))[1], "sandbox": 0.0}
    todo = list(kids.get(root, []))
    while todo:
        pid = todo.pop()
        todo.extend(kids.get(pid, []))
        if not stats[pid][2]:
            out["sandbox"] += stats[pid][1]
    return out


class Peer:
    """A running client process, driven over its stdin and stdout."""

    def __init__(self, name, argv, cpu_root=False):
        self.name = name
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=sys.stderr, text=True, bufsize=1)
        self.cpu_root = cpu_root
        first = self.read(timeout=60)
        if not first.get("ready"):
            raise SystemExit(f"{name}: client did not start: {first}")

    def read(self, timeout=600):
        r, _, _ = select.select([self.p.stdout], [], [], timeout)
        line = self.p.stdout.readline() if r else ""
        if not line:
            raise SystemExit(f"{self.name}: client gave no answer (exit {self.p.poll()})")
        return json.loads(line)

    def cmd(self, c):
        before = proc_tree_cpu(self.p.pid) if self.cpu_root else None
        self.p.stdin.write(c + "\n")
        self.p.stdin.flush()
        res = self.read()
        if before is not None:
            after = proc_tree_cpu(self.p.pid)
            res["moat_cpu_s"] = after["moat"] - before["moat"]
            res["sandbox_cpu_s"] = after["sandbox"] - before["sandbox"]
        return res

    def close(self):
        try:
            self.p.stdin.write("quit\n")
            self.p.stdin.close()
            self.p.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.p.kill()
            self.p.wait()


def free_port(host):
    s = socket.socket()
    s.bind((host, 0))
    p = s.getsockname()[1]
    s.close()
    return p


def lat(name, us):
    return {"name": name, "n": len(us), "median_us": statistics.median(us),
            "p90_us": pct(us, 90), "p99_us": pct(us, 99)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--requests", type=int, default=500, help="requests per kind per round")
    ap.add_argument("--mib", type=int, default=256, help="size of each bulk transfer")
    ap.add_argument("--moat", default=default_moat())
    ap.add_argument("--out", default=os.path.join(HERE, "results", "egress.json"))
    a = ap.parse_args()
    if not os.access(a.moat, os.X_OK):
        raise SystemExit(f"no moat binary at {a.moat}: cargo build --release -p moat")
    me = os.path.abspath(__file__)
    if not os.access(PYTHON, os.X_OK):
        raise SystemExit(f"{PYTHON} is needed (the sandbox runs the client with it)")
    port = free_port(UPSTREAM_IP)
    up = subprocess.Popen([PYTHON, me, "upstream", UPSTREAM_IP, str(port)],
                          stdout=subprocess.PIPE, text=True)
    if up.stdout.readline().strip() != "ready":
        raise SystemExit("the upstream server did not start")
    tmp = tempfile.mkdtemp(prefix="moat-egress-bench-")
    policy = os.path.join(tmp, "policy.toml")
    cpus = os.cpu_count() or 1
    with open(policy, "w") as f:
        f.write(f'[limits]\ntimeout = "2h"\ncpus = {float(cpus)}\n\n'
                f'[network]\nmax_bytes = "64T"\nmax_connections = 256\n')
    moat_argv = [a.moat, "run", "--policy", policy, "--net", f"allow:{NAME}",
                 "--egress-host", f"{NAME}={UPSTREAM_IP}",
                 "--egress-allow-cidr", f"{UPSTREAM_IP}/32",
                 "--mount", f"{HERE}:/moat-bench", "--",
                 PYTHON, "/moat-bench/egress.py", "client", "proxy", f"{NAME}:{port}"]
    size = a.mib << 20
    load_before = open("/proc/loadavg").read().split()[:3]
    peers = []
    try:
        direct = Peer("direct", [PYTHON, me, "client", "direct", f"{UPSTREAM_IP}:{port}"])
        peers.append(direct)
        moat = Peer("moat", moat_argv, cpu_root=True)
        peers.append(moat)
        # Warm-up, not counted.
        for p in (direct, moat):
            p.cmd("ka 50")
            p.cmd("new 50")
            p.cmd(f"down {16 << 20}")
            p.cmd(f"up {16 << 20}")
        data = {k: {"direct": [], "moat": []} for k in ("ka", "new", "down", "up")}
        for i in range(a.rounds):
            order = (direct, moat) if i % 2 == 0 else (moat, direct)
            for kind, arg in (("ka", a.requests), ("new", a.requests), ("down", size), ("up", size)):
                for p in order:
                    data[kind][p.name].append(p.cmd(f"{kind} {arg}"))
            print(f"round {i + 1}/{a.rounds} done", file=sys.stderr, flush=True)
    finally:
        for p in peers:
            p.close()
        up.kill()
        up.wait()
        for f in os.listdir(tmp):
            os.unlink(os.path.join(tmp, f))
        os.rmdir(tmp)

    load_after = open("/proc/loadavg").read().split()[:3]
    results = {"load": [" ".join(load_before), " ".join(load_after)], "machine": " ".join(platform.uname()), "cpus": cpus, "rounds": a.rounds,
               "requests_per_round": a.requests, "transfer_mib": a.mib,
               "command": " ".join(["bench/egress.py"] + sys.argv[1:])}
    latency = {}
    for kind, label in (("ka", "keep-alive request"), ("new", "new connection + request")):
        d = [x for r in data[kind]["direct"] for x in r["us"]]
        m = [x for r in data[kind]["moat"] for x in r["us"]]
        dl, ml = lat(f"{label}, direct", d), lat(f"{label}, through moat", m)
        cpu = sum(r["moat_cpu_s"] + r["sandbox_cpu_s"] for r in data[kind]["moat"])
        pcpu = sum(r["moat_cpu_s"] for r in data[kind]["moat"])
        ccpu = {w: sum(r["cpu_s"] for r in data[kind][w]) / len(d) * 1e6 for w in ("direct", "moat")}
        latency[kind] = {"direct": dl, "moat": ml,
                         "proxy_cpu_us_per_request": pcpu / len(m) * 1e6,
                         "agent_cpu_us_per_request": (cpu - pcpu) / len(m) * 1e6,
                         "client_cpu_us_per_request": ccpu,
                         "added_median_us": ml["median_us"] - dl["median_us"],
                         "added_p99_us": ml["p99_us"] - dl["p99_us"],
                         "ratio": ml["median_us"] / dl["median_us"],
                         "moat_cpu_us_per_request": cpu / len(m) * 1e6}
    results["latency"] = latency
    bulk = {}
    for kind in ("down", "up"):
        row = {}
        for who in ("direct", "moat"):
            rs = data[kind][who]
            g = [r["bytes"] * 8 / r["s"] / 1e9 for r in rs]
            row[who] = {"gbit_s_median": statistics.median(g), "gbit_s_min": min(g),
                        "gbit_s_max": max(g), "client_cpu_s_median":
                        statistics.median(r["cpu_s"] for r in rs)}
            if who == "moat":
                # Totals over the rounds: /proc's figures come in clock ticks (10 ms).
                bits = sum(r["bytes"] for r in rs) * 8
                mc = sum(r["moat_cpu_s"] for r in rs)
                sc = sum(r["sandbox_cpu_s"] for r in rs)
                row[who].update({
                    "proxy_cpu_s_per_transfer": mc / len(rs),
                    "agent_cpu_s_per_transfer": sc / len(rs),
                    "gbit_per_core_proxy_and_agent": bits / (mc + sc) / 1e9 if mc + sc else None,
                    "gbit_per_core_proxy_only": bits / mc / 1e9 if mc else None,
                })
        row["ratio"] = row["moat"]["gbit_s_median"] / row["direct"]["gbit_s_median"]
        bulk[kind] = row
    results["throughput"] = bulk

    lines = [f"`{results['command']}` ({a.rounds} rounds of {a.requests} requests per kind and "
             f"{a.mib} MiB each way; {cpus} CPUs; {results['machine']}):", "",
             "| latency per request | median µs | p99 µs | added median µs | added p99 µs | median / direct |",
             "|---|---|---|---|---|---|"]
    for kind in ("ka", "new"):
        L = latency[kind]
        for who in ("direct", "moat"):
            r = L[who]
            extra = (f"{L['added_median_us']:+.0f} | {L['added_p99_us']:+.0f} | {L['ratio']:.2f}"
                     if who == "moat" else " | | 1.00")
            lines.append(f"| {r['name']} | {r['median_us']:.0f} | {r['p99_us']:.0f} | {extra} |")
    lines += [""]
    for kind, label in (("ka", "keep-alive"), ("new", "new connection")):
        L = latency[kind]
        lines.append(f"CPU per request, {label}: moat {L['moat_cpu_us_per_request']:.0f} µs "
                     f"(proxy {L['proxy_cpu_us_per_request']:.0f}, sandbox agent "
                     f"{L['agent_cpu_us_per_request']:.0f}); the client itself "
                     f"{L['client_cpu_us_per_request']['direct']:.0f} µs direct, "
                     f"{L['client_cpu_us_per_request']['moat']:.0f} µs in the sandbox  ")
    lines += [f"load average before / after: {results['load'][0]} / {results['load'][1]}", "",
              "| bulk transfer, CONNECT tunnel | Gbit/s median (min-max) | / direct | proxy CPU s per transfer | "
              "agent CPU s per transfer | Gbit/s per core (proxy + agent) | Gbit/s per core (proxy only) |",
              "|---|---|---|---|---|---|---|"]
    for kind, label in (("down", "download"), ("up", "upload")):
        B = bulk[kind]
        for who in ("direct", "moat"):
            r = B[who]
            g = f"{r['gbit_s_median']:.2f} ({r['gbit_s_min']:.2f}-{r['gbit_s_max']:.2f})"
            if who == "direct":
                lines.append(f"| {label} {a.mib} MiB, direct | {g} | 1.00 | | | | |")
            else:
                pa = r["gbit_per_core_proxy_and_agent"]
                po = r["gbit_per_core_proxy_only"]
                lines.append(f"| {label} {a.mib} MiB, through moat | {g} | {B['ratio']:.2f} | "
                             f"{r['proxy_cpu_s_per_transfer']:.3f} | {r['agent_cpu_s_per_transfer']:.3f} | "
                             f"{pa:.2f} | {po:.2f} |" if pa and po else
                             f"| {label} {a.mib} MiB, through moat | {g} | {B['ratio']:.2f} | "
                             f"{r['proxy_cpu_s_per_transfer']:.3f} | {r['agent_cpu_s_per_transfer']:.3f} | - | - |")
    table = "\n".join(lines)
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
    if len(sys.argv) > 1 and sys.argv[1] == "upstream":
        upstream_main(sys.argv[2], sys.argv[3])
    elif len(sys.argv) > 1 and sys.argv[1] == "client":
        client_main(sys.argv[2], sys.argv[3])
    else:
        main()
