"""Security: keys compared in constant time, the keys file re-read on SIGHUP, per-key rate limits,
admin-only routes (/metrics with --metrics-auth), and no key or prompt text in the logs."""

from __future__ import annotations

import hmac
import json
import signal
import time

import httpx
import pytest
from helpers import MODEL, ServerThread, serve_process, single_torch_thread, wait_until

from kvserve.config import ServerConfig
from kvserve.server import auth
from kvserve.server.auth import ApiKeys, Principal, RateLimits
from kvserve.server.protocol import APIError

CHAT = "/v1/chat/completions"


def chat(content: str = "hi", **fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 2, **fields}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_every_key_is_compared_in_constant_time(monkeypatch):
    keys = ApiKeys({f"sk-{i}": Principal(f"t{i}", False) for i in range(16)})
    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b))
    for presented in ("sk-0", "sk-15", "sk-nope", "sk-1" + "x" * 100):
        compared.clear()
        try:
            keys.authenticate(presented)
        except APIError:
            pass
        assert len(compared) == 16, presented      # all of them, wherever (or whether) it matches
    assert keys.authenticate("sk-15").tenant == "t15"


def test_a_token_bucket_per_key_refills_evenly():
    now = [0.0]
    limits = RateLimits(clock=lambda: now[0])
    who = Principal("a", False, requests_per_minute=3, key_id="k")
    for _ in range(3):
        limits.admit(who)                         # a burst of the bucket's size
    with pytest.raises(APIError) as refused:
        limits.admit(who)
    assert refused.value.status == 429 and refused.value.headers["Retry-After"] == "20"
    now[0] += 20.0                                # 3 per minute: one more every 20 s
    limits.admit(who)
    with pytest.raises(APIError):
        limits.admit(who)
    limits.admit(Principal("b", False, requests_per_minute=3, key_id="other"))   # another key's own bucket
    for _ in range(100):
        limits.admit(Principal("c", False, key_id="unlimited"))                   # no limit set


@pytest.fixture(scope="module")
def server():
    keys = ApiKeys({"sk-slow": Principal("slow", False, requests_per_minute=2),
                    "sk-user": Principal("user", False), "sk-admin": Principal("ops", True)})
    with single_torch_thread(), ServerThread(ServerConfig(metrics_auth=True), api_keys=keys) as server:
        yield server


def test_a_key_over_its_rate_gets_429_with_retry_after_and_others_do_not(server):
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        assert [client.post(CHAT, json=chat(), headers=bearer("sk-slow")).status_code for _ in range(2)] == [200, 200]
        third = client.post(CHAT, json=chat(), headers=bearer("sk-slow"))
        assert third.status_code == 429 and third.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(third.headers["retry-after"]) <= 30
        assert client.post(CHAT, json=chat(), headers=bearer("sk-user")).status_code == 200
        anthropic = client.post("/v1/messages", json={"model": MODEL, "max_tokens": 2, "messages": [
            {"role": "user", "content": "hi"}]}, headers={"x-api-key": "sk-slow"})
        assert anthropic.status_code == 429 and anthropic.json()["error"]["type"] == "rate_limit_error"


def test_metrics_need_an_admin_key_with_metrics_auth(server):
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers=bearer("sk-user")).status_code == 403
        ok = client.get("/metrics", headers=bearer("sk-admin"))
        assert ok.status_code == 200 and "kvserve:num_requests_running" in ok.text
        assert client.get("/v1/cache", headers=bearer("sk-user")).status_code == 403
        assert client.get("/v1/cache", headers=bearer("sk-admin")).status_code == 200


def test_sighup_reloads_the_keys_and_a_bad_file_keeps_the_old_ones(tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"sk-first": {"tenant": "a"}}))
    with serve_process("--api-keys", str(keys)) as (url, process), httpx.Client(base_url=url, timeout=30) as client:
        assert client.post(CHAT, json=chat(), headers=bearer("sk-first")).status_code == 200
        keys.write_text(json.dumps({"sk-second": {"tenant": "b"}}))
        process.send_signal(signal.SIGHUP)
        assert wait_until(lambda: client.post(CHAT, json=chat(), headers=bearer("sk-second")).status_code == 200,
                          timeout_s=10)
        assert client.post(CHAT, json=chat(), headers=bearer("sk-first")).status_code == 401
        keys.write_text("{not json")
        process.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert process.poll() is None                                          # still serving
        assert client.post(CHAT, json=chat(), headers=bearer("sk-second")).status_code == 200


def test_no_key_and_no_prompt_text_reach_the_logs(tmp_path):
    """At the default log level, through accepted, refused, failing and aborted requests."""
    secret_key, other_key, prompt = "sk-LOGLEAK-4b1d", "sk-WRONGKEY-77c0", "PROMPTLEAK-5e9a"
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({secret_key: {"tenant": "t", "requests_per_minute": 1000}}))
    with serve_process("--api-keys", str(keys), "--inject-fault", "request-fails-on-token=7") as (url, process), \
            httpx.Client(base_url=url, timeout=30) as client:
        good = bearer(secret_key)
        assert client.post(CHAT, json=chat(prompt), headers=good).status_code == 200
        assert client.post(CHAT, json=chat(prompt), headers=bearer(other_key)).status_code == 401
        assert client.post(CHAT, json=chat(prompt + "\x07"), headers=good).status_code == 500   # engine error, logged
        assert client.post(CHAT, content=b'{"messages": [' + prompt.encode(),
                           headers={**good, "content-type": "application/json"}).status_code == 400
        assert client.post(CHAT, json={"model": MODEL, "messages": [{"role": "user"}], "note": prompt},
                           headers=good).status_code == 400
        assert client.get(f"/v1/ws?api_key={secret_key}").status_code in (400, 403, 404, 426)
        with client.stream("POST", CHAT, json=chat(prompt, max_tokens=500, ignore_eos=True, stream=True),
                           headers=good) as stream:
            next(stream.iter_lines())                                                  # then leave mid-stream
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        output = process.stdout.read().decode(errors="replace")
    assert "failed in the engine step" in output          # the engine error was logged ...
    for secret in (secret_key, other_key, prompt):
        assert secret not in output, f"{secret!r} reached the log:\n{output[-3000:]}"   # ... without them


def test_a_key_revoked_by_a_reload_stops_working_on_an_open_websocket():
    import asyncio

    import websockets

    keys = ApiKeys({"sk-old": Principal("t", False)})
    with single_torch_thread(), ServerThread(api_keys=keys) as server:
        url = server.base_url.replace("http", "ws") + "/v1/ws?api_key=sk-old"
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

        async def scenario():
            async with websockets.connect(url) as socket:
                await socket.send(json.dumps({"type": "request", "id": "a", "body": body}))
                while json.loads(await socket.recv())["type"] != "done":
                    pass
                server.app.state.api_keys = ApiKeys({"sk-new": Principal("t", False)})   # as SIGHUP does
                await socket.send(json.dumps({"type": "request", "id": "b", "body": body}))
                return json.loads(await socket.recv())

        refused = asyncio.run(scenario())
        assert refused["type"] == "error" and refused["status"] == 401 and refused["id"] == "b"


def test_keys_in_websocket_urls_are_hidden_in_verbose_logs():
    import logging

    from kvserve.server.lifecycle import redact_keys_in_logs

    redact_keys_in_logs()
    record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, '%s - "WebSocket %s" [accepted]',
                               (("127.0.0.1", 5), "/v1/ws?api_key=sk-SECRET&x=1"), None)
    assert all(f.filter(record) for f in logging.getLogger("uvicorn.error").filters)
    assert "sk-SECRET" not in record.getMessage() and "api_key=***" in record.getMessage()
