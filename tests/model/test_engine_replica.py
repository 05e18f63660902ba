"""EngineReplica, the class each Ray Serve replica runs, driven directly (no Ray): its stream, its
abort on cancellation, and the cache it reports, keyed exactly as the ingress keys requests."""

from __future__ import annotations

import asyncio

from kvserve.cluster.replica import EngineReplica
from kvserve.config import CacheConfig, EngineConfig
from kvserve.kv.prefix_cache import cache_namespace
from kvserve.routing.replicas import request_block_hashes, route_hashes
from kvserve.sampling import FinishReason, SamplingParams


def _replica() -> EngineReplica:
    return EngineReplica(EngineConfig(model="random:tiny", dtype="float32", device="cpu",
                                      cache=CacheConfig(num_blocks=256)))


def test_a_replica_streams_reports_what_it_caches_and_frees_a_cancelled_request():
    replica = _replica()
    try:
        async def scenario():
            prompt = list(range(1, 70))
            options = {"tenant": "acme", "cache_salt": cache_namespace("acme", "s1")}   # as the server gives it
            outputs = [o async for o in replica.generate(prompt, SamplingParams(max_tokens=5, ignore_eos=True),
                                                         "r1", False, options)]
            assert outputs[-1].finish_reason == FinishReason.LENGTH
            assert sum(len(o.token_ids) for o in outputs) == 5
            for _ in range(200):   # the stats snapshot follows the last output by a step
                report = await replica.record_routing_stats()
                if report["queue"] == 0:
                    break
                await asyncio.sleep(0.01)
            expected = route_hashes(request_block_hashes(prompt, 16, "acme", "s1"))   # the policy's rule
            cached = {report["cached"][i:i + 8] for i in range(0, len(report["cached"]), 8)}
            assert len(expected) == 4 and set(expected) <= cached   # the keys the ingress routes by
            assert report["queue"] == 0 and report["stats"]["num_running"] == 0
            assert (await replica.record_routing_stats())["seq"] == report["seq"] + 1

            # The caller goes away mid-answer (Serve cancels the call): the request is aborted.
            stream = replica.generate([5] * 40, SamplingParams(max_tokens=3000, ignore_eos=True), "r2", False, {})
            first = await stream.__anext__()
            assert first.finish_reason is None
            await stream.aclose()
            for _ in range(200):
                stats = replica.engine.stats()
                if stats.num_running == 0 and stats.kv.num_used_blocks == 0:
                    break
                await asyncio.sleep(0.01)
            assert stats.num_running == 0 and stats.kv.num_used_blocks == 0
            name, integrity = await replica.call(lambda engine: engine.check_integrity())
            assert name == "local" and integrity is None
            scaling = replica.record_autoscaling_stats()
            assert set(scaling) == {"kvserve_waiting", "kvserve_running", "kvserve_kv_usage"}
            assert replica.describe()["block_size"] == 16

        asyncio.run(scenario())
        replica.check_health()
    finally:
        replica.engine.shutdown()
