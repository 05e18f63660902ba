"""kvserve command line: serve | generate | bench offline | bench cache | bench step | bench kernels |
bench perplexity | bench serve | bench compare | bench soak."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import sys

from pathlib import Path

from kvserve.config import CacheConfig, ConfigError, EngineConfig, SchedulerConfig, ServerConfig, parse_bytes
from kvserve.sampling import InvalidRequestError, SamplingParams


def add_engine_options(parser: argparse.ArgumentParser, repeat_model: bool = False) -> None:
    group = parser.add_argument_group("engine")
    if repeat_model:
        group.add_argument("--model", action="append", default=None, metavar="[NAME=]MODEL",
                           help="a model to serve, repeatable: GGUF file, Hugging Face directory, registered name or random:PRESET, "
                                "optionally named (default: the embedded SmolLM2-135M-Instruct)")
        group.add_argument("--engine-loop", default="auto", choices=["auto", "shared", "separate"],
                           help="with several models: shared steps them all on one engine thread, in turn; "
                                "separate gives each its own thread (auto: shared on a CPU, separate on CUDA)")
    else:
        group.add_argument("--model", default=None,
                           help="GGUF file, Hugging Face directory, registered name, or random:PRESET (tiny, llama-1b, llama-8b) "
                                "(default: embedded SmolLM2-135M-Instruct)")
    group.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                       help="auto: bf16 on CUDA and on CPUs with AVX512-BF16, else fp32")
    group.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    group.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "cpu", "triton"],
                       help="cpu: C++ decode kernel over the paged cache (built on first use); triton: Triton "
                            "kernels over the paged cache (CUDA); torch: the reference; auto: cpu on CPU when "
                            "it builds, triton on CUDA when importable and it passes a start-up check")
    group.add_argument("--enforce-eager", action="store_true",
                       help="CUDA: run decode steps eagerly, without capturing CUDA graphs at start-up")
    group.add_argument("--quantization", default="auto", choices=["auto", "none", "int8", "int4"],
                       help="weight-only, CPU: int8 with per-channel scales (half the weight memory); int4 in "
                            "groups of 32 (a GGUF's own Q4_1 weights; fastest for a few streams); auto (default): "
                            "int4 on CPU with --dtype auto, else none")
    group.add_argument("--seed", type=int, default=0, help="seed for random init and unseeded sampling")
    group.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    group.add_argument("--num-kv-blocks", type=int, default=None, help="KV pool size in blocks")
    group.add_argument("--kv-cache-memory", type=parse_bytes, default=None,
                       help="KV pool size in bytes, e.g. 512MiB or 2GiB (default 1GiB)")
    group.add_argument("--gpu-memory-utilization", type=float, default=0.9, metavar="F",
                       help="CUDA, without --kv-cache-memory or --num-kv-blocks: the KV pool takes this share of "
                            "the GPU's memory, less other processes', the weights and a profiled activation peak "
                            "(default 0.9)")
    group.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                       help="the KV cache's dtype; auto: bf16 under a quantized fp32 model on CPU (half the bytes, "
                            "read with fp32 math), else the model's dtype")
    group.add_argument("--no-prefix-caching", action="store_true", help="disable automatic prefix caching")
    group.add_argument("--kv-host-memory", type=parse_bytes, default=0,
                       help="host-memory tier for blocks evicted from the KV pool, e.g. 2GiB (default: none)")
    group.add_argument("--kv-disk-dir", default=None, metavar="DIR",
                       help="disk tier for blocks evicted from the host tier, one file per block; needs "
                            "--kv-host-memory; its *.kvblock files are deleted at start; serving several "
                            "models uses DIR/NAME for each (default: none)")
    group.add_argument("--kv-disk-blocks", type=int, default=4096, metavar="N",
                       help="most blocks the disk tier keeps, least recently used dropped first (default 4096)")
    group.add_argument("--pin-budget", type=float, default=0.5,
                       help="share of the KV pool that cache checkpoints may pin (oldest released first)")
    group.add_argument("--max-num-batched-tokens", type=int, default=512, help="token budget of one step")
    group.add_argument("--max-num-seqs", type=int, default=64, help="requests running at once")
    group.add_argument("--max-model-len", type=int, default=None, help="prompt + output tokens per request")
    group.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority", "cache-aware"],
                       help="waiting-queue order: fcfs; priority (lower `priority` values first, and a waiting "
                            "request preempts running ones of lower priority); cache-aware (cached prefixes first, "
                            "aged so that nobody waits past --aging-factor times its service time)")
    group.add_argument("--preemption-mode", default="auto", choices=["auto", "swap", "recompute"],
                       help="a preempted request's KV: swapped to the host tier (needs --kv-host-memory) or "
                            "recomputed later; auto: whichever costs less, by costs measured at start-up")
    group.add_argument("--aging-factor", type=float, default=4.0, metavar="A",
                       help="cache-aware: a request waiting A times its estimated service time goes first, "
                            "earliest deadline first (default 4)")
    group.add_argument("--background-step-factor", type=float, default=2.0, metavar="K",
                       help="while interactive requests are around, background work (batch jobs) is cut so that "
                            "a step takes at most K times the fastest recent step (default 2); 0: never cut")
    group.add_argument("--tenant-step-factor", type=float, default=2.0, metavar="K",
                       help="while a tenant within its fair share has work, the prompt chunks of tenants over "
                            "theirs are cut so that a step takes at most K times the fastest recent step without "
                            "them (default 2); 0: never cut")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model, dtype=args.dtype, device=args.device, seed=args.seed,
        attention_backend=args.attention_backend, quantization=args.quantization, enforce_eager=args.enforce_eager,
        cache=CacheConfig(block_size=args.block_size, num_blocks=args.num_kv_blocks,
                          memory_bytes=args.kv_cache_memory, enable_prefix_caching=not args.no_prefix_caching,
                          host_memory_bytes=args.kv_host_memory, disk_dir=args.kv_disk_dir,
                          disk_num_blocks=args.kv_disk_blocks, pin_budget_fraction=args.pin_budget,
                          dtype=args.kv_cache_dtype, gpu_memory_utilization=args.gpu_memory_utilization),
        scheduler=SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens,
                                  max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                                  policy=args.scheduling_policy, background_step_factor=args.background_step_factor,
                                  tenant_step_factor=args.tenant_step_factor,
                                  preemption_mode=args.preemption_mode, aging_factor=args.aging_factor),
    )


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=128)
    group.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=0)
    group.add_argument("--sampling-seed", type=int, default=None)
    group.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    group.add_argument("--ignore-eos", action="store_true")


def sampling_params_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.sampling_seed, stop=tuple(args.stop),
                          ignore_eos=args.ignore_eos)


def cmd_generate(args: argparse.Namespace) -> int:
    from kvserve.engine.engine import Engine

    params = sampling_params_from_args(args)
    engine = Engine(engine_config_from_args(args))
    prompt = args.prompt
    if not args.raw and getattr(engine.tokenizer, "chat_template", None):
        prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    engine.add(prompt, params)
    while engine.has_unfinished:
        for output in engine.step():
            sys.stdout.write(output.text)
            sys.stdout.flush()
            if output.finished:
                sys.stdout.write("\n")
                print(f"[{output.finish_reason.value}: {output.stats.num_prompt_tokens} prompt tokens, "
                      f"{output.stats.num_output_tokens} generated]", file=sys.stderr)
    return 0


DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_STATE_DIR = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "kvserve"


def parse_model_specs(specs: list[str] | None) -> dict[str, str | None]:
    """['name=path', 'path', ...] → {name: model}; no specs → the embedded default model."""
    if not specs:
        return {DEFAULT_MODEL_NAME: None}
    models: dict[str, str | None] = {}
    for spec in specs:
        name, sep, model = spec.partition("=")
        if not sep:
            model = spec
            name = Path(spec.rstrip("/")).stem if not spec.startswith("random:") else spec.replace(":", "-")
        if not name or not model:
            raise ConfigError(f"--model {spec!r}: expected NAME=MODEL or MODEL")
        if name in models:
            raise ConfigError(f"--model: the name {name!r} is used twice")
        models[name] = model
    return models


def model_engine_config(base: EngineConfig, name: str, model: str | None, num_models: int) -> EngineConfig:
    """One served model's config. Block hashes do not name the model, so with several models
    each one's disk tier gets its own subdirectory, DIR/NAME."""
    config = base.replace(model=model)
    if num_models > 1 and base.cache.disk_dir is not None:
        config = config.replace(cache=dataclasses.replace(base.cache, disk_dir=str(Path(base.cache.disk_dir) / name)))
    return config


def shared_engine_loop(choice: str, device: str) -> bool:
    """--engine-loop: do a process's models step on one thread? On a CPU they share the cores, and
    taking turns is faster than contending (kvserve/engine/async_engine.py: StepLoop); on CUDA one
    engine's host work may overlap another's kernels."""
    if choice != "auto":
        return choice == "shared"
    if device == "auto":
        import torch

        return not torch.cuda.is_available()
    return device != "cuda"


def server_address(args: argparse.Namespace, environ=os.environ) -> tuple[str, int]:
    """--host/--port; SageMaker's contract (--sagemaker, or SAGEMAKER_BIND_TO_PORT set) binds every
    interface on port 8080, or on the port that variable names."""
    from kvserve.server.sagemaker import DEFAULT_PORT, bind_port

    try:
        port = bind_port(environ)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if getattr(args, "sagemaker", False) or port is not None:
        return "0.0.0.0", port or DEFAULT_PORT
    return args.host, args.port


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    models = parse_model_specs(getattr(args, "model", None))
    host, port = server_address(args)
    return ServerConfig(
        routers=parse_routers(getattr(args, "router", []), models),
        cost_weights=parse_cost_weights(getattr(args, "cost_weight", []), models),
        host=host, port=port, max_queued_requests=args.max_queued_requests,
        max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens, max_n=args.max_n,
        cache_min_tokens=args.cache_min_tokens, max_tokens_default=args.max_tokens_default,
        header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
        keep_alive_timeout_s=args.keep_alive_timeout, max_header_bytes=args.max_header_bytes,
        stream_idle_timeout_s=args.stream_idle_timeout, ws_max_requests=args.ws_max_requests,
        shutdown_timeout_s=args.shutdown_timeout, metrics_auth=args.metrics_auth,
        state_dir=args.state_dir or None, max_batch_file_bytes=args.max_batch_file_bytes,
        max_batch_lines=args.max_batch_lines, batch_concurrency=args.batch_concurrency)


def parse_routers(specs: list[str], models: dict[str, str | None]) -> tuple:
    """--router specs → RouterConfigs. A router over the registered Qwen2.5-Coder pair uses the
    calibration shipped with kvserve unless it names its own."""
    import dataclasses as dc

    from kvserve.routing.predictor import Calibration
    from kvserve.routing.router import RouterConfigError, parse_router_spec

    routers = []
    for spec in specs:
        try:
            config = parse_router_spec(spec, list(models))
        except RouterConfigError as error:
            raise ConfigError(str(error)) from None
        if config.calibration is None:
            shipped = SHIPPED_CALIBRATIONS.get(tuple(models[name] for name in config.models))
            if shipped is not None and shipped.is_file():
                config = dc.replace(config, calibration=str(shipped))
        if config.calibration is not None:
            Calibration.load(config.calibration)      # a bad file fails now, not at the first request
        if config.name in [r.name for r in routers]:
            raise ConfigError(f"--router: the name {config.name!r} is used twice")
        routers.append(config)
    return tuple(routers)


SHIPPED_CALIBRATIONS = {("qwen-coder-0.5b", "qwen-coder-1.5b"):
                        Path(__file__).parent / "routing" / "data" / "qwen-coder-pair.json"}


def parse_cost_weights(specs: list[str], models: dict[str, str | None]) -> tuple[tuple[str, float], ...]:
    weights = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not sep or name not in models or not weight >= 0:
            raise ConfigError(f"--cost-weight {spec!r}: expected NAME=WEIGHT with a served model's name and a "
                              f"weight >= 0; served: {', '.join(models)}")
        weights[name] = weight
    return tuple(weights.items())


def cmd_serve(args: argparse.Namespace) -> int:
    from kvserve.engine.async_engine import AsyncEngine, StepLoop
    from kvserve.engine.engine import Engine
    from kvserve.server.app import create_app
    from kvserve.server.auth import ApiKeys
    from kvserve.server.lifecycle import Server, uvicorn_config

    models = parse_model_specs(args.model)
    base = engine_config_from_args(args)
    server = server_config_from_args(args)
    if args.state_dir == str(DEFAULT_STATE_DIR):
        try:
            DEFAULT_STATE_DIR.mkdir(parents=True, exist_ok=True)
        except OSError as error:   # a read-only home, say: serve without batch jobs rather than not at all
            logging.getLogger("kvserve").warning("batch jobs are off: the default --state-dir %s cannot be "
                                                 "created (%s)", DEFAULT_STATE_DIR, error)
            server = dataclasses.replace(server, state_dir=None)
    if server.metrics_auth and not args.api_keys:
        raise ConfigError("--metrics-auth needs --api-keys (the admin key it asks for comes from there)")
    faults = parse_faults(args.inject_fault)

    def build(config: EngineConfig) -> Engine:
        engine = Engine(config)
        inject_faults(engine, faults)
        return engine

    cluster = start_cluster(args)

    def load() -> dict[str, AsyncEngine]:   # each engine is built on its own thread (see AsyncEngine)
        if cluster is not None:
            return {name: cluster.deploy(name, model_engine_config(base, name, model, len(models)), faults)
                    for name, model in models.items()}
        loop = StepLoop() if shared_engine_loop(args.engine_loop, base.device) else None
        return {name: AsyncEngine(lambda config=model_engine_config(base, name, model, len(models)): build(config),
                                  loop=loop)
                for name, model in models.items()}

    def reload_keys() -> ApiKeys:
        return ApiKeys.load(args.api_keys)

    api_keys = reload_keys() if args.api_keys else None
    app = create_app(server, load, api_keys)
    config = uvicorn_config(app, server, log_level="info" if args.verbose else "warning")
    runner = Server(config, app, server, reload_keys if args.api_keys else None)
    try:
        runner.run()
    finally:
        if cluster is not None:
            cluster.stop()
    return runner.exit_code


def start_cluster(args: argparse.Namespace):
    """The Ray connection for --replicas / --ray-address / --min-replicas (None: one process)."""
    if args.replicas is None and args.ray_address is None and args.min_replicas is None and not args.attach:
        return None
    from kvserve.cluster.deploy import Cluster, ClusterConfig

    try:
        config = ClusterConfig(replicas=args.replicas or args.min_replicas or 1, ray_address=args.ray_address,
                               min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                               replica_cpus=args.replica_cpus, replica_gpus=args.replica_gpus,
                               router=args.replica_router, imbalance_threshold=args.replica_imbalance_threshold,
                               min_match_blocks=args.replica_min_match_blocks, decay_s=args.replica_decay_s,
                               session_ttl_s=args.session_ttl_s, attach=args.attach)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    try:
        return Cluster(config)
    except ImportError as error:
        raise ConfigError(f"--replicas needs Ray Serve: pip install 'ray[serve]' ({error})") from None


def parse_faults(specs: list[str]) -> dict[str, int]:
    """--inject-fault NAME=N (testing aid, docs/reliability.md): `engine-dies-after-steps=N` makes
    the engine loop raise after N steps (fatal); `request-fails-on-token=N` makes any step that
    runs token id N raise inside the model (that request fails alone)."""
    faults = {}
    for spec in specs or ():
        name, _, value = spec.partition("=")
        if name not in ("engine-dies-after-steps", "request-fails-on-token") or not value.isdigit():
            raise ConfigError(f"--inject-fault {spec!r}: expected engine-dies-after-steps=N or request-fails-on-token=N")
        faults[name] = int(value)
    return faults


def inject_faults(engine, faults: dict[str, int]) -> None:
    if "engine-dies-after-steps" in faults:
        limit, steps, schedule = faults["engine-dies-after-steps"], [0], engine.scheduler.schedule

        def failing_schedule():
            steps[0] += 1
            if steps[0] > limit:
                raise RuntimeError(f"injected fault: the engine dies after {limit} steps")
            return schedule()

        engine.scheduler.schedule = failing_schedule
    if "request-fails-on-token" in faults:
        token, runner = faults["request-fails-on-token"], engine.core.runner
        execute = runner.execute

        def failing_execute(plan):
            if any(token in chunk.token_ids for chunk in plan.chunks):
                raise RuntimeError(f"injected fault: a step that runs token {token} fails")
            return execute(plan)

        runner.execute = failing_execute


def cmd_batch(args: argparse.Namespace) -> int:
    """`kvserve batch INPUT -o OUTPUT`: see kvserve/batch/offline.py."""
    import asyncio
    import json

    from kvserve.batch import offline
    from kvserve.batch.requests import BatchInputError, Limits
    from kvserve.engine.async_engine import AsyncEngine
    from kvserve.engine.engine import Engine
    from kvserve.server.batch_api import LineExecutor
    from kvserve.server.metrics import ServerMetrics
    from kvserve.server.openai_api import OpenAIServing, ServedModel

    config = engine_config_from_args(args)
    server = ServerConfig(max_body_bytes=args.max_line_bytes, max_tokens_default=args.max_tokens_default)
    limits = Limits(args.max_batch_file_bytes, args.max_line_bytes, args.max_batch_lines)
    offline.read_lines(Path(args.input), limits)   # refuse a bad file before loading the model

    async def main() -> dict:
        engine = await asyncio.to_thread(AsyncEngine, lambda: Engine(config))
        try:
            models = {"default": ServedModel("default", engine)}
            metrics = ServerMetrics(lambda: {})
            serving = OpenAIServing(models, server, metrics)
            return await offline.run(Path(args.input), Path(args.output), LineExecutor(lambda: serving),
                                     args.concurrency or config.scheduler.max_num_seqs, limits,
                                     show_progress=not args.quiet)
        finally:
            engine.shutdown()

    try:
        result = asyncio.run(main())
    except BatchInputError as error:
        raise ConfigError(f"{args.input}: {error}") from None
    print(json.dumps(result))
    return 0


def cmd_bench_offline(args: argparse.Namespace) -> int:
    from kvserve.bench.offline import run_offline_bench

    return run_offline_bench(args, engine_config_from_args(args))


def cmd_bench_cache(args: argparse.Namespace) -> int:
    from kvserve.bench.cache import run_cache_bench

    return run_cache_bench(args, engine_config_from_args(args))


def cmd_bench_step(args: argparse.Namespace) -> int:
    from kvserve.bench.step import run_step_bench

    return run_step_bench(args, engine_config_from_args(args))


def cmd_bench_kernels(args: argparse.Namespace) -> int:
    from kvserve.bench.kernels import run_kernels_bench

    return run_kernels_bench(args)


def cmd_bench_perplexity(args: argparse.Namespace) -> int:
    from kvserve.bench.perplexity import run_perplexity_bench

    return run_perplexity_bench(args, engine_config_from_args(args))


def cmd_bench_compare(args: argparse.Namespace) -> int:
    from kvserve.bench.compare import run_compare

    return run_compare(args)


def cmd_bench_batch(args: argparse.Namespace) -> int:
    from kvserve.bench.batch import run_batch_bench

    return run_batch_bench(args, engine_config_from_args(args))


def cmd_bench_soak(args: argparse.Namespace) -> int:
    from kvserve.bench.soak import run_soak_bench

    return run_soak_bench(args)


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from kvserve.bench.serve import run_serve_bench

    return run_serve_bench(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvserve", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="stream one completion to the terminal")
    generate.add_argument("prompt")
    generate.add_argument("--raw", action="store_true", help="do not apply the chat template")
    add_engine_options(generate)
    add_sampling_options(generate)
    generate.set_defaults(func=cmd_generate)

    serve = commands.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    group = serve.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1")
    group.add_argument("--port", type=int, default=8000)
    group.add_argument("--sagemaker", action="store_true",
                       help="SageMaker's container contract: listen on 0.0.0.0:8080 (also when SAGEMAKER_BIND_TO_PORT "
                            "is set: on that port); /ping, /invocations and /invocations-response-stream are always served")
    group.add_argument("--max-queued-requests", type=int, default=256,
                       help="requests allowed to wait beyond --max-num-seqs; more get 429 + Retry-After")
    group.add_argument("--max-body-bytes", type=parse_bytes, default=4 << 20, help="413 past this (default 4MiB)")
    group.add_argument("--max-prompt-tokens", type=int, default=None,
                       help="400 past this many prompt tokens (default: the context less one)")
    group.add_argument("--max-n", type=int, default=8, help="most choices (n) per request")
    group.add_argument("--api-keys", default=None, metavar="FILE",
                       help='JSON {"<key>": {"tenant": "<name>", "admin": false}}; then every request needs a key')
    group.add_argument("--cache-min-tokens", type=int, default=1024,
                       help="a cache checkpoint's prefix shorter than this pins nothing")
    group.add_argument("--max-tokens-default", type=int, default=4096,
                       help="max_tokens of a request that gives none, capped by the room its context leaves "
                            "(default 4096)")
    group.add_argument("--header-timeout", type=float, default=10.0, metavar="S",
                       help="a request's line and headers must arrive within S seconds, else 408 (default 10)")
    group.add_argument("--body-timeout", type=float, default=60.0, metavar="S",
                       help="a request's body must arrive within S seconds, else 408 (default 60)")
    group.add_argument("--keep-alive-timeout", type=float, default=5.0, metavar="S",
                       help="an idle keep-alive connection is closed after S seconds (default 5)")
    group.add_argument("--max-header-bytes", type=parse_bytes, default=16384,
                       help="request line and headers at most this large, else 400 (default 16KiB)")
    group.add_argument("--stream-idle-timeout", type=float, default=30.0, metavar="S",
                       help="a stream (SSE or WebSocket) whose client reads nothing for S seconds while the "
                            "server has output waiting is aborted (default 30)")
    group.add_argument("--ws-max-requests", type=int, default=32,
                       help="requests in flight on one WebSocket; more get a 429 error frame (default 32)")
    group.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                       help="on SIGTERM, streams in flight may finish within S seconds, then are aborted "
                            "(default 30)")
    group.add_argument("--metrics-auth", action="store_true",
                       help="/metrics needs an admin API key (needs --api-keys)")
    group.add_argument("--inject-fault", action="append", default=[], help=argparse.SUPPRESS)
    group = serve.add_argument_group("routers (virtual models over a small and a large model)")
    group.add_argument("--router", action="append", default=[],
                       metavar="NAME=SMALL,LARGE[,key=value...]",
                       help="a router clients name as a model, repeatable; options: tolerance (0..1, default "
                            "0.1), fallback, escalation (stream|before|off), predict (on|off), hold (tokens held "
                            "back and scored, default: the calibration's, 8 for the shipped one, 24 for the "
                            "prior), window (tokens per later check, default 32), "
                            "calibration (a JSON file from `kvserve bench routing --calibrate`)")
    group.add_argument("--cost-weight", action="append", default=[], metavar="NAME=WEIGHT",
                       help="the cost of a token on a model, repeatable (default: its parameter count in billions)")
    group = serve.add_argument_group("batch jobs")
    group.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR), metavar="DIR",
                       help="where batch jobs live (SQLite + file contents); '' turns batch jobs off "
                            f"(default {DEFAULT_STATE_DIR})")
    group.add_argument("--max-batch-file-bytes", type=parse_bytes, default=200 << 20,
                       help="largest batch input file or message-batch body (default 200MiB)")
    group.add_argument("--max-batch-lines", type=int, default=50_000, help="most requests per batch (default 50000)")
    group.add_argument("--batch-concurrency", type=int, default=None,
                       help="batch lines running at once (default: --max-num-seqs)")
    group = serve.add_argument_group("scale-out on Ray Serve (README: One node, several nodes)")
    group.add_argument("--replicas", type=int, default=None, metavar="N",
                       help="serve each model from N engine replicas (Ray Serve deployments); this process stays "
                            "the HTTP front and routes each request to the replica holding its prefix")
    group.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="join this Ray cluster (`ray start --head` prints it; 'auto': the local node's); "
                            "default: start a local Ray instance")
    group.add_argument("--attach", action="store_true",
                       help="with --ray-address: one more HTTP front for the deployment another `kvserve serve "
                            "--replicas` started (same --model names); deploys and removes nothing")
    group.add_argument("--min-replicas", type=int, default=None, metavar="N",
                       help="autoscale between --min-replicas and --max-replicas on the replicas' waiting requests "
                            "and KV usage")
    group.add_argument("--max-replicas", type=int, default=None, metavar="N")
    group.add_argument("--replica-cpus", type=float, default=1.0, metavar="C",
                       help="CPUs per replica (its threads); default 1")
    group.add_argument("--replica-gpus", type=float, default=None, metavar="G",
                       help="GPUs per replica (default: 1 where the cluster has GPUs, else 0)")
    group.add_argument("--replica-router", default="kv", choices=["kv", "pow2"],
                       help="kv: the longest cached prefix, sticky sessions, a queue-imbalance guard (default); "
                            "pow2: Ray Serve's power of two choices")
    group.add_argument("--replica-imbalance-threshold", type=int, default=4, metavar="Q",
                       help="queues further apart than Q requests: balance load before seeking the prefix "
                            "(default 4)")
    group.add_argument("--replica-min-match-blocks", type=int, default=1, metavar="B",
                       help="a replica holding fewer leading blocks of the prompt is no prefix match (default 1)")
    group.add_argument("--replica-decay-s", type=float, default=600.0, metavar="S",
                       help="a route the router inferred (the replica will have cached it) is forgotten S seconds "
                            "after its last use, unless the replica reports it (default 600)")
    group.add_argument("--session-ttl-s", type=float, default=3600.0, metavar="S",
                       help="a sticky session (x-session-id, prompt_cache_key) is forgotten S seconds after its "
                            "last request (default 3600)")
    add_engine_options(serve, repeat_model=True)
    serve.set_defaults(func=cmd_serve)

    batch = commands.add_parser("batch", help="answer a batch file (OpenAI's batch line format) without a server; "
                                              "resumable")
    batch.add_argument("input", help="JSONL: {custom_id, method, url, body} per line")
    batch.add_argument("-o", "--output", required=True, help="JSONL results (OpenAI's batch output line format)")
    batch.add_argument("--concurrency", type=int, default=None, help="lines in flight (default: --max-num-seqs)")
    batch.add_argument("--max-batch-file-bytes", type=parse_bytes, default=200 << 20)
    batch.add_argument("--max-batch-lines", type=int, default=50_000)
    batch.add_argument("--max-line-bytes", type=parse_bytes, default=4 << 20)
    batch.add_argument("--max-tokens-default", type=int, default=4096,
                       help="max_tokens of a line that gives none (default 4096)")
    batch.add_argument("--quiet", action="store_true", help="no progress bar")
    add_engine_options(batch)
    batch.set_defaults(func=cmd_batch)

    models = commands.add_parser("models", help="registered models: list them, or assemble and verify them from "
                                                "their installed part packages")
    models.add_argument("action", choices=("list", "assemble"))
    models.add_argument("names", nargs="*", help="registered model names (default: all)")
    models.set_defaults(func=cmd_models)

    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    from kvserve.bench.batch import add_batch_bench_options
    from kvserve.bench.cache import add_cache_options
    from kvserve.bench.offline import add_offline_options
    from kvserve.bench.perplexity import add_perplexity_options
    from kvserve.bench.step import add_step_options

    engine_benches = [  # (name, help, its own options, command): each also takes the engine options
        ("offline", "seeded offline throughput workload", add_offline_options, cmd_bench_offline),
        ("cache", "time to first token of a prompt-cache hit vs a miss", add_cache_options, cmd_bench_cache),
        ("step", "decode step time by batch size, and its host (Python) share", add_step_options, cmd_bench_step),
        ("perplexity", "perplexity of a fixed text (quality check for --quantization)", add_perplexity_options,
         cmd_bench_perplexity),
        ("batch", "batch jobs: throughput against the engine's own, and beside interactive traffic",
         add_batch_bench_options, cmd_bench_batch),
    ]
    for name, help_text, add_options, command in engine_benches:
        sub = bench.add_parser(name, help=help_text)
        add_options(sub)
        add_engine_options(sub)
        sub.set_defaults(func=command)

    kernels_bench = bench.add_parser("kernels", help="few-row weight matmuls of one layer, every way this CPU runs "
                                                     "them (kvserve's int4/int8 kernels, torch's, bf16, fp32)")
    from kvserve.bench.kernels import add_kernels_options

    add_kernels_options(kernels_bench)
    kernels_bench.set_defaults(func=cmd_bench_kernels)

    serve_bench = bench.add_parser("serve", help="seeded load on any OpenAI-compatible server (streamed chat)")
    from kvserve.bench.serve import add_serve_options

    add_serve_options(serve_bench)
    serve_bench.set_defaults(func=cmd_bench_serve)

    soak = bench.add_parser("soak", help="mixed traffic with aborts and disconnects, then leaks, RSS, 5xx and lost "
                                         "requests are checked")
    from kvserve.bench.soak import add_soak_options

    add_soak_options(soak)
    soak.set_defaults(func=cmd_bench_soak)

    sched = bench.add_parser("sched", help="scheduling policies against each other: mixed priorities, cache-aware "
                                           "order, tenants' fair shares, swap vs recompute")
    from kvserve.bench.sched import add_sched_options

    add_sched_options(sched)
    sched.set_defaults(func=cmd_bench_sched)

    replicas = bench.add_parser("replicas", help="cache-aware routing over engine replicas (Ray Serve) against Ray's "
                                                 "power of two choices: prefix hit rate, TTFT, tokens/s")
    from kvserve.bench.replicas import add_replicas_options

    add_replicas_options(replicas)
    replicas.set_defaults(func=cmd_bench_replicas)

    routing = bench.add_parser("routing", help="the labelled set through small-only, large-only, routing before "
                                               "generation and routing with escalation: accuracy, cost, TTFT")
    from kvserve.bench.routing import add_routing_options

    add_routing_options(routing)
    routing.set_defaults(func=cmd_bench_routing)

    compare = bench.add_parser("compare", help="kvserve vs llama-server (or a second kvserve), same model and workload")
    from kvserve.bench.compare import add_compare_options

    add_compare_options(compare)
    compare.set_defaults(func=cmd_bench_compare)
    return parser


def cmd_bench_replicas(args: argparse.Namespace) -> int:
    from kvserve.bench.replicas import run_replicas_bench

    return run_replicas_bench(args)


def cmd_bench_sched(args: argparse.Namespace) -> int:
    from kvserve.bench.sched import run_sched_bench

    return run_sched_bench(args)


def cmd_bench_routing(args: argparse.Namespace) -> int:
    from kvserve.bench.routing import run_routing_bench

    return run_routing_bench(args)


def cmd_models(args: argparse.Namespace) -> int:
    """`list`: each registered model and whether its verified file is in the models directory;
    `assemble`: build (or re-verify) each one from its installed parts, with a progress bar."""
    from tqdm import tqdm

    from kvserve.model import registry

    unknown = [name for name in args.names if name not in registry.REGISTRY]
    if unknown:
        raise ConfigError(f"unknown model(s) {', '.join(unknown)}; registered: {', '.join(registry.REGISTRY)}")
    chosen = [registry.REGISTRY[name] for name in args.names or registry.REGISTRY]
    for model in chosen:
        path = registry.models_dir() / model.filename
        if args.action == "list":
            state = "assembled" if path.exists() else "not assembled"
            print(f"{model.name:18} {model.size / 1e9:5.2f} GB  {model.title}, {model.license}; {state} ({path})")
            continue
        with tqdm(total=model.size, unit="B", unit_scale=True, desc=model.name) as bar:
            try:
                path = registry.resolve(model, progress=bar.update)
            except registry.ModelIntegrityError as error:
                raise ConfigError(str(error)) from None
        print(f"{model.name}: {path} (SHA-256 verified)")
    return 0


SERVE_ARGS_ENV = "KVSERVE_SERVE_ARGS"


def with_serve_args(argv: list[str], environ=os.environ) -> list[str]:
    """`kvserve serve` takes more options from $KVSERVE_SERVE_ARGS (shell words), after its own:
    the way to configure a container that is started as `IMAGE serve` (SageMaker passes no arguments,
    only environment variables)."""
    extra = environ.get(SERVE_ARGS_ENV, "").strip()
    if not extra or not argv or argv[0] != "serve":
        return argv
    try:
        return [*argv, *shlex.split(extra)]
    except ValueError as error:
        raise SystemExit(f"kvserve: error: ${SERVE_ARGS_ENV} is not a list of shell words: {error}") from None


def main(argv: list[str] | None = None) -> int:
    from kvserve import cpu_features

    try:   # KVSERVE_CPU_ISA caps torch's kernels too: set before anything imports torch
        cpu_features.cap_torch()
    except ConfigError as error:
        logging.getLogger("kvserve").warning("%s", error)
    cpu_features.use_huge_pages()   # likewise read when torch loads
    args = build_parser().parse_args(with_serve_args(sys.argv[1:] if argv is None else list(argv)))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kvserve.startup").setLevel(logging.INFO)   # what each model runs with, always said
    try:
        return args.func(args)
    except (ConfigError, InvalidRequestError, ValueError, FileNotFoundError) as error:
        print(f"kvserve: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
