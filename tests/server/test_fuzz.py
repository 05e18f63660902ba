"""Fuzzing the API surface from its own OpenAPI document (schemathesis): every operation, bodies
that fit the published schemas (positive) and bodies that break them (negative). No input may get
a 5xx, take longer than its bound, or break the server; afterwards nothing is left admitted or
holding KV. The WebSocket protocol, which OpenAPI cannot describe, gets the same bodies in frames,
mixed with malformed frames.

A short seeded run is part of `make test`. A longer one, documented in docs/reliability.md
(KVSERVE_FUZZ_REPORT writes the count of requests per operation and status as JSON):

    KVSERVE_FUZZ_EXAMPLES=2000 KVSERVE_FUZZ_SEED=7 KVSERVE_FUZZ_REPORT=fuzz.json \
        .venv/bin/python -m pytest -q tests/server/test_fuzz.py
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import httpx
import pytest
import schemathesis
import websockets
from helpers import MODEL, ServerThread, single_torch_thread, wait_until
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from kvserve.config import ServerConfig
from kvserve.server.app import create_app

EXAMPLES = int(os.environ.get("KVSERVE_FUZZ_EXAMPLES", "25"))
REPORT = os.environ.get("KVSERVE_FUZZ_REPORT")
TALLY: dict[str, dict[int, int]] = {}   # "operation mode" → status → requests
SEED = int(os.environ.get("KVSERVE_FUZZ_SEED", "0"))
CALL_BOUND_S = 30.0       # no single request may take longer (the context is 96 tokens)
SCHEMA = schemathesis.openapi.from_dict(create_app(ServerConfig(), lambda: {}).openapi())
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]
FUZZ_SETTINGS = settings(max_examples=EXAMPLES, derandomize=False, database=None, deadline=None,
                         suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if REPORT:
        with open(REPORT, "w") as out:
            json.dump(TALLY, out, indent=1, sort_keys=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    config = ServerConfig(max_body_bytes=64 * 1024, header_timeout_s=5, body_timeout_s=5,
                          state_dir=str(tmp_path_factory.mktemp("state")), max_batch_file_bytes=64 * 1024)
    with single_torch_thread(), ServerThread(config, max_model_len=96) as server:
        yield server


def test_every_route_is_in_the_document_with_its_body():
    labels = {op.label for op in OPERATIONS}
    for label in ("POST /v1/chat/completions", "POST /v1/completions", "POST /v1/messages",
                  "POST /model/{model_id}/converse", "POST /model/{model_id}/converse-stream",
                  "GET /v1/cache", "DELETE /v1/cache", "GET /v1/models", "GET /health", "GET /metrics",
                  "POST /v1/files", "POST /v1/batches", "GET /v1/batches/{batch_id}", "POST /v1/messages/batches",
                  "GET /v1/messages/batches/{batch_id}/results"):
        assert label in labels
    for op in OPERATIONS:
        if op.method.upper() == "POST" and not op.label.endswith("/cancel"):
            assert op.body, f"{op.label} publishes no request body schema"


def _breakable(operation) -> bool:
    """Whether an input can break the schema: a body or a typed query parameter (a path parameter
    is any string, so every path is a valid one)."""
    return bool(operation.body or operation.query)


CASES = [(op, mode) for op in OPERATIONS for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
         if mode is GenerationMode.POSITIVE or _breakable(op)]


@pytest.mark.parametrize("operation, mode", CASES, ids=[f"{op.label} {mode.value}" for op, mode in CASES])
def test_no_input_gets_a_5xx_or_outlasts_its_bound(server, operation, mode):
    seen = TALLY.setdefault(f"{operation.label} {mode.value}", {})

    @seed(SEED)
    @FUZZ_SETTINGS
    @given(operation.as_strategy(generation_mode=mode))
    def check(case):
        started = time.monotonic()
        response = case.call(base_url=server.base_url, timeout=CALL_BOUND_S)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, f"{response.status_code} {response.text[:500]}\n{case.as_curl_command()}"
        assert time.monotonic() - started < CALL_BOUND_S

    check()
    assert seen
    assert wait_until(server.idle, timeout_s=15), (server.in_flight(), server.engine().stats())


def _frames() -> st.SearchStrategy[str | bytes]:
    chat = next(op for op in OPERATIONS if op.label == "POST /v1/chat/completions")
    bodies = st.one_of(chat.as_strategy(generation_mode=GenerationMode.POSITIVE),
                       chat.as_strategy(generation_mode=GenerationMode.NEGATIVE)).map(lambda case: case.body)
    request = st.builds(lambda i, endpoint, body: json.dumps(
        {"type": "request", "id": f"r{i}", "endpoint": endpoint, "body": body}, default=str),
        st.integers(0, 5), st.sampled_from(["chat", "completions", "nope"]), bodies)
    cancel = st.integers(0, 5).map(lambda i: json.dumps({"type": "cancel", "id": f"r{i}"}))
    junk = st.one_of(st.text(max_size=50), st.binary(max_size=20), st.just("[]"), st.just('{"type": 1}'),
                     st.just('{"id": "x"}'))
    return st.one_of(request, cancel, junk)


def test_websocket_frames_never_break_the_socket_or_the_server(server):
    url = server.base_url.replace("http", "ws") + "/v1/ws"

    @seed(SEED)
    @settings(max_examples=max(5, EXAMPLES // 2), derandomize=False, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(_frames(), min_size=1, max_size=8))
    def check(frames):
        async def scenario():
            async with websockets.connect(url, max_size=None) as socket:
                for frame in frames:
                    await socket.send(frame)
                await socket.send(json.dumps({"type": "request", "id": "last", "body": {
                    "model": MODEL, "messages": [{"role": "user", "content": "ok"}], "max_tokens": 2}}))
                async with asyncio.timeout(CALL_BOUND_S):      # the socket still answers, in bounded time
                    while True:
                        reply = json.loads(await socket.recv())
                        assert reply.get("status", 200) < 500, reply
                        if reply.get("id") == "last" and reply["type"] in ("done", "error"):
                            assert reply["type"] == "done", reply
                            return

        asyncio.run(scenario())
        tally = TALLY.setdefault("WebSocket frames", {})
        tally[len(frames) + 1] = tally.get(len(frames) + 1, 0) + 1   # sockets by frames sent

    check()
    assert wait_until(server.idle, timeout_s=15), (server.in_flight(), server.engine().stats())
    assert httpx.get(f"{server.base_url}/health").status_code == 200
