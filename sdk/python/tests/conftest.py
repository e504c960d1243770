"""A real `moat serve` for the whole session: $MOAT_BIN, a temp state dir, a free port."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Iterator

import httpx
import pytest

from moat import Sandbox


@dataclass
class Server:
    url: str
    key: str
    state: str
    log: str
    proc: "subprocess.Popen[bytes]"

    def log_text(self) -> str:
        try:
            with open(self.log, "r", errors="replace") as f:
                return f.read()
        except OSError:
            return ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _moat_bin() -> str:
    b = os.environ.get("MOAT_BIN") or shutil.which("moat")
    if not b or not os.access(b, os.X_OK):
        pytest.exit("set MOAT_BIN to the moat binary (cargo build -p moat)", returncode=2)
    return b


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    moat_bin = _moat_bin()
    top = tempfile.mkdtemp(prefix="moat-py-")
    state = os.path.join(top, "state")
    log = os.path.join(top, "serve.log")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [moat_bin, "serve", "--listen", f"127.0.0.1:{port}", "--state-dir", state],
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
        )
    srv = Server(url=url, key="", state=state, log=log, proc=proc)
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(url + "/v1/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            pytest.exit(f"moat serve exited at start ({proc.returncode}):\n{srv.log_text()}", returncode=3)
        if time.monotonic() > deadline:
            proc.kill()
            pytest.exit(f"moat serve did not answer /v1/health in 30 s:\n{srv.log_text()}", returncode=3)
        time.sleep(0.05)
    with open(os.path.join(state, "admin.key")) as f:
        srv.key = f.read().strip()
    saved = {k: os.environ.get(k) for k in ("MOAT_URL", "MOAT_API_KEY")}
    os.environ["MOAT_URL"] = url
    os.environ["MOAT_API_KEY"] = srv.key
    try:
        yield srv
    finally:
        # Sandboxes outlive the daemon by design: delete every one before stopping it, and
        # fail the session if a test left one behind.
        left = []
        try:
            left = Sandbox.list(url=url, api_key=srv.key)
            for info in left:
                Sandbox.connect(info.id, url=url, api_key=srv.key).kill()
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            shutil.rmtree(top, ignore_errors=True)
        if left:
            raise AssertionError(f"tests left sandboxes behind (now deleted): {[s.id for s in left]}")


@pytest.fixture
def sbx(server: Server) -> Iterator[Sandbox]:
    with Sandbox.create(metadata={"suite": "python"}) as s:
        yield s


@pytest.fixture
def label() -> str:
    return uuid.uuid4().hex[:12]


def sandbox_pid(events: list) -> int:  # type: ignore[type-arg]
    """The sandbox's init (its agent) as its sandbox_created audit event records it."""
    for e in events:
        if e.kind == "sandbox_created":
            return int(e.data["pid"])
    raise AssertionError("no sandbox_created event")


def kill_agent(pid: int) -> None:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        name = f.read().split(b"\0")[0]
    # In the gvisor tier the sandbox's pid is its sentry (runsc-sandbox), whose death takes
    # the agent inside with it; in the native tier it is the agent itself.
    want = b"runsc-sandbox" if os.environ.get("MOAT_TIER") == "gvisor" else b"moat-agent"
    assert name == want, "the pid is not the sandbox's agent"
    os.kill(pid, signal.SIGKILL)
