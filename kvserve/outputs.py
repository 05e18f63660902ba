"""What the engine hands outward: per-step token deltas and per-request text deltas."""

from __future__ import annotations

from dataclasses import dataclass

from kvserve.sampling import FinishReason


@dataclass(frozen=True)
class TokenLogprob:
    """The sampled token's log-probability and the top-N alternatives (raw model distribution)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class TokenDelta:
    """What one engine step did for one request: the tokens it appended, and whether it finished.

    Emitted by the scheduler's update; the output processor turns it into text.
    """

    request_id: str
    new_token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None = None
    finish_reason: FinishReason | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class RequestStats:
    """Token accounting of one request, final once the request finishes."""

    num_prompt_tokens: int
    num_cached_tokens: int        # prompt tokens whose KV came from the prefix cache
    num_output_tokens: int
    num_computed_tokens: int      # tokens this request actually ran through the model (recompute included)
    queue_time_s: float | None = None   # arrival to first scheduling; None while still waiting
    num_cache_write_tokens: int = 0     # prompt tokens this request wrote and pinned (not read ones)
    cache_writes_by_ttl: tuple[tuple[float, int], ...] = ()   # (ttl_s, tokens), longest TTL first


@dataclass(frozen=True)
class RequestOutput:
    """A text delta for one request. Streams are sequences of these; the last has finish_reason set."""

    request_id: str
    text: str                               # new text since the previous RequestOutput
    token_ids: tuple[int, ...]              # new tokens since the previous RequestOutput
    logprobs: tuple[TokenLogprob, ...] | None
    finish_reason: FinishReason | None
    stats: RequestStats

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def merge(older: RequestOutput, newer: RequestOutput) -> RequestOutput:
    """Two consecutive deltas of one request as one (text, tokens and log-probabilities joined)."""
    logprobs = None
    if older.logprobs is not None or newer.logprobs is not None:
        logprobs = (older.logprobs or ()) + (newer.logprobs or ())
    return RequestOutput(newer.request_id, older.text + newer.text, older.token_ids + newer.token_ids,
                         logprobs, newer.finish_reason, newer.stats)


def latest_stats(stream: object) -> RequestStats | None:
    """A stream's accounting as of the engine's newest delta, read or not (what a request cut short
    had cost), from streams that know it (the AsyncEngine's; not a replica's); else None."""
    method = getattr(stream, "latest_stats", None)
    return method() if method is not None else None
