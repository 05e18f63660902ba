"""bf16 linear layers with oneDNN-prepacked weights compute what nn.Linear computes."""

import pytest
import torch
from torch import nn

from kvserve.model.packed import PackedLinear, pack_weight, prepack_linears

pytestmark = pytest.mark.skipif(pack_weight(torch.zeros(16, 16, dtype=torch.bfloat16)) is None,
                                reason="this torch build cannot prepack bf16 weights for oneDNN")


@pytest.mark.parametrize("rows", [1, 5, 64, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_nn_linear(rows, bias):
    torch.manual_seed(rows)
    linear = nn.Linear(96, 80, bias=bias).to(torch.bfloat16)
    x = torch.randn(rows, 96, dtype=torch.bfloat16)
    expected = linear(x).float()
    packed = PackedLinear(linear, pack_weight(linear.weight))
    got = packed(x).float()
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())
    assert packed(x.view(1, rows, 96)).shape == (1, rows, 80)


def test_prepack_replaces_bf16_linears_only_and_keeps_the_tie():
    embed = nn.Embedding(50, 32).to(torch.bfloat16)
    head = nn.Linear(32, 50, bias=False).to(torch.bfloat16)
    head.weight = embed.weight
    model = nn.ModuleDict({"embed": embed, "head": head, "fp32": nn.Linear(32, 32)})
    assert prepack_linears(model) == 1
    assert isinstance(model["head"], PackedLinear) and isinstance(model["fp32"], nn.Linear)
    assert model["head"].weight is embed.weight


def test_an_untied_weight_is_held_once_and_still_reads_back_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 8, bias=False)).to(torch.bfloat16)
    plain = [layer.weight.detach().clone() for layer in model]
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert prepack_linears(model) == 2
    assert [name for name, _ in model.named_parameters()] == ["0.bias"]    # no plain weight left behind
    for layer, weight in zip(model, plain):
        assert torch.equal(layer.weight, weight)
    expected = nn.functional.linear(nn.functional.linear(x, plain[0], model[0].bias), plain[1])
    torch.testing.assert_close(model(x).float(), expected.float(), rtol=1e-2, atol=1e-2)


def test_engine_logits_with_packed_weights_match_plain_bf16():
    from kvserve.config import EngineConfig
    from kvserve.engine.engine import Engine
    from kvserve.model.checkpoint import load_checkpoint

    engine = Engine(EngineConfig(model="random:tiny", dtype="bfloat16"), load_checkpoint("random:tiny"))
    model = engine.core.runner.model
    assert any(isinstance(m, PackedLinear) for m in model.modules())
    hidden = torch.randn(7, model.config.hidden_size, dtype=torch.bfloat16)
    packed_logits = model.compute_logits(hidden).float()
    plain_logits = nn.functional.linear(hidden, model.lm_head.weight).float()
    torch.testing.assert_close(packed_logits, plain_logits, rtol=1e-2, atol=1e-2 * plain_logits.abs().max().item())
