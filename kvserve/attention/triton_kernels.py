"""Triton kernels of the `triton` attention backend (kvserve/attention/triton_backend.py).

Both read and write the paged KV cache in place, through the block table: nothing is gathered,
nothing is padded to the longest sequence, and there is no per-shape plan on the host.

- `write_kv`: this step's keys and values into their cache slots (a slot below 0 is skipped: a
  padded row of a captured batch).
- `paged_attention`: every query token of a flat batch (prefill chunks, chunks after a prefix hit,
  and decode rows, mixed in one launch) attends to positions 0..p of its own sequence. One program
  takes a tile of BLOCK_M query tokens of one sequence and the GROUP query heads that share one KV
  head (GQA), so each key and value is loaded once for all of them; keys are visited in tiles of
  BLOCK_N positions, their cache rows found through the block table position by position (any
  block size), with an online softmax in fp32. `SPLITS` > 1 divides a sequence's keys between
  programs (long contexts, few sequences: decode), each writing its partial output with its
  running max and sum, and `_merge_splits` combines them.

In fp32 the dot products run in IEEE fp32 (not TF32), so that greedy output can equal the
reference's. The kernels run on the CPU under `TRITON_INTERPRET=1` (the parity tests do).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh, stride_cs, stride_ch,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slot_ptr + token)
    if slot >= 0:
        d = tl.arange(0, BLOCK_D)
        mask = d < HEAD_DIM
        k = tl.load(key_ptr + token * stride_kt + head * stride_kh + d, mask=mask)
        v = tl.load(value_ptr + token * stride_vt + head * stride_vh + d, mask=mask)
        target = slot * stride_cs + head * stride_ch + d
        tl.store(k_cache_ptr + target, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + target, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(key, value, k_cache, v_cache, slot_mapping) -> None:
    """key/value [tokens, kv_heads, head_dim] → k_cache/v_cache [blocks, block_size, kv_heads, head_dim]."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    assert k_cache.stride(1) == v_cache.stride(1) and k_cache.stride(2) == v_cache.stride(2)
    assert key.stride(2) == 1 and value.stride(2) == 1 and k_cache.stride(3) == 1
    _write_kv_kernel[(num_tokens, num_kv_heads)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1), k_cache.stride(1), k_cache.stride(2),
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim))


@triton.jit
def _paged_attention_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_ptr, stats_ptr,
                            query_start_ptr, seq_lens_ptr, block_table_ptr, scale, num_heads,
                            stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_cs, stride_ch,
                            stride_bt, block_size,
                            GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                            BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            SPLITS: tl.constexpr, IEEE: tl.constexpr):
    seq = tl.program_id(0)
    tile_and_split = tl.program_id(1)
    kv_head = tl.program_id(2)
    tile = tile_and_split // SPLITS
    split = tile_and_split % SPLITS
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    if tile * BLOCK_M < q_len:
        seq_len = tl.load(seq_lens_ptr + seq)
        context = seq_len - q_len                      # positions already cached before this chunk
        # Rows: BLOCK_M tokens x GROUP_PAD heads of the KV head's group, token-major.
        rows = tl.arange(0, BLOCK_M * GROUP_PAD)
        m = tile * BLOCK_M + rows // GROUP_PAD          # the token's index in its chunk
        g = rows % GROUP_PAD
        row_valid = (m < q_len) & (g < GROUP)
        head = kv_head * GROUP + g
        d = tl.arange(0, BLOCK_D)
        d_valid = d < HEAD_DIM
        q = tl.load(q_ptr + (q_start + m)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                    mask=row_valid[:, None] & d_valid[None, :], other=0.0)
        position = context + m                           # each row's position in its sequence
        # The keys this tile needs: 0 .. the last row's position; this split's share of them.
        last = context + tl.minimum(tile * BLOCK_M + BLOCK_M, q_len)   # exclusive
        per_split = tl.cdiv(tl.cdiv(last, SPLITS), BLOCK_N) * BLOCK_N
        begin = split * per_split
        end = tl.minimum(last, begin + per_split)
        running_max = tl.full([BLOCK_M * GROUP_PAD], float("-inf"), tl.float32)
        running_sum = tl.zeros([BLOCK_M * GROUP_PAD], tl.float32)
        acc = tl.zeros([BLOCK_M * GROUP_PAD, BLOCK_D], tl.float32)
        for start in range(begin, end, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_valid = n < end
            block = tl.load(block_table_ptr + seq * stride_bt + n // block_size, mask=n_valid, other=0)
            offset = block.to(tl.int64) * stride_cb + (n % block_size) * stride_cs + kv_head * stride_ch
            kv_mask = n_valid[:, None] & d_valid[None, :]
            k = tl.load(k_cache_ptr + offset[:, None] + d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_cache_ptr + offset[:, None] + d[None, :], mask=kv_mask, other=0.0)
            if IEEE:
                scores = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                scores = tl.dot(q, tl.trans(k).to(q.dtype))
            scores = scores * scale
            visible = n_valid[None, :] & (n[None, :] <= position[:, None])
            scores = tl.where(visible, scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, 1))
            # Rows that have seen no key yet keep -inf; exp(-inf - -inf) would be nan.
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            p = tl.exp(scores - safe_max[:, None])
            correction = tl.exp(running_max - safe_max)
            running_sum = running_sum * correction + tl.sum(p, 1)
            if IEEE:
                acc = acc * correction[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v)
            running_max = new_max
        token = q_start + m
        if SPLITS == 1:
            result = acc / tl.where(running_sum == 0.0, 1.0, running_sum)[:, None]
            tl.store(out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                     result.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :])
        else:   # partial: [tokens, heads, SPLITS, BLOCK_D] and (max, sum) per split
            base = (token * num_heads + head) * SPLITS + split
            tl.store(part_ptr + base[:, None] * BLOCK_D + d[None, :], acc, mask=row_valid[:, None])
            tl.store(stats_ptr + base * 2, running_max, mask=row_valid)
            tl.store(stats_ptr + base * 2 + 1, running_sum, mask=row_valid)


@triton.jit
def _merge_splits_kernel(part_ptr, stats_ptr, out_ptr, stride_ot, stride_oh, num_heads,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr):
    token = tl.program_id(0)
    head = tl.program_id(1)
    base = (token * num_heads + head) * SPLITS
    s = tl.arange(0, SPLITS)
    maxima = tl.load(stats_ptr + (base + s) * 2)
    sums = tl.load(stats_ptr + (base + s) * 2 + 1)
    top = tl.max(maxima, 0)
    weights = tl.where(maxima == float("-inf"), 0.0, tl.exp(maxima - top))
    total = tl.sum(sums * weights, 0)
    total = tl.where(total == 0.0, 1.0, total)   # a padded row (context 0) saw no key: zeros, not nan
    d = tl.arange(0, BLOCK_D)
    parts = tl.load(part_ptr + (base + s)[:, None] * BLOCK_D + d[None, :])
    result = tl.sum(parts * weights[:, None], 0) / total
    tl.store(out_ptr + token * stride_ot + head * stride_oh + d, result.to(out_ptr.dtype.element_ty),
             mask=d < HEAD_DIM)


def paged_attention(query, k_cache, v_cache, out, query_start_loc, seq_lens, block_table, scale: float,
                    max_query_len: int, splits: int = 1, block_m: int | None = None, block_n: int = 32) -> None:
    """query/out [tokens, heads, head_dim]; caches [blocks, block_size, kv_heads, head_dim];
    query_start_loc [seqs + 1], seq_lens [seqs], block_table [seqs, max_blocks] (int32 or int64).
    `splits` (a power of 2): programs per sequence over its keys (then a merge)."""
    import torch

    num_tokens, num_heads, head_dim = query.shape
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    block_d = max(16, triton.next_power_of_2(head_dim))
    if block_m is None:   # at least 16 rows for the dot products; a decode-only batch needs one token a tile
        block_m = max(1, 16 // group_pad) if max_query_len == 1 else max(16 // group_pad, 64 // group_pad, 1)
    tiles = triton.cdiv(max_query_len, block_m)
    # fp32: IEEE dot products (not TF32). The interpreter's bf16 dot products are wrong (triton
    # 3.6): interpreted, bf16 inputs are widened to fp32 first.
    ieee = query.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"
    assert query.stride(2) == 1 and out.stride(2) == 1 and k_cache.stride(3) == 1
    assert k_cache.stride() == v_cache.stride()
    part = stats = out
    if splits > 1:
        part = torch.empty((num_tokens, num_heads, splits, block_d), dtype=torch.float32, device=query.device)
        stats = torch.empty((num_tokens, num_heads, splits, 2), dtype=torch.float32, device=query.device)
    _paged_attention_kernel[(num_seqs, tiles * splits, num_kv_heads)](
        query, k_cache, v_cache, out, part, stats, query_start_loc, seq_lens, block_table, scale, num_heads,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0), k_cache.shape[1],
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m,
        BLOCK_N=block_n, SPLITS=splits, IEEE=ieee)
    if splits > 1:
        _merge_splits_kernel[(num_tokens, num_heads)](part, stats, out, out.stride(0), out.stride(1), num_heads,
                                                      HEAD_DIM=head_dim, BLOCK_D=block_d, SPLITS=splits)
