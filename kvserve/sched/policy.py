"""Waiting-queue orderings, one small class each. A policy decides who is admitted next and who
is preempted first; the scheduler does the rest."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Protocol

from kvserve.request import Request


class SchedulingPolicy(Protocol):
    def add(self, request: Request) -> None: ...
    def requeue(self, request: Request) -> None:
        """A preempted request comes back to wait."""
    def peek(self) -> Request: ...
    def pop(self) -> Request: ...
    def remove(self, request: Request) -> None: ...
    def preemption_victim(self, running: list[Request]) -> Request: ...
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

    def preemption_victim(self, running: list[Request]) -> Request:
        return running[-1]

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._queue)


POLICIES = {"fcfs": FCFSPolicy}


def make_policy(name: str) -> SchedulingPolicy:
    return POLICIES[name]()
