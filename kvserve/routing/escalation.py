"""One routed answer, run through the engines: hold-back, escalation and hand-off.

`RoutedStream` is what the serving layer gets instead of an engine's RequestStream, and it reads
the same way: an async iterator of RequestOutput deltas, the last one finished, and `abort()`.
Streaming and non-streaming answers both consume it, so they are the same answer.

    prompt text ──▶ router.before_text(text signals)
         │ large: the large model answers from scratch; the small one never runs ("predicted")
         ▼ small, or no text estimates
    small model: prefill + first token ──▶ router.before(prompt signals)
         │ no: abort, the large model answers from scratch ("predicted")
         ▼ yes
    hold back the first `hold` tokens ──▶ router.acceptable(answer scores)
         │ no: abort, the large model answers from scratch, the client saw nothing ("low_confidence")
         ▼ yes: release them, stream on
    every further `window` tokens ──▶ router.acceptable(window scores)
         │ no: abort; the large model continues from prompt + every token already sent ("handoff")
         ▼
    finished

The pair shares a tokenizer, so the large model's prompt is the small model's prompt followed by
the tokens the client has; a hand-off waits for a token boundary that ends a whole character, so
no byte of text is lost or repeated. Log-probabilities are always asked of the small model (the
scores need them); the client gets only those it asked for.

Models are known by their API only (`engine.add` → stream of RequestOutput, `abort`); no torch.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from kvserve.outputs import RequestOutput, RequestStats, TokenLogprob, latest_stats, merge
from kvserve.routing.predictor import answer_scores, prompt_signals, text_signals
from kvserve.routing.router import Decision, Router
from kvserve.sampling import FinishReason, SamplingParams

SIGNAL_TOP_LOGPROBS = 5        # top alternatives asked of the small model for its prompt signals


class RoutedStream:
    """A routed request's deltas, as one stream. `answering_model` names the model that wrote the
    latest delta; `decision` is the routing record (complete once the stream has finished);
    `runs` lists each model run's token counts, for usage and cost."""

    quiet = False

    def __init__(self, router: Router, models: dict[str, Any], prompt_ids: list[int], turn_text: str,
                 params: SamplingParams, add_kwargs: dict, decode: Callable[[list[int]], str],
                 observe: Callable[[str, float], None] | None = None, turn_tokens: int | None = None):
        self.request_id = uuid.uuid4().hex
        self.router = router
        self.models = models                   # name → object with .engine.add(...)
        self.prompt_ids = list(prompt_ids)
        # The latest turn (predictor.latest_turn), which the lexical signals read: its text and length.
        self.turn_text = turn_text
        self.turn_tokens = len(self.prompt_ids) if turn_tokens is None else turn_tokens
        self.params = params
        # Never quiet inside: the routing reads the small model's answer token by token.
        self.add_kwargs = {k: v for k, v in add_kwargs.items() if k != "quiet"}
        self.decode = decode
        self.observe = observe or (lambda name, seconds: None)
        config = router.config
        self.answering_model = config.small
        self.decision = Decision(router=config.name, chosen=config.small)
        self.runs: list[dict] = self.decision.runs    # {"model", "prompt_tokens", "cached_tokens", "output_tokens", "shown"}
        self._current = None                   # the engine stream being read
        self._run_open = None                  # (model, prompt tokens, tokens sent before it) of the run not yet accounted
        self._open_generated = 0               # tokens the open run had generated while they were held back
        self._aborted = False
        self._done = False
        self._sent: list[int] = []             # tokens the client has
        self._gen = self._run()

    # ---- the RequestStream interface ---------------------------------------------------------
    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        output = await self._gen.__anext__()
        if output.finished:
            self._done = True
        return output

    @property
    def finished(self) -> bool:
        return self._done

    def abort(self) -> None:
        """Cancel the request, whichever model is running it (idempotent). A run cut short is
        accounted as of the engine's newest delta, read or not (its final stats may never be read),
        else with what it had sent or held."""
        if self._current is not None and self._run_open is not None and not self._done:
            model, prompt_tokens, sent_before = self._run_open
            shown = len(self._sent) - sent_before
            stats = latest_stats(self._current)
            generated = max(shown, self._open_generated, stats.num_output_tokens if stats is not None else 0)
            self.runs.append({"model": model, "prompt_tokens": prompt_tokens,
                              "cached_tokens": stats.num_cached_tokens if stats is not None else 0,
                              "output_tokens": generated, "shown": shown})
            self.decision.segments = _segments(self.runs)
            self._run_open = None
        self._aborted = True
        if self._current is not None:
            self._current.abort()

    # ---- the route --------------------------------------------------------------------------
    async def _run(self) -> AsyncIterator[RequestOutput]:
        config = self.router.config
        started = time.monotonic()
        signals = text_signals(self.turn_text, self.turn_tokens)
        large_now, scores = self.router.before_text(signals)
        self.decision.scores.update(scores)
        if large_now:
            self.decision.signals = signals
            self.decision.chosen = config.large
            self.observe("decision", time.monotonic() - started)
            async for output in self._answer_with(config.large, "predicted", from_scratch=True):
                yield output
            return
        small_params = dataclasses.replace(self.params, logprobs=max(self.params.logprobs or 0, SIGNAL_TOP_LOGPROBS))
        try:
            stream = await self._start(config.small, self.prompt_ids, small_params)
        except Exception:             # the small model cannot take it (engine gone, prompt too long for it)
            async for output in self._answer_with(config.fallback, "fallback", from_scratch=True):
                yield output
            return
        held: list[RequestOutput] = []
        tokens: list[int] = []
        logprobs: list[float] = []

        async def read() -> RequestOutput:
            output = await stream.__anext__()
            held.append(output)
            self._open_generated += len(output.token_ids)
            tokens.extend(output.token_ids)
            logprobs.extend(e.logprob for e in output.logprobs or ())
            return output

        output = await read()
        if output.finished and not output.token_ids:      # aborted or failed before a token
            self._record(config.small, output, shown=0)
            yield self._client_view(output, config.small)
            return
        started = time.monotonic()
        first = output.logprobs[0] if output.logprobs else TokenLogprob(output.token_ids[0], 0.0)
        # The entropy over the top alternatives the calibration was fitted on, however many the client asked for.
        signals = prompt_signals(self.turn_text, self.turn_tokens, first.logprob,
                                 [lp for _, lp in first.top[:SIGNAL_TOP_LOGPROBS]])
        self.decision.signals = signals
        go_small, scores = self.router.before(signals)
        self.decision.scores.update(scores)
        self.observe("decision", time.monotonic() - started)
        if not go_small:
            self.decision.chosen = config.large
            async for out in self._replace(config.large, "predicted", output):
                yield out
            return

        if config.escalation != "off":
            while not output.finished and len(tokens) < config.hold_tokens and not self._aborted:
                output = await read()
            answer = {**answer_scores(logprobs[:config.hold_tokens]), "window": 0.0}
            ok, q_small = self.router.acceptable(signals, answer, scores["p_large"])
            self.decision.scores.update({"q_small": q_small, **answer})
            self.observe("holdback", time.monotonic() - started)
            if self._aborted:                # cancelled during the hold: nothing held is shown
                yield self._final(FinishReason.ABORT)
                return
            if not ok and not (output.finished and output.finish_reason is FinishReason.ERROR):
                async for out in self._replace(config.large, "low_confidence", output):
                    yield out
                return
        released = functools.reduce(merge, held)
        self._sent.extend(released.token_ids)
        if released.finished:
            self._record(config.small, released, shown=len(self._sent))
        yield self._client_view(released, config.small)
        if released.finished:
            return

        # Tokens scored so far: the held-back prefix. A delta that arrived merged (a reader behind
        # the engine) may reach past it; what it released unscored opens the first window.
        checked = min(len(tokens), config.hold_tokens) if config.escalation != "off" else len(tokens)
        pending_handoff = False
        while True:
            output = await stream.__anext__()
            tokens.extend(output.token_ids)
            logprobs.extend(e.logprob for e in output.logprobs or ())
            self._sent.extend(output.token_ids)
            if output.finished:
                self._record(config.small, output, shown=len(self._sent))
                yield self._client_view(output, config.small)
                return
            if config.escalation == "stream" and not self._aborted:
                while not pending_handoff and len(tokens) - checked >= config.window_tokens:
                    window = answer_scores(logprobs[checked:checked + config.window_tokens])
                    checked += config.window_tokens
                    window["window"] = float(checked - len(logprobs[:config.hold_tokens])) / config.window_tokens
                    ok, q_window = self.router.acceptable(signals, window, scores["p_large"])
                    if not ok:
                        pending_handoff = True
                        self.decision.scores.update({"q_window": q_window})
            yield self._client_view(output, config.small)
            if pending_handoff and not self._aborted and self._at_clean_boundary():
                stream.abort()
                last = await _drain(stream)
                self._record(config.small, last, shown=len(self._sent))
                async for out in self._answer_with(config.large, "handoff", from_scratch=False):
                    yield out
                return

    def _at_clean_boundary(self) -> bool:
        """Whether the answer can change hands after the tokens sent so far: the last one ends a
        whole character, and no tail of the text is held back by the small model's detokenizer as
        the possible start of a stop string. The text the client has is then exactly the decoded
        tokens sent, the large model's text follows it, and a stop string cannot straddle the two."""
        stop = self.params.stop
        tail = self.decode(self._sent[-(8 + max(map(len, stop), default=0)):])
        if tail.endswith("\ufffd"):
            return False
        return not any(tail.endswith(s[:k]) for s in stop for k in range(1, len(s)))

    async def _replace(self, model: str, reason: str, output: RequestOutput) -> AsyncIterator[RequestOutput]:
        """Abort the small model's answer, never shown, and let `model` answer from scratch."""
        stream = self._current
        stream.abort()
        last = output if output.finished else await _drain(stream)
        self._record(self.router.config.small, last, shown=0)
        async for out in self._answer_with(model, reason, from_scratch=True):
            yield out

    async def _answer_with(self, model: str, reason: str, from_scratch: bool) -> AsyncIterator[RequestOutput]:
        self.decision.escalated = model != self.router.config.small
        self.decision.reason = reason
        self.answering_model = model
        prompt = self.prompt_ids if from_scratch else self.prompt_ids + self._sent
        remaining = self.params.max_tokens - (0 if from_scratch else len(self._sent))
        if remaining < 1 or self._aborted:
            yield self._final(FinishReason.LENGTH if remaining < 1 else FinishReason.ABORT)
            return
        params = dataclasses.replace(self.params, max_tokens=remaining)
        sent_before = len(self._sent)
        stream = await self._start(model, prompt, params)
        async for output in stream:
            self._sent.extend(output.token_ids)
            if output.finished:
                self._record(model, output, shown=len(self._sent) - sent_before)
            yield self._client_view(output, model)

    async def _start(self, model: str, prompt: list[int], params: SamplingParams):
        stream = await self.models[model].engine.add(prompt, params, **self.add_kwargs)
        self._current = stream
        self._run_open = (model, len(prompt), len(self._sent))
        self._open_generated = 0
        if self._aborted:           # aborted while this model was being started
            stream.abort()
        return stream

    # ---- accounting -------------------------------------------------------------------------
    def _record(self, model: str, output: RequestOutput, shown: int) -> None:
        """One model run ended: its prompt, cached and generated tokens, and how many of its
        tokens the client got (`shown`)."""
        if self._run_open is None:        # already accounted by abort()
            return
        self._run_open = None
        stats = output.stats
        self.runs.append({"model": model, "prompt_tokens": stats.num_prompt_tokens,
                          "cached_tokens": stats.num_cached_tokens, "output_tokens": stats.num_output_tokens,
                          "shown": shown})
        self.decision.segments = _segments(self.runs)

    def _client_view(self, output: RequestOutput, model: str) -> RequestOutput:
        """The delta as the client sees it: only the log-probabilities it asked for, and request
        stats that count the original prompt and every token sent."""
        want = self.params.logprobs
        logprobs = output.logprobs
        if logprobs is not None and model == self.router.config.small:
            logprobs = None if want is None else tuple(dataclasses.replace(e, top=e.top[:want]) for e in logprobs)
        return RequestOutput(self.request_id, output.text, output.token_ids, logprobs, output.finish_reason,
                             self._stats(output.stats))

    def _stats(self, last: RequestStats) -> RequestStats:
        runs = self.runs
        return RequestStats(
            num_prompt_tokens=len(self.prompt_ids),
            num_cached_tokens=min(len(self.prompt_ids), last.num_cached_tokens),
            num_output_tokens=len(self._sent),
            num_computed_tokens=sum(r["prompt_tokens"] - r["cached_tokens"] + r["output_tokens"] for r in runs),
            queue_time_s=last.queue_time_s, num_cache_write_tokens=last.num_cache_write_tokens,
            cache_writes_by_ttl=last.cache_writes_by_ttl)

    def _final(self, reason: FinishReason) -> RequestOutput:
        stats = RequestStats(len(self.prompt_ids), 0, len(self._sent), 0)
        return RequestOutput(self.request_id, "", (), None, reason, stats)


def _segments(runs: list[dict]) -> list[dict]:
    """Which model wrote which of the tokens the client got: [{"model", "start", "end"}], in order."""
    segments, start = [], 0
    for run in runs:
        if run["shown"]:
            segments.append({"model": run["model"], "start": start, "end": start + run["shown"]})
            start += run["shown"]
    return segments


async def _drain(stream) -> RequestOutput:
    """Read an aborted stream to its last delta (its final stats)."""
    last = None
    async for output in stream:
        last = output
    return last

