"""cache_control checkpoints through the OpenAI chat API: write then read, accounting, 400s."""

import httpx
import openai
import pytest

from kvserve.config import ServerConfig

from helpers import MODEL, ServerThread

SYSTEM = "You are a meticulous assistant. Answer briefly and precisely. " * 4   # ~250 bytes = tokens


@pytest.fixture(scope="module")
def server():
    with ServerThread(ServerConfig(cache_min_tokens=32)) as server:
        yield server


def chat(server, system_part: dict, question: str, **extra):
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
    return client.chat.completions.create(
        model=MODEL, max_tokens=4, temperature=0,
        messages=[{"role": "system", "content": [system_part]}, {"role": "user", "content": question}],
        **extra)


def test_first_call_writes_second_reads_the_checkpointed_prefix(server):
    part = {"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}
    salt = {"extra_body": {"cache_salt": "checkpoint-test"}}
    first = chat(server, part, "What is two plus two?", **salt).model_dump()["usage"]
    assert first["cache_creation_input_tokens"] > 0 and first["cache_read_input_tokens"] == 0
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    written = first["cache_creation_input_tokens"]
    # ByteTokenizer: "system: " + SYSTEM are the tokens before the mark; whole 16-token blocks only.
    prefix_tokens = len(("system: " + SYSTEM).encode())
    assert written == prefix_tokens // 16 * 16
    second = chat(server, part, "And three plus three?", **salt).model_dump()["usage"]
    assert second["cache_read_input_tokens"] == written and second["cache_creation_input_tokens"] == 0
    assert second["prompt_tokens_details"]["cached_tokens"] == written
    assert server.engine().stats().kv.num_pins >= 1


def test_streaming_reports_the_same_accounting(server):
    part = {"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral", "ttl": "1h"}}
    salt = {"extra_body": {"cache_salt": "stream-test"}}
    whole = chat(server, part, "Hi", **salt).model_dump()["usage"]
    chunks = list(chat(server, part, "Hello there", stream=True, stream_options={"include_usage": True}, **salt))
    streamed = chunks[-1].model_dump()["usage"]
    assert whole["cache_creation_input_tokens"] > 0
    assert streamed["cache_read_input_tokens"] == whole["cache_creation_input_tokens"]
    assert streamed["cache_creation_input_tokens"] == 0


def test_below_the_minimum_succeeds_and_pins_nothing(server):
    part = {"type": "text", "text": "Short.", "cache_control": {"type": "ephemeral"}}
    usage = chat(server, part, "Hello").model_dump()["usage"]
    assert usage["cache_creation_input_tokens"] == 0


def bad(server, messages) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/chat/completions", timeout=30,
                      json={"model": MODEL, "max_tokens": 2, "messages": messages})


def marked(text: str, ttl: str | None = None, kind: str = "ephemeral") -> dict:
    control = {"type": kind} | ({"ttl": ttl} if ttl else {})
    return {"type": "text", "text": text, "cache_control": control}


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user", "content": [marked(f"part {i}") for i in range(5)]}], "at most 4"),
    ([{"role": "system", "content": [marked("a", "5m")]}, {"role": "user", "content": [marked("b", "1h")]}],
     "longer ttl"),
    ([{"role": "user", "content": [marked("a", "10m")]}], "ttl must be one of"),
    ([{"role": "user", "content": [marked("a", kind="persistent")]}], "must be 'ephemeral'"),
    ([{"role": "user", "content": "hi", "cache_control": {"type": "ephemeral"}}], "content block"),
])
def test_invalid_checkpoints_get_clear_400s(server, messages, message):
    response = bad(server, messages)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["code"] in ("too_many_checkpoints", "invalid_cache_control")
    assert bad(server, [{"role": "user", "content": "still fine"}]).status_code == 200


def test_cache_metrics_move(server):
    from prometheus_client.parser import text_string_to_metric_families

    def samples() -> dict:
        text = httpx.get(f"{server.base_url}/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    key = lambda name, **labels: (name, tuple(sorted({"model_name": MODEL, **labels}.items())))  # noqa: E731
    before = samples()
    part = {"type": "text", "text": "metrics " + SYSTEM, "cache_control": {"type": "ephemeral"}}
    chat(server, part, "one")
    chat(server, part, "two")
    after = samples()
    written = after[key("kvserve:prompt_cache_write_tokens_total")] - before.get(key("kvserve:prompt_cache_write_tokens_total"), 0)
    read = after[key("kvserve:prompt_cache_read_tokens_total")] - before.get(key("kvserve:prompt_cache_read_tokens_total"), 0)
    assert written > 0 and read >= written
    assert after[key("kvserve:prompt_cache_pinned_blocks")] > 0
    assert key("kvserve:prompt_cache_ttl_expiries_total") in after
    assert key("kvserve:prompt_cache_evictions_total", reason="lru", tier="device") in after


@pytest.mark.parametrize("tool_choice", ["none", "auto"])
def test_a_checkpoint_on_a_tool_definition_pins_the_tools(server, tool_choice):
    from kvserve.server.tool_calls import CALL_INSTRUCTION

    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
    tools = [{"type": "function", "function": {"name": f"tool_{i}", "description": "Looks things up. " * 4,
                                               "parameters": {"type": "object", "properties": {}}}}
             for i in range(3)]
    tools[-1]["cache_control"] = {"type": "ephemeral"}

    def ask(question: str) -> dict:
        return client.chat.completions.create(model=MODEL, max_tokens=2, temperature=0, tools=tools,
                                              tool_choice=tool_choice, extra_body={"cache_salt": tool_choice},
                                              messages=[{"role": "user", "content": question}]).model_dump()["usage"]

    first, second = ask("Which tool?"), ask("And now?")
    assert first["cache_creation_input_tokens"] > 200 and first["cache_read_input_tokens"] == 0
    # The read covers the pinned tools, plus any further whole block both prompts share after it
    # (the line asking for calls, with "auto", then the template's "user: " turn header), which
    # automatic prefix caching finds as well. (The tiny model's tokenizer: a token per byte.)
    shared_after = 16 + (len(CALL_INSTRUCTION.encode()) if tool_choice == "auto" else 0)
    assert 0 <= second["cache_read_input_tokens"] - first["cache_creation_input_tokens"] <= shared_after
    assert second["cache_creation_input_tokens"] == 0
