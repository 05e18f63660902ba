"""The one Server-Sent Events encoder: OpenAI chunk dicts → `data:` frames, keep-alive comments
while nothing is produced (long prefills), and abort on disconnect.

A client that goes away cancels the response task (Starlette listens for http.disconnect); the
`finally` below then closes the Generation, which aborts its engine requests before the next step.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from kvserve.server.openai_api import Generation
from kvserve.server.protocol import APIError

KEEPALIVE_S = 5.0


def frame(data: dict | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"data: {payload}\n\n".encode()


async def sse_stream(generation: Generation, keepalive_s: float = KEEPALIVE_S) -> AsyncIterator[bytes]:
    chunks = generation.chunks()
    pending: asyncio.Future | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(chunks.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=keepalive_s)
            if not done:
                yield b": keep-alive\n\n"
                continue
            try:
                chunk = pending.result()
            except StopAsyncIteration:
                break
            finally:
                pending = None
            yield frame(chunk)
        yield frame("[DONE]")
    except APIError as error:   # the engine failed mid-stream: tell the client in-band
        yield frame(error.body())
    finally:
        if pending is not None:
            pending.cancel()
        generation.close()
