"""`kvserve bench kernels`: the few-row weight matmuls of one decoder layer, each way kvserve can
run them on this CPU, in the same run: kvserve's int4 and int8 kernels, torch's int4 kernel, the
prepacked bf16 matmul and `F.linear` in fp32 and bf16.

One layer of --shape (default: SmolLM2-135M's qkv, o, gate/up and down projections), random weights
(--seed), each call repeated; µs per layer, for each row count. The weights of one layer fit in
the L2/L3 caches of most server CPUs, so this measures the arithmetic; a decode step reads the
whole model from memory (`kvserve bench step` measures that). `KVSERVE_CPU_ISA=avx2|portable`
runs the lower paths, torch's kernels capped too. One JSON line last.
"""

from __future__ import annotations

import argparse
import json
import time

SMOLLM2_LAYER = "960x576,576x576,3072x576,576x1536"


def add_kernels_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", default="1,2,4,8", help="comma-separated row counts (at most 8)")
    parser.add_argument("--shape", default=SMOLLM2_LAYER,
                        help="comma-separated OUTxIN weight shapes of one layer (IN a multiple of 32)")
    parser.add_argument("--repeats", type=int, default=200, help="timed calls of each matmul")
    parser.add_argument("--seed", type=int, default=0)


def _time(fn, repeats: int) -> float:
    for _ in range(max(3, repeats // 20)):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e6


def _candidates(kernels, weight, rows: int, generator) -> dict:
    import torch

    from kvserve.model.packed import pack_weight, packed_linear
    from kvserve.model.quant import INT4_GROUP, Int4Linear, Int8Linear, quantize_groups_q4

    x32 = torch.randn(rows, weight.shape[1], generator=generator)
    x16 = x32.bfloat16()
    int4 = Int4Linear.quantize(weight, dtype=torch.float32)
    int8 = Int8Linear.quantize(weight, dtype=torch.float32)
    w16 = weight.bfloat16()
    found = {"fp32 F.linear": lambda: torch.nn.functional.linear(x32, weight),
             "bf16 F.linear": lambda: torch.nn.functional.linear(x16, w16)}
    if kernels is not None:
        found["kvserve int4, fp32 in"] = lambda: kernels.int4_matmul(x32, int4.qs, int4.dm)
        found["kvserve int4, bf16 in"] = lambda: kernels.int4_matmul(x16, int4.qs, int4.dm)
        found["kvserve int8, fp32 in"] = lambda: kernels.int8_matmul(x32, int8.weight, int8.scale)
    packed = pack_weight(w16)
    if packed is not None:
        found["bf16 prepacked"] = lambda: packed_linear(x16, packed)
    try:
        q, d, m = quantize_groups_q4(weight)
        torch_int4 = torch._convert_weight_to_int4pack_for_cpu(q.contiguous(), 2)
        scales = torch.stack([d.t(), (m + 8 * d).t()], dim=-1).bfloat16().contiguous()
        torch._weight_int4pack_mm_for_cpu(x16, torch_int4, INT4_GROUP, scales)
        found["torch int4, bf16 in"] = lambda: torch._weight_int4pack_mm_for_cpu(x16, torch_int4, INT4_GROUP, scales)
    except (AttributeError, RuntimeError):
        pass
    return found


def run_kernels_bench(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from kvserve import cpu_features
    from kvserve.attention import cpu_kernels

    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shape.split(",")]
    rows_list = [int(r) for r in args.rows.split(",")]
    if any(not 1 <= r <= 8 for r in rows_list):
        raise ValueError("--rows: each row count must be between 1 and 8")
    if any(len(s) != 2 or s[1] % 32 or s[1] < 32 or s[0] % 16 or s[0] < 16 for s in shapes):
        raise ValueError("--shape: OUTxIN with OUT a multiple of 16 and IN a multiple of 32, e.g. 960x576")
    kernels = cpu_kernels.load()
    generator = torch.Generator().manual_seed(args.seed)
    weights = [torch.randn(*shape, generator=generator) * 0.05 for shape in shapes]
    results = {}
    for rows in tqdm(rows_list, desc="row counts", unit="rows"):
        total: dict[str, float] = {}
        counted: dict[str, int] = {}
        for weight in weights:
            for name, fn in _candidates(kernels, weight, rows, generator).items():
                total[name] = total.get(name, 0.0) + _time(fn, args.repeats)
                counted[name] = counted.get(name, 0) + 1
        # a way that could not take every shape of the layer has no per-layer figure
        results[rows] = {name: round(us, 1) for name, us in total.items() if counted[name] == len(weights)}
    names = sorted({n for r in results.values() for n in r})
    print(f"µs per layer ({args.shape}), {torch.get_num_threads()} threads, kernels at {cpu_features.isa()}:")
    print(f"{'':24s}" + "".join(f"{r:>10d} rows" for r in rows_list))
    for name in names:
        print(f"{name:24s}" + "".join(f"{results[r].get(name, float('nan')):15.1f}" for r in rows_list))
    print(json.dumps({"bench": "kernels", "isa": cpu_features.isa(), "threads": torch.get_num_threads(),
                      "shape": args.shape, "seed": args.seed, "us_per_layer": results}))
    return 0
