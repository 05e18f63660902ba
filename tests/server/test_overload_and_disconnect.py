"""Admission control (429 + Retry-After, nothing lost) and disconnects (SSE mid-generation, SSE
during a long prefill, non-streaming): a client that leaves aborts its engine request at once.

Real HTTP to uvicorn on a thread of this process, so the tests can read `app.state` (engines,
admission counters). Engines are slowed with a per-step sleep where a test must act while a
request is still running; the checks that tell "aborted" from "finished by itself" are exact
(finish-reason counters, how many prompt blocks were ever computed), never timings.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from helpers import MODEL, ServerThread, metric, metric_samples, single_torch_thread, sse_events, wait_until

from kvserve.config import ServerConfig

CHAT = "/v1/chat/completions"
BLOCK_SIZE = 16


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    with single_torch_thread():
        yield


def chat(content: str = "hi", **fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


def scrape(server: ServerThread) -> dict:
    return metric_samples(httpx.get(f"{server.base_url}/metrics", timeout=10.0).text)


def finished(server: ServerThread, reason: str) -> float:
    return metric(scrape(server), "kvserve:request_success_total", model_name=MODEL, finished_reason=reason)


# ---- overload -----------------------------------------------------------------------------------

NUM_CLIENTS = 20


async def _one_streaming_request(client: httpx.AsyncClient, index: int) -> tuple[str, dict]:
    body = chat(f"request {index}", max_tokens=200, ignore_eos=True, stream=True)
    async with client.stream("POST", CHAT, json=body) as response:
        if response.status_code == 429:
            error = (await response.aread()).decode()
            return "429", {"retry_after": response.headers.get("retry-after"), "error": error}
        assert response.status_code == 200, (response.status_code, await response.aread())
        lines = [line async for line in response.aiter_lines()]
    events = list(sse_events(iter(lines)))
    finish = [c["choices"][0]["finish_reason"] for c in events[:-1] if c["choices"][0]["finish_reason"]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in events[:-1])
    return "200", {"done": events[-1] == "[DONE]", "finish": finish, "num_events": len(events), "text": text}


async def _fire(base_url: str) -> list[tuple[str, dict]]:
    limits = httpx.Limits(max_connections=NUM_CLIENTS, max_keepalive_connections=NUM_CLIENTS)
    async with httpx.AsyncClient(base_url=base_url, timeout=60.0, limits=limits) as client:
        return await asyncio.gather(*(_one_streaming_request(client, i) for i in range(NUM_CLIENTS)))


def test_past_the_queue_cap_requests_get_429_and_none_is_lost():
    config = ServerConfig(max_queued_requests=2, retry_after_s=2)
    with ServerThread(config, max_num_seqs=2, step_delay_s=0.002) as server:
        results = asyncio.run(_fire(server.base_url))
        ok = [r for kind, r in results if kind == "200"]
        rejected = [r for kind, r in results if kind == "429"]
        assert len(ok) + len(rejected) == NUM_CLIENTS
        assert ok and rejected, (len(ok), len(rejected))
        for r in ok:   # every accepted request got its whole stream
            assert r["done"] and r["finish"] == ["length"], r
        for r in rejected:
            assert r["retry_after"] == "2", r
            assert '"rate_limit_error"' in r["error"] and '"queue_full"' in r["error"], r
        assert wait_until(server.idle)
        samples = scrape(server)
        assert metric(samples, "kvserve:requests_rejected_total", reason="queue_full") == len(rejected)
        assert metric(samples, "kvserve:request_success_total", model_name=MODEL,
                      finished_reason="length") == len(ok)
        server.engine().engine.check_integrity()


# ---- disconnects --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slow_server():
    """Each step sleeps 5 ms: a 3,000-token generation would take 15 s or more."""
    with ServerThread(ServerConfig(), step_delay_s=0.005) as server:
        yield server


def test_sse_disconnect_mid_generation_aborts(slow_server: ServerThread):
    server = slow_server
    aborted_before = finished(server, "abort")
    with httpx.Client(base_url=server.base_url, timeout=30.0) as client:
        with client.stream("POST", CHAT, json=chat(max_tokens=3000, ignore_eos=True, stream=True)) as response:
            assert response.status_code == 200
            events = sse_events(response.iter_lines())
            got = [next(events), next(events), next(events)]   # the role chunk, then content
            assert all(isinstance(e, dict) for e in got)
            assert wait_until(lambda: server.engine().stats().num_running == 1)
        # leaving the block closes the connection mid-stream
    assert wait_until(server.idle), (server.in_flight(), server.engine().stats())
    assert finished(server, "abort") == aborted_before + 1
    assert finished(server, "length") == 0
    server.engine().engine.check_integrity()


def test_sse_disconnect_during_prefill_aborts():
    """A 3,000-token prompt, 16 tokens a step, 20 ms a step: the prefill alone would take 188
    steps (3.8 s). The client leaves as soon as the response headers arrive."""
    prompt = "z" * 3000
    num_prompt_blocks = len(prompt) // BLOCK_SIZE
    with ServerThread(ServerConfig(), max_num_batched_tokens=16, step_delay_s=0.02) as server:
        with httpx.Client(base_url=server.base_url, timeout=30.0) as client:
            with client.stream("POST", CHAT, json=chat(prompt, max_tokens=10, stream=True)) as response:
                assert response.status_code == 200
        assert wait_until(server.idle), (server.in_flight(), server.engine().stats())
        stats = server.engine().stats()
        # Every full block computed is published to the prefix cache (and stays there: nothing
        # else needs the pool). Fewer than half of the prompt's blocks ever were: aborted early.
        assert stats.kv.num_cached_blocks < num_prompt_blocks // 2, stats
        samples = scrape(server)
        assert metric(samples, "kvserve:request_success_total", model_name=MODEL, finished_reason="abort") == 1
        assert metric(samples, "kvserve:time_to_first_token_seconds_count", model_name=MODEL) == 0
        server.engine().engine.check_integrity()


def test_non_streaming_disconnect_aborts(slow_server: ServerThread):
    server = slow_server
    aborted_before = finished(server, "abort")
    with httpx.Client(base_url=server.base_url, timeout=httpx.Timeout(30.0, read=0.5)) as client:
        with pytest.raises(httpx.ReadTimeout):
            client.post(CHAT, json=chat(max_tokens=3000, ignore_eos=True))
    assert wait_until(server.idle), (server.in_flight(), server.engine().stats())
    assert finished(server, "abort") == aborted_before + 1
    assert finished(server, "length") == 0
    server.engine().engine.check_integrity()


def test_server_still_serves_after_disconnects(slow_server: ServerThread):
    response = httpx.post(f"{slow_server.base_url}{CHAT}", json=chat(max_tokens=3, ignore_eos=True), timeout=30.0)
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 3
    assert wait_until(slow_server.idle)
