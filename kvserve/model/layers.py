"""RMSNorm, rotary embedding and the gated MLP, in plain torch (numerics follow Hugging Face's
Llama so that fp32 output matches it token for token).

The torch code is the spec. On CPU the layers can use fused C++ kernels instead
(`use_fused_kernels`, csrc/fused_ops.cpp): one call for what takes five to nine torch ops, rounding
to bf16 where torch does (tests/model/test_fused_ops.py holds the two together). The runner hands
them to bf16 models and to quantized fp32 ones; an unquantized fp32 model keeps the spec, op for op
(it is the one compared with transformers token for token)."""

from __future__ import annotations

import math

import torch
from torch import nn


def _fusable(kernels, x: torch.Tensor) -> bool:
    """Do the fused ops take x? The C++ ops take CPU tensors, the Triton ones (model/triton_ops.py) CUDA ones."""
    return kernels is not None and x.dtype in (torch.bfloat16, torch.float32) and \
        x.device.type == getattr(kernels, "device_type", "cpu")


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.kernels = None          # fused CPU kernels, set by use_fused_kernels

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); with `residual`: (norm(x + residual), x + residual), the sum in x's dtype."""
        if _fusable(self.kernels, x) and x.dim() == 2 and x.is_contiguous() and (
                residual is None or residual.is_contiguous()):
            out, total = self.kernels.rms_norm(x, residual, self.weight, self.eps)
            return out if residual is None else (out, total)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2], with Llama-3 or linear scaling when configured."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: linear, llama3")


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position, computed once in fp32 (rotate-half layout)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None):
        super().__init__()
        self.head_dim, self.max_positions, self.theta, self.scaling = head_dim, max_positions, theta, scaling
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.build_tables(self.cos.device)

    def build_tables(self, device: torch.device) -> None:
        """(Re)compute the tables in fp32 on `device` (also after the model was built on meta)."""
        with torch.device("cpu"):
            inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling)
            freqs = torch.arange(self.max_positions, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)                        # [max_positions, head_dim]
        self.cos = emb.cos().to(device)
        self.sin = emb.sin().to(device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of each token's position, each [num_tokens, 1, head_dim] in `dtype`: looked up
        once per step and shared by every layer."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kernels=None) -> torch.Tensor:
    """x [num_tokens, heads, head_dim] rotated (rotate-half layout); queries and keys go through
    in one call, as one tensor."""
    if _fusable(kernels, x) and x.stride(2) == 1 and x.stride(1) == x.shape[2]:
        return kernels.rotary(x, cos, sin)
    return x * cos + rotate_half(x) * sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), with gate and up fused into one projection (one matmul call)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.kernels = None          # fused CPU kernels, set by use_fused_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if _fusable(self.kernels, gate_up) and gate_up.dim() == 2 and gate_up.is_contiguous():
            return self.down_proj(self.kernels.silu_mul(gate_up))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj(nn.functional.silu(gate) * up)
