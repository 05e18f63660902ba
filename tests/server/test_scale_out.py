"""Scale-out on Ray Serve, end to end: a Ray instance of 2 CPUs started here, `kvserve serve
--replicas 2 --ray-address ...` as a real subprocess (the ingress), two engine replicas of the tiny
random model, real SDK clients. Skipped when Ray Serve is not installed. The module's tests share
one deployment and run in file order; the last one kills a replica. Every wait is bounded.
"""

from __future__ import annotations

import json
import random
import time

import httpx
import pytest

from helpers import MODEL, metric, metric_samples, serve_process, sse_events, wait_until

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")

BLOCK = 16
RAY_ADDRESS: list[str] = []   # the module's Ray instance (set by the fixture)
PREFIX_CHARS = 20 * BLOCK   # the byte tokenizer: a character is a token; 20 blocks a prefix (the template adds its own)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(base URL, server process): the ingress over 2 replicas, on a Ray instance owned by this test."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        address = ray.get_runtime_context().gcs_address
        RAY_ADDRESS.append(address)
        # Autoscaling between 2 and 3 replicas: Serve takes kvserve's policy and stats (a third replica
        # would wait for a CPU; the tests never load the deployment for long enough to ask for one).
        with serve_process("--replicas", "2", "--min-replicas", "2", "--max-replicas", "3",
                           "--ray-address", address, "--replica-imbalance-threshold", "4",
                           "--state-dir", str(tmp_path_factory.mktemp("state")),
                           timeout_s=180) as (base_url, process):
            assert wait_until(lambda: len(_routed(base_url)) == 2 or _warm(base_url), 60)
            yield base_url, process
    finally:
        ray.shutdown()


def _warm(base_url: str) -> bool:
    """One request so that the ingress's router learns both replicas."""
    _chat(base_url, "warm-up")
    return len(_routed(base_url)) == 2


def _samples(base_url: str) -> dict:
    return metric_samples(httpx.get(f"{base_url}/metrics", timeout=30).text)


def _routed(base_url: str) -> dict[str, float]:
    """Requests the ingress routed to each replica, by replica."""
    return {dict(labels)["replica"]: value for (name, labels), value in _samples(base_url).items()
            if name == "kvserve:replica_routed_total"}


def _chat(base_url: str, content: str, max_tokens: int = 2, headers: dict | None = None, **extra) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, **extra}
    response = httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def _long_stream(client: httpx.Client, base_url: str, content: str, max_tokens: int = 3500):
    """A streamed answer that runs for seconds: (response, its line iterator), its first line read.
    The iterator must be held: a dropped one closes the connection. The first chunk leaves before
    Serve has sent the request to a replica."""
    request = client.build_request("POST", f"{base_url}/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
        "ignore_eos": True, "stream": True})
    response = client.send(request, stream=True)
    assert response.status_code == 200
    lines = response.iter_lines()
    assert next(lines).startswith("data: ")
    return response, lines


def _cache(base_url: str) -> dict[str, dict]:
    return httpx.get(f"{base_url}/v1/cache", timeout=60).json()["models"][MODEL]["replicas"]


def _hit_tokens(base_url: str) -> tuple[int, int]:
    reports = _cache(base_url).values()
    return (sum(r["prefix_cache"]["hit_tokens"] for r in reports), sum(r["prefix_cache"]["queried_tokens"] for r in reports))


def _flush(base_url: str) -> None:
    assert httpx.delete(f"{base_url}/v1/cache", params={"all": "true"}, timeout=60).status_code == 200


def _prefixes(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(PREFIX_CHARS)) for _ in range(n)]


def test_openai_and_anthropic_sdks_stream_through_the_ingress(cluster):
    import anthropic
    import openai

    base_url, _ = cluster
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=60)
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                                                 max_tokens=8, temperature=0, stream=True,
                                                 extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "length" and text
    whole = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                                           max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    assert whole.choices[0].message.content == text   # greedy: the same answer, whichever replica ran it
    assert whole.usage.completion_tokens == 8
    messages = anthropic.Anthropic(base_url=base_url, api_key="unused", timeout=60)
    with messages.messages.stream(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "hi"}]) as stream:
        final = stream.get_final_message()
    assert final.usage.output_tokens >= 1
    assert sum(_routed(base_url).values()) >= 3


def test_websocket_requests_multiplex_over_the_replicas(cluster):
    import asyncio

    import websockets

    base_url, _ = cluster

    async def scenario() -> dict[str, list[dict]]:
        frames: dict[str, list[dict]] = {"a": [], "b": []}
        async with websockets.connect(base_url.replace("http://", "ws://") + "/v1/ws") as ws:
            for request_id, prompt in (("a", "first socket request"), ("b", "second, another prompt")):
                await ws.send(json.dumps({"type": "request", "id": request_id, "endpoint": "chat", "body": {
                    "model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 6,
                    "ignore_eos": True}}))
            while not all(frames[i] and frames[i][-1]["type"] in ("done", "error", "cancelled") for i in "ab"):
                frame = json.loads(await asyncio.wait_for(ws.recv(), 60))
                frames.setdefault(frame.get("id"), []).append(frame)
        return frames

    frames = asyncio.run(scenario())
    assert [frames[i][-1]["type"] for i in "ab"] == ["done", "done"], frames


def test_a_client_that_disconnects_frees_the_replica_s_blocks(cluster):
    base_url, _ = cluster
    client = httpx.Client(timeout=60)
    response, lines = _long_stream(client, base_url, "go on and on")

    def running() -> int:
        return sum(r["requests"]["running"] + r["requests"]["waiting"] for r in _cache(base_url).values())

    assert wait_until(lambda: running() == 1, 30)
    response.close()     # the client goes away mid-answer
    client.close()
    assert wait_until(lambda: all(r["requests"]["running"] == 0 and r["blocks"]["used"] == 0
                                  for r in _cache(base_url).values()), 30, interval_s=0.2)


def test_prompts_sharing_a_prefix_land_on_one_replica_and_keep_the_cache_hit_rate(cluster):
    """16 prompts over 4 long prefixes: after each prefix's first request, the others follow it to
    one replica; the deployment's hit rate is at least 90% of one replica's on the same prompts."""
    base_url, _ = cluster
    prefixes = _prefixes(4)
    prompts = [(g, prefix + f" question {i} of group {g}?") for g, prefix in enumerate(prefixes) for i in range(4)]

    # One replica alone: the same prompts, all kept on one replica by a session (requests one at a time).
    _flush(base_url)
    hits0, queried0 = _hit_tokens(base_url)
    for _, prompt in prompts:
        _chat(base_url, prompt, headers={"x-session-id": "alone"})
    hits1, queried1 = _hit_tokens(base_url)
    alone = (hits1 - hits0) / (queried1 - queried0)

    # The deployment: new prefixes (nothing cached), routed by the cache-aware router.
    _flush(base_url)
    prefixes = _prefixes(4, seed=1)
    order = [(g, prefix + f" question {i} of group {g}?") for g, prefix in enumerate(prefixes) for i in range(4)]
    hits0, queried0 = _hit_tokens(base_url)
    prefix_routes0 = metric(_samples(base_url), "kvserve:replica_routes_total", model_name=MODEL, reason="prefix")
    homes = []
    for group in range(4):
        _chat(base_url, order[4 * group][1])                       # the group's first request: anywhere
        before = _routed(base_url)
        for _, prompt in order[4 * group + 1:4 * group + 4]:
            _chat(base_url, prompt)
        after = _routed(base_url)
        moved = {replica for replica in after if after[replica] != before.get(replica, 0)}
        assert len(moved) == 1, (group, before, after)             # the other three: one replica
        homes.append(moved.pop())
    hits1, queried1 = _hit_tokens(base_url)
    # Later, once the replicas' own reports have replaced the router's inferences (reports every
    # 1 s, inferences kept 2 s): a group's next request still finds its replica, by what it reported.
    time.sleep(4)
    for group in range(4):
        before = _routed(base_url)
        _chat(base_url, prefixes[group] + " one more?")
        after = _routed(base_url)
        assert after[homes[group]] == before[homes[group]] + 1, (group, before, after)
    deployment = (hits1 - hits0) / (queried1 - queried0)
    prefix_routes = metric(_samples(base_url), "kvserve:replica_routes_total", model_name=MODEL,
                           reason="prefix") - prefix_routes0
    assert prefix_routes >= 16
    assert alone > 0.5 and deployment >= 0.9 * alone, (deployment, alone)


def test_with_one_replica_saturated_unrelated_requests_go_to_the_other(cluster):
    base_url, _ = cluster
    busy = _prefixes(1, seed=2)[0]
    streams = []
    client = httpx.Client(timeout=60)
    try:
        # Start from idle queues as this ingress counts them (Serve reports completions asynchronously).
        assert wait_until(lambda: not any(value for (name, _), value in _samples(base_url).items()
                                          if name == "kvserve:replica_in_flight"), 30, 0.2)
        before = _routed(base_url)
        for i in range(4):   # four long answers on one prefix: the router keeps them on one replica
            streams.append(_long_stream(client, base_url, busy + f" {i}", max_tokens=3000))
        # The first SSE line leaves before the request reaches a replica: wait for Serve to send all four.
        assert wait_until(lambda: sum(_routed(base_url).values()) - sum(before.values()) == 4, 30, 0.1)
        middle = _routed(base_url)
        loaded = [r for r in middle if middle[r] != before.get(r, 0)]
        assert len(loaded) == 1, (before, middle)
        for i, prompt in enumerate(_prefixes(3, seed=3)):          # unrelated short requests meanwhile
            _chat(base_url, prompt)
        after = _routed(base_url)
        assert after[loaded[0]] == middle[loaded[0]], (middle, after)   # none joined the saturated replica
        assert sum(after.values()) - sum(middle.values()) == 3
    finally:
        for response, _ in streams:
            response.close()
        client.close()
    assert wait_until(lambda: all(r["requests"]["running"] == 0 for r in _cache(base_url).values()), 30, 0.2)


def test_a_session_sticks_to_one_replica(cluster):
    """Unrelated prompts of one session (x-session-id, or the body's prompt_cache_key) go to one replica."""
    import openai

    base_url, _ = cluster
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=60)
    for session in ({"extra_headers": {"x-session-id": "conversation-1"}},
                    {"extra_body": {"prompt_cache_key": "conversation-2"}}):
        before = _routed(base_url)
        sessions0 = metric(_samples(base_url), "kvserve:replica_routes_total", model_name=MODEL, reason="session")
        for prompt in _prefixes(4, seed=4 + len(before)):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=1,
                                           **session)
        after = _routed(base_url)
        assert len([r for r in after if after[r] != before.get(r, 0)]) == 1, (session, before, after)
        assert metric(_samples(base_url), "kvserve:replica_routes_total", model_name=MODEL,
                      reason="session") - sessions0 == 3


def test_batch_lines_spread_over_replicas_by_prefix(cluster):
    """A batch of 4 prefix groups: both replicas get lines; a group's later lines follow its first."""
    import openai

    base_url, _ = cluster
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=60)
    lines = [{"custom_id": f"g{g}-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": prefix + f" {i}"}]}}
             for g, prefix in enumerate(_prefixes(4, seed=9)) for i in range(3)]
    before = _routed(base_url)
    prefix0 = metric(_samples(base_url), "kvserve:replica_routes_total", model_name=MODEL, reason="prefix")
    uploaded = client.files.create(file=("docs.jsonl", "\n".join(json.dumps(line) for line in lines).encode()),
                                   purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert wait_until(lambda: client.batches.retrieve(batch.id).status == "completed", 60, 0.2)
    done = client.batches.retrieve(batch.id)
    assert done.request_counts.completed == 12 and done.request_counts.failed == 0
    after = _routed(base_url)
    assert all(after[r] > before.get(r, 0) for r in after), (before, after)        # spread over both
    assert metric(_samples(base_url), "kvserve:replica_routes_total", model_name=MODEL,
                  reason="prefix") - prefix0 == 8                                # each group's later two lines


def test_a_second_front_attaches_to_the_deployment_and_routes_by_the_replicas_reports(cluster):
    """`--attach`: another HTTP front over the same replicas. It has routed nothing yet, so it finds a
    prefix only through what the replicas report."""
    base_url, _ = cluster
    prefix = _prefixes(1, seed=11)[0]
    before = _routed(base_url)
    _chat(base_url, prefix + " first, through the first front")
    after = _routed(base_url)
    [home] = [r for r in after if after[r] != before.get(r, 0)]
    time.sleep(3)   # the replicas report every second; the front reads the reports Serve passes on
    with serve_process("--attach", "--ray-address", RAY_ADDRESS[0], timeout_s=120) as (second, _):
        answer = _chat(second, prefix + " again, through the second front")
        assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16 * 16
        assert _routed(second).get(home) == 1
        assert metric(_samples(second), "kvserve:replica_routes_total", model_name=MODEL, reason="prefix") == 1
    assert _chat(base_url, "the first front still serves")["choices"]   # the second left the deployment be


def test_killing_a_replica_fails_its_requests_with_503_and_the_survivor_serves(cluster):
    base_url, _ = cluster
    client = httpx.Client(timeout=60)
    response, lines = _long_stream(client, base_url, "a long one")
    assert wait_until(lambda: any(r["requests"]["running"] == 1 for r in _cache(base_url).values()), 30, 0.1)
    victim = next(name for name, report in _cache(base_url).items() if report["requests"]["running"] == 1)
    actors = [a for a in ray.util.list_named_actors(all_namespaces=True)
              if a["namespace"] == "serve" and a["name"].endswith(victim)]
    assert len(actors) == 1, actors
    ray.kill(ray.get_actor(actors[0]["name"], namespace="serve"), no_restart=True)
    started = time.monotonic()
    events = list(sse_events(lines))
    response.close()
    errors = [e for e in events if isinstance(e, dict) and "error" in e]
    assert errors and errors[0]["error"]["code"] == "replica_lost", events[-3:]
    assert "retry" in errors[0]["error"]["message"]
    assert time.monotonic() - started < 30
    for i in range(4):   # new requests: served (by the survivor, while Serve replaces the dead one)
        assert _chat(base_url, f"after the kill {i}")["choices"][0]["finish_reason"] in ("length", "stop")
    non_streamed = client.post(f"{base_url}/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1})
    assert non_streamed.status_code == 200
    client.close()
