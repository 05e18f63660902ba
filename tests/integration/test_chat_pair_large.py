"""The chat pair's large model (Qwen2.5-Coder-1.5B-Instruct): fp32 greedy output equals
transformers' Qwen2ForCausalLM on the same weights.

A module of its own so that it runs after test_chat_pair.py has let its models go: the 1.5B
checkpoint in fp32 (6 GB), our engine's copy and the transformers model over the same tensors
must not share the process's memory with the small model and the server of that module (the
whole suite's process once went past 24 GB).
"""

import pytest
import torch

from kvserve.bench.hf_baseline import hf_greedy, hf_model
from kvserve.model.checkpoint import load_checkpoint
from tests.integration.test_chat_pair import LARGE, QUESTIONS, chat_prompts, check_greedy, release_memory

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def large_checkpoint():
    release_memory()   # whatever the previous module left goes back to the OS first
    return load_checkpoint(LARGE)


def test_large_model_fp32_greedy_equals_transformers_on_the_same_weights(large_checkpoint):
    checkpoint = large_checkpoint
    prompts = chat_prompts(checkpoint, QUESTIONS[1:2])     # a question and the 700-token code prompt
    # 12 tokens, one pass: the prefix-cache rerun is covered by the small model (same code path).
    expected = hf_greedy(hf_model(checkpoint, torch.float32), prompts, 12, batch_size=1)
    release_memory()
    check_greedy(LARGE, checkpoint, prompts, expected, again_from_cache=False)
    release_memory()
    answer = checkpoint.tokenizer.decode(expected[0])
    assert "85" in answer, answer


