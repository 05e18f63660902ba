"""AsyncEngine: runs an Engine on a background thread; add / stream / abort from asyncio.
StepLoop: that thread, which may step several engines (the models of one process) in turn.

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
engine has ended no add can slip in unanswered: registration and the engine's end share a lock. On
a shared loop the other engines go on stepping.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from kvserve.engine.engine import Engine
from kvserve.engine.heap import IdleTrimmer
from kvserve.outputs import RequestOutput, RequestStats, merge
from kvserve.sampling import FinishReason, InvalidRequestError, SamplingParams
from kvserve.sched.scheduler import SchedulerStats

log = logging.getLogger(__name__)


T = TypeVar("T")
MAX_PASSED_OVER = 4   # StepLoop: an engine with work waits at most this many of the others' steps


def _settle(future: asyncio.Future, result: object, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _answer(future: asyncio.Future, result: object, error: BaseException | None) -> None:
    """Settle `future` from the engine thread (nothing to do if its event loop has closed)."""
    try:
        future.get_loop().call_soon_threadsafe(_settle, future, result, error)
    except RuntimeError:
        pass


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
        self._latest: RequestStats | None = None    # the newest delta's stats, read or not
        self._error: BaseException | None = None
        self._ready = asyncio.Event()
        self._done = False

    # engine thread
    def put(self, output: RequestOutput) -> None:
        with self._lock:
            was_empty = self._pending is None
            self._pending = output if was_empty else merge(self._pending, output)
            self._latest = output.stats
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

    def latest_stats(self) -> RequestStats | None:
        """The request's accounting as of the engine's newest delta, including deltas not yet read
        (None before the first): what a request cut short had cost when it was cut."""
        with self._lock:
            return self._latest

    def abort(self) -> None:
        """Cancel the request (idempotent; a no-op once it has finished)."""
        if not self._done:
            self._engine.abort(self.request_id)


class StepLoop:
    """The engine thread: steps every engine attached to it, one step each in turn.

    The models of one process share one loop by default (`kvserve serve --engine-loop`). On a CPU,
    two engines stepping on two threads at once hold two OpenMP teams on the same cores: the
    workers spin against each other and every step of both slows down (measured on 2 cores with the
    chat pair, 4 requests each: both done in 5.3 s on one loop, 7.1 s on two threads). Taking turns,
    each engine's step has every core.

    Whose turn: the engine whose requests have had the least of the thread's time. A step charges
    its engine the step's time divided by its running requests (a queue behind them buys no turns);
    an engine back from idle starts level with the least served busy one, with nothing banked. So each request gets about the same
    compute whichever model serves it: a small model's requests get more tokens a second than a
    large one's, and an answer held back to be scored (a router's cascade) is decided sooner (the
    routing bench's cascade TTFT p95: 2.76 s, against 3.50 s with strict turns, one step each).
    No engine with work waits more than MAX_PASSED_OVER of the others' steps, though: a lone
    request on a large model beside a full batch on a small one would otherwise get a token for
    every few dozen of theirs.

    An engine's step that fails with anything a request cannot be blamed for ends that engine alone
    (see AsyncEngine); the others go on."""

    def __init__(self, name: str = "kvserve-engine", clock: Callable[[], float] = time.perf_counter):
        self.name = name
        self._clock = clock
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._members: list[AsyncEngine] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._attached_once = False
        self._closed = False

    def attach(self, member: "AsyncEngine", engine: Engine | Callable[[], Engine]) -> Engine:
        """Build `engine` on the loop's thread (a function that builds one; see AsyncEngine) and step
        it from now on. Raises what the builder raised."""
        built = threading.Event()
        box: dict = {}
        with self._lock:
            if self._closed:
                raise EngineDeadError("the engine loop was shut down")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self._commands.put((member, "attach", (engine, built, box)))
        built.wait()
        if "error" in box:
            raise box["error"]
        return box["engine"]

    def put(self, member: "AsyncEngine", kind: str, arg: object) -> None:
        self._commands.put((member, kind, arg))

    def detach(self, member: "AsyncEngine", timeout_s: float = 30.0) -> None:
        """Stop stepping `member` (its streams end; see AsyncEngine.shutdown). The last one out ends
        the thread."""
        done = threading.Event()
        with self._lock:
            if self._thread is None or self._closed:
                return
            self._commands.put((member, "detach", done))
        if threading.current_thread() is self._thread:   # from a listener or a call: applied after it
            return
        done.wait(timeout_s)
        if not self._members:   # the last one: the thread ends
            self._thread.join(timeout=timeout_s)

    # ---- the loop's thread ---------------------------------------------------------------------
    def _run(self) -> None:
        trimmer = IdleTrimmer()
        floor = 0.0   # the least served of the engines with work (never goes back): where a newcomer starts
        try:
            while True:
                self._apply_commands(block=not any(m._busy for m in self._members))
                with self._lock:
                    if not self._members and self._commands.empty() and self._attached_once:
                        self._closed = True
                        return
                for member in list(self._members):
                    was_busy = member._busy
                    if not member._poll():   # its engine broke: it has ended
                        self._members.remove(member)
                    elif member._busy and not was_busy:   # back from idle: nothing banked
                        member._served, member._passed_over = max(member._served, floor), 0
                busy = [m for m in self._members if m._busy]
                if not busy:
                    if self._commands.empty():
                        trimmer.idle()
                    continue
                floor = max(floor, min(m._served for m in busy))
                # The least served goes next, unless another has waited MAX_PASSED_OVER turns.
                waited = max(busy, key=lambda m: m._passed_over)
                member = waited if waited._passed_over >= MAX_PASSED_OVER else min(busy, key=lambda m: m._served)
                for other in busy:
                    other._passed_over = 0 if other is member else other._passed_over + 1
                if not member._step(self._clock):   # fatal: that engine has ended
                    self._members.remove(member)
                trimmer.stepped()
        except BaseException as error:   # a fault of the loop itself: end everything rather than hang
            log.exception("the engine loop failed")
            self._close(error)

    def _close(self, error: BaseException) -> None:
        with self._lock:
            self._closed = True
        ended = EngineDeadError(f"the engine loop failed ({type(error).__name__}: {error}); "
                                "the server must be restarted")
        for member in self._members:
            member._end(ended, error)
        self._members.clear()
        while True:   # nothing queued is left unanswered
            try:
                member, kind, arg = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "attach":
                arg[2]["error"] = ended
                arg[1].set()
            elif kind == "detach":
                arg.set()
            elif kind == "call":
                _answer(arg[1], None, ended)

    def _apply_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            member, kind, arg = command
            if kind == "attach":
                self._attach(member, *arg)
            elif kind == "detach":
                if member in self._members:
                    member._end(EngineDeadError("the engine was shut down"), None)
                    self._members.remove(member)
                arg.set()
            elif member in self._members:
                if not member._command(kind, arg):
                    self._members.remove(member)
            elif kind == "call":   # an engine already ended: no awaiting caller hangs
                _answer(arg[1], None, member._ended)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _attach(self, member: "AsyncEngine", engine: Engine | Callable[[], Engine], built: threading.Event,
                box: dict) -> None:
        self._attached_once = True   # from here on, the loop ends when its last engine leaves
        try:
            box["engine"] = engine if isinstance(engine, Engine) else engine()
            member.engine = box["engine"]
            member._stats = member.engine.stats()
        except BaseException as error:   # the builder's: attach() raises it
            box["error"] = error
        else:
            self._members.append(member)
        finally:
            built.set()


class AsyncEngine:
    def __init__(self, engine: Engine | Callable[[], Engine], loop: StepLoop | None = None):
        """`engine`, or a function that builds one: it is then built on the engine thread itself.
        `loop`: the engine thread it shares with other engines (None: a thread of its own).

        Prefer the function. libgomp throttles its workers' spin-waiting once a process holds more
        OpenMP threads than CPUs, and a thread that ran parallel torch ops keeps its team until it
        exits: an engine stepped on one thread after its model was loaded on another that lives on
        (the main thread of `kvserve batch`, say) ran 35% slower on 2 cores (bf16 matmuls 1.8x)."""
        self._streams: dict[str, RequestStream] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()                  # registration vs the engine's end (see module doc)
        self._ended: EngineDeadError | None = None     # set once the engine has ended, under _lock
        self.error: BaseException | None = None        # what killed the engine, if it died
        self._fatal_listeners: list[Callable[[BaseException], None]] = []
        self._served = 0.0   # the loop's account: thread time per request this engine has had
        self._busy = False
        self._passed_over = 0   # the loop's turns this engine waited through with work to do
        self._loop = loop if loop is not None else StepLoop()
        self.engine = self._loop.attach(self, engine)
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
            self._loop.put(self, "add", request)
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
        """Call `listener(error)` (on the engine thread) if the engine dies; at once if it has."""
        with self._lock:
            self._fatal_listeners.append(listener)
            error = self.error
        if error is not None:
            listener(error)

    def abort(self, request_id: str) -> None:
        self._loop.put(self, "abort", request_id)

    async def call(self, fn: Callable[[Engine], T]) -> T:
        """Run fn(engine) on the engine thread between steps (engine state is not thread-safe)."""
        future = asyncio.get_running_loop().create_future()
        with self._lock:
            self._raise_if_ended()
            self._loop.put(self, "call", (fn, future))
        return await future

    def stats(self) -> SchedulerStats:
        """Counters as of the last step (updated by the engine thread)."""
        return self._stats

    def shutdown(self) -> None:
        self._stop.set()
        self._loop.detach(self)

    # ---- engine thread (StepLoop) --------------------------------------------------------------
    def _poll(self) -> bool:
        """Refresh the stats and whether there is work; False when the engine broke doing so."""
        try:
            self._stats = self.engine.stats()
            self._busy = self.engine.has_unfinished
        except Exception as error:
            self._fatal(error)
            return False
        return True

    def _step(self, clock: Callable[[], float]) -> bool:
        """One step, charged to the engine's account (its time over its running requests); False
        when it was fatal (module docstring: every stream fails, the listeners are told)."""
        requests = max(1, self._stats.num_running)
        start = clock()
        try:   # (the stats are read again by the loop's next _poll, before it can block)
            self._deliver(self.engine.step())
        except Exception as error:
            self._fatal(error)
            return False
        self._served += (clock() - start) / requests
        return True

    def _fatal(self, error: Exception) -> None:
        log.exception("the engine loop failed; failing %d requests in flight", len(self._streams))
        self._end(EngineDeadError(f"the engine failed ({type(error).__name__}: {error}); "
                                  "the server must be restarted"), error)

    def _command(self, kind: str, arg: object) -> bool:
        """Apply an add, abort or call; False when the engine broke applying it (as fatal as a step)."""
        try:
            if kind == "add":
                self.engine.add_request(arg)
            elif kind == "abort":
                output = self.engine.abort(arg)
                if output is not None:
                    self._deliver([output])
            elif kind == "call":
                self._call(*arg)
        except Exception as error:
            self._fatal(error)
            return False
        return True

    def _end(self, ended: EngineDeadError, fatal: BaseException | None) -> None:
        """The engine stops (shut down, or `fatal`): from here on add() and call() raise `ended`."""
        with self._lock:
            self._ended, self.error = ended, fatal
            listeners = list(self._fatal_listeners) if fatal is not None else []
        for listener in listeners:   # first: the server says why before its clients hear of it
            try:
                listener(fatal)
            except Exception:
                log.exception("an on_fatal listener failed")
        self._fail_all(ended)

    def _call(self, fn: Callable[[Engine], object], future: asyncio.Future) -> None:
        try:
            result = fn(self.engine)
        except Exception as error:
            _answer(future, None, error)
        else:
            _answer(future, result, None)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            try:
                stream.put(output)
            except RuntimeError:   # its event loop has closed: nobody is listening
                log.warning("request %s: its consumer's event loop has closed; aborting it", output.request_id)
                del self._streams[output.request_id]
                if not output.finished:
                    self.engine.abort(output.request_id)
                continue
            if output.finished:
                del self._streams[output.request_id]

    def _fail_all(self, error: BaseException) -> None:
        for request_id, stream in list(self._streams.items()):
            try:
                stream.fail(error)
            except RuntimeError:   # its event loop has closed
                pass
            try:
                self.engine.abort(request_id)
            except Exception:   # the engine is already broken; the stream has its error
                log.exception("abort of %s failed", request_id)
        self._streams.clear()


__all__ = ["AsyncEngine", "StepLoop", "RequestStream", "EngineDeadError", "FinishReason"]
