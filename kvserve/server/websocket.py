"""The WebSocket protocol at `GET /v1/ws`: many streamed requests on one socket, multiplexed by id.

    client                                   server
    ──────                                   ──────
    {"type":"request","id":"a",...}  ──▶  validate → OpenAIServing.chat/completion → Generation
    {"type":"request","id":"b",...}  ──▶        (one asyncio task per id, consuming chunks())
                                     ◀──  {"type":"delta","id":"a","choice":0,"text":"Hel"}
                                     ◀──  {"type":"delta","id":"b","choice":0,"text":"Once"}
    {"type":"cancel","id":"b"}       ──▶  task b cancelled → Generation.close() (engine abort)
                                     ◀──  {"type":"cancelled","id":"b"}
                                     ◀──  {"type":"done","id":"a","finish_reasons":["length"],"usage":{...}}
    (socket closes)                  ──▶  every task left is cancelled; each closes its Generation

Every frame is one JSON text frame. Sends go through one lock, so frames never interleave; a slow
client makes the request tasks wait at the lock while the engine merges their deltas in each
stream's single-slot mailbox (the engine loop never waits for a socket). The full protocol, step
by step, is the endpoint's docstring below and docs/websocket.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, WebSocket
from pydantic import ValidationError
from starlette.websockets import WebSocketDisconnect, WebSocketDisconnected

from kvserve.engine.async_engine import EngineDeadError
from kvserve.sampling import InvalidRequestError
from kvserve.server.openai_api import Generation, OpenAIServing
from kvserve.server.auth import OPEN, Principal, authenticate
from kvserve.server.http import serving_of
from kvserve.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, engine_dead, validation_error

log = logging.getLogger(__name__)

ENDPOINTS = {"chat": ChatCompletionRequest, "completions": CompletionRequest}
MAX_ID_CHARS = 256


class SocketStalled(Exception):
    """A send stayed blocked past --stream-idle-timeout: the client stopped reading."""


# What a send or receive raises once the connection is gone (starlette wraps the server's OSError).
SOCKET_GONE = (WebSocketDisconnect, WebSocketDisconnected, OSError, SocketStalled)


class FrameError(APIError):
    """A client frame the server cannot act on; answered with an error frame, the socket stays open."""

    def __init__(self, status: int, message: str, *, request_id: str | None = None, **kwargs):
        super().__init__(status, message, **kwargs)
        self.request_id = request_id


def register_websocket(app: FastAPI) -> None:
    @app.websocket("/v1/ws")
    async def websocket_stream(websocket: WebSocket) -> None:
        """Streamed chat/completions over one WebSocket, many requests multiplexed by client ids.

        1. Connect to `ws://HOST/v1/ws`. A browser page must be served from the same origin (the
           `Origin` header, when sent, must name the `Host`); otherwise the handshake gets 403.
           With --api-keys, present a key (Authorization: Bearer, or `?api_key=` for browsers);
           without a valid one the handshake gets 403. Requests run as the key's tenant.
        2. Send request frames (JSON text), as many as you like without waiting:
             {"type": "request", "id": "<client id>", "endpoint": "chat" | "completions",
              "body": <a /v1/chat/completions or /v1/completions body>}
           `endpoint` defaults to "chat". `id` is a non-empty string of at most 256 characters,
           unique among this socket's requests in flight. `stream` in the body is ignored: the
           answer is always streamed. All HTTP limits apply (n, max_tokens, queue cap → 429).
        3. Receive, per request, in order:
             {"type": "delta", "id", "choice": <index>, "text": "<new text>"}   zero or more;
                 only non-empty text, plus "logprobs" (the HTTP chunk's shape) when asked for;
             {"type": "done", "id", "finish_reasons": [<per choice>], "usage": {prompt_tokens,
                 completion_tokens, total_tokens, prompt_tokens_details: {cached_tokens}}}  last.
           Frames of different requests interleave; each frame names its request.
        4. Cancel a request in flight with {"type": "cancel", "id": "<id>"}: its engine work is
           aborted before the next step and {"type": "cancelled", "id"} is its last frame (no
           `done` follows). A cancel for an id not in flight gets a 404 error frame (a client that
           races a `done` may ignore it).
        5. Anything wrong is answered with
             {"type": "error", "id": <the id, or null when unknown>, "status": <HTTP-like status>,
              "error": {"message", "type", "param", "code"}}
           and the socket stays open. An error frame with an id ends that request, except a 409:
           it rejects the second frame with an id already in flight, which goes on. Statuses:
           400 invalid JSON / not an object / binary frame / missing or bad id / unknown type or
           endpoint / out-of-range values; 404 unknown model, or cancel of an unknown id;
           409 the id is already in flight; 413 frame larger than --max-body-bytes; 422 the body
           fails schema validation (same message as HTTP); 429 queue full, or more than
           --ws-max-requests requests in flight on this socket; 503 model loading, draining or
           engine stopped; 500 unexpected.
        6. Close the socket at any time: every request still in flight is aborted at once, so
           its KV blocks are free within one engine step.
        7. Read what the server sends. A socket whose sends stay blocked for --stream-idle-timeout
           (the client stopped reading and the buffers filled) is closed (1008) and its requests
           are aborted. A frame far over --max-body-bytes (2x + 64 KiB) closes the socket (1009).
        """
        if not _same_origin(websocket):
            await websocket.close(code=1008)   # before accept: the handshake is answered 403
            return
        try:
            who = authenticate(websocket.app.state, websocket.headers, websocket.query_params)
        except APIError:
            await websocket.close(code=1008)
            return
        await websocket.accept()
        await Session(websocket, who).run()


def _same_origin(websocket: WebSocket) -> bool:
    """Browsers let any page open a WebSocket anywhere (no CORS); refuse foreign pages. Clients
    that send no Origin (SDKs, curl, websockets) are not browsers and pass."""
    origin = websocket.headers.get("origin")
    if origin is None:
        return True
    hosts = {websocket.headers.get("host", ""), websocket.headers.get("x-forwarded-host", "")}
    return urlsplit(origin).netloc.lower() in {h.lower() for h in hosts if h}


class Session:
    """One socket: reads frames, runs one task per request in flight, serialises every send."""

    def __init__(self, websocket: WebSocket, principal: Principal = OPEN):
        self.websocket = websocket
        self.tenant = principal.tenant   # as of the handshake; each request frame authenticates again
        config = websocket.app.state.config
        self.max_frame_bytes = config.max_body_bytes
        self.max_requests = config.ws_max_requests
        self.send_timeout_s = config.stream_idle_timeout_s
        self._reader: asyncio.Task | None = None       # run()'s task: cancelled when the client stalls
        self.tasks: dict[str, asyncio.Task] = {}      # request id → its task, while in flight
        self.started: set[str] = set()                # ids whose task has begun running
        self.cancelled: set[str] = set()              # ids the client cancelled, until their task ends
        self._send_lock = asyncio.Lock()
        self._stalled = False

    async def run(self) -> None:
        self._reader = asyncio.current_task()
        try:
            while True:
                message = await self.websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                try:
                    self._on_message(message)
                except FrameError as error:
                    await self.send_error(error.request_id, error)
        except SOCKET_GONE:   # the socket broke mid-send or mid-receive
            return
        except asyncio.CancelledError:
            if not self._stalled:
                raise
            await self._close_quietly(1008, "the client stopped reading")
        finally:
            await self._abort_all()

    async def _abort_all(self) -> None:
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)   # each closes its Generation

    # ---- client frames ----------------------------------------------------------------------
    def _on_message(self, message: dict) -> None:
        text = message.get("text")
        if text is None:
            raise FrameError(400, "binary frames are not supported; send JSON text frames", code="binary_frame")
        if len(text) > self.max_frame_bytes or len(text.encode()) > self.max_frame_bytes:
            raise FrameError(413, f"the frame exceeds {self.max_frame_bytes} bytes (--max-body-bytes)",
                             code="body_too_large")
        try:
            frame = json.loads(text)
        except ValueError:
            raise FrameError(400, "the frame is not valid JSON", code="invalid_json") from None
        if not isinstance(frame, dict):
            raise FrameError(400, "a frame must be a JSON object", code="invalid_frame")
        request_id = _request_id(frame)
        kind = frame.get("type")
        if kind == "request":
            self._start(request_id, frame)
        elif kind == "cancel":
            self._cancel(request_id)
        else:
            raise FrameError(400, f"unknown frame type {kind!r}; expected 'request' or 'cancel'",
                             request_id=request_id, param="type", code="unknown_type")

    def _start(self, request_id: str, frame: dict) -> None:
        if request_id in self.tasks:
            raise FrameError(409, f"request id {request_id!r} is already in flight on this socket",
                             request_id=request_id, param="id", code="duplicate_id")
        tenant = self._authenticate(request_id)
        if len(self.tasks) >= self.max_requests:
            raise FrameError(429, f"{len(self.tasks)} requests are already in flight on this socket, the most "
                             f"allowed (--ws-max-requests); wait for one to finish", request_id=request_id,
                             type="rate_limit_error", code="too_many_requests_on_socket")
        endpoint = frame.get("endpoint", "chat")
        if endpoint not in ENDPOINTS:
            raise FrameError(400, f"unknown endpoint {endpoint!r}; expected 'chat' or 'completions'",
                             request_id=request_id, param="endpoint", code="unknown_endpoint")
        body = frame.get("body")
        if not isinstance(body, dict):
            raise FrameError(422, "body: a JSON object is required", request_id=request_id, param="body",
                             code="invalid_body")
        try:   # always streamed; stream: true also makes stream_options legal, as over HTTP
            parsed = ENDPOINTS[endpoint].model_validate({**body, "stream": True})
        except ValidationError as error:
            invalid = validation_error(error.errors())
            raise FrameError(invalid.status, invalid.message, request_id=request_id, param=invalid.param,
                             code=invalid.code) from None
        self.tasks[request_id] = asyncio.create_task(self._serve(request_id, endpoint, parsed, tenant))

    def _authenticate(self, request_id: str) -> str | None:
        """Each request frame is authenticated again, as an HTTP request is: a key revoked by a
        SIGHUP reload stops working on sockets already open, and each request counts against the
        key's rate."""
        state = self.websocket.app.state
        if state.api_keys is None:
            return self.tenant
        try:
            return authenticate(state, self.websocket.headers, self.websocket.query_params).tenant
        except APIError as error:
            raise FrameError(error.status, error.message, request_id=request_id, type=error.type,
                             code=error.code) from None

    def _cancel(self, request_id: str) -> None:
        task = self.tasks.get(request_id)
        if task is None:
            raise FrameError(404, f"no request with id {request_id!r} is in flight", request_id=request_id,
                             param="id", code="unknown_id")
        if request_id in self.cancelled:
            return
        self.cancelled.add(request_id)
        if request_id in self.started:
            task.cancel()
        # else: cancelling a task that never ran would skip its body; _serve sees the mark instead

    # ---- one request ------------------------------------------------------------------------
    async def _serve(self, request_id: str, endpoint: str, body: ChatCompletionRequest | CompletionRequest,
                     tenant: str | None) -> None:
        """Runs in its own task, one per request in flight. The id is released before the last frame
        goes out, so a client may reuse it as soon as it reads `done`, `cancelled` or `error`.
        Cancelled by a cancel frame (→ `cancelled`) or by the socket closing (→ nobody left to tell)."""
        self.started.add(request_id)
        try:
            last = await self._generate(request_id, endpoint, body, tenant)
        except asyncio.CancelledError:
            if request_id not in self.cancelled:
                raise
            last = {"type": "cancelled", "id": request_id}
        finally:
            del self.tasks[request_id]
            self.started.discard(request_id)
            self.cancelled.discard(request_id)
        if last is not None:
            await self._send_quietly(last)

    async def _generate(self, request_id: str, endpoint: str, body: ChatCompletionRequest | CompletionRequest,
                        tenant: str | None) -> dict | None:
        """Start the Generation and forward its deltas → the last frame (`done` or `error`), or None
        when the socket is gone. The Generation is closed (engine abort) before this returns or raises."""
        generation: Generation | None = None
        try:
            if request_id in self.cancelled:   # cancelled before this task first ran
                raise asyncio.CancelledError
            serving = self._serving()
            start = serving.chat if endpoint == "chat" else serving.completion
            generation = await start(body, tenant)
            async with contextlib.aclosing(generation.chunks()) as chunks:
                async for chunk in chunks:
                    for choice in chunk["choices"]:
                        await self._forward(request_id, choice)
            return {"type": "done", "id": request_id, "finish_reasons": [c.finish_reason for c in generation.choices],
                    "usage": generation.usage()}
        except APIError as error:
            return self.error_frame(request_id, error)
        except InvalidRequestError as error:
            return self.error_frame(request_id, APIError(400, str(error), param=error.param))
        except EngineDeadError as error:
            return self.error_frame(request_id, engine_dead(error))
        except SOCKET_GONE:
            return None   # run() sees the disconnect, ends, and cancels whatever is left
        except Exception:
            log.exception("websocket request %r failed", request_id)
            return self.error_frame(request_id, APIError(500, "internal error", type="server_error"))
        finally:
            if generation is not None:
                generation.close()

    def _serving(self) -> OpenAIServing:
        return serving_of(self.websocket.app.state)

    async def _forward(self, request_id: str, choice: dict) -> None:
        text = choice["delta"].get("content") if "delta" in choice else choice.get("text")
        logprobs = choice.get("logprobs")
        if not text and not logprobs:
            return   # the role chunk, or a finishing chunk with nothing new
        frame: dict[str, Any] = {"type": "delta", "id": request_id, "choice": choice["index"], "text": text or ""}
        if logprobs:
            frame["logprobs"] = logprobs
        await self.send(frame)

    # ---- server frames ----------------------------------------------------------------------
    async def send(self, frame: dict) -> None:
        """Send one frame; a send (or the wait for the lock behind one) blocked past the idle
        timeout means the client stopped reading: the whole socket is given up (module doc, 7)."""
        payload = json.dumps(frame, separators=(",", ":"), ensure_ascii=False)
        try:
            async with asyncio.timeout(self.send_timeout_s):
                async with self._send_lock:
                    await self.websocket.send_text(payload)
        except TimeoutError:
            self._give_up()
            raise SocketStalled from None

    def _give_up(self) -> None:
        if self._stalled:
            return
        self._stalled = True
        log.warning("a WebSocket client read nothing for %g s (--stream-idle-timeout); closing it and aborting "
                    "its %d requests", self.send_timeout_s, len(self.tasks))
        self.websocket.app.state.metrics.server_aborts.labels("websocket_stalled").inc(len(self.tasks))
        if self._reader is not None and self._reader is not asyncio.current_task():
            self._reader.cancel()   # else run() itself was sending: it sees SocketStalled and ends

    async def _close_quietly(self, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await self.websocket.close(code=code, reason=reason)

    async def _send_quietly(self, frame: dict) -> None:
        """A last frame for a request: a socket that is already gone has nobody left to tell."""
        with contextlib.suppress(*SOCKET_GONE):
            await self.send(frame)

    async def send_error(self, request_id: str | None, error: APIError) -> None:
        await self.send(self.error_frame(request_id, error))

    @staticmethod
    def error_frame(request_id: str | None, error: APIError) -> dict:
        return {"type": "error", "id": request_id, "status": error.status, **error.body()}


def _request_id(frame: dict) -> str:
    request_id = frame.get("id")
    if request_id is None:
        raise FrameError(400, "the frame has no id", param="id", code="missing_id")
    if not isinstance(request_id, str) or not 0 < len(request_id) <= MAX_ID_CHARS or not _encodable(request_id):
        raise FrameError(400, f"id must be a non-empty string of at most {MAX_ID_CHARS} characters",
                         param="id", code="invalid_id")
    return request_id


def _encodable(text: str) -> bool:
    """JSON's \\ud800 escapes decode to lone surrogates, which no frame can carry back."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True
