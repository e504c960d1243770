"""moat: self-hosted sandboxes for code that AI agents write.

    from moat import Sandbox

    with Sandbox.create() as sbx:
        print(sbx.exec("echo hello").stdout)
"""

from ._async import AsyncFiles, AsyncProcess, AsyncProcesses, AsyncSandbox
from ._errors import (
    AuthError,
    ConflictError,
    ConnectionError,
    ForbiddenError,
    InvalidRequestError,
    MoatError,
    NotFoundError,
    ServerError,
    TimeoutError,
    TooLargeError,
)
from ._sync import Files, Process, Processes, Sandbox
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
    Truncated,
)

__version__ = "0.1.0"

__all__ = [
    "Sandbox",
    "AsyncSandbox",
    "Files",
    "AsyncFiles",
    "Process",
    "AsyncProcess",
    "Processes",
    "AsyncProcesses",
    "ExecResult",
    "ExecEvent",
    "Truncated",
    "SandboxInfo",
    "ProcessInfo",
    "FileEntry",
    "FileList",
    "Metrics",
    "Event",
    "TokenInfo",
    "MoatError",
    "AuthError",
    "ForbiddenError",
    "NotFoundError",
    "ConflictError",
    "InvalidRequestError",
    "TooLargeError",
    "ServerError",
    "ConnectionError",
    "TimeoutError",
]
