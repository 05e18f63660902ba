"""Bedrock Runtime's Converse and ConverseStream through boto3's own `bedrock-runtime` client:
cachePoint checkpoints write then read, usage in Bedrock's convention, stop reasons, errors as
botocore's modelled exceptions, errors mid-stream, and disconnects that abort."""

import boto3
import httpx
import pytest
from botocore.config import Config
from botocore.eventstream import EventStreamBuffer
from botocore.exceptions import ClientError, EventStreamError

from kvserve.config import ServerConfig
from kvserve.server.auth import sigv4_access_key_id
from kvserve.server.bedrock import cache_details, error_name
from kvserve.server.protocol import APIError

from helpers import MODEL, ServerThread, single_torch_thread, wait_until

SYSTEM = "You are a meticulous assistant. Answer briefly and precisely. " * 4   # ~250 bytes = tokens
GREEDY = {"maxTokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def server():
    with single_torch_thread(), ServerThread(ServerConfig(cache_min_tokens=32)) as server:
        yield server


def client(server, **config):
    return boto3.client("bedrock-runtime", endpoint_url=server.base_url, region_name="us-east-1",
                        aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="secret",
                        config=Config(retries={"total_max_attempts": 1}, read_timeout=30, **config))


def ask(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"text": question}]}]


def cached_system(system: str, **point) -> list[dict]:
    return [{"text": system}, {"cachePoint": {"type": "default", **point}}]


def stream_events(server, **request) -> list[dict]:
    return list(client(server).converse_stream(modelId=MODEL, **request)["stream"])


def streamed(events: list[dict]) -> tuple[str, dict]:
    """(the text of the deltas, the metadata event), after checking the event order."""
    kinds = [next(iter(e)) for e in events]
    assert kinds[0] == "messageStart" and events[0]["messageStart"] == {"role": "assistant"}
    assert kinds[-3:] == ["contentBlockStop", "messageStop", "metadata"]
    assert set(kinds[1:-3]) <= {"contentBlockDelta"}
    text = "".join(e["contentBlockDelta"]["delta"]["text"] for e in events[1:-3])
    return text, {**events[-1]["metadata"], "stopReason": events[-2]["messageStop"]["stopReason"]}


def tagged(name: str) -> str:
    """SYSTEM behind a 16-byte tag: each test its own prefix, and "system: " + it fills whole
    blocks, so a second question (differing from its first byte) reads exactly the pinned blocks."""
    return f"[{name}]".ljust(16) + SYSTEM


def written_tokens(system: str) -> int:
    # ByteTokenizer: "system: " + the system text are the tokens before the mark; whole 16-token blocks only.
    return len(("system: " + system).encode()) // 16 * 16


def no_request_left(server) -> bool:
    """Like ServerThread.idle, but pinned blocks (earlier tests' checkpoints) may stay in use."""
    stats = server.engine().stats()
    return not server.in_flight() and not server.engine()._streams and stats.num_running == stats.num_waiting == 0


def check_totals(usage: dict) -> None:
    assert usage["totalTokens"] == (usage["inputTokens"] + usage["outputTokens"]
                                    + usage["cacheReadInputTokens"] + usage["cacheWriteInputTokens"])
    assert usage["inputTokens"] > 0   # the user's question is never cached here


def test_converse_writes_then_reads_the_checkpointed_system_prompt(server):
    system = tagged("converse")
    first = client(server).converse(modelId=MODEL, system=cached_system(system), messages=ask("What is 2+2?"),
                                    inferenceConfig=GREEDY)
    usage = first["usage"]
    written = written_tokens(system)
    assert usage["cacheWriteInputTokens"] == written > 0 and usage["cacheReadInputTokens"] == 0
    assert usage["cacheDetails"] == [{"ttl": "5m", "inputTokens": written}]
    assert usage["outputTokens"] == 8 and first["stopReason"] == "max_tokens"
    check_totals(usage)
    assert first["output"]["message"]["role"] == "assistant"
    assert isinstance(first["output"]["message"]["content"][0]["text"], str)
    assert isinstance(first["metrics"]["latencyMs"], int) and first["metrics"]["latencyMs"] >= 0

    second = client(server).converse(modelId=MODEL, system=cached_system(system), messages=ask("And 3+3?"),
                                     inferenceConfig=GREEDY)["usage"]
    assert second["cacheReadInputTokens"] == written and second["cacheWriteInputTokens"] == 0
    assert second["cacheDetails"] == []
    check_totals(second)


def test_converse_stream_writes_then_reads_and_matches_converse(server):
    system = tagged("stream")
    text, first = streamed(stream_events(server, system=cached_system(system, ttl="1h"),
                                         messages=ask("What is 2+2?"), inferenceConfig=GREEDY))
    written = written_tokens(system)
    assert first["usage"]["cacheWriteInputTokens"] == written and first["usage"]["cacheReadInputTokens"] == 0
    assert first["usage"]["cacheDetails"] == [{"ttl": "1h", "inputTokens": written}]
    assert isinstance(first["metrics"]["latencyMs"], int)
    check_totals(first["usage"])

    text, second = streamed(stream_events(server, system=cached_system(system, ttl="1h"),
                                          messages=ask("And 3+3?"), inferenceConfig=GREEDY))
    assert second["usage"]["cacheReadInputTokens"] == written and second["usage"]["cacheWriteInputTokens"] == 0
    assert second["usage"]["cacheDetails"] == []
    assert text and second["stopReason"] == "max_tokens" and second["usage"]["outputTokens"] == 8

    whole = client(server).converse(modelId=MODEL, system=cached_system(system, ttl="1h"), messages=ask("And 3+3?"),
                                    inferenceConfig=GREEDY)
    assert whole["output"]["message"]["content"] == [{"text": text}]
    assert whole["stopReason"] == second["stopReason"]


def test_tool_specs_are_prompt_text_and_mixed_ttls_split_the_writes(server):
    tools = [{"toolSpec": {"name": f"lookup_{i}", "description": "Look a word up in the dictionary.",
                           "inputSchema": {"json": {"type": "object", "properties": {"word": {"type": "string"}}}}}}
             for i in range(2)]
    request = dict(modelId=MODEL, toolConfig={"tools": tools + [{"cachePoint": {"type": "default", "ttl": "1h"}}]},
                   system=cached_system(tagged("tools")), messages=ask("Define 'cache'."), inferenceConfig=GREEDY,
                   additionalModelRequestFields={"top_k": 5})
    usage = client(server).converse(**request)["usage"]
    details = usage["cacheDetails"]
    assert [d["ttl"] for d in details] == ["1h", "5m"]
    assert sum(d["inputTokens"] for d in details) == usage["cacheWriteInputTokens"] > 0
    again = client(server).converse(**{**request, "messages": ask("Define 'pin'.")})["usage"]
    assert again["cacheReadInputTokens"] > 0 and again["cacheWriteInputTokens"] == 0


def test_stop_sequences_and_max_tokens(server):
    request = dict(modelId=MODEL, messages=ask("Count: one two three"))
    text = client(server).converse(**request, inferenceConfig={"maxTokens": 24, "temperature": 0})
    text = text["output"]["message"]["content"][0]["text"]
    stop = next((c for c in text[1:] if c != text[0] and c.isascii() and c.isprintable()), None)
    assert stop is not None, f"greedy output {text!r} has no second printable character; pick another prompt"
    stopped = client(server).converse(**request, inferenceConfig={"maxTokens": 24, "temperature": 0,
                                                                 "stopSequences": [stop]})
    assert stopped["stopReason"] == "stop_sequence"
    assert stopped["output"]["message"]["content"][0]["text"] == text[:text.index(stop)]
    events = stream_events(server, messages=request["messages"], inferenceConfig={"maxTokens": 24, "temperature": 0,
                                                                "stopSequences": [stop]})
    assert streamed(events)[0] == text[:text.index(stop)] and streamed(events)[1]["stopReason"] == "stop_sequence"

    short = client(server).converse(**request, inferenceConfig={"maxTokens": 3, "temperature": 0})
    assert short["stopReason"] == "max_tokens" and short["usage"]["outputTokens"] == 3


@pytest.mark.parametrize("request_, error", [
    (dict(modelId="no-such-model", messages=ask("hi")), "ResourceNotFoundException"),
    (dict(modelId=MODEL, system=cached_system(SYSTEM, ttl="10m"), messages=ask("hi")), "ValidationException"),
    (dict(modelId=MODEL, messages=ask("hi"), inferenceConfig={"maxTokens": 0}), "ValidationException"),
    (dict(modelId=MODEL, messages=[{"role": "user", "content": [{"cachePoint": {"type": "default"}}]}]),
     "ValidationException"),
    (dict(modelId=MODEL, messages=[{"role": "user", "content": [{"image": {"format": "png",
                                                                          "source": {"bytes": b"x"}}}]}]),
     "ValidationException"),
    # Bedrock's schema: every message has content, and no text block is blank
    (dict(modelId=MODEL, messages=[{"role": "user", "content": []}]), "ValidationException"),
    (dict(modelId=MODEL, messages=[{"role": "user", "content": [{"text": "  "}]}]), "ValidationException"),
    (dict(modelId=MODEL, messages=[{"role": "user"}]), "ValidationException"),
])
def test_errors_are_botocores_modelled_exceptions(server, request_, error):
    # parameter_validation off: botocore itself refuses maxTokens 0; the server must too.
    bedrock = client(server, parameter_validation=False)
    for call in (bedrock.converse, bedrock.converse_stream):
        with pytest.raises(ClientError) as caught:
            call(**request_)
        assert caught.value.response["Error"]["Code"] == error
        assert isinstance(caught.value, getattr(bedrock.exceptions, error))
        assert caught.value.response["Error"]["Message"]


def test_error_shape_on_the_wire(server):
    response = httpx.post(f"{server.base_url}/model/nope/converse", json={"messages": ask("hi")}, timeout=30)
    assert response.status_code == 404
    assert response.headers["x-amzn-ErrorType"] == "ResourceNotFoundException"
    assert set(response.json()) == {"message"} and "nope" in response.json()["message"]
    bad = httpx.post(f"{server.base_url}/model/{MODEL}/converse", content=b"{not json", timeout=30)
    assert bad.status_code == 400 and bad.headers["x-amzn-ErrorType"] == "ValidationException"
    stream = httpx.post(f"{server.base_url}/model/{MODEL}/converse-stream", timeout=30,
                        json={"messages": ask("hi"), "inferenceConfig": {"maxTokens": 1, "temperature": 0}})
    assert stream.status_code == 200 and stream.headers["content-type"] == "application/vnd.amazon.eventstream"
    buffer = EventStreamBuffer()
    buffer.add_data(stream.content)
    kinds = [m.headers[":event-type"] for m in buffer]
    assert kinds[0] == "messageStart" and kinds[-3:] == ["contentBlockStop", "messageStop", "metadata"]


def test_sigv4_access_key_id_of_a_boto3_request(server):
    seen = {}

    def capture(request, **_):
        seen.update(request.headers)

    bedrock = client(server)
    bedrock.meta.events.register("before-send.bedrock-runtime.Converse", capture)
    bedrock.converse(modelId=MODEL, messages=ask("hi"), inferenceConfig={"maxTokens": 1})
    assert seen["Authorization"].startswith(b"AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
    assert sigv4_access_key_id(seen["Authorization"].decode()) == "AKIDEXAMPLE"


@pytest.mark.parametrize("value", [None, "", "Bearer sk-123", "AWS4-HMAC-SHA256 SignedHeaders=host, Signature=ab",
                                   "AWS4-HMAC-SHA256 Credential=AKID/20250101/us-east-1, Signature=ab"])
def test_sigv4_access_key_id_without_a_sigv4_credential(value):
    assert sigv4_access_key_id(value or "") is None


def test_engine_failure_midway_is_an_exception_event(server, monkeypatch):
    serving = server.app.state.serving
    chat = serving.chat

    async def failing_chat(body, tenant=None):
        generation = await chat(body, tenant=tenant)
        real = generation.chunks

        async def chunks():
            async for chunk in real():
                yield chunk
                if any(c["delta"].get("content") for c in chunk["choices"]):
                    raise APIError(503, "the engine failed: injected", type="service_unavailable")

        generation.chunks = chunks
        return generation

    monkeypatch.setattr(serving, "chat", failing_chat)
    stream = client(server).converse_stream(modelId=MODEL, messages=ask("fail soon"),
                                            inferenceConfig={"maxTokens": 500, "temperature": 0})["stream"]
    events = iter(stream)
    assert next(events) == {"messageStart": {"role": "assistant"}}
    with pytest.raises(EventStreamError) as caught:
        list(events)
    assert caught.value.response["Error"] == {"Code": "serviceUnavailableException",
                                              "Message": "the engine failed: injected"}
    assert wait_until(lambda: no_request_left(server), timeout_s=10)


def test_a_client_that_leaves_aborts_its_request():
    long = {"maxTokens": 2000, "temperature": 0}   # 20 s of 10 ms steps, unless aborted
    with single_torch_thread(), ServerThread(ServerConfig(), step_delay_s=0.01) as slow:
        stream = client(slow).converse_stream(modelId=MODEL, messages=ask("a long answer please"),
                                              inferenceConfig=long)["stream"]
        events = iter(stream)
        while "contentBlockDelta" not in next(events):
            pass
        assert slow.in_flight() == 1
        stream.close()
        assert wait_until(slow.idle, timeout_s=5)

        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{slow.base_url}/model/{MODEL}/converse", timeout=httpx.Timeout(30, read=0.5),
                       json={"messages": ask("another long answer"), "inferenceConfig": long})
        assert wait_until(slow.idle, timeout_s=5)


def test_writes_per_ttl_come_from_the_engine_counts():
    assert cache_details({"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0}) == []
    assert cache_details({"ephemeral_5m_input_tokens": 48, "ephemeral_1h_input_tokens": 16}) == [
        {"ttl": "1h", "inputTokens": 16}, {"ttl": "5m", "inputTokens": 48}]


@pytest.mark.parametrize("error, expected", [
    (APIError(422, "x"), (400, "ValidationException")),
    (APIError(413, "x"), (400, "ValidationException")),
    (APIError(401, "x"), (403, "AccessDeniedException")),
    (APIError(429, "x", code="queue_full"), (429, "ThrottlingException")),
    (APIError(503, "x", code="loading"), (429, "ModelNotReadyException")),
    (APIError(503, "x"), (503, "ServiceUnavailableException")),
    (APIError(500, "x"), (500, "InternalServerException")),
])
def test_error_mapping(error, expected):
    assert error_name(error) == expected
