"""`kvserve bench sched`: the scheduling policies against each other, each scenario in one run.

Every scenario starts `kvserve serve` once per configuration it compares (same model, same seeded
prompts), drives it with streamed chat requests through the OpenAI API, and reports ratios:

    mixed-priority   interactive requests (priority 0, short) arrive one at a time while a stream
                     of long generations (priority 10) keeps every seat busy; their TTFT p95
                     against the same server idle, under fcfs and under priority
    cache-aware      8 prefix groups arriving interleaved, plus 20% requests without a shared
                     prefix; fcfs vs cache-aware: output tok/s, TTFT p50/p95, the longest queue
                     time and how far it exceeds aging_factor × its service estimate
    tenants          tenant A floods (64 concurrent) while B sends 2 at a time; B's TTFT p95
                     against B alone, with equal weights, and with no keys file (one shared queue)
    swap             heavy preemption (long contexts, a small KV pool): output tok/s with
                     --preemption-mode recompute, swap and auto

The last line is JSON. The model is the embedded default unless --model says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import tempfile
import time
from pathlib import Path

from kvserve.bench.serve import Client, percentile
from kvserve.bench.server_process import free_port, running_process
from kvserve.bench.workloads import Turn, TextSource, user

SCENARIOS = ("mixed-priority", "cache-aware", "tenants", "swap")


def add_sched_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    parser.add_argument("--model", default="", help="GGUF path or registered name (default: the embedded model)")
    parser.add_argument("--kvserve-args", default="", help="extra `kvserve serve` options for every server")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every request count (quick runs: 0.5)")
    parser.add_argument("--json-only", action="store_true")


# ---- plumbing ------------------------------------------------------------------------------------

def _server(model: str, extra: str):
    from kvserve.bench.compare import kvserve_command
    from kvserve.model.loader import resolve_model_path

    port = free_port()
    path = model or str(resolve_model_path(None))
    return running_process(kvserve_command(path, port, extra), port, name="kvserve")


def _metric(url: str, name: str) -> float | None:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=30.0).text
    match = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


def _sum_metric(url: str, name: str, label: str) -> float:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=30.0).text
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}\{{[^}}]*{label}[^}}]*\}} (\S+)$", text, re.M))


class _Load:
    """Clients on one server: `send` one streamed chat request; results kept by class."""

    def __init__(self, url: str, keys: dict[str, str] | None = None):
        self.url = url
        self.keys = keys or {}
        self.results: dict[str, list] = {}
        self._http: dict = {}

    async def __aenter__(self):
        import httpx

        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        for name in [None, *self.keys]:
            headers = {"Authorization": f"Bearer {self.keys[name]}"} if name else {}
            self._http[name] = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600.0, connect=30.0),
                                                 headers=headers)
        return self

    async def __aexit__(self, *exc):
        for http in self._http.values():
            await http.aclose()

    async def send(self, klass: str, messages: list[dict], max_tokens: int, priority: int | None = None,
                   key: str | None = None):
        client = Client(self._http[key], self.url, "bench", ignore_eos=True)
        result = await client.send(messages, Turn(tuple(messages), max_tokens, klass, priority))
        self.results.setdefault(klass, []).append(result)
        return result


def _stats(results: list) -> dict:
    ok = [r for r in results if r.error is None]
    ttfts = [r.ttft_s for r in ok]
    return {"requests": len(ok), "errors": len(results) - len(ok),
            "ttft_p50_ms": _ms(percentile(ttfts, 50)), "ttft_p95_ms": _ms(percentile(ttfts, 95)),
            "output_tokens": sum(r.output_tokens for r in ok)}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 1)


def _ratio(a, b) -> float | None:
    return None if a is None or not b else round(a / b, 3)


async def _drain(url: str, requests: list[list[dict]], concurrency: int, max_tokens: int) -> tuple[dict, float]:
    """Send every request (in order) from `concurrency` clients; their stats and the wall time."""
    async with _Load(url) as load:
        queue = list(requests)
        started = time.perf_counter()

        async def worker() -> None:
            while queue:
                await load.send("all", queue.pop(0), max_tokens)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return _stats(load.results["all"]), time.perf_counter() - started


def _n(args, count: int) -> int:
    return max(2, round(count * args.scale))


# ---- scenarios -------------------------------------------------------------------------------------

async def _interactive_during(load: _Load, source: TextSource, count: int, gap_s: float, background=None) -> None:
    """`count` interactive requests one after another, `gap_s` apart, while `background` runs."""
    stop = asyncio.Event()
    workers = [asyncio.create_task(background(stop)) for _ in range(background.concurrency)] if background else []
    if workers:
        await asyncio.sleep(background.warm_up_s)
    for _ in range(count):
        await load.send("interactive", [user(source.question(40))], 32, priority=0)
        await asyncio.sleep(gap_s)
    stop.set()
    for worker in workers:
        worker.cancel()
    await asyncio.gather(*workers, return_exceptions=True)


def _long_generations(load: _Load, source: TextSource, concurrency: int, max_tokens: int, warm_up_s: float):
    async def worker(stop: asyncio.Event) -> None:
        while not stop.is_set():
            await load.send("background", [user(source.text(300, 0.2))], max_tokens, priority=10)

    worker.concurrency = concurrency
    worker.warm_up_s = warm_up_s
    return worker


def mixed_priority(args) -> dict:
    """Seats: --max-num-seqs 16, held by 24 long generations (the queue is never empty)."""
    out = {}
    count = _n(args, 16)
    for policy in ("fcfs", "priority"):
        extra = f"--scheduling-policy {policy} --max-num-seqs 16 --kv-host-memory 512MiB {args.kvserve_args}"
        with _server(args.model, extra) as (url, _):
            async def run() -> tuple[dict, dict, dict]:
                async with _Load(url) as load:
                    source = TextSource(args.seed, 1.0)
                    await _interactive_during(load, source, count, 0.3)
                    idle = _stats(load.results.pop("interactive"))
                    source = TextSource(args.seed, 1.0)
                    await _interactive_during(load, source, count, 0.7,
                                              _long_generations(load, TextSource(args.seed + 1, 1.0), 24, 256, 5.0))
                    return idle, _stats(load.results["interactive"]), _stats(load.results["background"])

            idle, busy, background = asyncio.run(run())
            out[policy] = {"idle": idle, "loaded": busy, "background": background,
                           "ttft_p95_vs_idle": _ratio(busy["ttft_p95_ms"], idle["ttft_p95_ms"]),
                           "preemptions": _metric(url, "kvserve:num_preemptions_total")}
    out["goal"] = "priority: interactive TTFT p95 <= 1.5 x idle"
    out["met"] = (out["priority"]["ttft_p95_vs_idle"] or 99) <= 1.5
    return out


def _prefix_group_requests(seed: int, count: int) -> list[list[dict]]:
    """8 prefix groups (a ~700-word system prompt each) interleaved, plus 20% without a shared prefix.
    The workers take them in this order, so the server sees the groups interleaved."""
    source = TextSource(seed, 1.0)
    systems = [source.text(700) for _ in range(8)]
    rng = random.Random(seed)
    requests = []
    for i in range(count):
        if rng.random() < 0.2:
            requests.append([user(source.text(700) + " " + source.question(20))])
        else:
            requests.append([{"role": "system", "content": systems[i % 8]}, user(source.question(20))])
    return requests


def cache_aware(args) -> dict:
    out = {}
    requests = _prefix_group_requests(args.seed, _n(args, 96))
    for policy in ("fcfs", "cache-aware"):
        # 320 blocks of 16 tokens: about 6 of the 8 prefixes (~750 tokens each) besides the running
        # requests' own blocks, so the order decides which prefixes stay cached.
        extra = f"--scheduling-policy {policy} --max-num-seqs 8 --num-kv-blocks 320 {args.kvserve_args}"
        with _server(args.model, extra) as (url, _):
            stats, wall_s = asyncio.run(_drain(url, requests, 24, 32))
            out[policy] = {**stats, "wall_s": round(wall_s, 2),
                           "output_tok_s": round(stats["output_tokens"] / wall_s, 2),
                           "prefix_hit_share": _ratio(_metric(url, "kvserve:prefix_cache_hits_total"),
                                                      _metric(url, "kvserve:prefix_cache_queries_total")),
                           "max_queue_time_s": _metric(url, "kvserve:max_queue_time_seconds"),
                           "max_wait_over_aging_bound_s": _metric(url, "kvserve:max_wait_over_aging_bound_seconds")}
    fcfs, aware = out["fcfs"], out["cache-aware"]
    out["throughput_ratio"] = _ratio(aware["output_tok_s"], fcfs["output_tok_s"])
    out["ttft_p50_ratio"] = _ratio(aware["ttft_p50_ms"], fcfs["ttft_p50_ms"])
    out["goal"] = "cache-aware beats fcfs on throughput and TTFT p50; worst queue time within the documented bound"
    out["met"] = bool(out["throughput_ratio"] and out["throughput_ratio"] > 1 and out["ttft_p50_ratio"]
                      and out["ttft_p50_ratio"] < 1 and (aware["max_wait_over_aging_bound_s"] or 0)
                      <= (fcfs["max_queue_time_s"] or 0))
    return out


def tenants(args) -> dict:
    out = {}
    count = _n(args, 24)
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp) / "keys.json"
        keys.write_text(json.dumps({"sk-a": {"tenant": "A", "weight": 1}, "sk-b": {"tenant": "B", "weight": 1}}))
        for label, extra, with_keys in (("alone", f"--api-keys {keys}", True),
                                        ("fair", f"--api-keys {keys}", True),
                                        ("one-queue", "", False)):
            # A's 64 concurrent stay inside the interactive queue cap; 32 seats, so A alone could take all.
            extra = f"{extra} --max-num-seqs 32 --max-queued-requests 256 --kv-host-memory 512MiB {args.kvserve_args}"
            with _server(args.model, extra) as (url, _):
                async def run() -> dict:
                    key_map = {"A": "sk-a", "B": "sk-b"} if with_keys else {}
                    async with _Load(url, key_map) as load:
                        source_a, source_b = TextSource(args.seed + 7, 1.0), TextSource(args.seed, 1.0)
                        stop = asyncio.Event()

                        async def flood() -> None:
                            while not stop.is_set():
                                await load.send("A", [user(source_a.text(200, 0.2))], 64, key="A" if with_keys else None)

                        async def steady() -> None:
                            for _ in range(count // 2):
                                await load.send("B", [user(source_b.question(40))], 32, key="B" if with_keys else None)

                        flooders = [] if label == "alone" else [asyncio.create_task(flood()) for _ in range(64)]
                        if flooders:
                            await asyncio.sleep(8.0)
                        started = time.perf_counter()
                        await asyncio.gather(steady(), steady())
                        wall_s = time.perf_counter() - started
                        stop.set()
                        for task in flooders:
                            task.cancel()
                        await asyncio.gather(*flooders, return_exceptions=True)
                        a = _stats(load.results.get("A", []))
                        return {"B": _stats(load.results["B"]), "A": a, "window_s": round(wall_s, 2)}

                result = asyncio.run(run())
                result["A_output_tok_s"] = round(result["A"]["output_tokens"] / result.pop("window_s"), 2)
                out[label] = result
    alone = out["alone"]["B"]["ttft_p95_ms"]
    out["B_ttft_p95_vs_alone"] = {k: _ratio(out[k]["B"]["ttft_p95_ms"], alone) for k in ("fair", "one-queue")}
    out["goal"] = "B's TTFT p95 with equal weights <= 2 x alone"
    out["met"] = (out["B_ttft_p95_vs_alone"]["fair"] or 99) <= 2.0
    return out


def swap(args) -> dict:
    out = {}
    source = TextSource(args.seed, 1.0)
    prompts = [[user(source.text(300, 0.2))] for _ in range(_n(args, 16))]
    for mode in ("recompute", "swap", "auto"):
        # 120 blocks of 16 = 1,920 token slots; requests of ~310 prompt + 192 output tokens are admitted
        # while their prompts fit, then outgrow the pool as they decode: constant preemption.
        extra = (f"--preemption-mode {mode} --num-kv-blocks 120 --max-num-seqs 12 --kv-host-memory 1GiB "
                 f"{args.kvserve_args}")
        with _server(args.model, extra) as (url, _):
            stats, wall_s = asyncio.run(_drain(url, prompts, 12, 192))
            out[mode] = {**stats, "output_tok_s": round(stats["output_tokens"] / wall_s, 2),
                         "preemptions_swap": _sum_metric(url, "kvserve:preemptions_total", 'mode="swap"'),
                         "preemptions_recompute": _sum_metric(url, "kvserve:preemptions_total", 'mode="recompute"'),
                         "computed_tokens": _metric(url, "kvserve:computed_tokens_total")}
    best = max(out["recompute"]["output_tok_s"], out["swap"]["output_tok_s"])
    out["auto_vs_best"] = _ratio(out["auto"]["output_tok_s"], best)
    out["goal"] = "auto >= the better forced mode, within noise (5%)"
    out["met"] = (out["auto_vs_best"] or 0) >= 0.95
    return out


RUNNERS = {"mixed-priority": mixed_priority, "cache-aware": cache_aware, "tenants": tenants, "swap": swap}


def run_sched_bench(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    names = SCENARIOS if args.scenario == "all" else (args.scenario,)
    result = {"bench": "sched", "seed": args.seed, "scale": args.scale, "scenarios": {}}
    for name in tqdm(names, desc="scenarios", disable=args.json_only):
        started = time.perf_counter()
        result["scenarios"][name] = {**RUNNERS[name](args), "bench_s": round(time.perf_counter() - started, 1)}
        if not args.json_only:
            print(f"{name}: {json.dumps(result['scenarios'][name])}", flush=True)
    result["met"] = all(s.get("met") for s in result["scenarios"].values())
    print(json.dumps(result))
    return 0
