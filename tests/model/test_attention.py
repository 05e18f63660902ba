"""Paged attention (gather by block table + SDPA, and the C++ CPU decode kernel) equals dense
causal attention."""

import random

import pytest
import torch

from kvserve.attention.backend import AttentionMetadata
from kvserve.attention import cpu_kernels
from kvserve.attention.cpu import CpuPagedAttention
from kvserve.attention.torch_ref import TorchPagedAttention
from kvserve.cpu_features import available_levels


def make_backend(name: str):
    if name == "torch":
        return TorchPagedAttention()
    kernels = cpu_kernels.load()
    assert kernels is not None, "the C++ CPU kernel must build on this machine (g++ is a dependency of make test)"
    return CpuPagedAttention(kernels)


def dense_attention(q, k, v, scale):
    """q [n, H, D] at positions L-n..L-1; k, v [L, KVH, D]. Plain math, no SDPA."""
    n, num_heads, _ = q.shape
    seq_len, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    q_pos = torch.arange(seq_len - n, seq_len)[:, None]
    scores = scores.masked_fill(torch.arange(seq_len)[None, :] > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("seed", range(24))
@pytest.mark.parametrize("decode_only", [False, True])     # True: the CPU backend's one-call decode step
def test_paged_equals_dense_for_random_tables_and_mixed_batches(seed, backend, decode_only):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    block_size = rng.choice([1, 2, 4, 8, 16, 32])        # 32: the kernel splits a block into tiles
    num_kv_heads = rng.choice([1, 2, 3])
    num_heads = num_kv_heads * rng.choice([1, 2, 3, 5])      # 5: the kernel's run-time group size
    head_dim = rng.choice([8, 16, 32, 64])               # 8: the portable path; 32: run-time head_dim
    num_blocks = 64
    k_cache = torch.zeros(num_blocks, block_size, num_kv_heads, head_dim)
    v_cache = torch.zeros_like(k_cache)
    free = list(range(num_blocks))
    rng.shuffle(free)

    # Each sequence: a context already in the cache, plus a chunk of new tokens this step.
    # Chunk shapes cover prefill from 0, continued prefill, prefix hit + suffix, and decode.
    seqs = []
    for _ in range(rng.randint(1, 5)):
        cached = rng.choice([0, 0, rng.randint(1, 30)])
        new = rng.choice([1, 1, rng.randint(1, 20)])
        if decode_only:
            cached, new = cached + new - 1, 1
        seq_len = cached + new
        nb = -(-seq_len // block_size)
        if nb > len(free):
            break
        blocks = [free.pop() for _ in range(nb)]
        full_k = torch.randn(seq_len, num_kv_heads, head_dim)
        full_v = torch.randn(seq_len, num_kv_heads, head_dim)
        for p in range(cached):   # pre-fill the cache with the cached context
            k_cache[blocks[p // block_size], p % block_size] = full_k[p]
            v_cache[blocks[p // block_size], p % block_size] = full_v[p]
        q = torch.randn(new, num_heads, head_dim)
        seqs.append((cached, new, blocks, full_k, full_v, q))

    max_blocks = max(len(s[2]) for s in seqs)
    qsl, slots, table = [0], [], []
    for cached, new, blocks, *_ in seqs:
        qsl.append(qsl[-1] + new)
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(cached, cached + new)]
        table.append(blocks + [0] * (max_blocks - len(blocks)))
    seq_lens = [c + n for c, n, *_ in seqs]
    meta = AttentionMetadata(torch.tensor(slots), torch.tensor(qsl), torch.tensor(seq_lens), torch.tensor(table),
                             block_size, tuple(qsl), tuple(seq_lens))
    q = torch.cat([s[5] for s in seqs])
    k_new = torch.cat([s[3][s[0]:] for s in seqs])
    v_new = torch.cat([s[4][s[0]:] for s in seqs])
    scale = head_dim ** -0.5
    out = make_backend(backend).forward(q, k_new, v_new, (k_cache, v_cache), meta, scale)
    for i, (cached, new, blocks, full_k, full_v, q_i) in enumerate(seqs):
        expected = dense_attention(q_i, full_k, full_v, scale)
        torch.testing.assert_close(out[qsl[i]:qsl[i + 1]], expected, rtol=1e-5, atol=1e-5)
        # and the new keys landed in their slots
        for p in range(cached, cached + new):
            torch.testing.assert_close(k_cache[blocks[p // block_size], p % block_size], full_k[p])
            torch.testing.assert_close(v_cache[blocks[p // block_size], p % block_size], full_v[p])


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_cpu_decode_kernel_matches_reference_on_long_contexts(cache_dtype):
    """Many decode rows of different lengths (up to several hundred tokens, scattered blocks):
    the kernel reads the cache in place and equals the reference's gather + SDPA in fp32."""
    torch.manual_seed(0)
    block_size, num_kv_heads, num_heads, head_dim, num_blocks = 16, 3, 9, 64, 400
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim).to(cache_dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim).to(cache_dtype)
    seq_lens = [1, 2, 15, 16, 17, 100, 333, 700]
    free = torch.randperm(num_blocks).tolist()
    max_blocks = -(-max(seq_lens) // block_size)
    table, slots = [], []
    for n in seq_lens:
        blocks = [free.pop() for _ in range(-(-n // block_size))]
        table.append(blocks + [0] * (max_blocks - len(blocks)))
        slots.append(blocks[(n - 1) // block_size] * block_size + (n - 1) % block_size)
    qsl = list(range(len(seq_lens) + 1))
    meta = AttentionMetadata(torch.tensor(slots), torch.tensor(qsl), torch.tensor(seq_lens), torch.tensor(table),
                             block_size, tuple(qsl), tuple(seq_lens))
    q = torch.randn(len(seq_lens), num_heads, head_dim)
    k = torch.randn(len(seq_lens), num_kv_heads, head_dim)
    v = torch.randn(len(seq_lens), num_kv_heads, head_dim)
    expected = TorchPagedAttention(torch.float32).forward(q, k, v, (k_cache.clone(), v_cache.clone()), meta, 0.125)
    got = make_backend("cpu").forward(q, k, v, (k_cache, v_cache), meta, 0.125)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_cpu_decode_kernel_rejects_bad_inputs():
    kernels = cpu_kernels.load()
    k = torch.zeros(4, 16, 1, 8)
    with pytest.raises(RuntimeError, match="seq_len"):
        kernels.paged_decode(torch.zeros(1, 2, 8), k, k, torch.zeros(1, 1, dtype=torch.long),
                             torch.tensor([17]), 1.0)
    with pytest.raises(RuntimeError, match="float32"):
        kernels.paged_decode(torch.zeros(1, 2, 8, dtype=torch.float64), k, k, torch.zeros(1, 1, dtype=torch.long),
                             torch.tensor([1]), 1.0)


def test_cpu_decode_kernel_rejects_block_ids_outside_the_cache():
    kernels = cpu_kernels.load()
    k = torch.zeros(4, 16, 1, 8)
    with pytest.raises(RuntimeError, match="block id"):
        kernels.paged_decode(torch.zeros(1, 2, 8), k, k, torch.tensor([[4]]), torch.tensor([3]), 1.0)


def test_cpu_decode_step_rejects_bad_inputs():
    kernels = cpu_kernels.load()
    k_cache = torch.zeros(4, 16, 1, 8)
    q, kv = torch.zeros(1, 2, 8), torch.zeros(1, 1, 8)
    table, lens = torch.zeros(1, 1, dtype=torch.long), torch.tensor([1])
    with pytest.raises(RuntimeError, match="slot out of"):
        kernels.decode_step(q, kv, kv, k_cache, k_cache.clone(), torch.tensor([64]), table, lens, 1.0)
    with pytest.raises(RuntimeError, match="cache's dtype"):
        kernels.decode_step(q, kv.bfloat16(), kv.bfloat16(), k_cache, k_cache.clone(), torch.tensor([0]), table, lens, 1.0)
    with pytest.raises(RuntimeError, match="one slot per token"):
        kernels.decode_step(q, kv, kv, k_cache, k_cache.clone(), torch.tensor([0, 1]), table, lens, 1.0)


@pytest.mark.parametrize("level", available_levels())
# groups 1, 2, 3, 6 and 7 (SmolLM2 and the Qwen pair) at head_dim 64 and 128 take the AVX2 path's
# variants built for their group; 10 takes its run-time group; 32, 80 and 12 other widths
@pytest.mark.parametrize("head_dim,num_heads,num_kv_heads", [(64, 9, 3), (128, 4, 2), (64, 14, 2), (128, 12, 2),
                                                             (64, 2, 2), (64, 10, 1), (32, 2, 2), (80, 4, 1),
                                                             (12, 2, 1)])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_every_decode_kernel_path_equals_the_torch_spec(level, head_dim, num_heads, num_kv_heads, cache_dtype):
    """Each instruction-set path the CPU can run (KVSERVE_CPU_ISA picks one at run time: an AVX-512
    machine also runs the AVX2 and portable ones), on shapes that take the specialised and generic
    variants (head_dim 64 and 128, any multiple of 8 or 16, and others, which go portable)."""
    from kvserve.cpu_features import LEVELS

    kernels = cpu_kernels.load()
    assert kernels is not None
    torch.manual_seed(head_dim + num_heads)
    block_size, num_blocks = 16, 64
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim).to(cache_dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim).to(cache_dtype)
    seq_lens = [1, 7, 16, 33, 250]
    free = torch.randperm(num_blocks).tolist()
    max_blocks = -(-max(seq_lens) // block_size)
    table = []
    for n in seq_lens:
        blocks = [free.pop() for _ in range(-(-n // block_size))]
        table.append(blocks + [0] * (max_blocks - len(blocks)))
    query = torch.randn(len(seq_lens), num_heads, head_dim)
    scale = head_dim ** -0.5
    expected = []
    for i, n in enumerate(seq_lens):
        rows = torch.tensor([table[i][t // block_size] * block_size + t % block_size for t in range(n)])
        k = k_cache.reshape(-1, num_kv_heads, head_dim)[rows].float()
        v = v_cache.reshape(-1, num_kv_heads, head_dim)[rows].float()
        expected.append(dense_attention(query[i:i + 1], k, v, scale)[0])
    before = kernels.get_isa()
    kernels.set_isa(LEVELS.index(level))
    try:
        got = kernels.paged_decode(query, k_cache, v_cache, torch.tensor(table), torch.tensor(seq_lens), scale)
    finally:
        kernels.set_isa(before)
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("level", available_levels())
@pytest.mark.parametrize("head_dim,num_heads,num_kv_heads,block_size", [(64, 9, 3, 16), (128, 4, 2, 8), (64, 4, 1, 32),
                                                                         (32, 2, 2, 16)])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_every_prefill_kernel_path_equals_the_torch_spec(level, head_dim, num_heads, num_kv_heads, block_size,
                                                         cache_dtype):
    """prefill_attention on each instruction-set path (head_dim 64 and 128 take the vector path, 32
    the portable one): chunks from position 0 and after a cached context, longer than one tile of
    queries and of keys, some not multiples of either, in one call; rows outside chunks untouched."""
    from kvserve.cpu_features import LEVELS

    kernels = cpu_kernels.load()
    torch.manual_seed(head_dim + num_heads)
    num_blocks = 2 * 768 // block_size        # block sizes 8 and 32: key tiles cut by blocks, or within them
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim).to(cache_dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim).to(cache_dtype)
    # (tokens cached before, chunk length)
    shapes = [(0, 1), (0, 37), (5, 16), (40, 3), (100, 70), (0, 250)]
    free = torch.randperm(num_blocks).tolist()
    max_blocks = -(-max(c + n for c, n in shapes) // block_size)
    table, chunks, start = [], [], 1               # query row 0 is not in any chunk
    for i, (cached, n) in enumerate(shapes):
        blocks = [free.pop() for _ in range(-(-(cached + n) // block_size))]
        table.append(blocks + [0] * (max_blocks - len(blocks)))
        chunks.append((i, start, start + n, cached + n))
        start += n
    query = torch.randn(start, num_heads, head_dim)
    scale = head_dim ** -0.5
    expected = torch.full_like(query, 7.0)
    for i, s, e, seq_len in chunks:
        rows = torch.tensor([table[i][t // block_size] * block_size + t % block_size for t in range(seq_len)])
        k = k_cache.reshape(-1, num_kv_heads, head_dim)[rows].float()
        v = v_cache.reshape(-1, num_kv_heads, head_dim)[rows].float()
        expected[s:e] = dense_attention(query[s:e], k, v, scale)
    before = kernels.get_isa()
    kernels.set_isa(LEVELS.index(level))
    try:
        got = torch.full_like(query, 7.0)
        kernels.prefill_attention(query, k_cache, v_cache, torch.tensor(table), torch.tensor(chunks), scale, got)
    finally:
        kernels.set_isa(before)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_prefill_kernel_rejects_bad_chunks():
    kernels = cpu_kernels.load()
    k_cache = torch.zeros(4, 4, 1, 8)
    query, out = torch.zeros(6, 2, 8), torch.zeros(6, 2, 8)
    table = torch.tensor([[0, 1]])
    with pytest.raises(RuntimeError, match="query rows out of range"):
        kernels.prefill_attention(query, k_cache, k_cache, table, torch.tensor([[0, 2, 9, 8]]), 1.0, out)
    with pytest.raises(RuntimeError, match="context length out of range"):
        kernels.prefill_attention(query, k_cache, k_cache, table, torch.tensor([[0, 0, 6, 9]]), 1.0, out)
    with pytest.raises(RuntimeError, match="block-table row out of range"):
        kernels.prefill_attention(query, k_cache, k_cache, table, torch.tensor([[1, 0, 6, 6]]), 1.0, out)
    with pytest.raises(RuntimeError, match="block id out of the cache's range"):
        kernels.prefill_attention(query, k_cache, k_cache, torch.tensor([[0, 5]]), torch.tensor([[0, 0, 6, 6]]), 1.0, out)
    with pytest.raises(RuntimeError, match="chunks must be"):
        kernels.prefill_attention(query, k_cache, k_cache, table, torch.tensor([[0, 0, 6]]), 1.0, out)
