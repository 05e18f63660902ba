"""StepLoop: several engines stepped on one thread, in turn (`kvserve serve --engine-loop shared`)."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

from conftest import make_engine
from kvserve.cli import shared_engine_loop
from kvserve.engine.async_engine import MAX_PASSED_OVER, AsyncEngine, EngineDeadError, StepLoop
from kvserve.sampling import FinishReason, SamplingParams

PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = ["first prompt of the pair", "a second, longer prompt for the other engine", "3"]


def _recording(engine, name: str, log: list) -> object:
    """The engine, its steps logged by name and thread."""
    step = engine.step

    def logged():
        log.append((name, threading.get_ident()))
        return step()

    engine.step = logged
    return engine


async def _collect(stream) -> tuple[int, ...]:
    tokens, last = [], None
    async for output in stream:
        tokens.extend(output.token_ids)
        last = output
    assert last.finish_reason is FinishReason.LENGTH
    return tuple(tokens)


async def _run(async_engine: AsyncEngine, prompts, params=PARAMS) -> list[tuple[int, ...]]:
    streams = [await async_engine.add(p, params) for p in prompts]
    return list(await asyncio.gather(*(_collect(s) for s in streams)))


def test_two_engines_on_one_loop_share_one_thread_and_answer_as_alone():
    alone = AsyncEngine(make_engine())
    try:
        expected = asyncio.run(_run(alone, PROMPTS))
    finally:
        alone.shutdown()

    log: list = []
    loop = StepLoop()
    a = AsyncEngine(lambda: _recording(make_engine(), "a", log), loop=loop)
    b = AsyncEngine(lambda: _recording(make_engine(), "b", log), loop=loop)
    try:
        async def both():   # the loop is held by a call until both engines have all their requests
            gate = threading.Event()
            held = asyncio.ensure_future(a.call(lambda engine: gate.wait(10)))
            streams = [[await engine.add(p, PARAMS) for p in PROMPTS] for engine in (a, b)]
            gate.set()
            assert await held
            return [list(await asyncio.gather(*(_collect(s) for s in group))) for group in streams]

        got_a, got_b = asyncio.run(both())
        assert got_a == got_b == expected                        # the same greedy answers as alone
        assert {thread for _, thread in log} == {loop._thread.ident}    # one thread stepped both
        names = [name for name, _ in log]
        # Both had work from the first step and both were stepped while the other still had work
        # (whose turn it was depends on measured step times: the rule itself is tested below on a
        # clock of its own).
        last_a, last_b = max(i for i, n in enumerate(names) if n == "a"), max(i for i, n in enumerate(names) if n == "b")
        assert {"a", "b"} <= set(names[:min(last_a, last_b) + 1]), names
    finally:
        a.shutdown()
        assert b.alive and not a.alive and loop._thread.is_alive()   # one out: the loop goes on for the other
        assert asyncio.run(_run(b, PROMPTS[:1])) == expected[:1]
        b.shutdown()
    assert not loop._thread.is_alive()                             # the last one out ends the thread
    for engine in (a, b):
        engine.engine.check_integrity()
        kv = engine.engine.stats().kv
        assert kv.num_used_blocks == 0 and kv.num_free_blocks == kv.num_blocks


def test_a_fatal_step_ends_its_engine_alone_on_a_shared_loop():
    loop = StepLoop()
    doomed_engine = make_engine()
    real_step, steps = doomed_engine.step, []

    def failing_step():
        steps.append(1)
        if len(steps) > 3:
            raise RuntimeError("injected: this engine's device failed")
        return real_step()

    doomed_engine.step = failing_step
    doomed = AsyncEngine(doomed_engine, loop=loop)
    healthy = AsyncEngine(make_engine(), loop=loop)
    told: list = []
    doomed.on_fatal(told.append)
    healthy.on_fatal(told.append)
    try:
        async def main():
            long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
            doomed_stream = await doomed.add(PROMPTS[0], long)
            good = asyncio.ensure_future(_run(healthy, PROMPTS))
            with pytest.raises(EngineDeadError, match="device failed"):
                async with asyncio.timeout(10):
                    async for _ in doomed_stream:
                        pass
            with pytest.raises(EngineDeadError):
                await doomed.add("too late", PARAMS)
            with pytest.raises(EngineDeadError):
                await doomed.call(lambda e: e.stats())
            return await asyncio.wait_for(good, 30)

        answers = asyncio.run(main())
        assert len(answers) == len(PROMPTS) and all(len(t) == PARAMS.max_tokens for t in answers)
        assert len(told) == 1 and "device failed" in str(told[0])
        assert healthy.alive and not doomed.alive
        assert asyncio.run(healthy.call(lambda e: e.stats())).num_running == 0
    finally:
        doomed.shutdown()
        healthy.shutdown()
    assert not loop._thread.is_alive()


def test_a_builder_that_fails_on_a_shared_loop_raises_and_leaves_the_others_running():
    loop = StepLoop()
    first = AsyncEngine(make_engine(), loop=loop)
    try:
        def broken():
            raise ValueError("no such model file")

        with pytest.raises(ValueError, match="no such model file"):
            AsyncEngine(broken, loop=loop)
        assert asyncio.run(_run(first, PROMPTS[:1]))[0]
    finally:
        first.shutdown()


def test_the_engine_loop_option():
    assert shared_engine_loop("shared", "cuda") and not shared_engine_loop("separate", "cpu")
    assert shared_engine_loop("auto", "cpu") and not shared_engine_loop("auto", "cuda")


class _Timed:
    """An engine of `requests` requests, each step taking `cost` of the loop's clock."""

    def __init__(self, name: str, cost: float, requests: int, clock: list[float], log: list[str]):
        self.name, self.cost, self.requests, self.clock, self.log = name, cost, requests, clock, log
        self.steps_left = 0

    @property
    def has_unfinished(self) -> bool:
        return self.steps_left > 0

    def step(self):
        self.clock[0] += self.cost
        self.steps_left -= 1
        self.log.append(self.name)
        return []

    def stats(self):
        busy = self.requests if self.steps_left else 0
        return SimpleNamespace(num_running=busy, num_waiting=0)


def test_the_loop_shares_its_time_by_request_whichever_engine_serves_it():
    """A step charges its engine the step's time over its requests; the least served goes next."""
    clock, log = [0.0], []
    loop = StepLoop(clock=lambda: clock[0])
    large = _Timed("large", cost=3.0, requests=1, clock=clock, log=log)
    small = _Timed("small", cost=1.0, requests=1, clock=clock, log=log)
    engines = [AsyncEngine(lambda e=e: e, loop=loop) for e in (large, small)]
    try:
        def run(large_requests: int) -> list[str]:
            large.requests = large_requests
            async def go():   # both given their work between two of the loop's turns
                gate = threading.Event()
                held = asyncio.ensure_future(engines[0].call(lambda _: gate.wait(10)))
                await asyncio.sleep(0.05)
                large.steps_left, small.steps_left = 12, 36
                log.clear()
                gate.set()
                await held
                while large.steps_left or small.steps_left:
                    await asyncio.sleep(0.01)
            asyncio.run(go())
            return log[:]

        # One request each: the small model's 1-unit steps run three for each 3-unit large one.
        order = run(1)
        first = order[:20]
        assert 4 <= first.count("large") <= 6 and first.count("small") >= 14, order
        # Three requests on the large model: its step costs each request 1 unit, so they alternate.
        order = run(3)
        first = order[:20]
        assert 9 <= first.count("large") <= 11, order
        # A full batch on the small model (32 requests: 1/32 a step) beside one request on the large:
        # by time it would be ~96 small steps a large one; the large waits at most MAX_PASSED_OVER.
        small.requests = 32
        order = run(1)
        turns = [k for k, name in enumerate(order) if name == "large"]
        gaps = [b - a - 1 for a, b in zip([-1, *turns], turns)]
        assert len(turns) == 12 and max(gaps) == MAX_PASSED_OVER, order
    finally:
        for engine in engines:
            engine.shutdown()


def test_an_engine_whose_books_break_between_steps_ends_alone_and_shutdown_twice_returns_at_once():
    loop = StepLoop()
    broken_engine = make_engine()
    real_stats, calls = broken_engine.stats, []

    def failing_stats():
        calls.append(1)
        if len(calls) > 4:
            raise RuntimeError("injected: the stats cannot be read")
        return real_stats()

    healthy = AsyncEngine(make_engine(), loop=loop)
    broken = AsyncEngine(broken_engine, loop=loop)
    broken_engine.stats = failing_stats
    try:
        async def main():
            stream = await broken.add(PROMPTS[0], SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))
            with pytest.raises(EngineDeadError, match="stats cannot be read"):
                async with asyncio.timeout(10):
                    async for _ in stream:
                        pass
            return await asyncio.wait_for(_run(healthy, PROMPTS), 30)

        assert len(asyncio.run(main())) == len(PROMPTS)
        assert healthy.alive and not broken.alive
    finally:
        for engine in (broken, healthy, healthy, broken):
            started = time.monotonic()
            engine.shutdown()
            assert time.monotonic() - started < 5
    assert not loop._thread.is_alive()
