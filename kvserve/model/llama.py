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
from kvserve.model.quant import Int4Linear

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
        self.backend = backend
        self._layer_weights: list[torch.Tensor] | None = None    # decode_layers' weights, once built

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                metadata: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)                          # [num_tokens, hidden]
        rotary = self.rotary(positions, hidden.dtype)
        fast = self._decode_layers(hidden, rotary, kv_caches, metadata)
        if fast is not None:
            return self.norm(*fast)[0]
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(hidden, residual, rotary, kv_cache, metadata)
        return self.norm(hidden, residual)[0]

    def decode_layers_weights(self) -> list[torch.Tensor] | None:
        """The tensors of csrc/decode_layers.cpp, 15 a layer in its order, when every layer runs what
        that loop calls (fp32, fused norms and SiLU, every linear on the int4 GEMM, biases only on
        qkv); else None."""
        empty = torch.empty(0)
        weights = []
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            if attn.kernels is None or not all(isinstance(m, Int4Linear) and m.gemm is not None for m in linears) \
                    or any(m.bias is not None for m in linears[1:]) \
                    or layer.input_layernorm.weight.dtype != torch.float32 or mlp.kernels is None \
                    or layer.input_layernorm.kernels is None or layer.post_attention_layernorm.kernels is None:
                return None
            qkv, o, gate_up, down = (m.gemm for m in linears)
            bias = attn.qkv_proj.bias
            weights += [layer.input_layernorm.weight, *qkv, empty if bias is None else bias, *o,
                        layer.post_attention_layernorm.weight, *gate_up, *down]
        return weights

    def _decode_layers(self, hidden: torch.Tensor, rotary: Rotary, kv_caches: list[KVCache],
                       metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(hidden, residual) after every layer from one C++ call (csrc/decode_layers.cpp: the same
        kernels in the same order, without the Python between them), for an all-decode step of an
        fp32 model on the int4 GEMM; None where that does not apply, and the layers run one by one."""
        kernels = getattr(self.backend, "kernels", None)
        if kernels is None or not hasattr(kernels, "decode_layers") or not hasattr(self.backend, "decode_plan") \
                or hidden.dtype != torch.float32 \
                or hidden.dim() != 2 or not hidden.is_contiguous() \
                or kv_caches[0][0].dtype not in (torch.float32, torch.bfloat16):     # one dtype for all layers
            return None
        first = self.layers[0].self_attn.qkv_proj
        if self._layer_weights is None or not isinstance(first, Int4Linear) or first.gemm is None \
                or self._layer_weights[1] is not first.gemm[0]:      # built before the weights were (re)placed
            self._layer_weights = self.decode_layers_weights()
        if self._layer_weights is None:
            return None
        plan = self.backend.decode_plan(metadata, hidden.device)
        if plan is None:
            return None
        attn, norm = self.layers[0].self_attn, self.layers[0].input_layernorm
        hidden, residual = kernels.decode_layers(
            hidden, self._layer_weights, [k for k, _ in kv_caches], [v for _, v in kv_caches], *rotary,
            metadata.slot_mapping, plan.decode_block_ids, plan.decode_seq_lens, attn.scale, attn.num_heads,
            attn.num_kv_heads, norm.eps)
        return hidden, residual


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
