"""`kvserve bench offline`: a seeded throughput workload on the engine, no server.

Distinct random prompts of about --prompt-len tokens, each generating exactly --output-len tokens
(end tokens ignored), all submitted at once. Optionally the same prompts through Hugging Face
transformers in the same run, for a ratio. Prints a progress bar, a summary, and one JSON line last.
"""

from __future__ import annotations

import argparse
import json
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
    group.add_argument("--workload-seed", type=int, default=0)
    group.add_argument("--compare-transformers", action="store_true",
                       help="also run the same prompts through transformers (same weights, same dtype)")
    group.add_argument("--hf-batch-size", type=int, default=32)


def make_prompts(num_prompts: int, mean_len: int, vocab_size: int, avoid: frozenset[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    usable = [t for t in range(vocab_size) if t not in avoid]
    prompts = []
    for _ in range(num_prompts):
        length = max(1, round(mean_len * rng.uniform(0.8, 1.2)))
        prompts.append([rng.choice(usable) for _ in range(length)])
    return prompts


def run_engine(engine: Engine, prompts: list[list[int]], output_len: int) -> dict:
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    total = len(prompts) * output_len
    start = time.perf_counter()
    for prompt in prompts:
        engine.add(prompt, params)
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


def run_transformers(engine: Engine, prompts: list[list[int]], output_len: int, batch_size: int) -> dict:
    from kvserve.bench.hf_baseline import hf_greedy, hf_model
    from kvserve.model.checkpoint import load_checkpoint

    model = hf_model(load_checkpoint(engine.config.model, engine.config.seed), engine.dtype)
    total = len(prompts) * output_len
    start = time.perf_counter()
    for i in tqdm(range(0, len(prompts), batch_size), desc="transformers", unit="batch"):
        hf_greedy(model, prompts[i:i + batch_size], output_len, batch_size)
    wall = time.perf_counter() - start
    return {"wall_s": round(wall, 3), "output_tok_s": round(total / wall, 2), "batch_size": batch_size}


def run_offline_bench(args: argparse.Namespace, config: EngineConfig) -> int:
    import torch

    from kvserve.engine.engine import Engine

    engine = Engine(config)
    prompts = make_prompts(args.num_prompts, args.prompt_len, engine.model_config.vocab_size,
                           engine.eos_token_ids, args.workload_seed)
    result = {
        "bench": "offline", "model": config.model or "default", "dtype": str(engine.dtype).removeprefix("torch."),
        "device": str(engine.device), "quantization": engine.quantization,
        "kv_cache_dtype": str(engine.core.runner.kv_dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(), "num_prompts": len(prompts),
        "prompt_tokens": sum(map(len, prompts)), "output_len": args.output_len,
        "max_num_batched_tokens": config.scheduler.max_num_batched_tokens,
        "max_num_seqs": config.scheduler.max_num_seqs, "workload_seed": args.workload_seed,
    }
    result["kvserve"] = run_engine(engine, prompts, args.output_len)
    if args.compare_transformers:
        result["transformers"] = run_transformers(engine, prompts, args.output_len, args.hf_batch_size)
        result["ratio_vs_transformers"] = round(
            result["kvserve"]["output_tok_s"] / result["transformers"]["output_tok_s"], 2)
    print(f"kvserve: {result['kvserve']['output_tok_s']} output tok/s, {result['kvserve']['total_tok_s']} total tok/s, "
          f"{result['kvserve']['wall_s']} s, {result['kvserve']['preemptions']} preemptions")
    if "transformers" in result:
        print(f"transformers: {result['transformers']['output_tok_s']} output tok/s; "
              f"kvserve/transformers = {result['ratio_vs_transformers']}x")
    print(json.dumps(result))
    return 0
