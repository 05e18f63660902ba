"""Helpers for the server tests: tiny engines, an in-process uvicorn server on a thread, a
`kvserve serve` subprocess, and small parsers (SSE frames, Prometheus text).

The tiny random model (`random:tiny`, fp32, ByteTokenizer: one token per UTF-8 byte, vocab 260)
loads once per process and is shared by every engine built here (its weights are never mutated).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import torch

from kvserve.config import CacheConfig, EngineConfig, SchedulerConfig, ServerConfig
from kvserve.engine.async_engine import AsyncEngine
from kvserve.engine.engine import Engine
from kvserve.model.checkpoint import Checkpoint, load_checkpoint
from kvserve.server.app import create_app
from kvserve.server.lifecycle import Server, uvicorn_config

MODEL = "tiny"
REPO_ROOT = Path(__file__).resolve().parents[2]


@functools.cache
def tiny_checkpoint() -> Checkpoint:
    return load_checkpoint("random:tiny")


def make_engine(num_blocks: int = 512, enable_prefix_caching: bool = True, step_delay_s: float = 0.0,
                **scheduler) -> Engine:
    """A fresh fp32 CPU engine on the shared tiny checkpoint; keywords go to SchedulerConfig.

    `step_delay_s` sleeps before every step: the tiny model steps in about a millisecond, so a
    test that must act while a request is still running (disconnect, 429) slows the engine down
    instead of racing it. The sleep releases the GIL, so client and server run freely meanwhile."""
    config = EngineConfig(model="random:tiny", dtype="float32", device="cpu",
                          cache=CacheConfig(num_blocks=num_blocks, enable_prefix_caching=enable_prefix_caching),
                          scheduler=SchedulerConfig(**scheduler))
    engine = Engine(config, checkpoint=tiny_checkpoint())
    if step_delay_s > 0:
        step = engine.step

        def slow_step():
            time.sleep(step_delay_s)
            return step()

        engine.step = slow_step
    return engine


@contextlib.contextmanager
def single_torch_thread() -> Iterator[None]:
    """The tiny model gains nothing from intra-op threads, and on a shared 2-core machine a
    spinning second OpenMP thread makes steps far slower. Restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base_url: str, timeout_s: float = 60.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} before becoming healthy")
        try:
            response = httpx.get(f"{base_url}/health", timeout=2.0)
            if response.status_code == 200:
                return
            last = f"{response.status_code} {response.text}"
        except httpx.HTTPError as error:
            last = repr(error)
        time.sleep(0.1)
    raise TimeoutError(f"{base_url}/health did not answer 200 within {timeout_s} s (last: {last})")


class ServerThread:
    """create_app(...) served by a real uvicorn on a background thread of this process, so a test
    can talk HTTP to it and still read `app.state` (engines, admission counters)."""

    def __init__(self, server_config: ServerConfig | None = None,
                 engines: Callable[[], dict[str, AsyncEngine]] | None = None, api_keys=None,
                 startup_timeout_s: float = 60.0, **engine_options):
        self.config = server_config or ServerConfig()
        self.startup_timeout_s = startup_timeout_s
        load = engines or (lambda: {MODEL: AsyncEngine(make_engine(**engine_options))})
        self.app = create_app(self.config, load, api_keys)
        self._socket = socket.socket()
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.server = Server(uvicorn_config(self.app, self.config, lifespan="on", timeout_graceful_shutdown=2),
                             self.app, self.config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]},
                                        name="uvicorn-test", daemon=True)

    def __enter__(self) -> "ServerThread":
        self._thread.start()
        wait_healthy(self.base_url, self.startup_timeout_s)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=15)
        self._socket.close()

    def engine(self, name: str = MODEL) -> AsyncEngine:
        return self.app.state.models[name].engine

    def in_flight(self, name: str = MODEL) -> int:
        return self.app.state.models[name].in_flight

    def idle(self, name: str = MODEL) -> bool:
        """No admitted request, and the engine thread has finished (or aborted) every request it
        was handed: AsyncEngine drops a request's stream only once it delivered its last output,
        so a request whose add or abort is still queued keeps this False. Then the scheduler and
        the KV pool (as of the last step) are empty too."""
        engine = self.engine(name)
        if self.in_flight(name) or engine._streams:
            return False
        stats = engine.stats()
        return stats.num_running == 0 and stats.num_waiting == 0 and stats.kv.num_used_blocks == 0


@contextlib.contextmanager
def serve_subprocess(*extra_args: str, timeout_s: float = 60.0) -> Iterator[str]:
    """`kvserve serve --model tiny=random:tiny --dtype float32` as a real subprocess; yields its base URL."""
    with serve_process(*extra_args, timeout_s=timeout_s) as (base_url, _):
        yield base_url


@contextlib.contextmanager
def serve_process(*extra_args: str, timeout_s: float = 60.0) -> Iterator[tuple[str, subprocess.Popen]]:
    """As serve_subprocess, but yields (base URL, the process): for signals and exit codes. Its
    output (stdout and stderr together) is printed when the test fails."""
    port = free_port()
    command = [sys.executable, "-m", "kvserve.cli", "serve", "--model", f"{MODEL}=random:tiny",
               "--dtype", "float32", "--device", "cpu", "--num-kv-blocks", "512", "--port", str(port),
               "--state-dir", "", *extra_args]   # batch jobs off unless a test gives its own directory
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base_url, timeout_s, process)
        yield base_url, process
    except BaseException:
        if process.poll() is None:
            process.terminate()
        output = process.communicate(timeout=15)[0].decode(errors="replace")
        print(f"--- kvserve serve output ---\n{output[-4000:]}", file=sys.stderr)
        raise
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout:
            process.stdout.close()


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0, interval_s: float = 0.02) -> bool:
    """Poll until predicate() is true; False on timeout (generous timeouts, no timing asserts)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


def sse_events(lines: Iterator[str]) -> Iterator[dict | str]:
    """Parse `data:` lines of an SSE stream: dicts for JSON payloads, the string "[DONE]" at the end."""
    for line in lines:
        if not line.startswith("data: "):
            continue
        payload = line[len("data: "):]
        yield payload if payload == "[DONE]" else json.loads(payload)


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text → {(sample name, sorted label items): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metric(samples: dict, name: str, **labels: str) -> float:
    """One sample's value (0.0 when absent: a labelled counter only appears once it moved)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def raw_http(port: int, request: bytes, timeout_s: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    """Send one raw HTTP/1.1 request in a single write and read the response until the server
    closes. Used where the server answers before reading the whole body (413): writing the body
    in one piece means it is read in one piece, so the close sends FIN, not a reset."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(request)
        data = bytearray()
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = _dechunk(body)
    return int(status_line.split()[1]), headers, body


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2:]
    return bytes(out)


def http_request_bytes(method: str, path: str, body: bytes | None, headers: dict[str, str] | None = None,
                       chunked: bool = False, chunk_bytes: int = 256) -> bytes:
    """A complete HTTP/1.1 request (Connection: close), with Content-Length or chunked encoding."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    payload = b""
    if body is not None:
        if chunked:
            lines.append("Transfer-Encoding: chunked")
            payload = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + chunk_bytes]), body[i:i + chunk_bytes])
                               for i in range(0, len(body), chunk_bytes)) + b"0\r\n\r\n"
        else:
            lines.append(f"Content-Length: {len(body)}")
            payload = body
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload
