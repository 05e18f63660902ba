"""Checkpoint pins: TTL renewed by hits, survival under floods, expiry, budget, integrity."""

from hypothesis import given, settings
from hypothesis import strategies as st

from kvserve.config import SchedulerConfig
from kvserve.engine.core import EngineCore
from kvserve.kv.manager import KVCacheManager
from kvserve.request import Request
from kvserve.sampling import SamplingParams
from kvserve.sched.scheduler import Scheduler

from fake_runner import FakeRunner

BS = 4
MINUTE = 60.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_core(num_blocks=32, budget_fraction=0.5, clock=None, budget=64):
    kv = KVCacheManager(num_blocks, BS, pin_budget_fraction=budget_fraction, clock=clock or Clock())
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=8), kv, 4096)
    return EngineCore(scheduler, FakeRunner(num_blocks, BS))


def run(core: EngineCore, request: Request) -> Request:
    core.scheduler.add_request(request)
    while core.scheduler.has_unfinished:
        core.step()
        core.scheduler.check_integrity()
    return request


SYSTEM = list(range(100, 124))          # 24 tokens = 6 full blocks


def ask(rid: str, question: list[int], checkpoint: int | None = len(SYSTEM), ttl: float = 5 * MINUTE) -> Request:
    checkpoints = ((checkpoint, ttl),) if checkpoint else ()
    return Request(rid, SYSTEM + question, SamplingParams(max_tokens=2, ignore_eos=True), checkpoints=checkpoints)


def flood(core: EngineCore, num_tokens: int, tag: int) -> None:
    """Unique prompts totalling num_tokens, run one after another."""
    for i in range(num_tokens // 20):
        run(core, Request(f"flood-{tag}-{i}", [tag, i] + [7000 + i * 20 + j for j in range(18)],
                          SamplingParams(max_tokens=1, ignore_eos=True)))


def test_first_request_writes_second_reads():
    core = make_core()
    first = run(core, ask("a", [1, 2, 3]))
    assert first.num_cache_write_tokens == 24 and first.num_cached_tokens == 0
    second = run(core, ask("b", [4, 5, 6]))
    assert second.num_cached_tokens == 24 and second.num_cache_write_tokens == 0


def test_pinned_prefix_survives_a_flood_five_times_the_pool():
    core = make_core(num_blocks=32)
    run(core, ask("a", [1]))
    flood(core, 5 * 32 * BS, tag=1)
    assert run(core, ask("b", [2])).num_cached_tokens == 24


def test_without_a_pin_the_same_flood_evicts_it():
    core = make_core(num_blocks=32)
    run(core, ask("a", [1], checkpoint=None))
    assert run(core, ask("warm", [3], checkpoint=None)).num_cached_tokens == 24   # cached while no pressure
    flood(core, 5 * 32 * BS, tag=1)
    assert run(core, ask("b", [2], checkpoint=None)).num_cached_tokens == 0


def test_pin_expires_after_its_ttl_without_hits():
    clock = Clock()
    core = make_core(clock=clock)
    run(core, ask("a", [1]))
    clock.now += 5 * MINUTE - 1
    core.scheduler.schedule()
    assert core.scheduler.kv.stats().num_pins == 1
    clock.now += 2
    core.scheduler.schedule()
    stats = core.scheduler.kv.stats()
    assert stats.num_pins == 0 and stats.pins_expired == 1 and stats.num_pinned_blocks == 0
    # Demoted to plain LRU caching: a flood now evicts it.
    flood(core, 5 * 32 * BS, tag=2)
    assert run(core, ask("b", [2], checkpoint=None)).num_cached_tokens == 0


def test_a_hit_every_four_minutes_keeps_it_alive_for_twenty():
    clock = Clock()
    core = make_core(clock=clock)
    run(core, ask("a", [1]))
    for i in range(5):
        clock.now += 4 * MINUTE
        flood(core, 2 * 32 * BS, tag=10 + i)
        hit = run(core, ask(f"hit-{i}", [2 + i], checkpoint=None))     # a hit with no checkpoint of its own
        assert hit.num_cached_tokens == 24, f"lost after {4 * (i + 1)} minutes"
    assert core.scheduler.kv.stats().pins_expired == 0


def test_repinning_renews_and_lengthens_without_writing():
    clock = Clock()
    core = make_core(clock=clock)
    run(core, ask("a", [1], ttl=5 * MINUTE))
    again = run(core, ask("b", [2], ttl=60 * MINUTE))
    assert again.num_cache_write_tokens == 0
    clock.now += 30 * MINUTE
    core.scheduler.schedule()
    assert core.scheduler.kv.stats().num_pins == 1


def test_nested_checkpoints_write_each_prefix():
    core = make_core()
    request = Request("a", SYSTEM + list(range(200, 216)) + [1], SamplingParams(max_tokens=1, ignore_eos=True),
                      checkpoints=((24, 3600.0), (40, 300.0)))
    run(core, request)
    assert request.num_cache_write_tokens == 40              # each token written once
    assert request.cache_writes == {3600.0: 24, 300.0: 16}
    assert core.scheduler.kv.stats().num_pinned_blocks == 10


def test_budget_releases_oldest_pins_first_and_never_fails():
    core = make_core(num_blocks=32, budget_fraction=0.25)        # 8 blocks of pins
    a = run(core, Request("a", list(range(300, 324)) + [1], SamplingParams(max_tokens=1), checkpoints=((24, 300.0),)))
    b = run(core, Request("b", list(range(400, 424)) + [1], SamplingParams(max_tokens=1), checkpoints=((24, 300.0),)))
    assert a.num_cache_write_tokens == 24 and b.num_cache_write_tokens == 24
    stats = core.scheduler.kv.stats()
    assert stats.num_pins == 1 and stats.pins_released_for_budget == 1 and stats.num_pinned_blocks == 6
    assert core.scheduler.kv.pins.get(b.block_hashes[5]) is not None      # the newer one stays
    big = Request("c", list(range(500, 540)) + [1], SamplingParams(max_tokens=1), checkpoints=((40, 300.0),))
    assert run(core, big).num_cache_write_tokens == 0                     # over budget by itself: not pinned


def test_prefix_caching_off_pins_nothing():
    kv = KVCacheManager(32, BS, enable_prefix_caching=False, clock=Clock())
    core = EngineCore(Scheduler(SchedulerConfig(), kv, 4096), FakeRunner(32, BS))
    assert run(core, ask("a", [1])).num_cache_write_tokens == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(1, 30), st.integers(0, 3), st.integers(0, 400)),
                min_size=1, max_size=25),
       st.integers(8, 40), st.sampled_from([0.0, 0.25, 0.5, 1.0]))
def test_pins_keep_ref_counts_exact(events, num_blocks, fraction):
    clock = Clock()
    core = make_core(num_blocks=num_blocks, budget_fraction=fraction, clock=clock, budget=16)
    bases = [list(range(1000, 1040)), list(range(2000, 2040)), [5] * 40]
    for i, (base, length, num_checkpoints, advance) in enumerate(events):
        prompt = bases[base][:length] + [i]
        checkpoints = tuple((max(1, length * (k + 1) // 4), 300.0) for k in range(num_checkpoints))
        try:
            core.scheduler.add_request(Request(f"r{i}", prompt, SamplingParams(max_tokens=3, ignore_eos=True),
                                               checkpoints=checkpoints))
        except ValueError:
            continue
        for _ in range(3):
            core.step()
            core.scheduler.check_integrity()
        clock.now += advance
    while core.scheduler.has_unfinished:
        core.step()
        core.scheduler.check_integrity()
    kv = core.scheduler.kv
    assert kv.stats().num_pinned_blocks <= kv.pins.budget_blocks
    kv.release_all_pins()
    kv.check_integrity()
    assert kv.pool.num_free_blocks == kv.num_blocks


def test_flush_drops_unpinned_cache_and_all_drops_pins_too():
    clock = Clock()
    core = make_core(clock=clock)
    run(core, ask("pinned", [1]))
    run(core, Request("plain", list(range(600, 640)), SamplingParams(max_tokens=1)))
    kv = core.scheduler.kv
    [pin] = kv.pinned_prefixes()
    assert pin["num_tokens"] == 24 and pin["ttl_left_s"] == 300.0 and len(pin["hash"]) == 16
    dropped = kv.flush()
    assert dropped > 0 and kv.stats().blocks_evicted_flush == dropped
    kv.check_integrity()
    assert run(core, ask("again", [2], checkpoint=None)).num_cached_tokens == 24     # the pin survived
    assert run(core, Request("plain2", list(range(600, 640)), SamplingParams(max_tokens=1))).num_cached_tokens == 0
    kv.flush(include_pinned=True)
    kv.check_integrity()
    assert kv.stats().num_pins == 0
    assert run(core, ask("gone", [3], checkpoint=None)).num_cached_tokens == 0


def test_lru_evictions_are_counted():
    core = make_core(num_blocks=16)
    flood(core, 4 * 16 * BS, tag=3)
    assert core.scheduler.kv.stats().blocks_evicted_lru > 0


def test_pinning_a_prefix_read_from_the_automatic_cache_writes_only_what_is_new():
    core = make_core()
    run(core, Request("warm", SYSTEM + list(range(200, 216)) + [1], SamplingParams(max_tokens=1)))
    request = run(core, Request("pin", SYSTEM + list(range(200, 216)) + [2], SamplingParams(max_tokens=1),
                                checkpoints=((24, 300.0),)))
    assert request.num_cached_tokens == 40 and request.num_cache_write_tokens == 0
    extend = run(core, Request("extend", SYSTEM + list(range(200, 216)) + list(range(300, 316)) + [3],
                               SamplingParams(max_tokens=1), checkpoints=((56, 300.0),)))
    assert extend.num_cached_tokens == 40 and extend.num_cache_write_tokens == 16


def test_pins_filling_the_pool_give_way_to_a_waiting_request():
    """Regression (found by the property test above): with a pin budget of the whole pool, pinned
    prefixes filled every block while nothing ran, so a new request waited for a TTL to run out:
    a livelock. Now the oldest pin gives way, the request runs, and newer pins stay."""
    core = make_core(num_blocks=8, budget_fraction=1.0)
    firsts = []
    for k in range(3):                       # 3 prefixes of 2 blocks each, pinned
        prefix = list(range(3000 + 100 * k, 3008 + 100 * k))
        firsts.append(run(core, Request(f"p{k}", prefix + [1], SamplingParams(max_tokens=1, ignore_eos=True),
                                        checkpoints=((8, 300.0),))))
    kv = core.scheduler.kv
    assert kv.stats().num_pinned_blocks == 6
    big = Request("big", list(range(9000, 9013)), SamplingParams(max_tokens=4, ignore_eos=True))  # 5 blocks
    core.scheduler.add_request(big)
    for _ in range(20):                      # before the fix: no step ever scheduled it
        if not core.scheduler.has_unfinished:
            break
        core.step()
        core.scheduler.check_integrity()
    assert big.is_finished and len(big.output_token_ids) == 4
    assert kv.stats().pins_released_for_budget >= 1
    assert kv.pins.get(firsts[0].block_hashes[1]) is None            # the oldest pin gave way
    assert kv.pins.get(firsts[2].block_hashes[1]) is not None        # the newest stays
