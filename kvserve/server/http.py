"""Request-level helpers every HTTP API shares: the serving object (503 while the models load),
and a non-streaming answer that aborts its engine work when the client leaves first."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

from kvserve.server.openai_api import Generation, OpenAIServing
from kvserve.server.protocol import APIError

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before the answer was ready; its engine work is aborted."""


def serving(request: Request) -> OpenAIServing:
    serving = request.app.state.serving
    if serving is None:
        raise APIError(503, "the model is still loading; retry shortly", type="service_unavailable",
                       code="loading", headers={"Retry-After": "2"})
    return serving


async def unless_disconnected(request: Request, answer: Awaitable[T], generation: Generation) -> T:
    """Await `answer`; if the client disconnects first, close `generation` (engine abort) and raise
    ClientGone. The generation is closed either way when this returns."""
    result = asyncio.ensure_future(answer)
    disconnect = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({result, disconnect}, return_when=asyncio.FIRST_COMPLETED)
        if not result.done():
            generation.close()
            result.cancel()
            raise ClientGone
        return result.result()
    finally:
        disconnect.cancel()
        generation.close()


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
