"""Engines on the tiny random Llama (`random:tiny`), fp32 on CPU, sharing one checkpoint per session."""

from __future__ import annotations

import functools

import pytest
import torch

from kvserve.config import CacheConfig, EngineConfig, SchedulerConfig
from kvserve.engine.engine import Engine
from kvserve.model.checkpoint import Checkpoint, load_checkpoint

_CACHE_OPTIONS = {"block_size", "num_blocks", "memory_bytes", "enable_prefix_caching", "host_memory_bytes",
                  "disk_dir", "disk_num_blocks", "dtype"}
_SCHEDULER_OPTIONS = {"max_num_batched_tokens", "max_num_seqs", "max_model_len", "policy", "preemption_mode",
                      "aging_factor"}


@functools.cache
def tiny_checkpoint() -> Checkpoint:
    """One tiny checkpoint for the whole session (weights are never mutated)."""
    return load_checkpoint("random:tiny")


def make_engine(**options) -> Engine:
    """A fresh fp32 Engine on the shared tiny checkpoint.

    Keyword options go to CacheConfig (block_size, num_blocks, memory_bytes,
    enable_prefix_caching, dtype: the KV cache's) or SchedulerConfig (max_num_batched_tokens, max_num_seqs,
    max_model_len, policy); `seed` goes to EngineConfig. The pool defaults to 512 blocks of 16.
    """
    unknown = set(options) - _CACHE_OPTIONS - _SCHEDULER_OPTIONS - {"seed"}
    if unknown:
        raise TypeError(f"make_engine: unknown options {sorted(unknown)}")
    cache = {k: v for k, v in options.items() if k in _CACHE_OPTIONS}
    if "num_blocks" not in cache and "memory_bytes" not in cache:
        cache["num_blocks"] = 512
    scheduler = {k: v for k, v in options.items() if k in _SCHEDULER_OPTIONS}
    config = EngineConfig(model="random:tiny", dtype="float32", device="cpu", seed=options.get("seed", 0),
                          cache=CacheConfig(**cache), scheduler=SchedulerConfig(**scheduler))
    return Engine(config, checkpoint=tiny_checkpoint())


@pytest.fixture(scope="module", autouse=True)
def _single_torch_thread():
    """The tiny model's ops are far too small to gain from intra-op threads, and on a shared
    2-core machine a second OpenMP thread spinning against other processes made engine steps
    10-40x slower. Scoped to these modules and restored, so other test directories keep theirs."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def engine() -> Engine:
    """A fresh default engine (512 blocks of 16, prefix caching on, 512-token budget)."""
    return make_engine()
