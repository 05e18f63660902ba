"""Token-budget continuous batching: admit, chunk, preempt, finish. Pure Python (no torch)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from kvserve.config import SchedulerConfig
from kvserve.kv.manager import KVCacheManager, KVCacheStats
from kvserve.outputs import TokenDelta
from kvserve.request import Request, RequestStatus
from kvserve.sampling import FinishReason, InvalidRequestError
from kvserve.sched.cost import PREFILL_TOKEN_UNITS, BackgroundGovernor
from kvserve.sched.plan import ModelOutput, ScheduledChunk, SchedulerOutput
from kvserve.sched.policy import make_policy


@dataclass
class _StepBudget:
    """The tokens one step may still take. Background requests may also take only `background`
    units of work in all (BackgroundGovernor.units; None: no limit; 0: they sit the step out)."""

    tokens: int
    background: float | None = None

    def grant(self, request: Request, wanted: int) -> int:
        num = min(wanted, self.tokens)
        if not request.background or self.background is None:
            return num
        if num == 1:
            return 1 if self.background >= 1 else 0
        return min(num, int(self.background / PREFILL_TOKEN_UNITS))

    def spend(self, request: Request, num_tokens: int) -> None:
        self.tokens -= num_tokens
        if request.background and self.background is not None:
            self.background -= BackgroundGovernor.units(*((1, 0) if num_tokens == 1 else (0, num_tokens)))


@dataclass(frozen=True)
class SchedulerStats:
    num_running: int
    num_waiting: int
    num_preemptions: int   # since start
    kv: KVCacheStats
    num_computed_tokens: int = 0   # tokens run through the model since start (recomputation included)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int):
        self.config = config
        self.kv = kv
        # A request can never outgrow the whole pool, so the pool caps the context too.
        self.max_model_len = min(max_model_len, kv.num_blocks * kv.block_size)
        self.waiting = make_policy(config.policy)
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished_ids: set[str] = set()
        self._num_preemptions = 0
        self._num_computed_tokens = 0
        self.governor = BackgroundGovernor(config.background_step_factor, config.max_num_seqs)
        self._governed = False                  # the step being planned carries governed background work
        self._foreground_seen = float("-inf")   # when foreground work was last seen (monotonic)
        self.num_prefix_waits = 0   # admissions deferred because the prefix was being computed

    # ---- intake ------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
        if request.num_prompt_tokens >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {request.num_prompt_tokens} tokens; this model's context allows at most "
                f"{self.max_model_len - 1} prompt tokens (--max-model-len {self.max_model_len})", "messages")
        self.requests[request.request_id] = request
        self.waiting.add(request)

    def abort(self, request_id: str) -> bool:
        """Finish a request now and free its blocks. False if it is unknown or already finished."""
        if request_id not in self.requests:
            return False
        self.finish(request_id, FinishReason.ABORT)
        return True

    # ---- the step ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Plan one step.

        Each request is given tokens so that its num_computed_tokens catches up with its
        num_tokens, within a shared budget of max_num_batched_tokens. A new prompt therefore
        runs in chunks of whatever budget is left; a prefix-cache hit simply starts the count
        further along; a decoding request needs exactly one token. Running requests are served
        first, in order; when the pool runs dry the policy's victim is preempted (its blocks are
        freed and it waits to be recomputed). New requests are admitted only from what is left,
        and not at all in a step that had to preempt.

        Background requests (batch jobs) fill what foreground ones leave: before anything is
        scheduled, running background requests give their seats and blocks to waiting foreground
        ones (_make_room_for_foreground); while a foreground prompt is being prefilled they sit the
        step out, so that its first token comes as fast as on an idle engine; and while foreground
        requests are around, background work is cut so that a step takes at most
        `background_step_factor` times the fastest recent step (BackgroundGovernor), which bounds
        how long a newly arriving request waits for the step in flight.
        """
        self.kv.expire_pins()
        self._make_room_for_foreground()
        background = self._background_allowance()
        self._governed = background is not None and background > 0
        budget = _StepBudget(self.config.max_num_batched_tokens, background)
        chunks: list[ScheduledChunk] = []
        preempted = self._schedule_running(budget, chunks)
        if not preempted:
            self._admit_waiting(budget, chunks)
        finished, self._finished_ids = frozenset(self._finished_ids), set()
        return SchedulerOutput(tuple(chunks), finished, self.kv.take_swaps())

    def _make_room_for_foreground(self) -> None:
        """While a waiting foreground request lacks a seat or KV blocks, the running background
        request that would be preempted first goes back to wait (its blocks free at once)."""
        background = [r for r in self.running if r.background]
        if not background:
            return
        seats = self.config.max_num_seqs - len(self.running)
        free = self.kv.stats().num_free_blocks
        for request in self.waiting.foreground():
            need = self.kv.blocks_for(request.num_tokens + 1)
            while background and (seats < 1 or free < need):
                victim = background.pop()
                free += self.kv.num_sole_blocks(victim)
                seats += 1
                self.running.remove(victim)
                self._requeue(victim)
            if seats < 1 or free < need:
                return
            seats -= 1
            free -= need

    def _background_allowance(self) -> float | None:
        """Background work a step may carry: none while a foreground prompt is prefilled; the
        governor's budget while foreground requests are around (and `interactive_linger_s` after);
        no limit otherwise."""
        now = time.monotonic()
        prefilling = any(True for _ in self.waiting.foreground()) or any(
            not r.background and r.num_computed_tokens < r.num_prompt_tokens for r in self.running)
        if prefilling or any(not r.background for r in self.running):
            self._foreground_seen = now
        if prefilling:
            return 0.0
        if now - self._foreground_seen > self.config.interactive_linger_s or not self.config.background_step_factor:
            return None
        return self.governor.allowance()

    def observe_step(self, plan: SchedulerOutput, seconds: float) -> None:
        """The engine core reports how long each step took (the background governor learns)."""
        if not plan.chunks:
            return
        rows = prefill = 0
        for chunk in plan.chunks:
            request = self.requests.get(chunk.request_id)
            if request is not None and request.background:
                rows, prefill = (rows + 1, prefill) if chunk.num_tokens == 1 else (rows, prefill + chunk.num_tokens)
        self.governor.observe(seconds, BackgroundGovernor.units(rows, prefill), self._governed)

    def _schedule_running(self, budget: "_StepBudget", chunks: list[ScheduledChunk]) -> bool:
        """Serve running requests in policy order; True if a request had to be preempted."""
        preempted = False
        self.waiting.order_running(self.running)
        i = 0
        while i < len(self.running) and budget.tokens > 0:
            request = self.running[i]
            num_new = budget.grant(request, request.num_pending_tokens)
            if num_new <= 0:
                break   # background work, left out of this step; it comes last in the order
            while not self.kv.allocate_slots(request, num_new):
                victim = self.running[-1]   # the least important (see policy.order_running)
                self._preempt(victim)
                preempted = True
                if victim is request:
                    return preempted
            chunks.append(self._chunk(request, num_new))
            budget.spend(request, num_new)
            i += 1
        return preempted

    def _admit_waiting(self, budget: "_StepBudget", chunks: list[ScheduledChunk]) -> None:
        """Admit waiting requests in policy order while budget and seats last.

        Prefix-aware: a request whose next uncached block is being computed right now by a running
        request's prefill (the same prompt prefix, in flight) is passed over this step; once that
        block is cached it is admitted with the hit, instead of computing the same prefix again
        side by side. Requests behind it are still considered."""
        if not self.waiting:
            return
        in_flight = self._prefix_blocks_in_flight({chunk.request_id for chunk in chunks})
        for request in list(self.waiting):
            if budget.tokens <= 0 or len(self.running) >= self.config.max_num_seqs:
                return
            if request.background and any(not r.background for r in self.waiting):
                return   # background work never takes what a waiting foreground request will need
            hit = self.kv.match(request)
            usable = (request.num_tokens - 1) // self.kv.block_size    # blocks a hit may cover (see match)
            if hit.num_blocks < usable and request.block_hashes[hit.num_blocks] in in_flight:
                self.num_prefix_waits += 1
                continue
            num_cached = hit.num_blocks * self.kv.block_size
            num_new = budget.grant(request, request.num_tokens - num_cached)
            if num_new <= 0:
                return   # background work, left out of this step (only background waits behind it)
            while not self.kv.allocate_slots(request, num_new, hit):
                # Nothing running will free blocks: pinned prefixes give way rather than starve it.
                if self.running or not self.kv.release_oldest_pin():
                    return
                hit = self.kv.match(request)
                num_cached = hit.num_blocks * self.kv.block_size
                num_new = budget.grant(request, request.num_tokens - num_cached)
            self.waiting.remove(request)
            request.num_computed_tokens = num_cached
            if request.num_cached_tokens is None:
                request.num_cached_tokens = min(num_cached, request.num_prompt_tokens)
                request.first_scheduled_time = time.monotonic()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            chunks.append(self._chunk(request, num_new))
            budget.spend(request, num_new)
            in_flight.update(self._uncomputed_prompt_blocks(request))

    def _prefix_blocks_in_flight(self, scheduled: set[str]) -> set[bytes]:
        """Hashes of the full prompt blocks running prefills have yet to compute. A background
        prefill that sits this step out does not count: a foreground request must not wait for a
        block that background work, held back while that foreground request waits, never computes."""
        return {h for r in self.running if not r.background or r.request_id in scheduled
                for h in self._uncomputed_prompt_blocks(r)}

    def _uncomputed_prompt_blocks(self, request: Request) -> list[bytes]:
        if not self.kv.prefix_caching or request.num_computed_tokens >= request.num_prompt_tokens:
            return []
        size = self.kv.block_size
        return request.block_hashes[request.num_computed_tokens // size:request.num_prompt_tokens // size]

    def _chunk(self, request: Request, num_new: int) -> ScheduledChunk:
        start = request.num_computed_tokens
        end = start + num_new
        return ScheduledChunk(
            request_id=request.request_id,
            token_ids=tuple(request.all_token_ids[start:end]),
            start_position=start,
            block_ids=tuple(self.kv.block_ids(request.request_id)),
            samples=end == request.num_tokens,
            sampling_params=request.sampling_params,
        )

    def update(self, plan: SchedulerOutput, output: ModelOutput) -> list[TokenDelta]:
        """Account a step's results: advance computed counts, publish full blocks, append sampled
        tokens, and finish requests that hit a stop condition."""
        deltas = []
        for chunk in plan.chunks:
            request = self.requests[chunk.request_id]
            if chunk.request_id in output.failed:
                self.running.remove(request)
                self._finish(request, FinishReason.ERROR)
                deltas.append(TokenDelta(request.request_id, (), None, FinishReason.ERROR))
                continue
            request.num_computed_tokens += chunk.num_tokens
            request.num_tokens_run += chunk.num_tokens
            self._num_computed_tokens += chunk.num_tokens
            self.kv.cache_full_blocks(request)
            self._apply_checkpoints(request)
            if not chunk.samples:
                continue
            request.append_token(output.sampled_token_ids[chunk.request_id])
            reason = request.stop_reason(self.max_model_len)
            if reason is not None:
                self.running.remove(request)
                self._finish(request, reason)
            logprob = output.logprobs.get(chunk.request_id)
            deltas.append(TokenDelta(request.request_id, (request.all_token_ids[-1],),
                                     None if logprob is None else (logprob,), reason))
        return deltas

    def _apply_checkpoints(self, request: Request) -> None:
        """Pin each checkpointed prefix once its tokens are computed."""
        while request.num_checkpoints_applied < len(request.checkpoints):
            num_tokens, ttl_s = request.checkpoints[request.num_checkpoints_applied]
            if num_tokens > request.num_computed_tokens:
                return
            request.record_cache_write(self.kv.pin(request, num_tokens, ttl_s), ttl_s)
            request.num_checkpoints_applied += 1

    # ---- state changes -----------------------------------------------------------------------
    def finish(self, request_id: str, reason: FinishReason) -> None:
        """Finish a running or waiting request for a reason found outside the scheduler (a stop
        string, an abort), freeing its blocks now."""
        request = self.requests[request_id]
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self._finish(request, reason)

    def _finish(self, request: Request, reason: FinishReason) -> None:
        request.finish(reason)
        self.kv.free(request)
        del self.requests[request.request_id]
        self._finished_ids.add(request.request_id)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._requeue(request)

    def _requeue(self, request: Request) -> None:
        """A request taken off the running list waits again, to be recomputed (its blocks freed)."""
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self._num_preemptions += 1
        self.waiting.requeue(request)

    # ---- introspection -----------------------------------------------------------------------
    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(len(self.running), len(self.waiting), self._num_preemptions, self.kv.stats(),
                              self._num_computed_tokens)

    def check_integrity(self) -> None:
        self.kv.check_integrity()
        for request in self.running:
            assert request.status == RequestStatus.RUNNING
            held = len(self.kv.block_ids(request.request_id)) * self.kv.block_size
            assert held >= request.num_computed_tokens, request
        for request in self.waiting:
            assert request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
            assert not self.kv.block_ids(request.request_id), f"waiting {request} holds blocks"
