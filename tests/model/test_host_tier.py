"""The host and disk tiers with real KV tensors: an evicted prefix is copied back, not recomputed,
and the output is what a cold run gives."""

import torch
from conftest import make_engine, tiny_checkpoint

from kvserve.runner.model_runner import kv_bytes_per_block
from kvserve.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def run(engine, prompt: str) -> tuple[list[int], object]:
    engine.add(prompt, GREEDY)
    tokens, stats = [], None
    while engine.has_unfinished:
        for out in engine.step():
            tokens += out.token_ids
            stats = out.stats
    engine.check_integrity()
    return tokens, stats


def test_evicted_prefix_returns_from_host_memory():
    shared = "The quick brown fox jumps over the lazy dog. " * 8           # 360 bytes: 22 full blocks
    cold, _ = run(make_engine(enable_prefix_caching=False), shared + "Why?")
    # 32 blocks of 16 tokens in the pool; 1 MiB of host memory holds ~500 tiny-model blocks.
    engine = make_engine(num_blocks=32, host_memory_bytes=1 << 20)
    run(engine, shared + "What?")
    for i in range(4):                                                 # push it out of the pool
        run(engine, f"{i} unrelated filler text that is long enough to take many blocks. " * 6)
    assert engine.scheduler.kv.match(engine.make_request(shared + "Why?", GREEDY)).device_block_ids == []
    warm, stats = run(engine, shared + "Why?")
    assert warm == cold
    assert stats.num_cached_tokens == 352                              # 22 blocks read back from host
    assert stats.num_computed_tokens == stats.num_prompt_tokens - 352 + GREEDY.max_tokens - 1
    assert engine.stats().kv.host_hit_blocks == 22


def test_prefix_evicted_past_the_host_tier_returns_from_disk(tmp_path):
    shared = "The quick brown fox jumps over the lazy dog. " * 8           # 22 full blocks
    cold, _ = run(make_engine(enable_prefix_caching=False), shared + "Why?")
    disk = tmp_path / "kv"
    disk.mkdir()
    (disk / "stale.kvblock").write_bytes(b"from an earlier run")
    (disk / "notes.txt").write_text("not ours")
    block_bytes = kv_bytes_per_block(tiny_checkpoint().config, 16, torch.float32)
    # A 4-block host tier; 32 tokens a step, so no step evicts more blocks than it holds.
    engine = make_engine(num_blocks=32, host_memory_bytes=4 * block_bytes, disk_dir=str(disk),
                         disk_num_blocks=256, max_num_batched_tokens=32)
    assert not (disk / "stale.kvblock").exists() and (disk / "notes.txt").exists()
    run(engine, shared + "What?")
    for i in range(4):                                                 # push it through host memory to disk
        run(engine, f"{i} unrelated filler text that is long enough to take many blocks. " * 6)
    hit = engine.scheduler.kv.match(engine.make_request(shared + "Why?", GREEDY))
    assert (hit.device_block_ids, hit.host_hashes, len(hit.disk_hashes)) == ([], [], 22)
    files = {path.name.removesuffix(".kvblock") for path in disk.glob("*.kvblock")}
    assert {h.hex() for h in hit.disk_hashes} <= files
    assert len(files) == engine.stats().kv.num_disk_blocks
    warm, stats = run(engine, shared + "Why?")
    assert warm == cold
    assert stats.num_cached_tokens == 352                              # 22 blocks read back from disk
    assert stats.num_computed_tokens == stats.num_prompt_tokens - 352 + GREEDY.max_tokens - 1
    kv_stats = engine.stats().kv
    assert kv_stats.disk_hit_blocks == 22 and kv_stats.host_hit_blocks == 0
    report = engine.cache_report()
    num_files = len(list(disk.glob("*.kvblock")))
    assert report["bytes"]["disk"] == {"capacity": 256 * block_bytes, "used": num_files * block_bytes}
    assert report["disk_tier"]["blocks"] == kv_stats.num_disk_blocks == num_files
    engine.flush_cache()
    engine.step()                                                      # file drops run with the next step
    assert not list(disk.glob("*.kvblock*")) and (disk / "notes.txt").exists()
