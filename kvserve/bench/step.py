"""`kvserve bench step`: where one decode step's time goes, at several batch sizes.

For each batch size B: B seeded random prompts of --context-len tokens are prefilled, then
--steps decode steps are timed (every request decodes one token per step). Reported per B:
the median (and fastest) step time, decode tok/s (B / step), the share of the step spent in the model runner
(forward + sampling) and the rest ("host": scheduling, block bookkeeping, detokenizing, Python
between the two). `--profile` adds torch.profiler's top operators for the largest B.
On a GPU of known peak, each result also carries its floor (the weights and the KV cache read once
at the memory bandwidth: kvserve/bench/floor.py) and the fraction of it reached.
The speed notes (docs/speed-notes.md) quote this command's output. One JSON line last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from kvserve.config import EngineConfig
from kvserve.sampling import SamplingParams


def add_step_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("workload")
    group.add_argument("--batch-sizes", default="1,8,32", help="comma-separated decode batch sizes")
    group.add_argument("--context-len", type=int, default=300, help="prompt tokens per request")
    group.add_argument("--steps", type=int, default=30, help="timed decode steps per batch size")
    group.add_argument("--workload-seed", type=int, default=0)
    group.add_argument("--profile", action="store_true", help="torch.profiler top operators (largest batch)")


def _measure(engine, batch_size: int, args: argparse.Namespace, profile: bool) -> dict:
    from kvserve.bench.offline import make_prompts

    prompts = make_prompts(batch_size, args.context_len, engine.model_config.vocab_size, engine.eos_token_ids,
                           args.workload_seed)
    # Long enough that no request finishes while the steps are timed (they are aborted afterwards).
    params = SamplingParams(max_tokens=engine.max_model_len - args.context_len * 2, temperature=0.0, ignore_eos=True)
    ids = [engine.add(prompt, params) for prompt in prompts]
    while engine.scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens
                                          for r in engine.scheduler.running):
        engine.step()
    engine.step()                                   # first all-decode step: warm caches
    runner = engine.core.runner
    execute = runner.execute
    in_runner: list[float] = []

    def timed_execute(plan):
        start = time.perf_counter()
        try:
            return execute(plan)
        finally:
            in_runner.append(time.perf_counter() - start)

    runner.execute = timed_execute
    steps: list[float] = []
    prof = None
    try:
        if profile:
            from torch.profiler import ProfilerActivity, profile as torch_profile

            prof = torch_profile(activities=[ProfilerActivity.CPU])
            prof.__enter__()
        for _ in range(args.steps):
            start = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - start)
    finally:
        if prof is not None:
            prof.__exit__(None, None, None)
        runner.execute = execute
    for request_id in ids:
        engine.abort(request_id)
    engine.step()
    step = statistics.median(steps)
    runner_s = statistics.median(in_runner)
    result = {"batch_size": batch_size, "step_ms": round(step * 1e3, 2), "step_min_ms": round(min(steps) * 1e3, 2), "decode_tok_s": round(batch_size / step, 1),
              "runner_ms": round(runner_s * 1e3, 2), "host_share": round(max(0.0, 1 - runner_s / step), 3)}
    if prof is not None:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    return result


def run_step_bench(args: argparse.Namespace, config: EngineConfig) -> int:
    import torch

    from kvserve import cpu_features
    from kvserve.bench.floor import decode_step_floor_s, device_peak, floor_report
    from kvserve.engine.engine import Engine
    from kvserve.runner.model_runner import kv_bytes_per_block

    engine = Engine(config)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    peak = device_peak(torch.cuda.get_device_name(engine.device)) if engine.device.type == "cuda" else None
    runner = engine.core.runner
    results = []
    for b in sizes:
        r = _measure(engine, b, args, profile=args.profile and b == max(sizes))
        if peak is not None:   # the weights once, and each sequence's cache (context + the steps so far)
            kv = b * (args.context_len + args.steps // 2) * kv_bytes_per_block(
                engine.model_config, 1, runner.kv_dtype)
            r.update(floor_report(peak, decode_step_floor_s(peak, runner.weight_bytes(), kv), r["step_ms"] / 1e3))
        results.append(r)
        floor = f"  floor {r['floor_s'] * 1e3:.3f} ms ({r['fraction_of_floor']:.1%})" if r.get("floor_s") else ""
        print(f"batch {b:3d}: step {r['step_ms']:7.2f} ms (min {r['step_min_ms']:.2f})  {r['decode_tok_s']:7.1f} tok/s  "
              f"runner {r['runner_ms']:7.2f} ms  host share {r['host_share']:.1%}{floor}")
    print(json.dumps({"bench": "step", "model": config.model or "default",
                      "dtype": str(engine.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
                      "isa": cpu_features.isa() if engine.device.type == "cpu" else None,
                      "quantization": engine.quantization,
                      "kv_cache_dtype": str(engine.core.runner.kv_dtype).removeprefix("torch."),
                      "context_len": args.context_len, "steps": args.steps, "results": results}))
    return 0
