"""`kvserve bench serve` against a real `kvserve serve` subprocess on the tiny model: every workload
completes without errors, ends with one JSON line, reads cached tokens where prompts share a prefix,
is deterministic in its seed, counts failed requests instead of crashing, and draws its plot."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from helpers import REPO_ROOT, serve_subprocess

NUM_REQUESTS, MAX_TOKENS = 8, 8


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    with serve_subprocess() as url:
        yield url


def bench(url: str, workload: str, *extra: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "kvserve.cli", "bench", "serve", "--url", url, "--workload", workload,
                          "--num-requests", str(NUM_REQUESTS), "--max-tokens", str(MAX_TOKENS), "--seed", "1",
                          "--ignore-eos", "--prompt-scale", "0.05", *extra],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("workload", ["throughput", "shared-prefix", "multi-turn", "doc-qa", "mixed-priority"])
def test_workload_completes_and_reports(server_url, workload):
    result = bench(server_url, workload)
    assert result["bench"] == "serve" and result["workload"] == workload and result["model"] == "tiny"
    assert result["requests"] == NUM_REQUESTS and result["errors"] == 0
    interactive = NUM_REQUESTS // 4 if workload == "mixed-priority" else 0   # interactive requests get a quarter
    assert result["output_tokens"] == (NUM_REQUESTS - interactive) * MAX_TOKENS + interactive * (MAX_TOKENS // 4)
    assert result["output_tok_s"] > 0 and result["prompt_tokens"] > 0
    assert 0 < result["ttft_p50_ms"] <= result["ttft_p95_ms"] <= result["ttft_p99_ms"]
    assert result["tbt_p50_ms"] is not None and len(result["ttfts_ms"]) == NUM_REQUESTS
    if workload in ("shared-prefix", "doc-qa", "multi-turn"):
        assert result["cached_tokens"] > 0 and 0 < result["cached_share"] < 1
    if workload == "mixed-priority":
        assert {name: stats["requests"] for name, stats in result["classes"].items()} == {
            "background": NUM_REQUESTS - interactive, "interactive": interactive}


def test_same_seed_same_prompts(server_url):
    first, again = bench(server_url, "throughput", "--json-only"), bench(server_url, "throughput", "--json-only")
    assert first["workload_digest"] == again["workload_digest"]
    assert first["prompt_tokens"] == again["prompt_tokens"]
    other = bench(server_url, "throughput", "--json-only", "--seed", "2")
    assert other["workload_digest"] != first["workload_digest"]


def test_failed_requests_are_counted(server_url):
    result = bench(server_url, "latency", "--model", "no-such-model", "--json-only")
    assert result["requests"] == 0 and result["errors"] == NUM_REQUESTS
    assert result["error_kinds"] == {"HTTP 404": NUM_REQUESTS}


def test_plot_writes_a_png(server_url, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    result = bench(server_url, "mixed-priority", "--plot", str(path), "--label", "tiny-run")
    assert result["label"] == "tiny-run"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
