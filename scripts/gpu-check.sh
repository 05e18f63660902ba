#!/usr/bin/env bash
# Issue 10's check on a CUDA machine: the GPU tests, then the benchmarks of the issue's table on
# random:llama-1b in bf16, in about 6 minutes; one JSON line last. Needs torch (CUDA), triton and
# transformers there, nothing else (random weights: gguf is not imported; no server is started).
#
#   bash scripts/gpu-check.sh          (PYTHON=python3 by default; the log goes to $OUT or /tmp)
#
# The JSON: the tests' exit status and summary, the decode step at batch 1 and 256 (context 512)
# with its floor and the fraction of it reached, and the offline workload (128 prompts, 100-1,024
# tokens in, 100-512 out, seed 0) against transformers' continuous batching in the same run.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
LOG=${OUT:-/tmp}/gpu-check.log
: > "$LOG"
started=$(date +%s)

run_tests() {   # two runs: tests/model and tests/gpu each import their own conftest
    timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/model/test_triton_attention.py \
        tests/model/test_triton_ops.py tests/model/test_cuda_graphs.py >>"$LOG" 2>&1 || return $?
    timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/gpu >>"$LOG" 2>&1
}
run_tests; tests_rc=$?
tests_tail=$(grep -E "passed|failed|error|skipped" "$LOG" | tail -2 | tr '\n' ' ')

step=$(timeout 150 "$PY" -m kvserve.cli bench step --model random:llama-1b --device cuda --dtype bfloat16 \
    --batch-sizes 1,256 --context-len 512 --steps 20 --max-num-seqs 256 --kv-cache-memory 16GiB \
    2>>"$LOG" | tee -a "$LOG" | tail -1)
offline=$(timeout 240 "$PY" -m kvserve.cli bench offline --model random:llama-1b --device cuda --dtype bfloat16 \
    --num-prompts 128 --prompt-len-range 100:1024 --output-len-range 100:512 --workload-seed 0 \
    --max-num-seqs 256 --max-num-batched-tokens 4096 --kv-cache-memory 16GiB --compare-transformers \
    2>>"$LOG" | tee -a "$LOG" | tail -1)

"$PY" - "$tests_rc" "$tests_tail" "$step" "$offline" "$(( $(date +%s) - started ))" <<'PYEOF'
import json, sys
rc, tail, step, offline, seconds = sys.argv[1:]
def parse(text):
    try:
        return json.loads(text)
    except ValueError:
        return {"error": text[-300:] or "no output (see the log)"}
try:
    import torch
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else None
except Exception:
    device = None
print(json.dumps({"check": "gpu", "device": device, "tests_rc": int(rc), "tests": tail.strip(),
                  "step": parse(step), "offline": parse(offline), "seconds": int(seconds)}))
PYEOF
