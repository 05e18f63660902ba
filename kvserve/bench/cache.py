"""`kvserve bench cache`: time to first token of a prompt-cache hit vs a miss, in one run.

Each round builds a fresh random prefix of --prefix-len tokens (seeded), sends it with one short
suffix (a miss: the whole prompt is computed) and then with another (a hit: only the suffix is),
one request at a time. Prints a summary and one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import TYPE_CHECKING

from tqdm import tqdm

from kvserve.config import EngineConfig
from kvserve.sampling import SamplingParams

if TYPE_CHECKING:   # torch loads when the bench runs, not when the CLI builds its parser
    from kvserve.engine.engine import Engine


def add_cache_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("workload")
    group.add_argument("--prefix-len", type=int, default=2000, help="shared prefix tokens")
    group.add_argument("--suffix-len", type=int, default=16)
    group.add_argument("--rounds", type=int, default=5)
    group.add_argument("--workload-seed", type=int, default=0)


def time_to_first_token(engine: Engine, prompt: list[int]) -> tuple[float, int]:
    start = time.perf_counter()
    engine.add(prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    cached = 0
    while engine.has_unfinished:
        for output in engine.step():
            cached = output.stats.num_cached_tokens
    return time.perf_counter() - start, cached


def run_cache_bench(args: argparse.Namespace, config: EngineConfig) -> int:
    from kvserve.engine.engine import Engine

    engine = Engine(config)
    rng = random.Random(args.workload_seed)
    usable = [t for t in range(engine.model_config.vocab_size) if t not in engine.eos_token_ids]
    tokens = lambda n: [rng.choice(usable) for _ in range(n)]   # noqa: E731
    time_to_first_token(engine, tokens(64))                        # warm-up
    misses, hits, cached = [], [], []
    for _ in tqdm(range(args.rounds), desc="rounds"):
        prefix = tokens(args.prefix_len)
        miss, _ = time_to_first_token(engine, prefix + tokens(args.suffix_len))
        hit, hit_cached = time_to_first_token(engine, prefix + tokens(args.suffix_len))
        misses.append(miss)
        hits.append(hit)
        cached.append(hit_cached)
    miss_ms, hit_ms = statistics.median(misses) * 1000, statistics.median(hits) * 1000
    result = {"bench": "cache", "dtype": str(engine.dtype).removeprefix("torch."), "device": str(engine.device),
              "quantization": engine.quantization,
              "prefix_len": args.prefix_len, "suffix_len": args.suffix_len, "rounds": args.rounds,
              "workload_seed": args.workload_seed, "ttft_miss_ms": round(miss_ms, 1), "ttft_hit_ms": round(hit_ms, 1),
              "hit_over_miss": round(hit_ms / miss_ms, 4), "cached_tokens_on_hit": min(cached)}
    print(f"TTFT with a {args.prefix_len}-token prefix: miss {miss_ms:.1f} ms, hit {hit_ms:.1f} ms "
          f"(hit = {100 * hit_ms / miss_ms:.1f}% of miss; {min(cached)} tokens read from cache)")
    print(json.dumps(result))
    return 0
