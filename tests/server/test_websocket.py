"""The WebSocket protocol at /v1/ws, over a real uvicorn server and the `websockets` client."""

from __future__ import annotations

import asyncio
import collections
import json
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
import websockets
from starlette.testclient import TestClient

from kvserve.server.auth import RateLimits
from kvserve.config import ServerConfig
from kvserve.server.app import create_app
from kvserve.server.websocket import Session

TIMEOUT_S = 20.0
LONG_MAX_TOKENS = 1500   # long enough that a cancel or a close always lands mid-stream
TERMINAL = {"done", "cancelled", "error"}


def ws_url(base_url: str) -> str:
    return base_url.replace("http://", "ws://") + "/v1/ws"


def chat_body(prompt: str, max_tokens: int = 30, **extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": max_tokens, "ignore_eos": True, **extra}


def request_frame(request_id: str, body: dict, endpoint: str = "chat") -> str:
    return json.dumps({"type": "request", "id": request_id, "endpoint": endpoint, "body": body})


class Mux:
    """Reads one socket's frames and sorts them by request id, so tests can wait on one id."""

    def __init__(self, ws):
        self.ws = ws
        self.frames: dict[str | None, collections.deque] = collections.defaultdict(collections.deque)

    async def next(self, request_id: str | None) -> dict:
        deadline = time.monotonic() + TIMEOUT_S
        while not self.frames[request_id]:
            frame = json.loads(await asyncio.wait_for(self.ws.recv(), deadline - time.monotonic()))
            self.frames[frame["id"]].append(frame)
        return self.frames[request_id].popleft()

    async def until_end(self, request_id: str) -> list[dict]:
        """Frames of one request up to and including its last (done, cancelled or error)."""
        frames = [await self.next(request_id)]
        while not is_last(frames[-1]):
            frames.append(await self.next(request_id))
        return frames


def is_last(frame: dict) -> bool:
    """A 409 (the id was already in flight) rejects a second frame, not the request in flight."""
    return frame["type"] in TERMINAL and not (frame["type"] == "error" and frame["status"] == 409)


def text_of(frames: list[dict], choice: int = 0) -> str:
    return "".join(f["text"] for f in frames if f["type"] == "delta" and f["choice"] == choice)


def test_interleaved_requests_with_one_cancelled(tiny_server):
    base_url, _ = tiny_server
    bodies = {"a": chat_body("The capital of France is"), "b": chat_body("Once upon a time"),
              "c": chat_body("Count: one two three", max_tokens=LONG_MAX_TOKENS)}

    async def scenario() -> dict[str, list[dict]]:
        async with websockets.connect(ws_url(base_url)) as ws:
            mux = Mux(ws)
            for request_id, body in bodies.items():
                await ws.send(request_frame(request_id, body))
            first = await mux.next("c")
            assert first["type"] == "delta", first
            await ws.send(json.dumps({"type": "cancel", "id": "c"}))
            results = {"c": [first] + await mux.until_end("c")}
            for request_id in ("a", "b"):
                results[request_id] = await mux.until_end(request_id)
            # nothing follows a request's last frame: a late frame would arrive before this answer
            await ws.send(json.dumps({"type": "cancel", "id": "c"}))
            late = await mux.next("c")
            assert late["type"] == "error" and late["status"] == 404, late
            assert not any(mux.frames.values()), dict(mux.frames)
            return results

    results = asyncio.run(scenario())

    cancelled = results["c"]
    assert cancelled[-1] == {"type": "cancelled", "id": "c"}
    assert all(f["type"] == "delta" for f in cancelled[:-1])
    assert len(text_of(cancelled)) < LONG_MAX_TOKENS   # stopped well before its max_tokens

    for request_id in ("a", "b"):
        frames = results[request_id]
        done = frames[-1]
        assert done["type"] == "done", done
        assert all(f["type"] == "delta" and f["text"] for f in frames[:-1])
        expected = httpx.post(f"{base_url}/v1/chat/completions", json=bodies[request_id], timeout=TIMEOUT_S).json()
        assert text_of(frames) == expected["choices"][0]["message"]["content"]
        assert done["finish_reasons"] == [expected["choices"][0]["finish_reason"]] == ["length"]
        usage = done["usage"]
        assert usage["completion_tokens"] == 30 == expected["usage"]["completion_tokens"]
        assert usage["prompt_tokens"] == expected["usage"]["prompt_tokens"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + 30
        assert isinstance(usage["prompt_tokens_details"]["cached_tokens"], int)


def test_error_frames_keep_the_socket_open(tiny_server):
    base_url, _ = tiny_server

    async def scenario() -> None:
        async with websockets.connect(ws_url(base_url)) as ws:
            mux = Mux(ws)

            async def expect_error(request_id, status: int, code: str | None = None, param: str | None = None):
                frame = await mux.next(request_id)
                assert frame["type"] == "error" and frame["status"] == status, frame
                assert set(frame["error"]) == {"message", "type", "param", "code"} and frame["error"]["message"]
                if code is not None:
                    assert frame["error"]["code"] == code, frame
                if param is not None:
                    assert frame["error"]["param"] == param, frame
                return frame

            await ws.send("{not json")
            await expect_error(None, 400, "invalid_json")
            await ws.send(b"\x00\x01")
            await expect_error(None, 400, "binary_frame")
            await ws.send(json.dumps({"type": "request", "body": chat_body("hi")}))
            await expect_error(None, 400, "missing_id", "id")
            await ws.send(json.dumps({"type": "cancel", "id": "\ud800"}))   # a lone surrogate cannot be echoed
            await expect_error(None, 400, "invalid_id", "id")
            await ws.send(json.dumps({"type": "request", "id": "big", "body": {"prompt": "x" * (5 << 20)}}))
            await expect_error(None, 413, "body_too_large")
            await ws.send(json.dumps({"type": "subscribe", "id": "t"}))
            await expect_error("t", 400, "unknown_type", "type")
            await ws.send(request_frame("e", chat_body("hi"), endpoint="embeddings"))
            await expect_error("e", 400, "unknown_endpoint", "endpoint")
            await ws.send(request_frame("x", {**chat_body("hi"), "max_tokens": "x"}))
            invalid = await expect_error("x", 422, "invalid_body", "max_tokens")
            # the same message as the HTTP endpoint gives for the same body
            http = httpx.post(f"{base_url}/v1/chat/completions", json={**chat_body("hi"), "max_tokens": "x"})
            assert http.status_code == 422 and http.json()["error"] == invalid["error"]
            await ws.send(request_frame("m", {**chat_body("hi"), "model": "no-such-model"}))
            await expect_error("m", 404, "model_not_found", "model")
            await ws.send(json.dumps({"type": "cancel", "id": "never-sent"}))
            await expect_error("never-sent", 404, "unknown_id")

            await ws.send(request_frame("long", chat_body("a long one", max_tokens=LONG_MAX_TOKENS)))
            await ws.send(request_frame("long", chat_body("the same id again")))
            await ws.send(json.dumps({"type": "cancel", "id": "long"}))
            long = await mux.until_end("long")
            errors = [f for f in long if f["type"] == "error"]
            assert len(errors) == 1 and errors[0]["status"] == 409 and errors[0]["error"]["code"] == "duplicate_id"
            assert long[-1] == {"type": "cancelled", "id": "long"}

            # after all that, the socket still serves, including the completions endpoint with logprobs
            await ws.send(request_frame("ok", {"model": "tiny", "prompt": "Hello", "max_tokens": 8, "temperature": 0,
                                               "ignore_eos": True, "logprobs": 2}, endpoint="completions"))
            frames = await mux.until_end("ok")
            assert frames[-1]["type"] == "done" and frames[-1]["usage"]["completion_tokens"] == 8, frames[-1]
            deltas = frames[:-1]
            assert sum(len(f["logprobs"]["tokens"]) for f in deltas) == 8
            expected = httpx.post(f"{base_url}/v1/completions", timeout=TIMEOUT_S, json={
                "model": "tiny", "prompt": "Hello", "max_tokens": 8, "temperature": 0, "ignore_eos": True}).json()
            assert text_of(frames) == expected["choices"][0]["text"]

    asyncio.run(scenario())


@pytest.mark.parametrize("how", ["close", "drop"])
def test_closing_the_socket_aborts_its_requests(tiny_server, how):
    """`close`: a clean close handshake; `drop`: the TCP connection just ends (a tab killed, a
    network gone). Either way, mid-generation, every request of the socket is aborted."""
    base_url, app = tiny_server
    engine = app.state.models["tiny"].engine

    async def scenario() -> None:
        # max_queue=None: this client never stops reading, so the server's close reply is not
        # stuck behind unread deltas (websockets' flow control would hold it for close_timeout)
        ws = await websockets.connect(ws_url(base_url), max_queue=None)
        mux = Mux(ws)
        await ws.send(request_frame("r1", chat_body("first", max_tokens=LONG_MAX_TOKENS)))
        await ws.send(request_frame("r2", chat_body("second", max_tokens=LONG_MAX_TOKENS, n=2)))
        assert (await mux.next("r1"))["type"] == "delta"
        assert (await mux.next("r2"))["type"] == "delta"
        assert app.state.models["tiny"].in_flight == 3
        if how == "close":
            await asyncio.wait_for(ws.close(), 5)
        else:
            ws.transport.abort()

    asyncio.run(scenario())

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = engine.stats()
        if stats.num_running == 0 and stats.num_waiting == 0 and stats.kv.num_used_blocks == 0:
            break
        time.sleep(0.02)
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting, stats.kv.num_used_blocks) == (0, 0, 0), stats
    assert app.state.models["tiny"].in_flight == 0
    time.sleep(0.1)   # the engine thread is idle (nothing in flight anywhere): safe to inspect
    engine.engine.check_integrity()


def test_foreign_origin_is_refused(tiny_server):
    base_url, _ = tiny_server

    async def scenario() -> None:
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            async with websockets.connect(ws_url(base_url), origin="http://evil.example"):
                pass
        assert refused.value.response.status_code == 403
        async with websockets.connect(ws_url(base_url), origin=base_url) as ws:   # the front page's origin
            await ws.send(json.dumps({"type": "cancel", "id": "nothing"}))
            assert json.loads(await ws.recv())["status"] == 404

    asyncio.run(scenario())


def test_requests_get_503_while_the_model_loads():
    release = threading.Event()

    def load() -> dict:
        release.wait(TIMEOUT_S)
        return {}

    app = create_app(ServerConfig(), load)
    try:
        with TestClient(app) as client:
            with client.websocket_connect("/v1/ws") as ws:
                ws.send_text(request_frame("early", chat_body("hi")))
                frame = ws.receive_json()
                assert frame["type"] == "error" and frame["id"] == "early" and frame["status"] == 503, frame
                assert frame["error"]["code"] == "loading"
            release.set()
            deadline = time.monotonic() + TIMEOUT_S   # let loading finish before the app stops
            while client.get("/health").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.01)
    finally:
        release.set()


class ScriptedSocket:
    """Just enough of starlette's WebSocket for a Session: scripted client frames delivered without
    yielding to the event loop (as when several frames arrive in one read), then a disconnect once
    the server has sent `expected_sends` frames."""

    def __init__(self, texts: list[str], expected_sends: int):
        self.app = SimpleNamespace(state=SimpleNamespace(config=ServerConfig(), serving=None, draining=False,
                                                         engine_error=None, rate_limits=RateLimits(), api_keys=None))
        self.incoming = [{"type": "websocket.receive", "text": t} for t in texts]
        self.sent: list[dict] = []
        self.expected_sends = expected_sends
        self.enough = asyncio.Event()

    async def receive(self) -> dict:
        if self.incoming:
            return self.incoming.pop(0)
        await self.enough.wait()
        return {"type": "websocket.disconnect", "code": 1000}

    async def send_text(self, text: str) -> None:
        self.sent.append(json.loads(text))
        if len(self.sent) >= self.expected_sends:
            self.enough.set()


def test_a_cancel_that_arrives_before_its_task_runs_still_cancels():
    socket = ScriptedSocket([request_frame("q", chat_body("hi")), json.dumps({"type": "cancel", "id": "q"}),
                             request_frame("q", chat_body("the id is free again"))], expected_sends=2)

    async def scenario() -> Session:
        session = Session(socket)
        await asyncio.wait_for(session.run(), TIMEOUT_S)
        return session

    session = asyncio.run(scenario())
    # the third frame came before q's task ran: 409. Then q is cancelled without ever starting.
    assert [f["type"] for f in socket.sent] == ["error", "cancelled"], socket.sent
    assert socket.sent[0]["status"] == 409 and socket.sent[1]["id"] == "q"
    assert not session.tasks and not session.started and not session.cancelled
