"""Anthropic's Messages API (/v1/messages) driven by the official `anthropic` SDK: streamed and
non-streamed answers agree, prompt-cache accounting in Anthropic's convention, stop reasons, errors
in Anthropic's shape, and a disconnect aborts.

The tiny random model behind a ByteTokenizer: one prompt token per UTF-8 byte of the rendered
chat template ("system: ...\\nuser: ...\\nassistant: "), 16-token blocks. Each test uses its own
system text, so no test reads another's cached prefix.
"""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest
from helpers import MODEL, ServerThread, metric, metric_samples, single_torch_thread, wait_until

from kvserve.config import ServerConfig
from kvserve.server.anthropic_api import matched_stop
from kvserve.server.auth import ApiKeys, Principal

GREEDY = {"extra_body": {"temperature": 0}}   # this SDK version has no temperature keyword
BLOCK_SIZE = 16


@pytest.fixture(scope="module")
def server():
    with single_torch_thread(), ServerThread(ServerConfig(cache_min_tokens=32)) as server:
        yield server


@pytest.fixture(scope="module")
def client(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def rendered_length(system: str, question: str) -> int:
    return len(f"system: {system}\nuser: {question}\nassistant: ".encode())


# ---- answers ------------------------------------------------------------------------------------
def test_non_streaming_and_both_streaming_forms_agree(client):
    request = dict(model=MODEL, max_tokens=24, messages=ask("Tell me about kv caches."), **GREEDY)
    whole = client.messages.create(**request)
    assert whole.type == "message" and whole.role == "assistant" and whole.model == MODEL
    assert whole.id.startswith("msg_")
    assert [block.type for block in whole.content] == ["text"] and whole.content[0].text
    usage = whole.usage
    assert usage.output_tokens > 0 and usage.input_tokens > 0
    assert usage.cache_read_input_tokens is not None and usage.cache_creation_input_tokens == 0

    with client.messages.stream(**request) as stream:
        streamed_text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed_text == whole.content[0].text == final.content[0].text
    assert final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == usage.output_tokens

    events = list(client.messages.create(stream=True, **request))
    kinds = [event.type for event in events]   # the SDK drops `ping`
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) == {"content_block_delta"}
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == whole.content[0].text
    assert events[-2].delta.stop_reason == whole.stop_reason
    assert events[-2].usage.output_tokens == usage.output_tokens


def test_the_wire_stream_has_named_events_and_a_ping(server):
    body = {"model": MODEL, "max_tokens": 4, "stream": True, "temperature": 0, "messages": ask("Ping?")}
    with httpx.stream("POST", f"{server.base_url}/v1/messages", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    payloads = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert [p["type"] for p in payloads] == names
    assert payloads[0]["message"]["content"] == [] and payloads[0]["message"]["usage"]["output_tokens"] == 0


# ---- prompt caching -----------------------------------------------------------------------------
def test_a_system_checkpoint_is_written_then_read(client):
    blocks = [{"type": "text", "text": "You are the checkpoint-test assistant of kvserve. " * 3},
              {"type": "text", "text": "Answer in one short sentence, plainly and precisely. " * 2,
               "cache_control": {"type": "ephemeral"}}]
    system = "".join(block["text"] for block in blocks)
    assert len(system) >= 200
    written = len(f"system: {system}".encode()) // BLOCK_SIZE * BLOCK_SIZE   # whole blocks only

    def call(question: str):
        return client.messages.create(model=MODEL, max_tokens=4, system=blocks, messages=ask(question), **GREEDY)

    first = call("What is two plus two?").usage
    assert first.cache_creation_input_tokens == written and first.cache_read_input_tokens == 0
    # Anthropic's convention: input_tokens are neither read nor written; the three add up to the prompt.
    assert first.input_tokens == rendered_length(system, "What is two plus two?") - written

    second = call("And three plus three?").usage
    assert second.cache_read_input_tokens == written and second.cache_creation_input_tokens == 0
    assert second.input_tokens == rendered_length(system, "And three plus three?") - written

    question = "Streamed, four plus four?"
    with client.messages.stream(model=MODEL, max_tokens=4, system=blocks, messages=ask(question),
                                **GREEDY) as stream:
        events = list(stream)
        final = stream.get_final_message().usage
    start = events[0].message.usage   # the cache counts are final by the first output
    assert (start.cache_read_input_tokens, start.cache_creation_input_tokens) == (written, 0)
    assert start.input_tokens == final.input_tokens == rendered_length(system, question) - written
    assert (final.cache_read_input_tokens, final.cache_creation_input_tokens) == (written, 0)


def test_a_tool_checkpoint_and_top_level_cache_control_pin_prefixes(client):
    tools = [{"name": "lookup_tool_checkpoint_test", "description": "Look a word up in the dictionary test.",
              "input_schema": {"type": "object", "properties": {"word": {"type": "string"}}},
              "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
    usage = client.messages.create(model=MODEL, max_tokens=2, tools=tools, system="Be brief.",
                                   messages=ask("Define cache."), **GREEDY).usage
    assert usage.cache_creation_input_tokens >= 32 and usage.cache_read_input_tokens == 0

    conversation = ask("Automatic caching marks this last block of the conversation, which is long enough. " * 2)
    first = client.messages.create(model=MODEL, max_tokens=2, messages=conversation,
                                   cache_control={"type": "ephemeral"}, **GREEDY).usage
    assert first.cache_creation_input_tokens >= 128 and first.cache_read_input_tokens == 0


# ---- stop reasons -------------------------------------------------------------------------------
def test_a_stop_sequence_is_reported_by_name(client):
    request = dict(model=MODEL, max_tokens=40, messages=ask("Stop sequence test, go."), **GREEDY)
    text = client.messages.create(**request).content[0].text
    # a short printable piece from the middle of the greedy answer: it must stop the same answer there
    at = next(i for i in range(2, len(text) - 2) if text[i:i + 2].isprintable() and text[i:i + 2].isascii())
    stop = text[at:at + 2]
    cut = text.find(stop)

    whole = client.messages.create(stop_sequences=["never-in-this-text", stop], **request)
    assert (whole.stop_reason, whole.stop_sequence) == ("stop_sequence", stop)
    assert whole.content[0].text == text[:cut]

    with client.messages.stream(stop_sequences=[stop], **request) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence, final.content[0].text) == ("stop_sequence", stop, text[:cut])


def test_max_tokens_and_unmatched_stop_sequences(client):
    message = client.messages.create(model=MODEL, max_tokens=3, messages=ask("Hello there"),
                                     stop_sequences=["\x00no such text"], **GREEDY)
    assert (message.stop_reason, message.stop_sequence) == ("max_tokens", None)
    assert message.usage.output_tokens == 3


def test_matched_stop_follows_the_detokenizers_rule():
    assert matched_stop("abcdef", ["ef", "cd"]) == "cd"            # ends first
    assert matched_stop("xab", ["b", "ab"]) == "ab"                # same end: the one starting first
    assert matched_stop("abcabc", ["bc", "zz"]) == "bc"
    assert matched_stop("plain end of text", ["STOP"]) is None     # an end token: end_turn


# ---- errors -------------------------------------------------------------------------------------
def marked(text: str, **control) -> dict:
    return {"type": "text", "text": text, "cache_control": {"type": "ephemeral", **control}}


@pytest.mark.parametrize("body, status, kind, message", [
    ({"model": MODEL, "messages": ask("hi")}, 400, "invalid_request_error", "max_tokens"),
    ({"model": "no-such-model", "max_tokens": 2, "messages": ask("hi")}, 404, "not_found_error", "no-such-model"),
    ({"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": [marked("a", ttl="10m")]}]},
     400, "invalid_request_error", "ttl must be one of"),
    ({"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": [marked(f"p{i}") for i in range(5)]}]},
     400, "invalid_request_error", "at most 4"),
    ({"model": MODEL, "max_tokens": 2, "messages": []}, 400, "invalid_request_error", "messages"),
    ({"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}]}]},
     400, "invalid_request_error", "only text content blocks"),
    ({"model": MODEL, "max_tokens": 2, "messages": ask("hi") + [{"role": "assistant", "content": "Sure,"}]},
     400, "invalid_request_error", "prefill"),
    ({"model": MODEL, "max_tokens": 0, "messages": ask("hi")}, 400, "invalid_request_error", "max_tokens"),
    # Anthropic's schema: content is required and must say something
    ({"model": MODEL, "max_tokens": 2, "messages": [{"role": "user"}]}, 400, "invalid_request_error",
     "messages.0.content"),
    ({"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": []}]}, 400, "invalid_request_error",
     "non-empty content"),
    ({"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": ""}]}, 400, "invalid_request_error",
     "must be non-empty"),
    ({"model": MODEL, "max_tokens": 2, "messages": [{"role": "system", "content": "hi"}]}, 400,
     "invalid_request_error", "messages.0.role"),
])
def test_errors_take_anthropics_shape(server, body, status, kind, message):
    response = httpx.post(f"{server.base_url}/v1/messages", json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()
    assert error["type"] == "error" and set(error["error"]) == {"type", "message"}
    assert error["error"]["type"] == kind and message in error["error"]["message"]


def test_invalid_json_is_a_400(server):
    response = httpx.post(f"{server.base_url}/v1/messages", content=b"{not json",
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


def test_the_sdk_raises_its_own_error_classes(client):
    with pytest.raises(anthropic.NotFoundError) as raised:
        client.messages.create(model="no-such-model", max_tokens=2, messages=ask("hi"))
    assert raised.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.NotFoundError):
        with client.messages.stream(model="no-such-model", max_tokens=2, messages=ask("hi")) as stream:
            stream.get_final_message()
    with pytest.raises(anthropic.BadRequestError, match="ttl"):
        client.messages.create(model=MODEL, max_tokens=2, system=[marked("a", ttl="2h")], messages=ask("hi"))
    with pytest.raises(anthropic.BadRequestError, match="at most 4"):
        client.messages.create(model=MODEL, max_tokens=2, system=[marked(f"s{i}") for i in range(5)],
                               messages=ask("hi"))


# ---- disconnect ---------------------------------------------------------------------------------
def test_a_client_that_leaves_mid_stream_aborts_its_request(server, client):
    def aborted() -> float:
        samples = metric_samples(httpx.get(f"{server.base_url}/metrics", timeout=10).text)
        return metric(samples, "kvserve:request_success_total", model_name=MODEL, finished_reason="abort")

    before = aborted()
    with client.messages.stream(model=MODEL, max_tokens=2000, messages=ask("Count slowly"), **GREEDY) as stream:
        for event in stream:
            if event.type == "content_block_delta":
                break
    # (server.idle() would also wait for the KV pool to empty, which the pins above prevent)
    assert wait_until(lambda: aborted() == before + 1)
    assert wait_until(lambda: server.in_flight() == 0)


# ---- API keys -----------------------------------------------------------------------------------
def test_api_keys_authenticate_and_tenants_do_not_share_the_cache():
    keys = ApiKeys({"sk-a": Principal("alpha", False), "sk-b": Principal("beta", False)})
    system = [marked("A tenant-scoped system prompt for the Messages API isolation test. " * 3)]

    with single_torch_thread(), ServerThread(ServerConfig(cache_min_tokens=32), api_keys=keys) as server:
        response = httpx.post(f"{server.base_url}/v1/messages", timeout=30,
                              json={"model": MODEL, "max_tokens": 2, "messages": ask("hi")})
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"

        def usage(key: str):
            sdk = anthropic.Anthropic(base_url=server.base_url, api_key=key, max_retries=0, timeout=60)
            return sdk.messages.create(model=MODEL, max_tokens=2, system=system, messages=ask("hi"), **GREEDY).usage

        with pytest.raises(anthropic.AuthenticationError):
            usage("sk-wrong")
        written = usage("sk-a").cache_creation_input_tokens
        assert written > 0
        assert usage("sk-a").cache_read_input_tokens >= written   # the same prompt: LRU blocks past the pin too
        other = usage("sk-b")   # the same prompt under another tenant: nothing read, its own pin written
        assert other.cache_read_input_tokens == 0 and other.cache_creation_input_tokens == written
