"""Engine faults and shutdown, through the server.

- A request the engine cannot run fails alone: a clear 500 (code engine_error) for it, the
  others are answered.
- The engine thread dies: every request in flight fails fast with a 503, /health turns 503, new
  requests get 503, and the process exits non-zero (so that a supervisor restarts it).
- SIGTERM drains: /health 503 "draining", new requests 503 + Retry-After, streams in flight
  finish within --shutdown-timeout, the rest end with finish_reason "abort"; exit 0.
"""

from __future__ import annotations

import signal
import time

import httpx
import pytest
from helpers import (MODEL, ServerThread, make_engine, serve_process, single_torch_thread, sse_events, wait_until)

from kvserve.config import ServerConfig
from kvserve.engine.async_engine import AsyncEngine

CHAT = "/v1/chat/completions"
POISON = "\x07"   # the tiny model's byte tokenizer: token 7 appears only where this character is


def chat(content: str = "hi", **fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "temperature": 0, **fields}


def poisoned_engine(**options):
    engine = make_engine(**options)
    runner = engine.core.runner
    execute = runner.execute

    def failing_execute(plan):
        if any(7 in chunk.token_ids for chunk in plan.chunks):
            raise RuntimeError("injected: this request's input breaks the model")
        return execute(plan)

    runner.execute = failing_execute
    return engine


def test_a_request_that_breaks_the_engine_fails_alone_with_a_clear_500():
    engines = lambda: {MODEL: AsyncEngine(poisoned_engine(step_delay_s=0.002))}  # noqa: E731
    with single_torch_thread(), ServerThread(engines=engines) as server, \
            httpx.Client(base_url=server.base_url, timeout=30) as client:
        with client.stream("POST", CHAT, json=chat("a long answer", max_tokens=200, ignore_eos=True,
                                                   stream=True)) as good_stream:
            bad = client.post(CHAT, json=chat("poison " + POISON, max_tokens=5))
            assert bad.status_code == 500, bad.text
            error = bad.json()["error"]
            assert error["code"] == "engine_error" and error["type"] == "server_error"
            assert "other requests were not affected" in error["message"]
            events = list(sse_events(good_stream.iter_lines()))
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
        streamed = client.post(CHAT, json=chat(POISON, max_tokens=5, stream=True))
        frames = list(sse_events(streamed.iter_lines()))
        assert any(isinstance(f, dict) and f.get("error", {}).get("code") == "engine_error" for f in frames), frames
        assert client.get("/health").status_code == 200                  # the engine goes on
        assert client.post(CHAT, json=chat(max_tokens=3)).status_code == 200
        assert wait_until(server.idle)


def test_when_the_engine_dies_requests_get_503_health_turns_503_and_the_server_exits_1():
    engine = make_engine(step_delay_s=0.002)
    schedule, steps = engine.scheduler.schedule, []

    def dying_schedule():
        steps.append(1)
        if len(steps) > 30:
            raise RuntimeError("injected: the engine loop breaks")
        return schedule()

    engine.scheduler.schedule = dying_schedule
    with single_torch_thread(), ServerThread(engines=lambda: {MODEL: AsyncEngine(engine)}) as server, \
            httpx.Client(base_url=server.base_url, timeout=30) as client:
        started = time.monotonic()
        with client.stream("POST", CHAT, json=chat(max_tokens=3000, ignore_eos=True, stream=True)) as stream:
            frames = list(sse_events(stream.iter_lines()))
        assert time.monotonic() - started < 10                            # failed fast, not hung
        error = frames[-1]["error"]
        assert error["code"] == "engine_dead" and "the engine loop breaks" in error["message"], frames[-1]
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "error"
        assert "the engine loop breaks" in health.json()["error"]
        late = client.post(CHAT, json=chat(max_tokens=3))
        assert late.status_code == 503 and late.json()["error"]["code"] == "engine_dead"
        assert late.headers["retry-after"]
        assert wait_until(lambda: not server._thread.is_alive(), timeout_s=15)   # the server exits...
        assert server.server.exit_code == 1                                       # ... non-zero


def test_a_real_server_whose_engine_dies_exits_non_zero():
    with serve_process("--inject-fault", "engine-dies-after-steps=20") as (url, process):
        response = httpx.post(f"{url}{CHAT}", json=chat(max_tokens=500, ignore_eos=True), timeout=30)
        assert response.status_code == 503 and response.json()["error"]["code"] == "engine_dead"
        assert process.wait(timeout=30) == 1
        output = process.stdout.read().decode(errors="replace")
        assert "injected fault" in output and "exiting" in output


def test_a_real_server_steps_two_models_on_one_engine_thread_and_exits_1_when_one_dies():
    """Two models (on a CPU they share one engine thread, taking turns): both answer at once, the
    same (the same random weights); one engine's death still fails its request and ends the process."""
    from concurrent.futures import ThreadPoolExecutor

    with serve_process("--model", "second=random:tiny", "--inject-fault", "engine-dies-after-steps=30") as (url, process):
        def ask(model: str) -> httpx.Response:
            return httpx.post(f"{url}{CHAT}", json={**chat(max_tokens=8, ignore_eos=True), "model": model}, timeout=30)

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(ask, [MODEL, "second", MODEL, "second"]))
        assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
        assert len({a.json()["choices"][0]["message"]["content"] for a in answers}) == 1
        assert {a.json()["model"] for a in answers} == {MODEL, "second"}
        response = httpx.post(f"{url}{CHAT}", json={**chat(max_tokens=500, ignore_eos=True), "model": "second"},
                              timeout=30)
        assert response.status_code == 503 and response.json()["error"]["code"] == "engine_dead"
        assert process.wait(timeout=30) == 1


def test_a_model_that_cannot_load_makes_the_server_exit_1():
    import subprocess
    import sys

    from helpers import REPO_ROOT, free_port
    process = subprocess.run([sys.executable, "-m", "kvserve.cli", "serve", "--model", "/no/such/model.gguf",
                              "--port", str(free_port())], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert process.returncode == 1
    assert "/no/such/model.gguf" in process.stderr


def test_sigterm_lets_streams_finish_refuses_new_work_then_exits_0():
    with serve_process("--shutdown-timeout", "30") as (url, process), httpx.Client(base_url=url, timeout=30) as client:
        with client.stream("POST", CHAT, json=chat(max_tokens=1500, ignore_eos=True, stream=True)) as stream:
            lines = stream.iter_lines()
            first = next(e for e in sse_events(lines) if isinstance(e, dict) and e["choices"][0]["delta"].get("content"))
            assert first
            process.send_signal(signal.SIGTERM)
            assert wait_until(lambda: client.get("/health").status_code == 503, timeout_s=5)
            health = client.get("/health")
            assert health.json()["status"] == "draining" and health.headers["retry-after"]
            refused = client.post(CHAT, json=chat(max_tokens=3))
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
            assert refused.headers["retry-after"]
            rest = list(sse_events(lines))
        assert rest[-1] == "[DONE]" and rest[-2]["choices"][0]["finish_reason"] == "length"   # it finished
        assert process.wait(timeout=30) == 0


def test_sigterm_aborts_what_cannot_finish_within_the_shutdown_timeout():
    with serve_process("--shutdown-timeout", "1") as (url, process), httpx.Client(base_url=url, timeout=30) as client:
        body = chat(max_tokens=4000, ignore_eos=True, stream=True, logprobs=True, top_logprobs=20)
        with client.stream("POST", CHAT, json=body) as stream:
            lines = stream.iter_lines()
            next(sse_events(lines))
            process.send_signal(signal.SIGTERM)
            events = list(sse_events(lines))
        finishing = [e for e in events if isinstance(e, dict) and e["choices"] and e["choices"][0]["finish_reason"]]
        assert events[-1] == "[DONE]" and finishing[-1]["choices"][0]["finish_reason"] == "abort", events[-3:]
        assert process.wait(timeout=30) == 0


def test_drain_in_process_leaves_nothing_admitted_or_holding_kv():
    """The same drain, driven in-process: nothing is left admitted or holding KV afterwards."""
    config = ServerConfig(shutdown_timeout_s=0.5)
    with single_torch_thread(), ServerThread(config, step_delay_s=0.005) as server, \
            httpx.Client(base_url=server.base_url, timeout=30) as client:
        with client.stream("POST", CHAT, json=chat(max_tokens=3000, ignore_eos=True, stream=True)) as stream:
            lines = stream.iter_lines()
            next(sse_events(lines))
            server.server.loop.call_soon_threadsafe(server.server.drain)
            events = list(sse_events(lines))
        assert events[-2]["choices"][0]["finish_reason"] == "abort"
        assert wait_until(lambda: server.in_flight() == 0 and not server.engine()._streams, timeout_s=10)
        assert server.engine().stats().kv.num_used_blocks == 0
