"""A router is a virtual model: clients name it (`"model": "chat"`) and it picks a real one.

    --router chat=small,large[,tolerance=0.1][,fallback=large][,escalation=stream|before|off]
                             [,predict=on|off][,hold=N][,window=32][,calibration=FILE]

The models are listed cheapest first (two for now: a small and a large one that share a
tokenizer). Each request goes through:

  0. routing on the text alone, when the calibration has estimates for it: the prompt's lexical
     signals give p_small_text and p_large_text; when p_small_text < p_large_text - tolerance the
     large model answers straight away, and the small model's prefill is never paid (reason
     "predicted", `scores` holding the `_text` pair);
  1. routing before generation: the small model prefills the prompt and proposes its first token;
     its prefill statistics and the prompt's lexical signals give p_small and p_large
     (predictor.py); the small model goes on when p_small >= p_large - tolerance, otherwise the
     large one answers (reason "predicted");
  2. escalation: the first `hold` tokens of the small model's answer are held back and scored
     (default: as many as the calibration's answer estimate was fitted on, 24 for the prior);
     when q_small(answer so far) < p_large - tolerance the large model answers instead, before
     the client saw anything (reason "low_confidence");
  3. hand-off while streaming: once tokens flow, each further `window` of tokens is scored the
     same way; a window below the bar hands the answer to the large model, which continues from
     the small model's tokens (the pair shares a tokenizer) — nothing is restarted or taken back
     (reason "handoff").

`tolerance` is Bedrock's responseQualityDifference: how much predicted quality the router may
trade for cost (0 = only when the small model is predicted as good; 1 = always the small one).
`fallback` answers when the chosen model fails to start (the engine refused or died).
`escalation=before` does 1-2 only, `off` does 1 only, `predict=off` skips 1.

This module decides; it runs nothing. escalation.py runs a routed request through the engines.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from kvserve.routing.predictor import SIGNALS_VERSION, Calibration

ESCALATION_MODES = ("stream", "before", "off")


class RouterConfigError(ValueError):
    """A --router spec that cannot be used; the message says which part and why."""


@dataclass(frozen=True)
class RouterConfig:
    name: str
    models: tuple[str, ...]               # cheapest first
    tolerance: float = 0.1
    fallback: str = ""                    # default: the last (most capable) model
    escalation: str = "stream"
    predict: bool = True
    hold_tokens: int | None = None        # None: the calibration's (Router resolves it)
    window_tokens: int = 32
    calibration: str | None = None

    @property
    def small(self) -> str:
        return self.models[0]

    @property
    def large(self) -> str:
        return self.models[-1]


def parse_router_spec(spec: str, model_names: list[str] | tuple[str, ...]) -> RouterConfig:
    """`NAME=MODEL,MODEL[,key=value...]` → RouterConfig, checked against the served models."""
    name, sep, rest = spec.partition("=")
    name = name.strip()
    if not sep or not name or not rest:
        raise RouterConfigError(f"--router {spec!r}: expected NAME=SMALL,LARGE[,key=value...]")
    models: list[str] = []
    options: dict[str, str] = {}
    for item in (part.strip() for part in rest.split(",")):
        if not item:
            raise RouterConfigError(f"--router {spec!r}: an empty item")
        key, eq, value = item.partition("=")
        if eq:
            if key in options:
                raise RouterConfigError(f"--router {spec!r}: {key} is given twice")
            options[key] = value
        else:
            models.append(item)
    if len(models) != 2:
        raise RouterConfigError(f"--router {spec!r}: a router takes exactly two models, cheapest first "
                                f"(got {len(models)})")
    if models[0] == models[1]:
        raise RouterConfigError(f"--router {spec!r}: the two models must differ")
    for model in models:
        if model not in model_names:
            raise RouterConfigError(f"--router {spec!r}: no served model is named {model!r}; "
                                    f"served: {', '.join(model_names)}")
    if name in model_names:
        raise RouterConfigError(f"--router {spec!r}: {name!r} is already a model's name")
    known = {"tolerance", "fallback", "escalation", "predict", "hold", "window", "calibration"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise RouterConfigError(f"--router {spec!r}: unknown option(s) {', '.join(unknown)}; "
                                f"known: {', '.join(sorted(known))}")
    try:
        config = RouterConfig(
            name=name, models=tuple(models),
            tolerance=float(options.get("tolerance", 0.1)),
            fallback=options.get("fallback", models[-1]),
            escalation=options.get("escalation", "stream"),
            predict=_on_off(options.get("predict", "on")),
            hold_tokens=int(options["hold"]) if "hold" in options else None,
            window_tokens=int(options.get("window", 32)),
            calibration=options.get("calibration") or None)
    except ValueError as error:
        raise RouterConfigError(f"--router {spec!r}: {error}") from None
    if not 0.0 <= config.tolerance <= 1.0:
        raise RouterConfigError(f"--router {spec!r}: tolerance must be between 0 and 1")
    if config.fallback not in models:
        raise RouterConfigError(f"--router {spec!r}: fallback must be one of the router's models")
    if config.escalation not in ESCALATION_MODES:
        raise RouterConfigError(f"--router {spec!r}: escalation must be one of {', '.join(ESCALATION_MODES)}")
    if (config.hold_tokens is not None and config.hold_tokens < 1) or config.window_tokens < 1:
        raise RouterConfigError(f"--router {spec!r}: hold and window must be at least 1 token")
    return config


def _on_off(value: str) -> bool:
    if value in ("on", "true", "1", "yes"):
        return True
    if value in ("off", "false", "0", "no"):
        return False
    raise ValueError(f"expected on or off, got {value!r}")


@dataclass
class Decision:
    """The routing record of one answer: returned to the client as `routing`."""

    router: str
    chosen: str                                   # the model chosen before generation
    escalated: bool = False
    reason: str = "predicted"                     # predicted | low_confidence | handoff | fallback | ...
    scores: dict[str, float] = field(default_factory=dict)
    segments: list[dict] = field(default_factory=list)    # which model wrote which tokens
    signals: dict[str, float] = field(default_factory=dict)  # the prompt signals the estimates read
    runs: list[dict] = field(default_factory=list)        # each model run: its prompt, cached, generated tokens

    def to_json(self) -> dict:
        return {"router": self.router, "chosen_model": self.chosen, "escalated": self.escalated,
                "reason": self.reason, "scores": {k: round(v, 4) for k, v in self.scores.items()},
                "signals": {k: round(v, 4) for k, v in self.signals.items()}, "signals_version": SIGNALS_VERSION,
                "segments": self.segments,
                "runs": [{k: v for k, v in run.items()} for run in self.runs]}


class Router:
    """The decisions of one --router, over a calibration (fitted, or the built-in prior)."""

    def __init__(self, config: RouterConfig, calibration: Calibration | None = None):
        self.config = config
        if calibration is None:
            calibration = Calibration.load(config.calibration) if config.calibration else Calibration.prior()
        self.calibration = calibration
        if config.hold_tokens is None:   # the prefix length the answer estimate was fitted on
            self.config = replace(config, hold_tokens=calibration.hold_tokens)

    @property
    def name(self) -> str:
        return self.config.name

    def before_text(self, signals: dict[str, float]) -> tuple[bool, dict[str, float]]:
        """(the large model answers straight away, scores), from the text signals alone:
        p_small_text < p_large_text - tolerance. Never, without text estimates or with predict=off."""
        calibration = self.calibration
        if not self.config.predict or calibration.p_small_text is None or calibration.p_large_text is None:
            return False, {}
        p_small, p_large = calibration.p_small_text(signals), calibration.p_large_text(signals)
        return p_small < p_large - self.config.tolerance, {"p_small_text": p_small, "p_large_text": p_large}

    def before(self, signals: dict[str, float]) -> tuple[bool, dict[str, float]]:
        """(small model goes on, scores): p_small >= p_large - tolerance."""
        p_small, p_large = self.calibration.p_small(signals), self.calibration.p_large(signals)
        scores = {"p_small": p_small, "p_large": p_large}
        if not self.config.predict:
            return True, scores
        return p_small >= p_large - self.config.tolerance, scores

    def acceptable(self, signals: dict[str, float], answer: dict[str, float], p_large: float
                   ) -> tuple[bool, float]:
        """(the small model's answer so far is good enough, q_small)."""
        q_small = self.calibration.q_small({**signals, **answer})
        return q_small >= p_large - self.config.tolerance, q_small

    def describe(self) -> dict:
        c = self.config
        return {"id": c.name, "object": "router", "models": list(c.models), "fallback": c.fallback,
                "tolerance": c.tolerance, "escalation": c.escalation, "predict": c.predict,
                "hold_tokens": c.hold_tokens, "window_tokens": c.window_tokens,
                "calibration": self.calibration.source}
