"""The asynchronous client: :class:`AsyncSandbox`, the same surface as :class:`moat.Sandbox`
with ``async``/``await`` (on httpx.AsyncClient) and async iterators for streams."""

from __future__ import annotations

import inspect
import os
from contextlib import asynccontextmanager
from types import TracebackType
from typing import (
    IO,
    Any,
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Dict,
    Generator,
    Iterable,
    List,
    Mapping,
    Optional,
    Type,
    Union,
)
from urllib.parse import quote

import httpx

from . import _common as c
from ._errors import ForbiddenError, MoatError, NotFoundError
from ._sync import SignalLike, _signum
from ._types import (
    Event,
    ExecEvent,
    ExecResult,
    FileEntry,
    FileList,
    Metrics,
    ProcessInfo,
    SandboxInfo,
    TokenInfo,
)

__all__ = ["AsyncSandbox", "AsyncFiles", "AsyncProcesses", "AsyncProcess"]

AsyncWriteData = Union[
    str, bytes, bytearray, memoryview, IO[bytes], IO[str], Iterable[bytes], AsyncIterable[bytes], Any
]
AsyncCallback = Callable[[str], Union[Any, Awaitable[Any]]]


class _AsyncHttp:
    def __init__(self, url: Optional[str], api_key: Optional[str]):
        self.url, self.key = c.resolve(url, api_key)
        self.client = httpx.AsyncClient(
            base_url=self.url + "/v1", headers=c.headers(self.key), timeout=c.DEFAULT_TIMEOUT
        )

    async def close(self) -> None:
        await self.client.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Any = None,
        content: Any = None,
        long: bool = False,
    ) -> Any:
        try:
            resp = await self.client.request(
                method,
                path,
                json=json,
                params=params,
                content=content,
                timeout=c.LONG_TIMEOUT if long else c.DEFAULT_TIMEOUT,
            )
        except httpx.TransportError as e:
            raise c.transport_error(e, self.url) from e
        if not resp.is_success:
            raise c.api_error(resp)
        if resp.status_code == 204 or not resp.content:
            return None
        try:
            return resp.json()
        except ValueError as e:
            raise MoatError(f"the daemon answered {method} {path} with non-JSON: {resp.text[:200]!r}") from e

    @asynccontextmanager
    async def stream(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Any = None,
        headers: Optional[Dict[str, str]] = None,
    ) -> AsyncIterator[httpx.Response]:
        try:
            async with self.client.stream(
                method, path, json=json, params=params, headers=headers, timeout=c.LONG_TIMEOUT
            ) as resp:
                if not resp.is_success:
                    await resp.aread()
                    raise c.api_error(resp)
                yield resp
        except httpx.TransportError as e:
            raise c.transport_error(e, self.url) from e


async def _ndjson(resp: httpx.Response) -> AsyncIterator[Dict[str, Any]]:
    async for line in resp.aiter_lines():
        d = c.parse_line(line)
        if d is not None:
            yield d


def _achunks(data: AsyncWriteData) -> Union[bytes, AsyncIterator[bytes]]:
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    if hasattr(data, "read"):
        f: Any = data

        async def gen() -> AsyncGenerator[bytes, None]:
            while True:
                chunk = f.read(c.CHUNK)
                if inspect.isawaitable(chunk):
                    chunk = await chunk
                if not chunk:
                    return
                yield chunk.encode("utf-8") if isinstance(chunk, str) else bytes(chunk)

        return gen()
    if hasattr(data, "__aiter__"):
        ait: Any = data

        async def gen_a() -> AsyncGenerator[bytes, None]:
            async for chunk in ait:
                yield chunk.encode("utf-8") if isinstance(chunk, str) else bytes(chunk)

        return gen_a()
    if isinstance(data, Iterable):
        it: Iterable[Any] = data

        async def gen_s() -> AsyncGenerator[bytes, None]:
            for chunk in it:
                yield chunk.encode("utf-8") if isinstance(chunk, str) else bytes(chunk)

        return gen_s()
    raise TypeError(
        "data must be bytes, str, a file object opened for reading, or an (async) iterable of bytes"
    )


async def _call(cb: Optional[AsyncCallback], text: str) -> None:
    if cb is None:
        return
    r = cb(text)
    if inspect.isawaitable(r):
        await r


class AsyncSandbox:
    """A moat sandbox, async. ``async with await AsyncSandbox.create() as sbx:`` or
    ``async with AsyncSandbox.create() as sbx:`` destroys it on exit."""

    id: str
    files: "AsyncFiles"
    processes: "AsyncProcesses"

    def __init__(self, id: str, *, _http: _AsyncHttp, _info: Optional[SandboxInfo] = None):
        self.id = id
        self._http = _http
        self._info = _info
        self._path = "/sandboxes/" + quote(id, safe="")
        self.files = AsyncFiles(self)
        self.processes = AsyncProcesses(self)

    def __repr__(self) -> str:
        return f"AsyncSandbox(id={self.id!r})"

    # -- lifecycle -----------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        policy: Optional[Mapping[str, Any]] = None,
        env: Optional[Mapping[str, str]] = None,
        metadata: Optional[Mapping[str, str]] = None,
        timeout: Optional[int] = None,
        url: Optional[str] = None,
        api_key: Optional[str] = None,
        *,
        tier: Optional[str] = None,
        secrets: Optional[Mapping[str, str]] = None,
    ) -> "_Creating":
        """Creates and starts a sandbox: ``sbx = await AsyncSandbox.create(...)``, or
        ``async with AsyncSandbox.create(...) as sbx:`` (destroyed on exit)."""
        return _Creating(cls._create(policy, env, metadata, timeout, url, api_key, tier, secrets))

    @classmethod
    async def _create(
        cls,
        policy: Optional[Mapping[str, Any]],
        env: Optional[Mapping[str, str]],
        metadata: Optional[Mapping[str, str]],
        timeout: Optional[int],
        url: Optional[str],
        api_key: Optional[str],
        tier: Optional[str],
        secrets: Optional[Mapping[str, str]] = None,
    ) -> "AsyncSandbox":
        http = _AsyncHttp(url, api_key)
        try:
            d = await http.request(
                "POST", "/sandboxes", json=c.create_body(policy, env, metadata, timeout, tier, secrets), long=True
            )
        except BaseException:
            await http.close()
            raise
        info = SandboxInfo.from_json(d)
        return cls(info.id, _http=http, _info=info)

    @classmethod
    async def connect(cls, id: str, url: Optional[str] = None, api_key: Optional[str] = None) -> "AsyncSandbox":
        """Attaches to an existing sandbox by id (NotFoundError when there is none)."""
        http = _AsyncHttp(url, api_key)
        sbx = cls(id, _http=http)
        try:
            sbx._info = SandboxInfo.from_json(await http.request("GET", sbx._path))
        except ForbiddenError:
            pass
        except BaseException:
            await http.close()
            raise
        return sbx

    @classmethod
    async def list(
        cls,
        metadata: Optional[Mapping[str, str]] = None,
        state: Optional[str] = None,
        url: Optional[str] = None,
        api_key: Optional[str] = None,
    ) -> List[SandboxInfo]:
        """The caller's sandboxes, optionally only those in ``state`` and with all of ``metadata``."""
        http = _AsyncHttp(url, api_key)
        try:
            d = await http.request("GET", "/sandboxes", params=c.list_params(metadata, state))
        finally:
            await http.close()
        return [SandboxInfo.from_json(s) for s in d.get("sandboxes", [])]

    async def info(self) -> SandboxInfo:
        self._info = SandboxInfo.from_json(await self._http.request("GET", self._path))
        return self._info

    async def is_running(self) -> bool:
        return (await self.info()).state == "running"

    async def kill(self) -> None:
        """Destroys the sandbox. Killing a sandbox already gone is not an error."""
        try:
            await self._http.request("DELETE", self._path, long=True)
        except NotFoundError:
            pass

    async def set_timeout(self, seconds: int) -> SandboxInfo:
        self._info = SandboxInfo.from_json(
            await self._http.request("POST", self._path + "/timeout", json={"timeout_s": int(seconds)})
        )
        return self._info

    async def pause(self) -> SandboxInfo:
        self._info = SandboxInfo.from_json(await self._http.request("POST", self._path + "/pause"))
        return self._info

    async def resume(self) -> SandboxInfo:
        self._info = SandboxInfo.from_json(await self._http.request("POST", self._path + "/resume"))
        return self._info

    async def metrics(self) -> Metrics:
        return Metrics.from_json(await self._http.request("GET", self._path + "/metrics"))

    async def events(self, since: Optional[int] = None, limit: Optional[int] = None) -> List[Event]:
        d = await self._http.request(
            "GET", self._path + "/events", params=c.events_params(since, limit, False)
        )
        return [Event.from_json(e) for e in d.get("events", [])]

    async def follow_events(self, since: Optional[int] = None) -> AsyncGenerator[Event, None]:
        """Audit events as they happen; break out of the loop to stop."""
        async with self._http.stream(
            "GET", self._path + "/events", params=c.events_params(since, None, True)
        ) as resp:
            parser = c.SSEParser()
            async for line in resp.aiter_lines():
                d = parser.feed(line)
                if d is not None:
                    yield Event.from_json(d)

    async def create_token(self, scopes: Iterable[str], ttl: Optional[int] = None) -> str:
        return (await self.create_token_info(scopes, ttl)).token

    async def create_token_info(self, scopes: Iterable[str], ttl: Optional[int] = None) -> TokenInfo:
        return TokenInfo.from_json(
            await self._http.request("POST", "/tokens", json=c.token_body(self.id, scopes, ttl))
        )

    async def close(self) -> None:
        """Closes this handle's connections (the sandbox keeps running)."""
        await self._http.close()

    async def __aenter__(self) -> "AsyncSandbox":
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        try:
            await self.kill()
        except ForbiddenError:
            pass  # a scoped token may not delete its sandbox: only close the handle
        finally:
            await self.close()

    # -- commands ------------------------------------------------------------------------------

    async def exec(
        self,
        cmd: c.Command = None,
        *,
        shell: Optional[str] = None,
        cwd: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        stdin: c.StdinData = None,
        timeout: Optional[float] = None,
        on_stdout: Optional[AsyncCallback] = None,
        on_stderr: Optional[AsyncCallback] = None,
    ) -> ExecResult:
        """Runs a command and waits for it (see :meth:`moat.Sandbox.exec`); callbacks may be
        plain functions or coroutines."""
        body = c.exec_body(cmd, shell, cwd, env, stdin, timeout)
        if on_stdout is None and on_stderr is None:
            return ExecResult.from_json(
                await self._http.request("POST", self._path + "/exec", json=body, long=True)
            )
        out: List[str] = []
        err: List[str] = []
        async for ev in self._stream(body):
            if ev.type == "stdout":
                out.append(ev.data)
                await _call(on_stdout, ev.data)
            elif ev.type == "stderr":
                err.append(ev.data)
                await _call(on_stderr, ev.data)
            elif ev.type == "exit" and ev.result is not None:
                ev.result.stdout = "".join(out)
                ev.result.stderr = "".join(err)
                return ev.result
        raise MoatError("the output stream ended before the command's exit event")

    def exec_stream(
        self,
        cmd: c.Command = None,
        *,
        shell: Optional[str] = None,
        cwd: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        stdin: c.StdinData = None,
        timeout: Optional[float] = None,
    ) -> AsyncGenerator[ExecEvent, None]:
        """``async for ev in sbx.exec_stream(...)``: ``start``, ``stdout``/``stderr``, ``exit``."""
        return self._stream(c.exec_body(cmd, shell, cwd, env, stdin, timeout))

    async def _stream(self, body: Dict[str, Any]) -> AsyncGenerator[ExecEvent, None]:
        async with self._http.stream(
            "POST", self._path + "/exec", json=body, headers={"Accept": "application/x-ndjson"}
        ) as resp:
            async for d in _ndjson(resp):
                if d.get("type") == "error":
                    raise c.stream_error(d)
                ev = ExecEvent.from_json(d)
                yield ev
                if ev.type == "exit":
                    return
        raise MoatError("the output stream ended before the command's exit event")


class _Creating:
    """What :meth:`AsyncSandbox.create` returns: await it, or use it with ``async with``."""

    def __init__(self, coro: Awaitable[AsyncSandbox]):
        self._coro = coro
        self._sbx: Optional[AsyncSandbox] = None

    def __await__(self) -> Generator[Any, None, AsyncSandbox]:
        return self._coro.__await__()

    async def __aenter__(self) -> AsyncSandbox:
        self._sbx = await self._coro
        return self._sbx

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        if self._sbx is not None:
            await self._sbx.__aexit__(exc_type, exc, tb)


class AsyncProcesses:
    """Background processes of a sandbox: ``sandbox.processes``."""

    def __init__(self, sandbox: AsyncSandbox):
        self._sbx = sandbox

    async def start(
        self,
        cmd: c.Command = None,
        *,
        shell: Optional[str] = None,
        cwd: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        stdin: bool = False,
    ) -> "AsyncProcess":
        body = c.command_body(cmd, shell, cwd, env)
        body["stdin"] = bool(stdin)
        d = await self._sbx._http.request("POST", self._sbx._path + "/processes", json=body)
        info = ProcessInfo.from_json(d)
        return AsyncProcess(self._sbx, info.pid, info)

    async def list(self) -> List[ProcessInfo]:
        d = await self._sbx._http.request("GET", self._sbx._path + "/processes")
        return [ProcessInfo.from_json(p) for p in d.get("processes", [])]

    def get(self, pid: int) -> "AsyncProcess":
        return AsyncProcess(self._sbx, int(pid))


class AsyncProcess:
    """A background process in a sandbox."""

    def __init__(self, sandbox: AsyncSandbox, pid: int, info: Optional[ProcessInfo] = None):
        self.sandbox = sandbox
        self.pid = pid
        self._info = info
        self._path = f"{sandbox._path}/processes/{pid}"

    def __repr__(self) -> str:
        return f"AsyncProcess(pid={self.pid}, sandbox={self.sandbox.id!r})"

    async def info(self) -> ProcessInfo:
        for p in await self.sandbox.processes.list():
            if p.pid == self.pid:
                self._info = p
                return p
        raise NotFoundError(f"no background process {self.pid} in sandbox {self.sandbox.id}", code="not_found")

    async def output(self, follow: bool = True) -> AsyncGenerator[ExecEvent, None]:
        params = {"follow": "1"} if follow else None
        async with self.sandbox._http.stream("GET", self._path + "/output", params=params) as resp:
            async for d in _ndjson(resp):
                kind = d.get("type")
                if kind == "error":
                    raise c.stream_error(d)
                if kind == "end":
                    return
                ev = ExecEvent.from_json(d)
                yield ev
                if kind == "exit":
                    return

    async def wait(self) -> ExecResult:
        out: List[str] = []
        err: List[str] = []
        async for ev in self.output(follow=True):
            if ev.type == "stdout":
                out.append(ev.data)
            elif ev.type == "stderr":
                err.append(ev.data)
            elif ev.type == "exit" and ev.result is not None:
                ev.result.stdout = "".join(out)
                ev.result.stderr = "".join(err)
                return ev.result
        raise MoatError(f"the output of process {self.pid} ended before its exit")

    async def write_stdin(self, data: Union[str, bytes], close: bool = False) -> int:
        raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        params = {"close": "1"} if close else None
        d = await self.sandbox._http.request(
            "POST", self._path + "/stdin", params=params, content=raw, long=True
        )
        return int((d or {}).get("bytes", len(raw)))

    async def close_stdin(self) -> None:
        await self.write_stdin(b"", close=True)

    async def signal(self, sig: SignalLike = 15) -> None:
        await self.sandbox._http.request("POST", self._path + "/signal", json={"signal": _signum(sig)})

    async def kill(self) -> None:
        await self.signal(9)


class AsyncFiles:
    """The sandbox's filesystem: ``sandbox.files``."""

    def __init__(self, sandbox: AsyncSandbox):
        self._sbx = sandbox
        self._path = sandbox._path + "/files"

    @property
    def _http(self) -> _AsyncHttp:
        return self._sbx._http

    async def read(self, path: str) -> bytes:
        async with self._http.stream("GET", self._path, params={"path": path}) as resp:
            return await resp.aread()

    async def read_text(self, path: str, encoding: str = "utf-8", errors: str = "strict") -> str:
        return (await self.read(path)).decode(encoding, errors)

    async def iter_bytes(self, path: str, chunk_size: int = c.CHUNK) -> AsyncGenerator[bytes, None]:
        async with self._http.stream("GET", self._path, params={"path": path}) as resp:
            async for chunk in resp.aiter_bytes(chunk_size):
                yield chunk

    async def write(self, path: str, data: AsyncWriteData, mode: Union[int, str, None] = None) -> int:
        """Writes a file; ``data``: bytes, text, a (sync or async) file object (streamed), or an
        (async) iterable of bytes."""
        params = {"path": path}
        m = c.octal_mode(mode)
        if m is not None:
            params["mode"] = m
        d = await self._http.request("PUT", self._path, params=params, content=_achunks(data), long=True)
        return int(d.get("bytes", 0))

    async def upload(
        self, local_path: Union[str, "os.PathLike[str]"], remote_path: str, mode: Union[int, str, None] = None
    ) -> int:
        with open(local_path, "rb") as f:
            return await self.write(remote_path, f, mode=mode)

    async def download(self, remote_path: str, local_path: Union[str, "os.PathLike[str]"]) -> int:
        local = os.fspath(local_path)
        part = local + ".part"
        n = 0
        try:
            with open(part, "wb") as f:
                async for chunk in self.iter_bytes(remote_path):
                    f.write(chunk)
                    n += len(chunk)
            os.replace(part, local)
        except BaseException:
            try:
                os.unlink(part)
            except OSError:
                pass
            raise
        return n

    async def list(self, path: str, depth: int = 1) -> FileList:
        d = await self._http.request(
            "GET", self._path + "/list", params={"path": path, "depth": str(depth)}
        )
        entries = [FileEntry.from_json(e) for e in d.get("entries", [])]
        return FileList([e for e in entries if c.within_depth(path, e.path, depth)], bool(d.get("truncated")))

    async def stat(self, path: str) -> FileEntry:
        return FileEntry.from_json(await self._http.request("GET", self._path + "/stat", params={"path": path}))

    async def exists(self, path: str) -> bool:
        try:
            await self.stat(path)
            return True
        except NotFoundError:
            return False

    async def mkdir(self, path: str, parents: bool = True) -> None:
        await self._http.request("POST", self._path + "/mkdir", json={"path": path, "parents": parents})

    async def move(self, src: str, dst: str) -> None:
        await self._http.request("POST", self._path + "/move", json={"from": src, "to": dst})

    async def remove(self, path: str, recursive: bool = False) -> None:
        params = {"path": path}
        if recursive:
            params["recursive"] = "1"
        await self._http.request("DELETE", self._path, params=params)
