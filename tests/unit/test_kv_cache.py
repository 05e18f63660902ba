"""Block pool, prefix cache and KV manager: exact ref counts, free-queue order, matching."""

import pytest

from kvserve.kv.block_pool import BlockPool
from kvserve.kv.manager import KVCacheManager
from kvserve.kv.prefix_cache import PrefixCache, hash_block
from kvserve.request import Request
from kvserve.sampling import SamplingParams

BS = 4


def make_request(request_id: str, tokens: list[int], salt: str | None = None) -> Request:
    return Request(request_id, tokens, SamplingParams(max_tokens=8), cache_salt=salt)


def test_pool_allocates_from_front_and_frees_uncached_to_front():
    pool = BlockPool(4)
    assert pool.allocate(2) == [0, 1]
    assert pool.free_queue() == [2, 3]
    pool.free([1, 0], is_cached=lambda b: b == 1)
    # 0 is uncached: front; 1 is cached: back.
    assert pool.free_queue() == [0, 2, 3, 1]
    assert [pool.ref_count(b) for b in range(4)] == [0, 0, 0, 0]


def test_pool_touch_shares_and_refuses_overdraw():
    pool = BlockPool(3)
    [b] = pool.allocate(1)
    pool.touch([b])
    assert pool.ref_count(b) == 2
    pool.free([b], is_cached=lambda _: True)
    assert pool.ref_count(b) == 1 and b not in pool.free_queue()
    with pytest.raises(RuntimeError):
        pool.allocate(3)


def test_pool_calls_on_evict_when_reusing():
    evicted = []
    pool = BlockPool(2, on_evict=evicted.append)
    pool.allocate(2)
    assert evicted == [0, 1]


def test_hash_chains_and_salts():
    h0 = hash_block(None, [1, 2, 3, 4])
    assert h0 == hash_block(None, [1, 2, 3, 4])
    assert h0 != hash_block(None, [1, 2, 3, 5])
    assert h0 != hash_block(None, [1, 2, 3, 4], ("tenant-a",))
    assert hash_block(h0, [5, 6, 7, 8]) != hash_block(None, [5, 6, 7, 8])


def test_prefix_cache_match_stops_at_first_miss():
    cache = PrefixCache()
    cache.insert(7, b"a")
    cache.insert(8, b"c")
    assert cache.match([b"a", b"b", b"c"]) == [7]
    cache.insert(9, b"a")   # duplicate content: first block keeps it
    assert cache.match([b"a"]) == [7] and not cache.is_cached(9)


def test_manager_second_request_reuses_shared_prefix():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    a = make_request("a", list(range(10)))          # 2 full blocks + 2 tokens
    assert kv.match(a).num_blocks == 0
    assert kv.allocate_slots(a, 10)
    a.num_computed_tokens = 10
    kv.cache_full_blocks(a)
    b = make_request("b", list(range(8)) + [99, 98, 97])
    hit = kv.match(b)
    assert hit.device_block_ids == kv.block_ids("a")[:2] and not hit.host_hashes
    assert kv.allocate_slots(b, 3, hit)
    assert kv.block_ids("b")[:2] == kv.block_ids("a")[:2]
    assert kv.pool.ref_count(hit.device_block_ids[0]) == 2
    kv.check_integrity()
    kv.free(a)
    kv.free(b)
    kv.check_integrity()
    assert kv.pool.num_free_blocks == 16


def test_manager_never_matches_the_whole_prompt():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = make_request("a", list(range(8)))
    kv.allocate_slots(a, 8)
    a.num_computed_tokens = 8
    kv.cache_full_blocks(a)
    kv.free(a)
    same = make_request("b", list(range(8)))
    # 8 tokens = 2 full blocks, but the last token must be recomputed: only 1 block matches.
    assert kv.match(same).num_blocks == 1


def test_salt_isolates_namespaces():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = make_request("a", list(range(9)), salt="x")
    kv.allocate_slots(a, 9)
    a.num_computed_tokens = 9
    kv.cache_full_blocks(a)
    assert kv.match(make_request("b", list(range(9)), salt="y")).num_blocks == 0
    assert kv.match(make_request("c", list(range(9)))).num_blocks == 0
    assert kv.match(make_request("d", list(range(9)), salt="x")).num_blocks == 2


def test_allocation_is_all_or_nothing():
    kv = KVCacheManager(num_blocks=3, block_size=BS)
    a = make_request("a", list(range(20)))
    assert not kv.allocate_slots(a, 20)            # needs 5 blocks
    assert kv.pool.num_free_blocks == 3 and kv.block_ids("a") == []
    kv.check_integrity()


def test_lru_evicts_tails_before_heads_and_old_before_new():
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    a = make_request("a", list(range(12)))          # 3 full blocks
    kv.allocate_slots(a, 12)
    a.num_computed_tokens = 12
    kv.cache_full_blocks(a)
    a_blocks = kv.block_ids("a")
    kv.free(a)
    # free queue: 3 uncached blocks, then a's blocks tail first.
    assert kv.pool.free_queue()[3:] == a_blocks[::-1]
    big = make_request("b", list(range(100, 120)))  # 5 blocks: evicts a's tail and middle, keeps head
    assert kv.allocate_slots(big, 20)
    assert kv.prefix_cache.is_cached(a_blocks[0])
    assert not kv.prefix_cache.is_cached(a_blocks[2])
    kv.check_integrity()


def test_check_integrity_catches_a_corrupted_ref_count():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_request("a", list(range(5)))
    kv.allocate_slots(a, 5)
    kv.pool._ref_counts[kv.block_ids("a")[0]] += 1
    with pytest.raises(AssertionError):
        kv.check_integrity()


def test_disk_tier_options_are_validated_and_split_per_served_model():
    import argparse

    from kvserve.cli import add_engine_options, engine_config_from_args, model_engine_config
    from kvserve.config import CacheConfig, ConfigError

    with pytest.raises(ConfigError, match="--kv-disk-dir needs a host tier"):
        CacheConfig(disk_dir="/tmp/kv")
    with pytest.raises(ConfigError, match="--kv-disk-blocks"):
        CacheConfig(host_memory_bytes=1 << 20, disk_dir="/tmp/kv", disk_num_blocks=0)
    parser = argparse.ArgumentParser()
    add_engine_options(parser)
    args = parser.parse_args(["--kv-host-memory", "64MiB", "--kv-disk-dir", "/tmp/kv", "--kv-disk-blocks", "100"])
    base = engine_config_from_args(args)
    assert (base.cache.disk_dir, base.cache.disk_num_blocks) == ("/tmp/kv", 100)
    assert model_engine_config(base, "a", "random:tiny", 1).cache.disk_dir == "/tmp/kv"
    assert model_engine_config(base, "a", "random:tiny", 2).cache.disk_dir == "/tmp/kv/a"


def test_disk_tier_needs_a_host_tier_and_starts_empty():
    kv = KVCacheManager(8, 4, num_disk_blocks=16)
    assert kv.disk.num_blocks == 0 and kv.stats().disk_capacity_blocks == 0
    kv = KVCacheManager(8, 4, num_host_blocks=2, num_disk_blocks=16)
    assert kv.stats().disk_capacity_blocks == 16 and kv.take_swaps().is_empty
