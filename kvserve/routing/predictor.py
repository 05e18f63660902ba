"""The quality estimates a router decides with, and how they are calibrated.

Small logistic models, each over a handful of signals that cost next to nothing on a CPU:

    p_small_text(prompt)     P(the small model answers this prompt well)     before any model runs
    p_large_text(prompt)     P(the large model answers it well)              before any model runs
    p_small(prompt)          P(the small model answers this prompt well)     after the small prefill
    p_large(prompt)          P(the large model answers it well)              after the small prefill
    q_small(prompt, answer)  P(this small-model answer is good)              after (part of) the answer

The text signals are lexical (length, code, digits) and read the latest turn only: the message
being answered, not the history before it, so a long chat stays in the range the estimates were
fitted on (each estimate also clamps its signals to that range). The chat APIs pass that
message's text; a raw prompt's latest turn is found between its turn markers (`latest_turn`). They are known
before any model runs, so a prompt they already mark as one for the large model goes there
without paying the small model's prefill (the `_text` pair; optional, absent from older
calibration files). The prompt signals add the small model's own prefill statistics (the
probability and the top-k entropy of its first token; the small model prefills the prompt anyway
when it is tried, so they are nearly free). The answer signals are training-free scores of the
answer's token log-probabilities: the mean and the lowest decile (and `window`: 0 for the
held-back prefix, k for the k-th later window) (Gupta et al., ICLR 2024, "Language Model Cascades:
Token-level uncertainty and beyond": a low quantile beats the mean on longer answers, because one
confidently-wrong stretch hides in a mean).

The rule is Bedrock's (IPR, arXiv 2509.06274): a cheaper model is chosen when its predicted
quality is within the router's tolerance of the better model's, p_small >= p_large - tolerance.
Instead of IPR's trained encoder per model (1.5 M labelled prompts), the estimates are fitted on
kvserve's own labelled set (`kvserve bench routing --calibrate`), which is small: so the models
are logistic regressions over 4-8 signals, fitted in plain Python. No torch, no numpy.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# What the signals mean, recorded with each routing decision: 2 = the latest turn is the message
# being answered (its text from the API layer). A calibration fitted on answers recorded under
# another definition would be skewed (1: the span between reply markers, 4 tokens longer in ChatML).
SIGNALS_VERSION = 2
TEXT_SIGNALS = ("log_turn_tokens", "code", "digits")
PROMPT_SIGNALS = ("first_token_logprob", "first_token_entropy", *TEXT_SIGNALS)
ANSWER_SIGNALS = ("mean_logprob", "low_logprob", "first_token_logprob", "code")
# Every signal a router computes (`window`: which window of the answer is scored, 0 for the held-back prefix).
KNOWN_SIGNALS = frozenset(PROMPT_SIGNALS) | frozenset(ANSWER_SIGNALS) | {"window"}

_CODE = re.compile(r"```|\bdef |\bclass |\bfunction\b|\bpython\b|\bSQL\b|\breturn\b|\bimplement|\bcode\b",
                   re.IGNORECASE)


def latest_turn(prompt_ids: Sequence[int], special_ids: Collection[int]) -> tuple[int, int]:
    """The latest turn of a templated prompt, as a [start, end) span of token positions: the tokens
    between the last two occurrences of the special token that opens the reply (ChatML's
    <|im_start|>, Llama 3's <|end_header_id|>, Gemma's <start_of_turn>), that is, the role and text
    of the message being answered. Without a marker (a raw completion prompt) the whole prompt;
    with a marker but nothing before it (a BOS), what follows it."""
    n = len(prompt_ids)
    last = next((i for i in range(n - 1, -1, -1) if prompt_ids[i] in special_ids), None)
    if last is None:
        return 0, n
    marker = prompt_ids[last]
    previous = next((i for i in range(last - 1, -1, -1) if prompt_ids[i] == marker), -1)
    return (previous + 1, last) if last > previous + 1 else (last + 1, n)


def text_signals(turn_text: str, turn_tokens: int) -> dict[str, float]:
    """Signals of a prompt known before any model runs, from its latest turn (`latest_turn`): its
    length in tokens and its kind (code, digits)."""
    digits = sum(ch.isdigit() for ch in turn_text)
    return {"log_turn_tokens": math.log1p(turn_tokens), "code": 1.0 if _CODE.search(turn_text) else 0.0,
            "digits": min(1.0, digits / 8)}


def prompt_signals(turn_text: str, turn_tokens: int, first_token_logprob: float,
                   first_top_logprobs: Sequence[float]) -> dict[str, float]:
    """Signals of a prompt after the small model's prefill: its first-token probability and top-k
    entropy (from the top log-probabilities it returned, renormalised), and the text signals."""
    probs = [math.exp(lp) for lp in first_top_logprobs] or [math.exp(first_token_logprob)]
    total = sum(probs)
    entropy = -sum(p / total * math.log(p / total) for p in probs if p > 0)
    return {"first_token_logprob": first_token_logprob, "first_token_entropy": entropy,
            **text_signals(turn_text, turn_tokens)}


def answer_scores(logprobs: Sequence[float], quantile: float = 0.1) -> dict[str, float]:
    """Training-free confidence of an answer (or a window of one): mean token log-probability and
    the `quantile` lowest one (nearest rank). An empty answer scores 0 (nothing to doubt)."""
    if not logprobs:
        return {"mean_logprob": 0.0, "low_logprob": 0.0}
    ordered = sorted(logprobs)
    rank = min(len(ordered) - 1, max(0, math.ceil(quantile * len(ordered)) - 1))
    return {"mean_logprob": sum(ordered) / len(ordered), "low_logprob": ordered[rank]}


@dataclass
class Logistic:
    """P(y = 1 | x) = sigmoid(bias + sum(weight[name] * x[name])) over named signals. A signal with
    a fitted range is clamped to it first: outside the range the estimate is not extrapolated
    (a prompt twice as long as any in the labelled set is scored as the longest one there)."""

    weights: dict[str, float] = field(default_factory=dict)
    bias: float = 0.0
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)

    def __call__(self, signals: dict[str, float]) -> float:
        z = self.bias
        for name, w in self.weights.items():
            x = signals.get(name, 0.0)
            if name in self.ranges:
                low, high = self.ranges[name]
                x = min(high, max(low, x))
            z += w * x
        return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))

    @classmethod
    def fit(cls, rows: Sequence[dict[str, float]], labels: Sequence[bool], names: Sequence[str],
            l2: float = 0.01, steps: int = 3000, rate: float = 0.5) -> Logistic:
        """Ridge-regularised logistic regression by gradient descent on standardised signals (the
        returned weights apply to raw signals). Deterministic; a few thousand steps over a few
        hundred rows take well under a second."""
        n = len(rows)
        if n == 0:
            return cls()
        means = {k: sum(r.get(k, 0.0) for r in rows) / n for k in names}
        scales = {k: math.sqrt(sum((r.get(k, 0.0) - means[k]) ** 2 for r in rows) / n) or 1.0 for k in names}
        xs = [[(r.get(k, 0.0) - means[k]) / scales[k] for k in names] for r in rows]
        ys = [1.0 if y else 0.0 for y in labels]
        w, b = [0.0] * len(names), 0.0
        for _ in range(steps):
            gw, gb = [l2 * wi for wi in w], 0.0
            for x, y in zip(xs, ys):
                z = b + sum(wi * xi for wi, xi in zip(w, x))
                err = 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z)))) - y
                gb += err / n
                for j, xj in enumerate(x):
                    gw[j] += err * xj / n
            w = [wi - rate * g for wi, g in zip(w, gw)]
            b -= rate * gb
        weights = {k: wi / scales[k] for k, wi in zip(names, w)}
        ranges = {k: (min(r.get(k, 0.0) for r in rows), max(r.get(k, 0.0) for r in rows)) for k in names}
        return cls(weights, b - sum(weights[k] * means[k] for k in names), ranges)

    def to_json(self) -> dict:
        data: dict = {"weights": self.weights, "bias": self.bias}
        if self.ranges:
            data["ranges"] = {k: list(v) for k, v in self.ranges.items()}
        return data

    @classmethod
    def from_json(cls, data: dict) -> Logistic:
        ranges = {}
        for k, v in (data.get("ranges") or {}).items():
            low, high = (float(x) for x in v)
            if not low <= high:
                raise ValueError(f"signal {k}: range {v} is empty")
            ranges[str(k)] = (low, high)
        return cls({str(k): float(v) for k, v in data.get("weights", {}).items()}, float(data.get("bias", 0.0)),
                   ranges)


@dataclass
class Calibration:
    """The estimates of one model pair, and the held-back prefix length they were fitted for.
    Without the `_text` pair (the prior, older files) every prompt is first tried on the small model."""

    p_small: Logistic
    p_large: Logistic
    q_small: Logistic
    hold_tokens: int = 24
    source: str = "built-in"       # where it came from: a file, or the built-in prior
    p_small_text: Logistic | None = None
    p_large_text: Logistic | None = None

    @classmethod
    def prior(cls) -> Calibration:
        """No calibration for this pair: both models equally likely to do well before generation
        (so the small one is tried), and an answer judged by its log-probabilities alone, with a
        bias that puts the even odds at a lowest-decile log-probability of -2.5 (about 8%)."""
        return cls(Logistic({}, 0.0), Logistic({}, 0.0),
                   Logistic({"low_logprob": 1.2, "mean_logprob": 1.0}, 3.6), source="built-in prior")

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            both = data.get("p_small_text") is not None and data.get("p_large_text") is not None
            calibration = cls(Logistic.from_json(data["p_small"]), Logistic.from_json(data["p_large"]),
                              Logistic.from_json(data["q_small"]), int(data.get("hold_tokens", 24)), source=str(path),
                              p_small_text=Logistic.from_json(data["p_small_text"]) if both else None,
                              p_large_text=Logistic.from_json(data["p_large_text"]) if both else None)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"cannot read the routing calibration {path}: {error}") from None
        if calibration.hold_tokens < 1:
            raise ValueError(f"the routing calibration {path} has hold_tokens {calibration.hold_tokens}: "
                             "the answer estimate needs a held-back prefix of at least 1 token")
        unknown = sorted({name for model in calibration.models() for name in model.weights} - KNOWN_SIGNALS)
        if unknown:      # e.g. log_prompt_tokens, the whole prompt's length, before the latest turn's
            raise ValueError(f"the routing calibration {path} weighs signals this kvserve does not compute "
                             f"({', '.join(unknown)}): refit it with `kvserve bench routing --calibrate`")
        return calibration

    def models(self) -> list[Logistic]:
        return [m for m in (self.p_small, self.p_large, self.q_small, self.p_small_text, self.p_large_text)
                if m is not None]

    def save(self, path: str | Path, **extra) -> None:
        data = {"p_small": self.p_small.to_json(), "p_large": self.p_large.to_json(),
                "q_small": self.q_small.to_json(), "hold_tokens": self.hold_tokens}
        if self.p_small_text is not None and self.p_large_text is not None:
            data.update(p_small_text=self.p_small_text.to_json(), p_large_text=self.p_large_text.to_json())
        data.update(extra)
        Path(path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
