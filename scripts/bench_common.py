"""Shared pieces of the benchmark scripts (``bench_crud.py``, ``bench_search.py``):
logging, percentiles, CPU accounting from ``/proc``, server subprocesses on
127.0.0.1 that die with the benchmark, machine description, size parsing and the
event-loop runner. Not a public API; the scripts import it from their own folder.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import logging
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import orjson

HOST = "127.0.0.1"
FHIR_JSON = "application/fhir+json"

try:  # httpcore imports sniffio on every request; a missing module is searched for
    import sniffio  # noqa: F401  # on sys.path each time (~3 ms of client CPU per request)
except ImportError:
    sys.modules["sniffio"] = None  # type: ignore[assignment]  # fail fast: httpcore -> asyncio


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# (LOINC code, display, UCUM unit, mean, sd, decimals, category)
LOINC = [
    ("8867-4", "Heart rate", "/min", 74, 12, 0, "vital-signs"),
    ("8480-6", "Systolic blood pressure", "mm[Hg]", 124, 15, 0, "vital-signs"),
    ("8462-4", "Diastolic blood pressure", "mm[Hg]", 79, 10, 0, "vital-signs"),
    ("8310-5", "Body temperature", "Cel", 36.8, 0.4, 1, "vital-signs"),
    ("29463-7", "Body weight", "kg", 76, 16, 1, "vital-signs"),
    ("8302-2", "Body height", "cm", 171, 10, 1, "vital-signs"),
    (
        "59408-5",
        "Oxygen saturation in Arterial blood by Pulse oximetry",
        "%",
        97,
        1.5,
        0,
        "vital-signs",
    ),
    ("2339-0", "Glucose [Mass/volume] in Blood", "mg/dL", 98, 18, 0, "laboratory"),
    ("718-7", "Hemoglobin [Mass/volume] in Blood", "g/dL", 14, 1.4, 1, "laboratory"),
    (
        "2160-0",
        "Creatinine [Mass/volume] in Serum or Plasma",
        "mg/dL",
        0.95,
        0.2,
        2,
        "laboratory",
    ),
]
CATEGORY_SYSTEM = "http://terminology.hl7.org/CodeSystem/observation-category"


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    k = (len(sorted_values) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def machine_busy_seconds() -> float | None:
    """CPU time all CPUs spent busy since boot (Linux /proc/stat), in seconds."""
    try:
        with open("/proc/stat") as fh:
            fields = fh.readline().split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


def tree_cpu_seconds(root: int) -> float | None:
    """User+system CPU of ``root`` and its live descendants (Linux /proc)."""
    procs: dict[int, tuple[int, int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return None
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                data = fh.read()
        except OSError:
            continue
        rest = data[data.rindex(b")") + 2 :].split()
        procs[int(name)] = (int(rest[1]), int(rest[11]) + int(rest[12]))
    if root not in procs:
        return None
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += procs[pid][1]
        todo.extend(p for p, (ppid, _) in procs.items() if ppid == pid)
    return total / _CLK_TCK


def wait_idle(pid: int, limit: float = 300.0) -> float:
    """Seconds until process ``pid`` (and its children) stays idle for a second (under
    5% of a core), at most ``limit``: for background work a server does after its
    first requests."""
    start = time.perf_counter()
    last = tree_cpu_seconds(pid)
    while last is not None and time.perf_counter() - start < limit:
        time.sleep(1.0)
        now = tree_cpu_seconds(pid)
        if now is None or now - last < 0.05:
            break
        last = now
    return time.perf_counter() - start


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def hie_executable() -> list[str]:
    script = Path(sys.executable).with_name("hie")
    if script.exists():
        return [str(script)]
    found = shutil.which("hie")
    if found:
        return [found]
    return [sys.executable, "-c", "from hie.cli import app; app()"]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any HIE_* settings of the caller, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIE_")}
    env.update(extra)
    return env


def die_with_parent() -> None:
    """In the child before exec: SIGTERM when the benchmark process dies (Linux)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Server:
    """A server subprocess on 127.0.0.1, stopped (and if need be killed) on exit."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], port: int, log_path: Path):
        self.name, self.argv, self.env, self.port, self.log_path = name, argv, env, port, log_path
        self.proc: subprocess.Popen | None = None
        self.url = f"http://{HOST}:{port}"

    def start(self, timeout: float = 60.0) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: Ctrl-C reaches only the bench
            preexec_fn=die_with_parent,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited early:\n{self.tail()}")
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5) as s:
                    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                    if s.recv(64).startswith(b"HTTP/1.1 200"):
                        log(f"{self.name} ready on {self.url} (pid {self.proc.pid})")
                        return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} did not become ready in {timeout}s:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # our own session only
                proc.wait(timeout=5)
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None


def machine_info() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = None
    with contextlib.suppress(OSError), open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) / 1024 / 1024, 1)
                break
    import fastapi
    import httpx
    import starlette
    import uvicorn

    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "ram_gib": mem,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "fastapi": fastapi.__version__,
        "starlette": starlette.__version__,
        "uvicorn": uvicorn.__version__,
        "httpx": httpx.__version__,
        "orjson": orjson.__version__,
        "sqlite": __import__("sqlite3").sqlite_version,
        "event_loop": _loop_name(),
        "hie_revision": _revision(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _revision() -> str:
    """The git commit of the hie package the servers import (``+dirty`` if modified)."""
    import hie

    root = Path(hie.__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "hie"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"unknown ({root})"
    return rev + ("+dirty" if dirty else "")


def _loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def fmt_num(x: float | None, digits: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:,.{digits}f}"


def fmt_ms(x: float) -> str:
    if math.isnan(x):
        return "n/a"
    return f"{x:.3f}" if x < 1 else f"{x:.1f}" if x >= 100 else f"{x:.2f}"


def parse_size(text: str) -> int:
    text = text.strip().lower().replace("_", "")
    mult = 1
    if text.endswith("k"):
        mult, text = 1_000, text[:-1]
    elif text.endswith("m"):
        mult, text = 1_000_000, text[:-1]
    value = int(float(text) * mult)
    if value < 2:
        raise argparse.ArgumentTypeError("sizes must be at least 2")
    return value


def ascending_sizes(text: str) -> list[int]:
    """A ``--sizes`` argument: comma-separated sizes (``1k``, ``10k``, ``1m`` ...),
    ascending (each step adds to the data of the one before)."""
    sizes = [parse_size(s) for s in text.split(",") if s.strip()]
    if not sizes or sizes != sorted(sizes):
        raise argparse.ArgumentTypeError("sizes must be given in ascending order")
    return sizes


def run_async(main: Awaitable[Any]) -> Any:
    """Run a coroutine on uvloop when installed (as uvicorn does), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


async def mark_index_current(service) -> None:
    """Mark the store's search index current for ``service``'s registry, as a server does
    after reindexing (it would otherwise reindex at start): for loaders that wrote the
    index rows with that registry themselves."""

    async def nothing(types) -> int:
        return 0

    service.engine.reindex = nothing
    quiet = logging.getLogger("hie")
    level, quiet.level = quiet.level, logging.ERROR  # its "reindexing" warning
    try:
        await service.refresh_index()
    finally:
        quiet.setLevel(level)
