"""Routers over the real model pair (Qwen2.5-Coder 0.5B and 1.5B) through real SDK clients:
every routing path (the small model keeps the answer, the large one is predicted, escalation
before the first token, hand-off mid-stream) seen through openai, anthropic and boto3's Converse;
a streamed answer equals the non-streamed one; prefix caching holds across the pair; routers are
listed; routing and cost are in the metrics.

Each router gets a calibration file that forces its path (the decision logic itself is tested
path by path in tests/unit/test_routing.py): biases of +-20 make an estimate certain, and the
`window` signal (0 for the held-back prefix, >= 1 after) lets the prefix pass and the first later
window fail.
"""

import json
import os
import subprocess
import sys

import httpx
import pytest

from tests.server.helpers import REPO_ROOT, free_port, wait_healthy

pytestmark = pytest.mark.integration

CERTAIN = 20.0
CALIBRATIONS = {
    "keep": {"p_small": 0.0, "p_large": 0.0, "q_small": ({}, CERTAIN)},
    "predicted": {"p_small": -CERTAIN, "p_large": CERTAIN, "q_small": ({}, CERTAIN)},
    "escalate": {"p_small": 0.0, "p_large": 0.0, "q_small": ({}, -CERTAIN)},
    "handoff": {"p_small": 0.0, "p_large": 0.0, "q_small": ({"window": -2 * CERTAIN}, CERTAIN)},
}
OPTIONS = {"escalate": ",hold=4", "handoff": ",hold=4,window=4"}
QUESTION = "Write a Python function that returns the square of a number."


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("calibrations")
    command = [sys.executable, "-m", "kvserve.cli", "serve", "--port", str(port := free_port()), "--state-dir", "",
               "--model", "small=qwen-coder-0.5b", "--model", "large=qwen-coder-1.5b", "--max-num-seqs", "8",
               "--kv-cache-memory", "512MiB"]
    for name, c in CALIBRATIONS.items():
        path = directory / f"{name}.json"
        weights, bias = c["q_small"]
        path.write_text(json.dumps({"p_small": {"weights": {}, "bias": c["p_small"]},
                                    "p_large": {"weights": {}, "bias": c["p_large"]},
                                    "q_small": {"weights": weights, "bias": bias}}))
        command += ["--router", f"{name}=small,large,calibration={path}{OPTIONS.get(name, '')}"]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, 600, process)
        yield base
    except BaseException:
        if process.poll() is None:
            process.terminate()
        print(process.communicate(timeout=30)[0].decode(errors="replace")[-4000:], file=sys.stderr)
        raise
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def openai_client(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=300)


def chat(client, router, stream=False, max_tokens=24, temperature=0.0, **extra):
    messages = [{"role": "user", "content": QUESTION}]
    return client.chat.completions.create(model=router, messages=messages, max_tokens=max_tokens,
                                          temperature=temperature, stream=stream, **extra)


def test_the_small_model_keeps_a_confident_answer(openai_client):
    response = chat(openai_client, "keep")
    routing = response.model_extra["routing"]
    assert response.model == "small"
    assert (routing["chosen_model"], routing["escalated"], routing["reason"]) == ("small", False, "predicted")
    assert routing["segments"] == [{"model": "small", "start": 0, "end": response.usage.completion_tokens}]
    assert [run["model"] for run in routing["runs"]] == ["small"]
    cost = response.usage.model_extra["cost"]
    assert set(cost["by_model"]) == {"small"} and cost["weighted"] > 0


def test_a_predicted_hard_prompt_goes_to_the_large_model_streamed(openai_client):
    chunks = list(chat(openai_client, "predicted", stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason is not None][-1]
    routing = final.model_extra["routing"]
    assert final.model == "large" and text
    assert (routing["chosen_model"], routing["escalated"], routing["reason"]) == ("large", True, "predicted")
    assert [run["model"] for run in routing["runs"]] == ["small", "large"]
    assert routing["runs"][0]["output_tokens"] <= 2          # the small model ran its prefill and a token
    usage = chunks[-1].usage.model_extra["cost"]
    assert set(usage["by_model"]) == {"small", "large"}


def test_escalation_before_the_first_token_through_anthropic(server):
    import anthropic

    client = anthropic.Anthropic(base_url=server, api_key="unused", max_retries=0, timeout=300)
    message = client.messages.create(model="escalate", max_tokens=24, extra_body={"temperature": 0},
                                     messages=[{"role": "user", "content": QUESTION}])
    routing = message.model_extra["routing"]
    assert message.model == "large"
    assert (routing["reason"], routing["escalated"]) == ("low_confidence", True)
    assert routing["segments"] == [{"model": "large", "start": 0, "end": message.usage.output_tokens}]
    assert routing["runs"][0]["model"] == "small" and routing["runs"][0]["shown"] == 0
    with client.messages.stream(model="escalate", max_tokens=24, extra_body={"temperature": 0},
                                messages=[{"role": "user", "content": QUESTION}]) as stream:
        streamed = stream.get_final_message()
    assert streamed.content[0].text == message.content[0].text
    assert streamed.model == "large"


def test_a_handoff_mid_stream_through_bedrock_converse(server):
    import boto3
    from botocore.config import Config

    client = boto3.client("bedrock-runtime", endpoint_url=server, region_name="us-east-1",
                          aws_access_key_id="x", aws_secret_access_key="x",
                          config=Config(retries={"max_attempts": 0}, read_timeout=300))
    messages = [{"role": "user", "content": [{"text": QUESTION}]}]
    reply = client.converse(modelId="handoff", messages=messages, inferenceConfig={"maxTokens": 24, "temperature": 0})
    assert reply["trace"]["promptRouter"]["invokedModelId"] == "large"
    routing = reply["additionalModelResponseFields"]["routing"]
    assert routing["reason"] == "handoff" and routing["escalated"]
    small, large = routing["segments"]
    assert small["model"] == "small" and large["model"] == "large"
    assert small["start"] == 0 and small["end"] == large["start"] >= 4 and large["end"] == reply["usage"]["outputTokens"]
    streamed = client.converse_stream(modelId="handoff", messages=messages,
                                      inferenceConfig={"maxTokens": 24, "temperature": 0})
    text, trace = "", None
    for event in streamed["stream"]:
        text += event.get("contentBlockDelta", {}).get("delta", {}).get("text", "")
        trace = event.get("metadata", {}).get("trace", trace)
    assert text == reply["output"]["message"]["content"][0]["text"]
    assert trace["promptRouter"]["invokedModelId"] == "large"


@pytest.mark.parametrize("router", ["handoff", "keep"])
def test_streamed_equals_non_streamed_under_the_same_seed(openai_client, router):
    whole = chat(openai_client, router, temperature=0.8, seed=11)
    chunks = list(chat(openai_client, router, stream=True, temperature=0.8, seed=11))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason is not None][-1]
    assert final.model_extra["routing"]["segments"] == whole.model_extra["routing"]["segments"]


def test_prefix_caching_holds_across_the_pair(openai_client):
    """Turns alternate between the models; each model's cached prefix of the conversation is read."""
    history = [{"role": "system", "content": "You are a careful assistant. " * 40},
               {"role": "user", "content": "Name a prime number."}]
    first = openai_client.chat.completions.create(model="keep", messages=history, max_tokens=8, temperature=0)
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "And another one?"}]
    second = openai_client.chat.completions.create(model="predicted", messages=history, max_tokens=8, temperature=0)
    small_run = second.model_extra["routing"]["runs"][0]
    assert small_run["model"] == "small" and small_run["cached_tokens"] >= 192    # the first turn's prefix
    history += [{"role": "assistant", "content": second.choices[0].message.content},
                {"role": "user", "content": "Thanks. One more?"}]
    third = openai_client.chat.completions.create(model="predicted", messages=history, max_tokens=8, temperature=0)
    large_run = third.model_extra["routing"]["runs"][1]
    assert large_run["model"] == "large" and large_run["cached_tokens"] >= second.usage.prompt_tokens - 16
    assert third.usage.prompt_tokens_details.cached_tokens == large_run["cached_tokens"]


def test_routers_are_listed_and_measured(server):
    routers = httpx.get(f"{server}/v1/routers").json()["data"]
    assert {r["id"] for r in routers} == set(CALIBRATIONS)
    handoff = next(r for r in routers if r["id"] == "handoff")
    assert handoff["models"] == ["small", "large"] and handoff["window_tokens"] == 4
    assert handoff["cost_weights"]["large"] > 3 * handoff["cost_weights"]["small"]
    models = {m["id"]: m for m in httpx.get(f"{server}/v1/models").json()["data"]}
    assert models["keep"]["owned_by"] == "kvserve-router"
    metrics = httpx.get(f"{server}/metrics").text
    assert 'kvserve:routing_decisions_total{answered_by="small",model_name="keep",reason="predicted"}' in metrics
    assert 'kvserve:weighted_cost_total{model_name="handoff"}' in metrics
    assert 'kvserve:routing_overhead_seconds_count{kind="decision",model_name="keep"}' in metrics


def test_a_bad_router_spec_is_refused_at_start():
    result = subprocess.run([sys.executable, "-m", "kvserve.cli", "serve", "--model", "a=random:tiny",
                             "--router", "chat=a,b"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no served model is named 'b'" in result.stderr
