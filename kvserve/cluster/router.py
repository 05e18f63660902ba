"""The Ray Serve request routers of kvserve's engine deployments (Serve's public alpha
`RequestRouter` API). Serve builds one inside each handle, in the ingress process; both find that
process's `RouteBook` by the deployment's name (`request_router_kwargs["book"]`).

- `KVPrefixRouter` (the default, `--replica-router kv`): the decision is `ReplicaPolicy`'s
  (kvserve/routing/replicas.py: sticky session, queue-imbalance guard, the longest cached prefix of
  the request's block hashes, power of two choices); the replica it picks is ranked first, the others
  after it, so that Serve still falls back when that replica is at `max_ongoing_requests`.
- `Pow2Router` (`--replica-router pow2`): Ray's own power-of-two-choices router, unchanged, keeping
  the book's counts (the baseline the cache-aware router is measured against).

Both send a call addressed to one replica (`RouteKey.target`: the ingress asks every replica in turn
for its cache report, say) to that replica. The request's `RouteKey` is the `route` keyword of the
handle call. Queues are counted here, per process, as Serve routes and completes requests; cached
hashes come from the replicas' routing stats (`EngineReplica.record_routing_stats`).
"""

from __future__ import annotations

from typing import Any

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from kvserve.cluster.book import route_book
from kvserve.routing.replicas import ReplicaPolicyConfig, RouteKey


def _route(pending_request: PendingRequest | None) -> RouteKey:
    route = pending_request.kwargs.get("route") if pending_request is not None else None
    return route if isinstance(route, RouteKey) else RouteKey()


def _targeted(route: RouteKey, candidates: list[RunningReplica]) -> list[list[RunningReplica]] | None:
    """A call addressed to one replica goes there (or, if that one is gone, anywhere: the answer says
    which replica ran it)."""
    if route.target is None:
        return None
    chosen = [r for r in candidates if r.replica_id.unique_id == route.target]
    return [chosen] if chosen else [candidates]


class _BookMixin:
    """Keeps the process's RouteBook of this deployment in step with Serve's view."""

    def _open_book(self, book: str, pow2: bool, **config: Any) -> None:
        self.book = route_book(book)
        self.book.pow2 = pow2
        report_lag_s = config.pop("report_lag_s", 2.0)
        self.book.configure(ReplicaPolicyConfig(**config), report_lag_s)

    def _sync(self) -> None:
        """Every replica Serve knows (not only this request's candidates) and its latest report."""
        self.book.sync({r.replica_id.unique_id: r.routing_stats for r in self.curr_replicas.values()})

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self.book.sync({r.replica_id.unique_id: r.routing_stats for r in replicas})

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.book.remove(replica_id.unique_id)

    # Serve may report a completion before the send (its hook is armed first), and a request picked
    # for one replica may be sent to another (the first was full) or cancelled while it waits: the
    # book counts by Serve's internal request id, so none of these leaves a count behind.
    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        self.book.routed(replica_id.unique_id, pending_request.metadata.internal_request_id,
                         request=_route(pending_request).target is None)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self.book.completed(internal_request_id)


class KVPrefixRouter(_BookMixin, RequestRouter):
    def initialize_state(self, book: str = "default", **config: Any) -> None:
        self._open_book(book, pow2=False, **config)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        route = _route(pending_request)
        targeted = _targeted(route, candidate_replicas)
        if targeted is not None:
            return targeted
        self._sync()
        by_name = {r.replica_id.unique_id: r for r in candidate_replicas}
        request_id = pending_request.metadata.internal_request_id if pending_request is not None else None
        decision = self.book.choose(route, list(by_name), request_id)
        chosen = by_name[decision.replica]
        return [[chosen], [r for r in candidate_replicas if r is not chosen]]


class Pow2Router(_BookMixin, PowerOfTwoChoicesRequestRouter):
    def initialize_state(self, book: str = "default", **config: Any) -> None:
        super().initialize_state()
        self._open_book(book, pow2=True, **config)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        targeted = _targeted(_route(pending_request), candidate_replicas) if candidate_replicas else None
        if targeted is not None:
            return targeted
        self._sync()
        return await super().choose_replicas(candidate_replicas, pending_request)
