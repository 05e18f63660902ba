"""Paged attention in plain torch: gather each sequence's context by block table, then SDPA.

Clarity first: one SDPA call per sequence, so prefill chunks, prefix-cache continuations and
decodes mix freely in one batch. Runs on CPU and CUDA, and is the oracle for faster kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvserve.attention.backend import AttentionMetadata, KVCache, write_kv


def gather_context(kv_cache: KVCache, block_ids: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of positions 0..seq_len-1 of one sequence, each [seq_len, num_kv_heads, head_dim]."""
    k_cache, v_cache = kv_cache
    block_size = k_cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    ids = block_ids[:num_blocks]
    keys = k_cache[ids].flatten(0, 1)[:seq_len]
    values = v_cache[ids].flatten(0, 1)[:seq_len]
    return keys, values


def causal_mask(num_queries: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """[num_queries, seq_len] bool: query j sits at position seq_len - num_queries + j."""
    query_positions = torch.arange(seq_len - num_queries, seq_len, device=device)
    return torch.arange(seq_len, device=device)[None, :] <= query_positions[:, None]


class TorchPagedAttention:
    name = "torch"

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: KVCache,
                metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        write_kv(key, value, kv_cache, metadata.slot_mapping)
        out = torch.empty_like(query)                                  # [num_tokens, num_heads, head_dim]
        starts = metadata.query_start_loc_host
        for i, seq_len in enumerate(metadata.seq_lens_host):
            start, end = starts[i], starts[i + 1]
            keys, values = gather_context(kv_cache, metadata.block_table[i], seq_len)
            q = query[start:end].transpose(0, 1)                       # [num_heads, n, head_dim]
            k = keys.transpose(0, 1).to(q.dtype)                       # [num_kv_heads, seq_len, head_dim]
            v = values.transpose(0, 1).to(q.dtype)
            num_queries = end - start
            mask = None if num_queries == 1 else causal_mask(num_queries, seq_len, q.device)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
            out[start:end] = o.transpose(0, 1)
        return out
