"""One engine replica of a scale-out deployment: the class Ray Serve runs once per replica actor
(`deploy.py` wraps it with `serve.deployment`; nothing here imports Ray, so it is testable alone).

    ingress (RemoteEngine)                     replica (this class, one AsyncEngine)
    ──────────────────────                     ─────────────────────────────────────
    make_request: tokenize, validate
    generate.remote(tokens, params, id, ...)  ─▶ engine.add → stream
    async for output in responses           ◀── yield each RequestOutput (merged while the caller lags)
    cancel (client gone, abort)              ─▶ the task is cancelled → finally: abort → blocks freed

Serve asks the replica, every `request_routing_stats_period_s`, for its routing stats (queue, the
block hashes its prefix cache holds, its scheduler stats), which reach the ingress's router; and, when
autoscaling, for its autoscaling stats (waiting, running, KV usage), which reach the controller's
policy (`autoscale.py`). A replica whose engine died fails its health check, and Serve replaces it.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging

from kvserve.config import EngineConfig
from kvserve.routing.replicas import ROUTE_HASH_BYTES, RouteKey

log = logging.getLogger(__name__)

MAX_REPORTED_HASHES = 4096   # the newest cached blocks a report names (8 bytes each, one bytes object: 32 KiB)


class EngineReplica:
    def __init__(self, config: EngineConfig, faults: dict[str, int] | None = None,
                 max_reported_hashes: int = MAX_REPORTED_HASHES):
        from kvserve.cli import inject_faults
        from kvserve.engine.async_engine import AsyncEngine
        from kvserve.engine.engine import Engine

        def build() -> Engine:
            engine = Engine(config)
            inject_faults(engine, faults or {})
            return engine

        self.engine = AsyncEngine(build)
        self.name = _replica_name()
        self.max_reported_hashes = max_reported_hashes
        self._reports = itertools.count(1)

    def describe(self, route: RouteKey | None = None) -> dict:
        """What the ingress's front needs to validate exactly as this engine does."""
        engine = self.engine.engine
        return {"replica": self.name, "max_model_len": engine.max_model_len,
                "block_size": engine.config.cache.block_size,
                "max_num_seqs": engine.config.scheduler.max_num_seqs}

    async def generate(self, token_ids: list[int], params, request_id: str, quiet: bool, options: dict,
                       route: RouteKey | None = None):
        """The request's outputs, as the engine produces them. `route` is the router's (unused here)."""
        stream = await self.engine.add(token_ids, params, request_id, quiet=quiet, **options)
        try:
            async for output in stream:
                yield output
        finally:   # finished: a no-op; cancelled (the caller is gone) or failed: its blocks are freed now
            stream.abort()

    async def call(self, fn, route: RouteKey | None = None) -> tuple[str, object]:
        """fn(engine) between two steps, with the name of the replica that ran it."""
        return self.name, await self.engine.call(fn)

    async def record_routing_stats(self) -> dict:
        stats = self.engine.stats()
        limit = self.max_reported_hashes
        cached = await self.engine.call(lambda e: e.scheduler.kv.prefix_cache.cached_hashes(limit))
        # Plain values only: Serve's controller unpickles and hashes every report (no kvserve there).
        return {"replica": self.name, "seq": next(self._reports), "stats": dataclasses.asdict(stats),
                "queue": stats.num_running + stats.num_waiting,
                "cached": b"".join(h[:ROUTE_HASH_BYTES] for h in cached)}

    def record_autoscaling_stats(self) -> dict[str, float]:
        stats = self.engine.stats()
        return {"kvserve_waiting": float(stats.num_waiting), "kvserve_running": float(stats.num_running),
                "kvserve_kv_usage": float(stats.kv.usage)}

    def check_health(self) -> None:
        if not self.engine.alive:
            raise RuntimeError(f"the engine of replica {self.name} has stopped: {self.engine.error}")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def _replica_name() -> str:
    try:
        from ray import serve
        return serve.get_replica_context().replica_id.unique_id
    except Exception:   # noqa: BLE001 - outside Serve (tests): a local name
        return "local"
