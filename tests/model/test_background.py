"""Background requests (batch jobs' lines) fill what foreground ones leave: they wait behind every
foreground request, give up their seats and KV to a waiting foreground one, sit out the steps in
which a foreground prompt is prefilled, and none of it changes anyone's greedy output."""

from __future__ import annotations

from conftest import make_engine
from kvserve.sampling import SamplingParams
from test_engine import assert_all_blocks_free

LONG = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
SHORT = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
BACKGROUND = [f"batch document {i}: the parcel arrived late and damaged" for i in range(4)]
FOREGROUND = "interactive: where is my order?"


def solo(prompt: str, params: SamplingParams) -> list[int]:
    engine = make_engine()
    engine.add(prompt, params)
    tokens = []
    while engine.has_unfinished:
        tokens += [t for o in engine.step() for t in o.token_ids]
    return tokens


def run(engine, steps_before_foreground: int = 3) -> tuple[dict[str, list[int]], list[list[str]], list[str], str]:
    """Background work first, a foreground request after a few steps: tokens per request, the
    request ids scheduled in each step, the background ids and the foreground one."""
    ids = [engine.add(p, LONG, background=True) for p in BACKGROUND]
    tokens = {i: [] for i in ids}
    steps: list[list[str]] = []
    schedule = engine.scheduler.schedule

    def recording_schedule():
        plan = schedule()
        steps.append([c.request_id for c in plan.chunks])
        return plan

    engine.scheduler.schedule = recording_schedule
    for step in range(10_000):
        if step == steps_before_foreground:
            foreground_id = engine.add(FOREGROUND, SHORT)
            tokens[foreground_id] = []
        if not engine.has_unfinished:
            break
        for output in engine.step():
            tokens[output.request_id] += output.token_ids
        engine.check_integrity()
    return tokens, steps, ids, foreground_id


def test_a_foreground_request_takes_a_background_seat_at_once_and_outputs_do_not_change():
    engine = make_engine(max_num_seqs=4)
    tokens, steps, background, foreground_id = run(engine)
    arrived = next(n for n, ids in enumerate(steps) if foreground_id in ids)
    assert arrived == 3                                               # admitted in the step it arrived
    assert engine.stats().num_preemptions >= 1                        # a background request gave way
    assert tokens[foreground_id] == solo(FOREGROUND, SHORT)
    for request_id, prompt in zip(background, BACKGROUND):
        assert tokens[request_id] == solo(prompt, LONG), request_id   # recomputed, same tokens
    assert_all_blocks_free(engine)


def test_background_sits_out_the_foreground_prefill_steps():
    engine = make_engine(max_num_seqs=8, max_num_batched_tokens=8)   # the prompt takes several chunks
    tokens, steps, _, foreground_id = run(engine)
    prefill_steps = [ids for ids in steps if foreground_id in ids][:-len(tokens[foreground_id])]
    assert len(prefill_steps) >= 3
    assert all(ids == [foreground_id] for ids in prefill_steps), prefill_steps
    decode_steps = [ids for ids in steps if foreground_id in ids][-len(tokens[foreground_id]) + 1:]
    assert any(len(ids) > 1 for ids in decode_steps)                  # once it decodes, batch work runs beside it
    assert engine.stats().num_preemptions == 0                        # seats and KV were free: nobody preempted
    assert_all_blocks_free(engine)


def test_background_gives_its_kv_to_a_foreground_request():
    # 24 blocks of 16: the four background requests fill the pool as they grow.
    engine = make_engine(num_blocks=24, max_num_seqs=8)
    tokens, steps, background, foreground_id = run(engine, steps_before_foreground=20)
    assert next(n for n, ids in enumerate(steps) if foreground_id in ids) == 20
    assert engine.stats().num_preemptions >= 1
    assert tokens[foreground_id] == solo(FOREGROUND, SHORT)
    assert all(len(tokens[i]) == LONG.max_tokens for i in background)
    assert_all_blocks_free(engine)


def test_waiting_background_requests_are_admitted_behind_foreground_ones():
    engine = make_engine(max_num_seqs=3)
    background = [engine.add(p, SHORT, background=True) for p in BACKGROUND[:2]]
    foreground = [engine.add(f"{name}: where is my order?", SHORT) for name in ("alpha", "bravo")]
    plan = engine.scheduler.schedule()
    # foreground first; while their prompts are prefilled, no background work joins (a seat is free)
    assert [c.request_id for c in plan.chunks] == foreground
    assert [r.request_id for r in engine.scheduler.waiting] == background


def test_no_background_request_takes_a_seat_while_a_foreground_one_waits():
    engine = make_engine(max_num_seqs=3)
    background = engine.add(BACKGROUND[0], SHORT, background=True)
    # the same first block: the second waits for the first's prefill instead of computing it again
    first, second = (engine.add(f"{FOREGROUND} {i}", SHORT) for i in range(2))
    plan = engine.scheduler.schedule()
    assert [c.request_id for c in plan.chunks] == [first]          # a seat is free, yet no background
    assert {r.request_id for r in engine.scheduler.waiting} == {second, background}


def test_while_foreground_requests_decode_background_work_is_cut_to_the_governors_budget():
    engine = make_engine(max_num_seqs=16)
    scheduler = engine.scheduler
    scheduler.governor.budget = 5.0                          # as if learnt here ...
    scheduler.observe_step = lambda plan, seconds: None      # ... and kept, whatever the tiny model takes
    for i in range(40):
        engine.add(f"batch line {i:02d}", LONG, background=True)
    plans = []
    schedule = scheduler.schedule

    def recording_schedule():
        plan = schedule()
        plans.append(list(plan.chunks))
        return plan

    scheduler.schedule = recording_schedule
    while len(scheduler.running) < 16 or any(r.num_computed_tokens < r.num_prompt_tokens for r in scheduler.running):
        engine.step()                                        # alone: every seat busy with background work
    assert len(plans[-1]) == 16
    foreground = engine.add("hello there", SHORT)
    start = len(plans)
    while foreground in scheduler.requests:
        engine.step()
    with_foreground = plans[start:]
    assert [c.request_id for c in with_foreground[0]] == [foreground]            # its prefill: alone
    for plan in with_foreground[1:]:                                              # its decode: 1 + 5
        assert foreground in [c.request_id for c in plan] and len(plan) == 6, [c.request_id for c in plan]
    engine.check_integrity()


def test_a_foreground_request_never_waits_for_a_prefix_that_held_back_background_work_is_computing():
    """A background line and an interactive request share a long prompt prefix; the line is still
    prefilling it, in small chunks, when the interactive request arrives. The interactive request
    must compute the prefix itself (the line sits out its prefill), not wait for the line forever."""
    engine = make_engine(max_num_seqs=8, max_num_batched_tokens=16)
    shared = "Shared instructions for every request: answer briefly and politely. " * 3
    engine.add(shared + "batch document", LONG, background=True)
    engine.step()                                               # the line has begun its prefill
    interactive = engine.add(shared + "interactive question", SHORT)
    tokens = []
    for _ in range(200):
        tokens += [t for o in engine.step() if o.request_id == interactive for t in o.token_ids]
        if interactive not in engine.scheduler.requests:
            break
    assert tokens == solo(shared + "interactive question", SHORT)
