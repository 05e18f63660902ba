"""`kvserve bench compare` smoke test: the peer is a second kvserve, so CI never builds llama.cpp."""

import json
import time
import subprocess
import sys

import pytest


def test_compare_against_a_second_kvserve(tmp_path):
    plot = tmp_path / "compare.png"
    out = subprocess.run(
        [sys.executable, "-m", "kvserve.cli", "bench", "compare", "--peer", "kvserve", "--model-path", "random:tiny",
         "--kvserve-args", "--dtype float32", "--workload", "shared-prefix", "--num-requests", "6",
         "--max-tokens", "8", "--prompt-scale", "0.05", "--ignore-eos", "--seed", "3", "--plot", str(plot)],
        capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["bench"] == "compare" and result["peer"] == "kvserve"
    ours, peer = result["kvserve"], result["peer_result"]
    assert ours["workload_digest"] == peer["workload_digest"]           # the same seeded workload
    assert ours["errors"] == peer["errors"] == 0 and ours["output_tokens"] == peer["output_tokens"] == 48
    assert set(result["ratios"]) == {"output_tok_s", "ttft_p50", "ttft_p95", "tbt_p50"}
    assert result["ratios"]["output_tok_s"] > 0
    if plot.exists() or pytest.importorskip("matplotlib"):
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_llama_server_needs_a_build_or_gives_a_clear_error(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "kvserve.cli", "bench", "compare", "--peer", "llama-server",
         "--peer-cache", str(tmp_path / "none"), "--workload", "latency", "--num-requests", "1"],
        capture_output=True, text=True, timeout=240)
    assert out.returncode == 2 and "--install-peer" in out.stderr


@pytest.mark.parametrize("kvserve_args, in_log", [
    ("--dtype float32 --no-such-option", "unrecognized arguments: --no-such-option"),        # exits at once
    ("--dtype float32 --kv-cache-memory 1", "--kv-cache-memory 1 bytes holds no block"),      # cannot load its model
])
def test_a_server_that_cannot_start_ends_the_wait_at_once_with_its_log(kvserve_args, in_log):
    """Regression: the bench used to wait 300 s on a server that had already failed, then said only
    that /health was not 200."""
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "kvserve.cli", "bench", "compare", "--peer", "kvserve", "--model-path", "random:tiny",
         "--kvserve-args", kvserve_args, "--workload", "latency", "--num-requests", "1"],
        capture_output=True, text=True, timeout=240)
    assert out.returncode == 2, out.stderr[-2000:]
    assert in_log in out.stderr, out.stderr[-2000:]          # the end of the server's own log is shown
    assert time.monotonic() - started < 60
