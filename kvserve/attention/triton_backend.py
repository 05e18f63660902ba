"""The `triton` attention backend: paged attention read and written in place by Triton kernels
of our own (kvserve/attention/triton_kernels.py), one launch for the K/V write and one for the
attention of a whole mixed batch (prefill chunks, prefix hits, decode rows). The default on CUDA
when triton is importable (`--attention-backend triton`); on a CPU it runs only under
`TRITON_INTERPRET=1`, for the parity tests. `TorchPagedAttention` stays the spec.
"""

from __future__ import annotations

import os

import torch

from kvserve.attention.backend import AttentionMetadata, KVCache


def available(device: torch.device) -> bool:
    """Can this backend run on `device`? (triton importable; CUDA, or the interpreter on a CPU)."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# Split a sequence's keys between programs when there are few programs for the GPU's cores and
# the contexts are long: each split gets at least this many keys.
MIN_KEYS_PER_SPLIT = 512
MAX_SPLITS = 16


def choose_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, max_query_len: int,
                  num_cores: int) -> int:
    """Programs per sequence for a decode-only step (1 for anything with a prefill chunk): enough
    to fill the GPU's `num_cores` (SMs) when sequences x KV heads do not, never below
    MIN_KEYS_PER_SPLIT keys each; a power of 2."""
    if max_query_len != 1:
        return 1
    splits = 1
    while (splits < MAX_SPLITS and num_seqs * num_kv_heads * splits < num_cores
           and max_seq_len >= 2 * splits * MIN_KEYS_PER_SPLIT):
        splits *= 2
    return splits


class TritonPagedAttention:
    name = "triton"

    def __init__(self, device: torch.device):
        from kvserve.attention import triton_kernels

        self._ops = triton_kernels   # (not `kernels`: the runner reads that as the C++ CPU kernels)
        self.num_cores = (torch.cuda.get_device_properties(device).multi_processor_count
                          if device.type == "cuda" else 1)
        # Decode-only steps split their keys as for a context this long (the runner sets the
        # model's limit), so an eager step and a CUDA graph's (captured for that limit) compute
        # the same sums in the same order; None: by the step's own longest context.
        self.decode_split_len: int | None = None
        self._last: tuple[AttentionMetadata, int, int] | None = None   # a step's (metadata, max query len, splits)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: KVCache,
                metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        k_cache, v_cache = kv_cache
        self._ops.write_kv(key, value, k_cache, v_cache, metadata.slot_mapping)
        out = torch.empty_like(query)
        if self._last is None or self._last[0] is not metadata:   # once a step, not once a layer
            self._last = (metadata, *self._launch_shape(metadata, k_cache.shape[2]))
        _, max_query_len, splits = self._last
        self._ops.paged_attention(query, k_cache, v_cache, out, metadata.query_start_loc, metadata.seq_lens,
                                  metadata.block_table, scale, max_query_len, splits=splits)
        return out

    def _launch_shape(self, metadata: AttentionMetadata, num_kv_heads: int) -> tuple[int, int]:
        """(the longest chunk, the key splits) of a step."""
        starts = metadata.query_start_loc_host
        max_query_len = max((b - a for a, b in zip(starts, starts[1:])), default=0)
        longest = max(metadata.seq_lens_host, default=0)
        if max_query_len == 1 and self.decode_split_len is not None:
            longest = max(longest, self.decode_split_len)
        return max_query_len, choose_splits(metadata.num_seqs, num_kv_heads, longest, max_query_len, self.num_cores)


def self_check(device: torch.device, dtype: torch.dtype = torch.float32) -> str | None:
    """Small batches through this backend and the torch reference on `device`, in fp32 and in the
    model's `dtype`: a mixed one, and a decode-only one with its keys split. None when they agree,
    else what went wrong (`--attention-backend auto` then keeps the reference)."""
    for check_dtype in dict.fromkeys((torch.float32, dtype)):
        problem = _check(device, check_dtype)
        if problem is not None:
            return f"{problem} ({str(check_dtype).removeprefix('torch.')})"
    return None


def _check(device: torch.device, dtype: torch.dtype) -> str | None:
    from kvserve.attention import triton_kernels
    from kvserve.attention.torch_ref import TorchPagedAttention

    tolerance = 1e-3 if dtype == torch.float32 else 5e-2
    try:
        generator = torch.Generator().manual_seed(0)
        block_size, heads, kv_heads, head_dim = 16, 4, 2, 64
        starts, lens = (0, 20, 21, 30), (20, 40, 9)      # a prefill, a decode row after a hit, a chunk after a hit
        tables = [[5, 0, 0], [1, 7, 3], [2, 0, 0]]
        slots = [5 * 16 + p for p in range(20)] + [3 * 16 + 7] + [2 * 16 + p for p in range(9)]
        as_tensor = lambda values: torch.tensor(values, dtype=torch.int64, device=device)  # noqa: E731
        metadata = AttentionMetadata(as_tensor(slots), as_tensor(starts), as_tensor(lens), as_tensor(tables),
                                     block_size, starts, lens)
        cache = torch.randn((2, 8, block_size, kv_heads, head_dim), generator=generator).to(dtype).to(device)
        q = torch.randn((30, heads, head_dim), generator=generator).to(dtype).to(device)
        k, v = (torch.randn((30, kv_heads, head_dim), generator=generator).to(dtype).to(device) for _ in range(2))
        reference = TorchPagedAttention(torch.float32)
        expected = reference.forward(q, k, v, (cache[0].clone(), cache[1].clone()), metadata, 0.125)
        got = TritonPagedAttention(device).forward(q, k, v, (cache[0].clone(), cache[1].clone()), metadata, 0.125)
        error = (got.float() - expected.float()).abs().max().item()
        # Decode only, the keys split 4 ways and merged (the decode rows of the batch above, again).
        decode_meta = AttentionMetadata(as_tensor([3 * 16 + 7, 2 * 16 + 8]), as_tensor([0, 1, 2]), as_tensor([40, 9]),
                                        as_tensor([[1, 7, 3], [2, 0, 0]]), block_size, (0, 1, 2), (40, 9))
        rows = q[[20, 29]].contiguous()
        caches = (cache[0].clone(), cache[1].clone())
        expected = reference.forward(rows, k[[20, 29]], v[[20, 29]], caches, decode_meta, 0.125)
        got = torch.empty_like(rows)
        triton_kernels.paged_attention(rows, *caches, got, decode_meta.query_start_loc, decode_meta.seq_lens,
                                       decode_meta.block_table, 0.125, 1, splits=4)
        error = max(error, (got.float() - expected.float()).abs().max().item())
    except Exception as failure:   # a compile or launch failure: say which
        return f"{type(failure).__name__}: {failure}"
    return None if error < tolerance else f"its output differs from the reference by {error:.3g}"
