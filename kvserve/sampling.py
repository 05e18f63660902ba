"""SamplingParams (frozen, validated at construction) and FinishReason."""

from __future__ import annotations

import enum
from dataclasses import dataclass

MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20


class InvalidRequestError(ValueError):
    """User input is invalid. `param` names the offending field (OpenAI-style) when known."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class FinishReason(str, enum.Enum):
    STOP = "stop"        # an end token, a stop token id, or a stop string
    LENGTH = "length"    # max_tokens or the context length
    ABORT = "abort"      # cancelled by the client or the server
    ERROR = "error"      # the engine failed to run this request (the others in its step went on)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    temperature == 0 is greedy. top_k == 0 and top_p == 1 disable those filters.
    `seed` makes sampling reproducible per request, independent of batch composition.
    `logprobs` = N returns the sampled token's logprob and the top N alternatives.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self) -> None:
        # Accept lists from callers; store tuples so the object stays hashable and frozen.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        self._validate()

    def _validate(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}", "max_tokens")
        if not 0.0 <= self.temperature <= 2.0:
            raise InvalidRequestError(f"temperature must be between 0 and 2, got {self.temperature}", "temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be 0 (disabled) or positive, got {self.top_k}", "top_k")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidRequestError(f"seed must be a non-negative 63-bit integer, got {self.seed}", "seed")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError(
                f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(self.stop)}", "stop")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequestError("stop strings must be non-empty strings", "stop")
        for t in self.stop_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise InvalidRequestError(f"stop_token_ids must be non-negative integers, got {t!r}", "stop_token_ids")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequestError(
                f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {self.logprobs}", "logprobs")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
