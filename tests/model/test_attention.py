"""Paged attention (gather by block table + SDPA) equals dense causal attention."""

import random

import pytest
import torch

from kvserve.attention.backend import AttentionMetadata
from kvserve.attention.torch_ref import TorchPagedAttention


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


@pytest.mark.parametrize("seed", range(12))
def test_paged_equals_dense_for_random_tables_and_mixed_batches(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    block_size = rng.choice([1, 2, 4, 8, 16])
    num_kv_heads = rng.choice([1, 2, 3])
    num_heads = num_kv_heads * rng.choice([1, 2, 3])
    head_dim = rng.choice([8, 16])
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
    out = TorchPagedAttention().forward(q, k_new, v_new, (k_cache, v_cache), meta, scale)
    for i, (cached, new, blocks, full_k, full_v, q_i) in enumerate(seqs):
        expected = dense_attention(q_i, full_k, full_v, scale)
        torch.testing.assert_close(out[qsl[i]:qsl[i + 1]], expected, rtol=1e-5, atol=1e-5)
        # and the new keys landed in their slots
        for p in range(cached, cached + new):
            torch.testing.assert_close(k_cache[blocks[p // block_size], p % block_size], full_k[p])
