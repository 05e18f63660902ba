"""The contract between scheduler and runner: SchedulerOutput in, ModelOutput back. No torch.

One step's plan is a list of chunks, one per scheduled request:

    chunk.token_ids       tokens to run now, at positions start_position .. start_position+n-1
    chunk.block_ids       the request's whole block table (positions p live in block p // block_size)
    chunk.samples         the chunk reaches the request's last token, so a new token is sampled

A prefill chunk, a prompt that is partly a prefix-cache hit, and a one-token decode are the same
shape; only their lengths and start positions differ.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvserve.kv.manager import SwapPlan
from kvserve.outputs import TokenLogprob
from kvserve.sampling import SamplingParams


@dataclass(frozen=True)
class ScheduledChunk:
    request_id: str
    token_ids: tuple[int, ...]
    start_position: int
    block_ids: tuple[int, ...]
    samples: bool
    sampling_params: SamplingParams

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def seq_len(self) -> int:
        """Context length once this chunk is computed."""
        return self.start_position + len(self.token_ids)


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: tuple[ScheduledChunk, ...]
    # Requests that ended since the previous plan: the runner drops their per-request state.
    finished_request_ids: frozenset[str] = frozenset()
    # KV copies between the main pool, the host tier and the disk tier, made before the forward pass.
    swaps: SwapPlan = SwapPlan()

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks and self.swaps.is_empty


@dataclass(frozen=True)
class ModelOutput:
    """The runner's answer: one sampled token per sampling chunk, keyed by request id. A request
    in `failed` could not be run this step (see EngineCore): it is finished with an error and
    nothing else of its chunk is accounted."""

    sampled_token_ids: dict[str, int]
    logprobs: dict[str, TokenLogprob]
    failed: frozenset[str] = frozenset()


EMPTY_MODEL_OUTPUT = ModelOutput({}, {})
