"""RouteBook: what one ingress process knows of a deployment's replicas, shared between the Ray
Serve request router (which Serve builds itself, inside the handle, so it can only find the book by
name) and the ingress's RemoteEngine and metrics. No Ray, no torch.

The book holds the `ReplicaPolicy` (the decision), the requests this process has in flight on each
replica (counted as Serve routes and completes them), each replica's latest report (its queue, its
cached block hashes, its scheduler stats) and counters of the decisions, for Prometheus.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvserve.routing.replicas import ROUTE_HASH_BYTES, ReplicaDecision, ReplicaPolicy, ReplicaPolicyConfig, RouteKey

_BOOKS: dict[str, RouteBook] = {}
_BOOKS_LOCK = threading.Lock()


def route_book(name: str) -> RouteBook:
    """The book of deployment `name` in this process (made on first use, by either side)."""
    with _BOOKS_LOCK:
        book = _BOOKS.get(name)
        if book is None:
            book = _BOOKS[name] = RouteBook(name)
        return book


def drop_book(name: str) -> None:
    with _BOOKS_LOCK:
        _BOOKS.pop(name, None)


@dataclass
class ReplicaView:
    in_flight: int = 0            # requests this process sent there, not yet completed
    pending: int = 0              # requests the router picked it for, not yet accepted by it
    report: dict = field(default_factory=dict)   # the last report applied (its "seq" tells a new one)
    routed: int = 0               # requests sent there (since start; calls addressed to it not counted)

    @property
    def queue(self) -> int:
        return self.in_flight + self.pending


PENDING_TTL_S = 60.0   # a pick Serve never confirmed (the request was cancelled while it waited) is dropped


class RouteBook:
    def __init__(self, name: str, config: ReplicaPolicyConfig | None = None, report_lag_s: float = 2.0,
                 clock=time.monotonic):
        """`report_lag_s`: how old a report may be when it arrives (Serve's stats period and the
        controller's broadcast); inferred routes newer than that survive the report."""
        self.name = name
        self.lock = threading.Lock()
        self.clock = clock
        self.policy = ReplicaPolicy(config, clock=clock)
        self.report_lag_s = report_lag_s
        self.replicas: dict[str, ReplicaView] = {}
        self.decisions: Counter = Counter()      # reason -> routes
        self.matched_blocks = 0                  # leading blocks the chosen replicas were believed to hold
        self.pow2 = False                        # Ray's own router routes: the book only counts
        # Serve's internal request id -> where it is: picked (replica, when) or sent (replica).
        self._picked: dict[str, tuple[str, float]] = {}
        self._sent: dict[str, str] = {}
        self._done_early: OrderedDict[str, None] = OrderedDict()   # completions seen before their send

    def configure(self, config: ReplicaPolicyConfig, report_lag_s: float) -> None:
        with self.lock:
            if config != self.policy.config:
                self.policy = ReplicaPolicy(config, clock=self.clock)
            self.report_lag_s = report_lag_s

    # ---- what the router tells the book ---------------------------------------------------------
    def sync(self, replicas: dict[str, dict | None]) -> None:
        """The live replicas and their latest reports (Serve's routing stats); gone ones leave."""
        with self.lock:
            for name in [n for n in self.replicas if n not in replicas]:
                self._remove(name)
            now = self.clock()
            for request_id, (name, when) in list(self._picked.items()):
                if now - when > PENDING_TTL_S:
                    self._unpick(request_id)
            for name, report in replicas.items():
                view = self.replicas.setdefault(name, ReplicaView())
                cached = None
                if report and report.get("seq") != view.report.get("seq"):
                    view.report = report
                    cached = report.get("cached", b"")
                    cached = [cached[i:i + ROUTE_HASH_BYTES] for i in range(0, len(cached), ROUTE_HASH_BYTES)]
                self.policy.report(name, view.queue, cached, keep_after=now - self.report_lag_s)

    def choose(self, route: RouteKey, candidates: Sequence[str], request_id: str | None = None) -> ReplicaDecision:
        """The policy's pick, counted as pending on that replica until Serve sends the request."""
        with self.lock:
            decision = self.policy.choose(route.block_hashes, route.session, candidates)
            self.decisions[decision.reason] += 1
            self.matched_blocks += decision.matched_blocks
            if request_id is not None:
                self._unpick(request_id)   # a retry replaces the earlier pick
                self._picked[request_id] = (decision.replica, self.clock())
                self.replicas.setdefault(decision.replica, ReplicaView()).pending += 1
            return decision

    def routed(self, replica: str, request_id: str, request: bool = True) -> None:
        """Serve sent the request there (`request` False: a call addressed to the replica)."""
        with self.lock:
            self._unpick(request_id)
            view = self.replicas.setdefault(replica, ReplicaView())
            if request_id in self._done_early:   # its completion came first: nothing left in flight
                del self._done_early[request_id]
            else:
                self._sent[request_id] = replica
                view.in_flight += 1
            if request:   # counted either way: it was sent there
                view.routed += 1
                if self.pow2:
                    self.decisions["pow2"] += 1

    def completed(self, request_id: str) -> None:
        with self.lock:
            replica = self._sent.pop(request_id, None)
            if replica is None:   # completed before Serve reported it sent (or never sent): remember it
                self._unpick(request_id)
                self._done_early[request_id] = None
                while len(self._done_early) > 10_000:
                    self._done_early.popitem(last=False)
                return
            view = self.replicas.get(replica)
            if view is not None and view.in_flight > 0:
                view.in_flight -= 1

    def _unpick(self, request_id: str) -> None:
        picked = self._picked.pop(request_id, None)
        if picked is not None:
            view = self.replicas.get(picked[0])
            if view is not None and view.pending > 0:
                view.pending -= 1

    def remove(self, replica: str) -> None:
        with self.lock:
            self._remove(replica)

    def _remove(self, replica: str) -> None:
        self.replicas.pop(replica, None)
        self.policy.remove(replica)

    # ---- what the ingress reads -------------------------------------------------------------
    def names(self) -> list[str]:
        with self.lock:
            return sorted(self.replicas)

    def reports(self) -> dict[str, dict]:
        with self.lock:
            return {name: view.report for name, view in self.replicas.items() if view.report}

    def snapshot(self) -> dict:
        with self.lock:
            return {"decisions": dict(self.decisions), "matched_blocks": self.matched_blocks,
                    "replicas": {name: {"in_flight": v.in_flight, "routed": v.routed,
                                        "queue": v.report.get("queue")} for name, v in self.replicas.items()}}
