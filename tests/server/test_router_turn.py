"""A router's lexical signals read the message being answered, as the API layer knows it, whatever
the chat template wraps it in (server/routers.py turn_of). The tiny model's template has no turn
markers at all, like a template whose reply marker does not close the user's turn (Phi-3,
Mistral v1): found from the prompt's tokens alone, the "latest turn" there is the whole prompt."""

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
    config = ServerConfig(routers=(RouterConfig(name="chat", models=("small", "large")),))
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
