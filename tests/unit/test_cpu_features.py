"""The CPU level kvserve uses: detection from /proc/cpuinfo's flags, and the KVSERVE_CPU_ISA cap."""

import os

import pytest

from kvserve import cpu_features
from kvserve.config import ConfigError

ZEN4 = frozenset("fma avx2 avx512f avx512bw avx512vl avx512_bf16".split())
ZEN3 = frozenset("fma avx2 sse4_2".split())


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    cpu_features.isa.cache_clear()
    yield
    cpu_features.isa.cache_clear()


def with_flags(monkeypatch, flags, asked=None):
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: flags)
    if asked is None:
        monkeypatch.delenv(cpu_features.ENV, raising=False)
    else:
        monkeypatch.setenv(cpu_features.ENV, asked)
    cpu_features.isa.cache_clear()


def test_detection():
    assert cpu_features.detected_isa(ZEN4) == "avx512"
    assert cpu_features.detected_isa(ZEN3) == "avx2"
    assert cpu_features.detected_isa(frozenset({"avx2"})) == "portable"   # AVX2 without FMA
    assert cpu_features.detected_isa(frozenset({"avx512f", "avx2", "fma"})) == "avx2"   # no BW/VL


@pytest.mark.parametrize("flags, asked, level, bf16", [
    (ZEN4, None, "avx512", True), (ZEN4, "avx2", "avx2", False), (ZEN4, "portable", "portable", False),
    (ZEN4 - {"avx512_bf16"}, None, "avx512", False), (ZEN3, None, "avx2", False), (ZEN3, "AVX2", "avx2", False),
])
def test_the_level_in_use_and_native_bf16(monkeypatch, flags, asked, level, bf16):
    with_flags(monkeypatch, flags, asked)
    assert cpu_features.isa() == level and cpu_features.native_bf16() is bf16


@pytest.mark.parametrize("flags, asked, message", [(ZEN3, "avx512", "best level is avx2"),
                                                   (ZEN4, "sse", "expected one of")])
def test_an_override_the_cpu_cannot_honour_is_a_clear_error(monkeypatch, flags, asked, message):
    with_flags(monkeypatch, flags, asked)
    with pytest.raises(ConfigError, match=message):
        cpu_features.isa()


def test_dtype_auto_follows_native_bf16(monkeypatch):
    import torch

    from kvserve.runner.model_runner import resolve_dtype
    with_flags(monkeypatch, ZEN4, "avx2")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    with_flags(monkeypatch, ZEN4)
    assert resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16


def test_the_cap_reaches_torch_s_own_kernels_when_set_before_torch():
    env = {cpu_features.ENV: "avx2"}
    assert cpu_features.cap_torch(env, modules={}) == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                                                       "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    assert env["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    env = {cpu_features.ENV: "portable", "ATEN_CPU_CAPABILITY": "avx2"}      # what is set stays
    assert cpu_features.cap_torch(env, modules={}) == {"ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}
    assert env["ATEN_CPU_CAPABILITY"] == "avx2"
    assert cpu_features.cap_torch({}, modules={}) == {}                       # no cap asked: nothing
    assert cpu_features.cap_torch({cpu_features.ENV: "avx512"}, modules={}) == {}
    with pytest.raises(ConfigError, match="before torch"):
        cpu_features.cap_torch({cpu_features.ENV: "avx2"}, modules={"torch": object()})


def test_mkl_s_fp32_matmuls_obey_the_cap():
    """torch's fp32 F.linear runs in MKL, which reads its own variable: an avx2 run multiplies at
    AVX2 width (MKL_VERBOSE names the code path it took)."""
    import subprocess
    import sys

    if "avx2" not in cpu_features.available_levels():
        pytest.skip("this CPU has no AVX2")
    script = ("from kvserve import cpu_features; cpu_features.cap_torch(); import torch; "
              "assert torch.backends.mkl.is_available(); "
              "torch.nn.functional.linear(torch.randn(64, 128), torch.randn(128, 128))")
    env = {k: v for k, v in os.environ.items() if k not in cpu_features.TORCH_ENV["avx2"]}   # set by the cap only
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**env, cpu_features.ENV: "avx2", "MKL_VERBOSE": "1"})
    assert out.returncode == 0, out.stderr
    assert "(Intel(R) AVX2) enabled processors" in out.stdout, out.stdout[:500]


def test_huge_pages_are_asked_of_torch_unless_the_variable_is_set():
    env = {}
    assert cpu_features.use_huge_pages(env) and env == {cpu_features.HUGE_PAGES_ENV: "1"}
    env = {cpu_features.HUGE_PAGES_ENV: "0"}                                     # a user's choice stays
    assert not cpu_features.use_huge_pages(env) and env == {cpu_features.HUGE_PAGES_ENV: "0"}


def test_torch_takes_huge_pages_where_the_kernel_offers_them():
    """With the variable set before torch loads, a large tensor lies (at least in part: memory may
    be fragmented) on transparent huge pages; without it, on none (THP in `madvise` mode)."""
    import subprocess
    import sys
    from pathlib import Path

    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not mode.exists() or "[madvise]" not in mode.read_text():
        pytest.skip("transparent huge pages are not in madvise mode here")
    code = ("from kvserve import cpu_features; {} import torch; x = torch.zeros(64 << 20, dtype=torch.uint8); "
            "print(next(int(l.split()[1]) for l in open('/proc/self/smaps_rollup') if l.startswith('AnonHugePages')))")
    env = {k: v for k, v in os.environ.items() if k != cpu_features.HUGE_PAGES_ENV}
    huge_kb = [int(subprocess.run([sys.executable, "-c", code.format(asked)], env=env, capture_output=True, text=True,
                                  check=True).stdout.split()[-1])
               for asked in ("cpu_features.use_huge_pages();", "")]
    assert huge_kb[0] >= 2048 and huge_kb[1] == 0
