"""Request: the engine-side life of one request. Pure Python (no torch).

    prompt_token_ids            output_token_ids
    |<------ num_prompt ------>|<-- num_output -->|
    [p0 p1 p2 ...          pN-1 o0 o1 ...     oM-1]   all_token_ids, len == num_tokens
    |<--- num_computed_tokens --->|                   tokens whose KV is in the cache

Each step the scheduler gives the request tokens so that num_computed_tokens catches up with
num_tokens. Prefill, chunked prefill, prefix-cache hits, decode and recompute after preemption are
all this one rule.
"""

from __future__ import annotations

import enum
import time

from kvserve.sampling import FinishReason, SamplingParams


class RequestStatus(enum.IntEnum):
    """Ordered: everything >= FINISHED_STOPPED is finished."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


_FINISHED_STATUS = {
    FinishReason.STOP: RequestStatus.FINISHED_STOPPED,
    FinishReason.LENGTH: RequestStatus.FINISHED_LENGTH,
    FinishReason.ABORT: RequestStatus.FINISHED_ABORTED,
    FinishReason.ERROR: RequestStatus.FINISHED_ERROR,
}


class Request:
    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                 eos_token_ids: frozenset[int] = frozenset(), *, cache_salt: str | None = None,
                 priority: int = 0, arrival_time: float | None = None,
                 checkpoints: tuple[tuple[int, float], ...] = (), background: bool = False,
                 tenant: str | None = None, weight: float = 1.0):
        """`checkpoints`: (num_prompt_tokens, ttl_s) pairs; once computed, each such prefix is
        pinned in the KV pool for ttl_s, renewed by every hit."""
        assert prompt_token_ids, "the front end rejects empty prompts"
        self.request_id = request_id
        self.sampling_params = sampling_params
        self.eos_token_ids = eos_token_ids
        self.cache_salt = cache_salt
        self.priority = priority
        # Background work (batch jobs) fills idle capacity: it waits behind every foreground
        # request, is preempted first, and gives up its seat and KV to a waiting foreground one.
        self.background = background
        # Fair shares: step tokens are divided between tenants with work in proportion to weight.
        self.tenant = tenant
        self.weight = weight
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.num_prompt_tokens = len(prompt_token_ids)
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        # Prompt tokens served from the prefix cache at first admission; None until admitted.
        self.num_cached_tokens: int | None = None
        # Tokens this request ran through the model, recomputation included.
        self.num_tokens_run = 0
        self.num_preemptions = 0
        self.first_scheduled_time: float | None = None   # monotonic, set at first admission
        assert all(0 < n <= self.num_prompt_tokens for n, _ in checkpoints), checkpoints
        self.checkpoints = tuple(sorted(checkpoints))
        self.num_checkpoints_applied = 0
        # Prompt tokens this request wrote to the cache and pinned, per TTL: only tokens it
        # neither read from the cache nor counted for an earlier checkpoint.
        self.cache_writes: dict[float, int] = {}
        self.cache_write_end = 0           # tokens covered by this request's reads and counted writes
        # Chained hashes of this request's full blocks, filled lazily by the KV manager.
        self.block_hashes: list[bytes] = []
        self.status = RequestStatus.WAITING
        self.finish_reason: FinishReason | None = None

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.all_token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens:]

    @property
    def num_pending_tokens(self) -> int:
        """Tokens whose KV is not computed yet (the prompt chunk still to run, or the last sample)."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def num_cache_write_tokens(self) -> int:
        return sum(self.cache_writes.values())

    def record_cache_write(self, pinned_end: int, ttl_s: float) -> None:
        """A checkpoint pinned the first `pinned_end` tokens (0: nothing new was pinned)."""
        covered = max(self.cache_write_end, self.num_cached_tokens or 0)
        if pinned_end > covered:
            self.cache_writes[ttl_s] = self.cache_writes.get(ttl_s, 0) + pinned_end - covered
            self.cache_write_end = pinned_end

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    # ---- verbs ------------------------------------------------------------------------------
    def append_token(self, token_id: int) -> None:
        assert self.status == RequestStatus.RUNNING, self.status
        self.all_token_ids.append(token_id)

    def finish(self, reason: FinishReason) -> None:
        assert not self.is_finished, f"{self.request_id} finished twice"
        self.status = _FINISHED_STATUS[reason]
        self.finish_reason = reason

    def stop_reason(self, max_model_len: int) -> FinishReason | None:
        """Why generation must stop after the last appended token, or None to go on."""
        params = self.sampling_params
        last = self.all_token_ids[-1]
        if last in params.stop_token_ids or (not params.ignore_eos and last in self.eos_token_ids):
            return FinishReason.STOP
        if self.num_output_tokens >= params.max_tokens or self.num_tokens >= max_model_len:
            return FinishReason.LENGTH
        return None

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, {self.status.name}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens})")
