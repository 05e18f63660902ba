"""bf16 linear layers on CPU with their weights prepacked for oneDNN (`prepack_linears`).

`F.linear` on a plain bf16 weight lets oneDNN reorder the weight into its blocked layout on every
call; for the few rows of a decode step that costs as much as the product itself. Reordering once
at load (torch's mkldnn linear ops, the ones torch.compile's CPU backend uses) halves the matmul
time of a one-stream decode step and takes ~15% off 32 streams here (docs/speed-notes.md). Same
math as `F.linear` in bf16; only the blocking (so the order of the sums) differs. fp32 and other
devices keep nn.Linear: the reference path.

Memory: the plain weight is dropped once packed, unless another module shares it (a tied
embedding table), so a bf16 model takes its size once, not twice (a 1.5B server process: 8.3 GB →
5.4 GB). `weight` still reads it, unpacked on demand, bit for bit; quantized layers drop their plain
widened copy the same way.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch
from torch import nn

log = logging.getLogger(__name__)


def pack_weight(weight: torch.Tensor):
    """The oneDNN-blocked copy of a bf16 [out, in] weight, or None where this torch cannot."""
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)
    except (AttributeError, RuntimeError) as error:       # no oneDNN, or no bf16 support on this CPU
        log.debug("no prepacked weights: %s", error)
        return None


def packed_linear(x: torch.Tensor, packed, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [rows, in] @ W^T (+ bias) through the prepacked weight."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear, packed, keep_plain: bool = True):
        """`keep_plain`: hold the plain weight as well (a tied embedding shares it); otherwise only the
        packed copy stays, and `weight` unpacks it when read."""
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.plain = linear.weight if keep_plain else None
        self.bias = linear.bias
        self.packed = packed                     # opaque oneDNN tensor, CPU only

    @property
    def weight(self) -> torch.Tensor:
        """The plain [out, in] bf16 weight: the shared tensor, or a dense copy of the packed one."""
        return self.plain if self.plain is not None else self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:                         # the model's flat batches: no reshapes
            return packed_linear(x, self.packed, self.bias)
        rows = x.reshape(-1, self.in_features)
        return packed_linear(rows, self.packed, self.bias).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16 prepacked for oneDNN"


def prepack_linears(model: nn.Module) -> int:
    """Replace every bf16 nn.Linear on CPU by a PackedLinear; quantized layers pack their widened
    bf16 weights (`pack_wide`). Returns how many weights were packed (0 where oneDNN cannot)."""
    count = 0
    holders = Counter(id(p) for m in model.modules() for p in m.parameters(recurse=False))   # a tie: 2+
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.weight.dtype == torch.bfloat16 and child.weight.device.type == "cpu":
                packed = pack_weight(child.weight)
                if packed is None:
                    return count
                setattr(parent, name, PackedLinear(child, packed, keep_plain=holders[id(child.weight)] > 1))
                count += 1
            elif hasattr(child, "pack_wide") and child.pack_wide(pack_weight):
                count += 1
    return count
