"""Builds and loads kvserve's C++ CPU kernels (csrc/) with torch's extension builder, once per
machine kind: the build is cached under ~/.cache/kvserve/torch_extensions/<cpu>, keyed by the CPU's
feature flags because it is compiled for the CPU it runs on (-march=native). Without a compiler
the build fails; `load()` then returns None and callers keep the torch reference path."""

from __future__ import annotations

import hashlib
import logging
import os
import platform
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

HEADERS = list((Path(__file__).parent / "csrc").glob("*.h"))
SOURCES = [Path(__file__).parent / "csrc" / name for name in ("bindings.cpp", "paged_decode.cpp", "fused_ops.cpp",
                                                                  "int8_matmul.cpp")]


def _cpu_key() -> str:
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return hashlib.sha256(f"{platform.machine()} {flags}".encode()).hexdigest()[:12]


def build_directory() -> Path:
    root = Path(os.environ.get("KVSERVE_EXTENSIONS_DIR", Path.home() / ".cache" / "kvserve" / "torch_extensions"))
    import torch

    path = root / f"torch{torch.__version__}-{_cpu_key()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@cache
def load():
    """The compiled module (`paged_decode`, `decode_step`, `decode_qkv`; the fused bf16 ops `rms_norm`,
    `silu_mul`, `rotary`; `int8_matmul`), or None when it cannot be built here."""
    try:
        from torch.utils.cpp_extension import load as build

        # torch rebuilds when a source or a flag changes, not a header: the headers' hash is a flag.
        headers = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(HEADERS))).hexdigest()[:12]
        return build(name="kvserve_cpu_kernels", sources=[str(path) for path in SOURCES], build_directory=str(build_directory()),
                     extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math", f"-DKVSERVE_HEADERS={headers}"],
                     extra_ldflags=["-fopenmp", "-lmvec"], verbose=False)
    except Exception as error:   # no compiler, no headers, unsupported platform: keep the reference path
        log.warning("CPU attention kernel unavailable (%s); using the torch reference attention", error)
        return None
