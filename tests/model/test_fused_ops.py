"""The fused C++ CPU ops (csrc/fused_ops.cpp) equal the torch spec in layers.py: in bf16 bit for bit
on these inputs, in fp32 within a few ulps; the whole model gives the same logits either way; an
unquantized fp32 model keeps the spec; bad inputs raise."""

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


@pytest.mark.parametrize("rows", [1, 300])
def test_fp32_fused_ops_match_torch_within_ulps(kernels, rows):
    """fp32 (a quantized model on a CPU without native bf16): the same expressions, nothing to round."""
    torch.manual_seed(rows)
    norm = RMSNorm(576, 1e-5)
    norm.weight.data = torch.randn(576)
    x, residual = torch.randn(rows, 576) * 3, torch.randn(rows, 576)
    expected = norm(x, residual)
    norm.kernels = kernels
    got = norm(x, residual)
    assert torch.equal(got[1], expected[1])
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
    mlp = GatedMLP(64, 96)
    h = torch.randn(rows, 64)
    expected = mlp(h)
    mlp.kernels = kernels
    torch.testing.assert_close(mlp(h), expected, rtol=1e-5, atol=1e-6)
    qk = torch.randn(rows, 15, 64)[:, :12]
    cos, sin = torch.randn(rows, 1, 64), torch.randn(rows, 1, 64)
    torch.testing.assert_close(apply_rotary(qk, cos, sin, kernels=kernels), apply_rotary(qk, cos, sin),
                               rtol=1e-6, atol=1e-6)


def test_unquantized_fp32_models_keep_the_torch_spec():
    """The fp32 model compared with transformers token for token takes no fused op; its quantized
    twin does (there the quantization's own error is far above an ulp)."""
    from kvserve.config import EngineConfig
    from kvserve.engine.engine import Engine
    from kvserve.model.checkpoint import load_checkpoint

    for quantization, fused in (("none", False), ("int4", True)):
        engine = Engine(EngineConfig(model="random:tiny", dtype="float32", quantization=quantization),
                        load_checkpoint("random:tiny"))
        model = engine.core.runner.model
        assert (model.model.norm.kernels is not None) == fused
        assert (model.model.layers[0].self_attn.kernels is not None) == fused


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
    with pytest.raises(RuntimeError, match="bfloat16 or float32"):
        kernels.rms_norm(torch.randn(2, 8).half(), None, torch.ones(8).half(), 1e-5)
    with pytest.raises(RuntimeError, match="weight must be"):
        kernels.rms_norm(torch.randn(2, 8), None, torch.ones(8).bfloat16(), 1e-5)
    with pytest.raises(RuntimeError, match="weight must be"):
        kernels.rms_norm(torch.randn(2, 8).bfloat16(), None, torch.ones(4).bfloat16(), 1e-5)
    with pytest.raises(RuntimeError, match="differ in shape"):
        kernels.rms_norm(torch.randn(2, 8).bfloat16(), torch.randn(3, 8).bfloat16(), torch.ones(8).bfloat16(), 1e-5)
    with pytest.raises(RuntimeError, match="even number"):
        kernels.silu_mul(torch.randn(2, 7).bfloat16())
    with pytest.raises(RuntimeError, match="contiguous heads"):
        kernels.rotary(torch.randn(2, 4, 8).bfloat16().transpose(1, 2), torch.ones(2, 1, 4).bfloat16(),
                       torch.ones(2, 1, 4).bfloat16())


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_qkv_equals_rotary_then_decode_step(kernels, rows, dtype):
    """The one-call decode (rotary + K/V write + attention from the qkv projection) gives what the
    separate fused rotary and decode_step give, caches included."""
    torch.manual_seed(rows)
    heads, kv_heads, d, bs = 9, 3, 64, 16
    k_cache = torch.randn(40, bs, kv_heads, d).to(dtype)
    v_cache = torch.randn(40, bs, kv_heads, d).to(dtype)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * d).to(dtype)
    cos, sin = torch.randn(rows, 1, d).to(dtype), torch.randn(rows, 1, d).to(dtype)
    lens = torch.tensor([30 + 7 * i for i in range(rows)])
    table = torch.stack([torch.randperm(40)[:4] for _ in range(rows)])
    slots = torch.tensor([table[i, (lens[i] - 1) // bs] * bs + (lens[i] - 1) % bs for i in range(rows)])
    caches = [(k_cache.clone(), v_cache.clone()) for _ in range(2)]
    got = kernels.decode_qkv(qkv, cos, sin, *caches[0], slots, table, lens, 0.125, heads, kv_heads)
    view = qkv.view(rows, heads + 2 * kv_heads, d)
    qk = kernels.rotary(view[:, :heads + kv_heads], cos, sin)
    expected = kernels.decode_step(qk[:, :heads], qk[:, heads:], view[:, heads + kv_heads:], *caches[1], slots,
                                   table, lens, 0.125)
    if dtype == torch.bfloat16:
        assert torch.equal(got, expected.reshape(rows, -1))
        assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])
    else:                                   # fp32: the rotary's products may be fused multiply-adds
        torch.testing.assert_close(got, expected.reshape(rows, -1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(caches[0][0], caches[1][0], rtol=1e-6, atol=1e-6)
        assert torch.equal(caches[0][1], caches[1][1])
    with pytest.raises(RuntimeError, match="qkv must be"):
        kernels.decode_qkv(qkv[:, :-d], cos, sin, *caches[0], slots, table, lens, 0.125, heads, kv_heads)


def test_decode_qkv_writes_an_fp32_models_keys_into_a_bf16_cache(kernels):
    """fp32 qkv, bf16 cache (a quantized fp32 model's default): the cache gets the fp32 rotary's
    keys and the values rounded to bf16, and attention reads them with fp32 math, as decode_step does."""
    torch.manual_seed(3)
    rows, heads, kv_heads, d, bs = 3, 9, 3, 64, 16
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * d)
    cos, sin = torch.randn(rows, 1, d), torch.randn(rows, 1, d)
    lens = torch.tensor([30, 41, 17])
    table = torch.stack([torch.randperm(40)[:4] for _ in range(rows)])
    slots = torch.tensor([table[i, (lens[i] - 1) // bs] * bs + (lens[i] - 1) % bs for i in range(rows)])
    base = (torch.randn(40, bs, kv_heads, d).bfloat16(), torch.randn(40, bs, kv_heads, d).bfloat16())
    caches = [(base[0].clone(), base[1].clone()) for _ in range(2)]
    got = kernels.decode_qkv(qkv, cos, sin, *caches[0], slots, table, lens, 0.125, heads, kv_heads)
    view = qkv.view(rows, heads + 2 * kv_heads, d)
    qk = apply_rotary(view[:, :heads + kv_heads], cos, sin)
    expected = kernels.decode_step(qk[:, :heads], qk[:, heads:].bfloat16(), view[:, heads + kv_heads:].bfloat16(),
                                   *caches[1], slots, table, lens, 0.125)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected.reshape(rows, -1), rtol=1e-5, atol=1e-5)
    assert (caches[0][0].float() - caches[1][0].float()).abs().max() <= 0.02      # one bf16 step at most
    assert torch.equal(caches[0][1], caches[1][1])


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_the_cpp_layer_loop_gives_the_python_layers_logits_to_the_bit(kernels, isa, qkv_bias):
    """An all-decode step of an fp32 int4 model runs its layers in one C++ call (decode_layers.cpp);
    it gives the logits of the Python layers calling the same kernels one by one, bit for bit, at
    one row and at several, with the qkv bias of Qwen-like models too; prefill steps keep the Python
    layers."""
    import dataclasses

    from kvserve.config import EngineConfig
    from kvserve.cpu_features import LEVELS
    from kvserve.engine.engine import Engine
    from kvserve.model.checkpoint import load_checkpoint
    from kvserve.model.llama import LlamaModel
    from kvserve.sampling import SamplingParams

    if isa == "avx512" and not kernels.built_with_avx512():
        pytest.skip("this build has no AVX-512 path")
    checkpoint = load_checkpoint("random:tiny")
    if qkv_bias:
        config = checkpoint.config
        checkpoint = dataclasses.replace(checkpoint, config=dataclasses.replace(config, attention_bias=True))
        generator = torch.Generator().manual_seed(1)
        for i in range(config.num_layers):
            for name, size in (("q", config.q_size), ("k", config.kv_size), ("v", config.kv_size)):
                checkpoint.weights[f"model.layers.{i}.self_attn.{name}_proj.bias"] = torch.randn(size, generator=generator)
    before = kernels.get_isa()
    kernels.set_isa(min(before, LEVELS.index(isa)))
    try:
        calls, logits = {True: [], False: []}, {}
        fast = LlamaModel._decode_layers
        for use_cpp in (True, False):
            engine = Engine(EngineConfig(model="random:tiny", dtype="float32", quantization="int4"), checkpoint)
            model, runner = engine.core.runner.model.model, engine.core.runner
            assert model.decode_layers_weights() is not None

            def spy(*args, model=model, use_cpp=use_cpp):
                result = fast(model, *args) if use_cpp else None
                calls[use_cpp].append(result is not None)
                return result

            steps, compute = [], runner.model.compute_logits
            runner.model.compute_logits = lambda hidden, compute=compute, steps=steps: steps.append(compute(hidden)) or steps[-1]
            model._decode_layers = spy
            for r in range(3):
                engine.add(list(range(3 + r, 30 + 7 * r)), SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
            while engine.has_unfinished:
                engine.step()
            logits[use_cpp] = steps
        assert any(calls[True]) and not all(calls[True])     # decode steps took the loop, prefill steps did not
        assert len(logits[True]) == len(logits[False]) > 3
        assert all(torch.equal(a, b) for a, b in zip(logits[True], logits[False]))
    finally:
        kernels.set_isa(before)
