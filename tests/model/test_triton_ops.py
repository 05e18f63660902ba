"""The fused Triton ops (kvserve/model/triton_ops.py) against the torch spec of the layers, in
bf16 (where the runner uses them) and fp32; on the CPU under TRITON_INTERPRET=1."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from kvserve.model.layers import RMSNorm, RotaryEmbedding, apply_rotary  # noqa: E402
from kvserve.model.triton_ops import TritonFusedOps  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
OPS = TritonFusedOps()
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
# The interpreter of triton 3.6 truncates fp32 to bf16 where a GPU rounds to nearest: bf16 runs on CUDA only.
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the Triton interpreter truncates to bf16; run on CUDA"))]


def _close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """fp32: to rounding; bf16: equal but for the rare element one rounding apart (the sums of
    squares and exp are summed or evaluated in another order)."""
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        return
    differ = (got.float() - expected.float()).abs() > 0
    assert differ.float().mean() < 0.02, differ.float().mean()
    torch.testing.assert_close(got.float(), expected.float(), rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_with_and_without_the_residual(dtype):
    gen = torch.Generator().manual_seed(0)
    x, residual = (torch.randn((7, 96), generator=gen).to(dtype).to(DEVICE) for _ in range(2))
    norm = RMSNorm(96, 1e-5).to(DEVICE)
    norm.weight.data = (1 + 0.1 * torch.randn(96, generator=gen)).to(dtype).to(DEVICE)
    with torch.no_grad():
        expected_out, expected_total = norm(x, residual)
        out, total = OPS.rms_norm(x, residual, norm.weight, 1e-5)
        assert torch.equal(total, expected_total)                          # the sum, rounded once
        _close(out, expected_out, dtype)
        out, none = OPS.rms_norm(x, None, norm.weight, 1e-5)
        assert none is None
        _close(out, norm(x), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype):
    gate_up = torch.randn((5, 2 * 80), generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    gate, up = gate_up.split(80, dim=-1)
    _close(OPS.silu_mul(gate_up), torch.nn.functional.silu(gate) * up, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_on_a_view_of_the_fused_projection(dtype):
    tokens, heads, kv_heads, head_dim = 6, 4, 2, 32
    qkv = torch.randn((tokens, heads + 2 * kv_heads, head_dim), generator=torch.Generator().manual_seed(2))
    qkv = qkv.to(dtype).to(DEVICE)
    rotary = RotaryEmbedding(head_dim, 64, 10000.0, None)
    rotary.build_tables(DEVICE)
    cos, sin = rotary(torch.tensor([0, 1, 5, 9, 30, 63], device=DEVICE), dtype)
    qk = qkv[:, :heads + kv_heads]                                         # a strided view, as the layer passes it
    _close(OPS.rotary(qk, cos, sin), apply_rotary(qk, cos, sin), dtype)
