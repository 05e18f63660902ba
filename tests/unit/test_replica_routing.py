"""The cache-aware replica policy (kvserve/routing/replicas.py) on its own: keys equal to the
engine's block hashes (tenant salt included), prefix affinity, the load guard, sticky sessions,
reports replacing inferences, decay, and a replica going away."""

import random

import pytest

from kvserve.kv.manager import KVCacheManager
from kvserve.kv.prefix_cache import cache_namespace
from kvserve.request import Request
from kvserve.routing.replicas import ReplicaPolicy, ReplicaPolicyConfig, request_block_hashes
from kvserve.sampling import SamplingParams

BLOCK = 16


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def hashes(tokens, tenant=None):
    return request_block_hashes(tokens, BLOCK, tenant)


def policy(n=2, **config):
    clock = Clock()
    p = ReplicaPolicy(ReplicaPolicyConfig(**config), random.Random(0), clock)
    for i in range(n):
        p.report(f"r{i}", 0)
    return p, clock


def test_keys_are_the_engine_s_own_block_hashes_salt_included():
    """The server gives a request cache_salt=cache_namespace(tenant, body's cache_salt); the KV
    manager hashes its blocks; the router's keys for the same tenant and salt are the same."""
    tokens = list(range(1, 70))
    for tenant, salt in ((None, None), ("alpha", None), ("alpha", "s1"), (None, "s1")):
        request = Request("x", tokens, SamplingParams(max_tokens=4), cache_salt=cache_namespace(tenant, salt))
        kv = KVCacheManager(64, BLOCK, True)
        kv.allocate_slots(request, len(tokens), kv.match(request))
        assert request.block_hashes == request_block_hashes(tokens, BLOCK, tenant, salt)
        assert len(request.block_hashes) == 4
    firsts = {request_block_hashes(tokens, BLOCK, t, c)[0] for t, c in ((None, None), ("a", None), ("b", None), ("a", "x"))}
    assert len(firsts) == 4


def test_sixteen_prompts_over_four_prefixes_stay_with_their_first_replica():
    p, _ = policy(n=2)
    rng = random.Random(1)
    prefixes = [[rng.randrange(1, 1000) for _ in range(8 * BLOCK)] for _ in range(4)]
    home = {}
    for i in range(16):
        group = i % 4
        decision = p.choose(hashes(prefixes[group] + [rng.randrange(1, 1000) for _ in range(20)]))
        if group in home:
            assert (decision.replica, decision.reason, decision.matched_blocks) == (home[group], "prefix", 8)
        else:
            assert decision.reason == "balance" and decision.matched_blocks == 0
            home[group] = decision.replica
        p.finished(decision.replica)
    assert set(home.values()) == {"r0", "r1"}          # the four groups spread over both replicas


def test_a_tenant_s_prefix_does_not_draw_another_tenant():
    p, _ = policy(n=2)
    tokens = list(range(1, 5 * BLOCK))
    first = p.choose(hashes(tokens, "A"))
    p.finished(first.replica)
    assert p.choose(hashes(tokens, "A")).reason == "prefix"
    other = p.choose(hashes(tokens, "B"))
    assert other.reason == "balance" and other.matched_blocks == 0


def test_with_one_replica_saturated_unrelated_requests_go_to_the_other():
    p, _ = policy(n=2, imbalance_threshold=4)
    p.report("r0", 20)
    for i in range(8):
        decision = p.choose(hashes([1000 + i] * 3 * BLOCK))
        assert decision.replica == "r1" and decision.reason in ("imbalance", "balance")
    p.report("r1", 20)
    p.report("r0", 2)
    hot = hashes(list(range(2, 6 * BLOCK)))
    p.report("r1", 20, cached=hot)                           # r1 holds the prefix but is swamped
    assert p.choose(hot).replica == "r0"                    # the load guard comes first


def test_sticky_sessions_hold_until_their_replica_is_overloaded_or_gone():
    p, clock = policy(n=3, imbalance_threshold=2)
    first = p.choose(hashes([5] * 40), session="s1")
    for _ in range(2):
        decision = p.choose(hashes([7] * 40), session="s1")
        assert (decision.replica, decision.reason) == (first.replica, "session")
    p.report(first.replica, 9)                               # now far above the shortest queue
    assert p.choose(hashes([8] * 40), session="s1").replica != first.replica
    moved = p.choose(hashes([8] * 40), session="s1")
    assert moved.reason == "session"                         # the session follows its new replica
    p.remove(moved.replica)
    after = p.choose(hashes([9] * 40), session="s1")
    assert after.reason != "session" and after.replica in p.replicas
    clock.now += 4000                                        # past session_ttl_s
    p.report("r0", 0), p.report("r1", 0), p.report("r2", 0)
    assert p.choose(hashes([9] * 40), session="s1").reason != "session"


def test_inferred_entries_decay_and_reports_replace_them():
    p, clock = policy(n=2, decay_s=60)
    prompt = hashes(list(range(3, 4 * BLOCK)))
    decision = p.choose(prompt)
    assert p.matched(decision.replica, prompt) == 3
    clock.now += 61
    assert p.matched(decision.replica, prompt) == 0          # forgotten: not routed there for a minute
    p.choose(prompt)
    p.report(decision.replica, 0, cached=prompt[:1])         # the replica says what it really holds
    assert p.matched(decision.replica, prompt) == 1


def test_bad_settings_and_no_replica_are_clear_errors():
    with pytest.raises(ValueError, match="min_match_blocks"):
        ReplicaPolicyConfig(min_match_blocks=0)
    p = ReplicaPolicy()
    with pytest.raises(LookupError, match="no replica"):
        p.choose([])
