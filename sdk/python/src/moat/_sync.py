"""The synchronous client: :class:`Sandbox`."""

from __future__ import annotations

import os
import signal as _signal
from contextlib import contextmanager
from types import TracebackType
from typing import (
    IO,
    Any,
    Callable,
    Dict,
    Generator,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Type,
    Union,
)
from urllib.parse import quote

import httpx

from . import _common as c
from ._errors import ForbiddenError, MoatError
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

__all__ = ["Sandbox", "Files", "Processes", "Process"]

WriteData = Union[str, bytes, bytearray, memoryview, IO[bytes], IO[str], Iterable[bytes]]
Callback = Callable[[str], Any]
SignalLike = Union[int, str, _signal.Signals]


class _Http:
    """One HTTP connection pool to the daemon, with the SDK's error mapping."""

    def __init__(self, url: Optional[str], api_key: Optional[str]):
        self.url, self.key = c.resolve(url, api_key)
        self.client = httpx.Client(
            base_url=self.url + "/v1", headers=c.headers(self.key), timeout=c.DEFAULT_TIMEOUT
        )

    def close(self) -> None:
        self.client.close()

    def request(
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
            resp = self.client.request(
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

    @contextmanager
    def stream(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Any = None,
        headers: Optional[Dict[str, str]] = None,
    ) -> Iterator[httpx.Response]:
        try:
            with self.client.stream(
                method, path, json=json, params=params, headers=headers, timeout=c.LONG_TIMEOUT
            ) as resp:
                if not resp.is_success:
                    resp.read()
                    raise c.api_error(resp)
                yield resp
        except httpx.TransportError as e:
            raise c.transport_error(e, self.url) from e


def _ndjson(resp: httpx.Response) -> Iterator[Dict[str, Any]]:
    for line in resp.iter_lines():
        d = c.parse_line(line)
        if d is not None:
            yield d


def _signum(sig: SignalLike) -> int:
    if isinstance(sig, str):
        name = sig.upper()
        if not name.startswith("SIG"):
            name = "SIG" + name
        return int(_signal.Signals[name])
    return int(sig)


def _chunks(data: WriteData) -> Union[bytes, Iterator[bytes]]:
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    if hasattr(data, "read"):
        f: Any = data

        def gen() -> Generator[bytes, None, None]:
            while True:
                chunk = f.read(c.CHUNK)
                if not chunk:
                    return
                yield chunk.encode("utf-8") if isinstance(chunk, str) else bytes(chunk)

        return gen()
    if isinstance(data, Iterable):
        it: Iterable[Any] = data

        def gen2() -> Generator[bytes, None, None]:
            for chunk in it:
                yield chunk.encode("utf-8") if isinstance(chunk, str) else bytes(chunk)

        return gen2()
    raise TypeError("data must be bytes, str, a file object opened for reading, or an iterable of bytes")


class Sandbox:
    """A moat sandbox: an isolated Linux environment that lives until killed or its timeout.

    Create one with :meth:`create` (a context manager: it is destroyed on exit), or attach to
    an existing one with :meth:`connect`. The daemon's address and key come from ``url`` /
    ``api_key`` or the ``MOAT_URL`` / ``MOAT_API_KEY`` environment variables.
    """

    id: str
    files: "Files"
    processes: "Processes"

    def __init__(self, id: str, *, _http: "_Http", _info: Optional[SandboxInfo] = None):
        self.id = id
        self._http = _http
        self._info = _info
        self._path = "/sandboxes/" + quote(id, safe="")
        self.files = Files(self)
        self.processes = Processes(self)

    def __repr__(self) -> str:
        return f"Sandbox(id={self.id!r})"

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
    ) -> "Sandbox":
        """Creates and starts a sandbox.

        ``policy``: the TOML policy's fields as a dict (e.g. ``{"limits": {"memory": "512M"}}``);
        ``env``: variables every command gets; ``metadata``: your labels (filter :meth:`list`
        by them); ``timeout``: seconds it lives (the server's default and cap apply);
        ``secrets``: values of the secrets the policy binds to hosts (``network.secrets``): the
        sandbox sees placeholders, the egress proxy sends the values to those hosts only.
        """
        http = _Http(url, api_key)
        try:
            d = http.request("POST", "/sandboxes", json=c.create_body(policy, env, metadata, timeout, tier, secrets), long=True)
        except BaseException:
            http.close()
            raise
        info = SandboxInfo.from_json(d)
        return cls(info.id, _http=http, _info=info)

    @classmethod
    def connect(cls, id: str, url: Optional[str] = None, api_key: Optional[str] = None) -> "Sandbox":
        """Attaches to an existing sandbox by id (raises NotFoundError when there is none).

        With a scoped token that lacks the ``read`` scope the sandbox cannot be looked up; the
        handle is returned anyway and the calls its scopes allow work.
        """
        http = _Http(url, api_key)
        sbx = cls(id, _http=http)
        try:
            sbx._info = SandboxInfo.from_json(http.request("GET", sbx._path))
        except ForbiddenError:
            pass
        except BaseException:
            http.close()
            raise
        return sbx

    @classmethod
    def list(
        cls,
        metadata: Optional[Mapping[str, str]] = None,
        state: Optional[str] = None,
        url: Optional[str] = None,
        api_key: Optional[str] = None,
    ) -> List[SandboxInfo]:
        """The caller's sandboxes, optionally only those in ``state`` and with all of ``metadata``."""
        http = _Http(url, api_key)
        try:
            d = http.request("GET", "/sandboxes", params=c.list_params(metadata, state))
        finally:
            http.close()
        return [SandboxInfo.from_json(s) for s in d.get("sandboxes", [])]

    def info(self) -> SandboxInfo:
        """The sandbox as the daemon sees it now (state, expiry, metadata)."""
        self._info = SandboxInfo.from_json(self._http.request("GET", self._path))
        return self._info

    @property
    def metadata(self) -> Dict[str, str]:
        """The metadata given at creation."""
        return dict((self._info or self.info()).metadata)

    def is_running(self) -> bool:
        return self.info().state == "running"

    def kill(self) -> None:
        """Destroys the sandbox and everything in it. Killing a sandbox already gone is not an error."""
        from ._errors import NotFoundError

        try:
            self._http.request("DELETE", self._path, long=True)
        except NotFoundError:
            pass

    def set_timeout(self, seconds: int) -> SandboxInfo:
        """Makes the sandbox expire ``seconds`` from now (capped by the server's maximum)."""
        self._info = SandboxInfo.from_json(
            self._http.request("POST", self._path + "/timeout", json={"timeout_s": int(seconds)})
        )
        return self._info

    def pause(self) -> SandboxInfo:
        """Freezes every process in the sandbox; exec and files answer ConflictError(sandbox_paused)."""
        self._info = SandboxInfo.from_json(self._http.request("POST", self._path + "/pause"))
        return self._info

    def resume(self) -> SandboxInfo:
        """Thaws a paused sandbox."""
        self._info = SandboxInfo.from_json(self._http.request("POST", self._path + "/resume"))
        return self._info

    def metrics(self) -> Metrics:
        """CPU time, memory, process count and disk use now."""
        return Metrics.from_json(self._http.request("GET", self._path + "/metrics"))

    def events(self, since: Optional[int] = None, limit: Optional[int] = None) -> List[Event]:
        """The sandbox's audit events (after sequence number ``since``)."""
        d = self._http.request("GET", self._path + "/events", params=c.events_params(since, limit, False))
        return [Event.from_json(e) for e in d.get("events", [])]

    def follow_events(self, since: Optional[int] = None) -> Generator[Event, None, None]:
        """The sandbox's audit events as they happen (history past ``since`` first); never ends
        by itself: break out of the loop to stop."""
        with self._http.stream("GET", self._path + "/events", params=c.events_params(since, None, True)) as resp:
            parser = c.SSEParser()
            for line in resp.iter_lines():
                d = parser.feed(line)
                if d is not None:
                    yield Event.from_json(d)

    def create_token(self, scopes: Iterable[str], ttl: Optional[int] = None) -> str:
        """A token limited to this sandbox and ``scopes`` (``exec``, ``files:read``,
        ``files:write``, ``read``), valid ``ttl`` seconds (default 900). Use it as ``api_key``."""
        return self.create_token_info(scopes, ttl).token

    def create_token_info(self, scopes: Iterable[str], ttl: Optional[int] = None) -> TokenInfo:
        """Like :meth:`create_token`, with the token's id, scopes and expiry."""
        return TokenInfo.from_json(self._http.request("POST", "/tokens", json=c.token_body(self.id, scopes, ttl)))

    def close(self) -> None:
        """Closes this handle's connections (the sandbox keeps running)."""
        self._http.close()

    def __enter__(self) -> "Sandbox":
        """``with Sandbox.create() as sbx:`` kills the sandbox when the block ends (a handle
        made with a scoped token, which may not delete it, is only closed)."""
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        try:
            self.kill()
        except ForbiddenError:
            pass  # a scoped token may not delete its sandbox: only close the handle
        finally:
            self.close()

    # -- commands ------------------------------------------------------------------------------

    def exec(
        self,
        cmd: c.Command = None,
        *,
        shell: Optional[str] = None,
        cwd: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        stdin: c.StdinData = None,
        timeout: Optional[float] = None,
        on_stdout: Optional[Callback] = None,
        on_stderr: Optional[Callback] = None,
    ) -> ExecResult:
        """Runs a command and waits for it.

        ``cmd`` is an argv list (``["ls", "-l"]``) or a command line for ``/bin/sh -c``
        (a string, the same as ``shell=``). ``stdin``: text or bytes. ``timeout``: seconds
        (the sandbox is killed when it fires: ``status == "timeout"``). With ``on_stdout`` /
        ``on_stderr`` the output is streamed to them as it comes (and still returned).
        """
        body = c.exec_body(cmd, shell, cwd, env, stdin, timeout)
        if on_stdout is None and on_stderr is None:
            return ExecResult.from_json(self._http.request("POST", self._path + "/exec", json=body, long=True))
        out: List[str] = []
        err: List[str] = []
        for ev in self._stream(body):
            if ev.type == "stdout":
                out.append(ev.data)
                if on_stdout is not None:
                    on_stdout(ev.data)
            elif ev.type == "stderr":
                err.append(ev.data)
                if on_stderr is not None:
                    on_stderr(ev.data)
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
    ) -> Generator[ExecEvent, None, None]:
        """Runs a command and yields its events as they happen: ``start``, ``stdout`` /
        ``stderr`` chunks, and last ``exit`` (with the result)."""
        return self._stream(c.exec_body(cmd, shell, cwd, env, stdin, timeout))

    def _stream(self, body: Dict[str, Any]) -> Generator[ExecEvent, None, None]:
        with self._http.stream(
            "POST", self._path + "/exec", json=body, headers={"Accept": "application/x-ndjson"}
        ) as resp:
            for d in _ndjson(resp):
                if d.get("type") == "error":
                    raise c.stream_error(d)
                ev = ExecEvent.from_json(d)
                yield ev
                if ev.type == "exit":
                    return
        raise MoatError("the output stream ended before the command's exit event")


class Processes:
    """Background processes of a sandbox: ``sandbox.processes``."""

    def __init__(self, sandbox: Sandbox):
        self._sbx = sandbox

    def start(
        self,
        cmd: c.Command = None,
        *,
        shell: Optional[str] = None,
        cwd: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        stdin: bool = False,
    ) -> "Process":
        """Starts a command in the background; ``stdin=True`` keeps its stdin open for
        :meth:`Process.write_stdin`. It runs until it exits, is signalled, or the sandbox ends."""
        body = c.command_body(cmd, shell, cwd, env)
        body["stdin"] = bool(stdin)
        d = self._sbx._http.request("POST", self._sbx._path + "/processes", json=body)
        info = ProcessInfo.from_json(d)
        return Process(self._sbx, info.pid, info)

    def list(self) -> List[ProcessInfo]:
        """The sandbox's background processes, running and finished."""
        d = self._sbx._http.request("GET", self._sbx._path + "/processes")
        return [ProcessInfo.from_json(p) for p in d.get("processes", [])]

    def get(self, pid: int) -> "Process":
        """A handle on a background process by pid."""
        return Process(self._sbx, int(pid))


class Process:
    """A background process in a sandbox."""

    def __init__(self, sandbox: Sandbox, pid: int, info: Optional[ProcessInfo] = None):
        self.sandbox = sandbox
        self.pid = pid
        self._info = info
        self._path = f"{sandbox._path}/processes/{pid}"

    def __repr__(self) -> str:
        return f"Process(pid={self.pid}, sandbox={self.sandbox.id!r})"

    def info(self) -> ProcessInfo:
        """The process's state now (running, exit code)."""
        for p in self.sandbox.processes.list():
            if p.pid == self.pid:
                self._info = p
                return p
        from ._errors import NotFoundError

        raise NotFoundError(f"no background process {self.pid} in sandbox {self.sandbox.id}", code="not_found")

    def output(self, follow: bool = True) -> Generator[ExecEvent, None, None]:
        """Its output so far (``stdout`` / ``stderr`` events) and, with ``follow``, everything
        until it exits; the last event is ``exit`` once it ended."""
        params = {"follow": "1"} if follow else None
        with self.sandbox._http.stream("GET", self._path + "/output", params=params) as resp:
            for d in _ndjson(resp):
                kind = d.get("type")
                if kind == "error":
                    raise c.stream_error(d)
                if kind == "end":
                    return
                ev = ExecEvent.from_json(d)
                yield ev
                if kind == "exit":
                    return

    def wait(self) -> ExecResult:
        """Waits for the process to end; its whole output and how it ended."""
        out: List[str] = []
        err: List[str] = []
        for ev in self.output(follow=True):
            if ev.type == "stdout":
                out.append(ev.data)
            elif ev.type == "stderr":
                err.append(ev.data)
            elif ev.type == "exit" and ev.result is not None:
                ev.result.stdout = "".join(out)
                ev.result.stderr = "".join(err)
                return ev.result
        raise MoatError(f"the output of process {self.pid} ended before its exit")

    def write_stdin(self, data: Union[str, bytes], close: bool = False) -> int:
        """Writes to the process's stdin (it was started with ``stdin=True``); ``close`` then
        closes it (EOF). Returns the bytes taken."""
        raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        params = {"close": "1"} if close else None
        d = self.sandbox._http.request("POST", self._path + "/stdin", params=params, content=raw, long=True)
        return int((d or {}).get("bytes", len(raw)))

    def close_stdin(self) -> None:
        """Closes the process's stdin (EOF)."""
        self.write_stdin(b"", close=True)

    def signal(self, sig: SignalLike = _signal.SIGTERM) -> None:
        """Sends a signal (a number, ``signal.SIGINT``, or a name such as ``"TERM"``)."""
        self.sandbox._http.request("POST", self._path + "/signal", json={"signal": _signum(sig)})

    def kill(self) -> None:
        """Sends SIGKILL."""
        self.signal(_signal.SIGKILL)


class Files:
    """The sandbox's filesystem: ``sandbox.files``. Paths are absolute paths inside the sandbox."""

    def __init__(self, sandbox: Sandbox):
        self._sbx = sandbox
        self._path = sandbox._path + "/files"

    @property
    def _http(self) -> _Http:
        return self._sbx._http

    def read(self, path: str) -> bytes:
        """A file's bytes (read whole: use :meth:`download` or :meth:`iter_bytes` for big files)."""
        with self._http.stream("GET", self._path, params={"path": path}) as resp:
            return resp.read()

    def read_text(self, path: str, encoding: str = "utf-8", errors: str = "strict") -> str:
        """A file's text."""
        return self.read(path).decode(encoding, errors)

    def iter_bytes(self, path: str, chunk_size: int = c.CHUNK) -> Generator[bytes, None, None]:
        """A file's bytes in chunks, as they arrive."""
        with self._http.stream("GET", self._path, params={"path": path}) as resp:
            yield from resp.iter_bytes(chunk_size)

    def write(self, path: str, data: WriteData, mode: Union[int, str, None] = None) -> int:
        """Writes a file (parents are created), replacing it. ``data``: bytes, text (UTF-8),
        a file object (streamed in chunks) or an iterable of bytes. ``mode`` e.g. ``0o755``.
        Returns the bytes written."""
        params = {"path": path}
        m = c.octal_mode(mode)
        if m is not None:
            params["mode"] = m
        d = self._http.request("PUT", self._path, params=params, content=_chunks(data), long=True)
        return int(d.get("bytes", 0))

    def upload(self, local_path: Union[str, "os.PathLike[str]"], remote_path: str, mode: Union[int, str, None] = None) -> int:
        """Streams a local file into the sandbox. Returns the bytes written."""
        with open(local_path, "rb") as f:
            return self.write(remote_path, f, mode=mode)

    def download(self, remote_path: str, local_path: Union[str, "os.PathLike[str]"]) -> int:
        """Streams a file out of the sandbox to ``local_path`` (replaced only once complete).
        Returns the bytes written."""
        local = os.fspath(local_path)
        part = local + ".part"
        n = 0
        try:
            with open(part, "wb") as f:
                for chunk in self.iter_bytes(remote_path):
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

    def list(self, path: str, depth: int = 1) -> FileList:
        """A directory's entries, ``depth`` levels down (1-16)."""
        d = self._http.request("GET", self._path + "/list", params={"path": path, "depth": str(depth)})
        entries = [FileEntry.from_json(e) for e in d.get("entries", [])]
        return FileList([e for e in entries if c.within_depth(path, e.path, depth)], bool(d.get("truncated")))

    def stat(self, path: str) -> FileEntry:
        """One entry (NotFoundError when missing)."""
        return FileEntry.from_json(self._http.request("GET", self._path + "/stat", params={"path": path}))

    def exists(self, path: str) -> bool:
        from ._errors import NotFoundError

        try:
            self.stat(path)
            return True
        except NotFoundError:
            return False

    def mkdir(self, path: str, parents: bool = True) -> None:
        """Creates a directory (and its parents, unless ``parents=False``)."""
        self._http.request("POST", self._path + "/mkdir", json={"path": path, "parents": parents})

    def move(self, src: str, dst: str) -> None:
        """Renames ``src`` to ``dst``."""
        self._http.request("POST", self._path + "/move", json={"from": src, "to": dst})

    def remove(self, path: str, recursive: bool = False) -> None:
        """Removes a file, or a directory (a non-empty one only with ``recursive``)."""
        params = {"path": path}
        if recursive:
            params["recursive"] = "1"
        self._http.request("DELETE", self._path, params=params)
