"""Bad requests, table-driven, against a real uvicorn (in-process, on a thread).

Every bad request gets the OpenAI error shape {"error": {"message", "type", "param", "code"}}
with the documented status (see kvserve/server/protocol.py), never a 500, and leaves no admission
slot or engine request behind: a good request afterwards still succeeds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import httpx
import pytest
from helpers import MODEL, ServerThread, http_request_bytes, raw_http, single_torch_thread, wait_until

from kvserve.config import ServerConfig

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MAX_PROMPT_TOKENS = 64
MAX_BODY_BYTES = 2048
HI = [{"role": "user", "content": "hi"}]


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": HI, "max_tokens": 4, **fields}


def completion(**fields) -> dict:
    return {"model": MODEL, "prompt": "hi", "max_tokens": 4, **fields}


@dataclass
class Case:
    id: str
    body: dict | bytes | None                # dict → JSON; bytes → sent as they are; None → no body
    status: int
    param: str | None = None                 # expected error.param (exact) when given
    message: str | None = None               # a substring of error.message when given
    code: str | None = None                  # expected error.code when given
    path: str = CHAT
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": "application/json"})
    chunked: bool = False
    announce_only: bool = False              # send the headers (with Content-Length) but no body


BIG_PROMPT = "x" * 5000   # > MAX_BODY_BYTES once in JSON

CASES = [
    # ---- not JSON / not an object ----
    Case("malformed-json", b'{"messages": [', 400, message="not valid JSON", code="invalid_json"),
    Case("body-is-array", b"[1, 2]", 422, message="dictionary"),
    Case("body-is-string", b'"hi"', 422, message="dictionary"),
    Case("body-is-null", b"null", 422, message="dictionary"),
    Case("empty-body", b"", 422),
    # ---- wrong types / missing fields (schema: 422) ----
    Case("max-tokens-string", chat(max_tokens="x"), 422, param="max_tokens"),
    Case("temperature-string", chat(temperature="hot"), 422, param="temperature"),
    Case("messages-string", {"model": MODEL, "messages": "hi"}, 422, param="messages"),
    Case("stream-string", chat(stream="yes"), 422, param="stream"),
    Case("n-float", chat(n=1.5), 422, param="n"),
    Case("stop-not-strings", chat(stop=[1, 2]), 422, message="stop"),
    Case("missing-messages", {"model": MODEL, "max_tokens": 4}, 422, param="messages"),
    Case("missing-prompt", {"model": MODEL, "max_tokens": 4}, 422, param="prompt", path=COMPLETIONS),
    Case("prompt-mixed-list", completion(prompt=[1, "a"]), 422, message="prompt", path=COMPLETIONS),
    Case("unknown-role", chat(messages=[{"role": "wizard", "content": "hi"}]), 422, param="messages.0.role"),
    Case("content-part-unknown-type",
         chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
         422, message="messages.0.content"),
    # ---- messages against OpenAI's schema (role-dependent rules: 400) ----
    Case("user-without-content", chat(messages=[{"role": "user"}]), 400, param="messages.0.content",
         code="missing_content"),
    Case("user-content-null", chat(messages=[{"role": "user", "content": None}]), 400, param="messages.0.content"),
    Case("system-without-content", chat(messages=[{"role": "system"}, *HI]), 400, param="messages.0.content"),
    Case("assistant-without-content-or-tool-calls", chat(messages=[*HI, {"role": "assistant"}, *HI]), 400,
         param="messages.1.content"),
    Case("tool-without-tool-call-id", chat(messages=[*HI, {"role": "tool", "content": "42"}]), 400,
         param="messages.1.tool_call_id", code="missing_tool_call_id"),
    Case("tool-calls-on-a-user-message",
         chat(messages=[{"role": "user", "content": "hi", "tool_calls": [
             {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]),
         400, param="messages.0.tool_calls"),
    Case("tool-call-without-function", chat(messages=[*HI, {"role": "assistant", "tool_calls": [{"id": "c1"}]}]),
         422, message="messages.1.tool_calls.0.function"),
    Case("role-missing", chat(messages=[{"content": "hi"}]), 422, param="messages.0.role"),
    # ---- values out of range (400) ----
    Case("empty-messages", chat(messages=[]), 422, param="messages", message="must not be empty"),
    Case("unknown-model", chat(model="nope"), 404, param="model", code="model_not_found"),
    Case("max-tokens-0", chat(max_tokens=0), 400, param="max_tokens"),
    Case("max-tokens-negative", chat(max_tokens=-1), 400, param="max_tokens"),
    Case("max-completion-tokens-0", chat(max_completion_tokens=0), 400, message="max_tokens"),
    Case("max-tokens-past-context", chat(max_tokens=10**6), 400, param="max_tokens",
         code="context_length_exceeded"),
    Case("temperature-negative", chat(temperature=-1), 400, param="temperature"),
    Case("temperature-3", chat(temperature=3), 400, param="temperature"),
    Case("temperature-nan", json.dumps(chat()).replace('"max_tokens"', '"temperature": NaN, "max_tokens"').encode(),
         400, param="temperature"),
    Case("top-p-0", chat(top_p=0), 400, param="top_p"),
    Case("top-p-1.5", chat(top_p=1.5), 400, param="top_p"),
    Case("top-k-negative", chat(top_k=-1), 400, param="top_k"),
    Case("seed-negative", chat(seed=-1), 400, param="seed"),
    Case("17-stop-strings", chat(stop=[f"s{i}" for i in range(17)]), 400, param="stop"),
    Case("empty-stop-string", chat(stop=""), 400, param="stop"),
    Case("empty-stop-string-in-list", chat(stop=["a", ""]), 400, param="stop"),
    Case("stop-token-id-negative", chat(stop_token_ids=[-1]), 400, param="stop_token_ids"),
    Case("n-0", chat(n=0), 400, param="n"),
    Case("n-100", chat(n=100), 400, param="n"),
    Case("top-logprobs-50", chat(logprobs=True, top_logprobs=50), 400, param="top_logprobs"),
    Case("top-logprobs-without-logprobs", chat(top_logprobs=2), 400, param="top_logprobs"),
    Case("completions-logprobs-30", completion(logprobs=30), 400, param="logprobs", path=COMPLETIONS),
    Case("presence-penalty", chat(presence_penalty=1), 400, param="presence_penalty"),
    Case("frequency-penalty", chat(frequency_penalty=0.5), 400, param="frequency_penalty"),
    Case("stream-options-without-stream", chat(stream_options={"include_usage": True}), 400,
         param="stream_options"),
    Case("tools", chat(tools=[{"type": "code_interpreter"}]), 400, param="tools.0"),
    Case("echo", completion(echo=True), 400, param="echo", path=COMPLETIONS),
    Case("lone-surrogate-chat", json.dumps(chat(messages=[{"role": "user", "content": "a\ud800b"}])).encode(),
         400, param="messages"),
    Case("lone-surrogate-prompt", json.dumps(completion(prompt="a\udfffb")).encode(), 400, param="prompt",
         path=COMPLETIONS),
    # ---- prompts ----
    Case("prompt-too-long-chat", chat(messages=[{"role": "user", "content": "y" * 200}]), 400, param="messages",
         code="context_length_exceeded"),
    Case("prompt-too-long-completions", completion(prompt="y" * 200), 400, param="prompt",
         code="context_length_exceeded", path=COMPLETIONS),
    Case("prompt-ids-out-of-vocab", completion(prompt=[999999]), 400, param="prompt", path=COMPLETIONS),
    Case("prompt-ids-negative", completion(prompt=[-1]), 400, param="prompt", path=COMPLETIONS),
    Case("second-prompt-out-of-vocab", completion(prompt=[[1, 2, 3], [999999]]), 400, param="prompt",
         path=COMPLETIONS),
    Case("prompt-empty-list", completion(prompt=[]), 400, param="prompt", path=COMPLETIONS),
    Case("prompt-empty-string", completion(prompt=""), 400, param="prompt", path=COMPLETIONS),
    # ---- transport ----
    Case("body-too-large", completion(prompt=BIG_PROMPT), 413, code="body_too_large", path=COMPLETIONS),
    Case("body-too-large-announced", completion(prompt=BIG_PROMPT), 413, code="body_too_large", path=COMPLETIONS,
         announce_only=True),
    Case("body-too-large-chunked", completion(prompt=BIG_PROMPT), 413, code="body_too_large", path=COMPLETIONS,
         chunked=True),
    Case("unknown-route", None, 404, path="/v1/nope", method="GET", headers={}),
    Case("unknown-route-post", chat(), 404, path="/v1/chat/complete"),
    Case("wrong-method", None, 405, path=CHAT, method="GET", headers={}),
    Case("wrong-method-models", chat(), 405, path="/v1/models"),
]


@pytest.fixture(scope="module")
def server():
    with single_torch_thread(), ServerThread(ServerConfig(max_prompt_tokens=MAX_PROMPT_TOKENS,
                                                          max_body_bytes=MAX_BODY_BYTES)) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.base_url, timeout=30.0) as client:
        yield client


def test_there_are_enough_cases():
    assert len(CASES) >= 25
    assert len({case.id for case in CASES}) == len(CASES)


def send(server: ServerThread, case: Case) -> tuple[int, dict[str, str], bytes]:
    """The case as one raw HTTP/1.1 request (Content-Length, or chunked), written in one piece."""
    body = None
    if case.body is not None:
        body = case.body if isinstance(case.body, bytes) else json.dumps(case.body).encode()
    request = http_request_bytes(case.method, case.path, body, case.headers, chunked=case.chunked)
    if case.announce_only:
        request = request[:len(request) - len(body)]
    return raw_http(server.port, request)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_request(server: ServerThread, case: Case):
    status, headers, raw = send(server, case)
    assert status != 500, raw
    assert status == case.status, raw
    assert headers["content-type"] == "application/json", headers
    body = json.loads(raw)
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    if case.param is not None:
        assert error["param"] == case.param, error
    if case.message is not None:
        assert case.message in error["message"], error
    if case.code is not None:
        assert error["code"] == case.code, error
    # Nothing stays admitted or running after a rejected request.
    assert wait_until(server.idle), (server.in_flight(), server.engine().stats())


def test_good_request_still_succeeds(client: httpx.Client, server: ServerThread):
    for case in CASES:   # all of them again, back to back, then a good one
        assert send(server, case)[0] == case.status
    response = client.post(CHAT, json=chat(max_tokens=5, ignore_eos=True))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["usage"]["completion_tokens"] == 5
    assert body["choices"][0]["finish_reason"] == "length"
    response = client.post(COMPLETIONS, json=completion(prompt=[72, 105], max_tokens=3, ignore_eos=True))
    assert response.status_code == 200, response.text
    assert wait_until(server.idle)


def test_assistant_tool_calls_without_content_are_accepted(client: httpx.Client):
    """OpenAI's one exception to `content` being required: an assistant message with tool_calls."""
    call = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "x"}'}}
    messages = [*HI, {"role": "assistant", "tool_calls": [call]}, {"role": "tool", "tool_call_id": "c1", "content": "7"}]
    response = client.post(CHAT, json=chat(messages=messages, max_tokens=2))
    assert response.status_code == 200, response.text


def test_a_request_without_max_tokens_is_capped_by_max_tokens_default():
    """Regression: a message without content used to run to the end of the context (8 k tokens,
    minutes on a CPU). Now it is a 400, and a request that gives no max_tokens stops at
    --max-tokens-default."""
    with single_torch_thread(), ServerThread(ServerConfig(max_tokens_default=7)) as server, \
            httpx.Client(base_url=server.base_url, timeout=30.0) as client:
        body = {"model": MODEL, "messages": HI, "ignore_eos": True}
        response = client.post(CHAT, json=body)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 7
        assert response.json()["choices"][0]["finish_reason"] == "length"
        explicit = client.post(CHAT, json={**body, "max_tokens": 9}).json()   # an explicit value is not capped
        assert explicit["usage"]["completion_tokens"] == 9


def test_429_has_the_error_shape_and_retry_after():
    """Admission past capacity (max_num_seqs 1 + 0 queued): the second concurrent request gets 429."""
    config = ServerConfig(max_queued_requests=0, retry_after_s=3)
    with single_torch_thread(), ServerThread(config, max_num_seqs=1) as server, \
            httpx.Client(base_url=server.base_url, timeout=30.0) as client:
        with client.stream("POST", CHAT, json=chat(max_tokens=3000, ignore_eos=True, stream=True)) as first:
            assert first.status_code == 200
            response = client.post(CHAT, json=chat())
            assert response.status_code == 429, response.text
            assert response.headers["retry-after"] == "3"
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["type"] == "rate_limit_error" and error["code"] == "queue_full"
