"""`kvserve bench batch`: batch jobs against the engine's own speed, and beside live traffic.

    --mode throughput   --lines lines over --prefixes shared instruction prefixes (each line one
                        document), answered twice in one process, each time on a fresh engine of the
                        same config: through `kvserve batch` (the offline CLI's path: each line an
                        OpenAI body through the server's LineExecutor, --max-num-seqs at a time, in
                        prefix order) and through the engine directly, `bench offline`'s way (the
                        same rendered prompts, every one added at once). Output tok/s of each and
                        their ratio (goal ≥ 0.9).
    --mode fill         a server (started here) with --lines batch lines running, and `bench serve`'s
                        latency workload against it: interactive TTFT p95 with the batch running and
                        without it (ratio, goal ≤ 1.5), and the batch's output tok/s during the
                        interactive run and alone (ratio, goal ≥ 0.7), read from
                        kvserve:batch_output_tokens_total.

Seeded; greedy, end tokens ignored; one JSON line last.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import random
import tempfile
import time
from pathlib import Path

from kvserve.config import EngineConfig

WORDS = ("parcel invoice customs courier refund address damaged weekend tracking label payment warehouse "
         "delivery pallet supplier contract shipment order receipt delay route driver depot").split()
TASKS = ["Summarise the shipping note below in two sentences, then state its urgency as low, medium or high.",
         "Classify the customer's message below as a complaint, a question or praise, and explain in one line.",
         "Extract every date, amount and place named in the note below as a JSON object.",
         "Rewrite the note below politely for the customer, keeping every fact, in under sixty words."]


def add_batch_bench_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("workload")
    group.add_argument("--mode", choices=["throughput", "fill"], default="throughput")
    group.add_argument("--lines", type=int, default=None, help="default 256 (throughput) or 500 (fill)")
    group.add_argument("--prefixes", type=int, default=4, help="shared instruction prefixes")
    group.add_argument("--instruction-words", type=int, default=120, help="words of each shared instruction")
    group.add_argument("--document-words", type=int, default=60, help="words of each line's own document")
    group.add_argument("--output-len", type=int, default=64)
    group.add_argument("--workload-seed", type=int, default=0)
    group = parser.add_argument_group("fill")
    group.add_argument("--interactive-requests", type=int, default=16, help="the latency workload's requests")
    group.add_argument("--warm-s", type=float, default=15.0, help="batch running before the alone window")
    group.add_argument("--window-s", type=float, default=40.0, help="the batch-alone measuring window")
    group.add_argument("--kvserve-args", default="", help="extra `kvserve serve` options for the fill server")


def batch_lines(num_lines: int, num_prefixes: int, instruction_words: int, document_words: int, output_len: int,
                seed: int, model: str | None = None) -> list[dict]:
    """OpenAI batch lines: a system instruction shared by each group, a user document of its own."""
    rng = random.Random(seed)
    instructions = [TASKS[i % len(TASKS)] + " " + " ".join(rng.choice(WORDS) for _ in range(instruction_words))
                    for i in range(num_prefixes)]
    lines = []
    for i in range(num_lines):
        document = f"Note {i}: " + " ".join(rng.choice(WORDS) for _ in range(document_words))
        body = {"model": model, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
                "messages": [{"role": "system", "content": instructions[rng.randrange(num_prefixes)]},
                             {"role": "user", "content": document}]}
        lines.append({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
    return lines


# ---- throughput -------------------------------------------------------------------------------------
def run_throughput(args: argparse.Namespace, config: EngineConfig) -> dict:
    from kvserve.bench.offline import run_engine
    from kvserve.engine.engine import Engine
    from kvserve.model.checkpoint import load_checkpoint

    lines = batch_lines(args.lines or 256, args.prefixes, args.instruction_words, args.document_words,
                        args.output_len, args.workload_seed)
    checkpoint = _on_a_thread(lambda: load_checkpoint(config.model, seed=config.seed))

    def direct_path() -> tuple[dict, int]:
        engine = Engine(config, checkpoint)
        prompts = [engine.tokenizer.encode(engine.tokenizer.apply_chat_template(line["body"]["messages"]))
                   for line in lines]
        result = run_engine(engine, prompts, args.output_len)
        result["cached_prompt_tokens"] = engine.stats().kv.prefix_hit_tokens
        return result, sum(map(len, prompts))

    # Each run on a thread of its own that ends with it: a thread that ran parallel torch ops and
    # lives on slows every other one's (see AsyncEngine), as it would not in `kvserve batch` itself.
    direct, prompt_tokens = _on_a_thread(direct_path)
    batch = _run_cli_path(lines, config, checkpoint, args.output_len)
    return {"bench": "batch", "mode": "throughput", "model": config.model or "default", "lines": len(lines),
            "prefixes": args.prefixes, "prompt_tokens": prompt_tokens, "output_len": args.output_len,
            "max_num_seqs": config.scheduler.max_num_seqs, "engine_direct": direct, "kvserve_batch": batch,
            "ratio": round(batch["output_tok_s"] / direct["output_tok_s"], 3)}


def _run_cli_path(lines: list[dict], config: EngineConfig, checkpoint, output_len: int) -> dict:
    from kvserve.batch import offline
    from kvserve.batch.requests import Limits
    from kvserve.config import ServerConfig
    from kvserve.engine.async_engine import AsyncEngine
    from kvserve.engine.engine import Engine
    from kvserve.server.batch_api import LineExecutor
    from kvserve.server.metrics import ServerMetrics
    from kvserve.server.openai_api import OpenAIServing, ServedModel

    with tempfile.TemporaryDirectory(prefix="kvserve-bench-batch-") as workdir:
        source, output = Path(workdir) / "in.jsonl", Path(workdir) / "out.jsonl"
        source.write_text("".join(json.dumps(line) + "\n" for line in lines))

        async def main() -> dict:
            engine = await asyncio.to_thread(AsyncEngine, lambda: Engine(config, checkpoint))
            try:
                serving = OpenAIServing({"default": ServedModel("default", engine)}, ServerConfig(),
                                        ServerMetrics(lambda: {}))
                result = await offline.run(source, output, LineExecutor(lambda: serving),
                                           2 * config.scheduler.max_num_seqs, Limits(1 << 30, 1 << 22, 1 << 20))
                stats = engine.stats()
                result["cached_prompt_tokens"] = stats.kv.prefix_hit_tokens
                result["preemptions"] = stats.num_preemptions
                return result
            finally:
                engine.shutdown()

        result = asyncio.run(main())
    total = len(lines) * output_len
    return {"wall_s": result["wall_s"], "output_tok_s": round(total / result["wall_s"], 2), "errors": result["errors"],
            "cached_prompt_tokens": result["cached_prompt_tokens"], "preemptions": result["preemptions"]}


def _on_a_thread(fn):
    """fn() on a thread that ends when it returns (its OpenMP team with it)."""
    import threading

    result: list = []
    errors: list = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=run, name="kvserve-bench")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


# ---- fill ---------------------------------------------------------------------------------------------
def run_fill(args: argparse.Namespace) -> dict:
    import httpx

    from kvserve.bench.compare import kvserve_command
    from kvserve.bench.serve import measure
    from kvserve.bench.server_process import free_port, running
    from kvserve.model.loader import resolve_model_path

    model = args.model if args.model else str(resolve_model_path(None))
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="kvserve-bench-fill-") as state:
        command = kvserve_command(model, port, f"--state-dir {state} {args.kvserve_args}")
        with running(command, port, name="kvserve") as url:
            client = httpx.Client(base_url=url, timeout=60)
            latency = _latency_args(args, url)
            alone = measure(latency)
            lines = batch_lines(args.lines or 500, args.prefixes, args.instruction_words, args.document_words,
                                args.output_len, args.workload_seed, model="bench")
            content = "".join(json.dumps(line) + "\n" for line in lines).encode()
            file_id = client.post("/v1/files", files={"file": ("fill.jsonl", content)},
                                  data={"purpose": "batch"}).json()["id"]
            batch_id = client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                                        "completion_window": "24h"}).json()["id"]
            time.sleep(args.warm_s)
            batch_alone = _batch_rate(client, args.window_s)
            tokens_before, started = _batch_tokens(client), time.monotonic()
            with_batch = measure(_latency_args(args, url))
            batch_during = (_batch_tokens(client) - tokens_before) / (time.monotonic() - started)
            status = client.get(f"/v1/batches/{batch_id}").json()
            client.post(f"/v1/batches/{batch_id}/cancel")
    still_running = status["status"] == "in_progress"
    return {"bench": "batch", "mode": "fill", "model": model, "batch_lines": len(lines),
            "interactive_requests": args.interactive_requests,
            "ttft_p95_ms": {"alone": alone["ttft_p95_ms"], "with_batch": with_batch["ttft_p95_ms"]},
            "ttft_p50_ms": {"alone": alone["ttft_p50_ms"], "with_batch": with_batch["ttft_p50_ms"]},
            "ttft_p95_ratio": round(with_batch["ttft_p95_ms"] / alone["ttft_p95_ms"], 3),
            "interactive_tok_s": {"alone": alone["output_tok_s"], "with_batch": with_batch["output_tok_s"]},
            "batch_tok_s": {"alone": round(batch_alone, 2), "during_interactive": round(batch_during, 2)},
            "batch_throughput_kept": round(batch_during / batch_alone, 3) if batch_alone else None,
            "batch_still_running_at_the_end": still_running, "batch_counts": status["request_counts"]}


def _latency_args(args: argparse.Namespace, url: str) -> argparse.Namespace:
    latency = copy.copy(args)
    latency.url, latency.model, latency.workload, latency.api_key = url, None, "latency", None
    latency.num_requests, latency.concurrency, latency.max_tokens = args.interactive_requests, 1, None
    latency.ignore_eos, latency.prompt_scale, latency.seed, latency.timeout = True, 1.0, args.workload_seed, 600.0
    latency.label, latency.plot, latency.json_only = None, None, True
    return latency


def _batch_tokens(client) -> float:
    for row in client.get("/metrics").text.splitlines():
        if row.startswith("kvserve:batch_output_tokens_total"):
            return float(row.rsplit(" ", 1)[1])
    return 0.0


def _batch_rate(client, window_s: float) -> float:
    before, started = _batch_tokens(client), time.monotonic()
    time.sleep(window_s)
    return (_batch_tokens(client) - before) / (time.monotonic() - started)


def run_batch_bench(args: argparse.Namespace, config: EngineConfig) -> int:
    result = run_fill(args) if args.mode == "fill" else run_throughput(args, config)
    if result["mode"] == "throughput":
        print(f"kvserve batch: {result['kvserve_batch']['output_tok_s']} output tok/s; engine directly: "
              f"{result['engine_direct']['output_tok_s']}; ratio {result['ratio']}")
    else:
        print(f"interactive TTFT p95: {result['ttft_p95_ms']['alone']} ms alone, {result['ttft_p95_ms']['with_batch']} "
              f"ms with the batch running (x{result['ttft_p95_ratio']}); batch: {result['batch_tok_s']['alone']} "
              f"tok/s alone, {result['batch_tok_s']['during_interactive']} during (x{result['batch_throughput_kept']})")
    print(json.dumps(result))
    return 0
