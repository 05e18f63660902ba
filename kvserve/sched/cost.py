"""How much background work a step may carry while interactive requests are around.

A request that arrives waits for the step in flight to end before its prompt can run, so the
length of the steps bounds how much background work (batch jobs) can slow its first token. The
governor keeps steps that carry background work within `factor` times the fastest recent step
without any (a foreground prefill, which background work sits out, or a foreground decode alone),
whatever the machine, model or context:

    after a governed step with background work in it:   longer than the target → budget × 0.7
                                                        within it              → budget + 1
    target = factor × the shortest of the last `window` steps that carried no background work

The budget counts background units: a decoding request is one, a prompt token of a prefill chunk
a quarter (it shares the step's weight reads with the chunk's other tokens). Additive increase,
multiplicative decrease: it settles just under the target and follows drift (longer contexts,
another model), without a model of what a step costs. Pure Python (no torch).
"""

from __future__ import annotations

import math
from collections import deque

PREFILL_TOKEN_UNITS = 0.25
DECREASE = 0.7


class BackgroundGovernor:
    def __init__(self, factor: float, maximum: int, window: int = 64, increase: float = 1.0, minimum: float = 1.0):
        """`increase`: what a step within the target adds to the budget (one unit: a decode row);
        `minimum`: the budget never goes below it."""
        self.factor = factor
        self.maximum = maximum
        self.increase = increase
        self.minimum = minimum
        self.budget = float(maximum)          # background units a step may carry
        self._floor: deque[float] = deque(maxlen=window)   # recent steps without background work

    @staticmethod
    def units(decode_rows: int, prefill_tokens: int) -> float:
        return decode_rows + PREFILL_TOKEN_UNITS * prefill_tokens

    @property
    def target_s(self) -> float | None:
        return self.factor * min(self._floor) if self._floor else None

    def observe(self, seconds: float, background_units: float, governed: bool = True,
                floor_s: float | None = None) -> None:
        """One step ran, carrying `background_units` of background work; `governed`: the step was
        planned under the budget (only those steps move it). `floor_s`: what the step would have
        taken without that work, where the caller can tell (otherwise only steps without any set
        the floor)."""
        if floor_s is not None:
            self._floor.append(floor_s)
        if background_units <= 0:
            if floor_s is None:
                self._floor.append(seconds)
            return
        target = self.target_s
        if not governed or target is None:
            return
        if seconds > target:
            self.budget = max(self.minimum, self.budget * DECREASE)
        else:
            self.budget = min(float(self.maximum), self.budget + self.increase)

    def allowance(self) -> float:
        return math.floor(self.budget)


class PreemptionCosts:
    """What preempting a request costs each way, from figures measured on this machine at start-up
    (ModelRunner.measure_costs), and the per-step service estimates the cache-aware order uses:

        swap       2 × (its blocks × bytes per block) / copy bandwidth        (out now, back in later)
        recompute  (its computed tokens − those in blocks other requests hold) / prefill speed

    Blocks that other requests also hold stay in the pool, so a recompute finds them as a prefix
    hit; the rest must be run through the model again. The cheaper one is chosen per request
    (--preemption-mode auto); swap needs room in the host tier (--kv-host-memory), and falls back
    to recompute when it has none.

    The prefill and decode figures are then followed step by step (an exponential average of the
    measured steps), so the estimates track longer contexts and a busier machine."""

    SMOOTHING = 0.1

    def __init__(self, copy_bytes_per_s: float, prefill_tokens_per_s: float, decode_step_s: float,
                 bytes_per_block: int):
        assert copy_bytes_per_s > 0 and prefill_tokens_per_s > 0 and decode_step_s > 0
        self.copy_bytes_per_s = copy_bytes_per_s
        self.prefill_tokens_per_s = prefill_tokens_per_s
        self.decode_step_s = decode_step_s
        self.bytes_per_block = bytes_per_block

    def swap_s(self, num_blocks: int) -> float:
        return 2 * num_blocks * self.bytes_per_block / self.copy_bytes_per_s

    def recompute_s(self, num_tokens: int) -> float:
        return num_tokens / self.prefill_tokens_per_s

    def choose(self, num_blocks: int, num_tokens_to_recompute: int) -> str:
        return "swap" if self.swap_s(num_blocks) < self.recompute_s(num_tokens_to_recompute) else "recompute"

    def service_s(self, num_uncached_tokens: int, num_output_tokens: int) -> float:
        """How long a request occupies the engine, roughly: its prompt's uncached tokens at the
        prefill speed, then one decode step per output token."""
        return self.recompute_s(num_uncached_tokens) + num_output_tokens * self.decode_step_s

    def observe(self, seconds: float, num_prefill_tokens: int, num_decode_rows: int) -> None:
        """A step ran: a prefill-only step updates the prefill speed, a decode-only one the step time."""
        if seconds <= 0:
            return
        a = self.SMOOTHING
        if num_prefill_tokens >= 64 and not num_decode_rows:
            self.prefill_tokens_per_s += a * (num_prefill_tokens / seconds - self.prefill_tokens_per_s)
        elif num_decode_rows and not num_prefill_tokens:
            self.decode_step_s += a * (seconds - self.decode_step_s)


# Used where nothing was measured (the scheduler alone, in tests): a CPU-like machine where copying
# a block is far cheaper than recomputing its tokens.
DEFAULT_COSTS = PreemptionCosts(copy_bytes_per_s=5e9, prefill_tokens_per_s=2000.0, decode_step_s=0.02,
                                bytes_per_block=256 * 1024)
