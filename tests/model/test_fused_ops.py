"""The fused C++ CPU ops (csrc/fused_ops.cpp) equal the torch spec in layers.py, in bf16, bit for
bit on these inputs; the whole model gives the same logits either way; bad inputs raise."""

import pytest
import torch

from kvserve.attention import cpu_kernels
from kvserve.model.layers import GatedMLP, RMSNorm, apply_rotary


@pytest.fixture(scope="module")
def kernels():
    k = cpu_kernels.load()
    assert k is not None, "the C++ CPU kernels must build on this machine (g++ is a dependency of make test)"
    return k


@pytest.mark.parametrize("rows", [1, 7, 300])          # 300 rows: spread over threads
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_torch(kernels, rows, with_residual):
    torch.manual_seed(rows)
    norm = RMSNorm(576, 1e-5).to(torch.bfloat16)
    norm.weight.data = torch.randn(576).bfloat16()
    x = (torch.randn(rows, 576) * 3).bfloat16()
    residual = torch.randn(rows, 576).bfloat16() if with_residual else None
    expected = norm(x, residual)
    norm.kernels = kernels
    got = norm(x, residual)
    if with_residual:
        assert torch.equal(got[1], expected[1])             # the residual sum, exactly
        got, expected = got[0], expected[0]
    assert (got.float() - expected.float()).abs().max() <= 1e-2 * expected.float().abs().max()
    assert (got == expected).float().mean() > 0.99          # only the order of the RMS sum differs


@pytest.mark.parametrize("rows", [1, 64])
def test_silu_mul_matches_torch(kernels, rows):
    torch.manual_seed(rows)
    mlp = GatedMLP(64, 96).to(torch.bfloat16)
    x = torch.randn(rows, 64).bfloat16()
    expected = mlp(x)
    mlp.kernels = kernels
    assert torch.equal(mlp(x), expected)


@pytest.mark.parametrize("rows", [1, 40])
def test_rotary_matches_torch_on_a_strided_slice(kernels, rows):
    torch.manual_seed(rows)
    qkv = torch.randn(rows, 9 + 2 * 3, 64).bfloat16()
    qk = qkv[:, :12]                                         # rows strided, as in the attention layer
    cos, sin = torch.randn(rows, 1, 64).bfloat16(), torch.randn(rows, 1, 64).bfloat16()
    assert torch.equal(apply_rotary(qk, cos, sin, kernels=kernels), apply_rotary(qk, cos, sin))


def test_fp32_never_takes_the_fused_path(kernels):
    norm = RMSNorm(16, 1e-5)
    norm.kernels = kernels
    x = torch.randn(3, 16)
    assert torch.equal(norm(x), RMSNorm(16, 1e-5)(x))       # fp32: the torch spec


def test_the_model_gives_the_same_logits_with_fused_ops():
    from kvserve.engine.engine import Engine
    from kvserve.config import EngineConfig
    from kvserve.model.checkpoint import load_checkpoint
    from kvserve.sampling import SamplingParams

    outputs = {}
    for backend in ("torch", "cpu"):                        # cpu: fused ops + C++ decode attention
        engine = Engine(EngineConfig(model="random:tiny", dtype="bfloat16", attention_backend=backend),
                        load_checkpoint("random:tiny"))
        assert (engine.core.runner.model.model.norm.kernels is not None) == (backend == "cpu")
        engine.add(list(range(3, 40)), SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
        tokens = []
        while engine.has_unfinished:
            tokens += [t for o in engine.step() for t in o.token_ids]
        outputs[backend] = tokens
    assert outputs["cpu"] == outputs["torch"]


def test_fused_ops_reject_bad_inputs(kernels):
    with pytest.raises(RuntimeError, match="bfloat16"):
        kernels.rms_norm(torch.randn(2, 8), None, torch.ones(8).bfloat16(), 1e-5)
    with pytest.raises(RuntimeError, match="weight must be bfloat16"):
        kernels.rms_norm(torch.randn(2, 8).bfloat16(), None, torch.ones(4).bfloat16(), 1e-5)
    with pytest.raises(RuntimeError, match="differ in shape"):
        kernels.rms_norm(torch.randn(2, 8).bfloat16(), torch.randn(3, 8).bfloat16(), torch.ones(8).bfloat16(), 1e-5)
    with pytest.raises(RuntimeError, match="even number"):
        kernels.silu_mul(torch.randn(2, 7).bfloat16())
    with pytest.raises(RuntimeError, match="contiguous heads"):
        kernels.rotary(torch.randn(2, 4, 8).bfloat16().transpose(1, 2), torch.ones(2, 1, 4).bfloat16(),
                       torch.ones(2, 1, 4).bfloat16())


@pytest.mark.parametrize("rows", [1, 5])
def test_decode_qkv_equals_rotary_then_decode_step(kernels, rows):
    """The one-call bf16 decode (rotary + K/V write + attention from the qkv projection) gives what
    the separate fused rotary and decode_step give, caches included."""
    torch.manual_seed(rows)
    heads, kv_heads, d, bs = 9, 3, 64, 16
    k_cache = torch.randn(40, bs, kv_heads, d).bfloat16()
    v_cache = torch.randn(40, bs, kv_heads, d).bfloat16()
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * d).bfloat16()
    cos, sin = torch.randn(rows, 1, d).bfloat16(), torch.randn(rows, 1, d).bfloat16()
    lens = torch.tensor([30 + 7 * i for i in range(rows)])
    table = torch.stack([torch.randperm(40)[:4] for _ in range(rows)])
    slots = torch.tensor([table[i, (lens[i] - 1) // bs] * bs + (lens[i] - 1) % bs for i in range(rows)])
    caches = [(k_cache.clone(), v_cache.clone()) for _ in range(2)]
    got = kernels.decode_qkv(qkv, cos, sin, *caches[0], slots, table, lens, 0.125, heads, kv_heads)
    view = qkv.view(rows, heads + 2 * kv_heads, d)
    qk = kernels.rotary(view[:, :heads + kv_heads], cos, sin)
    expected = kernels.decode_step(qk[:, :heads], qk[:, heads:], view[:, heads + kv_heads:], *caches[1], slots,
                                   table, lens, 0.125)
    assert torch.equal(got, expected.reshape(rows, -1))
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])
    with pytest.raises(RuntimeError, match="qkv must be"):
        kernels.decode_qkv(qkv[:, :-d], cos, sin, *caches[0], slots, table, lens, 0.125, heads, kv_heads)
