"""EngineCore: one step of continuous batching, at the level of tokens.

A step that raises while running the model is retried request by request, so that one request
that cannot run (a bug its input triggers, say) fails alone and the others' step goes on:

    execute(plan) ──raises──▶ execute(chunk) for each chunk alone ──▶ failed ones: FinishReason.ERROR
                                                                      the rest: their tokens, as usual

Running a chunk again is safe: nothing is accounted before update(), and the K/V it writes are
the same values in the same slots. What is not isolated is fatal and propagates (AsyncEngine
then fails everything in flight): an error of the scheduler, of the KV copies between tiers
(`KVTransferError`), or FATAL_FAILED_STEPS steps in a row in which every request failed, over at
least two different prompts (the model itself is broken, not a request; a client retrying one
poisonous prompt is not enough).
"""

from __future__ import annotations

import logging
import time

from kvserve.outputs import TokenDelta
from kvserve.runner.model_runner import KVTransferError, ModelRunner
from kvserve.sched.plan import ModelOutput, SchedulerOutput
from kvserve.sched.scheduler import Scheduler

log = logging.getLogger(__name__)


FATAL_FAILED_STEPS = 3


class EngineCore:
    def __init__(self, scheduler: Scheduler, runner: ModelRunner):
        self.scheduler = scheduler
        self.runner = runner
        self.num_failed_requests = 0   # requests failed alone by a step that raised (since start)
        self._failed_steps_in_a_row = 0
        self._failed_prompts: set[int] = set()   # hashes of the prompts those steps failed

    def step(self) -> list[TokenDelta]:
        plan = self.scheduler.schedule()
        result = self._execute(plan)
        return self.scheduler.update(plan, result)

    def _execute(self, plan: SchedulerOutput) -> ModelOutput:
        started = time.perf_counter()
        try:
            output = self.runner.execute(plan)
            self.scheduler.observe_step(plan, time.perf_counter() - started)
            return output
        except KVTransferError:
            raise
        except Exception:
            log.exception("an engine step of %d requests failed; running them one by one", len(plan.chunks))
            return self._execute_one_by_one(plan)

    def _execute_one_by_one(self, plan: SchedulerOutput) -> ModelOutput:
        sampled, logprobs, failed, last_error = {}, {}, set(), None
        for chunk in plan.chunks:
            try:
                output = self.runner.execute(SchedulerOutput((chunk,)))
            except KVTransferError:
                raise
            except Exception as error:
                log.exception("request %s failed in the engine step; it is failed alone", chunk.request_id)
                failed.add(chunk.request_id)
                last_error = error
                continue
            sampled.update(output.sampled_token_ids)
            logprobs.update(output.logprobs)
        self._count_failed_step(plan, failed, last_error)
        self.num_failed_requests += len(failed)
        return ModelOutput(sampled, logprobs, frozenset(failed))

    def _count_failed_step(self, plan: SchedulerOutput, failed: set[str], error: Exception | None) -> None:
        if len(failed) < len(plan.chunks):
            self._failed_steps_in_a_row, self._failed_prompts = 0, set()
            return
        self._failed_steps_in_a_row += 1
        self._failed_prompts |= {hash(tuple(self.scheduler.requests[rid].prompt_token_ids)) for rid in failed}
        if self._failed_steps_in_a_row >= FATAL_FAILED_STEPS and len(self._failed_prompts) >= 2:
            raise RuntimeError(f"{self._failed_steps_in_a_row} steps in a row failed for every request, over "
                               f"{len(self._failed_prompts)} different prompts ({error!r}): the model cannot run") \
                from error
