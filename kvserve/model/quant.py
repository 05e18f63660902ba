"""Weight-only quantization of the linear layers (`--quantization int8|int4`).

int8: each weight matrix [out, in] is stored as int8 with one scale per output channel
(symmetric, scale = max|row| / 127): half the memory of bf16, and a decode step of one stream,
which streams every weight once and is bound by memory bandwidth, reads half the bytes.

int4: groups of 32 consecutive weights of a row share a scale d and a minimum m (fp16) and each
weight is a 4-bit q in 0..15 (w = d·q + m): llama.cpp's Q4_1 block. Quantizing a GGUF's Q4_1 tensor
this way gives back its own q, d and m (its quantizer is this min/max rule), so the weights are the
file's 4-bit weights, read at a quarter of bf16's bytes. The LM head, and layers of other shapes
(out % 16, in % 32), use int8 instead.

Activations may be bf16 or fp32 (a CPU without native bf16 math runs fp32). Two kernels per layer,
chosen by the number of rows in the call (the same weights either way):
  - up to `MAX_INT8_ROWS` / `MAX_INT4_ROWS` rows (decode of a few streams): a quantized-weight
    matmul in kvserve's C++ kernels that reads the packed weights directly (csrc/int8_matmul.cpp;
    csrc/int4_matmul.cpp, which quantizes the activations to int8 per group of 32 as llama.cpp does
    and takes integer dot products: AVX512-VNNI, AVX2, or the portable loop);
  - more rows (prefill chunks, large decode batches, which are bound by compute, not bandwidth), or
    no C++ kernels: the plain matmul on the dequantized weights kept beside the packed ones (for int4,
    speed and not memory: 1.25× the bytes of bf16), prepacked for oneDNN in bf16; int8 without them
    widens its weights on the fly.
With fp32 activations and the kernels at an AVX2 level, every call takes one integer GEMM instead,
whatever its rows: int4 layers csrc/int4_gemm.cpp (`use_int4_gemm`), int8 layers (the int4 mode's LM
head) csrc/int8_gemm.cpp with activations rounded to int16 (`use_int8_gemm`); their widened copies
are dropped. Measured on the project's CPUs in docs/speed-notes.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvserve.model.packed import packed_linear

MAX_INT8_ROWS = 4
MAX_INT8_ROWS_FP32 = 16    # fp32 activations: the int8 kernel (passes of 8 rows) beats MKL's fp32 matmul up to here
MAX_INT4_ROWS = 8          # the int4 kernel takes at most 8 rows (speed notes: where it beats the plain matmul)
INT4_GROUP = 32


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 wide: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("weight", weight)           # [out, in] int8
        self.register_buffer("scale", scale)             # [out] in the activation dtype
        self.register_buffer("bias", bias)
        self.register_buffer("wide", wide)               # optional dequantized weights for many rows
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.kernels = None      # kvserve's C++ CPU kernels (set by use_fused_kernels): int8_matmul
        self.packed_wide = None  # `wide` prepacked for oneDNN (kvserve.model.packed), when packed
        self.gemm = None         # the weights in int8_gemm's layout, when use_gemm() was called

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, dtype: torch.dtype | None = None,
                 keep_wide: bool = False) -> "Int8Linear":
        """Per-output-channel symmetric int8 of `weight` (any float dtype); scales and bias take
        `dtype` (default: the weight's). keep_wide: also keep the dequantized weights for calls
        with many rows (faster than widening per call, 1.5× the memory of bf16)."""
        dtype = dtype or weight.dtype
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        linear = cls(q, scale.to(dtype), None if bias is None else bias.detach().to(dtype).clone())
        if keep_wide:
            linear.wide = linear.dequantized()
        return linear

    def dequantized(self) -> torch.Tensor:
        return self.weight.to(self.scale.dtype) * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The model passes flat, contiguous [tokens, features] batches: no reshapes then (each
        # tensor op called from Python costs microseconds, which add up over 30 layers a step).
        rows = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        few = MAX_INT8_ROWS_FP32 if x.dtype == torch.float32 else MAX_INT8_ROWS
        if self.gemm is not None:
            out = self.kernels.int8_gemm(rows, self.gemm, self.scale)
        elif rows.shape[0] <= few and self.kernels is not None:      # kernels are only set on CPU
            out = self.kernels.int8_matmul(rows, self.weight, self.scale)      # ~2× torch's, fp32 math
        elif rows.shape[0] <= MAX_INT8_ROWS:
            out = torch._weight_int8pack_mm(rows if rows.is_contiguous() else rows.contiguous(), self.weight, self.scale)
        elif self.packed_wide is not None:
            out = packed_linear(rows, self.packed_wide)
        elif self.wide is not None:
            out = F.linear(rows, self.wide)
        else:
            out = F.linear(rows, self.weight.to(x.dtype)) * self.scale
        if self.bias is not None:
            out = out + self.bias
        return out if x.dim() == 2 else out.view(*x.shape[:-1], self.out_features)

    def use_gemm(self) -> None:
        """Take every call, whatever its rows, through the C++ int8 GEMM (int16 activations, fp32
        out; needs the kernels): the weights reordered into its layout (the int8 ones are kept too,
        for `dequantized`: 2 bytes a weight in all), and the widened copy dropped."""
        if self.scale.dtype != torch.float32:
            raise ValueError("the int8 GEMM takes float32 activations")
        if self.kernels is None:
            raise ValueError("the int8 GEMM needs kvserve's C++ kernels (use_fused_kernels first)")
        if self.in_features % 2:
            raise ValueError(f"the int8 GEMM needs an even number of inputs; got {self.in_features}")
        self.gemm = pack_int8_gemm(self.weight)
        self.wide = self.packed_wide = None

    def pack_wide(self, pack) -> bool:
        """Prepack the widened weights for oneDNN; the plain copy is then dropped (no third copy)."""
        if self.wide is not None and self.wide.dtype == torch.bfloat16:
            self.packed_wide = pack(self.wide)
            if self.packed_wide is not None:
                self.wide = None
        return self.packed_wide is not None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


INT8_GEMM_SEGMENT = 256    # inputs per int16 activation scale in the int8 GEMM (csrc/int8_gemm.cpp)


def pack_int8_gemm(weight: torch.Tensor) -> torch.Tensor:
    """The int8 GEMM's layout (csrc/int8_gemm.cpp) of int8 weights [n, k] (k even): [⌈n/8⌉, k/2, 8, 2],
    where (block b, pair p, output o, i) holds weight[8b + o, 2p + i] (zeros past n)."""
    n, k = weight.shape
    padded = torch.cat([weight, weight.new_zeros(-n % 8, k)]) if n % 8 else weight
    return padded.view(-(-n // 8), 8, k // 2, 2).permute(0, 2, 1, 3).contiguous()


def quantize_q16_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 GEMM's activations, in torch (its spec): each row's segments of INT8_GEMM_SEGMENT
    inputs as int16 values a (held in fp32) with the scale e = max|x| / 32767, a = round(x / e).
    Returns (a, e [rows, segments])."""
    segments = [x.float()[:, i:i + INT8_GEMM_SEGMENT] for i in range(0, x.shape[1], INT8_GEMM_SEGMENT)]
    e = torch.stack([s.abs().amax(dim=1) for s in segments], dim=1) / 32767
    a = torch.cat([torch.round(s * torch.where(e[:, i:i + 1] > 0, 1 / e[:, i:i + 1], torch.zeros_like(e[:, i:i + 1])))
                   for i, s in enumerate(segments)], dim=1)
    return a, e


def int8_gemm_reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What kvserve's int8 GEMM computes, in fp32: the int16-rounded activations times the int8
    weights, times each output's scale."""
    a, e = quantize_q16_rows(x)
    widths = [min(INT8_GEMM_SEGMENT, x.shape[1] - i) for i in range(0, x.shape[1], INT8_GEMM_SEGMENT)]
    return (a * e.repeat_interleave(torch.tensor(widths), dim=1)) @ weight.float().t() * scale.float()


def int4_fits(out_features: int, in_features: int) -> bool:
    """Whether a layer of this shape is taken in int4: groups of 32 along its inputs, and outputs in
    multiples of 16 (the layers of the supported models; others keep int8)."""
    return out_features % 16 == 0 and in_features % INT4_GROUP == 0


def quantize_groups_q4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1-style groups of 32 along each row: (q [out, in] int32 in 0..15, d [out, in/32],
    m [out, in/32]), all fp32, with w ≈ d·q + m; d = (max - min) / 15, m = min per group."""
    out_features, in_features = weight.shape
    w = weight.detach().float().view(out_features, in_features // INT4_GROUP, INT4_GROUP)
    low, high = w.amin(dim=2), w.amax(dim=2)
    d = (high - low) / 15
    safe = torch.where(d > 0, d, torch.ones_like(d))
    q = torch.round((w - low[..., None]) / safe[..., None]).clamp(0, 15).to(torch.int32)
    return q.view(out_features, in_features), d, low


def pack_q4(q: torch.Tensor) -> torch.Tensor:
    """q [out, in] in 0..15 → [out, in/2] uint8 in Q4_1's order: in each group of 32, byte j holds
    q[j] in its low nibble and q[j + 16] in its high one."""
    groups = q.view(q.shape[0], -1, INT4_GROUP).to(torch.uint8)
    return (groups[..., :16] | (groups[..., 16:] << 4)).reshape(q.shape[0], -1).contiguous()


def unpack_q4(qs: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_q4: [out, in/2] uint8 → q [out, in] int32."""
    b = qs.view(qs.shape[0], -1, 16).to(torch.int32)
    return torch.cat([b & 15, b >> 4], dim=-1).view(qs.shape[0], -1)


def dequantize_q4(qs: torch.Tensor, dm: torch.Tensor) -> torch.Tensor:
    """d·q + m in fp32, [out, in], from the packed q and the fp16 (d, m) of each group."""
    q = unpack_q4(qs).view(qs.shape[0], -1, INT4_GROUP).float()
    d, m = dm.float().unbind(-1)
    return (q * d[..., None] + m[..., None]).view(qs.shape[0], -1)


def pack_q4_gemm(qs: torch.Tensor, dm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The int4 GEMM's layout (csrc/int4_gemm.cpp) of packed Q4_1 weights: w [n/8, k/32, 4, 8, 4]
    uint8, where byte i of (pair p, output o) holds the q of input 8p + i of the group in its low
    nibble and of input 8p + 4 + i in its high one; and each group's d and m, fp16 [n/8, k/32, 8]."""
    q = unpack_q4(qs)
    n, k = q.shape
    w = q.view(n // 8, 8, k // INT4_GROUP, INT4_GROUP // 4, 4).permute(0, 2, 3, 1, 4).to(torch.uint8)
    w = (w[:, :, 0::2] | (w[:, :, 1::2] << 4)).contiguous()
    d, m = (t.reshape(n // 8, 8, k // INT4_GROUP).transpose(1, 2).contiguous() for t in dm.unbind(-1))
    return w, d, m


def quantize_q8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int4 kernel's activations, in torch (its spec): each row's groups of 32 as int8 values a
    (held in fp32) with the scale e = max|x| / 127, a = round(x / e). Returns (a, e [rows, k/32])."""
    g = x.float().view(x.shape[0], -1, INT4_GROUP)
    e = g.abs().amax(dim=-1) / 127
    a = torch.round(g * torch.where(e > 0, 1 / e, torch.zeros_like(e))[..., None])
    return a.view(x.shape), e


def int4_matmul_reference(x: torch.Tensor, qs: torch.Tensor, dm: torch.Tensor) -> torch.Tensor:
    """What kvserve's int4 kernel computes, in fp32: the int8-quantized activations times the 4-bit
    weights, both dequantized (llama.cpp's Q4_1 × Q8_1)."""
    a, e = quantize_q8_rows(x)
    return (a.view(*e.shape, INT4_GROUP) * e[..., None]).view(x.shape) @ dequantize_q4(qs, dm).t()


class Int4Linear(nn.Module):
    def __init__(self, qs: torch.Tensor, dm: torch.Tensor, wide: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("qs", qs)           # [out, in/2] uint8, Q4_1's nibble order
        self.register_buffer("dm", dm)           # [out, in/32, 2] fp16: each group's (d, m), as in the GGUF
        self.register_buffer("wide", wide)       # [out, in] dequantized, in the activations' dtype
        self.register_buffer("bias", bias)
        self.out_features, self.in_features = wide.shape
        self.dtype = wide.dtype
        self.kernels = None      # kvserve's C++ CPU kernels (set by use_fused_kernels): int4_matmul
        self.packed_wide = None  # `wide` prepacked for oneDNN (kvserve.model.packed), when packed
        self.gemm = None         # (w, d, m) in int4_gemm's layout, when use_gemm() was called

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.bfloat16) -> "Int4Linear":
        """Groups of 32 of `weight` (best from the fp32 weights: a GGUF Q4_1 tensor's own groups are
        recovered exactly, its fp16 d and m included); activations in `dtype` (bf16 or fp32)."""
        if dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"int4 layers run with bfloat16 or float32 activations, not {dtype}")
        if not int4_fits(*weight.shape):
            raise ValueError(f"int4 needs out % 16 == 0 and in % {INT4_GROUP} == 0; got {tuple(weight.shape)}")
        q, d, m = quantize_groups_q4(weight)
        qs, dm = pack_q4(q), torch.stack([d, m], dim=-1).half().contiguous()
        return cls(qs, dm, dequantize_q4(qs, dm).to(dtype), None if bias is None else bias.detach().to(dtype).clone())

    def dequantized(self) -> torch.Tensor:
        """The weights the layer computes with, [out, in] in its activations' dtype."""
        return self.wide if self.wide is not None else dequantize_q4(self.qs, self.dm).to(self.dtype)

    def use_gemm(self) -> None:
        """Take every call, whatever its rows, through the C++ int4 GEMM (fp32 activations; needs the
        kernels): the weights repacked into its layout (as many bytes as the Q4_1 ones, kept too,
        for `dequantized`: 1.25 bytes a weight in all), and the dequantized copy, 4 bytes a weight,
        dropped."""
        if self.dtype != torch.float32:
            raise ValueError("the int4 GEMM takes float32 activations")
        if self.kernels is None:
            raise ValueError("the int4 GEMM needs kvserve's C++ kernels (use_fused_kernels first)")
        self.gemm = pack_q4_gemm(self.qs, self.dm)
        self.wide = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x if x.dim() == 2 else x.reshape(-1, self.in_features)      # flat batches: no reshape
        if self.gemm is not None:
            out = self.kernels.int4_gemm(rows, *self.gemm)
        elif rows.shape[0] <= MAX_INT4_ROWS and self.kernels is not None:     # kernels are only set on CPU
            out = self.kernels.int4_matmul(rows, self.qs, self.dm)
        elif self.packed_wide is not None:
            out = packed_linear(rows, self.packed_wide)
        else:
            out = F.linear(rows, self.wide)
        if self.bias is not None:
            out = out + self.bias
        return out if x.dim() == 2 else out.view(*x.shape[:-1], self.out_features)

    def pack_wide(self, pack) -> bool:
        """Prepack the widened bf16 weights for oneDNN; the plain copy is then dropped (no third copy)."""
        if self.wide is not None and self.wide.dtype == torch.bfloat16:
            self.packed_wide = pack(self.wide)
            if self.packed_wide is not None:
                self.wide = None
        return self.packed_wide is not None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {INT4_GROUP}"


def use_int4_gemm(model: nn.Module) -> int:
    """Every fp32 Int4Linear of `model` onto the int4 GEMM (Int4Linear.use_gemm); how many."""
    layers = [m for m in model.modules() if isinstance(m, Int4Linear) and m.dtype == torch.float32]
    for layer in layers:
        layer.use_gemm()
    return len(layers)


def use_int8_gemm(model: nn.Module) -> int:
    """Every fp32 Int8Linear of `model` that has the kernels and an even number of inputs onto the
    int8 GEMM (Int8Linear.use_gemm); how many."""
    layers = [m for m in model.modules()
              if isinstance(m, Int8Linear) and m.scale.dtype == torch.float32 and m.kernels is not None
              and m.in_features % 2 == 0]
    for layer in layers:
        layer.use_gemm()
    return len(layers)


ARENA_ALIGN = 64     # bytes: each tensor of the arena starts on a cache line


def _hot_tensors(layer: nn.Module) -> list[tuple[str, int | None]]:
    """(attribute, index in it or None) of each tensor `layer`'s kernel reads on every call."""
    if isinstance(layer, Int4Linear):
        names = [("gemm", i) for i in range(3)] if layer.gemm is not None else [("qs", None), ("dm", None)]
    else:
        names = [("gemm", None) if layer.gemm is not None else ("weight", None), ("scale", None)]
    return names + ([("bias", None)] if layer.bias is not None else [])


def gather_quantized_weights(model: nn.Module) -> int:
    """Copy every tensor that the quantized layers' CPU kernels read on each call into one buffer,
    in the order a forward pass reads them, and give the layers views of it; the bytes gathered.

    Each layer's packed weights were an allocation of their own: the small ones are not on huge
    pages, so a decode step, which streams every layer's weights from memory, missed the TLB page
    after page. One buffer of that size gets transparent huge pages (cpu_features.use_huge_pages)
    and is read as one stream. One stream, `kvserve bench step`, old and new alternately: AVX-512
    10.3-12.3 → 8.1-9.4 ms a step; the AVX2 build 10.7-10.9 → 10.0-10.8, its int4 GEMMs 5.9 → 5.0 ms
    a step in an engine timed call by call (docs/speed-notes.md). Layers without kernels (CUDA, no
    build) are left as they are."""
    layers = [m for m in model.modules() if isinstance(m, (Int4Linear, Int8Linear)) and m.kernels is not None]
    slots = [(layer, name, index) for layer in layers for name, index in _hot_tensors(layer)]
    if not slots:
        return 0

    def tensor(layer, name, index) -> torch.Tensor:
        value = getattr(layer, name)
        return value if index is None else value[index]

    offsets, total = [], 0
    for slot in slots:
        t = tensor(*slot)
        total = -(-total // ARENA_ALIGN) * ARENA_ALIGN
        offsets.append(total)
        total += t.numel() * t.element_size()
    arena = torch.empty(total, dtype=torch.uint8)
    for (layer, name, index), at in zip(slots, offsets):
        t = tensor(layer, name, index).contiguous()
        view = arena[at:at + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        view.copy_(t)
        if index is None:
            setattr(layer, name, view)
        else:
            parts = list(getattr(layer, name))
            parts[index] = view
            setattr(layer, name, tuple(parts))
    return total


def _linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, nn.Linear)]


def quantize_int8(model: nn.Module, dtype: torch.dtype | None = None, keep: tuple[nn.Module, ...] = ()) -> int:
    """Replace every nn.Linear in `model` except those in `keep` by an Int8Linear. Returns how many
    were replaced. (The runner keeps the LM head: tied to the embedding table, it costs no memory
    in bf16, and in int8 it alone cost ~0.3% perplexity on the bundled text.)"""
    targets = [t for t in _linears(model) if not any(t[2] is m for m in keep)]
    for parent, name, linear in targets:
        setattr(parent, name, Int8Linear.quantize(linear.weight, linear.bias, dtype))
    return len(targets)


def quantize_int4(model: nn.Module, dtype: torch.dtype = torch.bfloat16,
                  int8_modules: tuple[nn.Module, ...] = ()) -> tuple[int, int, int]:
    """Replace every nn.Linear by an Int4Linear, except `int8_modules` (the LM head: llama.cpp's
    4-bit files keep it at 8 bits too, and at 4 bits this model loses ~5% perplexity) and shapes the
    int4 kernel does not take, which become Int8Linear keeping their widened weights.
    Returns (int4 layers, of which the weights were already 4-bit groups, int8 layers)."""
    counts = [0, 0, 0]
    for parent, name, linear in _linears(model):
        if int4_fits(*linear.weight.shape) and not any(linear is m for m in int8_modules):
            q, d, m = quantize_groups_q4(linear.weight)
            exact = torch.equal((q.view(*d.shape, INT4_GROUP) * d[..., None] + m[..., None]).view(q.shape),
                                linear.weight.detach().float())
            setattr(parent, name, Int4Linear.quantize(linear.weight, linear.bias, dtype))
            counts[0] += 1
            counts[1] += exact
        else:
            setattr(parent, name, Int8Linear.quantize(linear.weight, linear.bias, dtype, keep_wide=True))
            counts[2] += 1
    return counts[0], counts[1], counts[2]
