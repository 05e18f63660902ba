"""Fused element-wise ops on CUDA as Triton kernels: residual add + RMSNorm, rotary embedding,
and SiLU(gate)·up. Each is one kernel where the torch spec (kvserve/model/layers.py) is three to
six, and each rounds where torch rounds (every intermediate torch keeps in the tensor's dtype is
rounded to it here too), so a bf16 model computes what its torch code computes, but for the last
fp32 bit of a square root or exponential, which can move a bf16 result by one rounding.

They replace the torch code only for bf16 models (`TritonFusedOps`, set by the runner on CUDA with
`use_fused_kernels`, as the C++ ops are on a CPU): fp32 keeps the torch spec op for op, so that
greedy output can equal transformers'. They run on the CPU under TRITON_INTERPRET=1 for the tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, total_ptr, hidden, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * hidden + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * hidden + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)   # the sum in x's dtype
        tl.store(total_ptr + row * hidden + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / hidden + eps)
    normed = (xf * inv).to(x_ptr.dtype.element_ty)                             # x.to(dtype)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * hidden + cols, (w.to(tl.float32) * normed.to(tl.float32)).to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    g = tl.load(gate_up_ptr + row * 2 * inter + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gate_up_ptr + row * 2 * inter + inter + cols, mask=mask, other=0.0)
    silu = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty)               # silu(gate) in the dtype
    tl.store(out_ptr + row * inter + cols, (silu.to(tl.float32) * u.to(tl.float32)).to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, stride_xt, stride_xh, heads,
                   HALF: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    d = tl.arange(0, BLOCK)
    mask = d < HALF
    base = x_ptr + token * stride_xt + head * stride_xh
    lo = tl.load(base + d, mask=mask, other=0.0)
    hi = tl.load(base + HALF + d, mask=mask, other=0.0)
    c_lo = tl.load(cos_ptr + token * 2 * HALF + d, mask=mask, other=0.0)
    c_hi = tl.load(cos_ptr + token * 2 * HALF + HALF + d, mask=mask, other=0.0)
    s_lo = tl.load(sin_ptr + token * 2 * HALF + d, mask=mask, other=0.0)
    s_hi = tl.load(sin_ptr + token * 2 * HALF + HALF + d, mask=mask, other=0.0)
    dtype = out_ptr.dtype.element_ty
    # x*cos + rotate_half(x)*sin, each product and the sum rounded to the dtype as torch does;
    # rotate_half(x) = (-hi, lo).
    out_lo = ((lo.to(tl.float32) * c_lo.to(tl.float32)).to(dtype).to(tl.float32)
              + (-hi.to(tl.float32) * s_lo.to(tl.float32)).to(dtype).to(tl.float32)).to(dtype)
    out_hi = ((hi.to(tl.float32) * c_hi.to(tl.float32)).to(dtype).to(tl.float32)
              + (lo.to(tl.float32) * s_hi.to(tl.float32)).to(dtype).to(tl.float32)).to(dtype)
    target = out_ptr + (token * heads + head) * 2 * HALF
    tl.store(target + d, out_lo, mask=mask)
    tl.store(target + HALF + d, out_hi, mask=mask)


class TritonFusedOps:
    """The fused ops the model's layers call (`use_fused_kernels`), with the C++ CPU ops' names."""

    device_type = "cuda"

    def rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows, hidden = x.shape
        out = torch.empty_like(x)
        total = torch.empty_like(x) if residual is not None else None
        if rows:
            _rms_norm_kernel[(rows,)](x, residual if residual is not None else x, weight, out,
                                      total if total is not None else out, hidden, eps,
                                      HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(hidden))
        return out, total

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        rows, width = gate_up.shape
        inter = width // 2
        out = torch.empty((rows, inter), dtype=gate_up.dtype, device=gate_up.device)
        block = min(1024, triton.next_power_of_2(inter))
        if rows:
            _silu_mul_kernel[(rows, triton.cdiv(inter, block))](gate_up, out, inter, BLOCK=block)
        return out

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [tokens, heads, head_dim] (rows of head_dim contiguous), cos/sin [tokens, 1, head_dim]."""
        tokens, heads, head_dim = x.shape
        out = torch.empty((tokens, heads, head_dim), dtype=x.dtype, device=x.device)
        cos, sin = cos.contiguous(), sin.contiguous()
        if tokens:
            _rotary_kernel[(tokens, heads)](x, cos, sin, out, x.stride(0), x.stride(1), heads, HALF=head_dim // 2,
                                            BLOCK=triton.next_power_of_2(head_dim // 2))
        return out
