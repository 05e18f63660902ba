"""API keys → tenants: 401s, isolated prefix caches, admin-only cache endpoints."""

import hashlib
import json

import httpx
import openai
import pytest
import websockets.sync.client as ws_client

from kvserve.config import ConfigError, ServerConfig
from kvserve.server.auth import ApiKeys, Principal, presented_key, sigv4_access_key_id

from helpers import MODEL, ServerThread

KEYS = {"sk-a": Principal("alpha", False), "sk-b": Principal("beta", False), "sk-admin": Principal("ops", True)}
PROMPT = "A long shared prompt about tenants and caches. " * 6      # ~290 bytes → 18 full blocks


@pytest.fixture(scope="module")
def server():
    with ServerThread(ServerConfig(cache_min_tokens=32), api_keys=ApiKeys(KEYS)) as server:
        yield server


def client(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key, max_retries=0)


def cached(server, key: str, prompt: str) -> int:
    out = client(server, key).completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0)
    return out.usage.prompt_tokens_details.cached_tokens


def test_missing_or_invalid_key_is_401(server):
    r = httpx.post(f"{server.base_url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(server, "sk-wrong").models.list()
    assert httpx.get(f"{server.base_url}/health").status_code == 200     # health stays open


def test_tenant_b_reads_nothing_of_tenant_a_prompt(server):
    prompt = "tenant-iso " + PROMPT
    assert cached(server, "sk-a", prompt) == 0
    assert cached(server, "sk-a", prompt) > 250                 # A reads all full blocks back
    assert cached(server, "sk-b", prompt) == 0                  # B, the same exact prompt: nothing
    assert cached(server, "sk-b", prompt) > 250                 # B's own copy now


def test_cache_salt_narrows_within_a_tenant(server):
    prompt = "salted " + PROMPT
    cached(server, "sk-a", prompt)
    out = client(server, "sk-a").completions.create(model=MODEL, prompt=prompt, max_tokens=1,
                                                    extra_body={"cache_salt": "private"})
    assert out.usage.prompt_tokens_details.cached_tokens == 0


def test_websocket_needs_a_key_and_runs_as_its_tenant(server):
    url = server.base_url.replace("http", "ws") + "/v1/ws"
    with pytest.raises(Exception):
        with ws_client.connect(url) as sock:
            sock.recv(timeout=5)
    with ws_client.connect(url + "?api_key=sk-a") as sock:
        sock.send(json.dumps({"type": "request", "id": "1", "endpoint": "completions",
                              "body": {"model": MODEL, "prompt": "ws " + PROMPT, "max_tokens": 1}}))
        while (frame := json.loads(sock.recv(timeout=30)))["type"] != "done":
            assert frame["type"] == "delta", frame
    assert cached(server, "sk-a", "ws " + PROMPT) > 250         # same tenant as over HTTP
    assert cached(server, "sk-b", "ws " + PROMPT) == 0


def test_cache_admin_endpoints(server):
    part = {"type": "text", "text": "admin-pin " + PROMPT, "cache_control": {"type": "ephemeral"}}
    client(server, "sk-a").chat.completions.create(model=MODEL, max_tokens=1,
                                                   messages=[{"role": "user", "content": [part]}])
    assert httpx.get(f"{server.base_url}/v1/cache", headers={"Authorization": "Bearer sk-a"}).status_code == 403
    r = httpx.get(f"{server.base_url}/v1/cache", headers={"Authorization": "Bearer sk-admin"})
    assert r.status_code == 200
    stats = r.json()["models"][MODEL]
    assert stats["blocks"]["pinned"] > 0 and stats["blocks"]["cached"] > 0
    assert stats["bytes"]["device"]["capacity"] > 0 and 0 < stats["prefix_cache"]["hit_rate"] <= 1
    [pin] = [p for p in stats["pins"] if p["ttl_left_s"] > 0][:1]
    assert set(pin) == {"hash", "num_tokens", "ttl_s", "ttl_left_s"} and "admin-pin" not in r.text
    flushed = httpx.delete(f"{server.base_url}/v1/cache", headers={"Authorization": "Bearer sk-admin"}).json()
    assert flushed["flushed_blocks"][MODEL] > 0
    after = httpx.get(f"{server.base_url}/v1/cache", headers={"x-api-key": "sk-admin"}).json()["models"][MODEL]
    assert after["blocks"]["pinned"] == stats["blocks"]["pinned"]          # pins survive a plain flush
    httpx.delete(f"{server.base_url}/v1/cache?all=true", headers={"Authorization": "Bearer sk-admin"})
    final = httpx.get(f"{server.base_url}/v1/cache", headers={"x-api-key": "sk-admin"}).json()["models"][MODEL]
    assert final["blocks"]["pinned"] == 0 and final["pins"] == []


def test_key_parsing_and_loading(tmp_path):
    assert presented_key({"authorization": "Bearer sk-1"}) == "sk-1"
    assert presented_key({"x-api-key": "sk-2"}) == "sk-2"
    aws = "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261124/us-east-1/bedrock/aws4_request, SignedHeaders=host, Signature=ab"
    assert presented_key({"authorization": aws}) == "AKIDEXAMPLE" == sigv4_access_key_id(aws)
    assert presented_key({}, {"api_key": "sk-3"}) == "sk-3" and presented_key({}) is None
    good = tmp_path / "keys.json"
    good.write_text(json.dumps({"k1": {"tenant": "t1"}, "k2": {"tenant": "t2", "admin": True}}))
    keys = ApiKeys.load(good)
    principal = keys.authenticate("k2")
    assert (principal.tenant, principal.admin, principal.requests_per_minute) == ("t2", True, None)
    assert principal.key_id == hashlib.sha256(b"k2").hexdigest()[:8]   # names the key without showing it
    for bad in ["[]", "{}", '{"k": {"admin": true}}', "not json", '{"k": {"tenant": "t", "wieght": 2}}',
                '{"k": {"tenant": "t", "requests_per_minute": 0}}', '{"": {"tenant": "t"}}']:
        (tmp_path / "bad.json").write_text(bad)
        with pytest.raises(ConfigError):
            ApiKeys.load(tmp_path / "bad.json")


def test_bedrock_maps_the_sigv4_access_key_id_to_a_tenant(server):
    import boto3
    import botocore.exceptions
    from botocore.config import Config

    def bedrock(key: str):
        return boto3.client("bedrock-runtime", endpoint_url=server.base_url, region_name="us-east-1",
                            aws_access_key_id=key, aws_secret_access_key="unused",
                            config=Config(retries={"max_attempts": 1}))

    messages = [{"role": "user", "content": [{"text": "bedrock " + PROMPT}]}]
    with pytest.raises(botocore.exceptions.ClientError) as denied:
        bedrock("AKIDUNKNOWN").converse(modelId=MODEL, messages=messages, inferenceConfig={"maxTokens": 1})
    assert denied.value.response["Error"]["Code"] == "AccessDeniedException"
    first = bedrock("sk-a").converse(modelId=MODEL, messages=messages, inferenceConfig={"maxTokens": 1})
    again = bedrock("sk-a").converse(modelId=MODEL, messages=messages, inferenceConfig={"maxTokens": 1})
    other = bedrock("sk-b").converse(modelId=MODEL, messages=messages, inferenceConfig={"maxTokens": 1})
    assert first["usage"]["cacheReadInputTokens"] == 0 and again["usage"]["cacheReadInputTokens"] > 250
    assert other["usage"]["cacheReadInputTokens"] == 0
