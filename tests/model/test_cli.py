"""The command line: generate streams text; bench offline ends with one JSON line; errors exit 2."""

import json
import subprocess
import sys


def kvserve(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvserve.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_generate_streams_to_the_terminal():
    out = kvserve("generate", "hello", "--model", "random:tiny", "--dtype", "float32", "--max-tokens", "8",
                  "--ignore-eos")
    assert out.returncode == 0, out.stderr
    assert "[length: " in out.stderr and "8 generated]" in out.stderr
    # the start-up line says what the model runs with, at the default log level
    assert "kvserve.startup: model on cpu in float32 (quantization: none; CPU kernels: " in out.stderr
    assert "blocks of 16 tokens in float32" in out.stderr


def test_bench_offline_ends_with_one_json_line():
    out = kvserve("bench", "offline", "--model", "random:tiny", "--num-prompts", "6", "--prompt-len", "40",
                  "--output-len", "8", "--num-kv-blocks", "64")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["bench"] == "offline" and result["num_prompts"] == 6
    assert result["kvserve"]["output_tok_s"] > 0
    # The same seed gives the same workload.
    again = json.loads(kvserve("bench", "offline", "--model", "random:tiny", "--num-prompts", "6", "--prompt-len",
                               "40", "--output-len", "8", "--num-kv-blocks", "64").stdout.strip().splitlines()[-1])
    assert again["prompt_tokens"] == result["prompt_tokens"]


def test_bench_offline_mixed_lengths_against_transformers_on_the_same_device():
    out = kvserve("bench", "offline", "--model", "random:tiny", "--dtype", "float32", "--num-prompts", "5",
                  "--prompt-len-range", "10:60", "--output-len-range", "3:9", "--num-kv-blocks", "64",
                  "--compare-transformers", timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["prompt_len"] == [10, 60] and result["output_len"] == [3, 9]
    assert 5 * 3 <= result["output_tokens"] <= 5 * 9 and 5 * 10 <= result["prompt_tokens"] <= 5 * 60
    assert result["transformers"]["mode"] in ("generate_batch", "static") and result["transformers"]["output_tok_s"] > 0
    assert result["kvserve"].get("floor_s") is None            # a CPU: no GPU peak to hold it against
    bad = kvserve("bench", "offline", "--model", "random:tiny", "--output-len-range", "9:3")
    assert bad.returncode == 2 and "MIN:MAX" in bad.stderr


def test_errors_exit_2_with_a_message():
    out = kvserve("generate", "hi", "--model", "/nonexistent/model.gguf")
    assert out.returncode == 2 and "kvserve: error:" in out.stderr and "/nonexistent/model.gguf" in out.stderr
    out = kvserve("generate", "hi", "--model", "random:tiny", "--max-tokens", "0")
    assert out.returncode == 2 and "max_tokens" in out.stderr
    out = kvserve("generate", "hi", "--model", "random:tiny", "--num-kv-blocks", "4", "--kv-cache-memory", "1MiB")
    assert out.returncode == 2 and "not both" in out.stderr


def test_bench_cache_reports_hit_and_miss():
    out = kvserve("bench", "cache", "--model", "random:tiny", "--prefix-len", "200", "--rounds", "2",
                  "--num-kv-blocks", "128")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["bench"] == "cache" and result["cached_tokens_on_hit"] == 192   # whole 16-token blocks
    assert result["ttft_hit_ms"] > 0 and result["ttft_miss_ms"] > 0


def test_bench_kernels_times_every_path_and_rejects_bad_rows():
    out = kvserve("bench", "kernels", "--rows", "1,3", "--shape", "32x64,16x96", "--repeats", "3")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["bench"] == "kernels" and set(result["us_per_layer"]) == {"1", "3"}
    timed = result["us_per_layer"]["1"]
    assert {"kvserve int4, fp32 in", "kvserve int8, fp32 in", "fp32 F.linear"} <= set(timed)
    assert all(us > 0 for us in timed.values())
    bad = kvserve("bench", "kernels", "--rows", "9")
    assert bad.returncode == 2 and "between 1 and 8" in bad.stderr
