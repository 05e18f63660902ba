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
    def __init__(self, factor: float, maximum: int, window: int = 64):
        self.factor = factor
        self.maximum = maximum
        self.budget = float(maximum)          # background units a step may carry
        self._floor: deque[float] = deque(maxlen=window)   # recent steps without background work

    @staticmethod
    def units(decode_rows: int, prefill_tokens: int) -> float:
        return decode_rows + PREFILL_TOKEN_UNITS * prefill_tokens

    @property
    def target_s(self) -> float | None:
        return self.factor * min(self._floor) if self._floor else None

    def observe(self, seconds: float, background_units: float, governed: bool = True) -> None:
        """One step ran, carrying `background_units` of background work; `governed`: the step was
        planned under the budget (only those steps move it)."""
        if background_units <= 0:
            self._floor.append(seconds)
            return
        target = self.target_s
        if not governed or target is None:
            return
        if seconds > target:
            self.budget = max(1.0, self.budget * DECREASE)
        else:
            self.budget = min(float(self.maximum), self.budget + 1.0)

    def allowance(self) -> float:
        return math.floor(self.budget)
