"""Int8Linear: per-channel weight-only int8; both kernels agree with the dequantized weights."""

import pytest
import torch
from torch import nn

from kvserve.config import ConfigError, EngineConfig
from kvserve.model.checkpoint import load_checkpoint
from kvserve.model.quant import MAX_INT8_ROWS, Int8Linear, quantize_int8


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
    with pytest.raises(ConfigError, match="--quantization must be one of none, int8"):
        EngineConfig(quantization="int4")


def test_int8_needs_bf16():
    from kvserve.engine.engine import Engine

    with pytest.raises(ValueError, match="int8 runs with bfloat16"):
        Engine(EngineConfig(model="random:tiny", dtype="float32", quantization="int8"), load_checkpoint("random:tiny"))


def test_int8_tiny_engine_generates_like_bf16_for_a_short_prompt():
    """End to end through the engine (single stream → the int8 kernel): runs, and its first
    greedy tokens mostly agree with bf16 on the same random weights."""
    from kvserve.engine.engine import Engine
    from kvserve.sampling import SamplingParams

    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    out = {}
    for q in ("none", "int8"):
        engine = Engine(EngineConfig(model="random:tiny", dtype="bfloat16", quantization=q), load_checkpoint("random:tiny"))
        engine.add([5, 6, 7, 8, 9, 10], params)
        tokens = []
        while engine.has_unfinished:
            tokens += [t for o in engine.step() for t in o.token_ids]
        out[q] = tokens
    assert len(out["int8"]) == 8
    assert out["int8"][:2] == out["none"][:2]
