"""Compaction on the HTTP APIs (the tiny model; its summaries are noise, the mechanics are not):
OpenAI `truncation: "auto"` and kvserve's `compaction` on chat completions, Anthropic's
`context_management` compact edit; `usage.compaction`; the summary reused on the next turn, so
the prompt keeps its cached prefix; bad settings are 400s."""

from __future__ import annotations

import anthropic
import httpx
import pytest
from helpers import MODEL, ServerThread, metric, metric_samples, single_torch_thread

@pytest.fixture(scope="module")
def server():
    with single_torch_thread(), ServerThread() as server:
        yield server


LONG = "The warehouse in Lyon ships orders every Tuesday and Friday. " * 3


def history(turns: int) -> list[dict]:
    messages = [{"role": "system", "content": "You are a support assistant."}]
    for i in range(turns):
        messages += [{"role": "user", "content": f"Question {i}: {LONG}"},
                     {"role": "assistant", "content": f"Answer {i}: noted."}]
    return messages + [{"role": "user", "content": "What day do orders ship?"}]


def chat(server, messages, **extra) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/chat/completions", timeout=60,
                      json={"model": MODEL, "messages": messages, "max_tokens": 4, "temperature": 0, **extra})


def test_truncation_auto_compacts_and_the_next_turn_reuses_the_summary(server):
    budget = 1200
    first = chat(server, history(8), compaction={"budget_tokens": budget})
    assert first.status_code == 200, first.text
    usage = first.json()["usage"]
    report = usage["compaction"]
    assert report["tokens_before"] > budget >= report["tokens_after"] == usage["prompt_tokens"]
    assert report["compacted_messages"] >= 2 and not report["summary_reused"]
    # The next turn: the client resends everything, one exchange longer.
    longer = history(8)[:-1] + [{"role": "user", "content": "What day do orders ship?"},
                               {"role": "assistant", "content": "Tuesday and Friday."},
                               {"role": "user", "content": "Thanks!"}]
    second = chat(server, longer, compaction={"budget_tokens": budget})
    report2 = second.json()["usage"]["compaction"]
    assert report2["summary_reused"] and report2["compacted_messages"] == report["compacted_messages"]
    assert second.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= report["tokens_after"] - 64
    samples = metric_samples(httpx.get(f"{server.base_url}/metrics").text)
    assert metric(samples, "kvserve:compactions_total", model_name=MODEL, summary="reused") >= 1


def test_short_histories_are_left_alone(server):
    response = chat(server, history(1), truncation="auto")
    assert response.status_code == 200 and "compaction" not in response.json()["usage"]


def test_without_compaction_a_long_history_is_refused(server):
    response = chat(server, history(60))
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    compacted = chat(server, history(60), truncation="auto")
    assert compacted.status_code == 200, compacted.text
    assert compacted.json()["usage"]["compaction"]["tokens_after"] < compacted.json()["usage"]["compaction"]["tokens_before"]


def test_anthropic_context_management_compacts(server):
    client = anthropic.Anthropic(base_url=server.base_url, api_key="unused", max_retries=0)
    messages = [m for m in history(8) if m["role"] != "system"]
    message = client.messages.create(model=MODEL, max_tokens=4, messages=messages, extra_body={
        "temperature": 0, "context_management": {"edits": [
            {"type": "clear_tool_uses_20250919"},
            {"type": "compact_20260112", "trigger": {"type": "input_tokens", "value": 1000}}]}})
    report = message.usage.model_extra["compaction"]
    assert report["tokens_before"] > 1000 >= report["tokens_after"]


@pytest.mark.parametrize("body, message", [
    ({"compaction": {"budget_tokens": 100, "keep_recent": 40}}, "nothing before its last 40"),
    ({"compaction": {"budget_tokens": 0}}, "positive budget"),
    ({"compaction": {"keep_recent": 0}}, "keep_recent"),
])
def test_bad_compaction_settings_are_400s(server, body, message):
    response = chat(server, history(8), **body)
    assert response.status_code == 400 and message in response.json()["error"]["message"]


def test_a_bad_anthropic_edit_is_a_400(server):
    response = httpx.post(f"{server.base_url}/v1/messages", timeout=30, json={
        "model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}],
        "context_management": {"edits": [{"type": "rewrite_everything"}]}})
    assert response.status_code == 400 and "not supported" in response.json()["error"]["message"]


def test_a_request_cancelled_while_its_summary_is_written_stops_the_writer():
    """The summary is the small model's own request: a WebSocket cancel (or a closed socket) while
    it is being written aborts it, instead of leaving it generating up to its 512 tokens."""
    import asyncio
    import json
    import time

    import websockets

    with single_torch_thread(), ServerThread(step_delay_s=0.05) as slow:
        engine = slow.engine()

        async def scenario():
            async with websockets.connect(slow.base_url.replace("http://", "ws://") + "/v1/ws") as ws:
                body = {"model": MODEL, "messages": history(8), "max_tokens": 4, "temperature": 0,
                        "compaction": {"budget_tokens": 1200}}
                await ws.send(json.dumps({"type": "request", "id": "a", "endpoint": "chat", "body": body}))
                deadline = time.monotonic() + 20
                while engine.stats().num_running == 0:         # the summary is being written
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.02)
                await asyncio.sleep(0.3)
                await ws.send(json.dumps({"type": "cancel", "id": "a"}))
                frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
                assert (frame["type"], frame["id"]) == ("cancelled", "a")

        asyncio.run(scenario())
        deadline = time.monotonic() + 3                        # a few steps, not the rest of the summary
        while not slow.idle() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert slow.idle(), engine.stats()
