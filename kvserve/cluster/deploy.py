"""`kvserve serve --replicas N`: each served model becomes a Ray Serve application with one
deployment of N engine replicas (replica.py), routed by kvserve's request router (router.py); the
serving process stays the ingress (every API, its limits and its drain) and holds a RemoteEngine
(remote.py) per model. Ray is imported here and only here (and in router.py and remote.py).

Ray: `--ray-address ADDR` joins a running cluster (`ray start --head` on one node, `ray start
--address=HEAD:6379` on the others); without it a local instance is started, and stopped at exit.
Serve's HTTP proxy is not started: the kvserve server is the HTTP front, with its own limits.

Replicas get `--replica-cpus` CPUs each (Ray sets their OMP_NUM_THREADS to it) and, where the cluster
has GPUs and the engine is not pinned to the CPU, one GPU each.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from kvserve.config import EngineConfig
from kvserve.routing.replicas import ReplicaPolicyConfig

log = logging.getLogger(__name__)

APP_PREFIX = "kvserve-"


@dataclass(frozen=True)
class ClusterConfig:
    replicas: int = 1
    ray_address: str | None = None
    min_replicas: int | None = None         # with max_replicas: autoscaling between them
    max_replicas: int | None = None
    replica_cpus: float = 1.0
    replica_gpus: float | None = None       # None: 1 where the cluster has GPUs and the device is not cpu
    router: str = "kv"                      # "kv" (kvserve's cache-aware router) or "pow2" (Ray's)
    imbalance_threshold: int = 4
    min_match_blocks: int = 1
    decay_s: float = 600.0
    session_ttl_s: float = 3600.0
    stats_period_s: float = 1.0             # how often replicas report their cache and load
    max_ongoing_requests: int | None = None  # per replica; None: the engine's max_num_seqs × 4
    local_cpus: int | None = None           # the local Ray instance's CPUs (None: all)
    attach: bool = False                    # serve a deployment another kvserve started; deploy nothing
    start_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError("--replicas must be at least 1")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("--min-replicas and --max-replicas go together")
        if self.min_replicas is not None and not 0 <= self.min_replicas <= self.replicas <= self.max_replicas:
            raise ValueError("autoscaling needs 0 <= --min-replicas <= --replicas <= --max-replicas")
        if self.attach and self.ray_address is None:
            raise ValueError("--attach needs --ray-address (the cluster whose deployment to serve)")
        if self.router not in ("kv", "pow2"):
            raise ValueError("--replica-router: kv or pow2")
        if self.replica_cpus <= 0 or self.stats_period_s <= 0:
            raise ValueError("--replica-cpus and the stats period must be positive")
        ReplicaPolicyConfig(self.imbalance_threshold, self.min_match_blocks, self.decay_s, self.session_ttl_s)

    @property
    def policy_kwargs(self) -> dict:
        return {"imbalance_threshold": self.imbalance_threshold, "min_match_blocks": self.min_match_blocks,
                "decay_s": self.decay_s, "session_ttl_s": self.session_ttl_s,
                "report_lag_s": 2 * self.stats_period_s}


class Cluster:
    """The Ray connection and the Serve applications this process deployed; `stop` removes them
    (and stops Ray if this process started it)."""

    def __init__(self, config: ClusterConfig):
        import ray
        from ray import serve

        self.config = config
        self.started_ray = False
        if not ray.is_initialized():
            kwargs = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": False}
            if config.ray_address is None:   # "local": a new instance, never one RAY_ADDRESS or `ray start` left
                kwargs["num_cpus"] = config.local_cpus
                self.started_ray = True
            ray.init(address=config.ray_address or "local", **kwargs)
        serve.start(proxy_location="Disabled")
        self.apps: list[str] = []
        self._lock = threading.Lock()   # deploys run on the loading thread, removals on the server's
        self._stopped = False

    def deploy(self, name: str, engine_config: EngineConfig, faults: dict[str, int] | None = None):
        """One model's deployment, started and ready; its RemoteEngine."""
        import ray
        from ray import serve
        from ray.serve.config import RequestRouterConfig

        from kvserve.cluster.replica import EngineReplica

        config = self.config
        engine_config = portable(engine_config)
        app = APP_PREFIX + name
        if config.attach:   # another front's deployment: route to it, never redeploy or delete it
            try:
                handle = serve.get_deployment_handle("engine", app_name=app)
            except Exception as error:   # noqa: BLE001 - Serve says why (no such application, ...)
                raise ValueError(f"--attach: no kvserve deployment {app!r} on this cluster ({error})") from None
            return self._remote(handle, app, engine_config, on_shutdown=lambda: None)
        gpus = config.replica_gpus
        if gpus is None:
            gpus = 1.0 if engine_config.device != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        total = ray.cluster_resources()
        for resource, each in (("CPU", config.replica_cpus), ("GPU", gpus)):
            if each and config.replicas * each > total.get(resource, 0):   # Serve would wait without a word
                log.warning("%s: %d replicas × %g %s = %g, but the cluster has %g %s now; the replicas that do not "
                            "fit wait until nodes join (see `ray status`)", app, config.replicas, each, resource,
                            config.replicas * each, total.get(resource, 0), resource)
        router = "kvserve.cluster.router:" + ("KVPrefixRouter" if config.router == "kv" else "Pow2Router")
        options = dict(
            name="engine",
            ray_actor_options={"num_cpus": config.replica_cpus, "num_gpus": gpus},
            max_ongoing_requests=config.max_ongoing_requests or 4 * engine_config.scheduler.max_num_seqs,
            # A replica scaled down or redeployed finishes what it runs first (up to a minute).
            health_check_period_s=2.0, health_check_timeout_s=30.0, graceful_shutdown_timeout_s=60.0,
            request_router_config=RequestRouterConfig(
                request_router_class=router, request_router_kwargs={"book": app, **config.policy_kwargs},
                request_routing_stats_period_s=config.stats_period_s, request_routing_stats_timeout_s=10.0),
        )
        if config.min_replicas is not None:
            options["autoscaling_config"] = {
                "min_replicas": config.min_replicas, "max_replicas": config.max_replicas,
                "initial_replicas": config.replicas, "upscale_delay_s": 10.0, "downscale_delay_s": 120.0,
                "policy": {"policy_function": "kvserve.cluster.autoscale:EnginePressurePolicy"}}
        else:
            options["num_replicas"] = config.replicas
        deployment = serve.deployment(EngineReplica).options(**options)
        log.info("deploying %s: %s replica(s) of %s", app, config.replicas, engine_config.model or "the default model")
        with self._lock:
            self.apps.append(app)   # first: a deploy that fails is still removed at stop
        handle = serve.run(deployment.bind(engine_config, faults or {}), name=app, route_prefix=None)
        return self._remote(handle, app, engine_config, on_shutdown=lambda: self.remove(app))

    def _remote(self, handle, app: str, engine_config: EngineConfig, on_shutdown):
        from kvserve.cluster.book import route_book
        from kvserve.cluster.remote import RemoteEngine
        from kvserve.engine.engine import EngineFront, context_limit
        from kvserve.model.checkpoint import load_checkpoint

        description = handle.describe.remote().result(timeout_s=self.config.start_timeout_s)
        checkpoint = load_checkpoint(engine_config.model, seed=engine_config.seed, weights=False)
        max_model_len = min(description["max_model_len"], context_limit(engine_config, checkpoint.config))
        front = EngineFront(engine_config, checkpoint.config, checkpoint.tokenizer, max_model_len)
        return RemoteEngine(front, handle, route_book(app), description["block_size"], on_shutdown=on_shutdown)

    def remove(self, app: str) -> None:
        from ray import serve

        from kvserve.cluster.book import drop_book

        with self._lock:
            if app not in self.apps:
                return
            self.apps.remove(app)
            last = not self.apps
        try:
            serve.delete(app, _blocking=True)
        except Exception as error:   # noqa: BLE001 - Ray already gone: nothing left to remove
            log.warning("removing %s: %s", app, error)
        drop_book(app)
        if last:
            self.stop()

    def stop(self) -> None:
        import ray
        from ray import serve

        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            apps = list(self.apps)
        for app in apps:
            self.remove(app)
        if self.started_ray:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()


def portable(config: EngineConfig) -> EngineConfig:
    """Paths made absolute: a replica's working directory is Ray's, not this process's."""
    model = config.model
    if model is not None and not model.startswith("random:") and Path(model).exists():
        model = str(Path(model).resolve())
    cache = config.cache
    if cache.disk_dir is not None:
        cache = dataclasses.replace(cache, disk_dir=str(Path(cache.disk_dir).resolve()))
    return config.replace(model=model, cache=cache)
