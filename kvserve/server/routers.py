"""Routers as virtual models on the HTTP APIs (`--router chat=small,large`).

A `RoutedModel` stands where a `ServedModel` stands: requests name it in `model` (or Bedrock's
`modelId`), admission, tokenizing and sampling parameters are the same, and its `engine.add`
returns a `RoutedStream` (kvserve/routing/escalation.py) in place of one engine's stream. So
every API (OpenAI, Anthropic, Bedrock, WebSocket, batch) routes without a line of its own;
each reports the answering model and the routing record its own way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from kvserve.routing.escalation import RoutedStream
from kvserve.routing.predictor import latest_turn
from kvserve.routing.router import Router
from kvserve.sampling import InvalidRequestError


def routed_admission_load(routed: int, small_load: int, small_capacity: int, large_load: int,
                          large_capacity: int) -> int:
    """A router's load as its admission check sees it (`load + n > capacity + max_queued`, with the
    small model's capacity). Every routed answer starts on the small model and may escalate to the
    large one, so it is admitted only while both have room: the router's own choices plus the
    fuller of the two models, the large one's load shifted by the difference in capacities."""
    return routed + max(small_load, large_load + small_capacity - large_capacity)


@dataclass
class RoutedModel:
    router: Router
    members: dict          # model name → ServedModel, the router's models
    metrics: object
    created: int = field(default_factory=lambda: int(time.time()))
    in_flight: int = 0
    background_in_flight: int = 0
    live: set = field(default_factory=set)

    def __post_init__(self) -> None:
        small, large = (self.members[name] for name in self.router.config.models)
        if not same_tokenizer(small.tokenizer, large.tokenizer):
            raise InvalidRequestError(f"router {self.name!r}: {small.name} and {large.name} do not share a tokenizer, "
                                      "so one cannot continue the other's answer")
        self.engine = _RouterEngine(self)

    @property
    def name(self) -> str:
        return self.router.name

    @property
    def tokenizer(self):
        return self.members[self.router.config.small].tokenizer

    @property
    def max_model_len(self) -> int:
        return min(m.max_model_len for m in self.members.values())

    @property
    def capacity(self) -> int:
        return self.members[self.router.config.small].capacity

    @property
    def admission_load(self) -> int:
        """Interactive choices held against the queue cap (see routed_admission_load)."""
        small, large = (self.members[name] for name in self.router.config.models)
        return routed_admission_load(self.in_flight - self.background_in_flight, small.admission_load,
                                     small.capacity, large.admission_load, large.capacity)

    @property
    def cost_weight(self) -> float:
        return self.members[self.router.config.large].cost_weight

    def describe(self) -> dict:
        return {**self.router.describe(), "created": self.created,
                "cost_weights": {name: m.cost_weight for name, m in self.members.items()}}


class _RouterEngine:
    """The `engine.add` of a RoutedModel."""

    def __init__(self, routed: RoutedModel):
        self.routed = routed

    @property
    def engine(self):
        """The small model's engine, for what the pair shares (end tokens, tokenizer)."""
        return self.routed.members[self.routed.router.config.small].engine.engine

    async def add(self, prompt: list[int], params, turn: tuple[str, int] | None = None, **kwargs) -> RoutedStream:
        """`turn`: the latest turn as `turn_of` gives it, from the chat message being answered (the
        chat APIs pass it); without it (a completion's raw prompt) it is found in the prompt's tokens."""
        routed = self.routed
        tokenizer = routed.tokenizer
        for member in routed.members.values():     # bad input is refused now (400), by either model
            member.engine.engine.make_request(prompt, params, "validation", **{
                k: v for k, v in kwargs.items() if k != "quiet"})
        # The lexical signals read the latest turn, not the system prompt or the history before it.
        text, turn_tokens = turn if turn is not None else turn_of(prompt, tokenizer, None)
        metrics = routed.metrics

        def observe(kind: str, seconds: float) -> None:
            metrics.routing_seconds.labels(routed.name, kind).observe(seconds)

        return RoutedStream(routed.router, routed.members, list(prompt), text, params, kwargs,
                            lambda ids: tokenizer.decode(ids, skip_special_tokens=False), observe,
                            turn_tokens=turn_tokens)


def turn_of(prompt: list[int], tokenizer, turn: str | None, tail: int = 256) -> tuple[str, int]:
    """The latest turn's text (its last `tail` tokens, which the lexical signals read) and length in
    tokens. From the message's own text when the API layer knows it: the length of its content
    alone, whatever the template wraps it in (Phi-3's or Mistral's reply marker does not close the
    user's turn, so a span of markers would take in the previous answer too). Else the span between
    the prompt's turn markers (predictor.latest_turn)."""
    if turn is not None:
        ids = tokenizer.encode(turn, add_special_tokens=False)
        return tokenizer.decode(ids[-tail:], skip_special_tokens=True), len(ids)
    start, end = latest_turn(prompt, tokenizer.special_ids)
    return tokenizer.decode(list(prompt[max(start, end - tail):end]), skip_special_tokens=True), end - start


def same_tokenizer(a, b) -> bool:
    """The same vocabulary and special tokens: probed by size, end tokens and a few encodings."""
    probes = ["Hello, world!", "def f(x):\n    return x * 2\n", "12345 + 678 = ?", "naïve 日本語 😀"]
    try:
        return (a.vocab_size == b.vocab_size and a.eos_token_ids == b.eos_token_ids
                and all(a.encode(p) == b.encode(p) for p in probes))
    except AttributeError:
        return a is b
