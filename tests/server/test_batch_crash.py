"""Batch jobs lose nothing and do nothing twice: a server killed with SIGKILL mid-job and started
again on the same --state-dir completes the job, answers every line exactly once, and its
computed-token counter shows that the lines finished before the kill were not run again. The
offline CLI, interrupted and run again, ends with the output an uninterrupted run gives."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import httpx
import pytest
from helpers import MODEL, REPO_ROOT, serve_process, wait_until

MAX_TOKENS = 48
LINES = [{"custom_id": f"doc-{i}", "method": "POST", "url": "/v1/chat/completions",
          "body": {"model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
                   "messages": [{"role": "user", "content": f"Summarise document {i:03d}: the parcel was late."}]}}
         for i in range(40)]
CONTENT = "".join(json.dumps(line) + "\n" for line in LINES).encode()


def prompt_tokens(url: str, line: dict) -> int:
    """The line's prompt length, asked of the server itself (max_tokens 1, usage)."""
    body = {**line["body"], "max_tokens": 1}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30).json()["usage"]["prompt_tokens"]


def computed_tokens(url: str) -> float:
    for row in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if row.startswith("kvserve:computed_tokens_total"):
            return float(row.rsplit(" ", 1)[1])
    return 0.0


def test_a_server_killed_mid_job_resumes_and_answers_every_line_once(tmp_path):
    state = tmp_path / "state"
    # No prefix caching and room for everyone: each line then computes exactly prompt + max_tokens - 1
    # tokens, so the counter tells which lines ran.
    args = ("--state-dir", str(state), "--batch-concurrency", "4", "--no-prefix-caching")
    with serve_process(*args) as (url, process):
        client = httpx.Client(base_url=url, timeout=30)
        file_id = client.post("/v1/files", files={"file": ("docs.jsonl", CONTENT)}, data={"purpose": "batch"}).json()["id"]
        batch_id = client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                                    "completion_window": "24h"}).json()["id"]
        assert wait_until(lambda: client.get(f"/v1/batches/{batch_id}").json()["request_counts"]["completed"] >= 8,
                          timeout_s=120)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    with sqlite3.connect(state / "batch.sqlite3") as db:   # what was committed when it died
        finished = {row[0] for row in db.execute("SELECT custom_id FROM lines WHERE state = 'succeeded'")}
    assert 8 <= len(finished) < len(LINES), len(finished)

    with serve_process(*args) as (url, process):
        client = httpx.Client(base_url=url, timeout=30)
        done = None

        def completed() -> bool:
            nonlocal done
            done = client.get(f"/v1/batches/{batch_id}").json()
            return done["status"] == "completed"

        assert wait_until(completed, timeout_s=240, interval_s=0.2), done
        counted = computed_tokens(url)   # before anything else runs on this server
        assert done["request_counts"] == {"total": 40, "completed": 40, "failed": 0}
        results = [json.loads(x) for x in client.get(f"/v1/files/{done['output_file_id']}/content").text.splitlines()]
        assert sorted(r["custom_id"] for r in results) == sorted(line["custom_id"] for line in LINES)   # once each
        rerun = [line for line in LINES if line["custom_id"] not in finished]
        expected = sum(prompt_tokens(url, line) + MAX_TOKENS - 1 for line in rerun)
        assert counted == expected, (counted, expected)     # the finished lines were not computed again
        for result in results[:5]:                          # and the answers are the direct ones
            line = next(x for x in LINES if x["custom_id"] == result["custom_id"])
            direct = client.post("/v1/chat/completions", json=line["body"]).json()
            assert result["response"]["body"]["choices"][0]["message"] == direct["choices"][0]["message"]


def comparable(path) -> list[dict]:
    """An output file without what may differ between runs: each response's own id and time, and
    how many prompt tokens the prefix cache happened to hold."""
    records = []
    for raw in path.read_text().splitlines():
        record = json.loads(raw)
        body = record["response"]["body"]
        body.pop("id"), body.pop("created")
        body["usage"].pop("prompt_tokens_details"), body["usage"].pop("cache_read_input_tokens")
        records.append(record)
    return records


def batch_command(input_path, output_path) -> list[str]:
    return [sys.executable, "-m", "kvserve.cli", "batch", str(input_path), "-o", str(output_path),
            "--model", "random:tiny", "--dtype", "float32", "--concurrency", "4", "--quiet"]


def test_the_offline_cli_interrupted_and_run_again_gives_the_uninterrupted_output(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_bytes(CONTENT)
    whole, resumed = tmp_path / "whole.jsonl", tmp_path / "resumed.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(batch_command(source, whole), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                         env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["lines"] == 40 and summary["ran"] == 40 and summary["errors"] == 0

    killed = subprocess.Popen(batch_command(source, resumed), cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not resumed.exists() or resumed.read_bytes().count(b"\n") < 10:
        assert killed.poll() is None and time.monotonic() < deadline, "finished before it could be interrupted"
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    with open(resumed, "ab") as torn:
        torn.write(b'{"id": "batch_req_x", "custom_id": "doc-')   # a line the kill cut in half
    again = subprocess.run(batch_command(source, resumed), cwd=REPO_ROOT, capture_output=True, text=True,
                           timeout=300, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert summary["resumed_from"] >= 10 and summary["ran"] == 40 - summary["resumed_from"]
    assert comparable(resumed) == comparable(whole)


@pytest.mark.parametrize("content, message", [(b'{"custom_id": "a"}\n', "line 1: url must be"),
                                              (CONTENT + CONTENT[:CONTENT.index(b"\n") + 1], "used twice")])
def test_the_offline_cli_refuses_a_bad_file_naming_the_line(tmp_path, content, message):
    source = tmp_path / "bad.jsonl"
    source.write_bytes(content)
    out = subprocess.run(batch_command(source, tmp_path / "out.jsonl"), cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]
