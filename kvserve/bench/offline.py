"""`kvserve bench offline`: a seeded throughput workload on the engine, no server.

Distinct random prompts of about --prompt-len tokens, each generating exactly --output-len tokens
(end tokens ignored), all submitted at once; or lengths drawn uniformly per prompt from
--prompt-len-range and --output-len-range (the mixed GPU workload: 100:1024 and 100:512).
Optionally the same prompts through Hugging Face transformers on the same device in the same run,
for a ratio: its continuous batching (`generate_batch`) where the installed version has it, which
takes one max_new_tokens for all, so there every prompt generates the longest output and its rate
counts every token it generated; else static batches. On a GPU of known peak the JSON also carries
the physical floor of the workload and the fraction of it reached (kvserve/bench/floor.py).
Prints a progress bar, a summary, and one JSON line last.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import time
from typing import TYPE_CHECKING

from tqdm import tqdm

from kvserve.config import EngineConfig
from kvserve.sampling import SamplingParams

if TYPE_CHECKING:   # torch loads when the bench runs, not when the CLI builds its parser
    from kvserve.engine.engine import Engine


def add_offline_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("workload")
    group.add_argument("--num-prompts", type=int, default=64)
    group.add_argument("--prompt-len", type=int, default=250, help="mean prompt tokens (uniform ±20%%)")
    group.add_argument("--output-len", type=int, default=128)
    group.add_argument("--prompt-len-range", type=parse_range, default=None, metavar="MIN:MAX",
                       help="prompt tokens drawn uniformly per prompt (instead of --prompt-len)")
    group.add_argument("--output-len-range", type=parse_range, default=None, metavar="MIN:MAX",
                       help="output tokens drawn uniformly per prompt (instead of --output-len)")
    group.add_argument("--workload-seed", type=int, default=0)
    group.add_argument("--compare-transformers", action="store_true",
                       help="also run the same prompts through transformers (same weights, same dtype)")
    group.add_argument("--hf-batch-size", type=int, default=32)


def parse_range(text: str) -> tuple[int, int]:
    low, sep, high = text.partition(":")
    try:
        bounds = int(low), int(high)
    except ValueError:
        bounds = None
    if not sep or bounds is None or not 1 <= bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX with 1 <= MIN <= MAX, got {text!r}")
    return bounds


def make_prompts(num_prompts: int, mean_len: int, vocab_size: int, avoid: frozenset[int], seed: int,
                 length_range: tuple[int, int] | None = None) -> list[list[int]]:
    """Seeded random prompts: about `mean_len` tokens (±20%), or uniform in `length_range`."""
    rng = random.Random(seed)
    usable = [t for t in range(vocab_size) if t not in avoid]
    prompts = []
    for _ in range(num_prompts):
        if length_range is not None:
            length = rng.randint(*length_range)
        else:
            length = max(1, round(mean_len * rng.uniform(0.8, 1.2)))
        prompts.append([rng.choice(usable) for _ in range(length)])
    return prompts


def output_lengths(num_prompts: int, output_len: int, length_range: tuple[int, int] | None, seed: int) -> list[int]:
    if length_range is None:
        return [output_len] * num_prompts
    rng = random.Random(seed + 1)   # its own stream: the prompts do not change with it
    return [rng.randint(*length_range) for _ in range(num_prompts)]


def run_engine(engine: Engine, prompts: list[list[int]], outputs: list[int]) -> dict:
    total = sum(outputs)
    start = time.perf_counter()
    for prompt, output_len in zip(prompts, outputs):
        engine.add(prompt, SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True))
    num_steps = 0
    with tqdm(total=total, desc="kvserve", unit="tok") as bar:
        while engine.has_unfinished:
            bar.update(sum(len(o.token_ids) for o in engine.step()))
            num_steps += 1
    wall = time.perf_counter() - start
    stats = engine.stats()
    prompt_tokens = sum(map(len, prompts))
    return {"wall_s": round(wall, 3), "output_tok_s": round(total / wall, 2),
            "total_tok_s": round((total + prompt_tokens) / wall, 2), "steps": num_steps,
            "preemptions": stats.num_preemptions}


def run_transformers(config: EngineConfig, device, dtype, prompts: list[list[int]], outputs: list[int],
                     batch_size: int) -> dict:
    """transformers on the engine's device and dtype, the same weights: continuous batching where
    it has it (every prompt generating the longest output), else static batches of `batch_size`."""
    from kvserve.bench.hf_baseline import hf_continuous_batching, hf_greedy, hf_model
    from kvserve.model.checkpoint import load_checkpoint

    model = hf_model(load_checkpoint(config.model, config.seed), dtype).to(device)
    if hasattr(model, "generate_batch"):
        start = time.perf_counter()
        generated = hf_continuous_batching(model, prompts, max(outputs))
        wall = time.perf_counter() - start
        return {"wall_s": round(wall, 3), "output_tok_s": round(sum(map(len, generated)) / wall, 2),
                "mode": "generate_batch", "max_new_tokens": max(outputs)}
    start = time.perf_counter()
    for i in tqdm(range(0, len(prompts), batch_size), desc="transformers", unit="batch"):
        hf_greedy(model, prompts[i:i + batch_size], max(outputs[i:i + batch_size]), batch_size)
    wall = time.perf_counter() - start
    return {"wall_s": round(wall, 3), "output_tok_s": round(sum(outputs) / wall, 2), "mode": "static",
            "batch_size": batch_size}


def run_offline_bench(args: argparse.Namespace, config: EngineConfig) -> int:
    import torch

    from kvserve.engine.engine import Engine

    from kvserve.bench.floor import device_peak, floor_report, offline_floor_s
    from kvserve.model.loader import expected_shapes

    engine = Engine(config)
    prompts = make_prompts(args.num_prompts, args.prompt_len, engine.model_config.vocab_size,
                           engine.eos_token_ids, args.workload_seed, args.prompt_len_range)
    outputs = output_lengths(len(prompts), args.output_len, args.output_len_range, args.workload_seed)
    result = {
        "bench": "offline", "model": config.model or "default", "dtype": str(engine.dtype).removeprefix("torch."),
        "device": str(engine.device), "quantization": engine.quantization,
        "kv_cache_dtype": str(engine.core.runner.kv_dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(), "num_prompts": len(prompts),
        "prompt_tokens": sum(map(len, prompts)), "output_tokens": sum(outputs),
        "output_len": args.output_len_range or args.output_len, "prompt_len": args.prompt_len_range or args.prompt_len,
        "max_num_batched_tokens": config.scheduler.max_num_batched_tokens,
        "max_num_seqs": config.scheduler.max_num_seqs, "workload_seed": args.workload_seed,
    }
    result["kvserve"] = run_engine(engine, prompts, outputs)
    if engine.device.type == "cuda":
        peak = device_peak(torch.cuda.get_device_name(engine.device))
        parameters = sum(math.prod(shape) for shape in expected_shapes(engine.model_config).values())
        floor = None if peak is None else offline_floor_s(
            peak, parameters, engine.core.runner.weight_bytes(), result["prompt_tokens"] + sum(outputs), max(outputs))
        result["kvserve"].update(floor_report(peak, floor, result["kvserve"]["wall_s"]))
    if args.compare_transformers:   # the engine's memory (its KV pool) goes first
        device, dtype = engine.device, engine.dtype
        del engine
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        result["transformers"] = run_transformers(config, device, dtype, prompts, outputs, args.hf_batch_size)
        result["ratio_vs_transformers"] = round(
            result["kvserve"]["output_tok_s"] / result["transformers"]["output_tok_s"], 2)
    print(f"kvserve: {result['kvserve']['output_tok_s']} output tok/s, {result['kvserve']['total_tok_s']} total tok/s, "
          f"{result['kvserve']['wall_s']} s, {result['kvserve']['preemptions']} preemptions")
    if result["kvserve"].get("floor_s"):
        print(f"physical floor on this {result['kvserve']['peak']['device']}: {result['kvserve']['floor_s']} s "
              f"(reached {result['kvserve']['fraction_of_floor']:.1%} of it)")
    if "transformers" in result:
        print(f"transformers: {result['transformers']['output_tok_s']} output tok/s; "
              f"kvserve/transformers = {result['ratio_vs_transformers']}x")
    print(json.dumps(result))
    return 0
