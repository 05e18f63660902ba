"""The one Server-Sent Events transport: keep-alive comments while nothing is produced (long
prefills), and abort on disconnect, around any wire format's already-encoded frames.

    sse_stream(generation)                     OpenAI: chunk dicts → `data:` frames, then [DONE]
    sse_frames(frames, generation, error_frame)  any format (Anthropic's named events use it)

A client that goes away cancels the response task (Starlette listens for http.disconnect); the
`finally` in sse_frames then closes the Generation, which aborts its engine requests before the
next step.

`StreamResponse` carries every streamed answer (SSE here, AWS event streams in bedrock.py): a
client that stops reading fills the socket's buffers until a send blocks; a send blocked for
--stream-idle-timeout ends the response and aborts the engine work, so such a client holds
nothing for long (the engine never waits for it either: the mailbox merges deltas meanwhile).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable

from starlette.responses import StreamingResponse

from kvserve.server.openai_api import Generation
from kvserve.server.protocol import APIError

log = logging.getLogger(__name__)

KEEPALIVE_S = 5.0
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ClientStalled(Exception):
    """A send stayed blocked past the idle timeout: the client has stopped reading."""


class StreamResponse(StreamingResponse):
    """A streamed answer that cannot outlive its client: a send blocked for `idle_timeout_s`
    ends the response (the connection is closed), and the Generation is closed (engine abort)
    however the response ends, even when the client left before the first frame."""

    def __init__(self, frames: AsyncIterator[bytes], generation: Generation, idle_timeout_s: float,
                 media_type: str = "text/event-stream", headers: dict[str, str] | None = None):
        super().__init__(frames, media_type=media_type, headers={**SSE_HEADERS, **(headers or {})})
        self.generation = generation
        self.idle_timeout_s = idle_timeout_s

    async def __call__(self, scope, receive, send) -> None:
        async def send_or_give_up(message) -> None:
            try:
                async with asyncio.timeout(self.idle_timeout_s):
                    await send(message)
            except TimeoutError:
                raise ClientStalled from None

        try:
            await super().__call__(scope, receive, send_or_give_up)
        except ClientStalled:
            log.warning("a client read nothing for %g s (--stream-idle-timeout); its stream %s was aborted",
                        self.idle_timeout_s, self.generation.id)
            self.generation.metrics.server_aborts.labels("stream_idle_timeout").inc()
        finally:
            self.generation.close()


# Characters that JSON leaves raw but that line readers built on str.splitlines() (httpx's
# aiter_lines, for one) take for line ends: a token that decodes to one of them would cut a
# `data:` line in two. Escaped, the JSON means the same and every reader sees one line.
_LINE_BREAKERS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def event_json(data: dict) -> str:
    """One SSE `data:` payload: compact JSON, UTF-8, on one line for any line reader."""
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).translate(_LINE_BREAKERS)


def frame(data: dict | str) -> bytes:
    payload = data if isinstance(data, str) else event_json(data)
    return f"data: {payload}\n\n".encode()


def sse_stream(generation: Generation, keepalive_s: float = KEEPALIVE_S) -> AsyncIterator[bytes]:
    """OpenAI's stream: one `data:` frame per chunk dict, then `data: [DONE]`; an engine failure
    mid-stream becomes an in-band `data: {"error": ...}` frame."""
    return sse_frames(_openai_frames(generation), generation, lambda error: frame(error.body()), keepalive_s)


async def _openai_frames(generation: Generation) -> AsyncIterator[bytes]:
    async for chunk in generation.chunks():
        yield frame(chunk)
    yield frame("[DONE]")


async def sse_frames(frames: AsyncIterator[bytes], generation: Generation,
                     error_frame: Callable[[APIError], bytes],
                     keepalive_s: float = KEEPALIVE_S) -> AsyncIterator[bytes]:
    """`frames` (encoded from `generation`'s chunks), with a keep-alive comment after every
    `keepalive_s` of silence. An APIError raised by `frames` (the engine failed mid-stream) ends
    the stream with `error_frame(error)`. However the stream ends (finished, failed, or the
    client gone), `generation` is closed: its unfinished engine requests are aborted."""
    pending: asyncio.Future | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(frames.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=keepalive_s)
            if not done:
                yield b": keep-alive\n\n"
                continue
            try:
                data = pending.result()
            except StopAsyncIteration:
                break
            finally:
                pending = None
            yield data
    except APIError as error:   # the engine failed mid-stream: tell the client in-band
        yield error_frame(error)
    finally:
        if pending is not None:
            pending.cancel()
        generation.close()
