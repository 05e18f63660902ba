"""Routers over two tiny random engines, on a real server (the real pair's tests are in
tests/integration/test_chat_pair.py).

A router's lexical signals read the message being answered, as the API layer knows it, whatever
the chat template wraps it in (server/routers.py turn_of). The tiny model's template has no turn
markers at all, like a template whose reply marker does not close the user's turn (Phi-3,
Mistral v1): found from the prompt's tokens alone, the "latest turn" there is the whole prompt.
Also: a routed answer with n choices pays its prompt once per model, as a model named directly
does; an error a routed stream raises mid-answer reaches the client as an API error."""

from __future__ import annotations

import math

import httpx
import pytest

from helpers import ServerThread, make_engine, single_torch_thread
from kvserve.config import ServerConfig
from kvserve.engine.async_engine import AsyncEngine
from kvserve.routing.router import RouterConfig
from kvserve.server.openai_api import latest_message_text
from kvserve.server.protocol import ChatMessage

QUESTION = "What is 47 + 38? Answer with just the number."


@pytest.fixture(scope="module")
def router_server():
    config = ServerConfig(routers=(RouterConfig(name="chat", models=("small", "large")),
                                   RouterConfig(name="pinned", models=("small", "large"), predict=False,
                                                escalation="off")))
    engines = lambda: {"small": AsyncEngine(make_engine()), "large": AsyncEngine(make_engine())}  # noqa: E731
    with single_torch_thread(), ServerThread(config, engines) as server:
        yield server.base_url


def routing_of(base_url: str, path: str, body: dict) -> dict:
    response = httpx.post(f"{base_url}{path}", json={"model": "chat", "max_tokens": 2, "temperature": 0, **body},
                          timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["routing"]


def test_the_signals_read_the_message_being_answered_not_the_history(router_server):
    history = []
    for i in range(8):
        history += [{"role": "user", "content": f"Tell me about topic {i}, please."},
                    {"role": "assistant", "content": "It is a broad subject with a long history. " * 4}]
    question = {"role": "user", "content": QUESTION}
    alone = routing_of(router_server, "/v1/chat/completions", {"messages": [question]})["signals"]
    after = routing_of(router_server, "/v1/chat/completions", {"messages": history + [question]})["signals"]
    # One byte a token: the question's own length, with nothing of the template or the history.
    assert alone["log_turn_tokens"] == pytest.approx(math.log1p(len(QUESTION.encode())), abs=1e-4)
    assert {k: after[k] for k in ("log_turn_tokens", "code", "digits")} == \
        {k: alone[k] for k in ("log_turn_tokens", "code", "digits")}
    # A reply being continued (an assistant message last) is not what is answered.
    prefilled = routing_of(router_server, "/v1/chat/completions",
                           {"messages": [question, {"role": "assistant", "content": "The answer is"}]})["signals"]
    assert prefilled["log_turn_tokens"] == alone["log_turn_tokens"]


def test_a_raw_completion_prompt_is_read_whole(router_server):
    """No messages: the span between turn markers, here (none) the whole prompt."""
    prompt = "history " * 20 + QUESTION
    signals = routing_of(router_server, "/v1/completions", {"prompt": prompt})["signals"]
    assert signals["log_turn_tokens"] == pytest.approx(math.log1p(len(prompt.encode())), abs=1e-4)


def test_latest_message_text():
    def message(role: str, content) -> ChatMessage:
        return ChatMessage(role=role, content=content)

    assert latest_message_text([message("system", "s"), message("user", "q")]) == "q"
    assert latest_message_text([message("user", "q"), message("assistant", "partial")]) == "q"
    assert latest_message_text([message("user", "q"), message("tool", "42")]) == "42"
    assert latest_message_text([message("user", [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])]) == "ab"
    assert latest_message_text([message("assistant", "only")]) == "only"


def test_n_routed_choices_pay_the_prompt_once_as_a_model_named_directly_does(router_server):
    body = {"messages": [{"role": "user", "content": QUESTION}], "n": 2, "max_tokens": 3, "temperature": 0}
    costs = {}
    for model in ("pinned", "small"):      # "pinned": the router that always keeps the small model
        response = httpx.post(f"{router_server}/v1/chat/completions", json={"model": model, **body}, timeout=60)
        assert response.status_code == 200, response.text
        usage = response.json()["usage"]
        costs[model] = usage["cost"]["weighted"]
    assert usage["completion_tokens"] == 6
    assert costs["pinned"] == pytest.approx(costs["small"])


def test_an_error_a_routed_stream_raises_mid_answer_is_an_api_error():
    """A routed stream starts engines as it goes (escalation, hand-off): one that refuses the
    request raises InvalidRequestError from inside the stream. It reaches the consumer as a 400,
    which the SSE writer sends as an in-band error frame (an unknown exception cut the stream)."""
    import asyncio
    import time

    from kvserve.outputs import RequestOutput, RequestStats
    from kvserve.sampling import InvalidRequestError
    from kvserve.server.metrics import ServerMetrics
    from kvserve.server.openai_api import Generation
    from kvserve.server.protocol import APIError

    class Refused:
        decision, quiet, finished, answering_model, runs = object(), False, False, "small", []

        def __aiter__(self):
            return self

        async def __anext__(self):
            if not hasattr(self, "sent"):
                self.sent = True
                return RequestOutput("r", "Hi", (5,), None, None, RequestStats(3, 0, 1, 4))
            raise InvalidRequestError("the prompt has 90 tokens; this model's context allows at most 79", "prompt")

        def abort(self):
            pass

    class Model:
        name, live, in_flight, background_in_flight, members = "chat", set(), 1, 0, {}

    async def consume():
        generation = Generation("chat", Model(), [Refused()], [3], False, None, ServerMetrics(lambda: {}),
                                time.monotonic())
        return [chunk async for chunk in generation.chunks()]

    with pytest.raises(APIError) as caught:
        asyncio.run(consume())
    assert caught.value.status == 400 and "context allows" in str(caught.value)


def test_a_request_cut_short_is_charged_for_what_the_engine_generated_not_what_was_read():
    """The client reads one delta and goes; the engine had generated 7 tokens by then (put, unread):
    the weighted cost, the tenant's token count and its lease count 7, not 1."""
    import asyncio
    import time

    from kvserve.outputs import RequestOutput, RequestStats
    from kvserve.server.metrics import ServerMetrics
    from kvserve.server.openai_api import Generation

    class Ahead:
        quiet, finished = False, False

        def __aiter__(self):
            return self

        async def __anext__(self):
            if not hasattr(self, "sent"):
                self.sent = True
                return RequestOutput("r", "Hi", (5,), None, None, RequestStats(3, 0, 1, 4))
            await asyncio.sleep(3600)

        def latest_stats(self):
            return RequestStats(3, 0, 7, 10)

        def abort(self):
            pass

    class Model:
        name, live, in_flight, background_in_flight, cost_weight = "m", set(), 1, 0, 2.0

    class Lease:
        def release(self, generated):
            self.generated = generated

    lease = Lease()
    metrics = ServerMetrics(lambda: {})

    async def consume_one():
        generation = Generation("chat", Model(), [Ahead()], [3], False, None, metrics, time.monotonic(),
                                lease=lease)
        chunks = generation.chunks()
        await chunks.__anext__()                      # the role chunk
        await chunks.__anext__()                      # "Hi"
        await chunks.aclose()                         # the client went away
        return generation

    generation = asyncio.run(consume_one())
    assert generation.cost()["weighted"] == 2.0 * (3 + 7)
    assert lease.generated == 7
    assert metrics.weighted_cost.labels("m")._value.get() == 20.0

    # The Anthropic API wraps each choice's stream (to read its token ids): the stats show through.
    from kvserve.outputs import latest_stats
    from kvserve.server.anthropic_api import _RecordedStream
    assert latest_stats(_RecordedStream(Ahead())) == RequestStats(3, 0, 7, 10)
