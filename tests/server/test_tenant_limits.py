"""Tenants' shares and limits from the keys file (auth.py): weight and default priority reach the
engine's requests; max_concurrent and tokens_per_minute refuse with 429 + Retry-After (400 when a
request can never fit); slots and unused tokens come back however a request ends; the limits are
per tenant, survive a reload, and are counted per tenant on /metrics. Through the real `openai`
SDK against an in-process server (tiny random model; ByteTokenizer: one token per byte)."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from helpers import MODEL, ServerThread, metric, metric_samples, single_torch_thread, wait_until

from kvserve.config import ConfigError
from kvserve.server.auth import ApiKeys, TenantLimits, TenantShare
from kvserve.server.protocol import APIError, ChatCompletionRequest

ALPHA = {"tenant": "alpha", "weight": 2.5, "priority": 3, "max_concurrent": 1}
KEYS = {
    "sk-alpha": ALPHA,
    "sk-alpha-2": dict(ALPHA),                      # a second key of the same tenant: one set of limits
    "sk-beta": {"tenant": "beta"},
    "sk-metered": {"tenant": "metered", "tokens_per_minute": 600},   # 10 tokens a second
}
CHAT = [{"role": "user", "content": "Tell me a story."}]
EVERY_TOKEN = list(range(260))   # as stop_token_ids: the answer ends at its first token


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    path.write_text(json.dumps(KEYS))
    with single_torch_thread(), ServerThread(api_keys=ApiKeys.load(path), step_delay_s=0.005) as server:
        # the same limits, on a clock the tests move (only tokens_per_minute reads it)
        server.clock = Clock()
        state = server.app.state
        state.tenant_limits = state.serving.tenants = TenantLimits(lambda: state.api_keys, clock=server.clock)
        server.limits = state.tenant_limits
        yield server


def client(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key, max_retries=0, timeout=30.0)


def hold_a_stream(server, key: str, max_tokens: int = 2000):
    """An admitted streamed request that keeps running until it is closed (the role chunk is read)."""
    stream = client(server, key).chat.completions.create(model=MODEL, messages=CHAT, max_tokens=max_tokens,
                                                         stream=True, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks)
    return stream, chunks


def spy_requests(server, monkeypatch) -> list:
    """Every Request the engine is handed, as made by Engine.make_request."""
    engine = server.engine().engine
    made, real = [], engine.make_request

    def make_request(*args, **kwargs):
        request = real(*args, **kwargs)
        made.append(request)
        return request

    monkeypatch.setattr(engine, "make_request", make_request)
    return made


def on_server_loop(server, coroutine):
    return asyncio.run_coroutine_threadsafe(coroutine, server.server.loop).result(timeout=30)


# ---- max_concurrent ---------------------------------------------------------------------------
def test_a_tenant_over_max_concurrent_gets_429_while_another_tenant_is_served(server):
    stream, _ = hold_a_stream(server, "sk-alpha")
    try:
        assert server.limits.in_flight("alpha") == 1
        with pytest.raises(openai.RateLimitError) as refused:   # the tenant's other key: the same limit
            client(server, "sk-alpha-2").chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
        error = refused.value
        assert error.status_code == 429 and error.code == "tenant_concurrency" and error.type == "rate_limit_error"
        assert error.response.headers["retry-after"] == "1"
        assert "max_concurrent (1)" in error.message and "'alpha'" in error.message
        other = client(server, "sk-beta").chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
        assert other.choices[0].finish_reason in ("length", "stop")
        with pytest.raises(openai.BadRequestError) as never:    # more choices than it may ever hold
            client(server, "sk-alpha").chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, n=2)
        assert never.value.code == "exceeds_max_concurrent" and "max_concurrent" in never.value.message
    finally:
        stream.close()                                          # the client disconnects mid-stream
    assert wait_until(lambda: server.limits.in_flight("alpha") == 0 and server.idle())
    again = client(server, "sk-alpha").chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
    assert again.choices[0].finish_reason in ("length", "stop")
    assert server.limits.in_flight("alpha") == 0                # a finished request gives its slot back


def test_the_websocket_and_bedrock_apis_share_the_limit(server):
    import boto3
    import botocore.exceptions
    import websockets.sync.client as ws_client
    from botocore.config import Config

    stream, _ = hold_a_stream(server, "sk-alpha")
    try:
        url = server.base_url.replace("http", "ws") + "/v1/ws?api_key=sk-alpha-2"
        with ws_client.connect(url) as socket:
            socket.send(json.dumps({"type": "request", "id": "1", "body": {"model": MODEL, "messages": CHAT,
                                                                             "max_tokens": 2}}))
            frame = json.loads(socket.recv(timeout=30))
        assert (frame["type"], frame["id"], frame["status"]) == ("error", "1", 429)
        assert frame["error"]["code"] == "tenant_concurrency"
        bedrock = boto3.client("bedrock-runtime", endpoint_url=server.base_url, region_name="us-east-1",
                               aws_access_key_id="sk-alpha", aws_secret_access_key="unused",
                               config=Config(retries={"max_attempts": 1}))
        with pytest.raises(botocore.exceptions.ClientError) as refused:
            bedrock.converse(modelId=MODEL, messages=[{"role": "user", "content": [{"text": "hi"}]}],
                             inferenceConfig={"maxTokens": 2})
        assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 429
    finally:
        stream.close()
    assert wait_until(lambda: server.limits.in_flight("alpha") == 0)


def test_refusals_and_errors_give_the_slot_back(server):
    alpha = client(server, "sk-alpha")
    with pytest.raises(openai.BadRequestError):                 # refused after admission: prompt too long
        alpha.completions.create(model=MODEL, prompt="x" * 5000, max_tokens=2)
    with pytest.raises(openai.BadRequestError):                 # refused by the engine's validation
        alpha.completions.create(model=MODEL, prompt="hi", max_tokens=2, temperature=-1)
    assert server.limits.in_flight("alpha") == 0
    assert alpha.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens >= 1


def test_a_reload_changes_the_limits_and_keeps_the_counts(server, tmp_path):
    """Through lifecycle.Server's SIGHUP handler (called directly: the server runs on a thread)."""
    state, lifecycle = server.app.state, server.server
    before = state.api_keys
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({**KEYS, "sk-alpha": {**ALPHA, "max_concurrent": 2},
                                "sk-alpha-2": {**ALPHA, "max_concurrent": 2}}))
    stream, _ = hold_a_stream(server, "sk-alpha")
    try:
        lifecycle.reload_keys = lambda: ApiKeys.load(keys)
        lifecycle._reload_keys()
        second = client(server, "sk-alpha-2").chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
        assert second.choices[0].finish_reason in ("length", "stop")
        keys.write_text(json.dumps({**KEYS, "sk-alpha": {**ALPHA, "max_concurrent": 0}}))
        lifecycle._reload_keys()                                # a bad file keeps the limits in force
        assert state.api_keys.share("alpha").max_concurrent == 2
        keys.write_text(json.dumps(KEYS))
        lifecycle._reload_keys()                                # back to 1, with one still in flight
        assert server.limits.in_flight("alpha") == 1
        with pytest.raises(openai.RateLimitError):
            client(server, "sk-alpha-2").chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
    finally:
        lifecycle.reload_keys = None
        state.api_keys = before
        stream.close()
    assert wait_until(lambda: server.limits.in_flight("alpha") == 0)


# ---- tokens_per_minute ------------------------------------------------------------------------
def test_tokens_per_minute_charges_prompt_and_max_tokens_and_refunds_the_unused(server):
    limits, clock, metered = server.limits, server.clock, client(server, "sk-metered")
    clock.now += 120                                             # a full bucket
    assert limits.tokens("metered") == 600
    text = "abcdefgh" * 8                                        # a prompt of 64 tokens, and its specials
    done = metered.completions.create(model=MODEL, prompt=text, max_tokens=50,
                                      extra_body={"stop_token_ids": EVERY_TOKEN})
    prompt, generated = done.usage.prompt_tokens, done.usage.completion_tokens
    assert generated < 50
    assert limits.tokens("metered") == pytest.approx(600 - prompt - generated)   # 50 charged, the unused back
    available = 600 - prompt - generated

    with pytest.raises(openai.RateLimitError) as refused:        # 30 tokens more than the bucket holds
        metered.completions.create(model=MODEL, prompt=text, max_tokens=available - prompt + 30)
    error = refused.value
    assert error.code == "tenant_tokens_per_minute" and error.type == "rate_limit_error"
    assert error.response.headers["retry-after"] == "3"          # 30 tokens at 10 a second
    assert "tokens per minute" in error.message
    assert limits.tokens("metered") == pytest.approx(available)  # a refusal charges nothing
    clock.now += 3
    fits = metered.completions.create(model=MODEL, prompt=text, max_tokens=available - prompt + 30,
                                      extra_body={"stop_token_ids": EVERY_TOKEN})
    assert fits.usage.completion_tokens < 50

    with pytest.raises(openai.BadRequestError) as never:         # more than the whole bucket
        metered.completions.create(model=MODEL, prompt="abcdefgh", max_tokens=600)
    assert never.value.status_code == 400 and never.value.code == "exceeds_tokens_per_minute"
    assert "tokens_per_minute 600" in never.value.message
    assert limits.in_flight("metered") == 0


def test_a_stream_the_client_leaves_is_refunded_its_unused_tokens(server):
    limits, clock = server.limits, server.clock
    clock.now += 120
    stream, chunks = hold_a_stream(server, "sk-metered", max_tokens=400)
    next(chunks)                                                 # a token or so, then the client leaves
    assert limits.tokens("metered") <= 600 - 400
    stream.close()
    assert wait_until(lambda: limits.in_flight("metered") == 0)
    assert limits.tokens("metered") > 600 - 400                  # most of the 400 came back


def test_background_batch_lines_are_exempt_but_carry_the_tenant(server, monkeypatch):
    made = spy_requests(server, monkeypatch)
    stream, _ = hold_a_stream(server, "sk-alpha")                # alpha at its max_concurrent

    async def batch_line():
        body = ChatCompletionRequest.model_validate({"model": MODEL, "messages": CHAT, "max_tokens": 2})
        generation = await server.app.state.serving.chat(body, "alpha", background=True)
        try:
            return await generation.result()
        finally:
            generation.close()

    try:
        result = on_server_loop(server, batch_line())
        assert result["choices"][0]["finish_reason"] in ("length", "stop")
        assert server.limits.in_flight("alpha") == 1             # not counted against it
    finally:
        stream.close()
    line = made[-1]
    assert (line.background, line.tenant, line.weight, line.priority) == (True, "alpha", 2.5, 3)
    assert wait_until(lambda: server.limits.in_flight("alpha") == 0)


# ---- weight and priority reach the engine -------------------------------------------------------
def test_weight_and_default_priority_reach_the_engine(server, monkeypatch):
    made = spy_requests(server, monkeypatch)
    alpha, beta = client(server, "sk-alpha"), client(server, "sk-beta")
    alpha.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
    alpha.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, extra_body={"priority": -1})
    alpha.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, extra_body={"priority": 0})
    beta.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
    anthropic = httpx.post(f"{server.base_url}/v1/messages", headers={"x-api-key": "sk-alpha"}, timeout=30,
                           json={"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    assert anthropic.status_code == 200
    seen = [(r.tenant, r.weight, r.priority, r.background) for r in made]
    assert seen == [("alpha", 2.5, 3, False),     # the tenant's default priority
                    ("alpha", 2.5, -1, False),    # the request's own
                    ("alpha", 2.5, 0, False),     # explicitly 0: still the request's own
                    ("beta", 1.0, 0, False),
                    ("alpha", 2.5, 3, False)]     # the Anthropic API goes the same way


# ---- metrics -----------------------------------------------------------------------------------
def test_tenant_metrics(server):
    before = metric_samples(httpx.get(f"{server.base_url}/metrics").text)
    done = client(server, "sk-beta").completions.create(model=MODEL, prompt="metrics", max_tokens=3,
                                                        extra_body={"ignore_eos": True})
    with pytest.raises(openai.BadRequestError):
        client(server, "sk-alpha").completions.create(model=MODEL, prompt="x", max_tokens=2, n=3)
    stream, _ = hold_a_stream(server, "sk-alpha")
    try:
        with pytest.raises(openai.RateLimitError):
            client(server, "sk-alpha").completions.create(model=MODEL, prompt="x", max_tokens=2)
    finally:
        stream.close()
    assert wait_until(lambda: server.limits.in_flight("alpha") == 0)
    after = metric_samples(httpx.get(f"{server.base_url}/metrics").text)

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("kvserve:tenant_tokens_total", tenant="beta", kind="prompt") == done.usage.prompt_tokens
    assert delta("kvserve:tenant_tokens_total", tenant="beta", kind="generation") == 3
    assert delta("kvserve:tenant_queue_time_seconds_count", tenant="beta") == 1
    assert delta("kvserve:tenant_rejections_total", tenant="alpha", reason="exceeds_max_concurrent") == 1
    assert delta("kvserve:tenant_rejections_total", tenant="alpha", reason="tenant_concurrency") == 1
    assert delta("kvserve:tenant_tokens_total", tenant="alpha", kind="prompt") > 0      # the stream, cut short


# ---- the keys file and the limits themselves ---------------------------------------------------------
@pytest.mark.parametrize("fields, message", [
    ({"weight": 0}, "weight must be a positive number"),
    ({"weight": "2"}, "weight must be a positive number"),
    ({"weight": True}, "weight must be a positive number"),
    ({"weight": float("inf")}, "weight must be a positive number"),
    ({"priority": 1.5}, "priority must be an integer"),
    ({"priority": "high"}, "priority must be an integer"),
    ({"max_concurrent": 0}, "max_concurrent must be an integer >= 1"),
    ({"max_concurrent": 2.5}, "max_concurrent must be an integer >= 1"),
    ({"tokens_per_minute": -1}, "tokens_per_minute must be a positive number"),
    ({"tokens_per_minute": "600"}, "tokens_per_minute must be a positive number"),
    ({"max_tokens": 5}, "unknown fields max_tokens"),
])
def test_bad_share_fields_are_config_errors(tmp_path, fields, message):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"sk-1": {"tenant": "t", **fields}}))
    with pytest.raises(ConfigError, match=message) as error:
        ApiKeys.load(path)
    assert "entry 1" in str(error.value) and "sk-1" not in str(error.value)


def test_keys_of_one_tenant_must_agree_on_its_limits(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"sk-1": {"tenant": "t", "max_concurrent": 2},
                                "sk-2": {"tenant": "u", "max_concurrent": 5},
                                "sk-3": {"tenant": "t", "max_concurrent": 3}}))
    with pytest.raises(ConfigError, match=r"entry 3: tenant 't' .*max_concurrent 2 vs 3"):
        ApiKeys.load(path)
    path.write_text(json.dumps({"sk-1": {"tenant": "t", "weight": 2}, "sk-2": {"tenant": "t"}}))
    with pytest.raises(ConfigError, match="weight 2.0 vs 1.0"):   # left out = the default, which differs
        ApiKeys.load(path)
    path.write_text(json.dumps({"sk-1": {"tenant": "t", "weight": 2, "requests_per_minute": 5},
                                "sk-2": {"tenant": "t", "weight": 2.0, "admin": True}}))
    keys = ApiKeys.load(path)                                     # admin and rates stay per key
    assert keys.share("t") == TenantShare("t", weight=2.0) == keys.authenticate("sk-2").share
    assert keys.share("nobody") == TenantShare("nobody")


def test_tenant_limits_buckets_and_slots():
    now = [0.0]
    shares = {"t": TenantShare("t", max_concurrent=2, tokens_per_minute=120)}   # 2 tokens a second
    keys = type("Keys", (), {"share": lambda self, tenant: shares.get(tenant) or TenantShare(tenant)})()
    limits = TenantLimits(lambda: keys, clock=lambda: now[0])
    a = limits.hold(shares["t"], 1)
    a.charge(20, 80)
    assert limits.tokens("t") == 20
    b = limits.hold(shares["t"], 1)
    with pytest.raises(APIError) as full:
        limits.hold(shares["t"], 1)
    assert full.value.status == 429 and full.value.headers == {"Retry-After": "1"}
    with pytest.raises(APIError) as short:
        b.charge(10, 11)                                          # 21 > 20: one token short, half a second
    assert short.value.code == "tenant_tokens_per_minute" and short.value.headers["Retry-After"] == "1"
    b.release(never_ran=True)                                     # nothing charged: nothing back
    assert limits.in_flight("t") == 1 and limits.tokens("t") == 20
    now[0] = 5.0
    assert limits.tokens("t") == 30                               # refilled evenly
    a.release(generated_tokens=30)                                # 50 of its 80 unused
    a.release(generated_tokens=0)                                 # once only
    assert limits.in_flight("t") == 0 and limits.tokens("t") == 80
    now[0] = 100.0
    assert limits.tokens("t") == 120                              # never above the capacity
    c = limits.hold(shares["t"], 2)
    with pytest.raises(APIError) as never:
        c.charge(1, 120)
    assert never.value.status == 400 and "tokens_per_minute 120" in never.value.message
    c.charge(60, 60)
    with pytest.raises(APIError) as wait:
        limits.hold(shares["t"], 0).charge(30, 30)                # 60 short at 2 a second
    assert wait.value.headers["Retry-After"] == "30"
    shares["t"] = TenantShare("t", max_concurrent=3, tokens_per_minute=30)   # a reload: new limits, same counts
    assert limits.in_flight("t") == 2 and limits.tokens("t") == 0
    limits.hold(shares["t"], 1)
    c.release(never_ran=True)                                     # the whole charge, capped at the new capacity
    assert limits.tokens("t") == 30 and limits.in_flight("t") == 1
    assert TenantShare(None).label == "" and TenantShare("t").label == "t"
    free = TenantLimits()                                         # no keys file: no limits at all
    free.hold(free.share(None), 1000).charge(10**9, 10**9)
    assert free.tokens(None) is None and free.in_flight(None) == 1000
