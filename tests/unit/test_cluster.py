"""The scale-out control plane without Ray: the route book (what the Serve router and the ingress
share), report timing against inferred routes, the autoscaling policy, stats summed over replicas,
the cluster options and the replica-lost error. (tests/server/test_scale_out.py runs it on Ray.)"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from kvserve.cli import build_parser, start_cluster
from kvserve.cluster.autoscale import KV_USAGE, WAITING, EnginePressurePolicy
from kvserve.cluster.book import RouteBook
from kvserve.cluster.deploy import ClusterConfig, portable
from kvserve.cluster.remote import ReplicaLostError, stats_from_dict, sum_stats
from kvserve.config import CacheConfig, ConfigError, EngineConfig
from kvserve.kv.manager import KVCacheStats
from kvserve.routing.replicas import (ROUTE_HASH_BYTES, ReplicaPolicy, ReplicaPolicyConfig, RouteKey,
                                      request_block_hashes, route_hashes)
from kvserve.sched.scheduler import SchedulerStats
from kvserve.server.protocol import as_api_error


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _hashes(seed: int, blocks: int = 6) -> tuple[bytes, ...]:
    return route_hashes(request_block_hashes([seed * 100 + i for i in range(16 * blocks)], 16, "t", None))


def test_a_report_keeps_only_the_routes_newer_than_itself():
    clock = Clock()
    policy = ReplicaPolicy(ReplicaPolicyConfig(), clock=clock)
    policy.report("a", 0)
    policy.report("b", 0)
    old, new = _hashes(1), _hashes(2)
    assert policy.choose(old, candidates=["a"]).replica == "a"
    clock.now += 10
    policy.choose(new, candidates=["a"])
    assert policy.matched("a", old) == len(old) and policy.matched("a", new) == len(new)
    policy.report("a", 0, cached=[], keep_after=clock.now - 2)   # a report from after the old route only
    assert policy.matched("a", old) == 0                          # the replica says it no longer holds it
    assert policy.matched("a", new) == len(new)                   # routed after the report was taken: kept
    policy.report("a", 0, cached=[new[0]])                        # no keep_after: the report is the truth
    assert policy.matched("a", new) == 1


def test_the_route_book_follows_serve_s_replicas_counts_and_reports():
    clock = Clock()
    book = RouteBook("app", ReplicaPolicyConfig(imbalance_threshold=2), report_lag_s=2.0, clock=clock)
    book.sync({"a": {}, "b": None})
    assert book.names() == ["a", "b"] and book.reports() == {}
    group = _hashes(3)
    first = book.choose(RouteKey(group), ["a", "b"], "r1")
    book.routed(first.replica, "r1")
    again = book.choose(RouteKey(group), ["a", "b"], "r2")
    assert again.replica == first.replica and again.reason == "prefix" and again.matched_blocks == len(group)
    book.routed(again.replica, "r2")
    book.routed(again.replica, "c1", request=False)   # a call addressed to the replica: in flight, not a route
    snapshot = book.snapshot()
    assert snapshot["replicas"][first.replica] == {"in_flight": 3, "routed": 2, "queue": None}
    assert snapshot["decisions"]["prefix"] == 1 and snapshot["matched_blocks"] == len(group)
    for request_id in ("r1", "r2", "c1", "r1", "unknown"):   # a repeated or unknown completion takes nothing
        book.completed(request_id)
    assert book.snapshot()["replicas"][first.replica]["in_flight"] == 0
    # A report (a new seq) replaces inferences older than report_lag_s; the same seq again changes nothing.
    other = "b" if first.replica == "a" else "a"
    clock.now += 60
    book.sync({first.replica: {"seq": 1, "queue": 0, "cached": b"".join(group[:2])}, other: None})
    assert book.policy.matched(first.replica, group) == 2
    assert book.reports()[first.replica]["queue"] == 0
    # Load: picks not yet sent count as queue, so a burst on one prefix spills once the queues part.
    picks = [book.choose(RouteKey(group), [first.replica, other], f"burst-{i}").replica for i in range(6)]
    assert picks[:3] == [first.replica] * 3 and other in picks[3:], picks
    book.sync({other: None})                     # the first replica is gone
    assert book.names() == [other] and first.replica not in book.policy.replicas


def test_the_book_never_leaves_a_count_behind():
    """Serve may report a completion before the send, send a pick elsewhere, or drop a pick (the
    request was cancelled while it waited): the counts come back to zero in every case."""
    clock = Clock()
    book = RouteBook("app", clock=clock)
    book.sync({"a": None, "b": None})
    book.choose(RouteKey(_hashes(5)), ["a", "b"], "early")
    book.completed("early")                      # completion first ...
    book.routed("a", "early")                    # ... then the send: nothing stays in flight,
    assert book.replicas["a"].in_flight == 0 and book.replicas["a"].routed == 1   # but it was routed there
    picked = book.choose(RouteKey(_hashes(6)), ["a", "b"], "moved").replica
    elsewhere = "b" if picked == "a" else "a"
    book.routed(elsewhere, "moved")              # Serve sent it to the other replica
    assert book.replicas[picked].pending == 0 and book.replicas[elsewhere].in_flight == 1
    book.completed("moved")
    book.choose(RouteKey(_hashes(7)), ["a", "b"], "dropped")
    book.choose(RouteKey(_hashes(7)), ["a", "b"], "dropped")   # a retry replaces the pick
    assert sum(v.pending for v in book.replicas.values()) == 1
    clock.now += 61
    book.sync({"a": None, "b": None})            # the pick Serve never confirmed expires
    assert all(v.pending == 0 and v.in_flight == 0 for v in book.replicas.values())


def test_the_pow2_book_counts_ray_s_routes():
    book = RouteBook("app")
    book.pow2 = True
    book.routed("a", "r1")
    book.routed("a", "c1", request=False)
    assert book.snapshot()["decisions"] == {"pow2": 1}


def test_route_hashes_are_short_prefixes_of_the_engine_s_hashes():
    tokens = list(range(40))
    full = request_block_hashes(tokens, 16, "tenant", "salt")
    assert len(full) == 2 and route_hashes(full) == tuple(h[:ROUTE_HASH_BYTES] for h in full)
    assert route_hashes(request_block_hashes(tokens, 16, "other", "salt")) != route_hashes(full)


def _ctx(replicas: int, waiting: list[float], usage: list[float], requests: float = 0.0):
    return SimpleNamespace(current_num_replicas=replicas, total_num_requests=requests,
                           aggregated_metrics={WAITING: dict(enumerate(waiting)), KV_USAGE: dict(enumerate(usage))})


def test_the_autoscaling_policy_reads_waiting_requests_and_kv_usage():
    policy = EnginePressurePolicy(target_waiting=2.0, target_kv_usage=0.8)
    assert policy(_ctx(2, [0, 0], [0.5, 0.5])) == (2, {})            # within targets: stay
    assert policy(_ctx(2, [6, 4], [0.1, 0.1]))[0] == 5                # 10 waiting, 2 per replica: 5
    assert policy(_ctx(2, [0, 0], [0.95, 0.85]))[0] == 3              # KV nearly full: up
    assert policy(_ctx(3, [0, 0, 0], [0.2, 0.2, 0.2]))[0] == 2         # idle: down by one
    assert policy(_ctx(2, [0, 1], [0.1, 0.1]))[0] == 2                # something waits: never down
    assert policy.desired(3, 0, 0.2, running=5) == 3                  # busy replicas: not down either
    assert policy(_ctx(2, [0, 0], [0.5, 0.5]))[0] == 2                # 0.5 over one replica would be 1.0: stay
    assert policy(_ctx(0, [], [], requests=3))[0] == 1                # scaled to zero: one on demand
    assert policy(_ctx(0, [], []))[0] == 0
    with pytest.raises(ValueError):
        EnginePressurePolicy(target_kv_usage=1.5)


def _stats(running: int, waiting: int, used: int, hits: int, tenants: dict | None, longest: float) -> SchedulerStats:
    kv = KVCacheStats(num_blocks=100, num_used_blocks=used, num_cached_blocks=5, num_free_blocks=100 - used,
                      prefix_queried_tokens=100, prefix_hit_tokens=hits)
    return SchedulerStats(num_running=running, num_waiting=waiting, num_preemptions=1, kv=kv,
                          tenant_tokens=tenants, max_queue_time_s=longest)


def test_replica_stats_sum_and_maxima_stay_maxima():
    one = _stats(1, 2, 3, 4, {"x": 1}, 0.25)
    assert stats_from_dict(dataclasses.asdict(one)) == one      # as a replica reports them
    # A replica of another version (a rolling upgrade): fields unknown here dropped, missing ones defaulted.
    newer = dataclasses.asdict(one) | {"num_future_counter": 7}
    newer["kv"] |= {"future_blocks": 3}
    assert stats_from_dict(newer) == one
    older = dataclasses.asdict(one)
    del older["num_stalls_broken"], older["kv"]["host_hit_blocks"], older["num_preemptions"]
    assert stats_from_dict(older) == dataclasses.replace(one, num_preemptions=0)
    total = sum_stats([_stats(2, 1, 10, 40, {"a": 5}, 0.5), _stats(1, 0, 20, 60, {"a": 1, "b": 2}, 1.5),
                       _stats(0, 0, 0, 0, None, 0.0)])
    assert (total.num_running, total.num_waiting, total.num_preemptions) == (3, 1, 3)
    assert total.kv.num_blocks == 300 and total.kv.num_used_blocks == 30 and total.kv.prefix_hit_tokens == 100
    assert total.tenant_tokens == {"a": 6, "b": 2} and total.max_queue_time_s == 1.5
    empty = sum_stats([])
    assert empty.num_running == 0 and empty.kv.num_blocks == 0 and empty.tenant_tokens is None


def test_cluster_options_are_validated():
    assert ClusterConfig(replicas=2).policy_kwargs["report_lag_s"] == 2.0
    for bad in (dict(replicas=0), dict(min_replicas=1), dict(min_replicas=2, max_replicas=4, replicas=1),
                dict(router="random"), dict(replica_cpus=0), dict(decay_s=0), dict(min_match_blocks=0), dict(attach=True)):
        with pytest.raises(ValueError):
            ClusterConfig(**bad)
    parser = build_parser()
    assert start_cluster(parser.parse_args(["serve"])) is None   # one process: Ray is never touched
    with pytest.raises(ConfigError, match="go together"):
        start_cluster(parser.parse_args(["serve", "--replicas", "2", "--min-replicas", "1"]))
    with pytest.raises(ConfigError, match="replica routing"):
        start_cluster(parser.parse_args(["serve", "--replicas", "2", "--replica-decay-s", "0"]))


def test_replica_paths_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.gguf").write_bytes(b"")
    config = EngineConfig(model="model.gguf", cache=CacheConfig(host_memory_bytes=1 << 20, disk_dir="kv"))
    moved = portable(config)
    assert moved.model == str(tmp_path / "model.gguf") and moved.cache.disk_dir == str(tmp_path / "kv")
    assert portable(EngineConfig(model="random:tiny")).model == "random:tiny"


def test_a_lost_replica_is_a_503_that_says_so():
    error = as_api_error(ReplicaLostError("the engine replica serving this request stopped; retry"), "/x")
    assert error.status == 503 and error.body()["error"]["code"] == "replica_lost"
    assert error.headers["Retry-After"]


def test_summed_stats_of_no_reports_yet_have_a_usage_of_zero():
    """/metrics on a front whose replicas have not reported: an empty pool, no division by zero."""
    from kvserve.cluster.remote import sum_stats

    assert sum_stats([]).kv.usage == 0.0
