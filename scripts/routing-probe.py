"""Could a tiny classifier on the small model's own state tell, before it answers, that it will answer well?

An experiment behind the routing section of the README, not part of the server. For every item of
the labelled routing set it reads the small model's hidden state at the prompt's last token (each
layer's, and each layer's mean over the prompt) with transformers on the registered GGUF, then fits
a ridge-penalised logistic probe per kind of item ("is the small model's answer right?", labels from
a `kvserve bench routing --out` file) and reports its cross-validated ROC AUC within each kind
(5 folds, 3 shuffles): the discrimination a router before generation would get from it. The
routing goal needs about 0.97 on this set (README, "The goal is not met").

    .venv/bin/python scripts/routing-probe.py --answers answers.jsonl

Prints a table, then one JSON line. Minutes on a 2-core CPU (the forward passes are fp32).
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from kvserve.bench.routing_eval import load_items
from kvserve.model import registry

LAMBDAS = (0.01, 0.1, 1.0)


def hidden_states(model_name: str, prompts: list[str]) -> np.ndarray:
    """(items, 2 × (layers + 1), hidden): the last prompt token's state, then the prompt's mean, per layer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model_entry = registry.lookup(model_name)
    if model_entry is None:
        raise SystemExit(f"{model_name!r} is not a registered model")
    path = registry.resolve(model_entry)          # verified by its SHA-256 before it is read
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    rows = []
    with torch.inference_mode():
        for i, prompt in enumerate(prompts):
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"]
            states = model(ids, output_hidden_states=True).hidden_states
            rows.append(np.stack([s[0, -1].numpy() for s in states] + [s[0].mean(0).numpy() for s in states]))
            if i % 50 == 0:
                print(f"  {i}/{len(prompts)} prompts", file=sys.stderr)
    return np.stack(rows)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    if not len(pos) or not len(neg):
        return float("nan")
    return float((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean())


def probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, lam: float, steps: int = 300) -> np.ndarray:
    """Logistic regression with an L2 penalty on standardised features, by gradient descent."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    a, b = (train_x - mean) / std, (test_x - mean) / std
    w, bias = np.zeros(a.shape[1]), 0.0
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(a @ w + bias)))
        w -= 0.5 * (a.T @ (p - train_y) / len(train_y) + lam * w)
        bias -= 0.5 * float((p - train_y).mean())
    return b @ w + bias


def cross_validated_auc(x: np.ndarray, y: np.ndarray, kinds: np.ndarray, lam: float, seed: int = 0,
                        folds: int = 5, shuffles: int = 3) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    result: dict[str, list[float]] = {}
    for _ in range(shuffles):
        for kind in sorted(set(kinds)):
            index = np.flatnonzero(kinds == kind)
            scores = np.zeros(len(index))
            for fold in np.array_split(rng.permutation(len(index)), folds):
                train = np.setdiff1d(np.arange(len(index)), fold)
                scores[fold] = probe(x[index[train]], y[index[train]], x[index[fold]], lam)
            result.setdefault(kind, []).append(auc(scores, y[index]))
    return {kind: round(float(np.mean(v)), 3) for kind, v in result.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--answers", required=True, help="a `kvserve bench routing --out` file with small-mode answers")
    parser.add_argument("--small", default="qwen-coder-0.5b")
    args = parser.parse_args()
    items = load_items()
    correct = {}
    with open(args.answers) as f:
        for line in f:
            record = json.loads(line)
            if record.get("mode") == "small":
                correct[record["id"]] = float(record["correct"])
    items = [item for item in items if item.id in correct]
    if not items:
        parser.error(f"{args.answers} holds no small-mode answers to the set's items")
    x = hidden_states(args.small, [item.prompt for item in items])
    y = np.array([correct[item.id] for item in items])
    kinds = np.array([item.kind for item in items])
    layers = x.shape[1] // 2
    rows = []
    for feature in range(x.shape[1]):
        if feature % layers % 4 and feature % layers != layers - 1:
            continue                         # every fourth layer and the last: enough to see the trend
        if feature == 0:
            continue                         # the embedding of the last token: the same token for every prompt
        for lam in LAMBDAS:
            where = "last token" if feature < layers else "prompt mean"
            rows.append({"layer": feature % layers, "state": where, "lambda": lam,
                         "auc": cross_validated_auc(x[:, feature], y, kinds, lam)})
    kinds_sorted = sorted(set(kinds))
    print(f"{'state':12} {'layer':>5} {'lambda':>6} " + " ".join(f"{k:>10}" for k in kinds_sorted))
    for row in rows:
        print(f"{row['state']:12} {row['layer']:5d} {row['lambda']:6g} "
              + " ".join(f"{row['auc'][k]:10.3f}" for k in kinds_sorted))
    best = {k: max(row["auc"][k] for row in rows) for k in kinds_sorted}
    print(json.dumps({"experiment": "routing-probe", "small": args.small, "items": len(items),
                      "best_auc_by_kind": best, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
