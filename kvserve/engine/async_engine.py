"""AsyncEngine: runs an Engine on a background thread; add / stream / abort from asyncio.

    asyncio side                          engine thread
    ───────────                           ─────────────
    add()   → make_request (validate)
            → commands.put(("add", req))  ─▶  apply commands (adds, aborts)
    stream  ◀── mailbox.put(merged delta) ◀─  engine.step() → RequestOutputs
    abort() → commands.put(("abort", id)) ─▶  freed before the next step

Each request has a single-slot mailbox: the engine thread merges new deltas into whatever the
consumer has not taken yet, so a slow client never stalls the loop and memory stays bounded. A
quiet stream (a consumer that wants only the whole answer, such as a batch line) is woken only by
its last output: the asyncio side then does no work per step at all, which on a 2-core machine
keeps it from contending with the engine thread for the GIL and the cores.

Failure: a request the engine cannot run fails alone (EngineCore isolates it; its stream ends
with FinishReason.ERROR). Anything else that escapes a step is fatal: every stream in flight gets
EngineDeadError at once, later adds and calls raise it, and the `on_fatal` listeners are told
(the server turns /health to 503 and exits non-zero, so that a supervisor restarts it). Once the
loop has ended no add can slip in unanswered: registration and the loop's end share a lock.
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
from kvserve.engine.heap import IdleTrimmer
from kvserve.outputs import RequestOutput, merge
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


class RequestStream:
    """Async iterator of one request's RequestOutput deltas; the last one has finish_reason set."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, engine: "AsyncEngine", quiet: bool = False):
        self.request_id = request_id
        self.quiet = quiet
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
        if (was_empty and not self.quiet) or (self.quiet and output.finished):
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
    def __init__(self, engine: Engine | Callable[[], Engine]):
        """`engine`, or a function that builds one: it is then built on the engine thread itself.

        Prefer the function. libgomp throttles its workers' spin-waiting once a process holds more
        OpenMP threads than CPUs, and a thread that ran parallel torch ops keeps its team until it
        exits: an engine stepped on one thread after its model was loaded on another that lives on
        (the main thread of `kvserve batch`, say) ran 35% slower on 2 cores (bf16 matmuls 1.8x)."""
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()                  # registration vs the loop's end (see module doc)
        self._ended: EngineDeadError | None = None     # set once the loop has ended, under _lock
        self.error: BaseException | None = None        # what killed the loop, if it died
        self._fatal_listeners: list[Callable[[BaseException], None]] = []
        self._thread = threading.Thread(target=self._run, args=(engine,), name="kvserve-engine", daemon=True)
        self._built = threading.Event()
        self._build_error: BaseException | None = None
        self._thread.start()
        self._built.wait()
        if self._build_error is not None:
            raise self._build_error
        self._stats = self.engine.stats()

    # ---- asyncio side ------------------------------------------------------------------------
    async def add(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                  quiet: bool = False, **kwargs) -> RequestStream:
        """Validate and enqueue a request. Raises InvalidRequestError at once for bad input, and
        EngineDeadError when the engine has stopped. `quiet`: deliver only the whole answer."""
        self._raise_if_ended()
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._streams:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        request = self.engine.make_request(prompt, params, request_id, **kwargs)
        stream = RequestStream(request_id, asyncio.get_running_loop(), self, quiet)
        with self._lock:
            self._raise_if_ended()
            self._streams[request_id] = stream
            self._commands.put(("add", request))
        return stream

    def _raise_if_ended(self) -> None:
        if self._ended is not None:
            raise self._ended

    @property
    def alive(self) -> bool:
        return self._ended is None and not self._stop.is_set()

    @property
    def replicas(self) -> int:
        """Engines behind this one (a scale-out RemoteEngine has several): capacity counts them."""
        return 1

    def on_fatal(self, listener: Callable[[BaseException], None]) -> None:
        """Call `listener(error)` (on the engine thread) if the loop dies; at once if it has."""
        with self._lock:
            self._fatal_listeners.append(listener)
            error = self.error
        if error is not None:
            listener(error)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    async def call(self, fn: Callable[[Engine], T]) -> T:
        """Run fn(engine) on the engine thread between steps (engine state is not thread-safe)."""
        future = asyncio.get_running_loop().create_future()
        with self._lock:
            self._raise_if_ended()
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
    def _run(self, engine: Engine | Callable[[], Engine]) -> None:
        try:
            self.engine = engine if isinstance(engine, Engine) else engine()
        except BaseException as error:   # the constructor raises it
            self._build_error = error
            return
        finally:
            self._built.set()
        fatal: Exception | None = None
        trimmer = IdleTrimmer()
        try:
            while not self._stop.is_set():
                self._apply_commands(block=not self.engine.has_unfinished)
                if self.engine.has_unfinished:
                    self._deliver(self.engine.step())
                    trimmer.stepped()
                elif self._commands.empty():
                    trimmer.idle()
                self._stats = self.engine.stats()
            ended = EngineDeadError("the engine was shut down")
        except Exception as error:   # fatal (module docstring): fail everything, tell the listeners
            log.exception("the engine loop failed; failing %d requests in flight", len(self._streams))
            ended = EngineDeadError(f"the engine failed ({type(error).__name__}: {error}); "
                                    "the server must be restarted")
            fatal = error
        with self._lock:   # from here on, add() and call() raise instead of queueing
            self._ended, self.error = ended, fatal
            listeners = list(self._fatal_listeners) if fatal is not None else []
        for listener in listeners:   # first: the server says why before its clients hear of it
            try:
                listener(fatal)
            except Exception:
                log.exception("an on_fatal listener failed")
        self._fail_all(ended)
        while True:   # answer calls still queued, so no awaiting caller hangs
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                break
            if kind == "call":
                _, future = arg
                future.get_loop().call_soon_threadsafe(_settle, future, None, ended)

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
