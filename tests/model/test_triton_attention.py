"""The Triton attention kernels equal the torch reference (TorchPagedAttention, the spec), on tiny
shapes: random block tables and block sizes, prefix hits, prefill chunks mixed with decode rows,
GQA groups, head dims, and keys split between programs. Without CUDA they run on the CPU under
TRITON_INTERPRET=1 (set here before triton is imported). Skipped when triton is not installed."""

from __future__ import annotations

import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from conftest import tiny_checkpoint  # noqa: E402
from kvserve.attention.backend import AttentionMetadata, write_kv  # noqa: E402
from kvserve.attention.torch_ref import TorchPagedAttention  # noqa: E402
from kvserve.attention.triton_backend import TritonPagedAttention, choose_splits  # noqa: E402
from kvserve.attention import triton_kernels  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The interpreter converts 1-element arrays to ints, which numpy deprecates, once per scalar it reads.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def _batch(rng: random.Random, chunks: list[tuple[int, int]], block_size: int, num_blocks: int):
    """chunks: (cached context, new tokens) per sequence → metadata with shuffled block tables."""
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables, slots, starts, lens = [], [], [0], []
    width = max(-(-(c + n) // block_size) for c, n in chunks)
    for context, new in chunks:
        seq_len = context + new
        blocks = [free.pop() for _ in range(-(-seq_len // block_size))]
        tables.append(blocks + [0] * (width - len(blocks)))
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(context, seq_len)]
        starts.append(starts[-1] + new)
        lens.append(seq_len)
    as_tensor = lambda values: torch.tensor(values, dtype=torch.int64, device=DEVICE)  # noqa: E731
    return AttentionMetadata(as_tensor(slots), as_tensor(starts), as_tensor(lens), as_tensor(tables), block_size,
                             tuple(starts), tuple(lens))


def _case(seed: int, chunks, heads: int, kv_heads: int, head_dim: int, block_size: int,
          dtype=torch.float32, splits: int | None = None):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-(c + n) // block_size) for c, n in chunks) + 3
    metadata = _batch(rng, chunks, block_size, num_blocks)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    cache = [torch.randn(shape, generator=gen).to(dtype).to(DEVICE) for _ in range(2)]
    # The cached context: written for every sequence (positions before its chunk) as a prefix hit would hold.
    tokens = metadata.query_start_loc_host[-1]
    q = torch.randn((tokens, heads, head_dim), generator=gen).to(dtype).to(DEVICE)
    k = torch.randn((tokens, kv_heads, head_dim), generator=gen).to(dtype).to(DEVICE)
    v = torch.randn((tokens, kv_heads, head_dim), generator=gen).to(dtype).to(DEVICE)
    scale = head_dim ** -0.5
    ref_cache = [c.clone() for c in cache]
    expected = TorchPagedAttention(torch.float32).forward(q, k, v, tuple(ref_cache), metadata, scale)
    tri_cache = [c.clone() for c in cache]
    if splits is None:
        got = TritonPagedAttention(DEVICE).forward(q, k, v, tuple(tri_cache), metadata, scale)
    else:
        triton_kernels.write_kv(k, v, *tri_cache, metadata.slot_mapping)
        got = torch.empty_like(q)
        starts = metadata.query_start_loc_host
        triton_kernels.paged_attention(q, *tri_cache, got, metadata.query_start_loc, metadata.seq_lens,
                                       metadata.block_table, scale, max(b - a for a, b in zip(starts, starts[1:])),
                                       splits=splits)
    assert torch.equal(tri_cache[0], ref_cache[0]) and torch.equal(tri_cache[1], ref_cache[1])   # the K/V write
    return got.float(), expected.float()


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [
    (4, 4, 16, 16),      # no GQA
    (4, 2, 16, 8),       # group 2, blocks smaller than a key tile
    (8, 1, 32, 16),      # group 8 (MQA-like)
    (6, 2, 64, 32),      # group 3 (padded to 4), head dim 64
    (2, 1, 128, 16),
    (2, 2, 256, 16),
])
def test_mixed_batches_equal_the_reference(heads, kv_heads, head_dim, block_size):
    # A fresh prefill, a chunk after a prefix hit, a one-token chunk after a hit, two decode rows.
    chunks = [(0, 21), (37, 9), (16, 1), (5, 1), (50, 1)]
    got, expected = _case(1, chunks, heads, kv_heads, head_dim, block_size)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_random_batches_equal_the_reference(seed):
    rng = random.Random(100 + seed)
    chunks = [(rng.choice([0, rng.randrange(1, 80)]), rng.choice([1, 1, rng.randrange(2, 40)]))
              for _ in range(rng.randrange(1, 6))]
    got, expected = _case(seed, chunks, heads=4, kv_heads=2, head_dim=16, block_size=rng.choice([4, 8, 16]))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("splits", [2, 4])
def test_decode_split_over_the_keys_equals_the_reference(splits):
    chunks = [(150, 1), (7, 1), (90, 1)]    # the short one leaves later splits without keys
    got, expected = _case(3, chunks, heads=4, kv_heads=2, head_dim=32, block_size=16, splits=splits)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_bf16_caches_and_queries_match_within_bf16():
    got, expected = _case(5, [(0, 17), (33, 1), (12, 5)], heads=4, kv_heads=2, head_dim=64, block_size=16,
                          dtype=torch.bfloat16)
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)


def test_a_negative_slot_is_not_written():
    cache = [torch.zeros((2, 4, 1, 16)) for _ in range(2)]
    key = torch.ones((2, 1, 16))
    triton_kernels.write_kv(key, key * 2, *cache, torch.tensor([5, -1]))
    assert cache[0].flatten(0, 1)[5].eq(1).all() and cache[1].flatten(0, 1)[5].eq(2).all()
    assert cache[0].sum() == 16 and cache[1].sum() == 32


def test_splits_fill_the_gpu_only_for_long_decode_batches():
    assert choose_splits(1, 8, 4096, 1, num_cores=132) == 8          # 8 programs → 8 splits of 512 keys
    assert choose_splits(1, 8, 100_000, 1, num_cores=132) == 16
    assert choose_splits(64, 8, 4096, 1, num_cores=132) == 1         # 512 programs already
    assert choose_splits(1, 8, 600, 1, num_cores=132) == 1           # too short to split
    assert choose_splits(1, 8, 4096, 7, num_cores=132) == 1          # a prefill chunk in the step


def _engine(backend: str, **scheduler):
    from kvserve.config import CacheConfig, EngineConfig, SchedulerConfig
    from kvserve.engine.engine import Engine

    config = EngineConfig(model="random:tiny", dtype="float32", device=DEVICE.type, attention_backend=backend,
                          cache=CacheConfig(num_blocks=256, block_size=8), scheduler=SchedulerConfig(**scheduler))
    return Engine(config, checkpoint=tiny_checkpoint())


def test_greedy_output_with_the_triton_backend_equals_the_reference_with_chunks_and_prefix_hits():
    from kvserve.sampling import SamplingParams

    shared = "A shared system prompt that every request starts with, long enough for blocks. "
    prompts = [shared + tail for tail in ("first question?", "a second, different one", "3")] + ["unrelated"]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    def run(engine) -> list[tuple[int, ...]]:
        outputs: dict[str, list[int]] = {}
        for round_ in range(2):          # the second round hits the prefix cache
            for i, prompt in enumerate(prompts):
                engine.add(prompt, params, request_id=f"{round_}-{i}")
            while engine.has_unfinished:
                for output in engine.step():
                    outputs.setdefault(output.request_id, []).extend(output.token_ids)
        engine.check_integrity()
        return [tuple(outputs[k]) for k in sorted(outputs)]

    triton_engine = _engine("triton", max_num_batched_tokens=32)     # chunked prefill, mixed steps
    assert triton_engine.core.runner.backend.name == "triton"
    expected = run(_engine("torch"))
    assert run(triton_engine) == expected
    assert triton_engine.stats().kv.prefix_hit_tokens > 0


def test_backend_choice_and_the_start_up_check(monkeypatch):
    from kvserve.attention import triton_backend
    from kvserve.runner.model_runner import make_attention_backend

    assert triton_backend.self_check(DEVICE) is None                  # the kernels agree with the reference
    assert triton_backend.self_check(DEVICE, torch.bfloat16) is None
    assert make_attention_backend("triton", DEVICE).name == "triton"
    if DEVICE.type == "cpu":
        assert make_attention_backend("auto", DEVICE).name != "triton"    # a CPU's auto: the C++ kernels or torch
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(ValueError, match="triton needs the triton package and a CUDA device"):
            make_attention_backend("triton", DEVICE)


def test_a_padded_row_gives_zeros_with_or_without_split_keys():
    gen = torch.Generator().manual_seed(9)
    cache = [torch.randn((4, 16, 1, 16), generator=gen).to(DEVICE) for _ in range(2)]
    q = torch.randn((2, 2, 16), generator=gen).to(DEVICE)
    as_tensor = lambda values: torch.tensor(values, dtype=torch.int64, device=DEVICE)  # noqa: E731
    for splits in (1, 4):
        out = torch.full_like(q, 7.0)
        triton_kernels.paged_attention(q, *cache, out, as_tensor([0, 1, 2]), as_tensor([50, 0]),
                                       as_tensor([[0, 1, 2, 3], [0, 0, 0, 0]]), 0.25, 1, splits=splits)
        assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isfinite(out[0]).all(), splits
