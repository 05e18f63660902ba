"""A server as a child process for the benchmarks: start it with its output in a log file, wait
until its /health is 200, stop it afterwards.

The wait never outlasts the child: a child that exits, or a kvserve that reports a fatal
/health ("status": "error", e.g. a model that cannot load), ends the wait at once with an error
that quotes the last lines of its log; so does the startup bound (--startup-timeout).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from kvserve.config import ConfigError

STARTUP_TIMEOUT_S = 300.0
LOG_TAIL_LINES = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    tail = text.strip().splitlines()[-lines:]
    return "\n".join("    " + line for line in tail) if tail else "    (the log is empty)"


@contextlib.contextmanager
def running(command: list[str], port: int, env: dict | None = None, log: Path | None = None,
            startup_timeout_s: float = STARTUP_TIMEOUT_S, name: str = "the server") -> Iterator[str]:
    """Start a server process, yield its base URL once /health is 200, stop it afterwards. Its
    output goes to `log` (when None, a temporary file, kept only if the server fails to start);
    `name` names it in errors."""
    with running_process(command, port, env, log, startup_timeout_s, name) as (url, _):
        yield url


@contextlib.contextmanager
def running_process(command: list[str], port: int, env: dict | None = None, log: Path | None = None,
                    startup_timeout_s: float = STARTUP_TIMEOUT_S,
                    name: str = "the server") -> Iterator[tuple[str, subprocess.Popen]]:
    """As running(), yielding (base URL, process)."""
    temporary = log is None
    if temporary:
        handle, name_of_file = tempfile.mkstemp(prefix="kvserve-bench-", suffix=".log")
        os.close(handle)
        log = Path(name_of_file)
    started = False
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, process, log, startup_timeout_s, name)
            started = True
            yield url, process
        finally:
            stop(process)
            if temporary and started:
                log.unlink(missing_ok=True)


def wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout_s: float = STARTUP_TIMEOUT_S,
                 name: str = "the server") -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise ConfigError(f"{name} exited with {process.returncode} during startup ({url}); the last lines "
                              f"of its log ({log}):\n{log_tail(log)}")
        try:
            health = httpx.get(f"{url}/health", timeout=2)
            if health.status_code == 200:
                return
            if health.status_code == 503 and _status(health) == "error":
                raise ConfigError(f"{name} reports a fatal error at startup ({url}/health): "
                                  f"{health.json().get('error')}; the last lines of its log ({log}):\n{log_tail(log)}")
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise ConfigError(f"{url}/health was not 200 after {timeout_s:.0f} s; the last lines of the log "
                              f"({log}):\n{log_tail(log)}")
        time.sleep(0.25)


def _status(response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get("status") if isinstance(body, dict) else None


def stop(process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
