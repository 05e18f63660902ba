"""What a step costs on this machine, learnt from the steps themselves: step seconds ≈ a + b × tokens.

The engine core reports every step it runs (tokens scheduled, seconds taken); the fit is an
exponentially weighted least-squares line over them, so it follows the machine, the model and the
context lengths as they drift. The scheduler asks it how many tokens fit in a time budget; until it
has seen enough varied steps it answers None (no opinion), and the caller keeps its default.

    seconds
      │            ·  ·
      │       · ·        a = the fixed cost of a step (weights read once, launch, Python)
      │   ·  ·           b = the cost of one more token in it
      │ ·
      └──────────────── tokens

Pure Python (no torch).
"""

from __future__ import annotations

import math

MIN_STEPS = 8             # steps seen before the fit is trusted
MIN_SPREAD_TOKENS = 4.0   # ... and they must differ in size by this much (else b is unknown)


class StepCostModel:
    def __init__(self, half_life_steps: float = 200.0):
        self._decay = math.exp(math.log(0.5) / half_life_steps)
        self._n = self._w = self._x = self._y = self._xx = self._xy = 0.0

    def observe(self, num_tokens: int, seconds: float) -> None:
        d = self._decay
        self._n += 1
        self._w = d * self._w + 1.0
        self._x = d * self._x + num_tokens
        self._y = d * self._y + seconds
        self._xx = d * self._xx + num_tokens * num_tokens
        self._xy = d * self._xy + num_tokens * seconds

    def line(self) -> tuple[float, float] | None:
        """(a, b) in seconds and seconds per token, or None while the fit is not trustworthy."""
        if self._n < MIN_STEPS:
            return None
        mean_x, mean_y = self._x / self._w, self._y / self._w
        var_x = self._xx / self._w - mean_x * mean_x
        if var_x < MIN_SPREAD_TOKENS ** 2:
            return None
        b = max((self._xy / self._w - mean_x * mean_y) / var_x, 1e-9)
        a = max(mean_y - b * mean_x, 0.0)
        return a, b

    def tokens_within(self, seconds: float) -> int | None:
        """How many tokens a step may hold and still take at most `seconds` (at least 1)."""
        fit = self.line()
        if fit is None:
            return None
        a, b = fit
        return max(1, int((seconds - a) / b))
