"""`kvserve bench perplexity`: perplexity of a fixed English text (bench/data/perplexity.txt,
written for this project) under the configured engine options, to check that a quantization or
dtype keeps the model's quality. One JSON line last."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from kvserve.config import EngineConfig

TEXT = Path(__file__).parent / "data" / "perplexity.txt"


def add_perplexity_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text", default=str(TEXT), help="UTF-8 text file (default: the bundled fixed text)")


def perplexity(engine, text: str) -> tuple[float, int]:
    """(perplexity, tokens scored) of `text` under `engine`'s model."""
    token_ids = engine.tokenizer.encode(text)
    if len(token_ids) < 2:
        raise ValueError("the text needs at least two tokens")
    token_ids = token_ids[:engine.max_model_len]
    logprobs = engine.core.runner.score(token_ids)
    return math.exp(-logprobs.double().mean().item()), len(token_ids) - 1


def run_perplexity_bench(args: argparse.Namespace, config: EngineConfig) -> int:
    from kvserve.engine.engine import Engine

    engine = Engine(config)
    ppl, n = perplexity(engine, Path(args.text).read_text(encoding="utf-8"))
    print(f"perplexity {ppl:.4f} over {n} tokens ({str(engine.dtype).removeprefix('torch.')}, "
          f"quantization {engine.quantization})")
    print(json.dumps({"bench": "perplexity", "model": config.model or "default", "text": Path(args.text).name,
                      "dtype": str(engine.dtype).removeprefix("torch."), "quantization": engine.quantization,
                      "tokens": n, "perplexity": round(ppl, 4)}))
    return 0
