"""The physical floor a GPU measurement is reported against: the time the work would take if the
device did nothing but stream the bytes it must read at its memory bandwidth and do the FLOPs it
must do at its peak (dense bf16). No torch here: the bench passes the device name and the model's
numbers in.

- A decode step reads every weight once, plus the KV cache of every sequence:
  floor = (weight bytes + KV bytes) / bandwidth (the FLOPs of a decode step are far below this).
- An offline workload does 2 x parameters FLOPs per token (prompt and output; attention's own
  FLOPs left out, so the floor is a lower bound) and, while it decodes, one pass over the weights
  per step: floor = FLOPs / peak + decode steps x weight bytes / bandwidth, with as few decode
  steps as the longest output needs (every sequence decoding at once).

Peaks are the vendors' published figures (dense, no sparsity), by the device name torch reports.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DevicePeak:
    name: str
    bandwidth: float     # bytes per second (HBM)
    bf16_flops: float    # dense bf16 FLOP/s


# The first name that occurs in the reported device name wins (so "H100 NVL" before "H100").
PEAKS = (
    DevicePeak("H200", 4.8e12, 989e12),
    DevicePeak("H100 NVL", 3.9e12, 835e12),
    DevicePeak("H100 PCIe", 2.0e12, 756e12),
    DevicePeak("H100", 3.35e12, 989e12),      # SXM
    DevicePeak("A100-SXM4-80GB", 2.04e12, 312e12),
    DevicePeak("A100", 1.56e12, 312e12),      # 40 GB
    DevicePeak("L40S", 0.864e12, 362e12),
    DevicePeak("L4", 0.3e12, 121e12),
    DevicePeak("A10G", 0.6e12, 70e12),
)


def device_peak(device_name: str | None) -> DevicePeak | None:
    """The published peak of a GPU by the name torch.cuda.get_device_name gives (None: unknown)."""
    if not device_name:
        return None
    return next((p for p in PEAKS if p.name in device_name), None)


def decode_step_floor_s(peak: DevicePeak, weight_bytes: int, kv_bytes: int) -> float:
    return (weight_bytes + kv_bytes) / peak.bandwidth


def offline_floor_s(peak: DevicePeak, parameters: int, weight_bytes: int, total_tokens: int,
                    decode_steps: int) -> float:
    return 2 * parameters * total_tokens / peak.bf16_flops + decode_steps * weight_bytes / peak.bandwidth


def floor_report(peak: DevicePeak | None, floor_s: float | None, measured_s: float) -> dict:
    """The fields a bench adds to its JSON: the floor, the device's peak it came from, and the
    fraction of the floor reached (floor / measured; 1.0 would be the physical limit)."""
    if peak is None or floor_s is None:
        return {"floor_s": None, "fraction_of_floor": None}
    return {"floor_s": round(floor_s, 6), "fraction_of_floor": round(floor_s / measured_s, 4) if measured_s else None,
            "peak": {"device": peak.name, "bandwidth_GBps": round(peak.bandwidth / 1e9),
                     "bf16_TFLOPs": round(peak.bf16_flops / 1e12)}}
