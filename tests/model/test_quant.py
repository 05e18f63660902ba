"""Int8Linear (per-channel int8) and Int4Linear (Q4_1-style groups of 32): both kernels of each agree
with the dequantized weights; 4-bit groups already in the weights are recovered exactly."""

import pytest
import torch
from torch import nn

from kvserve.config import CacheConfig, ConfigError, EngineConfig
from kvserve.model.checkpoint import load_checkpoint
from kvserve.model.quant import (INT4_GROUP, INT8_GEMM_SEGMENT, MAX_INT4_ROWS, MAX_INT8_ROWS, Int4Linear, Int8Linear,
                                 dequantize_q4, int4_matmul_reference, int8_gemm_reference, pack_int8_gemm, pack_q4,
                                 pack_q4_gemm, quantize_groups_q4, quantize_int4, quantize_int8, quantize_q8_rows,
                                 quantize_q16_rows, unpack_q4)


def test_quantization_error_is_at_most_half_a_step_per_channel():
    torch.manual_seed(0)
    w = torch.randn(48, 32) * torch.logspace(-3, 1, 48)[:, None]      # rows of very different scales
    q = Int8Linear.quantize(w)
    assert q.weight.dtype == torch.int8 and q.scale.shape == (48,)
    err = (q.dequantized() - w).abs()
    assert (err <= q.scale[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("rows", [1, MAX_INT8_ROWS, MAX_INT8_ROWS + 1, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_both_kernels_match_the_dequantized_weights(rows, bias):
    torch.manual_seed(rows)
    linear = nn.Linear(64, 96, bias=bias).to(torch.bfloat16)
    q = Int8Linear.quantize(linear.weight, linear.bias)
    x = torch.randn(rows, 64, dtype=torch.bfloat16)
    expected = nn.functional.linear(x.float(), q.dequantized().float(), None if q.bias is None else q.bias.float())
    torch.testing.assert_close(q(x).float(), expected, rtol=2e-2, atol=2e-2)
    assert q(x.view(1, rows, 64)).shape == (1, rows, 96)


def test_quantize_int8_replaces_nested_linears():
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.ReLU(), nn.Linear(8, 4)))
    assert quantize_int8(model) == 2
    assert isinstance(model[0], Int8Linear) and isinstance(model[1][1], Int8Linear)


def test_unknown_quantization_is_a_config_error():
    with pytest.raises(ConfigError, match="--quantization must be one of auto, none, int8"):
        EngineConfig(quantization="int3")


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantization_runs_with_fp32_activations(mode):
    """A CPU without native bf16 math runs fp32: both modes take fp32 activations, kernels and all."""
    from kvserve.engine.engine import Engine

    engine = Engine(EngineConfig(model="random:tiny", dtype="float32", quantization=mode), load_checkpoint("random:tiny"))
    layers = [m for m in engine.core.runner.model.modules() if isinstance(m, (Int8Linear, Int4Linear))]
    assert layers and all(m.dequantized().dtype == torch.float32 for m in layers)
    assert all(m.kernels is not None for m in layers)            # the C++ kernels serve fp32 too
    from kvserve.cpu_features import isa

    # fp32 quantized layers, int4 and int8 (the int4 mode's LM head) alike: their GEMM, where vectors run
    assert all((m.gemm is not None) == (isa() != "portable") for m in layers)
    assert any(isinstance(m, Int8Linear) for m in layers)


def q4_1_weights(out_features, in_features, seed=0):
    """Weights that are exactly d·q + m per group of 32 with q spanning 0..15 (what llama.cpp's Q4_1
    quantizer writes: the group's minimum is q = 0, its maximum q = 15)."""
    g = torch.Generator().manual_seed(seed)
    groups = in_features // INT4_GROUP
    q = torch.randint(0, 16, (out_features, groups, INT4_GROUP), generator=g)
    q[..., 0], q[..., 1] = 0, 15
    d = (torch.rand(out_features, groups, generator=g) * 0.02 + 1e-3).half().float()   # fp16, as in GGUF
    m = (-torch.rand(out_features, groups, generator=g) * 0.1).half().float()
    return (q * d[..., None] + m[..., None]).view(out_features, in_features), q.view(out_features, in_features), d, m


def test_q4_1_groups_are_recovered_exactly():
    w, q, d, m = q4_1_weights(32, 96)
    q2, d2, m2 = quantize_groups_q4(w)
    assert torch.equal(q2, q.int()) and torch.equal(m2, m)
    torch.testing.assert_close(d2, d, rtol=1e-6, atol=0)


def test_int4_error_is_at_most_half_a_step_plus_bf16_rounding():
    torch.manual_seed(0)
    w = torch.randn(48, 64) * torch.logspace(-3, 0, 48)[:, None]
    q, d, _ = quantize_groups_q4(w)
    assert q.min() >= 0 and q.max() <= 15
    step = d.repeat_interleave(INT4_GROUP, dim=1)
    err = (Int4Linear.quantize(w, dtype=torch.float32).dequantized() - w).abs()
    assert (err <= step / 2 + w.abs() / 512 + 1e-6).all()     # fp16 scales and minimums: ~2^-11 relative slack
    err = (Int4Linear.quantize(w).dequantized().float() - w).abs()
    assert (err <= step / 2 + w.abs() / 64 + 1e-6).all()      # bf16 weights for many rows: ~2^-8 more


@pytest.mark.parametrize("rows", [1, MAX_INT4_ROWS, MAX_INT4_ROWS + 1, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_int4_kernels_match_the_dequantized_weights(rows, bias):
    from kvserve.attention import cpu_kernels

    torch.manual_seed(rows)
    w, *_ = q4_1_weights(48, 64, seed=rows)
    b = torch.randn(48) if bias else None
    for dtype in (torch.bfloat16, torch.float32):
        q = Int4Linear.quantize(w, b, dtype=dtype)
        x = torch.randn(rows, 64, dtype=dtype)
        expected = nn.functional.linear(x.float(), q.dequantized().float(), None if b is None else b.to(dtype).float())
        for kernels in (None, cpu_kernels.load()):     # the plain matmul, then the C++ kernel for few rows
            q.kernels = kernels
            torch.testing.assert_close(q(x).float(), expected, rtol=2e-2, atol=5e-2)
            assert q(x).dtype == dtype and q(x.view(1, rows, 64)).shape == (1, rows, 48)
        # and the Q4_1 weights are held exactly (fp16 d and m, as in the GGUF)
        assert torch.equal(dequantize_q4(q.qs, q.dm), w)


def test_int4_rejects_shapes_and_dtypes_its_kernel_cannot_take():
    with pytest.raises(ValueError, match="out % 16"):
        Int4Linear.quantize(torch.randn(40, 64))
    with pytest.raises(ValueError, match="in % 32"):
        Int4Linear.quantize(torch.randn(32, 48))
    with pytest.raises(ValueError, match="bfloat16 or float32"):
        Int4Linear.quantize(torch.randn(32, 64), dtype=torch.float16)


def test_quantize_int4_uses_int8_for_the_head_and_odd_shapes():
    head = nn.Linear(40, 64)
    w, *_ = q4_1_weights(32, 64)
    first = nn.Linear(64, 32)
    first.weight.data = w
    model = nn.Sequential(first, nn.Linear(32, 40), head)        # 40 outputs: not a multiple of 16
    assert quantize_int4(model, int8_modules=(head,)) == (1, 1, 2)    # one int4, already 4-bit; two int8
    assert isinstance(model[0], Int4Linear)
    assert isinstance(model[1], Int8Linear) and isinstance(model[2], Int8Linear)
    assert model[2].wide is not None                               # int8 here keeps its widened weights
    x = torch.randn(MAX_INT8_ROWS + 3, 64, dtype=torch.bfloat16)
    assert model(x).shape == (MAX_INT8_ROWS + 3, 64)


def test_quantized_tiny_engines_generate_like_bf16_for_a_short_prompt():
    """End to end through the engine (single stream → the quantized kernels): runs, and its first
    greedy tokens agree with bf16 on the same random weights."""
    from kvserve.engine.engine import Engine
    from kvserve.sampling import SamplingParams

    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    out = {}
    for q in ("none", "int8", "int4"):
        engine = Engine(EngineConfig(model="random:tiny", dtype="bfloat16", quantization=q), load_checkpoint("random:tiny"))
        engine.add([5, 6, 7, 8, 9, 10], params)
        tokens = []
        while engine.has_unfinished:
            tokens += [t for o in engine.step() for t in o.token_ids]
        out[q] = tokens
    assert len(out["int8"]) == len(out["int4"]) == 8
    assert out["int8"][:2] == out["none"][:2]
    assert out["int4"][:1] == out["none"][:1]


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("in_features", [64, 72])            # 72: a tail past the last 16 columns
def test_cpu_int8_kernel_matches_the_dequantized_weights(rows, in_features):
    from kvserve.attention import cpu_kernels

    kernels = cpu_kernels.load()
    assert kernels is not None
    torch.manual_seed(rows)
    q = Int8Linear.quantize(torch.randn(300, in_features), dtype=torch.bfloat16)
    x = torch.randn(rows, in_features, dtype=torch.bfloat16)
    expected = x.float() @ q.dequantized().float().t()
    atol = 1e-2 * expected.abs().max().item()                  # the output is rounded to bf16
    for kernel in (kernels.int8_matmul, kernels.int8_matmul_portable):
        torch.testing.assert_close(kernel(x, q.weight, q.scale).float(), expected, rtol=1e-2, atol=atol)
    # and Int8Linear takes it for few rows once it has the kernels
    q.kernels = kernels
    if rows <= MAX_INT8_ROWS:
        torch.testing.assert_close(q(x).float(), expected, rtol=1e-2, atol=atol)


def test_cpu_int8_kernel_rejects_bad_inputs():
    from kvserve.attention import cpu_kernels

    kernels = cpu_kernels.load()
    w, s = torch.zeros(4, 8, dtype=torch.int8), torch.ones(4)
    with pytest.raises(RuntimeError, match="int8"):
        kernels.int8_matmul(torch.zeros(1, 8), w.float(), s)
    with pytest.raises(RuntimeError, match="scale must be"):
        kernels.int8_matmul(torch.zeros(1, 8), w, torch.ones(3))


@pytest.mark.parametrize("rows", [1, 3, 8, 21])            # 21: passes of 8, 8 and 5 rows
@pytest.mark.parametrize("in_features", [64, 77])
def test_every_int8_kernel_path_equals_the_portable_loop(rows, in_features):
    """Each instruction-set path the CPU can run (set at run time, as KVSERVE_CPU_ISA does) gives the
    portable loop's result in fp32, a tail of k not a multiple of the vector width included."""
    from kvserve.attention import cpu_kernels
    from kvserve.cpu_features import LEVELS, available_levels

    kernels = cpu_kernels.load()
    assert kernels is not None
    torch.manual_seed(rows * in_features)
    q = Int8Linear.quantize(torch.randn(300, in_features), dtype=torch.float32)
    x = torch.randn(rows, in_features)
    expected = kernels.int8_matmul_portable(x, q.weight, q.scale)
    before = kernels.get_isa()
    try:
        for level in available_levels():
            kernels.set_isa(LEVELS.index(level))
            torch.testing.assert_close(kernels.int8_matmul(x, q.weight, q.scale), expected, rtol=1e-5, atol=1e-4)
    finally:
        kernels.set_isa(before)


def test_q4_packing_is_q4_1s_nibble_order():
    q = torch.arange(64, dtype=torch.int32).remainder(16).view(1, 64)       # two groups of 32
    qs = pack_q4(q)
    assert qs.dtype == torch.uint8 and qs.shape == (1, 32)
    assert qs[0, 0].item() == (q[0, 0] | q[0, 16] << 4).item()               # byte j: q[j] low, q[j+16] high
    assert qs[0, 16].item() == (q[0, 32] | q[0, 48] << 4).item()
    assert torch.equal(unpack_q4(qs), q)


def test_int4_kernels_clamp_non_finite_and_tiny_activations_alike():
    """A group holding inf, NaN or values so small that 127 / max|x| overflows gives the same bytes
    on every path (clamped to ±127), never an out-of-range conversion."""
    from kvserve.attention import cpu_kernels
    from kvserve.cpu_features import LEVELS, available_levels

    kernels = cpu_kernels.load()
    q, d, m = quantize_groups_q4(torch.randn(16, 96))
    qs, dm = pack_q4(q), torch.stack([d, m], dim=-1).half()
    x = torch.randn(3, 96)
    x[0, 5], x[1, 40], x[2, 64:96] = float("inf"), float("nan"), 1e-40
    packed = pack_q4_gemm(qs, dm)
    outs = []
    before = kernels.get_isa()
    try:
        for level in available_levels():
            kernels.set_isa(LEVELS.index(level))
            outs.append(kernels.int4_gemm(x, *packed)[2])
    finally:
        kernels.set_isa(before)
    outs.append(kernels.int4_gemm_portable(x, *packed)[2])
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-5, equal_nan=True)


def test_q8_activations_are_within_half_a_step():
    torch.manual_seed(0)
    x = torch.randn(3, 96) * torch.tensor([1e-3, 1.0, 50.0])[:, None]
    x[1, :32] = 0                                                             # an all-zero group
    a, e = quantize_q8_rows(x)
    assert a.abs().max() <= 127 and torch.equal(a, a.round())
    assert (e[1, 0] == 0) and (a[1, :32] == 0).all()
    err = (a.view(3, 3, 32) * e[..., None]).view(3, 96) - x
    assert (err.abs() <= e.repeat_interleave(32, dim=1) / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize("rows", [1, 2, 5, 8])
# in 96: 3 groups (odd); 160: a block of four and an odd one; 192: a block and a pair; 224: a block, a
# pair and an odd one; 576 (SmolLM2's hidden size): four blocks and a pair
@pytest.mark.parametrize("shape", [(48, 64), (64, 96), (32, 160), (32, 192), (48, 224), (64, 576), (576, 1536)])
def test_every_int4_kernel_path_equals_its_torch_spec(rows, shape):
    """Each instruction-set path the CPU can run (set at run time, as KVSERVE_CPU_ISA does), and the
    portable loop, compute the spec: int8 activations per group of 32 times the Q4_1 weights."""
    from kvserve.attention import cpu_kernels
    from kvserve.cpu_features import LEVELS, available_levels

    kernels = cpu_kernels.load()
    assert kernels is not None
    torch.manual_seed(rows * shape[1])
    q = Int4Linear.quantize(torch.randn(*shape), dtype=torch.float32)
    x = torch.randn(rows, shape[1])
    expected = int4_matmul_reference(x, q.qs, q.dm)
    atol = 2e-6 * shape[1] ** 0.5 * expected.abs().max().item()
    torch.testing.assert_close(kernels.int4_matmul_portable(x, q.qs, q.dm), expected, rtol=1e-5, atol=atol)
    before = kernels.get_isa()
    try:
        for level in available_levels():
            kernels.set_isa(LEVELS.index(level))
            torch.testing.assert_close(kernels.int4_matmul(x, q.qs, q.dm), expected, rtol=1e-5, atol=atol)
            bf16 = kernels.int4_matmul(x.bfloat16(), q.qs, q.dm)
            assert bf16.dtype == torch.bfloat16
            torch.testing.assert_close(bf16.float(), int4_matmul_reference(x.bfloat16(), q.qs, q.dm), rtol=1e-2,
                                       atol=1e-2 * expected.abs().max().item())
    finally:
        kernels.set_isa(before)
    # the spec is the plain product up to the activations' rounding (half a step of 1/127 per group)
    plain = x @ q.dequantized().t()
    assert (expected - plain).abs().max() < 0.02 * plain.abs().max()


def test_int4_gemm_layout_holds_each_q_once_with_its_group_scales():
    q4 = Int4Linear.quantize(torch.randn(16, 64), dtype=torch.float32)
    w, d, m = pack_q4_gemm(q4.qs, q4.dm)
    assert w.shape == (2, 2, 4, 8, 4) and w.dtype == torch.uint8
    q = unpack_q4(q4.qs)
    # block b, group g, quad pair p, output o, byte i: quad 2p in the low nibble, 2p + 1 in the high one
    for b, g, p, o, i in [(0, 0, 0, 0, 0), (1, 1, 3, 7, 3), (0, 1, 2, 5, 1)]:
        row, col = 8 * b + o, 32 * g + 8 * p + i
        assert w[b, g, p, o, i].item() == (q[row, col] | q[row, col + 4] << 4).item()
        assert d[b, g, o] == q4.dm[row, g, 0] and m[b, g, o] == q4.dm[row, g, 1]
    assert d.dtype == m.dtype == torch.float16


# rows: below, at and past the AVX2 tile's 6 rows, a 64-row chunk and a part of the next; outputs:
# one block of 8 (a lone block), pairs of blocks; inputs: an odd number of groups and SmolLM2's
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 13, 70])
@pytest.mark.parametrize("shape", [(8, 96), (48, 64), (40, 160), (64, 576), (576, 1536)])
def test_every_int4_gemm_path_equals_the_int4_spec(rows, shape):
    """The many-row int4 kernel computes what the few-row one does (int4_matmul_reference), on each
    instruction-set path the CPU can run and in the portable loop."""
    from kvserve.attention import cpu_kernels
    from kvserve.cpu_features import LEVELS, available_levels

    kernels = cpu_kernels.load()
    torch.manual_seed(rows + shape[1])
    q, d, m = quantize_groups_q4(torch.randn(*shape))         # not an Int4Linear: (8, 96) is a lone block
    qs, dm = pack_q4(q), torch.stack([d, m], dim=-1).half()
    x = torch.randn(rows, shape[1]) * torch.linspace(0.1, 10, rows)[:, None]
    expected = int4_matmul_reference(x, qs, dm)
    packed = pack_q4_gemm(qs, dm)
    atol = 2e-6 * shape[1] ** 0.5 * expected.abs().max().item()
    torch.testing.assert_close(kernels.int4_gemm_portable(x, *packed), expected, rtol=1e-5, atol=atol)
    before = kernels.get_isa()
    try:
        for level in available_levels():
            kernels.set_isa(LEVELS.index(level))
            torch.testing.assert_close(kernels.int4_gemm(x, *packed), expected, rtol=1e-5, atol=atol)
            # bf16 activations are widened first (fp32 out); their coarse values meet rounding ties
            # in the int8 step, which the spec (x · (1 / e)) and the kernels (x · (127 / max)) may
            # break apart: a step of one group, as in the few-row kernel's bf16 check
            torch.testing.assert_close(kernels.int4_gemm(x.bfloat16(), *packed),
                                       int4_matmul_reference(x.bfloat16().float(), qs, dm), rtol=1e-2,
                                       atol=1e-2 * expected.abs().max().item())
    finally:
        kernels.set_isa(before)


def test_int4_gemm_layers_drop_the_widened_weights_and_compute_the_same():
    from kvserve.attention import cpu_kernels

    torch.manual_seed(0)
    layer = Int4Linear.quantize(torch.randn(32, 64), torch.randn(32), dtype=torch.float32)
    layer.kernels = cpu_kernels.load()
    x = torch.randn(20, 64)
    expected = int4_matmul_reference(x, layer.qs, layer.dm) + layer.bias
    layer.use_gemm()
    assert layer.wide is None and layer.gemm is not None
    for rows in (1, 20):                                   # every row count takes the GEMM
        torch.testing.assert_close(layer(x[:rows]), expected[:rows], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(layer.dequantized(), dequantize_q4(layer.qs, layer.dm))
    with pytest.raises(ValueError, match="float32 activations"):
        Int4Linear.quantize(torch.randn(16, 64), dtype=torch.bfloat16).use_gemm()


def test_cpu_int4_gemm_rejects_bad_inputs():
    from kvserve.attention import cpu_kernels

    kernels = cpu_kernels.load()
    q = Int4Linear.quantize(torch.randn(16, 64), dtype=torch.float32)
    w, d, m = pack_q4_gemm(q.qs, q.dm)
    with pytest.raises(RuntimeError, match="the weights take 64"):
        kernels.int4_gemm(torch.zeros(3, 96), w, d, m)
    with pytest.raises(RuntimeError, match="w must be"):
        kernels.int4_gemm(torch.zeros(3, 64), w.view(2, 2, 4, 32), d, m)
    with pytest.raises(RuntimeError, match="d and m must be"):
        kernels.int4_gemm(torch.zeros(3, 64), w, d.float(), m)
    with pytest.raises(RuntimeError, match="x must be"):
        kernels.int4_gemm(torch.zeros(3, 64, dtype=torch.float64), w, d, m)


def test_q16_activations_are_within_half_a_step_per_segment():
    torch.manual_seed(0)
    x = torch.randn(3, 600) * torch.tensor([1e-3, 1.0, 50.0])[:, None]      # segments of 256, 256 and 88
    x[1, :INT8_GEMM_SEGMENT] = 0                                            # an all-zero segment
    a, e = quantize_q16_rows(x)
    assert e.shape == (3, 3) and a.abs().max() <= 32767 and torch.equal(a, a.round())
    assert e[1, 0] == 0 and (a[1, :INT8_GEMM_SEGMENT] == 0).all()
    step = e.repeat_interleave(torch.tensor([256, 256, 88]), dim=1)
    assert ((a * step - x).abs() <= step / 2 * (1 + 1e-5)).all()


def test_int8_gemm_layout_holds_each_weight_once():
    w = torch.randint(-127, 128, (13, 10), dtype=torch.int8)          # 13 outputs: a last block of 5
    packed = pack_int8_gemm(w)
    assert packed.shape == (2, 5, 8, 2) and packed.dtype == torch.int8
    for b, p, o, i in [(0, 0, 0, 0), (1, 4, 4, 1), (0, 2, 5, 1), (1, 3, 0, 0)]:
        assert packed[b, p, o, i] == w[8 * b + o, 2 * p + i]
    assert (packed[1, :, 5:] == 0).all()                               # the padding past n
    assert torch.equal(packed.permute(0, 2, 1, 3).reshape(16, 10)[:13], w)


# rows: below, at and past the AVX2 tile's 6 rows, and more; outputs: a lone block of 8, pairs of
# blocks and a pair with a lone one, and numbers that end in part of a block (13; 260, the byte
# tokenizer's vocabulary); inputs: one short segment, a segment and a part (600), SmolLM2's
# hidden size (two segments and a part) and intermediate size (six segments)
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 13, 70])
@pytest.mark.parametrize("shape", [(8, 96), (24, 64), (13, 64), (260, 96), (40, 600), (64, 576), (576, 1536)])
def test_every_int8_gemm_path_equals_its_torch_spec(rows, shape):
    """The int8 GEMM (int16 activations per segment of 256 inputs) on each instruction-set path the
    CPU can run and in the portable loop computes its spec, which is the fp32 product of the int8
    weights to well within their own rounding."""
    from kvserve.attention import cpu_kernels
    from kvserve.cpu_features import LEVELS, available_levels

    kernels = cpu_kernels.load()
    torch.manual_seed(rows + shape[1])
    layer = Int8Linear.quantize(torch.randn(*shape), dtype=torch.float32)
    x = torch.randn(rows, shape[1]) * torch.linspace(0.1, 10, rows)[:, None]
    expected = int8_gemm_reference(x, layer.weight, layer.scale)
    packed = pack_int8_gemm(layer.weight)
    atol = 2e-6 * shape[1] ** 0.5 * expected.abs().max().item()
    torch.testing.assert_close(kernels.int8_gemm_portable(x, packed, layer.scale), expected, rtol=1e-5, atol=atol)
    before = kernels.get_isa()
    try:
        for level in available_levels():
            kernels.set_isa(LEVELS.index(level))
            torch.testing.assert_close(kernels.int8_gemm(x, packed, layer.scale), expected, rtol=1e-5, atol=atol)
            torch.testing.assert_close(kernels.int8_gemm(x.bfloat16(), packed, layer.scale),
                                       int8_gemm_reference(x.bfloat16().float(), layer.weight, layer.scale),
                                       rtol=1e-5, atol=atol)
    finally:
        kernels.set_isa(before)
    # the spec is the plain product of the int8 weights up to a step of 1/65,534 per segment
    plain = x @ layer.dequantized().t()
    assert (expected - plain).abs().max() < 1e-4 * plain.abs().max()


def test_int8_gemm_clamps_non_finite_and_tiny_activations_alike():
    from kvserve.attention import cpu_kernels
    from kvserve.cpu_features import LEVELS, available_levels

    kernels = cpu_kernels.load()
    layer = Int8Linear.quantize(torch.randn(16, 512), dtype=torch.float32)
    packed = pack_int8_gemm(layer.weight)
    x = torch.randn(3, 512)
    x[0, 5], x[1, 300], x[2, 256:512] = float("inf"), float("nan"), 1e-40
    outs = []
    before = kernels.get_isa()
    try:
        for level in available_levels():
            kernels.set_isa(LEVELS.index(level))
            outs.append(kernels.int8_gemm(x, packed, layer.scale))
    finally:
        kernels.set_isa(before)
    outs.append(kernels.int8_gemm_portable(x, packed, layer.scale))
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-5, equal_nan=True)
    assert torch.isfinite(outs[0][2]).all()          # the tiny segment: rounded, no inf from 32767 / max


def test_int8_gemm_layers_drop_the_widened_weights_and_compute_the_same():
    from kvserve.attention import cpu_kernels

    torch.manual_seed(0)
    layer = Int8Linear.quantize(torch.randn(40, 64), torch.randn(40), dtype=torch.float32, keep_wide=True)
    layer.kernels = cpu_kernels.load()
    x = torch.randn(20, 64)
    expected = int8_gemm_reference(x, layer.weight, layer.scale) + layer.bias
    layer.use_gemm()
    assert layer.wide is None and layer.packed_wide is None and layer.gemm is not None
    atol = 2e-6 * 64 ** 0.5 * expected.abs().max().item()     # a rounding tie is a step either way
    for rows in (1, 20):                                   # every row count takes the GEMM
        torch.testing.assert_close(layer(x[:rows]), expected[:rows], rtol=1e-5, atol=atol)
    with pytest.raises(ValueError, match="float32 activations"):
        Int8Linear.quantize(torch.randn(16, 64), dtype=torch.bfloat16).use_gemm()
    with pytest.raises(ValueError, match="C\\+\\+ kernels"):
        Int8Linear.quantize(torch.randn(16, 64), dtype=torch.float32).use_gemm()
    odd = Int8Linear.quantize(torch.randn(12, 63), dtype=torch.float32)
    odd.kernels = layer.kernels
    with pytest.raises(ValueError, match="even number of inputs"):
        odd.use_gemm()


def test_cpu_int8_gemm_rejects_bad_inputs():
    from kvserve.attention import cpu_kernels

    kernels = cpu_kernels.load()
    layer = Int8Linear.quantize(torch.randn(16, 64), dtype=torch.float32)
    packed = pack_int8_gemm(layer.weight)
    with pytest.raises(RuntimeError, match="the weights take 64"):
        kernels.int8_gemm(torch.zeros(3, 96), packed, layer.scale)
    with pytest.raises(RuntimeError, match="w must be"):
        kernels.int8_gemm(torch.zeros(3, 64), packed.view(2, 32, 16), layer.scale)
    with pytest.raises(RuntimeError, match="scale must be"):
        kernels.int8_gemm(torch.zeros(3, 64), packed, layer.scale.double())
    with pytest.raises(RuntimeError, match="scale must be"):
        kernels.int8_gemm(torch.zeros(3, 64), packed, layer.scale[:8])           # one block short
    with pytest.raises(RuntimeError, match="scale must be"):
        kernels.int8_gemm(torch.zeros(3, 64), packed, layer.scale.view(2, 8))
    with pytest.raises(RuntimeError, match="x must be"):
        kernels.int8_gemm(torch.zeros(3, 64, dtype=torch.float64), packed, layer.scale)


def test_cpu_int4_kernel_rejects_bad_inputs():
    from kvserve.attention import cpu_kernels

    kernels = cpu_kernels.load()
    q = Int4Linear.quantize(torch.randn(16, 64), dtype=torch.float32)
    with pytest.raises(RuntimeError, match="at most 8 rows"):
        kernels.int4_matmul(torch.zeros(9, 64), q.qs, q.dm)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        kernels.int4_matmul(torch.zeros(1, 48), q.qs[:, :24], q.dm)
    with pytest.raises(RuntimeError, match="qs must be"):
        kernels.int4_matmul(torch.zeros(1, 64), q.qs.int(), q.dm)
    with pytest.raises(RuntimeError, match="dm must be"):
        kernels.int4_matmul(torch.zeros(1, 64), q.qs, q.dm.float())


def test_kv_cache_dtype_follows_the_model_unless_a_quantized_fp32_model_can_halve_it():
    from kvserve.runner.model_runner import resolve_kv_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_kv_dtype("auto", torch.float32, "int4", cpu) == torch.bfloat16
    assert resolve_kv_dtype("auto", torch.float32, "int8", cpu) == torch.bfloat16
    assert resolve_kv_dtype("auto", torch.float32, "none", cpu) == torch.float32     # the exact fp32 model
    assert resolve_kv_dtype("auto", torch.bfloat16, "int4", cpu) == torch.bfloat16
    assert resolve_kv_dtype("auto", torch.float32, "int4", cuda) == torch.float32
    assert resolve_kv_dtype("float32", torch.float32, "int4", cpu) == torch.float32
    with pytest.raises(ConfigError, match="--kv-cache-dtype must be one of auto, bfloat16, float32"):
        CacheConfig(dtype="fp8")


def test_a_quantized_fp32_engine_holds_twice_the_tokens_in_the_same_memory():
    from kvserve.engine.engine import Engine
    from kvserve.sampling import SamplingParams

    engines = {q: Engine(EngineConfig(model="random:tiny", dtype="float32", quantization=q,
                                      cache=CacheConfig(memory_bytes=8 << 20)), load_checkpoint("random:tiny"))
               for q in ("none", "int4")}
    assert engines["int4"].core.runner.kv_dtype == torch.bfloat16
    assert engines["int4"].core.runner.num_blocks == 2 * engines["none"].core.runner.num_blocks

    engine = engines["int4"]
    engine.add(list(range(5, 60)), SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    tokens = []
    while engine.has_unfinished:
        tokens += [t for o in engine.step() for t in o.token_ids]
    assert len(tokens) == 6


def test_quantization_auto_is_int4_only_where_its_kernel_runs():
    from kvserve.runner.model_runner import resolve_quantization

    cpu = torch.device("cpu")
    assert resolve_quantization("auto", "auto", cpu) == "int4"                  # the kernels build here
    assert resolve_quantization("auto", "auto", cpu, "cpu") == "int4"
    assert resolve_quantization("auto", "float32", cpu) == "none"               # an explicit dtype: its numerics
    assert resolve_quantization("auto", "bfloat16", cpu) == "none"
    assert resolve_quantization("auto", "auto", cpu, "torch") == "none"         # the reference path: no kernels
    assert resolve_quantization("auto", "auto", torch.device("cuda")) == "none"
    assert resolve_quantization("int8", "float32", cpu, "torch") == "int8"      # asked for: given


@pytest.mark.parametrize("dtype,quantization", [("float32", "int4"), ("bfloat16", "int4"), ("float32", "int8")])
def test_the_quantized_weights_read_every_step_live_in_one_buffer_and_compute_the_same(dtype, quantization):
    """gather_quantized_weights: every tensor a quantized layer's kernel reads per call is a view of
    one buffer, in the order a forward pass reads them, each on a cache line; the outputs are the
    ones the layers gave before."""
    from kvserve.attention import cpu_kernels
    from kvserve.model.quant import ARENA_ALIGN, gather_quantized_weights
    from kvserve.runner.model_runner import ModelRunner

    if cpu_kernels.load() is None:
        pytest.skip("no C++ kernels here")
    checkpoint = load_checkpoint("random:tiny")
    runner = ModelRunner(checkpoint.config, checkpoint.weights, CacheConfig(memory_bytes=4 << 20),
                         getattr(torch, dtype), torch.device("cpu"), 0, attention="cpu", quantization=quantization)
    layers = [m for m in runner.model.modules() if isinstance(m, (Int4Linear, Int8Linear))]
    assert layers and all(layer.kernels is not None for layer in layers)

    def hot(layer):
        if isinstance(layer, Int4Linear):
            tensors = list(layer.gemm) if layer.gemm is not None else [layer.qs, layer.dm]
        else:
            tensors = [layer.gemm if layer.gemm is not None else layer.weight, layer.scale]
        return tensors + ([layer.bias] if layer.bias is not None else [])

    tensors = [t for layer in layers for t in hot(layer)]
    storages = {t.untyped_storage().data_ptr() for t in tensors}
    assert len(storages) == 1                                      # the runner gathered them
    addresses = [t.data_ptr() for t in tensors]
    assert addresses == sorted(addresses)                          # in the order of the forward pass
    assert all(a % ARENA_ALIGN == 0 for a in addresses)
    assert all(a + t.numel() * t.element_size() <= b for a, b, t in zip(addresses, addresses[1:], tensors))

    torch.manual_seed(0)
    x = {layer: torch.randn(3, layer.in_features, dtype=getattr(torch, dtype)) for layer in layers}
    before = {layer: layer(x[layer]) for layer in layers}
    copies = [t.clone() for t in tensors]
    assert gather_quantized_weights(runner.model) == sum(
        -(-t.numel() * t.element_size() // ARENA_ALIGN) * ARENA_ALIGN for t in tensors[:-1]) + \
        tensors[-1].numel() * tensors[-1].element_size()           # gathering again: a new buffer, the same bytes
    again = [t for layer in layers for t in hot(layer)]
    assert len({t.untyped_storage().data_ptr() for t in again}) == 1 and again[0].data_ptr() != addresses[0]
    assert all(torch.equal(a, b) for a, b in zip(again, copies))
    for layer in layers:
        assert torch.equal(layer(x[layer]), before[layer])
