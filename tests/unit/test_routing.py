"""Routing decisions and RoutedStream over scripted engines (no model): every path a routed answer
can take, what the client sees on each, and the accounting of what each model ran."""

import asyncio
import functools
import json
import math

import pytest

from kvserve.outputs import RequestOutput, RequestStats, TokenLogprob, merge
from kvserve.routing.escalation import RoutedStream
from kvserve.routing.predictor import Calibration, Logistic, answer_scores, latest_turn, prompt_signals, text_signals
from kvserve.routing.router import Router, RouterConfigError, parse_router_spec
from kvserve.sampling import FinishReason, SamplingParams

CONFIDENT, DOUBTFUL = -0.05, -4.0     # token log-probabilities


class FakeStream:
    def __init__(self, engine, request_id, prompt, params):
        self.engine, self.request_id, self.prompt, self.params = engine, request_id, list(prompt), params
        self.produced = 0
        self.aborted = False
        self.done = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.done:
            raise StopAsyncIteration
        await asyncio.sleep(0)
        stats = lambda: RequestStats(len(self.prompt), 0, self.produced, len(self.prompt) + self.produced)  # noqa: E731
        if self.aborted:
            self.done = True
            return RequestOutput(self.request_id, "", (), None, FinishReason.ABORT, stats())
        token, logprob = self.engine.script[self.produced] if self.produced < len(self.engine.script) else (0, 0.0)
        self.produced += 1
        finish = None
        if token == 0 or self.produced >= self.params.max_tokens:
            finish = FinishReason.STOP if token == 0 else FinishReason.LENGTH
            self.done = True
        logprobs = None
        if self.params.logprobs is not None:
            top = tuple((token + k, logprob - k) for k in range(self.params.logprobs))
            logprobs = (TokenLogprob(token, logprob, top),)
        return RequestOutput(self.request_id, f"<{self.engine.name}{token}>", (token,), logprobs, finish, stats())

    def abort(self):
        self.aborted = True


class FakeEngine:
    def __init__(self, name, script):
        self.name, self.script = name, script     # script: [(token, logprob)], token 0 ends the answer
        self.started: list[FakeStream] = []

    async def add(self, prompt, params, **kwargs):
        stream = FakeStream(self, f"{self.name}-{len(self.started)}", prompt, params)
        self.started.append(stream)
        return stream


class Member:
    def __init__(self, engine):
        self.engine = engine


def calibration(p_small=0.0, p_large=0.0):
    """p_* as logits; q_small: even odds at a lowest-decile log-probability of -1."""
    return Calibration(Logistic({}, p_small), Logistic({}, p_large), Logistic({"low_logprob": 4.0}, 4.0))


def route(small_script, large_script, spec="chat=small,large", p_small=0.0, p_large=0.0, max_tokens=64,
          logprobs=None, abort_after=None):
    small, large = FakeEngine("s", small_script), FakeEngine("L", large_script)
    router = Router(parse_router_spec(spec, ["small", "large"]), calibration(p_small, p_large))
    stream = RoutedStream(router, {"small": Member(small), "large": Member(large)}, [101, 102, 103], "Say hi",
                          SamplingParams(max_tokens=max_tokens, logprobs=logprobs), {"priority": 0},
                          decode=lambda ids: "".join(chr(65 + t % 26) for t in ids))

    async def consume():
        outputs = []
        async for output in stream:
            outputs.append(output)
            if abort_after is not None and sum(len(o.token_ids) for o in outputs) >= abort_after:
                stream.abort()
        return outputs

    outputs = asyncio.run(consume())
    assert outputs[-1].finished and all(not o.finished for o in outputs[:-1])
    return stream, outputs, small, large


def text(outputs):
    return "".join(o.text for o in outputs)


def tokens(outputs):
    return [t for o in outputs for t in o.token_ids]


def confident(n, start=1):
    return [(start + i, CONFIDENT) for i in range(n)] + [(0, CONFIDENT)]


def test_a_confident_small_answer_is_kept():
    stream, outputs, small, large = route(confident(30), confident(5, 50))
    assert tokens(outputs) == list(range(1, 31)) + [0]
    assert not large.started
    assert stream.decision.to_json()["escalated"] is False
    assert stream.decision.segments == [{"model": "small", "start": 0, "end": 31}]
    assert stream.answering_model == "small"
    assert outputs[-1].finish_reason is FinishReason.STOP


def test_predicted_hard_goes_to_the_large_model_before_any_token():
    stream, outputs, small, large = route(confident(30), confident(5, 50), p_small=-3.0, p_large=2.0)
    assert tokens(outputs) == [50, 51, 52, 53, 54, 0]
    assert small.started[0].aborted and small.started[0].produced == 1      # prefill + one token only
    assert large.started[0].prompt == [101, 102, 103]
    d = stream.decision
    assert (d.chosen, d.escalated, d.reason) == ("large", True, "predicted")
    assert d.segments == [{"model": "large", "start": 0, "end": 6}]
    assert [r["model"] for r in stream.runs] == ["small", "large"] and stream.runs[0]["shown"] == 0


def test_a_prompt_the_text_marks_as_hard_never_pays_the_small_prefill():
    small, large = FakeEngine("s", confident(30)), FakeEngine("L", confident(5, 50))
    text_hard = Calibration(Logistic({}, 0.0), Logistic({}, 0.0), Logistic({"low_logprob": 4.0}, 4.0),
                            p_small_text=Logistic({"digits": -6.0}, 2.0), p_large_text=Logistic({}, 2.0))

    def answer(prompt_text, spec="chat=small,large"):
        small.started.clear(), large.started.clear()
        router = Router(parse_router_spec(spec, ["small", "large"]), text_hard)
        stream = RoutedStream(router, {"small": Member(small), "large": Member(large)}, [101, 102], prompt_text,
                              SamplingParams(max_tokens=64), {}, decode=str)

        async def consume():
            return [o async for o in stream]

        return stream, asyncio.run(consume())

    stream, outputs = answer("What is 12345 * 6789?")          # digits: p_small_text ~ 0.02, p_large_text 0.88
    assert tokens(outputs) == [50, 51, 52, 53, 54, 0]
    assert not small.started and large.started[0].prompt == [101, 102]
    d = stream.decision
    assert (d.chosen, d.reason) == ("large", "predicted") and d.scores["p_small_text"] < 0.05
    assert [r["model"] for r in stream.runs] == ["large"]        # the cost has no small-model share
    stream, outputs = answer("Say hi")                           # no digits: both 0.88, the small model is tried
    assert small.started and not large.started and stream.decision.reason == "predicted"
    stream, outputs = answer("What is 12345 * 6789?", spec="chat=small,large,predict=off")
    assert small.started and not large.started                   # predict=off skips every routing before generation


def test_a_doubtful_prefix_escalates_before_the_client_sees_a_token():
    script = [(1, CONFIDENT), (2, DOUBTFUL), (3, DOUBTFUL)] + confident(40, 4)
    stream, outputs, small, large = route(script, confident(3, 60), spec="chat=small,large,hold=8")
    assert tokens(outputs) == [60, 61, 62, 0]
    assert "<s" not in text(outputs)
    assert small.started[0].produced == 8 and small.started[0].aborted
    assert large.started[0].prompt == [101, 102, 103]                      # from scratch
    assert (stream.decision.reason, stream.decision.escalated) == ("low_confidence", True)
    assert stream.decision.scores["q_small"] < 0.5


def test_a_doubtful_window_hands_off_and_the_large_model_continues():
    script = confident(12)[:-1] + [(13, DOUBTFUL)] * 8 + confident(20, 30)
    stream, outputs, small, large = route(script, confident(4, 70), spec="chat=small,large,hold=4,window=8")
    sent = tokens(outputs)
    handed = large.started[0].prompt
    assert handed[:3] == [101, 102, 103] and handed[3:] == sent[:len(handed) - 3]    # continues what was sent
    assert sent[len(handed) - 3:] == [70, 71, 72, 73, 0]
    assert sent[:11] == list(range(1, 12))
    d = stream.decision
    assert (d.reason, d.escalated) == ("handoff", True)
    assert d.segments == [{"model": "small", "start": 0, "end": len(handed) - 3},
                          {"model": "large", "start": len(handed) - 3, "end": len(sent)}]
    assert large.started[0].params.max_tokens == 64 - (len(handed) - 3)


def test_escalation_off_never_escalates_and_predict_off_never_predicts():
    script = [(1, DOUBTFUL)] * 5 + [(0, DOUBTFUL)]
    stream, outputs, _, large = route(script, confident(3, 60), spec="chat=small,large,escalation=off")
    assert tokens(outputs) == [1, 1, 1, 1, 1, 0] and not large.started
    stream, outputs, _, large = route(confident(3), confident(3, 60), spec="chat=small,large,predict=off",
                                      p_small=-5.0, p_large=5.0)
    assert tokens(outputs) == [1, 2, 3, 0] and not large.started


def test_tolerance_one_keeps_the_small_model_tolerance_zero_does_not():
    _, outputs, _, large = route(confident(3), confident(3, 60), spec="chat=small,large,tolerance=1",
                                 p_small=-5.0, p_large=5.0)
    assert not large.started
    _, outputs, _, large = route(confident(3), confident(3, 60), spec="chat=small,large,tolerance=0",
                                 p_small=-0.1, p_large=0.0)
    assert large.started


def test_client_logprobs_only_as_asked():
    _, outputs, _, _ = route(confident(3), [], logprobs=None)
    assert all(o.logprobs is None for o in outputs)
    _, outputs, _, _ = route(confident(3), [], logprobs=2)
    assert all(len(e.top) == 2 for o in outputs for e in o.logprobs)


def test_an_abort_while_held_back_ends_the_answer_and_starts_nothing():
    stream, outputs, small, large = route(confident(40), confident(3, 60), spec="chat=small,large,hold=30",
                                          abort_after=0)
    assert outputs[-1].finish_reason is FinishReason.ABORT
    assert small.started[0].aborted and not large.started


def test_an_abort_after_a_handoff_reaches_the_large_model():
    script = confident(5)[:-1] + [(9, DOUBTFUL)] * 8 + confident(5, 30)
    stream, outputs, small, large = route(script, confident(40, 70), spec="chat=small,large,hold=2,window=4",
                                          abort_after=12)
    assert outputs[-1].finish_reason is FinishReason.ABORT
    assert large.started and large.started[0].aborted


def test_the_fallback_answers_when_the_small_model_cannot_start():
    small, large = FakeEngine("s", confident(3)), FakeEngine("L", confident(2, 80))

    async def refuse(*args, **kwargs):
        raise RuntimeError("engine is dead")

    small.add = refuse
    router = Router(parse_router_spec("chat=small,large", ["small", "large"]), calibration())
    stream = RoutedStream(router, {"small": Member(small), "large": Member(large)}, [1, 2], "x",
                          SamplingParams(max_tokens=8), {}, decode=str)

    async def consume():
        return [o async for o in stream]

    assert tokens(asyncio.run(consume())) == [80, 81, 0]
    assert stream.decision.reason == "fallback"


def test_stats_count_the_original_prompt_and_every_token_sent():
    script = confident(12)[:-1] + [(13, DOUBTFUL)] * 8 + confident(20, 30)
    stream, outputs, _, large = route(script, confident(4, 70), spec="chat=small,large,hold=4,window=8")
    stats = outputs[-1].stats
    assert stats.num_prompt_tokens == 3
    assert stats.num_output_tokens == len(tokens(outputs))
    assert sum(r["shown"] for r in stream.runs) == len(tokens(outputs))


@pytest.mark.parametrize("spec, message", [
    ("chat", "expected NAME=SMALL,LARGE"),
    ("chat=small", "exactly two models"),
    ("chat=small,small", "must differ"),
    ("chat=small,nope", "no served model is named 'nope'"),
    ("small=small,large", "already a model's name"),
    ("chat=small,large,tolerance=2", "between 0 and 1"),
    ("chat=small,large,tolerance=x", "could not convert"),
    ("chat=small,large,fallback=other", "fallback must be"),
    ("chat=small,large,escalation=later", "escalation must be"),
    ("chat=small,large,bogus=1", "unknown option"),
    ("chat=small,large,hold=0", "at least 1"),
    ("chat=small,large,predict=maybe", "on or off"),
])
def test_bad_router_specs_say_what_is_wrong(spec, message):
    with pytest.raises(RouterConfigError, match=message):
        parse_router_spec(spec, ["small", "large"])


def test_the_held_back_prefix_defaults_to_the_calibration_s():
    """The answer estimate was fitted on prefixes of the calibration's length: a router holds back
    that many tokens unless told otherwise (the prior: 24)."""
    model = Logistic({}, 0.0)
    fitted = Calibration(model, model, model, hold_tokens=8)
    assert Router(parse_router_spec("chat=small,large", ["small", "large"]), fitted).config.hold_tokens == 8
    assert Router(parse_router_spec("chat=small,large,hold=30", ["small", "large"]), fitted).config.hold_tokens == 30
    router = Router(parse_router_spec("chat=small,large", ["small", "large"]))
    assert router.config.hold_tokens == 24 and router.describe()["hold_tokens"] == 24


def test_signals_and_scores():
    signals = prompt_signals("Write a Python function def f(x)", 12, math.log(0.9), [math.log(0.9), math.log(0.1)])
    assert signals["code"] == 1.0 and 0.3 < signals["first_token_entropy"] < 0.34
    scores = answer_scores([-0.1] * 9 + [-5.0])
    assert scores["low_logprob"] == -5.0 and scores["mean_logprob"] == pytest.approx(-0.59)
    assert answer_scores([]) == {"mean_logprob": 0.0, "low_logprob": 0.0}


def test_logistic_fit_separates_and_round_trips(tmp_path):
    rows = [{"low_logprob": i / 10} for i in range(-20, 21)]
    labels = [r["low_logprob"] > 0.3 for r in rows]
    model = Logistic.fit(rows, labels, ["low_logprob"])
    assert model({"low_logprob": 1.5}) > 0.9 and model({"low_logprob": -1.0}) < 0.1
    calibration_ = Calibration(model, model, model, hold_tokens=16)
    calibration_.save(tmp_path / "c.json")
    loaded = Calibration.load(tmp_path / "c.json")
    assert loaded.p_small({"low_logprob": 1.5}) == pytest.approx(model({"low_logprob": 1.5}))
    assert loaded.hold_tokens == 16
    assert loaded.p_small_text is None and loaded.p_large_text is None       # an older file: no text stage
    Calibration(model, model, model, p_small_text=model, p_large_text=model).save(tmp_path / "t.json")
    loaded = Calibration.load(tmp_path / "t.json")
    assert loaded.p_large_text({"low_logprob": -1.0}) == pytest.approx(model({"low_logprob": -1.0}))
    with pytest.raises(ValueError, match="cannot read the routing calibration"):
        Calibration.load(tmp_path / "missing.json")


def test_latest_turn_is_the_message_being_answered():
    # ChatML: <|im_start|>=1, <|im_end|>=2; system, user, then the reply's header.
    system, user, header = [1, 10, 11, 2, 3], [1, 20, 21, 22, 2, 3], [1, 30, 3]
    prompt = system + user + header
    start, end = latest_turn(prompt, {1, 2})
    assert prompt[start:end] == user[1:]                   # role, text and end marker of the user turn
    history = system + [1, 40, 41, 2, 3, 1, 50, 51, 52, 53, 2, 3] * 20
    start, end = latest_turn(history + user + header, {1, 2})
    assert end - start == len(user) - 1                    # a long history does not lengthen it
    # Llama 3: <|start_header_id|>=5, <|end_header_id|>=6, <|eot_id|>=7, BOS=9; the reply opens with 6.
    prompt = [9, 5, 60, 6, 61, 7, 5, 62, 6, 70, 71, 7, 5, 63, 6]
    start, end = latest_turn(prompt, {5, 6, 7, 9})
    assert prompt[start:end] == [70, 71, 7, 5, 63]
    assert latest_turn([80, 81, 82], {1, 2}) == (0, 3)      # no template: the whole prompt
    assert latest_turn([9, 80, 81], {9}) == (1, 3)          # only a BOS: what follows it


def test_text_signals_read_the_turn_not_the_history():
    alone = text_signals("What is 47 + 38?", 12)
    assert alone == text_signals("What is 47 + 38?", 12)
    assert alone["log_turn_tokens"] == pytest.approx(math.log1p(12)) and alone["digits"] == 0.5
    assert alone["code"] == 0.0 and text_signals("Write a Python function", 5)["code"] == 1.0


def test_estimates_are_not_extrapolated_past_the_fitted_range(tmp_path):
    def n(value):
        return {"log_turn_tokens": value}

    rows = [n(3.0 + i / 10) for i in range(20)]                      # fitted on 3.0 .. 4.9
    model = Logistic.fit(rows, [r["log_turn_tokens"] < 4.0 for r in rows], ["log_turn_tokens"])
    assert model.ranges["log_turn_tokens"] == (3.0, pytest.approx(4.9))
    assert model(n(9.0)) == model(n(4.9)) > 0.0          # a very long turn scores as the longest seen
    assert model(n(0.0)) == model(n(3.0))
    Calibration(model, model, model).save(tmp_path / "c.json")
    assert Calibration.load(tmp_path / "c.json").p_small(n(9.0)) == pytest.approx(model(n(4.9)))
    unbounded = Logistic(dict(model.weights), model.bias)
    assert unbounded(n(9.0)) < model(n(9.0))             # what a file without ranges does
    with pytest.raises(ValueError, match="range"):
        Logistic.from_json({"weights": {"log_turn_tokens": 1.0}, "ranges": {"log_turn_tokens": [2.0, 1.0]}})


def test_a_calibration_of_signals_no_longer_computed_is_refused(tmp_path):
    old = {"weights": {"log_prompt_tokens": -3.0}, "bias": 12.0}
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"p_small": old, "p_large": old, "q_small": {"weights": {}, "bias": 1.0}}))
    with pytest.raises(ValueError, match=r"does not compute \(log_prompt_tokens\).*--calibrate"):
        Calibration.load(path)


def test_the_stream_scores_the_turn_it_is_given():
    small, large = FakeEngine("s", confident(4)), FakeEngine("L", confident(4, 70))
    router = Router(parse_router_spec("chat=small,large", ["small", "large"]), calibration())
    stream = RoutedStream(router, {"small": Member(small), "large": Member(large)}, list(range(1, 2001)),
                          "What is 2 + 2?", SamplingParams(max_tokens=8), {}, decode=lambda ids: "x",
                          turn_tokens=14)

    async def drain():
        return [o async for o in stream]

    asyncio.run(drain())
    assert stream.decision.signals["log_turn_tokens"] == pytest.approx(math.log1p(14))


def handed_off(stop):
    """The doubtful-window script with these stop strings: (the large model's prompt, its params)."""
    script = confident(12)[:-1] + [(13, DOUBTFUL)] * 8 + confident(20, 30)
    small, large = FakeEngine("s", script), FakeEngine("L", confident(4, 70))
    router = Router(parse_router_spec("chat=small,large,hold=4,window=8", ["small", "large"]), calibration())
    stream = RoutedStream(router, {"small": Member(small), "large": Member(large)}, [1, 2], "x",
                          SamplingParams(max_tokens=64, stop=stop), {},
                          decode=lambda ids: "".join(chr(65 + t % 26) for t in ids))

    async def consume():
        return [o async for o in stream]

    outputs = asyncio.run(consume())
    assert stream.decision.reason == "handoff" and tokens(outputs)[-5:] == [70, 71, 72, 73, 0]
    return large.started[0].prompt, large.started[0].params


def test_a_handoff_waits_until_no_stop_string_can_straddle_it():
    prompt, params = handed_off(stop=[])
    assert prompt[-1] == 13                          # mid-run of the doubtful tokens ('N')
    # Sent text ending in "N" may be the start of the stop string "NX", which the small model's
    # detokenizer holds back: the answer changes hands only after the first token that rules it out.
    prompt, params = handed_off(stop=["NX", "QQQ"])
    assert prompt[-2:] == [13, 30] and params.stop == ("NX", "QQQ")
    prompt, _ = handed_off(stop=["ZZ"])              # a stop string the text cannot be starting
    assert prompt[-1] == 13


def test_an_aborted_answer_still_accounts_for_what_ran():
    stream, outputs, small, large = route(confident(40), [], spec="chat=small,large,hold=2,escalation=before",
                                          abort_after=10)
    assert outputs[-1].finish_reason is FinishReason.ABORT
    [run] = stream.runs
    assert run["model"] == "small" and run["prompt_tokens"] == 3 and run["shown"] == len(tokens(outputs)) >= 10


def test_a_large_model_that_cannot_start_fails_the_answer_rather_than_hanging():
    small, large = FakeEngine("s", [(1, DOUBTFUL)] * 30), FakeEngine("L", [])

    async def refuse(*args, **kwargs):
        raise ValueError("refused")

    large.add = refuse
    router = Router(parse_router_spec("chat=small,large,hold=2", ["small", "large"]), calibration())
    stream = RoutedStream(router, {"small": Member(small), "large": Member(large)}, [1, 2], "x",
                          SamplingParams(max_tokens=8), {}, decode=str)

    async def consume():
        return [o async for o in stream]

    with pytest.raises(ValueError, match="refused"):
        asyncio.run(asyncio.wait_for(consume(), 10))
    assert small.started[0].aborted


def test_a_router_is_admitted_only_while_both_models_have_room():
    from kvserve.server.routers import routed_admission_load

    queued = 4   # --max-queued-requests

    def admitted(routed, small_load, large_load, small_cap=8, large_cap=4):
        return routed_admission_load(routed, small_load, small_cap, large_load, large_cap) + 1 <= small_cap + queued

    assert admitted(0, 0, 0)
    assert admitted(3, 8, 0)                 # the small model's queue has room: 3 + 8 + 1 <= 12
    assert not admitted(4, 8, 0)             # ... and now it does not
    assert not admitted(0, 0, 8)             # the large model's queue is full (8 >= 4 + 4): escalations would pile up
    assert admitted(0, 0, 7)
    assert not admitted(1, 0, 7)             # routed answers count against the large model too


def test_the_entropy_signal_reads_the_top_5_whatever_the_client_asks_for():
    """The calibration was fitted on the top-5 alternatives: a client asking for 20 log-probabilities
    must not change the signal (nor so the route)."""
    plain, _, _, _ = route(confident(10), confident(3, 60))
    wide, outputs, _, _ = route(confident(10), confident(3, 60), logprobs=20)
    assert wide.decision.signals["first_token_entropy"] == plain.decision.signals["first_token_entropy"]
    assert all(len(e.top) == 20 for o in outputs for e in o.logprobs)       # the client still gets its 20


class MergingStream(FakeStream):
    """Deltas of `per` tokens at once, as an engine stream whose reader fell behind delivers them."""

    per = 5

    async def __anext__(self):
        first = await super().__anext__()
        outputs = [first]
        while not outputs[-1].finished and len(outputs) < self.per:
            outputs.append(await super().__anext__())
        return functools.reduce(merge, outputs)


def test_tokens_released_with_the_held_back_prefix_are_scored_by_the_first_window():
    """A merged delta reaching past the held-back prefix: its tail was sent unscored before; now the
    first window starts where the prefix ends, so a doubtful token there still hands the answer off."""
    script = [(1 + i, CONFIDENT) for i in range(4)] + [(5, DOUBTFUL)] + [(6 + i, CONFIDENT) for i in range(30)] + [(0, 0.0)]
    small, large = FakeEngine("s", script), FakeEngine("L", confident(3, 60))
    small.add = lambda prompt, params, **kw: _merging(small, prompt, params)
    router = Router(parse_router_spec("chat=small,large,hold=4,window=8", ["small", "large"]), calibration())
    stream = RoutedStream(router, {"small": Member(small), "large": Member(large)}, [101, 102, 103], "Say hi",
                          SamplingParams(max_tokens=64), {}, decode=lambda ids: "".join(chr(65 + t % 26) for t in ids))

    async def consume():
        return [o async for o in stream]

    asyncio.run(consume())
    assert stream.decision.reason == "handoff" and large.started


async def _merging(engine, prompt, params):
    stream = MergingStream(engine, f"{engine.name}-{len(engine.started)}", prompt, params)
    engine.started.append(stream)
    return stream


def test_an_abort_during_the_hold_back_accounts_the_tokens_generated():
    """The client went away while the first tokens were held back: none was shown, but the small
    model generated them, and the cost counts them."""
    small, large = FakeEngine("s", confident(40)), FakeEngine("L", [])
    router = Router(parse_router_spec("chat=small,large,hold=30", ["small", "large"]), calibration())
    stream = RoutedStream(router, {"small": Member(small), "large": Member(large)}, [101, 102, 103], "Say hi",
                          SamplingParams(max_tokens=64), {}, decode=str)

    async def consume_then_abort():
        task = asyncio.ensure_future(stream.__anext__())
        while small.started == [] or small.started[0].produced < 6:
            await asyncio.sleep(0)
        stream.abort()
        output = await task
        assert output.finish_reason is FinishReason.ABORT and not output.token_ids   # nothing held is shown

    asyncio.run(consume_then_abort())
    (run,) = stream.runs
    assert run["model"] == "small" and run["output_tokens"] >= 6 and run["shown"] == 0   # (it counted 0)
    assert stream.decision.segments == []


class AheadStream(FakeStream):
    """An engine stream whose engine has run ahead of the reader: deltas put but not yet read,
    seen only in latest_stats() (as the AsyncEngine's stream reports them)."""
    AHEAD = 5

    def latest_stats(self):
        return RequestStats(len(self.prompt), 2, self.produced + self.AHEAD, len(self.prompt) + self.produced)


def test_an_aborted_answer_is_accounted_as_of_the_engines_newest_delta_not_the_last_one_read():
    small, large = FakeEngine("s", confident(40)), FakeEngine("L", [])

    async def add(prompt, params, **kwargs):
        stream = AheadStream(small, f"s-{len(small.started)}", prompt, params)
        small.started.append(stream)
        return stream

    small.add = add
    router = Router(parse_router_spec("chat=small,large,hold=2,escalation=before", ["small", "large"]), calibration())
    stream = RoutedStream(router, {"small": Member(small), "large": Member(large)}, [101, 102, 103], "Say hi",
                          SamplingParams(max_tokens=64), {}, decode=str)

    async def consume():
        outputs = []
        async for output in stream:
            outputs.append(output)
            if len(tokens(outputs)) >= 10:
                stream.abort()
        return outputs

    outputs = asyncio.run(consume())
    (run,) = stream.runs
    shown = len(tokens(outputs))
    assert run["shown"] == shown and run["output_tokens"] == small.started[0].produced + AheadStream.AHEAD > shown
    assert run["cached_tokens"] == 2
