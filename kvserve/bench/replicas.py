"""`kvserve bench replicas`: cache-aware routing across engine replicas against Ray Serve's
power-of-two-choices router, on the same seeded shared-prefix workload, in one run.

For each router, `kvserve serve --replicas 2 --replica-router kv|pow2` (a local Ray instance of its
own) serves 4 prefix groups (a long system prompt each, a short question each) arriving interleaved
from `--concurrency` clients. Each replica's KV pool (`--num-kv-blocks`, default 120) holds about 3 of
the 4 prefixes (about 40 blocks each) less the running requests' own blocks, as a production pool
holds fewer prefixes than its traffic has: a router that spreads each group over both replicas
makes each replica hold all 4, and they evict each other.

Reported per router: the prefix-cache hit rate over the deployment (prompt tokens served from cache
/ prompt tokens looked up, summed over the replicas), TTFT p50/p95, output tokens/s, and the
routes by reason; then the ratios kv/pow2. The last line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

import httpx

from kvserve.bench.sched import _drain, _ratio, _server
from kvserve.bench.workloads import TextSource, user


def add_replicas_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="", help="GGUF path or registered name (default: the embedded model)")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--prefix-words", type=int, default=600, help="system prompt length per group")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--num-kv-blocks", type=int, default=120,
                        help="KV blocks per replica (default 120: about 3 prefixes of the default length)")
    parser.add_argument("--kvserve-args", default="", help="extra `kvserve serve` options for both servers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-only", action="store_true")


def requests_over_groups(seed: int, count: int, groups: int, prefix_words: int) -> list[list[dict]]:
    """`groups` long system prompts; request i belongs to group i mod groups (interleaved)."""
    source = TextSource(seed, 1.0)
    systems = [source.text(prefix_words) for _ in range(groups)]
    rng = random.Random(seed)
    order = [i % groups for i in range(count)]
    rng.shuffle(order)
    return [[{"role": "system", "content": systems[g]}, user(source.question(20))] for g in order]


def _cache_totals(url: str) -> tuple[int, int]:
    replicas = httpx.get(f"{url}/v1/cache", timeout=60).json()["models"]["bench"]["replicas"].values()
    return (sum(r["prefix_cache"]["hit_tokens"] for r in replicas),
            sum(r["prefix_cache"]["queried_tokens"] for r in replicas))


def _routes(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    routes = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name == "kvserve:replica_routes_total":
                routes[sample.labels["reason"]] = sample.value
    return routes


def run_replicas_bench(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    requests = requests_over_groups(args.seed, args.requests, args.groups, args.prefix_words)
    result = {"bench": "replicas", "seed": args.seed, "replicas": args.replicas, "requests": args.requests,
              "groups": args.groups, "concurrency": args.concurrency, "num_kv_blocks": args.num_kv_blocks,
              "routers": {}}
    for router in tqdm(("kv", "pow2"), desc="routers", disable=args.json_only):
        extra = (f"--replicas {args.replicas} --replica-router {router} --num-kv-blocks {args.num_kv_blocks} "
                 f"{args.kvserve_args}")
        with _server(args.model, extra) as (url, _):
            asyncio.run(_drain(url, requests[:2], 1, 1))   # both replicas up and compiled; not measured
            hits0, queried0 = _cache_totals(url)
            started = time.perf_counter()
            stats, wall_s = asyncio.run(_drain(url, requests, args.concurrency, args.max_tokens))
            hits, queried = _cache_totals(url)
            out = {**stats, "wall_s": round(wall_s, 2), "output_tok_s": round(stats["output_tokens"] / wall_s, 2),
                   "prefix_hit_rate": _ratio(hits - hits0, queried - queried0), "routes": _routes(url),
                   "bench_s": round(time.perf_counter() - started, 1)}
        result["routers"][router] = out
        if not args.json_only:
            print(f"{router}: {json.dumps(out)}", flush=True)
    kv, pow2 = result["routers"]["kv"], result["routers"]["pow2"]
    result["hit_rate_ratio"] = _ratio(kv["prefix_hit_rate"], pow2["prefix_hit_rate"])
    result["ttft_p95_ratio"] = _ratio(kv["ttft_p95_ms"], pow2["ttft_p95_ms"])
    result["throughput_ratio"] = _ratio(kv["output_tok_s"], pow2["output_tok_s"])
    print(json.dumps(result))
    return 0
