"""The API's objects as dataclasses."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

__all__ = [
    "SandboxInfo",
    "ExecResult",
    "Truncated",
    "ExecEvent",
    "ProcessInfo",
    "FileEntry",
    "FileList",
    "Metrics",
    "Event",
    "TokenInfo",
]


@dataclass(frozen=True)
class SandboxInfo:
    """A sandbox as the API describes it. Times are milliseconds since the Unix epoch."""

    id: str
    state: str
    tier: str
    created_at: int
    expires_at: int
    metadata: Dict[str, str]
    error: Optional[str] = None

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "SandboxInfo":
        return cls(
            id=d["id"],
            state=d.get("state", ""),
            tier=d.get("tier", ""),
            created_at=int(d.get("created_at") or 0),
            expires_at=int(d.get("expires_at") or 0),
            metadata=dict(d.get("metadata") or {}),
            error=d.get("error"),
        )


@dataclass(frozen=True)
class Truncated:
    """Which streams went over the sandbox's output cap."""

    stdout: bool = False
    stderr: bool = False

    def __bool__(self) -> bool:
        return self.stdout or self.stderr

    @classmethod
    def from_json(cls, d: Any) -> "Truncated":
        if not isinstance(d, dict):
            return cls()
        return cls(stdout=bool(d.get("stdout")), stderr=bool(d.get("stderr")))


@dataclass
class ExecResult:
    """How a command ended: the same object as ``moat run --json``.

    ``status`` is ``ok`` (ran to its end, whatever its exit code), ``timeout``, ``oom``,
    ``output_limit``, ``killed``, ``policy_denied`` or ``error``.
    """

    stdout: str
    stderr: str
    exit_code: Optional[int]
    signal: Optional[int]
    status: str
    wall_ms: int = 0
    truncated: Truncated = field(default_factory=Truncated)
    message: Optional[str] = None
    cpu_ms: int = 0
    max_rss_kb: int = 0
    sandbox: Dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when the command ran to its end and exited 0."""
        return self.status == "ok" and self.exit_code == 0

    @classmethod
    def from_json(cls, d: Dict[str, Any], stdout: str = "", stderr: str = "") -> "ExecResult":
        return cls(
            stdout=d.get("stdout", stdout),
            stderr=d.get("stderr", stderr),
            exit_code=d.get("exit_code"),
            signal=d.get("signal"),
            status=d.get("status") or "error",
            wall_ms=int(d.get("wall_ms") or 0),
            truncated=Truncated.from_json(d.get("truncated")),
            message=d.get("message"),
            cpu_ms=int(d.get("cpu_ms") or 0),
            max_rss_kb=int(d.get("max_rss_kb") or 0),
            sandbox=dict(d.get("sandbox") or {}),
        )


@dataclass(frozen=True)
class ExecEvent:
    """One event of a streamed command or a background process's output.

    ``type`` is ``start`` (``pid`` set), ``stdout`` / ``stderr`` (``data`` the text, ``raw`` the
    bytes), or ``exit`` (``result`` set; its stdout/stderr are empty: they came as events).
    """

    type: str
    data: str = ""
    raw: bytes = b""
    pid: Optional[int] = None
    result: Optional[ExecResult] = None

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "ExecEvent":
        kind = d.get("type", "")
        if kind in ("stdout", "stderr"):
            if "data_b64" in d:
                raw = base64.b64decode(d["data_b64"])
                return cls(type=kind, data=raw.decode("utf-8", errors="replace"), raw=raw)
            text = d.get("data", "")
            return cls(type=kind, data=text, raw=text.encode("utf-8"))
        if kind == "start":
            return cls(type=kind, pid=d.get("pid"))
        if kind == "exit":
            return cls(type=kind, result=ExecResult.from_json(d))
        return cls(type=kind)


@dataclass(frozen=True)
class ProcessInfo:
    """A background process. ``status`` and ``exit_code`` are set once it ended."""

    pid: int
    argv: List[str]
    running: bool
    exit_code: Optional[int]
    signal: Optional[int]
    status: Optional[str]
    started_at: Optional[int]
    finished_at: Optional[int]

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "ProcessInfo":
        return cls(
            pid=int(d["pid"]),
            argv=list(d.get("argv") or []),
            running=bool(d.get("running")),
            exit_code=d.get("exit_code"),
            signal=d.get("signal"),
            status=d.get("status"),
            started_at=d.get("started_at"),
            finished_at=d.get("finished_at"),
        )


@dataclass(frozen=True)
class FileEntry:
    """A file, directory, symlink or other entry. ``kind`` is ``file|dir|symlink|other``."""

    path: str
    kind: str
    size: int
    mode: int
    mtime_ms: int

    @property
    def is_dir(self) -> bool:
        return self.kind == "dir"

    @property
    def is_file(self) -> bool:
        return self.kind == "file"

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "FileEntry":
        return cls(
            path=d["path"],
            kind=d.get("kind", "other"),
            size=int(d.get("size") or 0),
            mode=int(d.get("mode") or 0),
            mtime_ms=int(d.get("mtime_ms") or 0),
        )


class FileList(List[FileEntry]):
    """A directory listing: a list of entries; ``truncated`` is True when the server cut it short."""

    truncated: bool

    def __init__(self, entries: List[FileEntry], truncated: bool = False):
        super().__init__(entries)
        self.truncated = truncated


@dataclass(frozen=True)
class Metrics:
    """A sandbox's resource use now. ``disk_bytes`` is None when it could not be measured."""

    cpu_ms: Optional[int]
    memory_bytes: Optional[int]
    pids: Optional[int]
    disk_bytes: Optional[int]

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "Metrics":
        return cls(
            cpu_ms=d.get("cpu_ms"),
            memory_bytes=d.get("memory_bytes"),
            pids=d.get("pids"),
            disk_bytes=d.get("disk_bytes"),
        )


@dataclass(frozen=True)
class Event:
    """An audit event (``kind`` e.g. ``sandbox_created``, ``exec_finished``, ``file_write``)."""

    seq: int
    ts: int
    key_id: Optional[str]
    sandbox_id: Optional[str]
    kind: str
    data: Any

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "Event":
        return cls(
            seq=int(d.get("seq") or 0),
            ts=int(d.get("ts") or 0),
            key_id=d.get("key_id"),
            sandbox_id=d.get("sandbox_id"),
            kind=d.get("kind", ""),
            data=d.get("data"),
        )


@dataclass(frozen=True)
class TokenInfo:
    """A scoped token as created: ``token`` is the secret (use it as an api_key)."""

    id: str
    token: str
    sandbox_id: str
    scopes: List[str]
    expires_at: int

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "TokenInfo":
        return cls(
            id=d.get("id", ""),
            token=d["token"],
            sandbox_id=d.get("sandbox_id", ""),
            scopes=list(d.get("scopes") or []),
            expires_at=int(d.get("expires_at") or 0),
        )
