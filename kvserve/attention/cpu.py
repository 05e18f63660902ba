"""Paged attention on CPU with a C++ decode kernel (csrc/paged_decode.cpp).

Prefill chunks are attended straight from the paged cache too (csrc/prefill_attention.cpp: no
gather of the context, no fp32 copy of it, grouped-query heads not expanded), all chunks of a step
in one call. Decode rows, one query each, likewise (csrc/paged_decode.cpp): no per-step gather of
the whole context into a padded batch, no mask. Same math as the reference in fp32; tests hold the
two together.

When every row of a step decodes (most steps), the K/V write and attention are one C++ call
(`forward` → decode_step); where the model uses the fused ops (bf16, and quantized fp32 models) it
hands over the qkv projection's output and the rotary embedding is folded in too (`decode_qkv`).
"""

from __future__ import annotations

import torch

from kvserve.attention.backend import AttentionMetadata, KVCache
from kvserve.attention.torch_ref import TorchPagedAttention, _StepPlan

FUSED_DTYPES = (torch.bfloat16, torch.float32)
PREFILL_HEAD_DIMS = (64, 128)     # prefill_attention's AVX2 path; other head sizes keep the reference


class CpuPagedAttention(TorchPagedAttention):
    name = "cpu"

    def __init__(self, kernels):
        """`kernels`: the module from kvserve.attention.cpu_kernels.load()."""
        super().__init__(torch.float32)
        self.kernels = kernels

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: KVCache,
                metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        plan = self._step_plan(metadata, query.device)
        if not plan.prefills:
            # Every row decodes (most steps): K/V write and attention in one C++ call (this step's
            # few keys and values converted first when the cache holds another dtype).
            cache_dtype = kv_cache[0].dtype
            return self.kernels.decode_step(query, key.to(cache_dtype), value.to(cache_dtype), *kv_cache,
                                            metadata.slot_mapping, plan.decode_block_ids, plan.decode_seq_lens, scale)
        return super().forward(query, key, value, kv_cache, metadata, scale)

    def decode_plan(self, metadata: AttentionMetadata, device: torch.device) -> _StepPlan | None:
        """This step's plan when every row decodes (what decode_qkv and the C++ layer loop take),
        else None."""
        plan = self._step_plan(metadata, device)
        return None if plan.prefills else plan

    def _prefill(self, query: torch.Tensor, kv_cache: KVCache, metadata: AttentionMetadata, plan: _StepPlan,
                 scale: float, out: torch.Tensor) -> None:
        """Every chunk of every sequence in one C++ call over the paged cache (out is fp32), where
        the kernel has a vector path; the reference's gather + SDPA elsewhere."""
        if query.shape[-1] not in PREFILL_HEAD_DIMS or self.kernels.get_isa() < 1:
            return super()._prefill(query, kv_cache, metadata, plan, scale, out)
        self.kernels.prefill_attention(query.float().contiguous(), *kv_cache, metadata.block_table,
                                       plan.prefill_rows, scale, out)

    def decode_qkv(self, qkv: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], kv_cache: KVCache,
                   metadata: AttentionMetadata, scale: float, num_heads: int, num_kv_heads: int) -> torch.Tensor | None:
        """The whole attention of an all-decode step (bf16, or fp32 where the model uses the fused
        ops) from the fused qkv projection output ([n, (heads + 2 kv_heads) * head_dim]): rotary, K/V
        write and attention in one C++ call; [n, heads * head_dim]. None when it does not apply
        (prefill rows, other dtypes): the caller then takes the torch path (rotary in layers.py, then
        forward)."""
        if qkv.dtype not in FUSED_DTYPES or kv_cache[0].dtype not in (qkv.dtype, torch.bfloat16) or \
                not qkv.is_contiguous():
            return None
        plan = self.decode_plan(metadata, qkv.device)
        if plan is None:
            return None
        return self.kernels.decode_qkv(qkv, *rotary, *kv_cache, metadata.slot_mapping, plan.decode_block_ids,
                                       plan.decode_seq_lens, scale, num_heads, num_kv_heads)

    def _decode(self, query: torch.Tensor, kv_cache: KVCache, plan: _StepPlan, scale: float, out: torch.Tensor) -> None:
        k_cache, v_cache = kv_cache
        q = query[plan.decode_token_rows].float()                                     # [b, heads, d]
        out[plan.decode_token_rows] = self.kernels.paged_decode(q, k_cache, v_cache, plan.decode_block_ids,
                                                                plan.decode_seq_lens, scale)
