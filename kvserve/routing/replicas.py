"""Which engine replica gets a request: the cache-aware policy for scale-out. Pure Python (no torch,
no Ray): the Ray Serve request router calls it with what it knows of each replica.

A request is keyed by its prompt's block hashes, computed exactly as the engine computes them
(`request_block_hashes`: chained over 16-token blocks, the first one salted with the cache
namespace of its tenant and `cache_salt`), so a match here is a match in the replica's prefix
cache, and one tenant's prefix never draws another tenant's requests. For each replica the policy knows:

- the hashes the replica reports as cached (its prefix cache, sent with its load), and
- the hashes of the requests routed to it since (inferred: it will have cached them), each
  forgotten `decay_s` after it was last routed there, or when the replica reports again;
- its queue: requests in flight there, as reported or counted.

The decision, in order:

    1. sticky session   the session key (x-session-id, prompt_cache_key) maps to a live replica
                        whose queue is within `imbalance_threshold` of the shortest → that replica
    2. imbalance        the longest queue exceeds the shortest by more than `imbalance_threshold`
                        → power of two choices (two replicas at random, the shorter queue)
    3. prefix           some replica holds at least `min_match_blocks` leading blocks → the one
                        with the longest match (ties: shorter queue, then the lower id)
    4. balance          otherwise → power of two choices

Why this shape, against the routers it could have been:
- SGLang's model gateway and Ray Serve's PrefixCacheAffinityRouter keep a prefix tree of the
  request *text* per replica, inferred from what they routed. Text is not what the cache holds:
  two chat templates or tokenizations of the same text differ, and text carries no tenant, so a
  tree over text can send tenant B to the replica holding tenant A's identical prompt, where it
  cannot hit. Block hashes are what the engine looks up, salt included.
- NVIDIA Dynamo's KV router reads the workers' own cache events, and weighs overlap against active
  blocks in a cost. Reports here play the part of those events (and survive evictions the router
  could not see); the inferred entries cover the time between two reports.
- The load guard is Ray's: imbalance first, then prefix affinity, with power of two choices. A
  weighted cost (Dynamo) needs per-machine tuning; a queue threshold is one number to read in the
  metrics and set.

The thresholds are the fields of `ReplicaPolicyConfig` (their meaning is noted beside each).
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from contextvars import ContextVar
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from kvserve.kv.prefix_cache import cache_namespace, chain_block_hashes


ROUTE_HASH_BYTES = 8   # the prefix of a block hash that routes carry and replicas report (a hint, not a key)

# The session a request belongs to (x-session-id, or the body's prompt_cache_key), set by the HTTP
# layer for the request's task; a scale-out engine reads it when it routes the request.
ROUTING_SESSION: ContextVar[str | None] = ContextVar("kvserve_routing_session", default=None)


def request_block_hashes(token_ids: Sequence[int], block_size: int, tenant: str | None = None,
                         cache_salt: str | None = None) -> list[bytes]:
    """The keys the engine gives a prompt of `tenant` (and its request's `cache_salt`)."""
    return chain_block_hashes([], token_ids, block_size, cache_namespace(tenant, cache_salt))


def route_hashes(block_hashes: Iterable[bytes]) -> tuple[bytes, ...]:
    """Block hashes as routes carry them: their first ROUTE_HASH_BYTES bytes (a 64-bit hint keeps
    reports small; a collision costs one misrouted request, never a wrong answer)."""
    return tuple(h[:ROUTE_HASH_BYTES] for h in block_hashes)


@dataclass(frozen=True)
class RouteKey:
    """What the router reads off a request: its block hashes (route_hashes), its session, or a
    replica it must go to (`target`: calls addressed to every replica in turn)."""
    block_hashes: tuple[bytes, ...] = ()
    session: str | None = None
    target: str | None = None


@dataclass(frozen=True)
class ReplicaPolicyConfig:
    imbalance_threshold: int = 4      # queue lengths further apart than this: balance load first
    min_match_blocks: int = 1         # a shorter leading match is no prefix hit
    decay_s: float = 600.0            # an inferred entry lasts this long after its last route
    session_ttl_s: float = 3600.0     # a sticky session is forgotten this long after its last use
    max_sessions: int = 100_000

    def __post_init__(self) -> None:
        if self.imbalance_threshold < 0 or self.min_match_blocks < 1 or self.decay_s <= 0 or self.session_ttl_s <= 0:
            raise ValueError("replica routing: imbalance_threshold >= 0, min_match_blocks >= 1, "
                             "decay_s and session_ttl_s > 0")


@dataclass(frozen=True)
class ReplicaDecision:
    replica: str
    reason: str                 # "session", "imbalance", "prefix" or "balance"
    matched_blocks: int         # leading blocks the chosen replica is believed to hold


@dataclass
class _Replica:
    queue: int = 0
    reported: frozenset = frozenset()
    inferred: OrderedDict = field(default_factory=OrderedDict)   # block hash -> last routed here, oldest first


class ReplicaPolicy:
    def __init__(self, config: ReplicaPolicyConfig | None = None, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.config = config or ReplicaPolicyConfig()
        self.rng = rng or random.Random(0)
        self.clock = clock
        self.replicas: dict[str, _Replica] = {}
        self._sessions: OrderedDict[str, tuple[str, float]] = OrderedDict()   # key -> (replica, last use), LRU first

    # ---- what the router learns ----------------------------------------------------------------
    def report(self, replica: str, queue: int, cached: Iterable[bytes] | None = None,
               keep_after: float | None = None) -> None:
        """A replica's own state: requests in flight, and (when sent) the hashes it holds cached,
        which replace what was inferred for it. `keep_after`: inferred entries routed after this
        time (on the policy's clock) are newer than the report, and stay."""
        state = self.replicas.setdefault(replica, _Replica())
        state.queue = queue
        if cached is not None:
            state.reported = frozenset(cached)
            if keep_after is None:
                state.inferred.clear()
            while state.inferred:
                block_hash, seen = next(iter(state.inferred.items()))
                if seen >= keep_after:
                    break
                del state.inferred[block_hash]

    def remove(self, replica: str) -> None:
        """A replica is gone (scaled down or dead): nothing routes to it, its sessions move."""
        self.replicas.pop(replica, None)

    def finished(self, replica: str) -> None:
        """A request routed to `replica` ended (the queue as counted between reports)."""
        state = self.replicas.get(replica)
        if state is not None and state.queue > 0:
            state.queue -= 1

    # ---- the decision --------------------------------------------------------------------------
    def matched(self, replica: str, block_hashes: Sequence[bytes]) -> int:
        """Leading blocks of `block_hashes` the replica is believed to hold."""
        state = self.replicas[replica]
        horizon = self.clock() - self.config.decay_s
        n = 0
        for block_hash in block_hashes:
            if block_hash in state.reported or state.inferred.get(block_hash, float("-inf")) >= horizon:
                n += 1
            else:
                break
        return n

    def choose(self, block_hashes: Sequence[bytes], session: str | None = None,
               candidates: Iterable[str] | None = None) -> ReplicaDecision:
        """Pick a replica among `candidates` (default: every known one) and record the route."""
        names = sorted(self.replicas if candidates is None else [c for c in candidates if c in self.replicas])
        if not names:
            raise LookupError("no replica to route to")
        queues = {name: self.replicas[name].queue for name in names}
        shortest = min(queues.values())
        now = self.clock()
        decision = None
        if session is not None and session in self._sessions:
            replica, last = self._sessions[session]
            if replica in queues and now - last <= self.config.session_ttl_s \
                    and queues[replica] - shortest <= self.config.imbalance_threshold:
                decision = ReplicaDecision(replica, "session", self.matched(replica, block_hashes))
        if decision is None and max(queues.values()) - shortest > self.config.imbalance_threshold:
            replica = self._two_choices(names, queues)
            decision = ReplicaDecision(replica, "imbalance", self.matched(replica, block_hashes))
        if decision is None:
            matches = {name: self.matched(name, block_hashes) for name in names}
            best = max(matches.values())
            if best >= self.config.min_match_blocks:
                replica = min((n for n in names if matches[n] == best), key=lambda n: (queues[n], n))
                decision = ReplicaDecision(replica, "prefix", best)
            else:
                replica = self._two_choices(names, queues)
                decision = ReplicaDecision(replica, "balance", matches[replica])
        self._record(decision.replica, block_hashes, session, now)
        return decision

    def _two_choices(self, names: list[str], queues: dict[str, int]) -> str:
        pair = self.rng.sample(names, 2) if len(names) > 1 else names
        return min(pair, key=lambda n: queues[n])          # a tie goes to the first drawn: new prefixes spread

    def _record(self, replica: str, block_hashes: Sequence[bytes], session: str | None, now: float) -> None:
        state = self.replicas[replica]
        state.queue += 1
        for block_hash in block_hashes:
            state.inferred[block_hash] = now
            state.inferred.move_to_end(block_hash)
        horizon = now - self.config.decay_s
        while state.inferred:                        # the oldest first: stale entries leave in O(1) each
            block_hash, seen = next(iter(state.inferred.items()))
            if seen >= horizon:
                break
            del state.inferred[block_hash]
        if session is not None:
            self._sessions[session] = (replica, now)
            self._sessions.move_to_end(session)
            while len(self._sessions) > self.config.max_sessions:
                self._sessions.popitem(last=False)
