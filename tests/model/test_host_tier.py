"""The host tier with real KV tensors: an evicted prefix is copied back, not recomputed, and the
output is what a cold run gives."""

from conftest import make_engine

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
