"""The physical floor GPU benchmarks are held against (kvserve/bench/floor.py)."""

import pytest

from kvserve.bench.floor import decode_step_floor_s, device_peak, floor_report, offline_floor_s


def test_device_names_find_their_published_peaks():
    assert device_peak("NVIDIA H200").bandwidth == 4.8e12
    assert device_peak("NVIDIA H100 80GB HBM3").name == "H100"
    assert device_peak("NVIDIA H100 NVL").name == "H100 NVL"          # the more specific name first
    assert device_peak("NVIDIA A100-SXM4-80GB").bandwidth == 2.04e12
    assert device_peak("Some Future GPU") is None and device_peak(None) is None


def test_floors_of_a_decode_step_and_of_the_offline_workload():
    h200 = device_peak("NVIDIA H200")
    # gpu.md: the 1.07 B model's 2.15 GB of bf16 weights, one pass: ~0.45 ms at 4.8 TB/s.
    assert decode_step_floor_s(h200, 2_150_000_000, 0) == pytest.approx(0.448e-3, rel=1e-2)
    # 76 k prompt + 37.8 k output tokens, 512 decode steps: 2·1.07e9·113.8e3 FLOPs ≈ 244 TFLOP.
    floor = offline_floor_s(h200, 1_070_000_000, 2_150_000_000, 113_800, 512)
    assert floor == pytest.approx(244e12 / 989e12 + 512 * 2.15e9 / 4.8e12, rel=1e-2)
    report = floor_report(h200, floor, 38.6)
    assert report["fraction_of_floor"] == pytest.approx(floor / 38.6, abs=1e-4) and report["peak"]["device"] == "H200"
    assert floor_report(None, None, 1.0) == {"floor_s": None, "fraction_of_floor": None}

