"""The sync client against a real daemon: every method, streaming, errors, a 100 MiB round trip."""

from __future__ import annotations

import hashlib
import io
import os
import resource
import signal
import threading
import time

import pytest

import moat
from moat import (
    AuthError,
    ConflictError,
    ConnectionError,
    ExecResult,
    FileList,
    ForbiddenError,
    InvalidRequestError,
    MoatError,
    NotFoundError,
    Sandbox,
    ServerError,
    TooLargeError,
)

from conftest import Server, kill_agent, sandbox_pid

MiB = 1 << 20


# -- lifecycle --------------------------------------------------------------------------------


def test_create_context_manager_destroys(server: Server, label: str) -> None:
    with Sandbox.create(metadata={"label": label}, timeout=120) as s:
        info = s.info()
        assert info.id == s.id and info.id.startswith("sbx_")
        assert info.state == "running" and info.tier == os.environ.get("MOAT_TIER", "native")
        assert info.metadata == {"label": label}
        assert s.metadata == {"label": label}
        assert 110_000 <= info.expires_at - info.created_at <= 130_000
        assert s.is_running()
        sid = s.id
    with pytest.raises(NotFoundError) as e:
        Sandbox.connect(sid)
    assert e.value.status == 404 and e.value.code == "not_found"
    assert all(i.id != sid for i in Sandbox.list())


def test_create_env_policy_and_explicit_args(server: Server) -> None:
    # url / api_key as arguments rather than the environment
    with Sandbox.create(
        policy={"limits": {"memory": "256M", "pids": 64}},
        env={"GREETING": "hello"},
        url=server.url,
        api_key=server.key,
    ) as s:
        r = s.exec("echo $GREETING; cat /sys/fs/cgroup/pids.max 2>/dev/null || true")
        assert r.ok and r.stdout.startswith("hello\n")


def test_secrets_reach_the_daemon_and_the_sandbox_sees_a_placeholder(server: Server) -> None:
    policy = {"network": {"mode": "allowlist", "allow": ["api.example.com"],
                          "secrets": {"API_KEY": ["api.example.com"]}}}
    with Sandbox.create(policy=policy, secrets={"API_KEY": "sk-sdk-value"}) as s:
        r = s.exec("echo $API_KEY; echo $HTTPS_PROXY")
        assert r.ok, r
        first, proxy = r.stdout.splitlines()
        assert first.startswith("moat-placeholder-api_key-") and "sk-sdk-value" not in r.stdout
        assert proxy == "http://127.0.0.1:3128"
        assert "sk-sdk-value" not in str(s.info())
    # A secret the policy does not bind is refused before anything starts.
    with pytest.raises(InvalidRequestError, match="not bound to any host"):
        Sandbox.create(policy=policy, secrets={"API_KEY": "x", "OTHER": "y"})


def test_connect_list_filters(server: Server, label: str) -> None:
    with Sandbox.create(metadata={"label": label, "role": "a"}) as a, Sandbox.create(
        metadata={"label": label, "role": "b"}
    ) as b:
        c = Sandbox.connect(a.id)
        try:
            assert c.info().metadata == {"label": label, "role": "a"}
            assert c.exec("echo via-connect").stdout == "via-connect\n"
        finally:
            c.close()
        ids = {i.id for i in Sandbox.list(metadata={"label": label})}
        assert ids == {a.id, b.id}
        only_b = Sandbox.list(metadata={"label": label, "role": "b"})
        assert [i.id for i in only_b] == [b.id]
        assert {a.id, b.id} <= {i.id for i in Sandbox.list(state="running")}
        b.pause()
        assert [i.id for i in Sandbox.list(metadata={"label": label}, state="paused")] == [b.id]
        b.resume()
    assert Sandbox.list(metadata={"label": label}) == []


def test_kill_twice_and_set_timeout(server: Server) -> None:
    s = Sandbox.create(timeout=60)
    try:
        info = s.set_timeout(600)
        now_ms = time.time() * 1000
        assert 590_000 <= info.expires_at - now_ms <= 610_000
        assert s.info().expires_at == info.expires_at
    finally:
        s.kill()
        s.kill()  # already gone: not an error
        s.close()


def test_timeout_expires_sandbox(server: Server) -> None:
    s = Sandbox.create(timeout=60)
    try:
        s.set_timeout(1)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if s.info().state not in ("running", "stopping"):
                    break
            except NotFoundError:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the sandbox did not expire 1 s after set_timeout(1)")
    finally:
        s.kill()
        s.close()


def test_pause_resume(sbx: Sandbox) -> None:
    assert sbx.pause().state == "paused"
    assert sbx.info().state == "paused"
    with pytest.raises(ConflictError) as e:
        sbx.exec("true")
    assert e.value.code == "sandbox_paused" and e.value.status == 409
    with pytest.raises(ConflictError):
        sbx.files.read("/work/x")
    assert sbx.resume().state == "running"
    assert sbx.exec("echo back").stdout == "back\n"


def test_metrics_and_events(sbx: Sandbox) -> None:
    sbx.exec("echo hi")
    sbx.files.write("/work/m.bin", b"x" * 4096)
    m = sbx.metrics()
    assert m.memory_bytes is not None and m.memory_bytes > 0
    assert m.pids is not None and m.pids >= 1
    assert m.cpu_ms is not None and m.cpu_ms >= 0
    assert m.disk_bytes is not None and m.disk_bytes >= 4096
    evs = sbx.events()
    kinds = [e.kind for e in evs]
    assert "sandbox_created" in kinds and "exec_finished" in kinds and "file_write" in kinds
    assert all(e.sandbox_id == sbx.id for e in evs)
    seqs = [e.seq for e in evs]
    assert seqs == sorted(seqs)
    later = sbx.events(since=seqs[0])
    assert later and all(e.seq > seqs[0] for e in later)
    assert len(sbx.events(limit=1)) == 1


def test_follow_events(sbx: Sandbox) -> None:
    got = []
    stream = sbx.follow_events()
    first = next(stream)  # history first
    got.append(first.kind)
    assert first.kind == "sandbox_created"

    def later() -> None:
        time.sleep(0.3)
        sbx.exec(["echo", "live"])

    t = threading.Thread(target=later)
    t.start()
    deadline = time.monotonic() + 20
    for ev in stream:
        got.append(ev.kind)
        if ev.kind == "exec_finished" and ev.data.get("argv") == ["echo", "live"]:
            break
        assert time.monotonic() < deadline
    stream.close()
    t.join()
    assert got[-1] == "exec_finished"


# -- exec -------------------------------------------------------------------------------------


def test_exec_result(sbx: Sandbox) -> None:
    r = sbx.exec(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert isinstance(r, ExecResult)
    assert (r.stdout, r.stderr, r.exit_code, r.status) == ("out\n", "err\n", 3, "ok")
    assert r.signal is None and not r.ok and r.wall_ms >= 0
    assert not r.truncated and r.message is None
    assert sbx.exec("true").ok
    assert sbx.exec(shell="echo $((6*7))").stdout == "42\n"
    assert sbx.exec("pwd", cwd="/tmp").stdout == "/tmp\n"
    assert sbx.exec("echo $A-$B", env={"A": "1", "B": "two"}).stdout == "1-two\n"
    assert sbx.exec(["cat"], stdin="text in").stdout == "text in"
    assert sbx.exec(["od", "-An", "-tx1"], stdin=b"\x00\xff").stdout.split() == ["00", "ff"]
    r = sbx.exec("kill -9 $$")
    assert r.signal == 9 and r.exit_code is None and not r.ok
    with pytest.raises(ValueError):
        sbx.exec(["a"], shell="b")
    with pytest.raises(ValueError):
        sbx.exec()


def test_exec_timeout(server: Server) -> None:
    with Sandbox.create() as s:
        t0 = time.monotonic()
        r = s.exec("sleep 30", timeout=1)
        assert r.status == "timeout" and not r.ok
        assert time.monotonic() - t0 < 15


def test_exec_output_limit(server: Server) -> None:
    with Sandbox.create(policy={"limits": {"output": "1K"}}) as s:
        r = s.exec("head -c 5000 /dev/zero | tr '\\0' a")
        assert r.status == "output_limit" and r.truncated.stdout and r.truncated
        assert len(r.stdout) == 1024 and r.message
        r = s.exec("head -c 5000 /dev/zero | tr '\\0' a", on_stdout=lambda _: None)
        assert r.status == "output_limit" and len(r.stdout) == 1024 and r.truncated.stdout
        assert s.exec("echo alive").stdout == "alive\n"


def test_exec_stream_events_arrive_before_the_end(sbx: Sandbox) -> None:
    t0 = time.monotonic()
    events = []
    for ev in sbx.exec_stream(shell="echo a; sleep 0.5; echo b"):
        events.append((time.monotonic() - t0, ev))
    kinds = [e.type for _, e in events]
    assert kinds[0] == "start" and events[0][1].pid
    assert kinds[-1] == "exit"
    out = [(t, e) for t, e in events if e.type == "stdout"]
    assert "".join(e.data for _, e in out) == "a\nb\n"
    first_t, last_t = out[0][0], events[-1][0]
    assert last_t >= 0.5
    assert last_t - first_t >= 0.4, f"the first output came at {first_t:.3f}s, the end at {last_t:.3f}s"
    res = events[-1][1].result
    assert res is not None and res.exit_code == 0 and res.status == "ok"


def test_exec_stream_stderr_binary_and_break(sbx: Sandbox) -> None:
    evs = list(sbx.exec_stream(["sh", "-c", "printf '\\377\\000' ; echo e >&2"]))
    raw = b"".join(e.raw for e in evs if e.type == "stdout")
    assert raw == b"\xff\x00"
    assert "".join(e.data for e in evs if e.type == "stderr") == "e\n"
    # Breaking out early closes the stream; the sandbox stays usable.
    it = sbx.exec_stream("for i in 1 2 3 4 5; do echo $i; sleep 0.2; done")
    for ev in it:
        if ev.type == "stdout":
            break
    it.close()
    assert sbx.exec("echo still").stdout == "still\n"


def test_exec_callbacks(sbx: Sandbox) -> None:
    t0 = time.monotonic()
    outs: list = []
    errs: list = []
    r = sbx.exec(
        "echo a; echo x >&2; sleep 0.5; echo b",
        on_stdout=lambda s: outs.append((time.monotonic() - t0, s)),
        on_stderr=errs.append,
    )
    assert r.ok and r.stdout == "a\nb\n" and r.stderr == "x\n"
    assert "".join(s for _, s in outs) == "a\nb\n" and "".join(errs) == "x\n"
    assert time.monotonic() - t0 - outs[0][0] >= 0.4


# -- background processes ---------------------------------------------------------------------


def test_processes(sbx: Sandbox) -> None:
    p = sbx.processes.start(shell="read line; echo got:$line; echo warn >&2; read more; echo $more", stdin=True)
    assert p.pid > 0
    listed = {i.pid: i for i in sbx.processes.list()}
    assert listed[p.pid].running and listed[p.pid].argv[-1].startswith("read line")
    assert p.info().running
    assert p.write_stdin("one\n") == 4
    p.write_stdin(b"two\n", close=True)
    res = p.wait()
    assert res.stdout == "got:one\ntwo\n" and res.stderr == "warn\n"
    assert res.exit_code == 0 and res.status == "ok"
    done = p.info()
    assert not done.running and done.exit_code == 0 and done.finished_at is not None
    # output without follow, after the end: everything then exit
    evs = list(p.output(follow=False))
    assert evs[-1].type == "exit"
    assert "".join(e.data for e in evs if e.type == "stdout") == "got:one\ntwo\n"


def test_process_follow_live_and_signals(sbx: Sandbox) -> None:
    p = sbx.processes.start(["sh", "-c", "echo ready; exec sleep 60"], cwd="/work", env={"X": "1"})
    t0 = time.monotonic()
    it = p.output(follow=True)
    first = next(it)
    assert first.type == "stdout" and first.data == "ready\n"
    # not following: what is there, then the stream ends while it still runs
    now = list(sbx.processes.get(p.pid).output(follow=False))
    assert [e.data for e in now if e.type == "stdout"] == ["ready\n"]
    assert all(e.type != "exit" for e in now)
    p.signal(signal.SIGTERM)
    rest = list(it)
    assert rest[-1].type == "exit" and rest[-1].result is not None
    assert rest[-1].result.signal == 15
    assert time.monotonic() - t0 < 30
    q = sbx.processes.start("sleep 60")
    q.signal("INT")
    assert q.wait().signal == 2
    k = sbx.processes.start("sleep 60")
    k.kill()
    assert k.wait().signal == 9
    with pytest.raises(NotFoundError):
        sbx.processes.get(99999).signal(15)


# -- files ------------------------------------------------------------------------------------


def test_files(sbx: Sandbox) -> None:
    f = sbx.files
    assert f.write("/work/d/a.txt", "héllo") == len("héllo".encode())
    assert f.read("/work/d/a.txt") == "héllo".encode()
    assert f.read_text("/work/d/a.txt") == "héllo"
    assert f.write("/work/d/b.bin", bytes(range(256))) == 256
    assert f.read("/work/d/b.bin") == bytes(range(256))
    assert f.write("/work/d/c.txt", io.BytesIO(b"from a file object")) == 18
    assert f.write("/work/d/t.txt", io.StringIO("text io")) == 7
    assert f.write("/work/d/gen.txt", (b"%d," % i for i in range(5))) == 10
    assert f.read_text("/work/d/gen.txt") == "0,1,2,3,4,"
    assert f.write("/work/d/run.sh", "#!/bin/sh\necho ran\n", mode=0o755) > 0
    assert f.stat("/work/d/run.sh").mode & 0o777 == 0o755
    assert sbx.exec(["/work/d/run.sh"]).stdout == "ran\n"
    assert b"".join(f.iter_bytes("/work/d/b.bin", chunk_size=100)) == bytes(range(256))

    st = f.stat("/work/d/a.txt")
    assert st.kind == "file" and st.is_file and st.size == 6 and st.path == "/work/d/a.txt"
    assert st.mtime_ms > 0
    assert f.stat("/work/d").is_dir
    assert f.exists("/work/d/a.txt") and not f.exists("/work/d/nope")

    f.mkdir("/work/d/sub/deep")
    with pytest.raises(MoatError):
        f.mkdir("/work/x/y/z", parents=False)
    f.write("/work/d/sub/deep/z.txt", "z")
    top = f.list("/work/d")
    assert isinstance(top, FileList) and top.truncated is False
    names = {e.path for e in top}
    assert {"/work/d/a.txt", "/work/d/sub"} <= names and "/work/d/sub/deep" not in names
    two = {e.path for e in f.list("/work/d/", depth=2)}
    assert "/work/d/sub/deep" in two and "/work/d/sub/deep/z.txt" not in two
    deep = {e.path for e in f.list("/work/d", depth=3)}
    assert "/work/d/sub/deep/z.txt" in deep

    f.move("/work/d/a.txt", "/work/d/sub/moved.txt")
    assert not f.exists("/work/d/a.txt")
    assert f.read_text("/work/d/sub/moved.txt") == "héllo"
    f.remove("/work/d/sub/moved.txt")
    assert not f.exists("/work/d/sub/moved.txt")
    with pytest.raises(MoatError):
        f.remove("/work/d/sub")  # not empty
    f.remove("/work/d/sub", recursive=True)
    assert not f.exists("/work/d/sub")
    with pytest.raises(NotFoundError):
        f.read("/work/d/missing")


class _CountingReader(io.RawIOBase):
    """A file object that records the largest read asked of it."""

    def __init__(self, path: str):
        self._f = open(path, "rb")
        self.max_read = 0

    def read(self, n: int = -1) -> bytes:  # type: ignore[override]
        if n is None or n < 0:
            raise AssertionError("the SDK read the whole file at once")
        self.max_read = max(self.max_read, n)
        return self._f.read(n)

    def close(self) -> None:
        self._f.close()


def _make_file(path: str, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(MiB, left))
            h.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return h.hexdigest()


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(MiB), b""):
            h.update(chunk)
    return h.hexdigest()


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_100_mib_round_trip(sbx: Sandbox, tmp_path) -> None:  # type: ignore[no-untyped-def]
    size = 100 * MiB
    src = str(tmp_path / "big.bin")
    digest = _make_file(src, size)
    base = _peak_rss_mib()
    t0 = time.monotonic()
    assert sbx.files.upload(src, "/work/big.bin") == size
    up = time.monotonic() - t0
    assert sbx.files.stat("/work/big.bin").size == size
    inside = sbx.exec("sha256sum /work/big.bin").stdout.split()[0]
    assert inside == digest
    dst = str(tmp_path / "back.bin")
    t0 = time.monotonic()
    assert sbx.files.download("/work/big.bin", dst) == size
    down = time.monotonic() - t0
    assert os.path.getsize(dst) == size and _sha256(dst) == digest
    assert not os.path.exists(dst + ".part")
    grew = _peak_rss_mib() - base
    assert grew < 60, f"peak RSS grew {grew:.0f} MiB moving 100 MiB: not streamed"
    # a file object is read in chunks, never whole
    reader = _CountingReader(src)
    assert sbx.files.write("/work/big2.bin", reader) == size
    reader.close()
    assert 0 < reader.max_read <= 1 << 20
    print(f"100 MiB: up {up:.2f}s, down {down:.2f}s, peak RSS +{grew:.0f} MiB")


def test_download_failure_leaves_nothing(sbx: Sandbox, tmp_path) -> None:  # type: ignore[no-untyped-def]
    dst = str(tmp_path / "x.bin")
    with pytest.raises(NotFoundError):
        sbx.files.download("/work/none.bin", dst)
    assert not os.path.exists(dst) and not os.path.exists(dst + ".part")


# -- tokens -----------------------------------------------------------------------------------


def test_token_scopes(server: Server, sbx: Sandbox) -> None:
    sbx.files.write("/work/secret.txt", "s3cret")
    info = sbx.create_token_info(["exec"], ttl=60)
    assert info.token.startswith("moat_tok_") and info.scopes == ["exec"] and info.sandbox_id == sbx.id
    exec_tok = sbx.create_token(["exec"])
    with Sandbox.connect(sbx.id, api_key=exec_tok) as t:  # no `read`: the handle is still made
        assert t.exec("echo tok").stdout == "tok\n"
        with pytest.raises(ForbiddenError) as e:
            t.files.read("/work/secret.txt")
        assert e.value.status == 403 and e.value.code == "forbidden"
        with pytest.raises(ForbiddenError):
            t.info()
        with pytest.raises(ForbiddenError):
            t.create_token(["exec"])
        with pytest.raises(ForbiddenError):
            t.kill()  # a token may not delete its sandbox; leaving the block only closes it
    assert sbx.is_running()

    rd = Sandbox.connect(sbx.id, api_key=sbx.create_token(["files:read", "read"]))
    try:
        assert rd.info().id == sbx.id
        assert rd.files.read_text("/work/secret.txt") == "s3cret"
        with pytest.raises(ForbiddenError):
            rd.files.write("/work/secret.txt", "overwritten")
        with pytest.raises(ForbiddenError):
            rd.exec("true")
        assert [i.id for i in Sandbox.list(api_key=rd._http.key)] == [sbx.id]
        with pytest.raises(ForbiddenError):
            Sandbox.create(api_key=rd._http.key)
    finally:
        rd.close()
    assert sbx.files.read_text("/work/secret.txt") == "s3cret"

    wr = Sandbox.connect(sbx.id, api_key=sbx.create_token(["files:write"]))
    try:
        wr.files.write("/work/w.txt", "by token")
        with pytest.raises(ForbiddenError):
            wr.files.read("/work/w.txt")
    finally:
        wr.close()
    assert sbx.files.read_text("/work/w.txt") == "by token"

    with pytest.raises(InvalidRequestError):
        sbx.create_token(["root"])
    # a token for one sandbox sees no other
    with Sandbox.create() as other:
        with pytest.raises(NotFoundError):
            Sandbox.connect(other.id, api_key=exec_tok)


# -- errors -----------------------------------------------------------------------------------


def test_errors(server: Server, sbx: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(AuthError) as auth:
        Sandbox.list(api_key="moat_key_wrong")
    assert auth.value.status == 401 and auth.value.code == "unauthorized"
    assert isinstance(auth.value, MoatError)

    with pytest.raises(NotFoundError) as nf:
        Sandbox.connect("sbx_0000000000000000")
    assert nf.value.status == 404 and "sbx_0000000000000000" in nf.value.message

    with pytest.raises(InvalidRequestError) as bad:
        sbx.exec("pwd", cwd="relative")
    assert bad.value.status == 400 and bad.value.code == "invalid_request"
    with pytest.raises(InvalidRequestError):
        sbx.files.read("relative/path")
    with pytest.raises(InvalidRequestError):
        Sandbox.create(policy={"no_such_field": 1})
    with pytest.raises(InvalidRequestError):
        Sandbox.list(state="sleeping")

    with Sandbox.create(policy={"limits": {"workdir_size": "1M"}}) as small:
        with pytest.raises(TooLargeError) as big:
            small.files.write("/work/big.bin", io.BytesIO(b"x" * (3 * MiB)))
        assert big.value.status == 413 and big.value.code == "too_large"
    with pytest.raises(TooLargeError) as local:  # refused before sending, with what to do
        sbx.exec(["cat"], stdin=b"x" * (3 * MiB))
    assert "write_stdin" in local.value.message
    # just under the limit goes through
    assert len(sbx.exec(["wc", "-c"], stdin="y" * (1 * MiB)).stdout.split()[0]) == 7

    sbx.pause()
    with pytest.raises(ConflictError) as cf:
        sbx.processes.start("true")
    assert cf.value.code == "sandbox_paused"
    sbx.resume()

    with pytest.raises(ConnectionError) as conn:
        Sandbox.list(url="http://127.0.0.1:1", api_key="k")
    assert "moat serve" in str(conn.value) and conn.value.status is None

    monkeypatch.delenv("MOAT_API_KEY")
    with pytest.raises(AuthError) as nokey:
        Sandbox.create()
    assert nokey.value.code == "no_api_key" and "MOAT_API_KEY" in str(nokey.value)


def test_server_error_when_the_agent_dies(server: Server) -> None:
    with Sandbox.create() as s:
        kill_agent(sandbox_pid(s.events()))
        time.sleep(0.2)
        with pytest.raises(ServerError) as e:
            s.exec("true")
        assert e.value.status is not None and e.value.status >= 500
        assert e.value.code == "unavailable"
        with pytest.raises(ServerError):
            list(s.exec_stream("true"))


def test_public_names() -> None:
    for name in moat.__all__:
        assert hasattr(moat, name)
    assert issubclass(moat.ConnectionError, MoatError)
    assert moat.ExecResult(stdout="", stderr="", exit_code=0, signal=None, status="ok").ok
