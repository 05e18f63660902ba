"""Weight-only int8 quantization of the linear layers (`--quantization int8`).

Each weight matrix [out, in] is stored as int8 with one scale per output channel (symmetric,
scale = max|row| / 127), so the weights take half the memory of bf16 and a decode step of one
stream, which streams every weight once and is bound by memory bandwidth, reads half the bytes.

Two kernels, chosen by the number of rows in the call (the same int8 weights either way):
  - up to `MAX_INT8_ROWS` rows (decode of a few streams): torch's int8-weight matmul, which reads
    the int8 weights directly;
  - more rows (prefill chunks, large decode batches, which are bound by compute, not bandwidth):
    the weights are widened to the activations' dtype and multiplied there, then scaled.
Measured on the project's CPU in docs/speed-notes.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MAX_INT8_ROWS = 4


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight)           # [out, in] int8
        self.register_buffer("scale", scale)             # [out] in the activation dtype
        self.register_buffer("bias", bias)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "Int8Linear":
        """Per-output-channel symmetric int8 of `weight` (any float dtype); scales and bias keep
        the weight's dtype."""
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(q, scale.to(weight.dtype), None if bias is None else bias.detach().clone())

    def dequantized(self) -> torch.Tensor:
        return self.weight.to(self.scale.dtype) * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] <= MAX_INT8_ROWS:
            out = torch._weight_int8pack_mm(rows.contiguous(), self.weight, self.scale)
        else:
            out = F.linear(rows, self.weight.to(x.dtype)) * self.scale
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_int8(model: nn.Module) -> int:
    """Replace every nn.Linear in `model` (including a tied LM head, which gets its own int8 copy;
    the embedding table stays as it is) by an Int8Linear. Returns how many were replaced."""
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, nn.Linear)]
    for parent, name, linear in targets:
        setattr(parent, name, Int8Linear.quantize(linear.weight, linear.bias))
    return len(targets)
