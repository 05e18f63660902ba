"""Hugging Face transformers on the same weights: the reference for parity tests and the
baseline for benchmarks. transformers is optional (a test extra); import errors say so."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvserve.model.checkpoint import Checkpoint


def hf_model(checkpoint: Checkpoint, dtype: torch.dtype = torch.float32):
    """A transformers causal LM holding `checkpoint`'s weights (Llama or Qwen2 class)."""
    try:
        import transformers
    except ImportError as error:
        raise RuntimeError("the transformers baseline needs `pip install transformers`") from error
    c = checkpoint.config
    common = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                  num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                  num_key_value_heads=c.num_kv_heads, max_position_embeddings=c.max_position_embeddings,
                  rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, rope_scaling=c.rope_scaling,
                  tie_word_embeddings=c.tie_word_embeddings)
    if c.architecture == "qwen2":
        config = transformers.Qwen2Config(**common)
        model_class = transformers.Qwen2ForCausalLM
    else:   # llama, mistral (no sliding window): the same computation
        config = transformers.LlamaConfig(head_dim=c.head_dim, attention_bias=c.attention_bias, **common)
        model_class = transformers.LlamaForCausalLM
    # Built without storage, then given the checkpoint's tensors (no random init of a billion
    # parameters, no copy); the rotary tables, computed at construction, are built again for real.
    with torch.device("meta"):
        model = model_class(config)
    missing, unexpected = model.load_state_dict(checkpoint.weights, strict=False, assign=True)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if c.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not meta, f"left without storage: {meta[:5]}"
    return model.to(dtype).eval()


def hf_continuous_batching(model, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations through transformers' continuous batching (`generate_batch`), end
    tokens ignored: one max_new_tokens for every prompt (its API takes one)."""
    from transformers import GenerationConfig

    import inspect

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    parameters = inspect.signature(model.generate_batch).parameters
    options = {"progress_bar": True} if "progress_bar" in parameters else {}
    # Its paged cache sized for this workload (pages of 256 tokens): left to itself it takes most
    # of the free memory, on a CPU ~10 GB of host RAM, which the other test worker needed.
    page = 256
    num_blocks = sum(-(-(len(p) + max_new_tokens) // page) for p in prompts) + len(prompts)
    try:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
    except ImportError:   # older transformers read the cache's size from the generation config
        ContinuousBatchingConfig = None
    if ContinuousBatchingConfig is not None and "continuous_batching_config" in parameters:
        options["continuous_batching_config"] = ContinuousBatchingConfig(page_size=page, num_blocks=num_blocks)
    else:
        config.num_blocks, config.block_size = num_blocks, page
    results = model.generate_batch([list(p) for p in prompts], generation_config=config, **options)
    return [list(r.generated_tokens) for r in results.values()]


@torch.inference_mode()
def hf_greedy(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int = 1) -> list[list[int]]:
    """Greedy continuations of exactly max_new_tokens tokens (end tokens ignored), left-padded batches."""
    results = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        width = max(len(p) for p in batch)
        device = model.device
        input_ids = torch.tensor([[0] * (width - len(p)) + list(p) for p in batch], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        results.extend(row[width:].tolist() for row in out)
    return results
