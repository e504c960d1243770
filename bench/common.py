"""What the bench scripts share: the moat binary to measure, percentiles, and a client of
moat serve's HTTP API (one kept-alive connection)."""
import glob, http.client, json, os, signal, socket, subprocess, time

HERE = os.path.dirname(os.path.abspath(__file__))


def default_moat():
    """The release build: target/<host triple>/release/moat (see .cargo/config.toml)."""
    root = os.path.join(HERE, "..", "target")
    found = sorted(glob.glob(os.path.join(root, "*", "release", "moat")))
    return found[0] if found else os.path.join(root, "release", "moat")


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


class Client:
    def __init__(self, port, key, timeout=120):
        self.port, self.key = port, key
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def call(self, method, path, body=None):
        headers = {"Authorization": f"Bearer {self.key}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        self.conn.request(method, path, body=data, headers=headers)
        r = self.conn.getresponse()
        raw = r.read()
        if r.status >= 300:
            raise SystemExit(f"{method} {path}: {r.status} {raw[:400]!r}")
        return json.loads(raw) if raw else None

    def metric(self, name):
        """A sample of /metrics (`name` with its labels), or None."""
        self.conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {self.key}"})
        for line in self.conn.getresponse().read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return None


def await_daemon(proc, port, state):
    """Waits (at most 10 s) for a just-started `moat serve` on `port` to answer /v1/health and
    returns the admin key from its state directory; kills it and raises if it exits first or
    never answers."""
    for _ in range(500):
        if proc.poll() is not None:
            raise RuntimeError(f"moat serve exited with {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", "/v1/health")
            if c.getresponse().status == 200:
                break
        except OSError:
            time.sleep(0.02)
    else:
        proc.kill()
        raise RuntimeError("moat serve did not answer /v1/health")
    return open(os.path.join(state, "admin.key")).read().strip()


def stop_daemon(proc, timeout):
    """SIGTERM to a moat serve, SIGKILL if it is not gone within timeout seconds."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


def free_port(host="127.0.0.1"):
    s = socket.socket()
    s.bind((host, 0))
    p = s.getsockname()[1]
    s.close()
    return p
