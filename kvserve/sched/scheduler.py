"""Token-budget continuous batching: admit, chunk, preempt, finish. Pure Python (no torch)."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass

from kvserve.config import SchedulerConfig
from kvserve.kv.manager import KVCacheManager, KVCacheStats
from kvserve.outputs import TokenDelta
from kvserve.request import Request, RequestStatus
from kvserve.sampling import FinishReason, InvalidRequestError
from kvserve.sched.cost import DEFAULT_COSTS, PREFILL_TOKEN_UNITS, BackgroundGovernor, PreemptionCosts
from kvserve.sched.fair import VirtualClock, fair_caps
from kvserve.sched.plan import ModelOutput, ScheduledChunk, SchedulerOutput
from kvserve.sched.policy import cache_aware_order, make_policy

log = logging.getLogger(__name__)

SHARE_INCREASE_TOKENS = 4    # the share governor's additive step, in prompt tokens
SHARE_MINIMUM_TOKENS = 16    # and its least budget: a block of prompt per step always goes through
MAX_UNPLACED = 4   # waiting requests _make_room tries and fails to place before it stops, per step


@dataclass
class _StepBudget:
    """The tokens one step may still take. Background requests may also take only `background`
    units of work in all (BackgroundGovernor.units; None: no limit; 0: they sit the step out)."""

    tokens: int
    background: float | None = None
    tenant_caps: dict | None = None   # tokens each tenant may still take (fair shares), None: no caps
    # Prompt tokens the tenants over their fair share may still take in all (the share governor); None: no limit.
    over_share: frozenset = frozenset()
    over_share_prefill: int | None = None

    def grant(self, request: Request, wanted: int) -> int:
        num = min(wanted, self.tokens)
        if self.tenant_caps is not None:
            num = min(num, self.tenant_caps.get(request.tenant, 0))
        if self.over_share_prefill is not None and request.tenant in self.over_share and _prefilling(request):
            num = min(num, self.over_share_prefill)
        if not request.background or self.background is None:
            return num
        if num == 1:
            return 1 if self.background >= 1 else 0
        return min(num, int(self.background / PREFILL_TOKEN_UNITS))

    def spend(self, request: Request, num_tokens: int) -> None:
        self.tokens -= num_tokens
        if self.tenant_caps is not None:
            self.tenant_caps[request.tenant] = self.tenant_caps.get(request.tenant, 0) - num_tokens
        if self.over_share_prefill is not None and request.tenant in self.over_share and _prefilling(request):
            self.over_share_prefill -= num_tokens
        if request.background and self.background is not None:
            self.background -= BackgroundGovernor.units(*((1, 0) if num_tokens == 1 else (0, num_tokens)))


def _prefilling(request: Request) -> bool:
    """The request's next tokens are prompt tokens (before this step's chunk is accounted)."""
    return request.num_computed_tokens < request.num_prompt_tokens


@dataclass(frozen=True)
class SchedulerStats:
    num_running: int
    num_waiting: int
    num_preemptions: int   # since start
    kv: KVCacheStats
    num_computed_tokens: int = 0   # tokens run through the model since start (recomputation included)
    num_preemptions_swap: int = 0        # preemptions whose blocks went to the host tier
    num_preemptions_recompute: int = 0   # preemptions whose tokens are run again
    bytes_swapped_out: int = 0           # KV bytes copied to the host tier by preemption
    tenant_tokens: dict | None = None    # tokens run per tenant since start (None: no tenants)
    max_queue_time_s: float = 0.0        # the longest wait from arrival to first admission (since start)
    # The most a first admission came after aging_factor × its service estimate (the aging bound's
    # slack term; <= 0: every request within aging_factor × its service time). Since start.
    max_wait_over_aging_s: float = float("-inf")
    num_stalls_broken: int = 0           # steps that would have scheduled nothing with work pending (see schedule)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int,
                 costs: PreemptionCosts | None = None, clock=time.monotonic):
        """`costs`: measured on this machine (ModelRunner.measure_costs); `clock` is injectable so
        that aging is testable without sleeping."""
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
        # Tenants over their fair share see their prompt chunks cut while one under it has work, so
        # that a step takes at most tenant_step_factor × the fastest recent step without such chunks.
        self.share_governor = BackgroundGovernor(config.tenant_step_factor, config.max_num_batched_tokens,
                                                 increase=SHARE_INCREASE_TOKENS,
                                                 minimum=min(SHARE_MINIMUM_TOKENS, config.max_num_batched_tokens))
        self._over_share: frozenset = frozenset()     # tenants whose prompt chunks this step governs
        self._under_share_seen = float("-inf")        # when a tenant under its share last had work
        self.num_prefix_waits = 0   # admissions deferred because the prefix was being computed
        self.num_stalls_broken = 0  # steps that would have scheduled nothing with work pending
        self._forced = False        # this step is breaking a stall: no sit-outs, no prefix waits
        self.costs = costs or PreemptionCosts(DEFAULT_COSTS.copy_bytes_per_s, DEFAULT_COSTS.prefill_tokens_per_s,
                                              DEFAULT_COSTS.decode_step_s, DEFAULT_COSTS.bytes_per_block)
        self.clock = clock
        self._preemptions_by_mode = {"swap": 0, "recompute": 0}
        self.virtual = VirtualClock()                 # weighted fair queuing between tenants
        self._tenant_requests: dict = {}              # tenant → its live requests (running or waiting)
        self._tenant_tokens: dict = {}                # tenant → tokens run since start
        self._weights: dict = {}                      # this step's weight per tenant with work
        self._max_queue_time_s = 0.0
        self._max_wait_over_aging_s = float("-inf")
        self._order: list[Request] = []               # this step's admission order

    # ---- intake ------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
        if request.num_prompt_tokens >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {request.num_prompt_tokens} tokens; this model's context allows at most "
                f"{self.max_model_len - 1} prompt tokens (--max-model-len {self.max_model_len})", "messages")
        self.requests[request.request_id] = request
        if request.tenant not in self._tenant_requests:
            self.virtual.activate(request.tenant, set(self._tenant_requests))
            self._tenant_requests[request.tenant] = 0
        self._tenant_requests[request.tenant] += 1
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
        first, in order; when the pool runs dry the policy's victim is preempted. New requests are
        admitted only from what is left, and not at all in a step that had to preempt.

        Before anything is scheduled, a waiting request takes the seat and blocks of running
        requests it outranks (_make_room: foreground over background, a higher priority under the
        priority policy, a tenant below its fair share over one above it); preempted requests are
        swapped out or recomputed, whichever costs less. When several tenants have work, each
        takes at most its weighted share of the step's tokens (fair.py).

        Background requests (batch jobs) fill what foreground ones leave; while a foreground prompt
        is being prefilled they sit the step out, so that its first token comes as fast as on an
        idle engine; and while foreground
        requests are around, background work is cut so that a step takes at most
        `background_step_factor` times the fastest recent step (BackgroundGovernor), which bounds
        how long a newly arriving request waits for the step in flight.
        """
        self.kv.expire_pins()
        self._weights = self._tenant_weights()
        self._order = self._admission_order()
        caps = self._tenant_caps()      # as they stand; a request _make_room preempts waits this step anyway
        self._make_room(caps)
        background = self._background_allowance()
        self._governed = background is not None and background > 0
        budget = _StepBudget(self.config.max_num_batched_tokens, background, caps,
                             self._over_share, self._over_share_allowance())
        chunks: list[ScheduledChunk] = []
        sat_out: set[str] = set()
        preempted = self._schedule_running(budget, chunks, sat_out)
        first_waiting = next(self._waiting_in_order(), None)
        if not preempted:
            self._admit_waiting(budget, chunks)
        if caps is not None:
            # A share a tenant could not use counts as served: the leftover tokens of the next
            # steps then go round to the others, instead of to it for as long as it stays stuck.
            for tenant, unused in caps.items():
                if unused > 0:
                    self.virtual.charge(tenant, unused, self._weights.get(tenant, 1.0))
            if budget.tokens > 0 and not preempted:
                # Work conservation: tokens a tenant's share left unused (its requests could not
                # take them: swapped out with no room to come back, waiting on a prefix in flight)
                # go to running requests that the caps held back. Without this, a tenant that can
                # never use its share could hold another's running request at 0 tokens step after
                # step, neither finishing nor freeing its blocks. Nothing scheduled is preempted
                # here; and when the request that outranked some running prompts got its first
                # chunk in this step, those prompts keep sitting out, so that the step stays short.
                scheduled = {c.request_id for c in chunks}
                held = sat_out if first_waiting is not None and first_waiting.request_id in scheduled else set()
                budget.tenant_caps = None
                self._schedule_running(budget, chunks, set(), skip=scheduled | held)
        if not chunks and not preempted and self.requests:
            self._break_stall(chunks)
        finished, self._finished_ids = frozenset(self._finished_ids), set()
        return SchedulerOutput(tuple(chunks), finished, self.kv.take_swaps())

    def _break_stall(self, chunks: list[ScheduledChunk]) -> None:
        """A safety net. A step that schedules nothing while requests wait or run would be the
        same step again and again (the engine loop spinning, those requests hanging): some rule
        held each request back for another that was held back in turn. Such a step is planned
        again with the rules that can do that off: no fair caps, no background limit, no sitting
        out for an outranking prompt, no waiting for a prefix in flight. It is counted
        (`num_stalls_broken`, the `kvserve:scheduler_stalls_broken` metric) and logged, and the
        scheduler's property tests require that it never happens: it is there for a bug they
        have not found."""
        self.num_stalls_broken += 1
        if self.num_stalls_broken == 1 or self.num_stalls_broken % 1000 == 0:
            log.warning("the scheduler found nothing to run with %d requests running and %d waiting; "
                        "scheduling without fair caps, sit-outs or prefix waits (%d such steps so far)",
                        len(self.running), len(self.waiting), self.num_stalls_broken)
        self._forced = True
        try:
            budget = _StepBudget(self.config.max_num_batched_tokens)
            if not self._schedule_running(budget, chunks, set()):
                self._admit_waiting(budget, chunks)
        finally:
            self._forced = False

    # ---- who outranks whom --------------------------------------------------------------------
    def _outranks(self, waiting: Request, running: Request, seats: dict) -> bool:
        """May `waiting` take the seat and blocks of `running`? Foreground outranks background; under
        the priority policy a lower `priority` value outranks a higher one; between equals, a
        tenant below its fair share of seats outranks one above it (`seats`: running per tenant)."""
        if waiting.background != running.background:
            return running.background
        if self.config.policy == "priority" and waiting.priority != running.priority:
            return waiting.priority < running.priority
        if waiting.tenant == running.tenant or len(self._tenant_requests) < 2:
            return False
        return (seats.get(waiting.tenant, 0) + 1 <= self._fair_seats(waiting.tenant)
                and seats.get(running.tenant, 0) > self._fair_seats(running.tenant))

    def _seats_by_tenant(self) -> dict:
        """Running requests per tenant, counted afresh (callers then adjust their copy)."""
        return Counter(request.tenant for request in self.running)

    def _fair_seats(self, tenant) -> float:
        return self.config.max_num_seqs * self._weights[tenant] / sum(self._weights.values())

    def _tenant_weights(self) -> dict:
        weights: dict = {}
        for request in self.requests.values():
            weights[request.tenant] = max(weights.get(request.tenant, 0.0), request.weight)
        return weights

    def _make_room(self, caps: dict | None) -> None:
        """A waiting request that lacks a seat or KV blocks takes them from running requests it
        outranks (see _outranks), the least important first (the end of the policy's running
        order), if that frees enough; otherwise nobody is preempted for it. Waiting requests are
        considered in admission order; one that cannot be placed waits for a seat to free (after
        MAX_UNPLACED of those, the rest wait too: this runs every step). Nobody is preempted for a
        request that could not run this step: one whose tenant gets no tokens (`caps`, the fair
        shares as they stand), or one past what the step's token budget can start (every request
        placed takes at least a token). The one preempted for it might take the freed token back
        next step, and so on for ever."""
        if not self.waiting or not self.running:
            return
        self.waiting.order_running(self.running)
        seats_free = self.config.max_num_seqs - len(self.running)
        free = self.kv.stats().num_free_blocks
        seats = self._seats_by_tenant()
        tokens_free = self.config.max_num_batched_tokens - len(self.running)
        unplaced = 0
        for request in self._waiting_in_order():
            need = self.kv.blocks_for(request.num_tokens + 1)
            if seats_free < 1 or free < need:
                if unplaced >= MAX_UNPLACED:
                    return
                if caps is not None and caps.get(request.tenant, 0) <= 0:
                    unplaced += 1
                    continue
                victims, gain_seats, gain_blocks = [], 0, 0
                for victim in reversed(self.running):
                    if seats_free + gain_seats >= 1 and free + gain_blocks >= need:
                        break
                    if self._outranks(request, victim, seats):
                        victims.append(victim)
                        gain_seats += 1
                        gain_blocks += self.kv.num_sole_blocks(victim)
                if seats_free + gain_seats < 1 or free + gain_blocks < need or tokens_free + gain_seats < 1:
                    unplaced += 1
                    continue
                for victim in victims:
                    self._preempt(victim)
                    seats[victim.tenant] -= 1
                seats_free += gain_seats
                free += gain_blocks
                tokens_free += gain_seats
            seats_free -= 1
            free -= need
            tokens_free -= 1
            seats[request.tenant] = seats.get(request.tenant, 0) + 1

    def _tenant_caps(self) -> dict | None:
        """Fair shares of this step's tokens, when two or more tenants have work (see fair.py)."""
        if len(self._tenant_requests) < 2:
            return None
        demands: dict = {}
        for request in self.requests.values():
            demands[request.tenant] = demands.get(request.tenant, 0) + request.num_tokens - request.num_computed_tokens
        return fair_caps(demands, self._weights, self.config.max_num_batched_tokens, self.virtual.time)

    # ---- admission order ----------------------------------------------------------------------
    def _waiting_in_order(self):
        """This step's admission order (computed once per step), without requests that left the
        queue since, nor those preempted in this step (they wait at least one step)."""
        for request in self._order:
            if request.status == RequestStatus.WAITING or (
                    request.status == RequestStatus.PREEMPTED and request.request_id in self.requests):
                yield request

    def _admission_order(self) -> list[Request]:
        """Waiting requests in the order admission considers them: the policy's order (for
        cache-aware, cached prefixes first with aging, see policy.cache_aware_order); then, when
        several tenants wait, interleaved by weighted fair queuing within each lane and priority."""
        order = list(self.waiting)
        if self.config.policy == "cache-aware" and len(order) > 1:
            in_flight = self._prefix_blocks_being_computed()
            now = self.clock()
            foreground = [r for r in order if not r.background]
            background = [r for r in order if r.background]
            order = [*self._cache_aware(foreground, now, in_flight), *self._cache_aware(background, now, in_flight)]
        if len({r.tenant for r in order}) > 1:
            order = self._interleave_tenants(order)
        return order

    def _cache_aware(self, requests: list[Request], now: float, in_flight: set[bytes]) -> list[Request]:
        def cached(request: Request) -> int:
            if self.kv.is_swapped(request):
                return request.num_computed_tokens
            hit = self.kv.match(request)
            n = hit.num_blocks
            usable = (request.num_tokens - 1) // self.kv.block_size
            while n < usable and request.block_hashes[n] in in_flight:
                n += 1
            return n * self.kv.block_size

        def service(request: Request, num_cached: int) -> float:
            output = min(request.sampling_params.max_tokens - request.num_output_tokens, 256)
            return self.costs.service_s(request.num_tokens - num_cached, max(output, 1))

        return cache_aware_order(requests, now, cached, service, self.config.aging_factor)

    def _interleave_tenants(self, order: list[Request]) -> list[Request]:
        """Weighted fair queuing: within each class (lane, and priority under the priority policy),
        the tenant with the least virtual time goes next, charged its request's uncomputed tokens."""
        def klass(request: Request) -> tuple:
            return request.background, request.priority if self.config.policy == "priority" else 0

        result: list[Request] = []
        clock = dict(self.virtual.time)
        seats = self._seats_by_tenant()
        i = 0
        while i < len(order):
            j = i
            while j < len(order) and klass(order[j]) == klass(order[i]):
                j += 1
            queues: dict = {}
            for request in order[i:j]:
                queues.setdefault(request.tenant, []).append(request)
            heads = {tenant: 0 for tenant in queues}
            while heads:
                tenant = min(heads, key=lambda t: (clock.get(t, 0.0), seats.get(t, 0) / self._weights.get(t, 1.0),
                                                   list(queues).index(t)))
                request = queues[tenant][heads[tenant]]
                result.append(request)
                clock[tenant] = clock.get(tenant, 0.0) + (request.num_tokens - request.num_computed_tokens) / request.weight
                heads[tenant] += 1
                if heads[tenant] == len(queues[tenant]):
                    del heads[tenant]
            i = j
        return result

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

    def _over_share_allowance(self) -> int | None:
        """Prompt tokens the tenants over their fair share may take in this step, in all: while a
        tenant within its share (live requests <= its fair seats) has work, and `interactive_linger_s`
        after, the share governor's budget; no limit otherwise. A request of the tenant within its share
        that arrives then waits for a short step, not for another tenant's long prompt chunks."""
        if not self.config.tenant_step_factor:
            return None
        now = time.monotonic()
        if len(self._tenant_requests) >= 2:
            over = frozenset(t for t, live in self._tenant_requests.items() if live > self._fair_seats(t))
            # Everyone over their share, or nobody: nothing is cut, at once.
            self._over_share = over if len(over) < len(self._tenant_requests) else frozenset()
            if self._over_share:
                self._under_share_seen = now
        elif self._over_share:
            # With one tenant left the cut lingers (the light tenant's next request is usually on its
            # way), for tenants that still have work.
            recent = now - self._under_share_seen <= self.config.interactive_linger_s
            self._over_share = frozenset(t for t in self._over_share if recent and t in self._tenant_requests)
        return int(self.share_governor.allowance()) if self._over_share else None

    def observe_step(self, plan: SchedulerOutput, seconds: float) -> None:
        """The engine core reports how long each step took (the background governor learns)."""
        if not plan.chunks:
            return
        all_rows = sum(1 for chunk in plan.chunks if chunk.num_tokens == 1)
        self.costs.observe(seconds, plan.num_batched_tokens - all_rows, all_rows)
        rows = prefill = over_share = 0
        for chunk in plan.chunks:
            request = self.requests.get(chunk.request_id)
            if request is not None and request.background:
                rows, prefill = (rows + 1, prefill) if chunk.num_tokens == 1 else (rows, prefill + chunk.num_tokens)
            if request is not None and request.tenant in self._over_share and _prefilling(request):
                over_share += chunk.num_tokens      # (update() has not advanced the request yet)
        self.governor.observe(seconds, BackgroundGovernor.units(rows, prefill), self._governed)
        if self._over_share:     # the step was planned under the share governor's budget
            # The floor: the step less its governed prompt tokens at the measured prefill speed (a
            # flooding tenant may have prompt chunks in every step), never below half a decode step
            # (where a prompt chunk costs little more than a decode, as on a GPU, the estimate could
            # reach 0). Ungoverned steps set none.
            floor = max(seconds - over_share / self.costs.prefill_tokens_per_s,
                        0.5 * min(self.costs.decode_step_s, seconds))
            self.share_governor.observe(seconds, over_share, floor_s=floor)

    def _schedule_running(self, budget: "_StepBudget", chunks: list[ScheduledChunk], sat_out: set[str],
                          skip: set[str] | None = None) -> bool:
        """Serve running requests in policy order; True if a request had to be preempted. A
        running prompt that a waiting request outranks sits the step out (its decodes still run),
        so that the waiting one's prompt gets the step's tokens at once (its id goes in `sat_out`).
        With `skip` (the work-conserving second pass): those are passed over (the caller puts
        there those that must keep sitting out), and a request that finds no blocks may preempt
        only requests after it that have no chunk in this step."""
        preempted = False
        self.waiting.order_running(self.running)
        first_waiting = next(self._waiting_in_order(), None)
        seats = self._seats_by_tenant() if first_waiting is not None else {}
        i = 0
        while i < len(self.running) and budget.tokens > 0:
            request = self.running[i]
            if skip is not None and request.request_id in skip:
                i += 1
                continue
            num_new = budget.grant(request, request.num_pending_tokens)
            if request.num_pending_tokens > 1 and first_waiting is not None and not first_waiting.background \
                    and not self._forced and skip is None and self._outranks(first_waiting, request, seats) \
                    and not request.background:
                sat_out.add(request.request_id)     # outranked (whether or not its tenant's cap left it any)
                if num_new > 1:
                    num_new = 0
            if num_new <= 0:
                if request.background:
                    break   # background work, left out of this step; it comes last in the order
                i += 1      # over its tenant's share of the step, or outranked: it waits a step
                continue
            if skip is not None:
                # Room may come only from requests after it in the policy's order that have no
                # chunk in this step (the last first).
                while not self.kv.allocate_slots(request, num_new):
                    victim = next((r for r in reversed(self.running[i + 1:]) if r.request_id not in skip), None)
                    if victim is None:
                        break
                    self._preempt(victim)
                else:
                    chunks.append(self._chunk(request, num_new))
                    budget.spend(request, num_new)
                i += 1
                continue
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
        side by side. Requests behind it are still considered.

        When the first request in order is admitted for its first chunk while lower-ranked work is
        running, requests it outranks are not admitted in the same step: the step that computes
        its first token stays short (the running prompts it outranks sit out too)."""
        if not self.waiting:
            return
        in_flight = self._prefix_blocks_in_flight({chunk.request_id for chunk in chunks})
        order = list(self._waiting_in_order())
        first = order[0] if order and order[0].first_scheduled_time is None else None
        seats = self._seats_by_tenant()
        if first is not None and not any(self._outranks(first, r, seats) for r in self.running):
            first = None   # nothing lower-ranked is running: admit as usual
        for request in order:
            if budget.tokens <= 0 or len(self.running) >= self.config.max_num_seqs:
                return
            if (first is not None and request is not first and first.status == RequestStatus.RUNNING
                    and self._outranks(first, request, seats)):
                continue
            if request.background and any(not r.background for r in self.waiting):
                return   # background work never takes what a waiting foreground request will need
            if self.kv.is_swapped(request):
                num_new = budget.grant(request, request.num_tokens - request.num_computed_tokens)
                if num_new <= 0:
                    if request.background:
                        return
                    continue
                if not self.kv.swap_in(request, num_new):
                    return
                self._start_running(request, budget, chunks, num_new)
                continue
            hit = self.kv.match(request)
            usable = (request.num_tokens - 1) // self.kv.block_size    # blocks a hit may cover (see match)
            if hit.num_blocks < usable and request.block_hashes[hit.num_blocks] in in_flight and not self._forced:
                self.num_prefix_waits += 1
                continue
            num_cached = hit.num_blocks * self.kv.block_size
            num_new = budget.grant(request, request.num_tokens - num_cached)
            if num_new <= 0:
                if request.background:
                    return   # background work, left out of this step (only background waits behind it)
                continue     # its tenant's share of the step is spent

            while not self.kv.allocate_slots(request, num_new, hit):
                # Nothing running will free blocks: pinned prefixes give way rather than starve it.
                if self.running or not self.kv.release_oldest_pin():
                    return
                hit = self.kv.match(request)
                num_cached = hit.num_blocks * self.kv.block_size
                num_new = budget.grant(request, request.num_tokens - num_cached)
            request.num_computed_tokens = num_cached
            if request.num_cached_tokens is None:
                request.num_cached_tokens = min(num_cached, request.num_prompt_tokens)
            self._start_running(request, budget, chunks, num_new)
            in_flight.update(self._uncomputed_prompt_blocks(request))

    def _start_running(self, request: Request, budget: "_StepBudget", chunks: list[ScheduledChunk],
                       num_new: int) -> None:
        self.waiting.remove(request)
        if request.first_scheduled_time is None:
            request.first_scheduled_time = self.clock()
            wait = request.first_scheduled_time - request.arrival_time
            output = min(request.sampling_params.max_tokens, 256)
            service = self.costs.service_s(request.num_prompt_tokens - (request.num_cached_tokens or 0), output)
            self._max_queue_time_s = max(self._max_queue_time_s, wait)
            self._max_wait_over_aging_s = max(self._max_wait_over_aging_s, wait - self.config.aging_factor * service)
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        chunks.append(self._chunk(request, num_new))
        budget.spend(request, num_new)

    def _prefix_blocks_being_computed(self) -> set[bytes]:
        """Hashes of the full prompt blocks foreground prefills have yet to compute, for ordering
        (cache-aware counts them as good as cached: they will be by the time the request runs)."""
        return {h for r in self.running if not r.background for h in self._uncomputed_prompt_blocks(r)}

    def _prefix_blocks_in_flight(self, scheduled: set[str]) -> set[bytes]:
        """Hashes of the full prompt blocks that prefills scheduled in this step have yet to
        compute. A prefill that sits this step out does not count: a request must not wait for a
        block that nobody is computing, least of all one whose prefill sits out because that very
        request outranks it (background work held back for it, a prompt it outranks: each would
        wait for the other for ever)."""
        return {h for r in self.running if r.request_id in scheduled for h in self._uncomputed_prompt_blocks(r)}

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
            self._tenant_tokens[request.tenant] = self._tenant_tokens.get(request.tenant, 0) + chunk.num_tokens
            self.virtual.charge(request.tenant, chunk.num_tokens, request.weight)
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
        self._tenant_requests[request.tenant] -= 1
        if not self._tenant_requests[request.tenant]:
            del self._tenant_requests[request.tenant]
            self.virtual.forget_idle(set(self._tenant_requests))

    def _preempt(self, request: Request) -> None:
        """Take a running request off the running list to wait again: its blocks are swapped out
        to the host tier, or freed to be recomputed, whichever costs less (see cost.py)."""
        self.running.remove(request)
        if self._preemption_mode(request) == "swap" and self.kv.swap_out(request):
            mode = "swap"
        else:
            self.kv.free(request)
            request.num_computed_tokens = 0
            mode = "recompute"
        self._preemptions_by_mode[mode] += 1
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self._num_preemptions += 1
        self.waiting.requeue(request)

    def _preemption_mode(self, request: Request) -> str:
        mode = self.config.preemption_mode
        if mode != "auto" or not self.kv.host.num_slots:
            return mode
        num_blocks = len(self.kv.block_ids(request.request_id))
        shared = num_blocks - self.kv.num_sole_blocks(request)
        return self.costs.choose(num_blocks, max(0, request.num_computed_tokens - shared * self.kv.block_size))

    # ---- introspection -----------------------------------------------------------------------
    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def stats(self) -> SchedulerStats:
        kv = self.kv.stats()
        return SchedulerStats(len(self.running), len(self.waiting), self._num_preemptions, kv,
                              self._num_computed_tokens, self._preemptions_by_mode["swap"],
                              self._preemptions_by_mode["recompute"],
                              kv.blocks_swapped_out * self.costs.bytes_per_block,
                              dict(self._tenant_tokens) if any(t is not None for t in self._tenant_tokens) else None,
                              self._max_queue_time_s, self._max_wait_over_aging_s, self.num_stalls_broken)

    def check_integrity(self) -> None:
        self.kv.check_integrity()
        for request in self.running:
            assert request.status == RequestStatus.RUNNING
            held = len(self.kv.block_ids(request.request_id)) * self.kv.block_size
            assert held >= request.num_computed_tokens, request
        for request in self.waiting:
            assert request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
            assert not self.kv.block_ids(request.request_id), f"waiting {request} holds blocks"
            if self.kv.is_swapped(request):
                assert request.num_computed_tokens > 0, request
            else:
                assert request.num_computed_tokens == 0, f"waiting {request} claims computed tokens"
        live: dict = {}
        for request in self.requests.values():
            live[request.tenant] = live.get(request.tenant, 0) + 1
        assert live == self._tenant_requests, (live, self._tenant_requests)
