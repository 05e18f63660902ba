"""AsyncEngine: runs an Engine on a background thread; add / stream / abort from asyncio.

    asyncio side                          engine thread
    ───────────                           ─────────────
    add()   → make_request (validate)
            → commands.put(("add", req))  ─▶  apply commands (adds, aborts)
    stream  ◀── mailbox.put(merged delta) ◀─  engine.step() → RequestOutputs
    abort() → commands.put(("abort", id)) ─▶  freed before the next step

Each request has a single-slot mailbox: the engine thread merges new deltas into whatever the
consumer has not taken yet, so a slow client never stalls the loop and memory stays bounded.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from kvserve.engine.engine import Engine
from kvserve.outputs import RequestOutput
from kvserve.sampling import FinishReason, InvalidRequestError, SamplingParams
from kvserve.sched.scheduler import SchedulerStats

log = logging.getLogger(__name__)


T = TypeVar("T")


def _settle(future: asyncio.Future, result: object, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class EngineDeadError(RuntimeError):
    """The engine loop failed; the request could not be completed."""


def merge(older: RequestOutput, newer: RequestOutput) -> RequestOutput:
    logprobs = None
    if older.logprobs is not None or newer.logprobs is not None:
        logprobs = (older.logprobs or ()) + (newer.logprobs or ())
    return RequestOutput(newer.request_id, older.text + newer.text, older.token_ids + newer.token_ids,
                         logprobs, newer.finish_reason, newer.stats)


class RequestStream:
    """Async iterator of one request's RequestOutput deltas; the last one has finish_reason set."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, engine: "AsyncEngine"):
        self.request_id = request_id
        self._loop = loop
        self._engine = engine
        self._lock = threading.Lock()
        self._pending: RequestOutput | None = None
        self._error: BaseException | None = None
        self._ready = asyncio.Event()
        self._done = False

    # engine thread
    def put(self, output: RequestOutput) -> None:
        with self._lock:
            was_empty = self._pending is None
            self._pending = output if was_empty else merge(self._pending, output)
        if was_empty:
            self._loop.call_soon_threadsafe(self._ready.set)

    def fail(self, error: BaseException) -> None:
        with self._lock:
            self._error = error
        self._loop.call_soon_threadsafe(self._ready.set)

    # asyncio side
    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        await self._ready.wait()
        with self._lock:
            output, self._pending = self._pending, None
            error = self._error
            if error is None:   # an error stays signalled so the next call raises it
                self._ready.clear()
        if output is None and error is not None:
            self._done = True
            raise EngineDeadError(str(error)) from error
        assert output is not None
        if output.finished:
            self._done = True
        return output

    @property
    def finished(self) -> bool:
        return self._done

    def abort(self) -> None:
        """Cancel the request (idempotent; a no-op once it has finished)."""
        if not self._done:
            self._engine.abort(self.request_id)


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvserve-engine", daemon=True)
        self._stats = engine.stats()
        self._thread.start()

    # ---- asyncio side ------------------------------------------------------------------------
    async def add(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                  **kwargs) -> RequestStream:
        """Validate and enqueue a request. Raises InvalidRequestError at once for bad input."""
        if self._stop.is_set():
            raise EngineDeadError("the engine is shut down")
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._streams:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        request = self.engine.make_request(prompt, params, request_id, **kwargs)
        stream = RequestStream(request_id, asyncio.get_running_loop(), self)
        self._streams[request_id] = stream
        self._commands.put(("add", request))
        return stream

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    async def call(self, fn: Callable[[Engine], T]) -> T:
        """Run fn(engine) on the engine thread between steps (engine state is not thread-safe)."""
        if self._stop.is_set():
            raise EngineDeadError("the engine is shut down")
        future = asyncio.get_running_loop().create_future()
        self._commands.put(("call", (fn, future)))
        return await future

    def stats(self) -> SchedulerStats:
        """Counters as of the last step (updated by the engine thread)."""
        return self._stats

    def shutdown(self) -> None:
        self._stop.set()
        self._commands.put(("wake", None))
        self._thread.join(timeout=30)

    # ---- engine thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._apply_commands(block=not self.engine.has_unfinished)
                if self.engine.has_unfinished:
                    self._deliver(self.engine.step())
                self._stats = self.engine.stats()
            except Exception as error:  # keep serving: fail what was in flight, then go on
                log.exception("engine step failed; failing %d in-flight requests", len(self._streams))
                self._fail_all(error)
        dead = EngineDeadError("the engine was shut down")
        self._fail_all(dead)
        while True:   # answer calls still queued, so no awaiting caller hangs
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                break
            if kind == "call":
                _, future = arg
                future.get_loop().call_soon_threadsafe(_settle, future, None, dead)

    def _apply_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, arg = command
            if kind == "add":
                self.engine.add_request(arg)
            elif kind == "abort":
                output = self.engine.abort(arg)
                if output is not None:
                    self._deliver([output])
            elif kind == "call":
                self._call(*arg)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _call(self, fn: Callable[[Engine], object], future: asyncio.Future) -> None:
        loop = future.get_loop()
        try:
            result = fn(self.engine)
        except Exception as error:
            loop.call_soon_threadsafe(_settle, future, None, error)
        else:
            loop.call_soon_threadsafe(_settle, future, result, None)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            stream.put(output)
            if output.finished:
                del self._streams[output.request_id]

    def _fail_all(self, error: BaseException) -> None:
        for request_id, stream in list(self._streams.items()):
            stream.fail(error)
            try:
                self.engine.abort(request_id)
            except Exception:   # the engine is already broken; the stream has its error
                log.exception("abort of %s failed", request_id)
        self._streams.clear()


__all__ = ["AsyncEngine", "RequestStream", "EngineDeadError", "FinishReason"]
