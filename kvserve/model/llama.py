"""Decoder-only transformer of the Llama family (Llama 2/3, Mistral, Qwen2, SmolLM2).

Tokens are flat: every tensor has a leading num_tokens axis holding all scheduled chunks of all
requests back to back, so there is no padding and no batch axis. Attention goes through the
backend given at construction, with the KV cache and its metadata passed to each forward call.
Parameter names follow Hugging Face's LlamaForCausalLM, except that q/k/v and gate/up are fused
into `qkv_proj` and `gate_up_proj` (one matmul each); `load_weights` takes Hugging Face-named
state dicts and fuses them.
"""

from __future__ import annotations

import torch
from torch import nn

from kvserve.attention.backend import AttentionBackend, AttentionMetadata, KVCache
from kvserve.config import ModelConfig
from kvserve.model.layers import GatedMLP, RMSNorm, RotaryEmbedding, apply_rotary

Rotary = tuple[torch.Tensor, torch.Tensor]    # cos, sin of this step's positions, [num_tokens, 1, head_dim]


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.scale = self.head_dim ** -0.5
        self.backend = backend
        self.qkv_proj = nn.Linear(config.hidden_size, config.q_size + 2 * config.kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(config.q_size, config.hidden_size, bias=False)
        self.kernels = None          # fused CPU kernels, set by use_fused_kernels

    def forward(self, hidden: torch.Tensor, rotary: Rotary, kv_cache: KVCache,
                metadata: AttentionMetadata) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden)
        if self.kernels is not None and hasattr(self.backend, "decode_qkv"):    # fused CPU path
            out = self.backend.decode_qkv(qkv, rotary, kv_cache, metadata, self.scale, self.num_heads,
                                          self.num_kv_heads)
            if out is not None:
                return self.o_proj(out)
        qkv = qkv.view(num_tokens, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        qk = apply_rotary(qkv[:, :self.num_heads + self.num_kv_heads], *rotary, kernels=self.kernels)
        q, k = qk.split((self.num_heads, self.num_kv_heads), dim=1)
        v = qkv[:, self.num_heads + self.num_kv_heads:]
        out = self.backend.forward(q, k, v, kv_cache, metadata, self.scale)   # [num_tokens, heads, head_dim]
        return self.o_proj(out.reshape(num_tokens, -1))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend):
        super().__init__()
        self.self_attn = LlamaAttention(config, backend)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, rotary: Rotary, kv_cache: KVCache,
                metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it): the residual additions are
        folded into the next norm, so they can run fused with it. Same sums as
        h = h + attn(norm(h)); h = h + mlp(norm(h))."""
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, rotary, kv_cache, metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, backend) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta,
                                      config.rope_scaling)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                metadata: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)                          # [num_tokens, hidden]
        rotary = self.rotary(positions, hidden.dtype)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(hidden, residual, rotary, kv_cache, metadata)
        return self.norm(hidden, residual)[0]


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, backend)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                metadata: AttentionMetadata) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] of every input token."""
        return self.model(input_ids, positions, kv_caches, metadata)

    def use_fused_kernels(self, kernels) -> None:
        """Let the norms, rotary embedding, attention and MLP use the fused C++ CPU kernels (bf16 or
        fp32; the torch code stays the path for other dtypes and devices), and the quantized linears
        their matmuls."""
        for module in self.modules():
            if hasattr(module, "kernels"):
                module.kernels = kernels

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [num_rows, vocab] for the rows that sample (never the whole batch)."""
        return self.lm_head(hidden)

    def load_weights(self, state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> None:
        """Take a Hugging Face-named state dict's tensors as the parameters (assigned, not copied:
        a copy doubled the peak memory of a load, 6 GB more for a 1.5B model in fp32, and the
        page faults of filling it took longer than reading the file). With `dtype`, every tensor is
        converted on the way in, the fused ones written once in that dtype; the state dict itself
        is never written. Ties lm_head to the embeddings again when configured."""
        if self.config.tie_word_embeddings:
            state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
        missing, unexpected = self.load_state_dict(fuse_projections(state_dict, dtype), strict=False, assign=True)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        missing = [m for m in missing if not (m == "lm_head.weight" and self.config.tie_word_embeddings)]
        if missing or unexpected:
            raise ValueError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


_FUSED = (("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
          ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj")))


def fuse_projections(state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Hugging Face names → ours: q/k/v weights (and biases) concatenated into qkv_proj, gate/up
    into gate_up_proj (output rows stacked in that order), everything in `dtype` when given.
    Anything incomplete is left as is, so load_state_dict reports it."""
    fused = dict(state_dict)
    for name in state_dict:
        for target, parts in _FUSED:
            first = f".{parts[0]}."
            if first not in name:
                continue
            prefix, suffix = name.split(first)
            names = [f"{prefix}.{part}.{suffix}" for part in parts]
            if all(n in state_dict for n in names):
                tensors = [state_dict[n] for n in names]
                out = torch.empty((sum(t.shape[0] for t in tensors), *tensors[0].shape[1:]),
                                  dtype=dtype or tensors[0].dtype)
                fused[f"{prefix}.{target}.{suffix}"] = torch.cat(tensors, out=out)
                for n in names:
                    del fused[n]
    if dtype is not None:
        fused = {k: v.to(dtype) for k, v in fused.items()}       # a no-op for those already in dtype
    return fused
