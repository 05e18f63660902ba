"""The autoscaling policy of an engine deployment (`--min-replicas`/`--max-replicas`): Serve's
controller calls it with the replicas' own engine signals, which each replica reports through
`record_autoscaling_stats` (replica.py): requests waiting for admission, requests running, and the
fraction of KV blocks in use. No Ray import: Serve passes an AutoscalingContext, read by duck typing.

Why not Serve's default (ongoing requests per replica): an engine batches, so the requests a replica
holds say little about whether it is saturated. It is saturated when requests wait for admission
(its batch or its KV pool is full) or when its KV pool is nearly full (the next long prompt will
wait, or preempt). So:

    want = replicas × max(waiting per replica / target_waiting, KV usage / target_kv_usage)
    up   when want > replicas (rounded up: one waiting request too many is one replica more)
    down by one when nothing waits, at most one request runs per replica that would remain, and the
         KV usage would still be under target with one replica fewer (spread over replicas - 1);
         a replica scaled down finishes what it runs first (deploy.py: graceful_shutdown_timeout_s)

Serve then applies min/max replicas and its upscale/downscale delays (the decision must hold that
long), so a burst does not flap the deployment.
"""

from __future__ import annotations

import math

WAITING = "kvserve_waiting"
RUNNING = "kvserve_running"
KV_USAGE = "kvserve_kv_usage"


class EnginePressurePolicy:
    def __init__(self, target_waiting: float = 2.0, target_kv_usage: float = 0.8):
        if target_waiting <= 0 or not 0 < target_kv_usage <= 1:
            raise ValueError("autoscaling: target_waiting > 0 and 0 < target_kv_usage <= 1")
        self.target_waiting = target_waiting
        self.target_kv_usage = target_kv_usage

    def __call__(self, ctx) -> tuple[int, dict]:
        replicas = ctx.current_num_replicas
        metrics = ctx.aggregated_metrics or {}
        if replicas == 0:   # scaled to zero: one replica as soon as anything asks
            return (1 if ctx.total_num_requests > 0 else 0), {}
        waiting = sum(metrics.get(WAITING, {}).values())
        running = sum(metrics.get(RUNNING, {}).values())
        usages = list(metrics.get(KV_USAGE, {}).values())
        usage = sum(usages) / len(usages) if usages else 0.0
        return self.desired(replicas, waiting, usage, running), {}

    def desired(self, replicas: int, waiting: float, kv_usage: float, running: float = 0.0) -> int:
        pressure = max(waiting / (replicas * self.target_waiting), kv_usage / self.target_kv_usage)
        if pressure > 1:
            return math.ceil(replicas * pressure)
        if replicas > 1 and waiting == 0 and running <= replicas - 1 \
                and kv_usage * replicas / (replicas - 1) < self.target_kv_usage:
            return replicas - 1
        return replicas
