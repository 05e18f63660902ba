"""EngineCore: one step of continuous batching, at the level of tokens."""

from __future__ import annotations

from kvserve.outputs import TokenDelta
from kvserve.runner.model_runner import ModelRunner
from kvserve.sched.scheduler import Scheduler


class EngineCore:
    def __init__(self, scheduler: Scheduler, runner: ModelRunner):
        self.scheduler = scheduler
        self.runner = runner

    def step(self) -> list[TokenDelta]:
        plan = self.scheduler.schedule()
        result = self.runner.execute(plan)
        return self.scheduler.update(plan, result)
