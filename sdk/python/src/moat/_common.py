"""What the sync and async clients share: configuration, request bodies, answers, errors."""

from __future__ import annotations

import base64
import json
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import httpx

from ._errors import (
    AuthError,
    ConnectionError,
    MoatError,
    TimeoutError,
    TooLargeError,
    error_for,
)

DEFAULT_URL = "http://127.0.0.1:7070"
USER_AGENT = "moat-python/0.1.0"
CHUNK = 1 << 20  # upload / download chunk size
MAX_JSON = 2 << 20  # the daemon's largest JSON request body
# Plain calls: bounded. Calls that run commands or move files: no read timeout (a command may
# run for hours; its own `timeout` bounds it on the server).
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
LONG_TIMEOUT = httpx.Timeout(None, connect=10.0)

Command = Union[str, Sequence[str], None]
StdinData = Union[str, bytes, None]
SCOPES = ("exec", "files:read", "files:write", "read")


def resolve(url: Optional[str], api_key: Optional[str]) -> Tuple[str, str]:
    url = (url or os.environ.get("MOAT_URL") or DEFAULT_URL).rstrip("/")
    key = api_key or os.environ.get("MOAT_API_KEY")
    if not key:
        raise AuthError(
            "no API key: pass api_key=... or set MOAT_API_KEY (the first admin key is in "
            "STATE_DIR/admin.key, e.g. /var/lib/moat/admin.key)",
            code="no_api_key",
        )
    return url, key


def headers(key: str) -> Dict[str, str]:
    return {"Authorization": f"Bearer {key}", "User-Agent": USER_AGENT}


def transport_error(e: Exception, url: str) -> MoatError:
    """The SDK error for an httpx transport failure."""
    if isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout)):
        return ConnectionError(
            f"cannot reach the moat daemon at {url} ({e}): is `moat serve` running? "
            "(set MOAT_URL or pass url=... if it listens elsewhere)",
            code="unreachable",
        )
    if isinstance(e, httpx.TimeoutException):
        return TimeoutError(f"the moat daemon at {url} did not answer in time ({e})", code="timeout")
    return ConnectionError(
        f"the connection to the moat daemon at {url} failed ({type(e).__name__}: {e}): "
        "is `moat serve` still running?",
        code="connection_failed",
    )


def api_error(resp: httpx.Response) -> MoatError:
    """The exception for a non-2xx answer whose body has been read."""
    code: Optional[str] = None
    message = ""
    try:
        body = resp.json()
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            code = err.get("code")
            message = err.get("message") or ""
    except Exception:
        pass
    if not message:
        text = resp.text.strip() if resp.content else ""
        message = text[:500] or f"HTTP {resp.status_code} {resp.reason_phrase}"
    return error_for(resp.status_code, code, message)


def stream_error(d: Mapping[str, Any]) -> MoatError:
    """The exception for an ``{"type":"error"}`` event in a stream."""
    return error_for(None, d.get("code"), d.get("message") or "the stream failed")


def command_body(
    cmd: Command,
    shell: Optional[str],
    cwd: Optional[str],
    env: Optional[Mapping[str, str]],
) -> Dict[str, Any]:
    body: Dict[str, Any] = {}
    if cmd is not None and shell is not None:
        raise ValueError("give either cmd (an argv list) or shell (a command line), not both")
    if isinstance(cmd, str):
        # A string is a command line, like subprocess's shell=True.
        body["shell"] = cmd
    elif cmd is not None:
        argv = [str(a) for a in cmd]
        if not argv:
            raise ValueError("cmd is empty: give an argv list such as ['ls', '-l']")
        body["cmd"] = argv
    elif shell is not None:
        body["shell"] = shell
    else:
        raise ValueError("give cmd (an argv list or a command line) or shell=")
    if cwd is not None:
        body["cwd"] = cwd
    if env:
        body["env"] = {str(k): str(v) for k, v in env.items()}
    return body


def exec_body(
    cmd: Command,
    shell: Optional[str],
    cwd: Optional[str],
    env: Optional[Mapping[str, str]],
    stdin: StdinData,
    timeout: Optional[float],
) -> Dict[str, Any]:
    body = command_body(cmd, shell, cwd, env)
    if isinstance(stdin, str):
        body["stdin"] = stdin
    elif isinstance(stdin, (bytes, bytearray, memoryview)):
        body["stdin_b64"] = base64.b64encode(bytes(stdin)).decode("ascii")
    elif stdin is not None:
        raise TypeError("stdin must be str or bytes")
    if timeout is not None:
        body["timeout_s"] = float(timeout)
    size = len(body.get("stdin", "").encode("utf-8")) + len(body.get("stdin_b64", ""))
    if size > MAX_JSON - 64 * 1024:
        # Refused by the daemon anyway, and before the body is read, which a client still
        # sending it may see as a dropped connection: say so here, and what to do instead.
        raise TooLargeError(
            f"stdin of {size} bytes (as sent) is over the daemon's {MAX_JSON}-byte request limit: "
            "write the input to a file (sandbox.files.write) and redirect it, or start a "
            "background process with stdin=True and send it with write_stdin",
            code="too_large",
        )
    return body


def create_body(
    policy: Optional[Mapping[str, Any]],
    env: Optional[Mapping[str, str]],
    metadata: Optional[Mapping[str, str]],
    timeout: Optional[int],
    tier: Optional[str],
    secrets: Optional[Mapping[str, str]] = None,
) -> Dict[str, Any]:
    body: Dict[str, Any] = {}
    if policy is not None:
        body["policy"] = dict(policy)
    if env:
        body["env"] = {str(k): str(v) for k, v in env.items()}
    if metadata:
        body["metadata"] = {str(k): str(v) for k, v in metadata.items()}
    if timeout is not None:
        body["timeout_s"] = int(timeout)
    if tier is not None:
        body["tier"] = tier
    if secrets:
        body["secrets"] = {str(k): str(v) for k, v in secrets.items()}
    return body


def list_params(metadata: Optional[Mapping[str, str]], state: Optional[str]) -> List[Tuple[str, str]]:
    params: List[Tuple[str, str]] = []
    if state is not None:
        params.append(("state", state))
    for k, v in (metadata or {}).items():
        params.append((f"metadata.{k}", str(v)))
    return params


def token_body(sandbox_id: str, scopes: Iterable[str], ttl: Optional[int]) -> Dict[str, Any]:
    if isinstance(scopes, str):
        scopes = [scopes]
    body: Dict[str, Any] = {"sandbox_id": sandbox_id, "scopes": list(scopes)}
    if ttl is not None:
        body["ttl_s"] = int(ttl)
    return body


def events_params(since: Optional[int], limit: Optional[int], follow: bool) -> Dict[str, str]:
    p: Dict[str, str] = {}
    if since is not None:
        p["since"] = str(since)
    if limit is not None:
        p["limit"] = str(limit)
    if follow:
        p["follow"] = "1"
    return p


def parse_line(line: str) -> Optional[Dict[str, Any]]:
    line = line.strip()
    if not line:
        return None
    try:
        d = json.loads(line)
    except ValueError as e:
        raise MoatError(f"the daemon sent a line that is not JSON: {line[:200]!r} ({e})") from e
    if not isinstance(d, dict):
        raise MoatError(f"the daemon sent a stream line that is not an object: {line[:200]!r}")
    return d


class SSEParser:
    """Turns text/event-stream lines into the JSON objects of their ``data:`` fields."""

    def __init__(self) -> None:
        self._data: List[str] = []

    def feed(self, line: str) -> Optional[Dict[str, Any]]:
        line = line.rstrip("\r\n")
        if line == "":
            if not self._data:
                return None
            text = "\n".join(self._data)
            self._data = []
            return parse_line(text)
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        return None


def octal_mode(mode: Union[int, str, None]) -> Optional[str]:
    if mode is None:
        return None
    if isinstance(mode, int):
        return format(mode, "o").rjust(4, "0")
    return mode


def within_depth(base: str, path: str, depth: int) -> bool:
    """Whether ``path`` is at most ``depth`` levels below ``base`` (1 = a direct child). The
    daemon's listing can go one level deeper than asked; the SDK keeps what was asked for."""
    root = base.rstrip("/")
    if not path.startswith(root + "/"):
        return True
    rel = path[len(root) + 1 :].strip("/")
    return rel.count("/") + 1 <= depth
