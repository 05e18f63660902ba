"""Waiting-queue orderings, one small class each. A policy decides who is admitted next and in
which order running requests are served (the last is preempted first); the scheduler does the rest.
Every policy runs in two lanes (`Lanes`): foreground requests, then background ones (batch jobs).
The cache-aware order needs the KV cache's state, so the scheduler applies it (cache_aware_order)
over a first-come queue."""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable, Iterator
from typing import Protocol

from kvserve.request import Request


class SchedulingPolicy(Protocol):
    def add(self, request: Request) -> None: ...
    def requeue(self, request: Request) -> None:
        """A preempted request comes back to wait."""
    def peek(self) -> Request: ...
    def pop(self) -> Request: ...
    def remove(self, request: Request) -> None: ...
    def order_running(self, running: list[Request]) -> None:
        """Sort running requests in place, most important first: the scheduler serves them in
        this order and preempts from the end, so a victim is never one already served this step."""
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[Request]: ...


class FCFSPolicy:
    """First come, first served. A preempted request goes back to the front of the queue, and the
    most recently admitted running request is preempted first."""

    def __init__(self) -> None:
        self._queue: deque[Request] = deque()

    def add(self, request: Request) -> None:
        self._queue.append(request)

    def requeue(self, request: Request) -> None:
        self._queue.appendleft(request)

    def peek(self) -> Request:
        return self._queue[0]

    def pop(self) -> Request:
        return self._queue.popleft()

    def remove(self, request: Request) -> None:
        self._queue.remove(request)

    def order_running(self, running: list[Request]) -> None:
        return None   # admission order already

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._queue)


class PriorityPolicy:
    """Lower `priority` values first (as vLLM), then arrival order. Running requests are served in
    the same order, so the one preempted first has the highest priority value, the most recently
    arrived among equals.

    The queue is kept sorted; requests are few enough (bounded by --max-queued-requests) that
    an insertion by bisection is cheaper than a heap with lazy removal.
    """

    def __init__(self) -> None:
        self._queue: list[tuple[int, float, int, Request]] = []
        self._counter = 0

    @staticmethod
    def _key(request: Request) -> tuple[int, float]:
        return request.priority, request.arrival_time

    def add(self, request: Request) -> None:
        self._counter += 1
        bisect.insort(self._queue, (*self._key(request), self._counter, request), key=lambda e: e[:3])

    def requeue(self, request: Request) -> None:
        self.add(request)   # its arrival time keeps its place among equals

    def peek(self) -> Request:
        return self._queue[0][3]

    def pop(self) -> Request:
        return self._queue.pop(0)[3]

    def remove(self, request: Request) -> None:
        for i, entry in enumerate(self._queue):
            if entry[3] is request:
                del self._queue[i]
                return
        raise ValueError(f"{request.request_id} is not waiting")

    def order_running(self, running: list[Request]) -> None:
        running.sort(key=self._key)

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[Request]:
        return iter([entry[3] for entry in self._queue])


class Lanes:
    """Foreground before background: one queue of the policy's kind per lane. A background request
    (a batch job's line) is admitted only behind every waiting foreground request, and running
    ones are served after, so preempted before, every foreground one."""

    def __init__(self, make: type) -> None:
        self._foreground: SchedulingPolicy = make()
        self._background: SchedulingPolicy = make()

    def _lane(self, request: Request) -> SchedulingPolicy:
        return self._background if request.background else self._foreground

    def add(self, request: Request) -> None:
        self._lane(request).add(request)

    def requeue(self, request: Request) -> None:
        self._lane(request).requeue(request)

    def peek(self) -> Request:
        return (self._foreground or self._background).peek()

    def pop(self) -> Request:
        return (self._foreground or self._background).pop()

    def remove(self, request: Request) -> None:
        self._lane(request).remove(request)

    def order_running(self, running: list[Request]) -> None:
        self._foreground.order_running(running)
        running.sort(key=lambda request: request.background)   # stable: each lane keeps its order

    def foreground(self) -> Iterator[Request]:
        return iter(self._foreground)

    def __len__(self) -> int:
        return len(self._foreground) + len(self._background)

    def __iter__(self) -> Iterator[Request]:
        yield from self._foreground
        yield from self._background


def cache_aware_order(requests: list[Request], now: float, cached_tokens: Callable[[Request], int],
                      service_s: Callable[[Request, int], float], aging_factor: float) -> list[Request]:
    """The cache-aware order, with aging (the scheduler supplies cache state and service estimates).

    Each request has an estimated service time S (its uncached prompt tokens at the measured
    prefill speed, plus its output at the measured decode step time; cached or in-flight prefix
    tokens cost nothing) and a deadline, arrival + aging_factor × S.

      - Requests past their deadline come first, earliest deadline first.
      - The others go by the longest cached prefix first (tokens cached, or being computed right
        now by a running request, so that a group sharing a prefix follows the request computing
        it), then by highest response ratio, (wait + S) / S (HRRN), then by arrival.

    The bound (docs/scheduling.md): a request is passed over only by requests whose deadline is
    earlier, once its own has passed. Its queue time is therefore at most aging_factor × S plus
    the time to serve the requests with earlier deadlines that wait beside it, which on a server
    below saturation is the queueing FCFS would give them too."""
    overdue, rest = [], []
    for request in requests:
        cached = cached_tokens(request)
        service = max(service_s(request, cached), 1e-3)
        deadline = request.arrival_time + aging_factor * service
        if now >= deadline:
            overdue.append((deadline, request.arrival_time, id(request), request))
        else:
            ratio = (now - request.arrival_time + service) / service
            rest.append((-cached, -ratio, request.arrival_time, id(request), request))
    overdue.sort(key=lambda e: e[:3])
    rest.sort(key=lambda e: e[:4])
    return [entry[-1] for entry in overdue] + [entry[-1] for entry in rest]


POLICIES = {"fcfs": FCFSPolicy, "priority": PriorityPolicy, "cache-aware": FCFSPolicy}


def make_policy(name: str) -> Lanes:
    return Lanes(POLICIES[name])
