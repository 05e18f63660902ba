"""The one Server-Sent Events transport: keep-alive comments while nothing is produced (long
prefills), and abort on disconnect, around any wire format's already-encoded frames.

    sse_stream(generation)                     OpenAI: chunk dicts → `data:` frames, then [DONE]
    sse_frames(frames, generation, error_frame)  any format (Anthropic's named events use it)

A client that goes away cancels the response task (Starlette listens for http.disconnect); the
`finally` in sse_frames then closes the Generation, which aborts its engine requests before the
next step.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

from kvserve.server.openai_api import Generation
from kvserve.server.protocol import APIError

KEEPALIVE_S = 5.0


def frame(data: dict | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
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
