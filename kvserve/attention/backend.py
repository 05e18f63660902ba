"""The device seam: the AttentionBackend protocol and the metadata every backend reads.

A batch is flat: the tokens of all scheduled chunks are concatenated.

    query_start_loc  [0, 5, 6, 7]          request i owns tokens query_start_loc[i] .. [i+1]-1
    seq_lens         [5, 40, 17]           context length of request i after this step
    block_table      [[3, -, -],           row i: request i's block ids, padded (padding is
                      [7, 2, 9],            never read: seq_lens bounds every read)
                      [4, 8, -]]
    slot_mapping     one cache slot per token: block_id * block_size + offset_in_block

A token at position p of request i attends to positions 0..p of request i: the cached ones come
from the KV cache through the block table, its own chunk's ones are written there first.

KV cache of one layer: K and V tensors of shape [num_blocks, block_size, num_kv_heads, head_dim].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor       # [num_tokens] int64
    query_start_loc: torch.Tensor    # [num_seqs + 1] int64
    seq_lens: torch.Tensor           # [num_seqs] int64
    block_table: torch.Tensor        # [num_seqs, max_blocks_per_seq] int64
    block_size: int
    # Host copies of the small index arrays, so reference loops do not synchronise with a device.
    query_start_loc_host: tuple[int, ...]
    seq_lens_host: tuple[int, ...]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)


KVCache = tuple[torch.Tensor, torch.Tensor]   # (K, V), each [num_blocks, block_size, num_kv_heads, head_dim]


class AttentionBackend(Protocol):
    name: str

    def forward(self, query: torch.Tensor,      # [num_tokens, num_heads, head_dim]
                key: torch.Tensor,              # [num_tokens, num_kv_heads, head_dim]
                value: torch.Tensor,            # [num_tokens, num_kv_heads, head_dim]
                kv_cache: KVCache,
                metadata: AttentionMetadata,
                scale: float) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Write key/value into kv_cache at metadata.slot_mapping, then attend."""
        ...


def write_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: KVCache, slot_mapping: torch.Tensor) -> None:
    """Store this step's keys and values in their cache slots."""
    k_cache, v_cache = kv_cache
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, value.to(v_cache.dtype))
