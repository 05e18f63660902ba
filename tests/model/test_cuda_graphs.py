"""CUDA graphs' host side, on the CPU (runner/cuda_graphs.py): the ladder of captured sizes, and
the persistent inputs a captured decode step reads, padded rows included, giving the eager step's
hidden states and cache writes through the Triton kernels (interpreted here). The capture and
replay themselves run in tests/gpu."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from conftest import tiny_checkpoint  # noqa: E402
from kvserve.runner.cuda_graphs import DecodeInputs, graph_ladder, padded_size  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def test_the_ladder_and_the_padded_size():
    assert graph_ladder(1) == (1,)
    assert graph_ladder(6) == (1, 2, 4, 6)
    assert graph_ladder(64) == (1, 2, 4, 8, 16, 32, 48, 64)
    assert graph_ladder(40) == (1, 2, 4, 8, 16, 32, 40)
    ladder = graph_ladder(64)
    assert [padded_size(n, ladder) for n in (1, 3, 8, 9, 17, 64)] == [1, 4, 8, 16, 32, 64]
    assert padded_size(65, ladder) is None
    with pytest.raises(ValueError):
        graph_ladder(0)


def test_filling_pads_with_rows_that_write_nothing():
    inputs = DecodeInputs(max_rows=8, max_blocks_per_seq=4, block_size=4, device=torch.device("cpu"))
    inputs.fill(4, [11, 12, 13], [0, 5, 9], [[7], [2, 3], [1, 6, 4]])
    assert inputs.input_ids[:4].tolist() == [11, 12, 13, 0] and inputs.positions[:4].tolist() == [0, 5, 9, 0]
    assert inputs.slot_mapping[:4].tolist() == [28, 13, 17, -1]        # block 7 slot 0; block 3 slot 1; block 4 slot 1
    assert inputs.seq_lens[:4].tolist() == [1, 6, 10, 0]
    assert inputs.block_table[:3, :3].tolist() == [[7, 0, 0], [2, 3, 0], [1, 6, 4]]
    metadata = inputs.metadata(4, max_seq_len=16)
    assert metadata.query_start_loc.tolist() == [0, 1, 2, 3, 4] and metadata.seq_lens_host == (16,) * 4
    inputs.fill(2, [5], [1], [[3]])                                      # a smaller step after a bigger one
    assert inputs.slot_mapping[:2].tolist() == [13, -1] and inputs.seq_lens[:2].tolist() == [2, 0]


def test_an_eager_step_s_inputs_are_laid_out_as_the_docstring_says():
    """runner/inputs.py: every input comes from one host tensor (one copy to the device a step)."""
    from kvserve.runner.inputs import prepare_inputs
    from kvserve.sampling import SamplingParams
    from kvserve.sched.plan import ScheduledChunk, SchedulerOutput

    params = SamplingParams(max_tokens=4)
    plan = SchedulerOutput((ScheduledChunk("a", (10, 11, 12, 13, 14), 0, (3, 8), True, params),
                            ScheduledChunk("b", (20,), 39, (1, 2, 4, 6, 7, 9, 5, 0, 11, 12), True, params),
                            ScheduledChunk("c", (30, 31), 14, (5, 2, 9, 4), False, params)))
    inputs = prepare_inputs(plan, 4, torch.device("cpu"))
    assert inputs.input_ids.tolist() == [10, 11, 12, 13, 14, 20, 30, 31]
    assert inputs.positions.tolist() == [0, 1, 2, 3, 4, 39, 14, 15]
    assert inputs.metadata.slot_mapping.tolist() == [12, 13, 14, 15, 32, 51, 18, 19]
    assert inputs.metadata.query_start_loc.tolist() == [0, 5, 6, 8]
    assert inputs.metadata.seq_lens.tolist() == [5, 40, 16]
    assert inputs.metadata.block_table.shape == (3, 10)
    assert inputs.metadata.block_table[0].tolist() == [3, 8] + [0] * 8
    assert inputs.metadata.block_table[2, :4].tolist() == [5, 2, 9, 4]
    assert inputs.logits_indices.tolist() == [4, 5] and inputs.sampling_request_ids == ("a", "b")
    assert inputs.metadata.query_start_loc_host == (0, 5, 6, 8) and inputs.metadata.seq_lens_host == (5, 40, 16)
    tensors = [inputs.input_ids, inputs.positions, inputs.logits_indices, inputs.metadata.slot_mapping,
               inputs.metadata.query_start_loc, inputs.metadata.seq_lens, inputs.metadata.block_table]
    assert all(t.data_ptr() % 64 == 0 for t in tensors)        # Triton sees the same alignment every step


def test_a_padded_decode_step_from_the_graph_inputs_equals_the_eager_step():
    pytest.importorskip("triton")
    from kvserve.config import CacheConfig
    from kvserve.runner.inputs import prepare_inputs
    from kvserve.runner.model_runner import ModelRunner
    from kvserve.sampling import SamplingParams
    from kvserve.sched.plan import ScheduledChunk, SchedulerOutput

    checkpoint = tiny_checkpoint()
    runner = ModelRunner(checkpoint.config, checkpoint.weights, CacheConfig(num_blocks=32, block_size=4),
                         torch.float32, torch.device("cpu"), attention="triton")
    params = SamplingParams(max_tokens=4, temperature=0.0)
    tables = [(3, 9, 1), (4,), (12, 5)]
    prompts = [list(range(20, 29)), [7, 8], list(range(40, 46))]
    runner.execute(SchedulerOutput(tuple(ScheduledChunk(f"r{i}", tuple(p), 0, t, True, params)
                                         for i, (p, t) in enumerate(zip(prompts, tables)))))
    decode = tuple(ScheduledChunk(f"r{i}", (100 + i,), len(p), t, True, params)
                   for i, (p, t) in enumerate(zip(prompts, tables)))
    eager_caches = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
    graph_caches = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
    with torch.inference_mode():
        eager_inputs = prepare_inputs(SchedulerOutput(decode), 4, torch.device("cpu"))
        eager = runner.model(eager_inputs.input_ids, eager_inputs.positions, eager_caches, eager_inputs.metadata)
        inputs = DecodeInputs(max_rows=8, max_blocks_per_seq=8, block_size=4, device=torch.device("cpu"))
        inputs.fill(4, [c.token_ids[0] for c in decode], [c.start_position for c in decode],
                    [c.block_ids for c in decode])                       # 3 rows padded to 4
        padded = runner.model(inputs.input_ids[:4], inputs.positions[:4], graph_caches, inputs.metadata(4, 32))
    torch.testing.assert_close(padded[:3], eager, rtol=1e-5, atol=1e-5)
    for (k1, v1), (k2, v2) in zip(eager_caches, graph_caches):       # the padded row wrote nothing
        assert torch.equal(k1, k2) and torch.equal(v1, v2)


def test_the_gpu_kv_budget_leaves_others_the_weights_and_the_activation_peak():
    from kvserve.config import CacheConfig, ConfigError
    from kvserve.runner.model_runner import gpu_kv_budget

    gb = 10**9
    # 140 GB card, 10 GB held by another process, this one has reserved 3 GB (2 GB of weights).
    assert gpu_kv_budget(140 * gb, 127 * gb, 3 * gb, 2 * gb, 1 * gb, 0.9) == 126 * gb - 10 * gb - 2 * gb - 1 * gb
    assert gpu_kv_budget(10 * gb, 1 * gb, 1 * gb, 1 * gb, 1 * gb, 0.5) == 0      # nothing left: 0, not negative
    with pytest.raises(ConfigError, match="gpu-memory-utilization"):
        CacheConfig(gpu_memory_utilization=1.5)
