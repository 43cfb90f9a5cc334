"""A real ``hie serve`` process for tests that need one (durability, concurrency).

One implementation, used by every test that starts the server: :func:`hie_command`
finds the console script of this interpreter's environment, :func:`mint_token` runs
``hie token`` and :class:`HieServer` starts ``hie serve`` on the embedded store in a
data directory, waits until it answers, and stops it gracefully (SIGTERM) or kills it
(SIGKILL). :func:`running_server` wraps that in a context manager.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

STARTUP_TIMEOUT = 30.0


def hie_command() -> list[str]:
    """The ``hie`` console script installed beside this interpreter (else on PATH)."""
    beside = Path(sys.executable).parent / "hie"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("hie")
    if found:
        return [found]
    return [sys.executable, "-c", "from hie.cli import app; app()"]


def server_env(**extra: str) -> dict[str, str]:
    """The environment of a test server: no ``HIE_*`` leaking in from outside,
    authentication on, the embedded store."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIE_")}
    env["HIE_AUTH"] = "on"
    env.update(extra)
    return env


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mint_token(data_dir: Path, scope: str = "system/*.cruds") -> str:
    """A token from ``hie token --data-dir`` (creating the signing key if needed)."""
    out = subprocess.run(
        [*hie_command(), "token", "--data-dir", str(data_dir), "--scope", scope],
        env=server_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    token = out.stdout.strip()
    assert token.count(".") == 2, f"hie token printed no JWT: {out.stdout!r} {out.stderr!r}"
    return token


class HieServer:
    """``hie serve --data-dir D`` on a free port of 127.0.0.1."""

    def __init__(self, data_dir: Path, token: str, **env: str):
        self.data_dir = Path(data_dir)
        self.token = token
        self.env = server_env(**env)
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log = self.data_dir / "server.log"

    @property
    def url(self) -> str:
        """The FHIR base URL."""
        return f"http://127.0.0.1:{self.port}/fhir"

    @property
    def headers(self) -> dict[str, str]:
        """Headers of an authorised FHIR JSON request."""
        return {
            "Authorization": f"Bearer {self.token}",
            "Content-Type": "application/fhir+json",
            "Accept": "application/fhir+json",
        }

    def client(self, **kwargs) -> httpx.Client:
        """A synchronous client on the base URL with the token."""
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=120, **kwargs)

    def async_client(self, **kwargs) -> httpx.AsyncClient:
        """An asynchronous client on the base URL with the token."""
        return httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=120, **kwargs)

    def start(self) -> HieServer:
        """Start and wait until ``/healthz`` answers (retrying on a port taken meanwhile)."""
        assert self.proc is None, "already running"
        for _ in range(3):
            self.port = free_port()
            cmd = [
                *hie_command(),
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--data-dir",
                str(self.data_dir),
            ]
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=log)
            if self._wait_ready():
                return self
            self.proc.kill()
            self.proc.wait()
            self.proc = None
        raise RuntimeError(f"hie serve did not start:\n{self.log.read_text(errors='replace')}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1).is_success:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        return False

    def stop(self, timeout: float = 30) -> int:
        """Graceful shutdown (SIGTERM, as a process manager would); the exit code."""
        assert self.proc is not None, "not running"
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        return code

    def kill(self) -> None:
        """``kill -9``: no shutdown code runs."""
        assert self.proc is not None, "not running"
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def close(self) -> None:
        """Stop if still running (for cleanup)."""
        if self.proc is not None:
            with contextlib.suppress(Exception):
                self.stop(timeout=10)


@contextlib.contextmanager
def running_server(data_dir: Path, token: str | None = None, **env: str) -> Iterator[HieServer]:
    """A started :class:`HieServer` (token minted with ``hie token`` when not given),
    stopped at the end."""
    server = HieServer(data_dir, token or mint_token(data_dir), **env)
    server.start()
    try:
        yield server
    finally:
        server.close()
