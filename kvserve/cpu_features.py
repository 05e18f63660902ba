"""The x86 instruction-set level kvserve uses on this CPU, read once, and its override.

    avx512     AVX-512 F/BW/VL (and, where present, AVX512-BF16: native bf16 dot products)
    avx2       AVX2 + FMA
    portable   neither

`KVSERVE_CPU_ISA=avx512|avx2|portable` caps the level (a level the CPU lacks is an error), so that
every path can be run and measured on a machine that has it: an AVX-512 machine also runs as an
AVX2 one. Pure Python; nothing is read at import time.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

from kvserve.config import ConfigError

LEVELS = ("portable", "avx2", "avx512")
ENV = "KVSERVE_CPU_ISA"


@cache
def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def detected_isa(flags: frozenset[str]) -> str:
    if {"avx512f", "avx512bw", "avx512vl"} <= flags:
        return "avx512"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    return "portable"


def available_levels() -> list[str]:
    """Every level this CPU can run, portable first (what KVSERVE_CPU_ISA may ask for)."""
    return list(LEVELS[:LEVELS.index(detected_isa(cpu_flags())) + 1])


@cache
def isa() -> str:
    """The level in use: the CPU's best, or KVSERVE_CPU_ISA when it asks for less."""
    best = detected_isa(cpu_flags())
    asked = os.environ.get(ENV, "").strip().lower()
    if not asked:
        return best
    if asked not in LEVELS:
        raise ConfigError(f"{ENV}={asked!r}: expected one of {', '.join(LEVELS)}")
    if LEVELS.index(asked) > LEVELS.index(best):
        raise ConfigError(f"{ENV}={asked}: this CPU's best level is {best}")
    return asked


# What torch's own kernels are told when KVSERVE_CPU_ISA asks for less than the CPU has: ATen's
# vectorised kernels and oneDNN's (the bf16 and fp32 matmuls) then run at that level too, so an
# AVX-512 machine measures what an AVX2-only one (Zen 3) would run, not only kvserve's own kernels.
# MKL runs torch's fp32 matmuls (F.linear): without its own cap an "avx2" run still multiplied at
# AVX-512 width, 1.6× faster than an AVX2 CPU would at prefill sizes (measured: 9.3 vs 15.8 ms a layer).
TORCH_ENV = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
             "portable": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                          "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}}


def cap_torch(environ=os.environ, modules=None) -> dict[str, str]:
    """Set TORCH_ENV for the level KVSERVE_CPU_ISA asks for (before torch is imported: both are read
    once). Variables already set are left alone. Returns what was set."""
    import sys

    asked = environ.get(ENV, "").strip().lower()
    if asked not in TORCH_ENV:
        return {}
    if "torch" in (sys.modules if modules is None else modules):
        raise ConfigError(f"{ENV}={asked} must be set before torch is imported (it caps torch's kernels too)")
    applied = {name: value for name, value in TORCH_ENV[asked].items() if name not in environ}
    environ.update(applied)
    return applied


# torch's CPU allocator gives allocations of 2 MB and more 2 MB alignment and madvise(MADV_HUGEPAGE)
# when this is set (read once, when torch loads). The KV cache is read a block at a time from blocks
# scattered over a pool of a GB or more: on 4 KB pages nearly every block is a TLB miss, which a
# VM's nested page walk makes dear. Measured under avx2 (docs/speed-notes.md): bench offline 64 ×
# 276 tokens, 267 → 276 output tok/s; one-stream step 7.1 → 6.7 ms.
HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"


def use_huge_pages(environ=os.environ) -> bool:
    """Ask torch's CPU allocator for transparent huge pages (HUGE_PAGES_ENV), before torch is
    imported, unless the variable is already set (0 turns it off). Whether it was set here."""
    if HUGE_PAGES_ENV in environ:
        return False
    environ[HUGE_PAGES_ENV] = "1"
    return True


def native_bf16() -> bool:
    """bf16 dot products in hardware (AVX512-BF16) at the level in use."""
    return isa() == "avx512" and "avx512_bf16" in cpu_flags()
