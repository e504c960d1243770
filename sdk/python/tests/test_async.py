"""AsyncSandbox against the same real daemon: the whole surface with async/await.

Each test drives its own event loop with asyncio.run, so no pytest plugin is needed."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import time
from typing import Any, Callable, Coroutine, List

import pytest

from moat import (
    AsyncSandbox,
    AuthError,
    ConflictError,
    ConnectionError,
    FileList,
    ForbiddenError,
    InvalidRequestError,
    MoatError,
    NotFoundError,
    ServerError,
    TooLargeError,
)

from conftest import Server, kill_agent, sandbox_pid

MiB = 1 << 20


def run(fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    return asyncio.run(fn())


def test_async_lifecycle(server: Server, label: str) -> None:
    async def main() -> None:
        async with AsyncSandbox.create(metadata={"label": label}, timeout=120, env={"E": "v"}) as s:
            info = await s.info()
            assert info.state == "running" and info.metadata == {"label": label}
            assert 110_000 <= info.expires_at - info.created_at <= 130_000
            assert await s.is_running()
            assert (await s.exec("echo $E")).stdout == "v\n"
            c = await AsyncSandbox.connect(s.id)
            assert (await c.info()).id == s.id
            await c.close()
            assert [i.id for i in await AsyncSandbox.list(metadata={"label": label})] == [s.id]
            assert (await s.set_timeout(300)).expires_at > info.expires_at
            assert (await s.pause()).state == "paused"
            assert [i.id for i in await AsyncSandbox.list(metadata={"label": label}, state="paused")] == [s.id]
            with pytest.raises(ConflictError) as e:
                await s.exec("true")
            assert e.value.code == "sandbox_paused"
            assert (await s.resume()).state == "running"
            sid = s.id
        with pytest.raises(NotFoundError):
            await AsyncSandbox.connect(sid)
        # plain await, explicit url/key, kill twice
        s2 = await AsyncSandbox.create(url=server.url, api_key=server.key)
        try:
            assert (await s2.exec(["true"])).ok
        finally:
            await s2.kill()
            await s2.kill()
            await s2.close()
        assert await AsyncSandbox.list(metadata={"label": label}) == []

    run(main)


def test_async_metrics_events(server: Server) -> None:
    async def main() -> None:
        async with AsyncSandbox.create() as s:
            await s.exec(["echo", "x"])
            m = await s.metrics()
            assert m.memory_bytes and m.memory_bytes > 0 and m.pids and m.pids >= 1
            evs = await s.events()
            assert {"sandbox_created", "exec_finished"} <= {e.kind for e in evs}
            assert len(await s.events(limit=1)) == 1
            assert all(e.seq > evs[0].seq for e in await s.events(since=evs[0].seq))

            async def later() -> None:
                await asyncio.sleep(0.3)
                await s.exec(["echo", "live"])

            task = asyncio.ensure_future(later())
            kinds: List[str] = []
            agen = s.follow_events()
            async for ev in agen:
                kinds.append(ev.kind)
                if ev.kind == "exec_finished" and ev.data.get("argv") == ["echo", "live"]:
                    break
            await agen.aclose()
            await task
            assert kinds[0] == "sandbox_created" and kinds[-1] == "exec_finished"

    run(main)


def test_async_exec_and_streaming(server: Server) -> None:
    async def main() -> None:
        async with AsyncSandbox.create() as s:
            r = await s.exec(["sh", "-c", "echo out; echo err >&2; exit 4"])
            assert (r.stdout, r.stderr, r.exit_code, r.status, r.ok) == ("out\n", "err\n", 4, "ok", False)
            assert (await s.exec(shell="pwd", cwd="/tmp")).stdout == "/tmp\n"
            assert (await s.exec(["cat"], stdin=b"\x01\x02")).stdout == "\x01\x02"
            assert (await s.exec(["cat"], stdin="txt")).stdout == "txt"
            assert (await s.exec("echo $K", env={"K": "k"})).stdout == "k\n"

            t0 = time.monotonic()
            events = []
            async for ev in s.exec_stream(shell="echo a; sleep 0.5; echo b"):
                events.append((time.monotonic() - t0, ev))
            assert events[0][1].type == "start" and events[-1][1].type == "exit"
            outs = [(t, e) for t, e in events if e.type == "stdout"]
            assert "".join(e.data for _, e in outs) == "a\nb\n"
            assert events[-1][0] - outs[0][0] >= 0.4, "the first output did not arrive before the end"

            got: List[str] = []

            async def on_out(text: str) -> None:
                got.append(text)

            errs: List[str] = []
            r = await s.exec("echo 1; echo 2 >&2; echo 3", on_stdout=on_out, on_stderr=errs.append)
            assert r.stdout == "1\n3\n" and "".join(got) == "1\n3\n" and "".join(errs) == "2\n"

            # async means concurrent: four half-second commands at once
            t0 = time.monotonic()
            rs = await asyncio.gather(*(s.exec(f"sleep 0.5; echo {i}") for i in range(4)))
            assert [x.stdout for x in rs] == ["0\n", "1\n", "2\n", "3\n"]
            assert time.monotonic() - t0 < 1.9

            r = await s.exec("sleep 30", timeout=1)
            assert r.status == "timeout"

    run(main)


def test_async_processes(server: Server) -> None:
    async def main() -> None:
        async with AsyncSandbox.create() as s:
            p = await s.processes.start(shell="read a; echo got:$a; echo e >&2", stdin=True)
            assert any(i.pid == p.pid and i.running for i in await s.processes.list())
            assert (await p.info()).running
            assert await p.write_stdin("hi\n", close=True) == 3
            r = await p.wait()
            assert (r.stdout, r.stderr, r.exit_code) == ("got:hi\n", "e\n", 0)
            assert not (await p.info()).running
            evs = [e async for e in p.output(follow=False)]
            assert evs[-1].type == "exit"

            q = await s.processes.start(["sh", "-c", "echo ready; exec sleep 60"])
            it = q.output(follow=True)
            first = await it.__anext__()
            assert first.type == "stdout" and first.data == "ready\n"
            now = [e async for e in s.processes.get(q.pid).output(follow=False)]
            assert all(e.type != "exit" for e in now)
            await q.signal("TERM")
            rest = [e async for e in it]
            assert rest[-1].type == "exit" and rest[-1].result and rest[-1].result.signal == 15
            k = await s.processes.start("sleep 60")
            await k.kill()
            assert (await k.wait()).signal == 9
            w = await s.processes.start("sleep 60", stdin=True)
            await w.close_stdin()
            await w.signal(2)
            assert (await w.wait()).signal == 2

    run(main)


class _AsyncReader:
    """An async file-like object (read is a coroutine)."""

    def __init__(self, data: bytes):
        self._b = io.BytesIO(data)

    async def read(self, n: int = -1) -> bytes:
        await asyncio.sleep(0)
        return self._b.read(n)


def test_async_files(server: Server, tmp_path: Any) -> None:
    async def main() -> None:
        async with AsyncSandbox.create() as s:
            f = s.files
            assert await f.write("/work/a/t.txt", "héllo") == 6
            assert await f.read_text("/work/a/t.txt") == "héllo"
            assert await f.write("/work/a/b.bin", b"\x00\xff") == 2
            assert await f.read("/work/a/b.bin") == b"\x00\xff"
            assert await f.write("/work/a/io.txt", io.BytesIO(b"sync file")) == 9
            assert await f.write("/work/a/aio.txt", _AsyncReader(b"async file")) == 10

            async def agen() -> Any:
                for i in range(3):
                    yield b"%d" % i

            assert await f.write("/work/a/gen.txt", agen()) == 3
            assert await f.read_text("/work/a/gen.txt") == "012"
            assert await f.write("/work/a/x.sh", "#!/bin/sh\necho x\n", mode="0700") > 0
            assert (await f.stat("/work/a/x.sh")).mode & 0o777 == 0o700
            assert b"".join([c async for c in f.iter_bytes("/work/a/t.txt", 2)]) == "héllo".encode()
            st = await f.stat("/work/a/t.txt")
            assert st.is_file and st.size == 6
            assert await f.exists("/work/a") and not await f.exists("/work/zz")
            await f.mkdir("/work/a/s/t")
            lst = await f.list("/work/a", depth=4)
            assert isinstance(lst, FileList) and "/work/a/s/t" in {e.path for e in lst}
            assert "/work/a/s/t" not in {e.path for e in await f.list("/work/a")}
            await f.move("/work/a/t.txt", "/work/a/s/u.txt")
            assert await f.read_text("/work/a/s/u.txt") == "héllo"
            await f.remove("/work/a/s/u.txt")
            with pytest.raises(MoatError):
                await f.remove("/work/a/s")
            await f.remove("/work/a", recursive=True)
            assert not await f.exists("/work/a")
            with pytest.raises(NotFoundError):
                await f.read("/work/a/t.txt")

            # 100 MiB, streamed both ways
            size = 100 * MiB
            src = str(tmp_path / "big.bin")
            h = hashlib.sha256()
            with open(src, "wb") as out:
                for _ in range(100):
                    chunk = os.urandom(MiB)
                    h.update(chunk)
                    out.write(chunk)
            assert await f.upload(src, "/work/big.bin") == size
            assert (await s.exec("sha256sum /work/big.bin")).stdout.split()[0] == h.hexdigest()
            dst = str(tmp_path / "back.bin")
            assert await f.download("/work/big.bin", dst) == size
            h2 = hashlib.sha256()
            with open(dst, "rb") as back:
                for chunk in iter(lambda: back.read(MiB), b""):
                    h2.update(chunk)
            assert h2.hexdigest() == h.hexdigest()

    run(main)


def test_async_tokens_and_errors(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        async with AsyncSandbox.create() as s:
            await s.files.write("/work/f.txt", "data")
            tok = await s.create_token(["exec"], ttl=120)
            info = await s.create_token_info(["files:read", "read"])
            assert info.scopes == ["files:read", "read"] and info.sandbox_id == s.id
            async with await AsyncSandbox.connect(s.id, api_key=tok) as t:  # exit only closes
                assert (await t.exec("echo t")).stdout == "t\n"
                with pytest.raises(ForbiddenError) as fe:
                    await t.files.read("/work/f.txt")
                assert fe.value.status == 403
                with pytest.raises(ForbiddenError):
                    await t.kill()
                with pytest.raises(ForbiddenError):
                    await AsyncSandbox.create(api_key=tok)
            assert await s.is_running()
            r = await AsyncSandbox.connect(s.id, api_key=info.token)
            try:
                assert await r.files.read_text("/work/f.txt") == "data"
                with pytest.raises(ForbiddenError):
                    await r.exec("true")
                with pytest.raises(ForbiddenError):
                    await r.files.write("/work/f.txt", "no")
            finally:
                await r.close()
            with pytest.raises(InvalidRequestError):
                await s.create_token([])

            with pytest.raises(AuthError) as ae:
                await AsyncSandbox.list(api_key="wrong")
            assert ae.value.status == 401
            with pytest.raises(NotFoundError):
                await AsyncSandbox.connect("sbx_ffffffffffffffff")
            with pytest.raises(InvalidRequestError):
                await s.exec("true", timeout=-1)
            async with AsyncSandbox.create(policy={"limits": {"workdir_size": "1M"}}) as small:
                with pytest.raises(TooLargeError) as tl:
                    await small.files.write("/work/big.bin", b"x" * (3 * MiB))
                assert tl.value.status == 413 and tl.value.code == "too_large"
            await s.pause()
            with pytest.raises(ConflictError):
                await s.files.write("/work/p", "x")
            await s.resume()
            with pytest.raises(ConnectionError) as ce:
                await AsyncSandbox.list(url="http://127.0.0.1:1", api_key="k")
            assert "moat serve" in str(ce.value)

            kill_agent(sandbox_pid(await s.events()))
            await asyncio.sleep(0.2)
            with pytest.raises(ServerError) as se:
                await s.exec("true")
            assert se.value.status == 503
            with pytest.raises(ServerError):
                [e async for e in s.exec_stream("true")]

        monkeypatch.delenv("MOAT_API_KEY")
        with pytest.raises(AuthError):
            await AsyncSandbox.create()

    run(main)
