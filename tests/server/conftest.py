"""tiny_server (fixture, per module) → (base_url, app): a real uvicorn server in-process, on a free
localhost port, serving the tiny random model as "tiny" (see helpers.ServerThread).

The server runs on a background thread with its own event loop, so tests drive it with real
clients (httpx, websockets, a browser) exactly as a remote client would, and can still read
`app.state`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from helpers import ServerThread, single_torch_thread


@pytest.fixture(scope="module")
def tiny_server() -> Iterator[tuple[str, object]]:
    with single_torch_thread(), ServerThread() as server:
        yield server.base_url, server.app
