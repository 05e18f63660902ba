"""`kvserve bench routing`: the labelled set (bench/data/routing_eval.jsonl) through four ways of
answering, on one server holding the small and the large model:

    small      every item answered by the small model (through a router that never escalates,
               so its routing record carries the prompt signals)
    large      every item answered by the large model
    predict    routing before generation only (router option escalation=off)
    cascade    routing before generation, escalation after the held-back prefix, hand-off while
               streaming (the default router)

Each item is a streamed, greedy chat completion through the OpenAI API. Reported per mode:
accuracy (each answer graded: code by running its tests in a sandboxed subprocess, arithmetic by
exact number, facts by accepted answers), weighted cost (usage.cost, the sum over models that ran
of cost weight x tokens), TTFT p50/p95 and the share of answers each model finished; and the
ratios the routing goal is stated in: cascade accuracy / large accuracy and cascade cost / large
cost.

`--calibrate FILE` first fits the router's estimates (routing/predictor.py) on the small and
large runs (or on a previous run's recorded answers, `--answers`), writes them to FILE, and then
runs predict and cascade on a server that uses FILE. Since those in-sample figures are fitted on
the very items they score, it also reports cross-validated replays from the recorded answers
(5-fold, 3 seeded shuffles): the cascade at the chosen tolerance, the whole tolerance curve, the
cheapest tolerance on it that meets the chat profile's goal (if any), and two oracle bounds (the
best any router could do on these answers, and the cheapest way to just reach the goal).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from kvserve.bench.routing_eval import EvalItem, grade_many, load_items
from kvserve.bench.serve import percentile
from kvserve.bench.server_process import free_port, running
from kvserve.routing.predictor import (ANSWER_SIGNALS, PROMPT_SIGNALS, SIGNALS_VERSION, TEXT_SIGNALS, Calibration,
                                       Logistic, answer_scores)
from kvserve.routing.router import Router, RouterConfig

MAX_TOKENS = {"code": 384, "arithmetic": 256, "fact": 48}
MODES = ("small", "large", "predict", "cascade")
GOAL_ACCURACY = 0.98          # the chat profile's goal: >= 98% of the large model's accuracy ...
GOAL_COST = 0.55              # ... at <= 55% of its weighted cost
# Tokens held back and scored, for a fitted calibration. The accuracy-cost curve is the same
# from 4 to 32 (cross-validated on the recorded answers), and every held token is a decode step
# the client waits for before the first one: 8 halved the cascade's TTFT p95 against 24.
DEFAULT_HOLD = 8


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def add_routing_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--small", default="qwen-coder-0.5b", help="the small model (default qwen-coder-0.5b)")
    parser.add_argument("--large", default="qwen-coder-1.5b", help="the large model (default qwen-coder-1.5b)")
    parser.add_argument("--kvserve-args", default="--quantization int4",
                        help="extra options of the started server (default: --quantization int4)")
    parser.add_argument("--tolerance", type=float, default=None, help="the routers' tolerance (default: the "
                                                                       "router's default)")
    parser.add_argument("--calibration", default=None, help="a calibration file for the routers (default: the one "
                                                            "shipped for the pair, if any)")
    parser.add_argument("--calibrate", default=None, metavar="FILE",
                        help="fit the routers' estimates on this run's small and large answers, write them to "
                             "FILE, and run predict and cascade with them")
    parser.add_argument("--answers", default=None, metavar="FILE",
                        help="with --calibrate: take the small and large answers from FILE (a previous run's "
                             "--out) instead of running them again")
    parser.add_argument("--hold", type=positive_int, default=None,
                        help=f"tokens held back and scored (router option hold; --calibrate default {DEFAULT_HOLD})")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N items of a seeded shuffle")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    parser.add_argument("--out", default=None, help="write every answer (JSONL) here")
    parser.add_argument("--plot", default=None, help="accuracy vs cost of each mode, as a PNG")
    parser.add_argument("--json-only", action="store_true")


@dataclass
class Answer:
    item: EvalItem
    mode: str
    text: str = ""
    ttft_s: float | None = None
    model: str | None = None              # the model that finished the answer
    cost: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    routing: dict | None = None
    logprobs: list[float] = field(default_factory=list)
    first_top: list[float] = field(default_factory=list)
    error: str | None = None
    correct: bool = False


async def ask(http, url: str, model: str, item: EvalItem, mode: str, want_logprobs: bool) -> Answer:
    body = {"model": model, "messages": [{"role": "user", "content": item.prompt}], "temperature": 0,
            "max_tokens": MAX_TOKENS[item.kind], "stream": True, "stream_options": {"include_usage": True}}
    if want_logprobs:
        body.update(logprobs=True, top_logprobs=5)
    answer = Answer(item, mode)
    start = time.monotonic()
    parts: list[str] = []
    try:
        async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                answer.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return answer
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                    answer.cost = usage["cost"]["weighted"]
                    answer.prompt_tokens, answer.completion_tokens = usage["prompt_tokens"], usage["completion_tokens"]
                for choice in chunk.get("choices", ()):
                    text = choice.get("delta", {}).get("content")
                    if text:
                        if answer.ttft_s is None:
                            answer.ttft_s = time.monotonic() - start
                        parts.append(text)
                    for entry in (choice.get("logprobs") or {}).get("content") or ():
                        if not answer.logprobs:
                            answer.first_top = [t["logprob"] for t in entry["top_logprobs"]]
                        answer.logprobs.append(entry["logprob"])
                    if choice.get("finish_reason") is not None:
                        answer.model = chunk["model"]
                        answer.routing = chunk.get("routing")
    except Exception as error:   # noqa: BLE001 - one failed item is reported, the run goes on
        answer.error = f"{type(error).__name__}: {error}"
    answer.text = "".join(parts)
    return answer


async def run_mode(url: str, model: str, mode: str, items: list[EvalItem], concurrency: int,
                   want_logprobs: bool, quiet: bool) -> list[Answer]:
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for index, item in enumerate(items):
        queue.put_nowait((index, item))
    answers: list[Answer | None] = [None] * len(items)
    bar = tqdm(total=len(items), desc=mode, unit="item", disable=quiet, file=sys.stderr)

    async def worker(http) -> None:
        while not queue.empty():
            index, item = queue.get_nowait()
            answers[index] = await ask(http, url, model, item, mode, want_logprobs)
            bar.update(1)

    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=30.0)) as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    bar.close()
    done = [a for a in answers if a is not None]
    for answer, correct in zip(done, grade_many([a.item for a in done], [a.text for a in done])):
        answer.correct = correct and answer.error is None
    return done


def load_answers(path: str, items: list[EvalItem]) -> dict[str, list[Answer]]:
    """The small and large answers of a previous run's --out, for the items being run."""
    by_id = {item.id: item for item in items}
    found: dict[str, list[Answer]] = {"small": [], "large": []}
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row.get("mode") in found and row.get("id") in by_id:
                found[row["mode"]].append(Answer(
                    by_id[row["id"]], row["mode"], text=row.get("text", ""), ttft_s=row.get("ttft_s"),
                    model=row.get("model"), cost=row.get("cost", 0.0), prompt_tokens=row.get("prompt_tokens", 0),
                    completion_tokens=row.get("completion_tokens", 0), routing=row.get("routing"),
                    logprobs=row.get("logprobs") or [], error=row.get("error"), correct=bool(row.get("correct"))))
    for mode, some in found.items():
        if len(some) != len(items):
            raise ValueError(f"--answers {path}: {len(some)} {mode} answers for {len(items)} items "
                             "(was it written with --modes small,large and the same --limit?)")
    return found


def summarize(answers: list[Answer]) -> dict:
    ttfts = [a.ttft_s for a in answers if a.ttft_s is not None]
    models: dict[str, int] = {}
    reasons: dict[str, int] = {}
    for a in answers:
        models[a.model or "none"] = models.get(a.model or "none", 0) + 1
        if a.routing is not None:
            reasons[a.routing["reason"]] = reasons.get(a.routing["reason"], 0) + 1
    # TTFT by route (the model that finished the answer, and why): what the client waits for
    # depends on the path (the text stage's straight answer; a small answer kept after the
    # held-back prefix; an escalation after it; a hand-off).
    routes: dict[str, list[float]] = {}
    for a in answers:
        if a.routing is not None and a.ttft_s is not None:
            routes.setdefault(f"{a.model}:{a.routing['reason']}", []).append(a.ttft_s)
    ttft_by_route = {route: {"answers": len(some), "p50": _ms(percentile(some, 50)), "p95": _ms(percentile(some, 95))}
                     for route, some in sorted(routes.items())}
    by_kind = {}
    for kind in sorted({a.item.kind for a in answers}):
        some = [a for a in answers if a.item.kind == kind]
        by_kind[kind] = round(sum(a.correct for a in some) / len(some), 4)
    return {"items": len(answers), "accuracy": round(sum(a.correct for a in answers) / max(1, len(answers)), 4),
            "accuracy_by_kind": by_kind, "weighted_cost": round(sum(a.cost for a in answers), 1),
            "ttft_ms_p50": _ms(percentile(ttfts, 50)), "ttft_ms_p95": _ms(percentile(ttfts, 95)),
            "share": {m: round(n / len(answers), 4) for m, n in sorted(models.items())},
            "reasons": reasons, "ttft_ms_by_route": ttft_by_route,
            "errors": sum(a.error is not None for a in answers)}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


# ---- calibration ------------------------------------------------------------------------------
def training_rows(small: list[Answer], large: list[Answer], hold: int) -> list[dict]:
    """One row per item: prompt signals, the small answer's scores over its first `hold` tokens,
    and whether each model's answer was right."""
    large_by_id = {a.item.id: a for a in large}
    rows = []
    for a in small:
        if a.routing is None or a.item.id not in large_by_id:
            continue
        missing = [name for name in PROMPT_SIGNALS if name not in a.routing.get("signals", {})]
        if missing:
            raise ValueError(f"the small model's answer to {a.item.id} carries no {', '.join(missing)} (recorded by "
                             "an older kvserve?): run the small and large modes again")
        if a.routing.get("signals_version", 1) != SIGNALS_VERSION:
            raise ValueError(f"the small model's answer to {a.item.id} was recorded with signals of version "
                             f"{a.routing.get('signals_version', 1)}, this kvserve computes version {SIGNALS_VERSION}: "
                             "run the small and large modes again")
        rows.append({"id": a.item.id, "signals": dict(a.routing.get("signals", {})),
                     "answer": answer_scores(a.logprobs[:hold]), "small_ok": a.correct,
                     "large_ok": large_by_id[a.item.id].correct, "small_cost": a.cost,
                     "prompt_tokens": a.prompt_tokens, "small_tokens": a.completion_tokens,
                     "large_cost": large_by_id[a.item.id].cost})
    return rows


def fit(rows: list[dict], hold: int) -> Calibration:
    signals = [r["signals"] for r in rows]
    small_ok, large_ok = [r["small_ok"] for r in rows], [r["large_ok"] for r in rows]
    return Calibration(
        p_small=Logistic.fit(signals, small_ok, PROMPT_SIGNALS),
        p_large=Logistic.fit(signals, large_ok, PROMPT_SIGNALS),
        q_small=Logistic.fit([{**r["signals"], **r["answer"]} for r in rows], small_ok, ANSWER_SIGNALS),
        hold_tokens=hold, source="kvserve bench routing --calibrate",
        p_small_text=Logistic.fit(signals, small_ok, TEXT_SIGNALS),
        p_large_text=Logistic.fit(signals, large_ok, TEXT_SIGNALS))


def replay(calibration: Calibration, rows: list[dict], tolerance: float) -> dict:
    """The cascade's outcome replayed from recorded answers, with the router's own rules
    (router.py): the text stage, the small model's prefill and first token, the held-back prefix.
    Hand-offs are not replayed: an escalation here is always from scratch, which is what a
    held-back answer gets. Returns totals: correct answers, weighted cost, answers by the large model."""
    router = Router(RouterConfig("replay", ("small", "large"), tolerance=tolerance), calibration)
    correct, cost, large_share = 0, 0.0, 0
    for r in rows:
        small_tokens = max(1, r["prompt_tokens"] + r["small_tokens"])
        if router.before_text(r["signals"])[0]:              # the small model never runs
            correct, cost, large_share = correct + r["large_ok"], cost + r["large_cost"], large_share + 1
            continue
        go_small, scores = router.before(r["signals"])
        keep = go_small and router.acceptable(r["signals"], r["answer"], scores["p_large"])[0]
        # the small model's share of its cost that ran: prompt + 1 token, or + the held-back prefix
        ran = r["prompt_tokens"] + (min(calibration.hold_tokens, r["small_tokens"]) if go_small else 1)
        correct += r["small_ok"] if keep else r["large_ok"]
        cost += r["small_cost"] if keep else r["small_cost"] * ran / small_tokens + r["large_cost"]
        large_share += not keep
    return {"correct": correct, "weighted_cost": cost, "large": large_share}


CURVE_TOLERANCES = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)


def cross_validated(rows: list[dict], hold: int, tolerances=CURVE_TOLERANCES, seed: int = 0, folds: int = 5,
                    repeats: int = 3) -> dict[str, dict]:
    """k-fold cross-validation, repeated over seeded shuffles: each item replayed by estimates
    fitted without it, at each tolerance; averaged over the repeats. {tolerance: summary}."""
    totals = {t: {"correct": 0.0, "weighted_cost": 0.0, "large": 0.0} for t in tolerances}
    for repeat in range(repeats):
        shuffled = rows[:]
        random.Random(seed * 1000 + repeat).shuffle(shuffled)
        for fold in range(folds):
            test = shuffled[fold::folds]
            calibration = fit([r for i, r in enumerate(shuffled) if i % folds != fold], hold)
            for t in tolerances:
                for key, value in replay(calibration, test, t).items():
                    totals[t][key] += value / repeats
    n = max(1, len(rows))
    large_correct = max(1, sum(r["large_ok"] for r in rows))
    large_cost = max(1e-9, sum(r["large_cost"] for r in rows))
    return {f"{t:g}": {"accuracy": round(v["correct"] / n, 4), "weighted_cost": round(v["weighted_cost"], 1),
                       "large_share": round(v["large"] / n, 4),
                       "accuracy_vs_large": round(v["correct"] / large_correct, 4),
                       "cost_vs_large": round(v["weighted_cost"] / large_cost, 4)}
            for t, v in totals.items()}


def oracle(rows: list[dict], goal: float = GOAL_ACCURACY) -> dict:
    """The bounds no router can pass on these answers. `best`: the large model exactly where the
    small one is wrong and the large one right, the small model (its whole cost, nothing else)
    elsewhere. `at_goal`: the cheapest such choice that still reaches `goal` x the large model's
    accuracy (the large model on the fewest, cheapest of those items that get there)."""
    large_cost = max(1e-9, sum(r["large_cost"] for r in rows))
    large_correct = max(1, sum(r["large_ok"] for r in rows))

    def point(correct: int, cost: float) -> dict:
        return {"accuracy_vs_large": round(correct / large_correct, 4), "cost_vs_large": round(cost / large_cost, 4)}

    correct, cost = sum(r["small_ok"] for r in rows), sum(r["small_cost"] for r in rows)
    at_goal = point(correct, cost) if correct >= goal * large_correct else None
    for gain in sorted(r["large_cost"] - r["small_cost"] for r in rows if r["large_ok"] and not r["small_ok"]):
        correct, cost = correct + 1, cost + gain
        if at_goal is None and correct >= goal * large_correct:
            at_goal = point(correct, cost)
    return {"best": point(correct, cost), "at_goal": at_goal}


# ---- the run ----------------------------------------------------------------------------------
def server_command(args: argparse.Namespace, port: int, calibration: str | None) -> list[str]:
    options = []
    if args.tolerance is not None:
        options.append(f"tolerance={args.tolerance}")
    if args.hold is not None:
        options.append(f"hold={args.hold}")
    if calibration:
        options.append(f"calibration={calibration}")
    extra = "".join("," + o for o in options)
    return [sys.executable, "-m", "kvserve.cli", "serve", "--port", str(port), "--state-dir", "",
            "--model", f"small={args.small}", "--model", f"large={args.large}",
            "--router", "probe=small,large,predict=off,escalation=off",
            "--router", f"predict=small,large,escalation=off{extra}",
            "--router", f"cascade=small,large{extra}", *shlex.split(args.kvserve_args)]


def run_routing_bench(args: argparse.Namespace) -> int:
    items = load_items()
    random.Random(args.seed).shuffle(items)
    if args.limit:
        items = items[:args.limit]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"--modes: unknown {', '.join(sorted(unknown))}; known: {', '.join(MODES)}")
    if args.calibrate:
        modes = list(dict.fromkeys(["small", "large", *modes]))
    targets = {"small": "probe", "large": "large", "predict": "predict", "cascade": "cascade"}
    answers: dict[str, list[Answer]] = {}
    started = time.monotonic()

    def run(url: str, mode: str) -> None:
        answers[mode] = asyncio.run(run_mode(url, targets[mode], mode, items, args.concurrency,
                                             want_logprobs=mode == "small", quiet=args.json_only))

    first = [m for m in modes if m in ("small", "large")] if args.calibrate else modes
    if args.answers:
        if not args.calibrate:
            raise ValueError("--answers is read only with --calibrate")
        answers.update(load_answers(args.answers, items))
    else:
        port = free_port()
        with running(server_command(args, port, args.calibration), port, name="kvserve") as url:
            for mode in first:
                run(url, mode)
    result: dict = {"bench": "routing", "items": len(items), "seed": args.seed, "small": args.small,
                    "large": args.large, "kvserve_args": args.kvserve_args}
    if args.calibrate:
        hold = args.hold or DEFAULT_HOLD
        rows = training_rows(answers["small"], answers["large"], hold)
        calibration = fit(rows, hold)
        calibration.save(args.calibrate, items=len(rows), small=args.small, large=args.large, seed=args.seed)
        tolerance = args.tolerance if args.tolerance is not None else 0.1
        # The trade-off a --router tolerance picks from (cross-validated replays), and the
        # cheapest point on it that meets the goal, if any.
        curve = cross_validated(rows, hold, tuple(sorted({*CURVE_TOLERANCES, tolerance})), args.seed)
        result["cross_validated_cascade"] = curve[f"{tolerance:g}"]
        result["tolerance_curve"] = curve
        meeting = [(v["cost_vs_large"], t) for t, v in curve.items()
                   if v["accuracy_vs_large"] >= GOAL_ACCURACY and v["cost_vs_large"] <= GOAL_COST]
        result["goal"] = {"accuracy_vs_large": GOAL_ACCURACY, "cost_vs_large": GOAL_COST,
                          "met_at_tolerance": min(meeting)[1] if meeting else None}
        result["oracle"] = oracle(rows)
        rest = [m for m in modes if m not in first]
        if rest:
            port = free_port()
            with running(server_command(args, port, args.calibrate), port, name="kvserve") as url:
                for mode in rest:
                    run(url, mode)
    result["modes"] = {mode: summarize(answers[mode]) for mode in modes if mode in answers}
    if "large" in result["modes"]:
        large = result["modes"]["large"]
        for mode, summary in result["modes"].items():
            summary["accuracy_vs_large"] = round(summary["accuracy"] / max(1e-9, large["accuracy"]), 4)
            summary["cost_vs_large"] = round(summary["weighted_cost"] / max(1e-9, large["weighted_cost"]), 4)
    result["wall_s"] = round(time.monotonic() - started, 1)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            for mode, some in answers.items():
                for a in some:
                    f.write(json.dumps({"mode": mode, "id": a.item.id, "correct": a.correct, "model": a.model,
                                        "cost": a.cost, "prompt_tokens": a.prompt_tokens,
                                        "completion_tokens": a.completion_tokens, "ttft_s": a.ttft_s,
                                        "routing": a.routing, "error": a.error, "text": a.text,
                                        "logprobs": a.logprobs}) + "\n")
    if args.plot:
        plot(result, args.plot)
    if not args.json_only:
        print_table(result)
    print(json.dumps(result))
    return 0


def print_table(result: dict) -> None:
    print(f"{'mode':9} {'accuracy':>8} {'vs large':>8} {'cost':>10} {'vs large':>8} {'TTFT p50':>9} "
          f"{'TTFT p95':>9}  answered by")
    for mode, s in result["modes"].items():
        share = ", ".join(f"{m} {v:.0%}" for m, v in s["share"].items())
        print(f"{mode:9} {s['accuracy']:8.1%} {s.get('accuracy_vs_large', math.nan):8.1%} {s['weighted_cost']:10.0f} "
              f"{s.get('cost_vs_large', math.nan):8.1%} {s['ttft_ms_p50'] or 0:7.0f}ms {s['ttft_ms_p95'] or 0:7.0f}ms"
              f"  {share}")
    for mode, s in result["modes"].items():
        routes = s.get("ttft_ms_by_route") or {}
        if len(routes) > 1:
            print(f"  {mode} TTFT p50/p95 by route: " + "; ".join(
                f"{route} ({r['answers']}) {r['p50'] or 0:.0f}/{r['p95'] or 0:.0f} ms" for route, r in routes.items()))


def plot(result: dict, path: str) -> None:
    """Accuracy against weighted cost, both relative to the large model (absolute without a large
    run): each mode run, and with --calibrate the cross-validated tolerance curve, the goal's
    corner and the oracle bounds."""
    from kvserve.bench.serve import load_pyplot

    plt = load_pyplot()
    modes = result["modes"]
    relative = "large" in modes
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for mode, s in modes.items():
        x, y = (s["cost_vs_large"], s["accuracy_vs_large"]) if relative else (s["weighted_cost"], s["accuracy"])
        axes.scatter(x * 100 if relative else x, y * 100, s=60, zorder=3)
        axes.annotate(mode, (x * 100 if relative else x, y * 100), textcoords="offset points", xytext=(6, 4))
    if relative and "tolerance_curve" in result:
        curve = sorted(result["tolerance_curve"].items(), key=lambda kv: kv[1]["cost_vs_large"])
        axes.plot([v["cost_vs_large"] * 100 for _, v in curve], [v["accuracy_vs_large"] * 100 for _, v in curve],
                  "--", color="grey", marker=".", label="cascade by tolerance (cross-validated)")
        for t, v in curve:
            axes.annotate(t, (v["cost_vs_large"] * 100, v["accuracy_vs_large"] * 100), fontsize=7, color="grey",
                          textcoords="offset points", xytext=(3, -9))
        axes.axvline(GOAL_COST * 100, color="green", alpha=0.4)
        axes.axhline(GOAL_ACCURACY * 100, color="green", alpha=0.4, label="goal: above and left of both lines")
        for name, bound in result.get("oracle", {}).items():
            if bound:
                axes.scatter(bound["cost_vs_large"] * 100, bound["accuracy_vs_large"] * 100, marker="*", s=90,
                             color="black", zorder=3)
                axes.annotate(f"oracle ({name.replace('_', ' ')})", (bound["cost_vs_large"] * 100,
                              bound["accuracy_vs_large"] * 100), textcoords="offset points", xytext=(6, -10), fontsize=8)
        axes.legend(fontsize=8, loc="lower right")
    axes.set_xlabel("weighted cost, % of the large model's" if relative else "weighted cost (cost weight x tokens)")
    axes.set_ylabel("accuracy, % of the large model's" if relative else "accuracy (%)")
    axes.set_title(f"routing: {result['items']} labelled items")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
