"""GGUF block formats → fp32, in torch: the same values as `gguf.quants.dequantize`, bit for bit
(the same fp32 operations in the same order), but vectorised over whole tensors on every core.
The numpy reference takes ~40 s for a 1.5 B-parameter K-quant file on 2 cores; this takes a few.

Formats (llama.cpp's ggml-common.h; QK = 32 values per block, QK_K = 256 per super-block):

    Q8_0   34 B   d:f16, q:int8[32]                        x = d * q
    Q4_0   18 B   d:f16, nibbles[16]                       x = d * (q - 8)
    Q4_1   20 B   d:f16, m:f16, nibbles[16]                x = d * q + m
    Q5_0   22 B   d:f16, qh:u32, nibbles[16]               x = d * (q | bit << 4) - 16)
    Q4_K  144 B   d:f16, dmin:f16, scales[12], nibbles[128]
                  8 sub-blocks of 32, 6-bit scale sc and min m each:  x = (d * sc) * q - dmin * m
    Q6_K  210 B   ql[128], qh[64], scales:int8[16], d:f16
                  16 sub-blocks of 16:  x = (d * scale) * (q - 32), q 6 bits = 4 low (ql) + 2 high (qh)

Nibbles: in a 32-value block, byte j holds value j (low nibble) and j + 16 (high). In a Q4_K
super-block, each run of 32 bytes holds two sub-blocks: low nibbles the first, high the second.
Any other type returns None, and the caller uses gguf's numpy code.
"""

from __future__ import annotations

import warnings

import torch

_F16 = torch.float16


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """[n, 2] uint8 → [n, 1] fp32 (little-endian half floats)."""
    return raw.contiguous().view(_F16).to(torch.float32)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16] bytes → [n, 32] values: the low nibbles, then the high ones."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:].contiguous().view(torch.int8).to(torch.float32) * _f16(b[:, :2])


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    q = (_nibbles(b[:, 2:]).to(torch.int8) - 8).to(torch.float32)
    return _f16(b[:, :2]) * q


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, :2]) * _nibbles(b[:, 4:]).to(torch.float32) + _f16(b[:, 2:4])


_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    # qh: 32 bits, little-endian: value j's fifth bit is bit j % 8 of byte j // 8.
    bits = ((b[:, 2:6].unsqueeze(-1) >> _BIT_SHIFTS) & 1).reshape(-1, 32)
    q = (_nibbles(b[:, 6:]) | (bits << 4)).to(torch.int8) - 16
    return _f16(b[:, :2]) * q.to(torch.float32)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    s = b[:, 4:16]
    low, mid, top = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([low & 0x3F, (top & 0x0F) | ((low >> 2) & 0x30)], dim=1).to(torch.float32)
    mn = torch.cat([mid & 0x3F, (top >> 4) | ((mid >> 2) & 0x30)], dim=1).to(torch.float32)
    qs = b[:, 16:].reshape(n, 4, 32)
    q = torch.stack([qs & 0x0F, qs >> 4], dim=2).reshape(n, 8, 32).to(torch.float32)
    return ((d * sc).unsqueeze(-1) * q - (dmin * mn).unsqueeze(-1)).reshape(n, 256)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql = b[:, 0:128].reshape(n, 2, 1, 64)
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    scales = b[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    d = _f16(b[:, 208:210])
    low = torch.cat([ql & 0x0F, ql >> 4], dim=2).reshape(n, 8, 32)
    high = torch.cat([(qh >> shift) & 0x03 for shift in (0, 2, 4, 6)], dim=2).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16).to(torch.float32)
    return ((d * scales).unsqueeze(-1) * q).reshape(n, 256)


# type name → (bytes per block, values per block, function)
_FORMATS = {
    "Q8_0": (34, 32, _q8_0),
    "Q4_0": (18, 32, _q4_0),
    "Q4_1": (20, 32, _q4_1),
    "Q5_0": (22, 32, _q5_0),
    "Q4_K": (144, 256, _q4_k),
    "Q6_K": (210, 256, _q6_k),
}


def supported(type_name: str) -> bool:
    return type_name in _FORMATS


def dequantize(raw, type_name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
    """The tensor's bytes (a uint8 numpy array or memory map) → fp32 `shape`; None for a type
    this module does not read."""
    if type_name not in _FORMATS:
        return None
    block_bytes, block_values, function = _FORMATS[type_name]
    with warnings.catch_warnings():    # a read-only memory map: it is only read
        warnings.simplefilter("ignore", UserWarning)
        data = torch.frombuffer(memoryview(raw).cast("B"), dtype=torch.uint8)
    if data.numel() % block_bytes:
        raise ValueError(f"{type_name}: {data.numel()} bytes is not a whole number of {block_bytes}-byte blocks")
    blocks = data.reshape(-1, block_bytes)
    count = 1
    for dim in shape:
        count *= dim
    if blocks.shape[0] * block_values != count:
        raise ValueError(f"{type_name}: {blocks.shape[0]} blocks hold {blocks.shape[0] * block_values} values, "
                         f"the shape {shape} needs {count}")
    # Chunks of 128 k values (512 KB of fp32, and temporaries of that order) stay near L2 and are
    # recycled by malloc. Chunks of 64 k blocks made every temporary a fresh
    # multi-MB mmap, page-faulted on first touch: the 1.5B K-quant file took ~25 s instead of ~8.
    out = torch.empty(blocks.shape[0], block_values, dtype=torch.float32)
    step = max(1, (1 << 12) // (block_values // 32))
    for start in range(0, blocks.shape[0], step):
        out[start:start + step] = function(blocks[start:start + step])
    return out.reshape(shape)
