"""Request-level helpers every HTTP API shares: the serving object (503 while the models load,
while the server drains, or once an engine has died), and a non-streaming answer that aborts its
engine work when the client leaves first."""

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
    return serving_of(request.app.state)


def serving_of(state) -> OpenAIServing:
    """The serving object of an app's state, or the 503 that says why there is none to use."""
    if state.draining:
        raise APIError(503, "the server is shutting down; retry on another instance", type="service_unavailable",
                       code="shutting_down", headers={"Retry-After": "5"})
    if state.engine_error is not None:
        raise APIError(503, f"the engine failed and the server is restarting: {state.engine_error}",
                       type="service_unavailable", code="engine_dead", headers={"Retry-After": "5"})
    if state.serving is None:
        raise APIError(503, "the model is still loading; retry shortly", type="service_unavailable",
                       code="loading", headers={"Retry-After": "2"})
    return state.serving


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
