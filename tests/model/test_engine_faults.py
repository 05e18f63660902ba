"""Engine faults: a request the engine cannot run fails alone; anything else kills the loop, which
then fails everything in flight at once and refuses new work (see kvserve/engine/core.py and
kvserve/engine/async_engine.py)."""

from __future__ import annotations

import asyncio

import pytest

from conftest import make_engine
from kvserve.engine.async_engine import AsyncEngine, EngineDeadError
from kvserve.engine.engine import Engine
from kvserve.runner.model_runner import KVTransferError
from kvserve.sampling import FinishReason, SamplingParams
from test_engine import GREEDY, assert_all_blocks_free, run_all, tokens_of

POISON = 7   # a byte no other prompt here contains: a step that runs it raises (an injected bug)
PROMPTS = ["The quick brown fox", "jumps over the lazy dog", "and runs away", "far from here"]


def poison_runner(engine: Engine, token: int = POISON) -> list[int]:
    """Make the model raise whenever a step runs `token`; returns a list counting the raises."""
    runner, raised = engine.core.runner, []
    execute = runner.execute

    def failing_execute(plan):
        if any(token in chunk.token_ids for chunk in plan.chunks):
            raised.append(len(plan.chunks))
            raise RuntimeError("injected: this request's input breaks the model")
        return execute(plan)

    runner.execute = failing_execute
    return raised


@pytest.mark.parametrize("budget", [512, 24])   # whole prompts in one step, and chunked prefills
def test_a_request_that_breaks_its_step_fails_alone_and_the_others_are_unchanged(budget):
    expected = run_tokens_without_fault(budget)
    engine = make_engine(max_num_batched_tokens=budget)
    raised = poison_runner(engine)
    poisoned = "poison " + chr(POISON) + " here"
    outputs = run_all(engine, [*PROMPTS[:2], poisoned, *PROMPTS[2:]], GREEDY, check=True)
    bad = outputs.pop(2)
    assert bad[-1].finish_reason is FinishReason.ERROR and not tokens_of(bad)
    assert [tokens_of(o) for o in outputs] == expected          # same tokens as if it never came
    assert all(o[-1].finish_reason is FinishReason.LENGTH for o in outputs)
    assert raised and max(raised) > 1                           # it did share a step with others
    assert engine.core.num_failed_requests == 1
    assert_all_blocks_free(engine)


def run_tokens_without_fault(budget: int) -> list[list[int]]:
    return [tokens_of(o) for o in run_all(make_engine(max_num_batched_tokens=budget), PROMPTS, GREEDY)]


def test_steps_that_fail_for_every_request_over_different_prompts_are_fatal():
    engine = make_engine()
    engine.core.runner.execute = lambda plan: (_ for _ in ()).throw(RuntimeError("the device is gone"))
    for prompt in PROMPTS[:2]:                 # one at a time, as on a quiet server
        engine.add(prompt, GREEDY)
        [output] = engine.step()
        assert output.finish_reason is FinishReason.ERROR
    engine.add(PROMPTS[2], GREEDY)
    with pytest.raises(RuntimeError, match="3 steps in a row failed for every request"):
        engine.step()


def test_a_client_retrying_one_poisonous_prompt_does_not_kill_the_engine():
    engine = make_engine()
    poison_runner(engine)
    for _ in range(5):
        engine.add("retry " + chr(POISON), GREEDY)
        [output] = engine.step()
        assert output.finish_reason is FinishReason.ERROR
    assert tokens_of(run_all(engine, PROMPTS[:1], GREEDY)[0]) == run_tokens_without_fault(512)[0]


def test_a_failed_kv_copy_is_fatal_not_isolated():
    engine = make_engine()
    calls = []

    def failing(plan):
        calls.append(plan)
        raise KVTransferError("disk full")

    engine.core.runner.execute = failing
    engine.add(PROMPTS[0], GREEDY)
    engine.add(PROMPTS[1], GREEDY)
    with pytest.raises(KVTransferError):
        engine.step()
    assert len(calls) == 1   # never retried request by request: the tiers' books cannot be trusted


def test_a_dead_engine_loop_fails_every_stream_refuses_new_work_and_tells_its_listeners():
    engine = make_engine()
    schedule, steps = engine.scheduler.schedule, []

    def dying_schedule():
        steps.append(1)
        if len(steps) > 5:
            raise RuntimeError("injected: the scheduler's books are broken")
        return schedule()

    engine.scheduler.schedule = dying_schedule
    async_engine = AsyncEngine(engine)
    told = []
    async_engine.on_fatal(told.append)
    try:
        async def main():
            params = SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)
            streams = [await async_engine.add(p, params) for p in PROMPTS]
            for stream in streams:   # every one fails, promptly, with a message that says why
                with pytest.raises(EngineDeadError, match="scheduler's books are broken"):
                    async with asyncio.timeout(5):
                        async for _ in stream:
                            pass
            with pytest.raises(EngineDeadError):
                await async_engine.add("too late", params)
            with pytest.raises(EngineDeadError):
                await async_engine.call(lambda e: e.stats())

        asyncio.run(main())
        assert len(told) == 1 and "books are broken" in str(told[0])
        assert not async_engine.alive
        late = []
        async_engine.on_fatal(late.append)   # a listener registered after the death is told at once
        assert len(late) == 1
    finally:
        async_engine.shutdown()


def test_a_request_failing_alone_does_not_stop_the_async_engine():
    engine = make_engine()
    poison_runner(engine)
    async_engine = AsyncEngine(engine)
    try:
        async def main():
            bad = await async_engine.add("x" + chr(POISON), GREEDY)
            good = await async_engine.add(PROMPTS[0], GREEDY)
            bad_outputs = [o async for o in bad]
            good_outputs = [o async for o in good]
            return bad_outputs, good_outputs

        bad, good = asyncio.run(main())
        assert bad[-1].finish_reason is FinishReason.ERROR
        assert good[-1].finish_reason is FinishReason.LENGTH and len(tokens_of(good)) == GREEDY.max_tokens
        assert async_engine.alive and async_engine.error is None
    finally:
        async_engine.shutdown()
