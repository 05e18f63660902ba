"""Scheduler with a fake runner: continuous batching, chunking, prefix reuse, preemption, aborts."""

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kvserve.config import SchedulerConfig
from kvserve.engine.core import EngineCore
from kvserve.kv.manager import KVCacheManager
from kvserve.request import Request
from kvserve.sampling import FinishReason, InvalidRequestError, SamplingParams
from kvserve.sched.scheduler import Scheduler

from fake_runner import FakeRunner, reference_output

import pytest


def make_core(num_blocks=64, block_size=4, budget=32, max_seqs=8, prefix=True, max_model_len=4096, host_blocks=0,
              disk_blocks=0, policy="fcfs", preemption="auto"):
    kv = KVCacheManager(num_blocks, block_size, prefix, num_host_blocks=host_blocks, num_disk_blocks=disk_blocks)
    config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, policy=policy,
                             preemption_mode=preemption)
    scheduler = Scheduler(config, kv, max_model_len)
    return EngineCore(scheduler, FakeRunner(num_blocks, block_size))


def run_all(core: EngineCore) -> dict[str, list[int]]:
    outputs: dict[str, list[int]] = {}
    steps = 0
    while core.scheduler.has_unfinished:
        for delta in core.step():
            outputs.setdefault(delta.request_id, []).extend(delta.new_token_ids)
        core.scheduler.check_integrity()
        steps += 1
        assert steps < 10_000, "no progress"
    return outputs


def request(rid: str, prompt: list[int], max_tokens: int = 8, **kw) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), **kw)


def test_outputs_match_reference_with_chunking_and_batching():
    core = make_core(budget=7)
    prompts = {f"r{i}": [i, i + 1] * (3 + 5 * i) for i in range(6)}
    for rid, p in prompts.items():
        core.scheduler.add_request(request(rid, p, 10))
    outputs = run_all(core)
    for rid, p in prompts.items():
        assert outputs[rid] == reference_output(p, 10), rid
    assert core.scheduler.kv.pool.num_free_blocks == 64


def test_new_requests_join_while_others_decode():
    core = make_core(budget=64)
    core.scheduler.add_request(request("a", [1, 2, 3], 20))
    core.step()
    core.step()
    core.scheduler.add_request(request("b", [4, 5, 6], 5))
    plan = core.scheduler.schedule()
    ids = [c.request_id for c in plan.chunks]
    assert ids == ["a", "b"] and plan.chunks[0].num_tokens == 1 and plan.chunks[1].num_tokens == 3


def test_shared_prefix_computes_only_the_suffix():
    core = make_core(num_blocks=300, block_size=4, budget=2048)
    shared = list(range(1, 41)) * 25                                    # 1000 tokens
    core.scheduler.add_request(request("first", shared + [7, 7, 7], 1))
    run_all(core)
    before = core.runner.num_tokens_run
    second = request("second", shared + [9, 9], 1)
    core.scheduler.add_request(second)
    run_all(core)
    # 1000 shared tokens = 250 full blocks of 4: only the 2-token suffix is computed.
    assert core.runner.num_tokens_run - before == 2
    assert second.num_cached_tokens == 1000


def test_preemption_keeps_outputs_identical():
    core = make_core(num_blocks=12, block_size=4, budget=16)        # 48 slots for 4 x ~20 tokens
    prompts = {f"r{i}": [i + 1] * 6 for i in range(4)}
    for rid, p in prompts.items():
        core.scheduler.add_request(request(rid, p, 12))
    outputs = run_all(core)
    assert core.scheduler.stats().num_preemptions > 0
    for rid, p in prompts.items():
        assert outputs[rid] == reference_output(p, 12)


def test_abort_frees_blocks_at_once():
    core = make_core(num_blocks=16)
    core.scheduler.add_request(request("a", list(range(10)), 50))
    core.scheduler.add_request(request("b", list(range(20, 30)), 50))
    core.step()
    assert core.scheduler.abort("a")
    assert not core.scheduler.kv.block_ids("a")
    core.scheduler.check_integrity()
    assert not core.scheduler.abort("a")
    assert core.scheduler.abort("b")
    assert core.scheduler.kv.pool.num_free_blocks == 16


def test_stop_conditions():
    core = make_core()
    eos_prompt = [3, 4, 5]
    expected = reference_output(eos_prompt, 30)
    eos = expected[4]
    r = Request("e", eos_prompt, SamplingParams(max_tokens=30), frozenset({eos}))
    core.scheduler.add_request(r)
    out = run_all(core)["e"]
    assert out == expected[:expected.index(eos) + 1] and r.finish_reason == FinishReason.STOP
    r2 = Request("l", eos_prompt, SamplingParams(max_tokens=3, ignore_eos=True), frozenset({eos}))
    core.scheduler.add_request(r2)
    assert len(run_all(core)["l"]) == 3 and r2.finish_reason == FinishReason.LENGTH


def test_context_length_stops_generation_and_rejects_long_prompts():
    core = make_core(max_model_len=12)
    r = request("a", list(range(10)), 50)
    core.scheduler.add_request(r)
    assert len(run_all(core)["a"]) == 2 and r.finish_reason == FinishReason.LENGTH
    with pytest.raises(InvalidRequestError):
        core.scheduler.add_request(request("b", list(range(12)), 1))


ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 3), st.integers(1, 40), st.integers(1, 12)),
        st.tuples(st.just("abort"), st.integers(0, 50)),
        st.tuples(st.just("step"), st.integers(1, 4)),
    ),
    min_size=1, max_size=40,
)


# Cases the test found that once livelocked (or stalled) the scheduler, replayed on every run.
@example(
    ops=[('abort', 16), ('add', 1, 10, 7), ('step', 3), ('abort', 49), ('step', 2), ('abort', 50), ('abort',
    2), ('abort', 24), ('add', 1, 35, 5), ('step', 2), ('add', 0, 37, 1), ('abort', 30), ('add', 1, 2, 3),
    ('add', 2, 34, 8), ('add', 3, 10, 4), ('step', 1), ('add', 1, 31, 2), ('add', 1, 35, 4), ('step', 4),
    ('step', 2), ('abort', 15), ('abort', 32)], num_blocks=9, block_size=4, budget=1, prefix=False,
    host_blocks=8, disk_blocks=16, policy='priority', preemption='swap', tenants=3)
@example(
    ops=[('add', 1, 33, 7), ('step', 2), ('step', 4), ('step', 3), ('step', 2), ('add', 3, 37, 12), ('add', 1,
    24, 5), ('step', 1)], num_blocks=20, block_size=4, budget=1, prefix=False, host_blocks=0, disk_blocks=3,
    policy='priority', preemption='recompute', tenants=3)
@example(
    ops=[('add', 2, 35, 12), ('add', 2, 35, 12), ('add', 2, 35, 12)], num_blocks=23, block_size=2, budget=2,
    prefix=False, host_blocks=2, disk_blocks=3, policy='priority', preemption='auto', tenants=3)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, num_blocks=st.integers(4, 24), block_size=st.sampled_from([1, 2, 4, 8]),
       budget=st.integers(1, 40), prefix=st.booleans(), host_blocks=st.sampled_from([0, 0, 2, 8, 32]),
       disk_blocks=st.sampled_from([0, 3, 16]), policy=st.sampled_from(["fcfs", "priority", "cache-aware"]),
       preemption=st.sampled_from(["auto", "swap", "recompute"]), tenants=st.integers(1, 3))
def test_random_arrivals_aborts_and_preemptions_keep_invariants(ops, num_blocks, block_size, budget, prefix,
                                                                host_blocks, disk_blocks, policy, preemption,
                                                                tenants):
    """Whatever happens, no block leaks, ref counts stay exact, and every completed request's
    output equals running it alone (the fake runner reads every context back through the block
    tables, so a wrong prefix hit, host- or disk-tier copy or swap would change the output).
    With several tenants, fair shares and fair-share preemption are in the mix too."""
    core = make_core(num_blocks=num_blocks, block_size=block_size, budget=budget, max_seqs=6, prefix=prefix,
                     host_blocks=host_blocks, disk_blocks=disk_blocks, policy=policy, preemption=preemption)
    bases = [[1, 2, 3, 4, 5, 6, 7, 8] * 5, [9, 8, 7] * 14, [5] * 40, list(range(40))]
    added, outputs = [], {}
    for op in ops:
        if op[0] == "add":
            _, base, length, max_tokens = op
            prompt = bases[base][:length]
            rid = f"r{len(added)}"
            try:
                core.scheduler.add_request(request(rid, prompt, max_tokens, priority=(len(added) * 7) % 3,
                                                   tenant=f"t{len(added) % tenants}", weight=1 + len(added) % 2))
            except InvalidRequestError:
                continue   # prompt longer than this tiny pool can ever hold
            added.append((rid, prompt, max_tokens))
        elif op[0] == "abort" and added:
            rid = added[op[1] % len(added)][0]
            if core.scheduler.abort(rid):
                outputs.pop(rid, None)
                outputs[rid] = None
        else:
            for _ in range(op[1]):
                for d in core.step():
                    if outputs.get(d.request_id, []) is not None:
                        outputs.setdefault(d.request_id, []).extend(d.new_token_ids)
        core.scheduler.check_integrity()
    rest = run_all(core)
    for rid, toks in rest.items():
        if outputs.get(rid, []) is not None:
            outputs.setdefault(rid, []).extend(toks)
    assert core.scheduler.num_stalls_broken == 0, "a step found nothing to run (the safety net hid a stall)"
    kv = core.scheduler.kv
    assert kv.pool.num_free_blocks == kv.num_blocks, "every block is free or cached"
    kv.check_integrity()
    assert len(core.runner.disk) == len(kv.disk), "the disk tier's books match its files"
    max_len = core.scheduler.max_model_len
    for rid, prompt, max_tokens in added:
        if outputs.get(rid) is None:
            continue
        expected = reference_output(prompt, min(max_tokens, max_len - len(prompt)))
        assert outputs[rid] == expected, rid


def test_a_token_budget_under_one_per_tenant_still_finishes_everyone():
    """Found by the property test above: a budget of 1 token and three tenants. The fair cap's one
    token always went to the same tenant, so a waiting request that outranked a running one had it
    preempted (for its blocks) step after step without ever being given a token itself."""
    core = make_core(num_blocks=4, block_size=1, budget=1, max_seqs=6, prefix=False, policy="priority")
    for i, (length, max_tokens) in enumerate([(1, 1), (1, 3), (1, 1), (2, 1)]):
        core.scheduler.add_request(request(f"r{i}", [1, 2][:length], max_tokens, priority=(i * 7) % 3,
                                           tenant=f"t{i % 3}", weight=1 + i % 2))
    outputs = run_all(core)
    assert {rid: len(tokens) for rid, tokens in outputs.items()} == {"r0": 1, "r1": 3, "r2": 1, "r3": 1}
    assert core.scheduler.kv.pool.num_free_blocks == 4


def test_tokens_a_tenant_cannot_use_go_to_one_that_can():
    """Found by the property test: r2's tenant was owed the step's spare token but r2, swapped out,
    had no room to come back; r0's tenant got 0 tokens, so r0 never finished and never freed the
    blocks r2 needed. What the fair caps leave unused now goes to running requests they held back."""
    core = make_core(num_blocks=4, block_size=1, budget=2, max_seqs=6, prefix=False, host_blocks=2,
                     policy="priority")
    for i, max_tokens in enumerate([3, 3, 2]):
        core.scheduler.add_request(request(f"r{i}", [1], max_tokens, priority=(i * 7) % 3, tenant=f"t{i}",
                                           weight=1 + i % 2))
    outputs = run_all(core)
    assert {rid: len(tokens) for rid, tokens in outputs.items()} == {"r0": 3, "r1": 3, "r2": 2}
    assert core.scheduler.kv.pool.num_free_blocks == 4


def test_nobody_is_preempted_for_a_request_the_step_has_no_token_for():
    """Found by the property test: with a budget of a token or two, waiting requests that outrank
    running ones took their seats although the step could not start them, and the tokens went back
    the next step, and so on. A waiting request now preempts only if the step's budget could start
    it (each running request, and each waiting one placed before it, takes at least a token)."""
    core = make_core(num_blocks=64, block_size=4, budget=2, max_seqs=3, prefix=False, policy="priority")
    core.scheduler.add_request(request("x", [1], 6, priority=1))
    core.scheduler.add_request(request("y", [2], 6, priority=1))
    core.step()
    core.step()                                  # both decoding: the step's 2 tokens are theirs
    core.scheduler.add_request(request("w1", [3], 4, priority=0))
    core.scheduler.add_request(request("w2", [4], 4, priority=0))
    core.step()                                  # w1 takes the free seat; nothing to start w2 with
    assert core.scheduler.stats().num_preemptions == 0
    outputs = run_all(core)
    assert outputs["w2"] == reference_output([4], 4)


def test_a_share_a_tenant_cannot_use_goes_round_to_the_others():
    """Found by the property test: the step's leftover token went, step after step, to the tenant
    furthest behind, whose only request was swapped out with no room to come back; the
    highest-priority request never got a token. An unused share now counts as served."""
    core = make_core(num_blocks=23, block_size=2, budget=2, max_seqs=6, prefix=False, host_blocks=2,
                     disk_blocks=3, policy="priority")
    for i in range(3):
        core.scheduler.add_request(request(f"r{i}", [5] * 35, 12, priority=(i * 7) % 3, tenant=f"t{i}",
                                           weight=1 + i % 2))
    outputs = run_all(core)
    fits = min(12, core.scheduler.max_model_len - 35)          # the pool holds 46 tokens of one request
    assert all(outputs[f"r{i}"] == reference_output([5] * 35, fits) for i in range(3))
    assert core.scheduler.num_stalls_broken == 0


def test_an_outranking_request_does_not_wait_for_a_prefix_it_holds_back():
    """Found by the property test: a high-priority prompt shares its prefix with a low-priority
    prefill in progress. It waited for that prefill to compute the shared block, while the prefill
    sat out for it (it outranks it): nothing ran again. Now only prefills running this step count
    as in flight."""
    core = make_core(num_blocks=22, block_size=8, budget=20, policy="priority")
    core.scheduler.add_request(request("low", list(range(31)), 3, priority=1))
    core.step()                                                   # 20 of its 31 prompt tokens
    core.scheduler.add_request(request("high", list(range(33)), 3, priority=0))
    outputs = run_all(core)
    assert outputs["high"] == reference_output(list(range(33)), 3)
    assert outputs["low"] == reference_output(list(range(31)), 3)


def test_a_stall_is_broken_counted_and_logged(monkeypatch, caplog):
    """The safety net, on the stall above with its cause put back (a prefill that sits out counts
    as in flight again): the step is planned again without waits, both requests finish with their
    own tokens, and the stall is counted and logged."""
    monkeypatch.setattr(Scheduler, "_prefix_blocks_in_flight",
                        lambda self, scheduled: {h for r in self.running for h in self._uncomputed_prompt_blocks(r)})
    core = make_core(num_blocks=22, block_size=8, budget=20, policy="priority")
    core.scheduler.add_request(request("low", list(range(31)), 3, priority=1))
    core.step()
    core.scheduler.add_request(request("high", list(range(33)), 3, priority=0))
    with caplog.at_level("WARNING", logger="kvserve.sched.scheduler"):
        outputs = run_all(core)
    assert outputs["high"] == reference_output(list(range(33)), 3)
    assert outputs["low"] == reference_output(list(range(31)), 3)
    assert core.scheduler.num_stalls_broken >= 1
    assert core.scheduler.stats().num_stalls_broken == core.scheduler.num_stalls_broken
    assert "found nothing to run" in caplog.text
    assert core.scheduler.kv.pool.num_free_blocks == 22


def test_prefix_evicted_to_the_host_tier_comes_back_on_a_hit():
    core = make_core(num_blocks=16, block_size=4, budget=64, host_blocks=128)
    shared = list(range(1, 41))                                   # 10 blocks
    core.scheduler.add_request(request("first", shared + [7], 2))
    run_all(core)
    for i in range(6):                                            # unrelated prompts push it out of the pool
        core.scheduler.add_request(request(f"flood{i}", [100 + i] * 40, 1))
        run_all(core)
    kv = core.scheduler.kv
    assert kv.match(request("probe", shared + [9], 1)).device_block_ids == []
    before = core.runner.num_tokens_run
    second = request("second", shared + [9], 3)
    core.scheduler.add_request(second)
    out = run_all(core)["second"]
    assert second.num_cached_tokens == 40                        # the read count includes the host blocks
    assert core.runner.num_tokens_run - before == 1 + 2           # only the suffix and the decodes ran
    assert out == reference_output(shared + [9], 3)
    assert kv.stats().host_hit_blocks == 10


def test_prefix_pushed_down_to_the_disk_tier_comes_back_from_disk():
    # A small budget: a step evicts fewer blocks than the host tier holds (a slot filled in a step
    # is not reused in that step, so a bigger burst would drop the excess instead).
    core = make_core(num_blocks=16, block_size=4, budget=8, host_blocks=4, disk_blocks=64)
    shared = list(range(1, 41))                                   # 10 blocks
    core.scheduler.add_request(request("first", shared + [7], 2))
    run_all(core)
    for i in range(6):                                            # push it out of the pool and the host tier
        core.scheduler.add_request(request(f"flood{i}", [100 + i] * 40, 1))
        run_all(core)
    kv = core.scheduler.kv
    hit = kv.match(request("probe", shared + [9], 1))
    assert (hit.device_block_ids, hit.host_hashes, len(hit.disk_hashes)) == ([], [], 10)
    assert set(core.runner.disk) >= {h.hex() for h in hit.disk_hashes}
    before = core.runner.num_tokens_run
    second = request("second", shared + [9], 3)
    core.scheduler.add_request(second)
    out = run_all(core)["second"]
    assert second.num_cached_tokens == 40                        # the read count includes the disk blocks
    assert core.runner.num_tokens_run - before == 1 + 2           # only the suffix and the decodes ran
    assert out == reference_output(shared + [9], 3)
    stats = kv.stats()
    assert stats.disk_hit_blocks == 10 and stats.host_hit_blocks == 0
    assert stats.num_disk_blocks == len(core.runner.disk) > 0


def test_disk_tier_is_bounded_and_flushed():
    core = make_core(num_blocks=8, block_size=4, budget=64, host_blocks=2, disk_blocks=5)
    for i in range(8):
        core.scheduler.add_request(request(f"r{i}", [10 * i + j for j in range(17)], 1))
        run_all(core)
    kv = core.scheduler.kv
    assert len(kv.disk) == len(core.runner.disk) == 5             # LRU-bounded, files dropped with it
    assert kv.stats().blocks_evicted_disk > 0
    kv.flush()
    assert len(kv.disk) == 0 and kv.stats().num_disk_blocks == 0
    core.step()                                                   # the drops reach the runner with a step
    assert core.runner.disk == {}


def test_priority_policy_admits_lower_values_first_and_preempts_the_least_important():
    core = make_core(num_blocks=10, block_size=4, budget=64, max_seqs=2, policy="priority")
    for rid, priority in (("low", 5), ("mid", 1), ("high", 0)):
        core.scheduler.add_request(request(rid, [1, 2, 3, 4], 12, priority=priority))
    plan = core.scheduler.schedule()
    assert [c.request_id for c in plan.chunks] == ["high", "mid"]
    core.scheduler.update(plan, core.runner.execute(plan))
    outputs = run_all(core)
    assert outputs["low"] == reference_output([1, 2, 3, 4], 12)
    # 7 blocks, two requests growing to 20 tokens each (5 blocks): one is preempted, never "a".
    core = make_core(num_blocks=7, block_size=4, budget=64, max_seqs=2, policy="priority")
    core.scheduler.add_request(request("b", [2] * 8, 12, priority=3))
    core.scheduler.add_request(request("a", [1] * 8, 12, priority=0))
    a, b = core.scheduler.requests["a"], core.scheduler.requests["b"]
    outputs = run_all(core)
    assert core.scheduler.stats().num_preemptions > 0 and a.num_preemptions == 0 and b.num_preemptions > 0
    assert outputs["a"] == reference_output([1] * 8, 12) and outputs["b"] == reference_output([2] * 8, 12)


def test_requests_arriving_together_compute_a_shared_prefix_once():
    """Prefix-aware admission: eight requests share a 100-token prefix and arrive in the same
    step. The first computes it; the others wait until its blocks are cached and then compute only
    their own suffix. A request with a different prompt is not held back."""
    core = make_core(num_blocks=300, block_size=4, budget=256, max_seqs=16)
    shared = list(range(1, 101))                                  # 25 full blocks
    prompts = {f"r{i}": shared + [200 + i, 300 + i] for i in range(8)}
    prompts["other"] = [7] * 30
    for rid, p in prompts.items():
        core.scheduler.add_request(request(rid, p, 4))
    first_plan = core.scheduler.schedule()
    assert [c.request_id for c in first_plan.chunks] == ["r0", "other"]   # r1..r7 wait for r0's prefix
    outputs: dict[str, list[int]] = {}
    for delta in core.scheduler.update(first_plan, core.runner.execute(first_plan)):   # what step() does
        outputs.setdefault(delta.request_id, []).extend(delta.new_token_ids)
    for rid, tokens in run_all(core).items():
        outputs.setdefault(rid, []).extend(tokens)
    for rid, p in prompts.items():
        assert outputs[rid] == reference_output(p, 4), rid
    assert core.scheduler.num_prefix_waits == 7
    assert core.scheduler.kv.stats().num_used_blocks == 0
    # r0 102 and other 30 prompt tokens; r1..r7 hit 100 and compute 2 each; then 3 decodes each.
    assert core.runner.num_tokens_run == 102 + 30 + 7 * 2 + 9 * 3
    assert core.scheduler.kv.pool.num_free_blocks == 300
