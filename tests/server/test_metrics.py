"""/metrics: Prometheus text that parses, counters and histograms that track the requests served,
engine gauges read at scrape time, and rejections counted by reason."""

from __future__ import annotations

import httpx
import pytest
from helpers import MODEL, ServerThread, metric, metric_samples, single_torch_thread, sse_events, wait_until
from prometheus_client.parser import text_string_to_metric_families

from kvserve.config import ServerConfig

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
VOCAB_SIZE = 260


@pytest.fixture(scope="module")
def server():
    # One request runs at a time and none may wait: a second concurrent one gets 429.
    config = ServerConfig(max_queued_requests=0, max_prompt_tokens=256)
    with single_torch_thread(), ServerThread(config, max_num_seqs=1, step_delay_s=0.002) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.base_url, timeout=30.0) as client:
        yield client


def scrape(client: httpx.Client) -> dict:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return metric_samples(response.text)


def test_metrics_parse_and_list_the_families(client: httpx.Client):
    response = client.get("/metrics")
    families = {f.name: f.type for f in text_string_to_metric_families(response.text)}
    for name in ("kvserve:num_requests_running", "kvserve:num_requests_waiting", "kvserve:kv_cache_usage_perc",
                 "kvserve:kv_cache_blocks"):
        assert families.get(name) == "gauge", (name, families)
    for name in ("kvserve:prefix_cache_queries", "kvserve:prefix_cache_hits", "kvserve:num_preemptions",
                 "kvserve:request_success", "kvserve:requests_rejected", "kvserve:scheduler_stalls_broken"):
        assert families.get(name) == "counter", (name, families)
    for name in ("kvserve:time_to_first_token_seconds", "kvserve:e2e_request_latency_seconds",
                 "kvserve:request_prompt_tokens", "kvserve:request_generation_tokens",
                 "kvserve:inter_token_latency_seconds", "kvserve:request_queue_time_seconds"):
        assert families.get(name) == "histogram", (name, families)


def test_counters_and_histograms_follow_the_requests_served(client: httpx.Client, server: ServerThread):
    before = scrape(client)
    assert metric(before, "kvserve:num_requests_running", model_name=MODEL) == 0
    assert metric(before, "kvserve:num_requests_waiting", model_name=MODEL) == 0
    assert metric(before, "kvserve:kv_cache_usage_perc", model_name=MODEL) == 0
    long_prompt = "The metrics test sends this prompt twice, to hit the prefix cache. " * 2

    responses = [
        client.post(CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": long_prompt}],
                                "max_tokens": 4, "ignore_eos": True}),
        client.post(CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": long_prompt}],
                                "max_tokens": 4, "ignore_eos": True}),
        client.post(COMPLETIONS, json={"model": MODEL, "prompt": "abc", "max_tokens": 6, "ignore_eos": True}),
        # every token id is a stop token: finishes with "stop" after one token
        client.post(COMPLETIONS, json={"model": MODEL, "prompt": "xyz", "max_tokens": 6,
                                       "stop_token_ids": list(range(VOCAB_SIZE))}),
    ]
    with client.stream("POST", COMPLETIONS, json={"model": MODEL, "prompt": "streamed", "max_tokens": 5,
                                                  "ignore_eos": True, "stream": True,
                                                  "stream_options": {"include_usage": True}}) as streamed:
        assert streamed.status_code == 200
        lines = list(streamed.iter_lines())
    for response in responses:
        assert response.status_code == 200, response.text
    usages = [r.json()["usage"] for r in responses]
    events = list(sse_events(iter(lines)))
    assert events[-1] == "[DONE]" and events[-2]["choices"] == []
    usages.append(events[-2]["usage"])
    num_requests = len(usages)
    assert [r.json()["choices"][0]["finish_reason"] for r in responses] == ["length", "length", "length", "stop"]
    assert usages[1]["prompt_tokens_details"]["cached_tokens"] > 0

    assert wait_until(server.idle)
    after = scrape(client)

    def moved(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    m = {"model_name": MODEL}
    assert moved("kvserve:request_success_total", finished_reason="length", **m) == 4
    assert moved("kvserve:request_success_total", finished_reason="stop", **m) == 1
    assert moved("kvserve:request_success_total", finished_reason="abort", **m) == 0
    for histogram in ("kvserve:time_to_first_token_seconds", "kvserve:e2e_request_latency_seconds",
                      "kvserve:request_prompt_tokens", "kvserve:request_generation_tokens",
                      "kvserve:request_queue_time_seconds"):
        assert moved(f"{histogram}_count", **m) == num_requests, histogram
        assert metric(after, f"{histogram}_bucket", le="+Inf", **m) == metric(after, f"{histogram}_count", **m)
    assert moved("kvserve:request_prompt_tokens_sum", **m) == sum(u["prompt_tokens"] for u in usages)
    assert moved("kvserve:request_generation_tokens_sum", **m) == sum(u["completion_tokens"] for u in usages)
    # The prefix cache was asked about every prompt token (at least), and the repeat hit it.
    assert moved("kvserve:prefix_cache_queries_total", **m) >= sum(u["prompt_tokens"] for u in usages)
    assert moved("kvserve:prefix_cache_hits_total", **m) == usages[1]["prompt_tokens_details"]["cached_tokens"]
    # Engine gauges are read at scrape time: idle again.
    assert metric(after, "kvserve:num_requests_running", **m) == 0
    assert metric(after, "kvserve:num_requests_waiting", **m) == 0
    assert metric(after, "kvserve:kv_cache_usage_perc", **m) == 0
    assert metric(after, "kvserve:kv_cache_blocks", state="free", **m) == server.engine().stats().kv.num_blocks


def test_running_gauges_and_rejections(client: httpx.Client, server: ServerThread):
    before = scrape(client)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hold the only slot"}], "max_tokens": 3000,
            "ignore_eos": True, "stream": True}
    with client.stream("POST", CHAT, json=body) as holding:
        assert holding.status_code == 200
        # Keep the iterator referenced: a dropped httpx line iterator closes the connection.
        lines = holding.iter_lines()
        assert next(lines).startswith("data: ")   # the role chunk: it has started
        assert wait_until(lambda: server.engine().stats().num_running == 1)
        during = scrape(client)
        assert metric(during, "kvserve:num_requests_running", model_name=MODEL) == 1
        assert 0 < metric(during, "kvserve:kv_cache_usage_perc", model_name=MODEL) <= 1
        assert metric(during, "kvserve:kv_cache_blocks", model_name=MODEL, state="used") >= 1

        rejected = client.post(CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        assert rejected.status_code == 429
        assert rejected.headers["retry-after"]
    assert wait_until(server.idle)   # the server saw the client leave, and aborted its request
    too_long = client.post(COMPLETIONS, json={"model": MODEL, "prompt": "y" * 300})
    assert too_long.status_code == 400
    assert wait_until(server.idle)

    after = scrape(client)
    assert metric(after, "kvserve:requests_rejected_total", reason="queue_full") - \
        metric(before, "kvserve:requests_rejected_total", reason="queue_full") == 1
    assert metric(after, "kvserve:requests_rejected_total", reason="prompt_too_long") - \
        metric(before, "kvserve:requests_rejected_total", reason="prompt_too_long") == 1
    # the held request was cut off by its client: counted as aborted
    assert metric(after, "kvserve:request_success_total", model_name=MODEL, finished_reason="abort") - \
        metric(before, "kvserve:request_success_total", model_name=MODEL, finished_reason="abort") == 1
