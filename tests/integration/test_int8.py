"""--quantization int8 on the real default model keeps its quality: perplexity of the fixed text
within 1% of bf16 through both int8 kernels, and greedy output that starts like bf16's for most prompts."""

import math

import pytest

from kvserve.bench.perplexity import TEXT
from kvserve.config import EngineConfig
from kvserve.engine.engine import Engine
from kvserve.model import quant
from kvserve.sampling import SamplingParams

pytestmark = pytest.mark.integration

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain recursion briefly.",
             "List three prime numbers.", "Translate 'good morning' into Spanish.", "What is 12 times 7?",
             "Name a famous painter.", "How do plants make food?", "Give me a synonym for happy.",
             "What does a CPU do?", "Describe a cat in one sentence.", "Why is the sky blue?"]


@pytest.fixture(scope="module")
def engines(default_checkpoint):
    return {q: Engine(EngineConfig(dtype="bfloat16", quantization=q), default_checkpoint) for q in ("none", "int8")}


def perplexity(engine, chunk_size):
    ids = engine.tokenizer.encode(TEXT.read_text())
    return math.exp(-engine.core.runner.score(ids, chunk_size=chunk_size).double().mean().item())


def test_int8_replaces_every_linear_layer(engines):
    model = engines["int8"].core.runner.model
    assert sum(isinstance(m, quant.Int8Linear) for m in model.modules()) == 30 * 4 + 1   # qkv, o, gate_up, down; head
    assert not any(type(m).__name__ == "Linear" for m in model.modules())


def test_int8_perplexity_within_one_percent_of_bf16(engines):
    bf16 = perplexity(engines["none"], 512)
    wide = perplexity(engines["int8"], 512)                       # chunks of 512 rows: widened int8 weights
    narrow = perplexity(engines["int8"], quant.MAX_INT8_ROWS)     # chunks of 4 rows: the int8 matmul kernel
    assert 10 < bf16 < 60                                         # the model reads English
    assert abs(wide / bf16 - 1) < 0.01, (bf16, wide)
    assert abs(narrow / bf16 - 1) < 0.01, (bf16, narrow)


def test_int8_greedy_output_equals_bf16_for_most_prompts(engines):
    params = SamplingParams(max_tokens=24, temperature=0.0)
    outputs: dict[str, list[list[int]]] = {}
    for mode, engine in engines.items():
        texts = []
        for question in QUESTIONS:     # one at a time: single-stream decode runs the int8 kernel
            prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": question}])
            engine.add(prompt, params)
            tokens = []
            while engine.has_unfinished:
                tokens += [t for o in engine.step() for t in o.token_ids]
            texts.append(tokens)
        outputs[mode] = texts
    # Greedy decoding of a 135M model amplifies any change once two tokens nearly tie, so whole
    # answers diverge sooner or later (bf16 and fp32 themselves agree on 7 of these 12 answers over
    # 24 tokens). Most answers must agree on their first 8 tokens, and some on all 24.
    pairs = list(zip(outputs["none"], outputs["int8"]))
    same_start = sum(a[:8] == b[:8] for a, b in pairs)
    same_all = sum(a == b for a, b in pairs)
    assert same_start >= len(QUESTIONS) * 2 // 3, pairs
    assert same_all >= 2, pairs
