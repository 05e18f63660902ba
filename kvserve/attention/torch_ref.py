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

from dataclasses import dataclass

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


@dataclass(frozen=True)
class _StepPlan:
    """What every layer of one step needs besides its tensors, built once per step (not per layer):
    the prefill chunks with their causal masks, and the decode rows as one padded batch."""

    prefills: tuple[tuple[int, int, int, int, torch.Tensor | None], ...]   # (seq, start, end, seq_len, mask)
    prefill_rows: torch.Tensor | None         # [c, 4] int64: each prefill's (seq, start, end, seq_len), for kernels
    decode_token_rows: torch.Tensor | None    # [b] rows of the flat batch that decode
    decode_block_ids: torch.Tensor | None     # [b, blocks] their block tables, cut to the longest
    decode_valid: torch.Tensor | None         # [b, 1, 1, max_len] which padded key positions are real
    decode_seq_lens: torch.Tensor | None      # [b] their context lengths
    decode_max_len: int = 0


def _plan(metadata: AttentionMetadata, device: torch.device) -> _StepPlan:
    starts = metadata.query_start_loc_host
    prefills, rows = [], []
    for i, seq_len in enumerate(metadata.seq_lens_host):
        start, end = starts[i], starts[i + 1]
        if end - start == 1:
            rows.append(i)
        else:
            # A chunk that starts the sequence is plain causal attention (no mask tensor: SDPA's
            # is_causal); a later chunk sees the cached context whole, so it needs the offset mask.
            mask = None if end - start == seq_len else causal_mask(end - start, seq_len, device)
            prefills.append((i, start, end, seq_len, mask))
    prefill_rows = torch.tensor([p[:4] for p in prefills], dtype=torch.int64) if prefills else None
    if not rows:
        return _StepPlan(tuple(prefills), prefill_rows, None, None, None, None)
    seq_lens = [metadata.seq_lens_host[i] for i in rows]
    max_len = max(seq_lens)
    block_ids = metadata.block_table[torch.tensor(rows, device=device), :-(-max_len // metadata.block_size)]
    lens = torch.tensor(seq_lens, device=device)
    valid = torch.arange(max_len, device=device)[None, :] < lens[:, None]
    token_rows = torch.tensor([starts[i] for i in rows], device=device)
    return _StepPlan(tuple(prefills), prefill_rows, token_rows, block_ids, valid[:, None, None, :], lens, max_len)


class TorchPagedAttention:
    name = "torch"

    def __init__(self, compute_dtype: torch.dtype | None = None):
        """compute_dtype None: attend in the query's dtype."""
        self.compute_dtype = compute_dtype
        self._last: tuple[AttentionMetadata, _StepPlan] | None = None

    def _step_plan(self, metadata: AttentionMetadata, device: torch.device) -> _StepPlan:
        """The plan of this step's metadata; layers after the first reuse it."""
        if self._last is None or self._last[0] is not metadata:
            self._last = (metadata, _plan(metadata, device))
        return self._last[1]

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: KVCache,
                metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        write_kv(key, value, kv_cache, metadata.slot_mapping)
        plan = self._step_plan(metadata, query.device)
        dtype = self.compute_dtype or query.dtype
        out = torch.empty(query.shape, dtype=dtype, device=query.device)   # [num_tokens, num_heads, head_dim]
        if plan.prefills:
            self._prefill(query, kv_cache, metadata, plan, scale, out)
        if plan.decode_token_rows is not None:
            self._decode(query, kv_cache, plan, scale, out)
        return out.to(query.dtype)

    def _prefill(self, query: torch.Tensor, kv_cache: KVCache, metadata: AttentionMetadata, plan: _StepPlan,
                 scale: float, out: torch.Tensor) -> None:
        """Each prefill chunk: its context gathered, then one SDPA call per sequence."""
        dtype = out.dtype
        for i, start, end, seq_len, mask in plan.prefills:
            keys, values = gather_context(kv_cache, metadata.block_table[i], seq_len)
            # 4-D [1, heads, tokens, head_dim]: with a batch dimension torch's CPU SDPA takes its
            # fused flash kernel (3-D inputs fall back to the math path, 3-5× slower here).
            q = query[start:end].transpose(0, 1).to(dtype)[None]       # [1, num_heads, n, head_dim]
            k = keys.transpose(0, 1).to(dtype)[None]                   # [1, num_kv_heads, seq_len, head_dim]
            v = values.transpose(0, 1).to(dtype)[None]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                               enable_gqa=True)
            out[start:end] = o[0].transpose(0, 1)

    def _decode(self, query: torch.Tensor, kv_cache: KVCache, plan: _StepPlan, scale: float, out: torch.Tensor) -> None:
        """All one-token rows in one padded SDPA call."""
        k_cache, v_cache = kv_cache
        dtype = out.dtype
        k = k_cache[plan.decode_block_ids].flatten(1, 2)[:, :plan.decode_max_len].to(dtype).transpose(1, 2)
        v = v_cache[plan.decode_block_ids].flatten(1, 2)[:, :plan.decode_max_len].to(dtype).transpose(1, 2)
        q = query[plan.decode_token_rows].to(dtype).unsqueeze(2)                         # [b, heads, 1, d]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.decode_valid, scale=scale,
                                           enable_gqa=True)                               # [b, heads, 1, d]
        out[plan.decode_token_rows] = o.squeeze(2)
