"""RemoteEngine: an engine deployment of N replicas, seen by the ingress as one AsyncEngine.

The ingress is the ordinary kvserve server (every API, SSE, WebSocket, batch jobs, metrics); only
its engines are these. `add` tokenizes and validates here, on an `EngineFront` (the model's config
and tokenizer, no weights), keys the prompt by its block hashes exactly as the replicas' prefix
caches do, and streams the request from the replica the router picks. `stream.abort()` (the client
left, or the server drains) cancels the call, and the replica frees the request's blocks.

A replica that dies mid-request ends its requests with ReplicaLostError (503, Retry-After); Serve
restarts it, and new requests go to the survivors meanwhile. The ingress itself never fails
because a replica did: `on_fatal` listeners are not called for that.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import Callable
from typing import TypeVar

from kvserve.cluster.book import RouteBook
from kvserve.engine.async_engine import EngineDeadError
from kvserve.engine.engine import EngineFront
from kvserve.kv.manager import KVCacheStats
from kvserve.outputs import RequestOutput, RequestStats
from kvserve.kv.prefix_cache import chain_block_hashes
from kvserve.routing.replicas import ROUTING_SESSION, RouteKey, route_hashes
from kvserve.sampling import FinishReason, InvalidRequestError, SamplingParams
from kvserve.sched.scheduler import SchedulerStats

log = logging.getLogger(__name__)
T = TypeVar("T")

CALL_TIMEOUT_S = 60.0   # a call addressed to each replica in turn (cache report, flush)


class ReplicaLostError(EngineDeadError):
    """The replica running a request died (or became unreachable): the request is lost, the
    deployment is not. Answered 503 with Retry-After, like any engine that stopped."""
    code = "replica_lost"


class ReplicasUnavailableError(EngineDeadError):
    """No replica can take the request now (none running, or Serve's queues full): 503, retry."""
    code = "replicas_unavailable"


def _unwrap(error: BaseException) -> BaseException:
    """The replica's own exception out of Ray's wrapper (whose text carries a remote traceback)."""
    from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
    from ray.serve.exceptions import RayServeException, RequestCancelledError

    if isinstance(error, RayTaskError):
        cause = error.cause
        if isinstance(cause, InvalidRequestError):
            return cause
        if isinstance(cause, EngineDeadError):   # that replica's engine stopped; Serve replaces the replica
            return ReplicaLostError(f"the engine replica serving this request stopped ({cause}); retry")
        if isinstance(cause, (RayActorError, ActorUnavailableError, RayServeException)):
            error = cause
        else:
            return cause if isinstance(cause, Exception) else error
    if isinstance(error, (RayActorError, ActorUnavailableError)):
        return ReplicaLostError("the engine replica serving this request stopped before it finished; retry "
                                f"(the other replicas serve new requests) [{type(error).__name__}]")
    if isinstance(error, RequestCancelledError):
        return ReplicaLostError("the request was cancelled on its replica; retry")
    if isinstance(error, RayServeException):   # BackPressureError, DeploymentUnavailableError, ...
        return ReplicasUnavailableError(f"no engine replica can take the request now; retry [{type(error).__name__}]")
    return error


class RemoteStream:
    """A request's outputs from its replica: the AsyncEngine RequestStream's interface."""

    def __init__(self, request_id: str, num_prompt_tokens: int, quiet: bool, responses, on_end: Callable[[], None]):
        self.request_id = request_id
        self.quiet = quiet
        self._responses = responses
        self._on_end = on_end
        self._done = False
        self._aborted = False
        self._stats = RequestStats(num_prompt_tokens, 0, 0, 0)

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            output = await self._responses.__anext__()
        except StopAsyncIteration:
            self._end()
            raise
        except Exception as error:   # noqa: BLE001 - Ray's wrappers: the replica's error, or its death
            if not self._aborted:
                self._end()
                raise _unwrap(error) from None
            output = None
        if output is None:   # aborted here: the replica was told; the consumer sees the usual last output
            output = RequestOutput(self.request_id, "", (), None, FinishReason.ABORT, self._stats)
        self._stats = output.stats
        if output.finished:
            self._end()
        return output

    def _end(self) -> None:
        if not self._done:
            self._done = True
            self._on_end()   # idempotent (a pop)

    @property
    def finished(self) -> bool:
        return self._done

    def abort(self) -> None:
        """Cancel the request on its replica (idempotent; a no-op once it has finished)."""
        if not self._done and not self._aborted:
            self._aborted = True
            self._on_end()   # forgotten here now, whether or not the consumer reads again
            try:
                self._responses.cancel()
            except Exception as error:   # noqa: BLE001 - it failed before it was sent: nothing runs to cancel
                log.debug("cancelling %s: %s", self.request_id, error)


class RemoteEngine:
    def __init__(self, front: EngineFront, handle, book: RouteBook, block_size: int,
                 on_shutdown: Callable[[], None] = lambda: None):
        self.engine = front
        self._handle = handle
        self._stream_handle = handle.options(stream=True)
        self.book = book
        self.block_size = block_size
        self._on_shutdown = on_shutdown
        self._streams: dict[str, RemoteStream] = {}
        self._stopped = False
        self.error: BaseException | None = None

    @property
    def replicas(self) -> int:
        """Live replicas (at least one: capacity is counted in them)."""
        return max(1, len(self.book.names()))

    async def add(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                  quiet: bool = False, **options) -> RemoteStream:
        self._raise_if_ended()
        if not self.book.names():
            raise ReplicasUnavailableError("no engine replica is running (Serve is starting replacements); retry")
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._streams:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        request = self.engine.make_request(prompt, params, request_id, **options)
        # The replica's prefix cache keys (its KV manager's rule; cache_salt is already the tenant's namespace).
        hashes = chain_block_hashes([], request.prompt_token_ids, self.block_size, request.cache_salt)
        route = RouteKey(route_hashes(hashes), ROUTING_SESSION.get())
        responses = self._stream_handle.generate.remote(request.prompt_token_ids, params, request_id, quiet,
                                                        options, route=route)
        stream = RemoteStream(request_id, len(request.prompt_token_ids), quiet, responses,
                              lambda: self._streams.pop(request_id, None))
        self._streams[request_id] = stream
        return stream

    def _raise_if_ended(self) -> None:
        if self._stopped:
            raise EngineDeadError("the engine deployment has been shut down")

    @property
    def alive(self) -> bool:
        return not self._stopped

    def on_fatal(self, listener: Callable[[BaseException], None]) -> None:
        """A replica's death is not the ingress's: Serve replaces the replica. Nothing to tell."""

    def abort(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.abort()

    async def call(self, fn: Callable[[object], T]):
        """fn(engine) on every replica: dicts come back as {"replicas": {name: result}}, numbers summed."""
        results = await self.call_each(fn)
        values = list(results.values())
        if values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return sum(values)
        return {"replicas": results}

    async def call_each(self, fn: Callable[[object], T]) -> dict[str, T]:
        self._raise_if_ended()
        results: dict[str, T] = {}
        for name in self.book.names():
            try:
                replica, value = await asyncio.wait_for(
                    self._handle.call.remote(fn, route=RouteKey(target=name)), CALL_TIMEOUT_S)
            except Exception as error:   # noqa: BLE001 - a replica gone meanwhile: the others answer
                log.warning("replica %s did not answer a call: %s", name, _unwrap(error))
                continue
            results[replica] = value
        return results

    def stats(self) -> SchedulerStats:
        """The replicas' latest reported stats, summed (maxima for the since-start maxima)."""
        reported = [stats_from_dict(r["stats"]) for r in self.book.reports().values() if "stats" in r]
        return sum_stats(reported)

    def shutdown(self) -> None:
        if not self._stopped:
            self._stopped = True
            for stream in list(self._streams.values()):
                stream.abort()
            self._on_shutdown()


def stats_from_dict(values: dict) -> SchedulerStats:
    """A replica's reported stats (plain values, as dataclasses.asdict gave them). In a rolling
    upgrade a replica may run another kvserve: a field this one does not know is dropped, and one
    it lacks takes its default (0 where none is declared), rather than breaking /metrics."""
    return SchedulerStats(**_known(SchedulerStats, {**values, "kv": KVCacheStats(**_known(KVCacheStats, values["kv"]))}))


def _known(cls, values: dict) -> dict:
    fields = dataclasses.fields(cls)
    return {f.name: values.get(f.name, 0) for f in fields
            if f.name in values or (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)}


def sum_stats(stats: list[SchedulerStats]) -> SchedulerStats:
    kv = KVCacheStats(**{f.name: sum(getattr(s.kv, f.name) for s in stats) for f in dataclasses.fields(KVCacheStats)})
    fields = {}
    for f in dataclasses.fields(SchedulerStats):
        values = [getattr(s, f.name) for s in stats]
        if f.name == "kv":
            fields[f.name] = kv
        elif f.name == "tenant_tokens":
            merged: dict | None = None
            for value in values:
                if value:
                    merged = merged or {}
                    for tenant, tokens in value.items():
                        merged[tenant] = merged.get(tenant, 0) + tokens
            fields[f.name] = merged
        elif f.name.startswith("max_"):
            fields[f.name] = max(values, default=f.default)
        else:
            fields[f.name] = sum(values)
    return SchedulerStats(**fields)
