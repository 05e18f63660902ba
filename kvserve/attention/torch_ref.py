"""Paged attention in plain torch: gather context by block table, then SDPA.

Two paths, same math:
  - prefill chunks (more than one query token): one SDPA per sequence with a causal mask that
    is offset by the tokens already cached;
  - decode rows (one query token each): gathered together into a padded batch
        keys  [num_decodes, max_seq_len, kv_heads, head_dim]   (padding masked out)
    and attended in a single SDPA call.
Runs on CPU and CUDA, and is the oracle for faster kernels.

`compute_dtype` is the dtype attention runs in. On CPU it is fp32 even for a bf16 model: torch's
CPU SDPA is several times slower in bf16 than in fp32 at these shapes (see benchmarks.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvserve.attention.backend import AttentionMetadata, KVCache, write_kv


def gather_context(kv_cache: KVCache, block_ids: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of positions 0..seq_len-1 of one sequence, each [seq_len, num_kv_heads, head_dim]."""
    k_cache, v_cache = kv_cache
    block_size = k_cache.shape[1]
    ids = block_ids[:-(-seq_len // block_size)]
    return k_cache[ids].flatten(0, 1)[:seq_len], v_cache[ids].flatten(0, 1)[:seq_len]


def causal_mask(num_queries: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """[num_queries, seq_len] bool: query j sits at position seq_len - num_queries + j."""
    query_positions = torch.arange(seq_len - num_queries, seq_len, device=device)
    return torch.arange(seq_len, device=device)[None, :] <= query_positions[:, None]


class TorchPagedAttention:
    name = "torch"

    def __init__(self, compute_dtype: torch.dtype | None = None):
        """compute_dtype None: attend in the query's dtype."""
        self.compute_dtype = compute_dtype

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: KVCache,
                metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        write_kv(key, value, kv_cache, metadata.slot_mapping)
        dtype = self.compute_dtype or query.dtype
        out = torch.empty(query.shape, dtype=dtype, device=query.device)   # [num_tokens, num_heads, head_dim]
        starts = metadata.query_start_loc_host
        decodes = []
        for i, seq_len in enumerate(metadata.seq_lens_host):
            start, end = starts[i], starts[i + 1]
            if end - start == 1:
                decodes.append(i)
                continue
            keys, values = gather_context(kv_cache, metadata.block_table[i], seq_len)
            q = query[start:end].transpose(0, 1).to(dtype)             # [num_heads, n, head_dim]
            k = keys.transpose(0, 1).to(dtype)                         # [num_kv_heads, seq_len, head_dim]
            v = values.transpose(0, 1).to(dtype)
            mask = causal_mask(end - start, seq_len, q.device)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
            out[start:end] = o.transpose(0, 1)
        if decodes:
            self._decode(query, kv_cache, metadata, decodes, scale, out)
        return out.to(query.dtype)

    def _decode(self, query: torch.Tensor, kv_cache: KVCache, metadata: AttentionMetadata, rows: list[int],
                scale: float, out: torch.Tensor) -> None:
        """All one-token rows in one padded SDPA call."""
        k_cache, v_cache = kv_cache
        block_size = k_cache.shape[1]
        dtype = out.dtype
        device = query.device
        seq_lens = [metadata.seq_lens_host[i] for i in rows]
        max_len = max(seq_lens)
        rows_t = torch.tensor(rows, device=device)
        block_ids = metadata.block_table[rows_t, :-(-max_len // block_size)]            # [b, blocks]
        k = k_cache[block_ids].flatten(1, 2)[:, :max_len].to(dtype).transpose(1, 2)      # [b, kv_heads, L, d]
        v = v_cache[block_ids].flatten(1, 2)[:, :max_len].to(dtype).transpose(1, 2)
        token_rows = torch.tensor([metadata.query_start_loc_host[i] for i in rows], device=device)
        q = query[token_rows].to(dtype).unsqueeze(2)                                      # [b, heads, 1, d]
        valid = torch.arange(max_len, device=device)[None, :] < torch.tensor(seq_lens, device=device)[:, None]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :], scale=scale,
                                           enable_gqa=True)                               # [b, heads, 1, d]
        out[token_rows] = o.squeeze(2)
