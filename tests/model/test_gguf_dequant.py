"""kvserve's torch dequantization of GGUF block formats equals gguf's numpy reference bit for bit,
on random blocks of every format it reads (with valid half-float scales)."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as reference

from kvserve.model import gguf_dequant

# type → (bytes per block, offsets of its half-float fields)
FORMATS = {"Q8_0": (34, [0]), "Q4_0": (18, [0]), "Q4_1": (20, [0, 2]), "Q5_0": (22, [0]),
           "Q4_K": (144, [0, 2]), "Q6_K": (210, [208])}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_equals_gguf_bit_for_bit(name):
    block_bytes, half_offsets = FORMATS[name]
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, size=(300, block_bytes), dtype=np.uint8)
    for offset in half_offsets:   # scales: finite half floats of either sign, tiny to large
        halves = (rng.standard_normal(300) * rng.choice([1e-3, 1e-1, 3.0], 300)).astype(np.float16)
        blocks[:, offset:offset + 2] = halves.view(np.uint8).reshape(300, 2)
    values_per_block = 256 if name.endswith("_K") else 32
    shape = (300 * values_per_block // 64, 64)
    raw = blocks.reshape(-1)
    expected = reference(raw, GGMLQuantizationType[name]).reshape(shape)
    ours = gguf_dequant.dequantize(raw, name, shape)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, torch.from_numpy(np.ascontiguousarray(expected, dtype=np.float32)))


def test_unknown_types_and_bad_sizes():
    assert gguf_dequant.dequantize(np.zeros(10, np.uint8), "IQ2_XS", (1,)) is None
    with pytest.raises(ValueError, match="whole number"):
        gguf_dequant.dequantize(np.zeros(35, np.uint8), "Q8_0", (32,))
    with pytest.raises(ValueError, match="needs 64"):
        gguf_dequant.dequantize(np.zeros(34, np.uint8), "Q8_0", (64,))
