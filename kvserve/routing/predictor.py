"""The quality estimates a router decides with, and how they are calibrated.

Small logistic models, each over a handful of signals that cost next to nothing on a CPU:

    p_small_text(prompt)     P(the small model answers this prompt well)     before any model runs
    p_large_text(prompt)     P(the large model answers it well)              before any model runs
    p_small(prompt)          P(the small model answers this prompt well)     after the small prefill
    p_large(prompt)          P(the large model answers it well)              after the small prefill
    q_small(prompt, answer)  P(this small-model answer is good)              after (part of) the answer

The text signals are lexical (length, code, digits): known before any model runs, so a prompt
they already mark as one for the large model goes there without paying the small model's prefill
(the `_text` pair; optional, absent from older calibration files). The prompt signals add the small
model's own prefill statistics (the probability and the top-k entropy of its first token; the
small model prefills the prompt anyway when it is tried, so they are nearly free). The answer signals are training-free scores of the
answer's token log-probabilities: the mean and the lowest decile (and `window`: 0 for the held-back
prefix, k for the k-th later window) (Gupta et al., ICLR 2024,
"Language Model Cascades: Token-level uncertainty and beyond": a low quantile beats the mean on
longer answers, because one confidently-wrong stretch hides in a mean).

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

TEXT_SIGNALS = ("log_prompt_tokens", "code", "digits")
PROMPT_SIGNALS = ("first_token_logprob", "first_token_entropy", *TEXT_SIGNALS)
ANSWER_SIGNALS = ("mean_logprob", "low_logprob", "first_token_logprob", "code")

_CODE = re.compile(r"```|\bdef |\bclass |\bfunction\b|\bpython\b|\bSQL\b|\breturn\b|\bimplement|\bcode\b",
                   re.IGNORECASE)


def text_signals(prompt_text: str, num_prompt_tokens: int) -> dict[str, float]:
    """Signals of a prompt known before any model runs: its length and its kind."""
    digits = sum(ch.isdigit() for ch in prompt_text)
    return {"log_prompt_tokens": math.log1p(num_prompt_tokens), "code": 1.0 if _CODE.search(prompt_text) else 0.0,
            "digits": min(1.0, digits / 8)}


def prompt_signals(prompt_text: str, num_prompt_tokens: int, first_token_logprob: float,
                   first_top_logprobs: Sequence[float]) -> dict[str, float]:
    """Signals of a prompt after the small model's prefill: its first-token probability and top-k
    entropy (from the top log-probabilities it returned, renormalised), and the text signals."""
    probs = [math.exp(lp) for lp in first_top_logprobs] or [math.exp(first_token_logprob)]
    total = sum(probs)
    entropy = -sum(p / total * math.log(p / total) for p in probs if p > 0)
    return {"first_token_logprob": first_token_logprob, "first_token_entropy": entropy,
            **text_signals(prompt_text, num_prompt_tokens)}


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
    """P(y = 1 | x) = sigmoid(bias + sum(weight[name] * x[name])) over named signals."""

    weights: dict[str, float] = field(default_factory=dict)
    bias: float = 0.0

    def __call__(self, signals: dict[str, float]) -> float:
        z = self.bias + sum(w * signals.get(name, 0.0) for name, w in self.weights.items())
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
        return cls(weights, b - sum(weights[k] * means[k] for k in names))

    def to_json(self) -> dict:
        return {"weights": self.weights, "bias": self.bias}

    @classmethod
    def from_json(cls, data: dict) -> Logistic:
        return cls({str(k): float(v) for k, v in data.get("weights", {}).items()}, float(data.get("bias", 0.0)))


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
            return cls(Logistic.from_json(data["p_small"]), Logistic.from_json(data["p_large"]),
                       Logistic.from_json(data["q_small"]), int(data.get("hold_tokens", 24)), source=str(path),
                       p_small_text=Logistic.from_json(data["p_small_text"]) if both else None,
                       p_large_text=Logistic.from_json(data["p_large_text"]) if both else None)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"cannot read the routing calibration {path}: {error}") from None

    def save(self, path: str | Path, **extra) -> None:
        data = {"p_small": self.p_small.to_json(), "p_large": self.p_large.to_json(),
                "q_small": self.q_small.to_json(), "hold_tokens": self.hold_tokens}
        if self.p_small_text is not None and self.p_large_text is not None:
            data.update(p_small_text=self.p_small_text.to_json(), p_large_text=self.p_large_text.to_json())
        data.update(extra)
        Path(path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
