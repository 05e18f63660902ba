"""The engine on a CUDA device (skipped without one; `scripts/gpu-check.sh` runs these on a GPU
machine): fp32 greedy output equals transformers' token for token on the same weights, with the
torch reference and with the Triton kernels; preemption and prefix-cache hits leave it unchanged;
decode steps replayed from CUDA graphs give the eager steps' tokens.
The Triton kernels' own parity tests (tests/model/test_triton_attention.py) run on CUDA there too."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPTS = [[(7 * i + 13 * j) % 250 + 1 for j in range(10 + 9 * i)] for i in range(8)]


def _engine(model: str, backend: str, checkpoint, **options):
    from kvserve.config import CacheConfig, EngineConfig, SchedulerConfig
    from kvserve.engine.engine import Engine

    cache = {k: options[k] for k in ("num_blocks", "enable_prefix_caching") if k in options}
    scheduler = {k: options[k] for k in ("max_num_seqs", "max_num_batched_tokens", "preemption_mode") if k in options}
    config = EngineConfig(model=model, dtype=options.get("dtype", "float32"), device="cuda", attention_backend=backend,
                          enforce_eager=options.get("enforce_eager", False),
                          cache=CacheConfig(**{"num_blocks": 512, **cache}), scheduler=SchedulerConfig(**scheduler))
    return Engine(config, checkpoint=checkpoint)


def _greedy(engine, prompts, max_tokens: int) -> list[list[int]]:
    from kvserve.sampling import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    ids = [engine.add(list(p), params) for p in prompts]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished:
        for output in engine.step():
            tokens[output.request_id].extend(output.token_ids)
    engine.check_integrity()
    return [tokens[i] for i in ids]


@pytest.mark.parametrize("model,backend", [("random:tiny", "torch"), ("random:tiny", "triton"),
                                           ("random:llama-1b", "triton")])
def test_fp32_greedy_equals_transformers_on_cuda(model, backend):
    from kvserve.bench.hf_baseline import hf_greedy, hf_model
    from kvserve.model.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(model)
    engine = _engine(model, backend, checkpoint)
    assert engine.core.runner.backend.name == backend
    got = _greedy(engine, PROMPTS, 32)
    del engine
    reference = hf_greedy(hf_model(checkpoint).to("cuda"), PROMPTS, 32)
    assert got == reference


def test_preemption_and_prefix_hits_leave_the_triton_output_unchanged():
    from kvserve.model.checkpoint import load_checkpoint

    checkpoint = load_checkpoint("random:tiny")
    shared = [5] * 40
    prompts = [shared + p for p in PROMPTS]
    expected = _greedy(_engine("random:tiny", "triton", checkpoint, enable_prefix_caching=False), prompts, 48)
    tight = _engine("random:tiny", "triton", checkpoint, num_blocks=40, max_num_batched_tokens=64)
    assert _greedy(tight, prompts, 48) == expected
    stats = tight.stats()
    assert stats.num_preemptions > 0 and stats.kv.prefix_hit_tokens > 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graph_decode_gives_the_eager_tokens(dtype):
    from kvserve.model.checkpoint import load_checkpoint

    checkpoint = load_checkpoint("random:tiny")
    graphed = _engine("random:tiny", "triton", checkpoint, dtype=dtype, max_num_seqs=16)
    assert graphed.core.runner.graphs is not None and graphed.core.runner.graphs.ladder == (1, 2, 4, 8, 16)
    eager = _engine("random:tiny", "triton", checkpoint, dtype=dtype, max_num_seqs=16, enforce_eager=True)
    assert eager.core.runner.graphs is None
    prompts = PROMPTS + PROMPTS[:3]                      # 11 rows: padded to 16, then fewer as none finish early
    assert _greedy(graphed, prompts, 40) == _greedy(eager, prompts, 40)


@pytest.mark.parametrize("enforce_eager", [True, False])
def test_a_step_never_waits_for_the_gpu_before_sampling(enforce_eager):
    """No .item(), .tolist(), .cpu() or blocking copy in the forward pass (eager: prefill chunks,
    prefix hits and decode rows mixed; graphs: the decode replays), the logits, nor sampling's
    device side: under torch's sync debug mode a synchronising call raises. Reading the sampled
    ids (and logprobs, in the same transfer) is the step's one sync."""
    from kvserve.model.checkpoint import load_checkpoint

    engine = _engine("random:tiny", "triton", load_checkpoint("random:tiny"), max_num_batched_tokens=48,
                     max_num_seqs=8, enforce_eager=enforce_eager)
    runner = engine.core.runner
    checked = []

    def no_sync(function):
        def run(*args, **kwargs):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return function(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                checked.append(function.__name__)
        return run

    runner.model.forward = no_sync(runner.model.forward)
    runner.model.compute_logits = no_sync(runner.model.compute_logits)
    runner.sampler.on_device = no_sync(runner.sampler.on_device)
    if runner.graphs is not None:
        runner.graphs.run = no_sync(runner.graphs.run)
    shared = [5] * 20
    # A step that raises is retried request by request and its requests fail alone (engine/core.py):
    # so the test counts failures and tokens, not exceptions.
    assert [len(t) for t in _greedy(engine, [shared + p for p in PROMPTS], 12)] == [12] * len(PROMPTS)
    assert "forward" in checked and "compute_logits" in checked
    assert enforce_eager or "run" in checked
    # Sampling: temperature, top-k, top-p, a seeded request and logprobs run on the device
    # without waiting for it; the one transfer of their results comes after.
    from kvserve.sampling import FinishReason, SamplingParams

    for i, prompt in enumerate(PROMPTS[:4]):
        engine.add(list(prompt), SamplingParams(max_tokens=6, temperature=0.8, top_k=20, top_p=0.9,
                                                seed=i if i % 2 else None, logprobs=3, ignore_eos=True))
    finished = []
    while engine.has_unfinished:
        finished += [o for o in engine.step() if o.finished]
    assert [(o.finish_reason, o.stats.num_output_tokens) for o in finished] == [(FinishReason.LENGTH, 6)] * 4
    assert "on_device" in checked and engine.core.num_failed_requests == 0
