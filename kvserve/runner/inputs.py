"""SchedulerOutput → flat tensors for one forward pass.

    chunks        A: 5 prompt tokens from 0    B: 1 decode token at 39    C: 1 token at 16
    input_ids     [a0 a1 a2 a3 a4 | b39 | c16]
    positions     [0  1  2  3  4  | 39  | 16 ]
    query_start   [0, 5, 6, 7]
    seq_lens      [5, 40, 17]
    logits_rows   [4, 5, 6]        the last token of each chunk that samples
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvserve.attention.backend import AttentionMetadata
from kvserve.sampling import SamplingParams
from kvserve.sched.plan import SchedulerOutput


@dataclass(frozen=True)
class ModelInputs:
    input_ids: torch.Tensor           # [num_tokens] int64
    positions: torch.Tensor           # [num_tokens] int64
    metadata: AttentionMetadata
    logits_indices: torch.Tensor      # [num_sampling] int64: rows of the hidden states that sample
    sampling_request_ids: tuple[str, ...]
    sampling_params: tuple[SamplingParams, ...]


def prepare_inputs(plan: SchedulerOutput, block_size: int, device: torch.device) -> ModelInputs:
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    query_start_loc = [0]
    seq_lens: list[int] = []
    logits_indices: list[int] = []
    sampling_ids: list[str] = []
    sampling_params: list[SamplingParams] = []
    max_blocks = max(len(c.block_ids) for c in plan.chunks)
    block_table = []
    for chunk in plan.chunks:
        input_ids.extend(chunk.token_ids)
        chunk_positions = range(chunk.start_position, chunk.seq_len)
        positions.extend(chunk_positions)
        slots.extend(chunk.block_ids[p // block_size] * block_size + p % block_size for p in chunk_positions)
        query_start_loc.append(len(input_ids))
        seq_lens.append(chunk.seq_len)
        block_table.append(list(chunk.block_ids) + [0] * (max_blocks - len(chunk.block_ids)))
        if chunk.samples:
            logits_indices.append(len(input_ids) - 1)
            sampling_ids.append(chunk.request_id)
            sampling_params.append(chunk.sampling_params)

    def as_tensor(values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)

    metadata = AttentionMetadata(
        slot_mapping=as_tensor(slots),
        query_start_loc=as_tensor(query_start_loc),
        seq_lens=as_tensor(seq_lens),
        block_table=as_tensor(block_table),
        block_size=block_size,
        query_start_loc_host=tuple(query_start_loc),
        seq_lens_host=tuple(seq_lens),
    )
    return ModelInputs(as_tensor(input_ids), as_tensor(positions), metadata, as_tensor(logits_indices),
                       tuple(sampling_ids), tuple(sampling_params))
