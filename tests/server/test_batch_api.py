"""Batch jobs through the real SDKs: OpenAI's Files + Batches and Anthropic's Message Batches.
Every custom_id comes back once, with the text a direct request with the same seed gives; lines
sharing instructions reuse their KV; bad input is a 400 naming the line, or one line's error
record; tenants see only their own files and batches.

The tiny random model behind a ByteTokenizer (one token per byte), fp32, on an in-process server
with a state directory of its own."""

from __future__ import annotations

import json
import time

import anthropic
import httpx
import openai
import pytest
from helpers import MODEL, ServerThread, single_torch_thread, wait_until

from kvserve.config import ServerConfig
from kvserve.server.auth import ApiKeys, Principal

INSTRUCTIONS = ["Summarise this shipping note in one line, then give its urgency: " * 3,
                "Classify the sentiment of the customer's message as good, bad or neutral: " * 3]
TIMEOUT_S = 90


def chat_body(i: int, **extra) -> dict:
    seeded = {"temperature": 0.8, "seed": 100 + i} if i % 2 else {"temperature": 0}
    return {"model": MODEL, "max_tokens": 12, "messages": [
        {"role": "system", "content": INSTRUCTIONS[i % 2]}, {"role": "user", "content": f"document {i}: parcel late"}],
        **seeded, **extra}


def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    config = ServerConfig(state_dir=str(tmp_path_factory.mktemp("state")), max_body_bytes=8192,
                          max_batch_file_bytes=64 * 1024, max_batch_lines=40, batch_concurrency=4)
    keys = ApiKeys({"sk-a": Principal("alpha", False), "sk-b": Principal("beta", False)})
    with single_torch_thread(), ServerThread(config, api_keys=keys) as server:
        yield server


def openai_client(server, key: str = "sk-a") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key, max_retries=0, timeout=60)


def wait_for(get, done, timeout_s: float = TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    while not done(value := get()):
        assert time.monotonic() < deadline, value
        time.sleep(0.1)
    return value


def test_openai_sdk_upload_create_poll_download(server):
    client = openai_client(server)
    lines = [{"custom_id": f"doc-{i}", "method": "POST", "url": "/v1/chat/completions", "body": chat_body(i)}
             for i in range(10)]
    uploaded = client.files.create(file=("docs.jsonl", jsonl(lines)), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == len(jsonl(lines))
    assert client.files.content(uploaded.id).content == jsonl(lines)
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"job": "nightly"})
    assert batch.status in ("validating", "in_progress") and batch.metadata == {"job": "nightly"}
    done = wait_for(lambda: client.batches.retrieve(batch.id), lambda b: b.status == "completed")
    assert done.request_counts.total == 10 and done.request_counts.completed == 10 and done.request_counts.failed == 0
    assert done.in_progress_at and done.finalizing_at and done.completed_at and done.error_file_id is None
    results = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    assert sorted(r["custom_id"] for r in results) == sorted(line["custom_id"] for line in lines)   # each once
    by_id = {r["custom_id"]: r["response"] for r in results}
    cached = 0
    for i, line in enumerate(lines):
        direct = client.chat.completions.create(**chat_body(i))
        answer = by_id[line["custom_id"]]
        assert answer["status_code"] == 200
        assert answer["body"]["choices"][0]["message"]["content"] == direct.choices[0].message.content, i
        cached += answer["body"]["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0                                   # lines sharing instructions read each other's KV
    assert done.id in [b.id for b in client.batches.list(limit=5).data]


def test_completions_batches_and_a_bad_line_that_becomes_its_own_error_record(server):
    client = openai_client(server)
    lines = [{"custom_id": "ok", "method": "POST", "url": "/v1/completions",
              "body": {"model": MODEL, "prompt": "Once upon", "max_tokens": 5, "temperature": 0}},
             {"custom_id": "too-hot", "method": "POST", "url": "/v1/completions",
              "body": {"model": MODEL, "prompt": "x", "max_tokens": 5, "temperature": 9}}]
    uploaded = client.files.create(file=("c.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h")
    done = wait_for(lambda: client.batches.retrieve(batch.id), lambda b: b.status == "completed")
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 1)
    [ok] = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    [bad] = [json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()]
    assert ok["custom_id"] == "ok" and ok["response"]["body"]["object"] == "text_completion"
    assert bad["custom_id"] == "too-hot" and bad["response"]["status_code"] == 400
    assert bad["response"]["body"]["error"]["param"] == "temperature"


@pytest.mark.parametrize("lines, message", [
    ([b'{"custom_id": "a"', b"{}"], "line 1: not valid JSON"),
    ([{"custom_id": "a", "url": "/v1/chat/completions", "body": chat_body(0)}] * 2, "line 2: custom_id 'a' is used twice"),
    ([{"custom_id": "a", "url": "/v1/chat/completions", "body": chat_body(0, model="gpt-9")}], "line 1: model"),
    ([{"custom_id": "a", "url": "/v1/completions", "body": {"prompt": "x"}}], "line 1: url must be"),
    ([{"custom_id": "a", "url": "/v1/chat/completions", "body": chat_body(0, note="x" * 9000)}],
     "line 1: the line is"),
])
def test_bad_input_is_a_400_naming_the_line(server, lines, message):
    content = b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines)
    client = openai_client(server)
    try:   # some files are refused at upload (syntax, sizes), the others at batch creation
        uploaded = client.files.create(file=("bad.jsonl", content), purpose="batch")
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    except openai.BadRequestError as refused:
        assert message in refused.message, refused.message
    else:
        pytest.fail("the bad file was accepted")


def test_limits_and_unknown_ids(server):
    client = openai_client(server)
    with pytest.raises(openai.APIStatusError) as too_big:
        client.files.create(file=("big.jsonl", b"x" * (128 * 1024)), purpose="batch")
    assert too_big.value.status_code == 413
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("a.jsonl", b"{}\n"), purpose="fine-tune")
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    uploaded = client.files.create(file=("a.jsonl", jsonl([{"custom_id": "a", "url": "/v1/chat/completions",
                                                            "body": chat_body(0)}])), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="9y")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    assert client.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)


def test_tenants_see_only_their_own_files_and_batches(server):
    alpha, beta = openai_client(server, "sk-a"), openai_client(server, "sk-b")
    uploaded = alpha.files.create(file=("a.jsonl", jsonl([{"custom_id": "a", "url": "/v1/chat/completions",
                                                           "body": chat_body(0)}])), purpose="batch")
    batch = alpha.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        beta.files.retrieve(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        beta.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):   # nor may it start a batch on alpha's file
        beta.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert batch.id not in [b.id for b in beta.batches.list().data]
    assert uploaded.id not in [f.id for f in beta.files.list().data]
    with pytest.raises(openai.AuthenticationError):
        openai_client(server, "sk-nope").batches.list()


def test_cancel_through_the_sdk(server):
    client = openai_client(server)
    lines = [{"custom_id": f"l{i}", "url": "/v1/chat/completions", "body": chat_body(i, max_tokens=200,
                                                                                    ignore_eos=True)}
             for i in range(30)]
    uploaded = client.files.create(file=("long.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = wait_for(lambda: client.batches.retrieve(batch.id), lambda b: b.status == "cancelled")
    assert done.cancelled_at and done.request_counts.total == 30 and done.request_counts.completed < 30
    assert wait_until(server.idle, timeout_s=15)        # the lines in flight were aborted: nothing held


def test_anthropic_sdk_message_batches(server):
    client = anthropic.Anthropic(base_url=server.base_url, api_key="sk-a", max_retries=0, timeout=60)
    params = [{"model": MODEL, "max_tokens": 10, "temperature": 0, "system": INSTRUCTIONS[i % 2],
               "messages": [{"role": "user", "content": f"note {i}"}]} for i in range(6)]
    bad = {"model": MODEL, "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}
    batch = client.messages.batches.create(requests=[{"custom_id": f"n{i}", "params": p} for i, p in enumerate(params)]
                                           + [{"custom_id": "bad", "params": bad}])
    assert batch.type == "message_batch" and batch.processing_status == "in_progress"
    done = wait_for(lambda: client.messages.batches.retrieve(batch.id), lambda b: b.processing_status == "ended")
    assert done.request_counts.succeeded == 6 and done.request_counts.errored == 1 and done.ended_at
    results = {r.custom_id: r.result for r in client.messages.batches.results(batch.id)}
    assert set(results) == {f"n{i}" for i in range(6)} | {"bad"}
    assert results["bad"].type == "errored"
    for i, p in enumerate(params):   # (this SDK version takes temperature only as an extra)
        direct = client.messages.create(**{k: v for k, v in p.items() if k != "temperature"},
                                        extra_body={"temperature": 0})
        assert results[f"n{i}"].type == "succeeded"
        assert results[f"n{i}"].message.content[0].text == direct.content[0].text
    assert batch.id in [b.id for b in client.messages.batches.list(limit=10).data]
    with pytest.raises(anthropic.BadRequestError, match="used twice"):
        client.messages.batches.create(requests=[{"custom_id": "x", "params": params[0]}] * 2)
    with pytest.raises(anthropic.NotFoundError):
        anthropic.Anthropic(base_url=server.base_url, api_key="sk-b", max_retries=0).messages.batches.retrieve(batch.id)


def test_batch_metrics(server):
    text = httpx.get(f"{server.base_url}/metrics").text
    for name in ("kvserve:batch_lines_queued", "kvserve:batch_lines_running", "kvserve:batch_lines_finished_total",
                 "kvserve:batch_output_tokens_total"):
        assert name in text, name


def test_without_a_state_dir_batch_jobs_are_off():
    with single_torch_thread(), ServerThread(ServerConfig()) as server:
        response = httpx.get(f"{server.base_url}/v1/batches")
        assert response.status_code == 404 and "--state-dir" in response.json()["error"]["message"]


def test_a_line_the_engine_refuses_is_its_own_error_record_and_rates_are_charged_once(tmp_path):
    """Regressions: a line whose prompt ids are out of the vocabulary was retried forever; a batch
    call authenticated (and charged the key's rate) twice; batch lines in flight counted against the
    interactive queue cap, so interactive requests got 429s while a batch ran."""
    config = ServerConfig(state_dir=str(tmp_path), max_queued_requests=0, batch_concurrency=6)
    keys = ApiKeys({"sk-slow": Principal("slow", False, requests_per_minute=3)})
    with single_torch_thread(), ServerThread(config, api_keys=keys, max_num_seqs=2, step_delay_s=0.01) as server:
        client = openai_client(server, "sk-slow")
        lines = [{"custom_id": "bad-ids", "url": "/v1/completions",
                  "body": {"model": MODEL, "prompt": [10**9], "max_tokens": 3}}]
        lines += [{"custom_id": f"long-{i}", "url": "/v1/completions",
                   "body": {"model": MODEL, "prompt": f"line {i}", "max_tokens": 300, "ignore_eos": True}}
                  for i in range(6)]
        uploaded = client.files.create(file=("l.jsonl", jsonl(lines)), purpose="batch")          # 1st request
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions",   # 2nd: not 3rd
                                      completion_window="24h")
        assert wait_until(lambda: server.app.state.models[MODEL].background_in_flight > 2, timeout_s=30)
        interactive = httpx.post(f"{server.base_url}/v1/completions", headers={"Authorization": "Bearer sk-slow"},
                                 json={"model": MODEL, "prompt": "now", "max_tokens": 2}, timeout=30)
        assert interactive.status_code == 200, interactive.text                                # 3rd request
        with pytest.raises(openai.RateLimitError):
            client.batches.retrieve(batch.id)                                                   # 4th: over the rate
        done = wait_for(lambda: server.app.state.batch_store.get_batch(batch.id), lambda b: b["status"] == "completed")
        errors = [json.loads(x) for x in server.app.state.batch_store.file_path(done["error_file_id"]).read_text()
                  .splitlines()]
        assert [e["custom_id"] for e in errors] == ["bad-ids"] and errors[0]["response"]["status_code"] == 400
