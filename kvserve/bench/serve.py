"""`kvserve bench serve`: a seeded load generator for any OpenAI-compatible server.

Every request is `POST /v1/chat/completions` with `stream: true, stream_options: {include_usage:
true}`, greedy (`temperature: 0`), over one httpx.AsyncClient; the SSE stream is parsed by hand.
Per request it records the time to first token (first non-empty content delta), the times between
content chunks, output tokens (`usage.completion_tokens`, else the number of content chunks),
prompt and cached tokens (`usage.prompt_tokens_details.cached_tokens`, 0 if absent) and errors
(HTTP status or exception: counted, never fatal). Workloads: kvserve/bench/workloads.py (prompt
lengths are approximate: words ≈ tokens). Extensions sent, which other servers may ignore or
reject: `ignore_eos` (--ignore-eos), `priority` (mixed-priority), `cache_control` on content
blocks (doc-qa). Cached tokens written are not reported: the OpenAI usage object does not carry them.

Prints a progress bar, a summary table and one JSON line last; `--plot` draws the TTFT CDF (per
request class) and the output throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field

from tqdm import tqdm

from kvserve.bench.workloads import DEFAULTS, WORKLOADS, Session, Turn, build_workload, workload_digest
from kvserve.config import ConfigError


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("target")
    group.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL (without /v1)")
    group.add_argument("--model", default=None, help="model name to request (default: the first of GET /v1/models)")
    group.add_argument("--api-key", default=None, help="sent as `Authorization: Bearer KEY`")
    group.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")
    group = parser.add_argument_group("workload")
    group.add_argument("--workload", choices=WORKLOADS, default="throughput")
    group.add_argument("--num-requests", type=int, default=None, help="default: per workload")
    group.add_argument("--concurrency", type=int, default=None,
                       help="sessions in flight at once (a multi-turn conversation is one session); default: per workload")
    group.add_argument("--max-tokens", type=int, default=None,
                       help="output tokens per request (mixed-priority: interactive get a quarter); default: per workload")
    group.add_argument("--ignore-eos", action="store_true", help="send ignore_eos: true (vLLM, llama-server, kvserve)")
    group.add_argument("--prompt-scale", type=float, default=1.0,
                       help="multiply every prompt length, e.g. 0.05 for random:tiny's byte tokenizer")
    group.add_argument("--seed", type=int, default=0, help="workload seed")
    group = parser.add_argument_group("report")
    group.add_argument("--label", default=None, help="name of this run in the JSON and the plot legend (default: model)")
    group.add_argument("--plot", default=None, metavar="OUT.png", help="TTFT CDF and throughput figure (needs matplotlib)")
    group.add_argument("--json-only", action="store_true", help="no progress bar or table: only the JSON line")


@dataclass
class RequestResult:
    request_class: str
    ttft_s: float | None = None
    chunk_gaps_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    latency_s: float = 0.0
    text: str = ""
    error: str | None = None


class Client:
    """One AsyncClient for the run; `send` streams one chat completion and never raises."""

    def __init__(self, http, url: str, model: str, ignore_eos: bool):
        self.http, self.url, self.model, self.ignore_eos = http, url, model, ignore_eos

    def body(self, messages: list[dict], turn: Turn) -> dict:
        body = {"model": self.model, "messages": messages, "max_tokens": turn.max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        if self.ignore_eos:
            body["ignore_eos"] = True
        if turn.priority is not None:
            body["priority"] = turn.priority
        return body

    async def send(self, messages: list[dict], turn: Turn) -> RequestResult:
        result = RequestResult(turn.request_class)
        start = time.perf_counter()
        try:
            async with self.http.stream("POST", f"{self.url}/v1/chat/completions",
                                        json=self.body(messages, turn)) as response:
                if response.status_code != 200:
                    await response.aread()
                    result.error = f"HTTP {response.status_code}"
                else:
                    await self._read_stream(response, result, start)
        # A failed request is a data point, not the end of the run.
        except Exception as error:   # noqa: BLE001
            result.error = type(error).__name__
        result.latency_s = time.perf_counter() - start
        return result

    async def _read_stream(self, response, result: RequestResult, start: float) -> None:
        num_chunks, last = 0, None
        parts: list[str] = []
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[len("data:"):].strip()
            if payload == "[DONE]":
                break
            chunk = json.loads(payload)
            if "error" in chunk:
                result.error = "stream error"
                return
            for choice in chunk.get("choices") or ():
                content = (choice.get("delta") or {}).get("content")
                if content:
                    now = time.perf_counter()
                    if last is None:
                        result.ttft_s = now - start
                    else:
                        result.chunk_gaps_s.append(now - last)
                    last = now
                    num_chunks += 1
                    parts.append(content)
            if usage := chunk.get("usage"):
                result.output_tokens = usage.get("completion_tokens") or 0
                result.prompt_tokens = usage.get("prompt_tokens") or 0
                result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        result.output_tokens = result.output_tokens or num_chunks
        result.text = "".join(parts)
        if result.ttft_s is None:
            result.error = "no content"


async def run_sessions(client: Client, sessions: list[Session], concurrency: int, bar: tqdm) -> list[RequestResult]:
    """`concurrency` workers take sessions in order; a session's turns go one after another, each
    with the whole history so far (previous answers included) as its prompt."""
    queue: asyncio.Queue[Session] = asyncio.Queue()
    for session in sessions:
        queue.put_nowait(session)
    results: list[RequestResult] = []

    async def worker() -> None:
        while not queue.empty():
            session = queue.get_nowait()
            history: list[dict] = []
            for turn in session.turns:
                history += turn.messages
                result = await client.send(history, turn)
                results.append(result)
                bar.update(1)
                history.append({"role": "assistant", "content": result.text})

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def ttft_stats(results: list[RequestResult]) -> dict:
    ttfts = [r.ttft_s for r in results if r.error is None]
    return {"requests": len(ttfts), "ttft_p50_ms": ms(percentile(ttfts, 50)),
            "ttft_p95_ms": ms(percentile(ttfts, 95)), "ttft_p99_ms": ms(percentile(ttfts, 99))}


def summarize(results: list[RequestResult], wall_s: float) -> dict:
    ok = [r for r in results if r.error is None]
    gaps = [gap for r in ok for gap in r.chunk_gaps_s]
    output_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    cached_tokens = sum(r.cached_tokens for r in ok)
    summary = {"requests": len(ok), "errors": len(results) - len(ok),
               "error_kinds": dict(Counter(r.error for r in results if r.error is not None)),
               "wall_s": round(wall_s, 3), "output_tokens": output_tokens, "prompt_tokens": prompt_tokens,
               "output_tok_s": round(output_tokens / wall_s, 2) if wall_s > 0 else 0.0,
               **{k: v for k, v in ttft_stats(ok).items() if k != "requests"},
               "tbt_p50_ms": ms(percentile(gaps, 50)), "tbt_p95_ms": ms(percentile(gaps, 95)),
               "latency_p50_s": round(percentile([r.latency_s for r in ok], 50) or 0.0, 3),
               "cached_tokens": cached_tokens,
               "cached_share": round(cached_tokens / prompt_tokens, 4) if prompt_tokens else 0.0}
    classes = sorted({r.request_class for r in results})
    if classes != ["default"]:
        summary["classes"] = {c: ttft_stats([r for r in ok if r.request_class == c]) for c in classes}
    summary["ttfts_ms"] = [ms(r.ttft_s) for r in ok]          # raw, for CDFs in plots and `bench compare`
    summary["ttft_classes"] = [r.request_class for r in ok]
    return summary


def print_table(result: dict) -> None:
    fmt = lambda v: "-" if v is None else str(v)   # noqa: E731
    rows = [("server", f"{result['url']} ({result['model']})"), ("workload", result["workload"]),
            ("requests", f"{result['requests']} ok, {result['errors']} errors {result['error_kinds'] or ''}".rstrip()),
            ("concurrency", result["concurrency"]), ("wall time", f"{result['wall_s']} s"),
            ("output tok/s", result["output_tok_s"]),
            ("TTFT p50/p95/p99", (f"{fmt(result['ttft_p50_ms'])} / {fmt(result['ttft_p95_ms'])} / "
                                  f"{fmt(result['ttft_p99_ms'])} ms")),
            ("time between tokens p50/p95", f"{fmt(result['tbt_p50_ms'])} / {fmt(result['tbt_p95_ms'])} ms"),
            ("cached tokens read", (f"{result['cached_tokens']} of {result['prompt_tokens']} prompt tokens "
                                    f"({100 * result['cached_share']:.1f}%)"))]
    for name, stats in result.get("classes", {}).items():
        rows.append((f"TTFT {name} p50/p95/p99", (f"{fmt(stats['ttft_p50_ms'])} / {fmt(stats['ttft_p95_ms'])} / "
                                                  f"{fmt(stats['ttft_p99_ms'])} ms ({stats['requests']} requests)")))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def load_pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install matplotlib (or pip install 'kvserve[bench]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(results: list[dict], path: str) -> None:
    """Left: TTFT CDF, one line per run and request class; right: output tok/s per run."""
    plt = load_pyplot()
    figure, (cdf, bar) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    for result in results:
        for request_class in sorted(set(result["ttft_classes"])):
            values = sorted(t / 1000 for t, c in zip(result["ttfts_ms"], result["ttft_classes"]) if c == request_class)
            name = result["label"] if request_class == "default" else f"{result['label']} · {request_class}"
            cdf.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post", label=name)
    cdf.set_xlabel("time to first token (s)")
    cdf.set_ylabel("share of requests")
    cdf.set_ylim(0, 1.02)
    cdf.grid(alpha=0.3)
    cdf.legend(loc="lower right")
    bar.bar([r["label"] for r in results], [r["output_tok_s"] for r in results],
            color=[f"C{i}" for i in range(len(results))])
    bar.set_ylabel("output tokens / s")
    bar.grid(axis="y", alpha=0.3)
    first = results[0]
    where = f"{first['model']} at {first['url']}" if len(results) == 1 else f"model {first['model']}"
    figure.suptitle(f"{first['workload']}: {first['num_requests']} requests, concurrency {first['concurrency']} — {where}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def first_model(url: str, headers: dict[str, str]) -> str:
    import httpx

    try:
        response = httpx.get(f"{url}/v1/models", headers=headers, timeout=30.0)
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as error:
        raise ConfigError(f"could not list models at {url}/v1/models ({error!r}); pass --model") from None


async def run_load(args: argparse.Namespace, model: str, headers: dict[str, str], sessions: list[Session],
                   num_requests: int, concurrency: int) -> tuple[list[RequestResult], float]:
    import httpx

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    timeout = httpx.Timeout(args.timeout, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, headers=headers) as http:
        client = Client(http, args.url, model, args.ignore_eos)
        with tqdm(total=num_requests, desc=args.workload, unit="req", disable=args.json_only) as bar:
            start = time.perf_counter()
            results = await run_sessions(client, sessions, concurrency, bar)
            return results, time.perf_counter() - start


def measure(args: argparse.Namespace) -> dict:
    """Run the workload against args.url; the result dict (the JSON line)."""
    defaults = DEFAULTS[args.workload]
    num_requests = args.num_requests or defaults.num_requests
    concurrency = args.concurrency or defaults.concurrency
    max_tokens = args.max_tokens or defaults.max_tokens
    if min(num_requests, concurrency, max_tokens) < 1 or args.prompt_scale <= 0:
        raise ConfigError("--num-requests, --concurrency, --max-tokens and --prompt-scale must be positive")
    if args.plot:
        load_pyplot()   # fail before the run, not after it
    args.url = args.url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = args.model or first_model(args.url, headers)
    sessions = build_workload(args.workload, num_requests, max_tokens, args.seed, args.prompt_scale)
    results, wall_s = asyncio.run(run_load(args, model, headers, sessions, num_requests, concurrency))
    result = {"bench": "serve", "label": args.label or model, "url": args.url, "model": model,
              "workload": args.workload, "seed": args.seed, "num_requests": num_requests, "concurrency": concurrency,
              "max_tokens": max_tokens, "ignore_eos": args.ignore_eos, "prompt_scale": args.prompt_scale,
              "workload_digest": workload_digest(sessions), **summarize(results, wall_s)}
    return result


def run_serve_bench(args: argparse.Namespace) -> int:
    result = measure(args)
    if args.plot:
        plot([result], args.plot)
    if not args.json_only:
        print_table(result)
    print(json.dumps(result))
    return 0
