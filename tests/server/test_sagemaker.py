"""SageMaker's container contract (/ping, /invocations, /invocations-response-stream) directly, and
through boto3's own `sagemaker-runtime` client (invoke_endpoint and its response stream) pointed at
the server with `endpoint_url`; the listening address under --sagemaker and SAGEMAKER_BIND_TO_PORT."""

import argparse
import json

import boto3
import httpx
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from kvserve.cli import server_address
from kvserve.config import ConfigError, ServerConfig
from kvserve.server.sagemaker import api_of

from helpers import MODEL, ServerThread, single_torch_thread

CHAT = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0}
CONVERSE = {"messages": [{"role": "user", "content": [{"text": "Say hello."}]}],
            "inferenceConfig": {"maxTokens": 8, "temperature": 0}}


@pytest.fixture(scope="module")
def server():
    with single_torch_thread(), ServerThread(ServerConfig()) as server:
        yield server


def runtime(server):
    return boto3.client("sagemaker-runtime", endpoint_url=server.base_url, region_name="us-east-1",
                        aws_access_key_id="x", aws_secret_access_key="x",
                        config=Config(retries={"total_max_attempts": 1}, read_timeout=30))


def sse_text(raw: str) -> str:
    chunks = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]
    assert raw.rstrip().endswith("data: [DONE]")
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def test_ping_and_both_body_shapes_on_the_container_routes(server):
    assert httpx.get(f"{server.base_url}/ping").status_code == 200
    chat = httpx.post(f"{server.base_url}/invocations", json=CHAT, timeout=30).json()
    assert chat["object"] == "chat.completion" and chat["model"] == MODEL and chat["usage"]["completion_tokens"] == 8
    converse = httpx.post(f"{server.base_url}/invocations", json=CONVERSE, timeout=30).json()
    assert converse["output"]["message"]["content"][0]["text"] == chat["choices"][0]["message"]["content"]
    assert converse["usage"]["outputTokens"] == 8
    completion = httpx.post(f"{server.base_url}/invocations", json={"prompt": "Once", "max_tokens": 4}, timeout=30)
    assert completion.json()["object"] == "text_completion"

    streamed = httpx.post(f"{server.base_url}/invocations-response-stream", json=CHAT, timeout=30)
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert sse_text(streamed.text) == chat["choices"][0]["message"]["content"]
    lines = httpx.post(f"{server.base_url}/invocations-response-stream", json=CONVERSE, timeout=30).text.splitlines()
    events = [json.loads(line) for line in lines]
    assert next(iter(events[0])) == "messageStart" and next(iter(events[-1])) == "metadata"
    text = "".join(e["contentBlockDelta"]["delta"]["text"] for e in events if "contentBlockDelta" in e)
    assert text == chat["choices"][0]["message"]["content"]


def test_boto3_invoke_endpoint_and_its_response_stream(server):
    client = runtime(server)
    reply = client.invoke_endpoint(EndpointName="kvserve", Body=json.dumps(CHAT), ContentType="application/json")
    chat = json.loads(reply["Body"].read())
    assert reply["ContentType"] == "application/json" and reply["InvokedProductionVariant"] == "AllTraffic"
    answer = chat["choices"][0]["message"]["content"]
    # The API named by the custom attributes, and the endpoint name naming a served model.
    reply = client.invoke_endpoint(EndpointName=MODEL, Body=json.dumps(CONVERSE), CustomAttributes="trace=1;api=bedrock")
    assert json.loads(reply["Body"].read())["output"]["message"]["content"][0]["text"] == answer

    stream = client.invoke_endpoint_with_response_stream(EndpointName="kvserve", Body=json.dumps(CHAT))
    raw = b"".join(event["PayloadPart"]["Bytes"] for event in stream["Body"])
    assert sse_text(raw.decode()) == answer
    stream = client.invoke_endpoint_with_response_stream(EndpointName="kvserve", Body=json.dumps(CONVERSE))
    raw = b"".join(event["PayloadPart"]["Bytes"] for event in stream["Body"])
    events = [json.loads(line) for line in raw.decode().splitlines()]
    assert "".join(e["contentBlockDelta"]["delta"]["text"] for e in events if "contentBlockDelta" in e) == answer


@pytest.mark.parametrize("body, attributes, status, words", [
    ("{not json", None, 400, "not valid JSON"),
    (json.dumps([1, 2]), None, 400, "JSON object"),
    (json.dumps(CHAT), "api=grpc", 400, "api must be one of"),
    (json.dumps({**CHAT, "max_tokens": -1}), None, 400, "max_tokens"),
    (json.dumps({**CHAT, "temperature": "hot"}), None, 422, "temperature"),
    (json.dumps({"messages": [{"role": "user", "content": [{"image": {}}]}]}), None, 400, "image"),
])
def test_bad_invocations_are_4xx_here_and_model_errors_through_the_runtime(server, body, attributes, status, words):
    headers = {"content-type": "application/json"}
    if attributes:
        headers["X-Amzn-SageMaker-Custom-Attributes"] = attributes
    direct = httpx.post(f"{server.base_url}/invocations", content=body, headers=headers, timeout=30)
    assert direct.status_code == status and words in direct.text
    with pytest.raises(ClientError) as raised:
        runtime(server).invoke_endpoint(EndpointName="kvserve", Body=body, **(
            {"CustomAttributes": attributes} if attributes else {}))
    error = raised.value.response
    assert error["Error"]["Code"] == "ModelError" and error["OriginalStatusCode"] == status
    assert words in error["OriginalMessage"]


def test_shapes_and_the_listening_address(monkeypatch):
    assert api_of(CHAT, None) == "openai" and api_of(CONVERSE, None) == "bedrock"
    assert api_of({"system": [{"text": "x"}], "messages": []}, None) == "bedrock"
    assert api_of(CONVERSE, "api=openai") == "openai"
    args = argparse.Namespace(host="127.0.0.1", port=8000, sagemaker=False)
    assert server_address(args, {}) == ("127.0.0.1", 8000)
    assert server_address(argparse.Namespace(host="127.0.0.1", port=8000, sagemaker=True), {}) == ("0.0.0.0", 8080)
    assert server_address(args, {"SAGEMAKER_BIND_TO_PORT": "9090"}) == ("0.0.0.0", 9090)
    with pytest.raises(ConfigError, match="SAGEMAKER_BIND_TO_PORT"):
        server_address(args, {"SAGEMAKER_BIND_TO_PORT": "http"})


def test_serve_takes_options_from_the_environment_as_sagemaker_starts_it():
    from kvserve.cli import with_serve_args

    env = {"KVSERVE_SERVE_ARGS": "--model '/opt/ml/model/my model.gguf' --max-num-seqs 32"}
    assert with_serve_args(["serve"], env) == ["serve", "--model", "/opt/ml/model/my model.gguf", "--max-num-seqs", "32"]
    assert with_serve_args(["generate", "hi"], env) == ["generate", "hi"]      # only serve reads it
    assert with_serve_args(["serve", "--port", "1"], {}) == ["serve", "--port", "1"]
    with pytest.raises(SystemExit, match="KVSERVE_SERVE_ARGS"):
        with_serve_args(["serve"], {"KVSERVE_SERVE_ARGS": "--model 'unclosed"})


def test_a_body_that_is_not_an_object_or_nested_too_deeply_is_a_400_whatever_the_api(server):
    for body in ("[1, 2]", "[" * 100_000 + "]" * 100_000):
        response = httpx.post(f"{server.base_url}/invocations", content=body, timeout=30,
                              headers={"content-type": "application/json", "X-Amzn-SageMaker-Custom-Attributes": "api=openai"})
        assert response.status_code == 400, response.text
