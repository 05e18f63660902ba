"""A real uvicorn server in-process, on a free localhost port, serving the tiny random model.

    with running_server(app) as base_url: ...     any ASGI app; returns once /health answers 200
    tiny_server (fixture, per module)             → (base_url, app) for create_app over `random:tiny`

The server runs on a background thread with its own event loop, so tests drive it with real
clients (httpx, websockets, a browser) exactly as a remote client would.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import torch
import uvicorn

from kvserve.config import CacheConfig, EngineConfig, ServerConfig
from kvserve.engine.async_engine import AsyncEngine
from kvserve.engine.engine import Engine
from kvserve.server.app import create_app

STARTUP_TIMEOUT_S = 60.0


def tiny_engines() -> dict[str, AsyncEngine]:
    config = EngineConfig(model="random:tiny", dtype="float32", device="cpu", cache=CacheConfig(num_blocks=512))
    return {"tiny": AsyncEngine(Engine(config))}


@contextlib.contextmanager
def running_server(app, timeout_s: float = STARTUP_TIMEOUT_S) -> Iterator[str]:
    """Serve `app` with uvicorn on 127.0.0.1:<free port> in a thread; yield its base URL once
    /health is 200; stop it (lifespan shutdown included) on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))   # the OS picks the port; uvicorn serves on this very socket
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", ws_ping_interval=None))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn-test", daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base_url, server, thread, timeout_s)
        yield base_url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop within 30 s"


def _wait_healthy(base_url: str, server: uvicorn.Server, thread: threading.Thread, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if not thread.is_alive():
            raise RuntimeError("uvicorn exited during startup")
        if server.started:
            try:
                response = httpx.get(f"{base_url}/health", timeout=2)
                if response.status_code == 200:
                    return
                last = f"{response.status_code} {response.text}"
            except httpx.HTTPError as error:
                last = repr(error)
        time.sleep(0.05)
    raise TimeoutError(f"{base_url}/health not 200 after {timeout_s} s (last: {last})")


@pytest.fixture(scope="module")
def tiny_server() -> Iterator[tuple[str, object]]:
    """(base_url, app): create_app over one `random:tiny` engine ("tiny"), fp32 on CPU, 512 blocks.

    One torch thread: the tiny model gains nothing from intra-op threads, and on a shared 2-core
    machine a spinning second OpenMP thread makes engine steps many times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    app = create_app(ServerConfig(), tiny_engines)
    try:
        with running_server(app) as base_url:
            yield base_url, app
    finally:
        torch.set_num_threads(previous)
