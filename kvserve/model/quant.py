"""Weight-only quantization of the linear layers (`--quantization int8|int4`).

int8: each weight matrix [out, in] is stored as int8 with one scale per output channel
(symmetric, scale = max|row| / 127): half the memory of bf16, and a decode step of one stream,
which streams every weight once and is bound by memory bandwidth, reads half the bytes.

int4: groups of 32 consecutive weights of a row share a scale d and a minimum m, and each weight
is a 4-bit q in 0..15 (w = d·q + m): the layout of llama.cpp's Q4_1. Quantizing a GGUF's Q4_1
tensor this way gives back its own q, d and m (its quantizer is this min/max rule), so the weights
are the file's 4-bit weights, read at a quarter of bf16's bytes. The LM head, and layers whose shape
torch's int4 kernel cannot take (out % 16, in % 32), use int8 instead.

Two kernels per layer, chosen by the number of rows in the call (the same weights either way):
  - up to `MAX_INT8_ROWS` / `MAX_INT4_ROWS` rows (decode of a few streams): a quantized-weight
    matmul that reads the packed weights directly: torch's int4 kernel; for int8 kvserve's C++
    kernel (csrc/int8_matmul.cpp, twice as fast here) when it is built, else torch's;
  - more rows (prefill chunks, large decode batches, which are bound by compute, not bandwidth):
    int8 widens its weights to the activations' dtype on the fly (int8 keeps its memory saving);
    int4 keeps the dequantized bf16 weights beside the packed ones (int4 is for speed, not memory:
    1.25× the bytes of bf16) and uses the plain bf16 matmul.
Measured on the project's CPU in docs/speed-notes.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvserve.model.packed import packed_linear

MAX_INT8_ROWS = 4
MAX_INT4_ROWS = 8          # torch's int4 kernel beats bf16 up to ~12 rows on this CPU (speed notes)
INT4_GROUP = 32


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 wide: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("weight", weight)           # [out, in] int8
        self.register_buffer("scale", scale)             # [out] in the activation dtype
        self.register_buffer("bias", bias)
        self.register_buffer("wide", wide)               # optional dequantized weights for many rows
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.kernels = None      # kvserve's C++ CPU kernels (set by use_fused_kernels): int8_matmul
        self.packed_wide = None  # `wide` prepacked for oneDNN (kvserve.model.packed), when packed

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, dtype: torch.dtype | None = None,
                 keep_wide: bool = False) -> "Int8Linear":
        """Per-output-channel symmetric int8 of `weight` (any float dtype); scales and bias take
        `dtype` (default: the weight's). keep_wide: also keep the dequantized weights for calls
        with many rows (faster than widening per call, 1.5× the memory of bf16)."""
        dtype = dtype or weight.dtype
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        linear = cls(q, scale.to(dtype), None if bias is None else bias.detach().to(dtype).clone())
        if keep_wide:
            linear.wide = linear.dequantized()
        return linear

    def dequantized(self) -> torch.Tensor:
        return self.weight.to(self.scale.dtype) * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The model passes flat, contiguous [tokens, features] batches: no reshapes then (each
        # tensor op called from Python costs microseconds, which add up over 30 layers a step).
        rows = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if rows.shape[0] <= MAX_INT8_ROWS and self.kernels is not None:      # kernels are only set on CPU
            out = self.kernels.int8_matmul(rows, self.weight, self.scale)      # ~2× torch's, fp32 math
        elif rows.shape[0] <= MAX_INT8_ROWS:
            out = torch._weight_int8pack_mm(rows if rows.is_contiguous() else rows.contiguous(), self.weight, self.scale)
        elif self.packed_wide is not None:
            out = packed_linear(rows, self.packed_wide)
        elif self.wide is not None:
            out = F.linear(rows, self.wide)
        else:
            out = F.linear(rows, self.weight.to(x.dtype)) * self.scale
        if self.bias is not None:
            out = out + self.bias
        return out if x.dim() == 2 else out.view(*x.shape[:-1], self.out_features)

    def pack_wide(self, pack) -> bool:
        """Prepack the widened weights for oneDNN; the plain copy is then dropped (no third copy)."""
        if self.wide is not None and self.wide.dtype == torch.bfloat16:
            self.packed_wide = pack(self.wide)
            if self.packed_wide is not None:
                self.wide = None
        return self.packed_wide is not None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def int4_fits(out_features: int, in_features: int) -> bool:
    """Whether torch's CPU int4 kernel takes this shape."""
    return out_features % 16 == 0 and in_features % INT4_GROUP == 0


def quantize_groups_q4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1-style groups of 32 along each row: (q [out, in] int32 in 0..15, d [out, in/32],
    m [out, in/32]), all fp32, with w ≈ d·q + m; d = (max - min) / 15, m = min per group."""
    out_features, in_features = weight.shape
    w = weight.detach().float().view(out_features, in_features // INT4_GROUP, INT4_GROUP)
    low, high = w.amin(dim=2), w.amax(dim=2)
    d = (high - low) / 15
    safe = torch.where(d > 0, d, torch.ones_like(d))
    q = torch.round((w - low[..., None]) / safe[..., None]).clamp(0, 15).to(torch.int32)
    return q.view(out_features, in_features), d, low


def dequantize_int4(q: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """What torch's int4 kernel computes with: (q - 8)·scale + zero, in the scales' dtype."""
    sz = scales_and_zeros.float()
    scale = sz[..., 0].t().repeat_interleave(INT4_GROUP, dim=1)
    zero = sz[..., 1].t().repeat_interleave(INT4_GROUP, dim=1)
    return ((q.float() - 8) * scale + zero).to(scales_and_zeros.dtype)


class Int4Linear(nn.Module):
    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, wide: torch.Tensor,
                 bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("packed", packed)                       # torch's CPU int4 packing
        self.register_buffer("scales_and_zeros", scales_and_zeros)   # [in/32, out, 2] bf16
        self.register_buffer("wide", wide)                           # [out, in] dequantized, bf16
        self.register_buffer("bias", bias)
        self.out_features, self.in_features = wide.shape
        self.packed_wide = None  # `wide` prepacked for oneDNN (kvserve.model.packed), when packed

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.bfloat16) -> "Int4Linear":
        """Groups of 32 of `weight` (best from the fp32 weights: a GGUF Q4_1 tensor's own groups are
        recovered exactly). torch's kernel computes w = (q - 8)·scale + zero, so scale = d and
        zero = m + 8d; it wants both in the activations' dtype (bf16)."""
        if dtype != torch.bfloat16:
            raise ValueError("int4 weights run with bfloat16 activations")
        if not int4_fits(*weight.shape):
            raise ValueError(f"int4 needs out % 16 == 0 and in % {INT4_GROUP} == 0; got {tuple(weight.shape)}")
        q, d, m = quantize_groups_q4(weight)
        packed = torch._convert_weight_to_int4pack_for_cpu(q.contiguous(), 2)
        scales_and_zeros = torch.stack([d.t(), (m + 8 * d).t()], dim=-1).to(dtype).contiguous()
        return cls(packed, scales_and_zeros, dequantize_int4(q, scales_and_zeros),
                   None if bias is None else bias.detach().to(dtype).clone())

    def dequantized(self) -> torch.Tensor:
        """The weights the int4 kernel computes with, [out, in] in bf16 (read back through the kernel
        once the plain copy was dropped for a packed one: x = I gives W^T, exactly)."""
        if self.wide is not None:
            return self.wide
        eye = torch.eye(self.in_features, dtype=self.scales_and_zeros.dtype)
        return torch._weight_int4pack_mm_for_cpu(eye, self.packed, INT4_GROUP, self.scales_and_zeros).t().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x if x.dim() == 2 else x.reshape(-1, self.in_features)      # flat batches: no reshape
        if rows.shape[0] <= MAX_INT4_ROWS:
            rows = rows if rows.is_contiguous() else rows.contiguous()
            out = torch._weight_int4pack_mm_for_cpu(rows, self.packed, INT4_GROUP, self.scales_and_zeros)
        elif self.packed_wide is not None:
            out = packed_linear(rows, self.packed_wide)
        else:
            out = F.linear(rows, self.wide)
        if self.bias is not None:
            out = out + self.bias
        return out if x.dim() == 2 else out.view(*x.shape[:-1], self.out_features)

    def pack_wide(self, pack) -> bool:
        """Prepack the bf16 weights for oneDNN; the plain copy is then dropped (no third copy)."""
        self.packed_wide = pack(self.wide)
        if self.packed_wide is not None:
            self.wide = None
        return self.packed_wide is not None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {INT4_GROUP}"


def _linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, nn.Linear)]


def quantize_int8(model: nn.Module, dtype: torch.dtype | None = None, keep: tuple[nn.Module, ...] = ()) -> int:
    """Replace every nn.Linear in `model` except those in `keep` by an Int8Linear. Returns how many
    were replaced. (The runner keeps the LM head: tied to the embedding table, it costs no memory
    in bf16, and in int8 it alone cost ~0.3% perplexity on the bundled text.)"""
    targets = [t for t in _linears(model) if not any(t[2] is m for m in keep)]
    for parent, name, linear in targets:
        setattr(parent, name, Int8Linear.quantize(linear.weight, linear.bias, dtype))
    return len(targets)


def quantize_int4(model: nn.Module, dtype: torch.dtype = torch.bfloat16,
                  int8_modules: tuple[nn.Module, ...] = ()) -> tuple[int, int, int]:
    """Replace every nn.Linear by an Int4Linear, except `int8_modules` (the LM head: llama.cpp's
    4-bit files keep it at 8 bits too, and at 4 bits this model loses ~5% perplexity) and shapes the
    int4 kernel does not take, which become Int8Linear keeping their widened weights.
    Returns (int4 layers, of which the weights were already 4-bit groups, int8 layers)."""
    counts = [0, 0, 0]
    for parent, name, linear in _linears(model):
        if int4_fits(*linear.weight.shape) and not any(linear is m for m in int8_modules):
            q, d, m = quantize_groups_q4(linear.weight)
            exact = torch.equal((q.view(*d.shape, INT4_GROUP) * d[..., None] + m[..., None]).view(q.shape),
                                linear.weight.detach().float())
            setattr(parent, name, Int4Linear.quantize(linear.weight, linear.bias, dtype))
            counts[0] += 1
            counts[1] += exact
        else:
            setattr(parent, name, Int8Linear.quantize(linear.weight, linear.bias, dtype, keep_wide=True))
            counts[2] += 1
    return counts[0], counts[1], counts[2]
