"""LLM.generate: the offline batch API, a consumer of the engine's delta stream."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tqdm import tqdm

from kvserve.config import EngineConfig
from kvserve.engine.engine import Engine
from kvserve.model.checkpoint import Checkpoint
from kvserve.outputs import RequestOutput, RequestStats, TokenLogprob
from kvserve.sampling import FinishReason, SamplingParams


@dataclass(frozen=True)
class Completion:
    request_id: str
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None
    finish_reason: FinishReason
    stats: RequestStats


class LLM:
    def __init__(self, config: EngineConfig | None = None, checkpoint: Checkpoint | None = None, **engine_options):
        self.engine = Engine(config or EngineConfig(**engine_options), checkpoint)

    def generate(self, prompts: Sequence[str | list[int]], params: SamplingParams | Sequence[SamplingParams],
                 progress: bool = False) -> list[Completion]:
        """Run every prompt to completion, batched by the scheduler; results in prompt order."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        requests = [self.engine.make_request(p, sp) for p, sp in zip(prompts, params)]   # validate all first
        for request in requests:
            self.engine.add_request(request)
        collected: dict[str, list[RequestOutput]] = {r.request_id: [] for r in requests}
        with tqdm(total=len(requests), disable=not progress, desc="generate", unit="req") as bar:
            while self.engine.has_unfinished:
                for output in self.engine.step():
                    collected[output.request_id].append(output)
                    bar.update(output.finished)
        return [_join(collected[r.request_id]) for r in requests]


def _join(outputs: list[RequestOutput]) -> Completion:
    last = outputs[-1]
    assert last.finish_reason is not None
    logprobs = None
    if any(o.logprobs is not None for o in outputs):
        logprobs = tuple(lp for o in outputs for lp in (o.logprobs or ()))
    return Completion(last.request_id, "".join(o.text for o in outputs),
                      tuple(t for o in outputs for t in o.token_ids), logprobs, last.finish_reason, last.stats)
