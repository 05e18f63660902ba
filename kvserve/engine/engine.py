"""Engine: the synchronous engine. Text in, text deltas out.

    make_request(prompt, params) ──▶ Request (tokenized, validated; no engine state touched)
    add_request(request)         ──▶ scheduler.waiting
    step()  = core.step() → per-request incremental detokenizer → RequestOutput deltas
              (a stop string found in the text finishes its request before the next step)

AsyncEngine drives one of these on a background thread; LLM.generate drives one inline.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

from kvserve.config import EngineConfig
from kvserve.engine.core import EngineCore
from kvserve.engine.detokenizer import IncrementalDetokenizer
from kvserve.kv.manager import KVCacheManager
from kvserve.model.checkpoint import Checkpoint, load_checkpoint
from kvserve.model.tokenizer import Tokenizer
from kvserve.outputs import RequestOutput, RequestStats, TokenDelta
from kvserve.request import Request
from kvserve.runner.model_runner import ModelRunner, resolve_device, resolve_dtype, resolve_quantization
from kvserve.sampling import FinishReason, InvalidRequestError, SamplingParams
from kvserve.sched.scheduler import Scheduler, SchedulerStats

log = logging.getLogger(__name__)


@dataclass
class _Tracked:
    request: Request
    detokenizer: IncrementalDetokenizer


class EngineFront:
    """What a request needs before it reaches a model: the config, the tokenizer and the limits it
    is validated against. `Engine` is one; a scale-out ingress holds one without any weights
    (kvserve/cluster), so that it tokenizes and validates exactly as the replicas do."""

    def __init__(self, config: EngineConfig, model_config, tokenizer: Tokenizer, max_model_len: int):
        self.config = config
        self.model_config = model_config
        self.tokenizer = tokenizer
        self._max_model_len = max_model_len
        self.eos_token_ids = frozenset(model_config.eos_token_ids) | frozenset(tokenizer.eos_token_ids)
        self._ids = itertools.count()

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    def make_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                     *, cache_salt: str | None = None, priority: int = 0,
                     checkpoints: tuple[tuple[int, float], ...] = (), background: bool = False,
                     tenant: str | None = None, weight: float = 1.0) -> Request:
        """Tokenize and validate. Touches no engine state, so any thread may call it."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("the prompt is empty", "prompt")
            token_ids = self.tokenizer.encode(prompt)
        else:
            token_ids = list(prompt)
        if not token_ids:
            raise InvalidRequestError("the prompt is empty", "prompt")
        vocab_size = self.model_config.vocab_size
        if any(not 0 <= t < vocab_size for t in token_ids):
            raise InvalidRequestError(f"prompt token ids must lie in [0, {vocab_size})", "prompt")
        if len(token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(token_ids)} tokens; this model's context allows at most "
                f"{self.max_model_len - 1} prompt tokens (--max-model-len {self.max_model_len})", "prompt")
        request_id = request_id or f"req-{next(self._ids)}"
        return Request(request_id, token_ids, params, self.eos_token_ids, cache_salt=cache_salt, priority=priority,
                       checkpoints=checkpoints, background=background, tenant=tenant, weight=weight)


def context_limit(config: EngineConfig, model_config) -> int:
    """--max-model-len within the model's own context (the KV pool may cap it further)."""
    context = model_config.max_position_embeddings
    return min(config.scheduler.max_model_len or context, context)


class Engine(EngineFront):
    def __init__(self, config: EngineConfig, checkpoint: Checkpoint | None = None):
        """`checkpoint` overrides loading `config.model` (tests reuse one loaded checkpoint)."""
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)   # resolved once, here
        self.quantization = resolve_quantization(config.quantization, config.dtype, self.device,
                                                 config.attention_backend)
        if checkpoint is None:
            checkpoint = load_checkpoint(config.model, seed=config.seed,
                                         dtype=ModelRunner.weights_dtype(self.dtype, self.quantization))
        runner = ModelRunner(checkpoint.config, checkpoint.weights, config.cache, self.dtype, self.device, config.seed,
                             attention=config.attention_backend, quantization=self.quantization,
                             max_num_seqs=config.scheduler.max_num_seqs,
                             max_model_len=context_limit(config, checkpoint.config), enforce_eager=config.enforce_eager,
                             max_num_batched_tokens=config.scheduler.max_num_batched_tokens)
        kv = KVCacheManager(runner.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching,
                            pin_budget_fraction=config.cache.pin_budget_fraction,
                            num_host_blocks=runner.num_host_blocks, num_disk_blocks=runner.num_disk_blocks)
        self.core = EngineCore(Scheduler(config.scheduler, kv, context_limit(config, checkpoint.config),
                                         costs=runner.measure_costs()), runner)
        super().__init__(config, checkpoint.config, checkpoint.tokenizer, self.scheduler.max_model_len)
        del checkpoint
        self._tracked: dict[str, _Tracked] = {}

    # ---- intake ------------------------------------------------------------------------------
    @property
    def scheduler(self) -> Scheduler:
        return self.core.scheduler

    @property
    def max_model_len(self) -> int:
        return self.scheduler.max_model_len

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)
        detokenizer = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, request.sampling_params.stop)
        self._tracked[request.request_id] = _Tracked(request, detokenizer)

    def add(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None, **kwargs) -> str:
        request = self.make_request(prompt, params, request_id, **kwargs)
        self.add_request(request)
        return request.request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        """Finish a request now; its blocks are free when this returns. The final output, or None
        if the request is unknown or already finished."""
        tracked = self._tracked.pop(request_id, None)
        if tracked is None or not self.scheduler.abort(request_id):
            return None
        return self._output(tracked.request, "", (), None, FinishReason.ABORT)

    # ---- the loop ----------------------------------------------------------------------------
    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    def step(self) -> list[RequestOutput]:
        return [self._process(delta) for delta in self.core.step()]

    def _process(self, delta: TokenDelta) -> RequestOutput:
        tracked = self._tracked[delta.request_id]
        text = tracked.detokenizer.push(delta.new_token_ids)
        finish_reason = delta.finish_reason
        if text.stop_hit:
            if finish_reason is None:
                self.scheduler.finish(delta.request_id, FinishReason.STOP)
            finish_reason = FinishReason.STOP
            new_text = text.text
        else:
            new_text = text.text + (tracked.detokenizer.flush() if finish_reason is not None else "")
        if finish_reason is not None:
            del self._tracked[delta.request_id]
        return self._output(tracked.request, new_text, delta.new_token_ids, delta.logprobs, finish_reason)

    @staticmethod
    def _output(request: Request, text: str, token_ids: tuple[int, ...], logprobs, finish_reason) -> RequestOutput:
        queue_time = None
        if request.first_scheduled_time is not None:
            queue_time = request.first_scheduled_time - request.arrival_time
        stats = RequestStats(request.num_prompt_tokens, request.num_cached_tokens or 0,
                             request.num_output_tokens, request.num_tokens_run, queue_time,
                             request.num_cache_write_tokens,
                             tuple(sorted(request.cache_writes.items(), reverse=True)))
        return RequestOutput(request.request_id, text, token_ids, logprobs, finish_reason, stats)

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    def cache_report(self) -> dict:
        """The KV cache as `GET /v1/cache` shows it (call on the engine thread)."""
        kv = self.scheduler.kv
        stats = kv.stats()
        block_bytes = sum(k.nbytes + v.nbytes for k, v in self.core.runner.kv_caches) // stats.num_blocks
        hit_rate = stats.prefix_hit_tokens / stats.prefix_queried_tokens if stats.prefix_queried_tokens else 0.0
        try:
            self.check_integrity()
            integrity = "ok"
        except AssertionError as error:   # reported, not raised: the soak bench reads it
            integrity = f"violated: {error}"
        return {
            "integrity": integrity,
            "requests": {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting)},
            "block_size": kv.block_size, "num_blocks": stats.num_blocks,
            "blocks": {"used": stats.num_used_blocks, "cached": stats.num_cached_blocks,
                       "pinned": stats.num_pinned_blocks, "free": stats.num_free_blocks},
            "bytes": {"device": {"capacity": block_bytes * stats.num_blocks,
                                 "used": block_bytes * stats.num_used_blocks,
                                 "cached": block_bytes * stats.num_cached_blocks},
                      "host": {"capacity": block_bytes * stats.num_host_slots,
                               "used": block_bytes * stats.num_host_blocks},
                      "disk": {"capacity": block_bytes * stats.disk_capacity_blocks,
                               "used": block_bytes * stats.num_disk_blocks}},
            "host_tier": {"slots": stats.num_host_slots, "blocks": stats.num_host_blocks,
                          "hit_blocks": stats.host_hit_blocks, "evicted_blocks": stats.blocks_evicted_host},
            "disk_tier": {"capacity_blocks": stats.disk_capacity_blocks, "blocks": stats.num_disk_blocks,
                          "hit_blocks": stats.disk_hit_blocks, "evicted_blocks": stats.blocks_evicted_disk},
            "prefix_cache": {"queried_tokens": stats.prefix_queried_tokens, "hit_tokens": stats.prefix_hit_tokens,
                             "hit_rate": round(hit_rate, 4)},
            "pins": kv.pinned_prefixes(),
        }

    def flush_cache(self, include_pinned: bool = False) -> int:
        """Drop cached KV nobody is using (and pins too, if asked). Returns the blocks dropped."""
        return self.scheduler.kv.flush(include_pinned)

    def check_integrity(self) -> None:
        self.scheduler.check_integrity()
