"""Tokenizers and chat templates, from GGUF metadata or a Hugging Face tokenizer.json.

    Tokenizer (Protocol)   what the server and engine use; tests fake it
    HFTokenizer            a `tokenizers.Tokenizer` + special-token ids + a chat template
    ByteTokenizer          bytes as tokens, for tests (vocab 260, matches loader.TINY_CONFIG)
    ChatTemplate           a Jinja chat template rendered the way Hugging Face renders it
    load_tokenizer(path)   GGUF file or Hugging Face directory -> HFTokenizer

A GGUF carries no tokenizer.json: the vocabulary, merges, token types and special ids are
metadata, and the pre-tokenizer is only named (`tokenizer.ggml.pre`). We rebuild the byte-level
BPE tokenizer from those, with the split rules llama.cpp uses for that name (llama-vocab.cpp).
"""

from __future__ import annotations

import bisect

import datetime
import json
from collections.abc import Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer

from kvserve.model.loader import (ModelLoadError, gguf_eos_token_ids, gguf_field, hf_eos_token_ids,
                                  is_gguf_file, open_gguf)


class ChatTemplateError(ValueError):
    """The model has no chat template, the template failed, or the messages cannot be rendered."""


class Tokenizer(Protocol):
    vocab_size: int
    eos_token_ids: frozenset[int]   # every end token the model declares
    bos_token_id: int | None
    special_ids: frozenset[int]     # control tokens (turn markers, BOS/EOS): never text

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def encode_with_boundaries(self, text: str, char_positions: Sequence[int],
                               add_special_tokens: bool = True) -> tuple[list[int], list[int]]:
        """encode(text), plus for each character position the number of leading tokens that end at
        or before it (a token straddling the position is not counted)."""
        ...

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str: ...


# --------------------------------------------------------------------------------------------
# Chat templates


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (HF marks assistant text for training masks): renders the body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"chat template error: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # Like HF: no HTML escaping (unlike jinja2's built-in tojson), non-ASCII kept.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.datetime.now().strftime(format)


class ChatTemplate:
    """A chat template compiled once, rendered like transformers' `apply_chat_template(tokenize=False)`.

    Environment: sandboxed and immutable, trim_blocks + lstrip_blocks, loop controls,
    `raise_exception`, `strftime_now`, a JSON `tojson` filter. Variables: messages, tools,
    add_generation_prompt, and the special token strings (bos_token, eos_token).
    """

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None) -> None:
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as error:
            raise ChatTemplateError(f"the chat template does not compile: {error}") from error
        self.source = source
        self._special_tokens = dict(special_tokens or {})

    def render(self, messages: list[dict], add_generation_prompt: bool = True,
               tools: list[dict] | None = None) -> str:
        try:
            return self._template.render(
                messages=[_flatten_content(m) for m in messages], tools=tools,
                add_generation_prompt=add_generation_prompt, **self._special_tokens)
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as error:
            raise ChatTemplateError(f"chat template error: {error}") from error


def _flatten_content(message: dict) -> dict:
    """OpenAI content parts ([{"type": "text", "text": ...}, ...]) -> one string; other messages as is."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ChatTemplateError(f"only text content parts are supported, got a {kind!r} part")
        texts.append(part["text"])
    return {**message, "content": "".join(texts)}


def _no_template(messages: list[dict], add_generation_prompt: bool = True,
                 tools: list[dict] | None = None) -> str:
    raise ChatTemplateError("this model has no chat template; use the completions API with a plain prompt")


# --------------------------------------------------------------------------------------------
# Hugging Face `tokenizers` based tokenizer


class HFTokenizer:
    """A `tokenizers.Tokenizer` with the model's special tokens and chat template.

    BOS/EOS: when `use_post_processor` is False we add them ourselves (`add_bos`, `add_eos`);
    when True the tokenizer.json's own post-processor decides (Llama 3 style directories).
    Special tokens written in the text (like `<|im_start|>`) always encode as their single ids.
    """

    def __init__(self, tokenizer: RustTokenizer, *, bos_token_id: int | None, eos_token_ids: Sequence[int],
                 chat_template: str | None, add_bos: bool = False, add_eos: bool = False,
                 use_post_processor: bool = False) -> None:
        if not eos_token_ids:
            raise ModelLoadError("the tokenizer declares no end-of-sequence token")
        self._tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_ids[0]  # the primary one: what templates call eos_token
        self.eos_token_ids = frozenset(eos_token_ids)
        self._add_bos = add_bos and bos_token_id is not None
        self._add_eos = add_eos
        self._use_post_processor = use_post_processor
        self.special_ids = frozenset(
            {i for i, added in tokenizer.get_added_tokens_decoder().items() if added.special}
            | self.eos_token_ids | ({bos_token_id} if bos_token_id is not None else set()))
        special = {"bos_token": self._token_text(bos_token_id), "eos_token": self._token_text(self.eos_token_id)}
        self.chat_template = (
            ChatTemplate(chat_template, {k: v for k, v in special.items() if v is not None})
            if chat_template else None)

    @classmethod
    def from_gguf(cls, path: Path) -> HFTokenizer:
        return _tokenizer_from_gguf(Path(path))

    @classmethod
    def from_directory(cls, directory: Path) -> HFTokenizer:
        return _tokenizer_from_directory(Path(directory))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self._use_post_processor:
            return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self._add_bos:
            ids = [self.bos_token_id, *ids]
        if add_special_tokens and self._add_eos:
            ids = [*ids, self.eos_token_id]
        return ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def encode_with_boundaries(self, text: str, char_positions: Sequence[int],
                               add_special_tokens: bool = True) -> tuple[list[int], list[int]]:
        if self._use_post_processor:
            encoding = self._tokenizer.encode(text, add_special_tokens=add_special_tokens)
            ids, ends, extra = encoding.ids, [end for _, end in encoding.offsets], 0
        else:
            encoding = self._tokenizer.encode(text, add_special_tokens=False)
            ids, ends = encoding.ids, [end for _, end in encoding.offsets]
            extra = 1 if add_special_tokens and self._add_bos else 0
            ids = self.encode(text, add_special_tokens) if add_special_tokens else ids
        return ids, [extra + bisect.bisect_right(_running_max(ends), p) for p in char_positions]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        if self.chat_template is None:
            return _no_template(messages, add_generation_prompt, tools)
        return self.chat_template.render(messages, add_generation_prompt, tools)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def _token_text(self, token_id: int | None) -> str | None:
        return None if token_id is None else self._tokenizer.id_to_token(token_id)


def _running_max(values: Sequence[int]) -> list[int]:
    """Token end offsets made non-decreasing, so a prefix count is one bisection."""
    out, top = [], 0
    for v in values:
        top = max(top, v)
        out.append(top)
    return out


def load_tokenizer(path: Path) -> HFTokenizer:
    """The tokenizer of a GGUF file or of a Hugging Face model directory."""
    path = Path(path)
    if path.is_dir():
        return HFTokenizer.from_directory(path)
    if is_gguf_file(path):
        return HFTokenizer.from_gguf(path)
    raise ModelLoadError(f"{path} is neither a GGUF file nor a Hugging Face model directory")


# --- from GGUF -------------------------------------------------------------------------------

# GPT-2's split: contractions, letters, numbers, other symbols, whitespace runs.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Llama 3's split (numbers in groups of up to 3, case-insensitive contractions).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2's split (like Llama 3 but one digit at a time).
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level_split(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _gpt2_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # ByteLevel(use_regex=True) splits with _GPT2_SPLIT itself.
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _starcoder_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # llama.cpp: "\p{N}" first, then the GPT-2 split; this is also exactly SmolLM2's and
    # StarCoder's tokenizer.json (Digits(individual_digits) + ByteLevel).
    return pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])


# `tokenizer.ggml.pre` -> (pre-tokenizer factory, BPE ignore_merges). The groups follow the
# `switch (pre_type)` of llama.cpp's llama-vocab.cpp; llama3 also looks whole words up in the
# vocabulary before merging (ignore_merges), as in Llama 3's tokenizer.json.
_GGUF_PRE_TOKENIZERS = {
    "default": (_gpt2_pre_tokenizer, False),
    "gpt-2": (_gpt2_pre_tokenizer, False),
    "gpt2": (_gpt2_pre_tokenizer, False),
    "mpt": (_gpt2_pre_tokenizer, False),
    "olmo": (_gpt2_pre_tokenizer, False),
    "jais": (_gpt2_pre_tokenizer, False),
    "smollm": (_starcoder_pre_tokenizer, False),
    "starcoder": (_starcoder_pre_tokenizer, False),
    "refact": (_starcoder_pre_tokenizer, False),
    "command-r": (_starcoder_pre_tokenizer, False),
    "codeshell": (_starcoder_pre_tokenizer, False),
    "exaone": (_starcoder_pre_tokenizer, False),
    "minerva-7b": (_starcoder_pre_tokenizer, False),
    "llama3": (lambda: _byte_level_split(_LLAMA3_SPLIT), True),
    "llama-v3": (lambda: _byte_level_split(_LLAMA3_SPLIT), True),
    "llama-bpe": (lambda: _byte_level_split(_LLAMA3_SPLIT), True),
    "smaug-bpe": (lambda: _byte_level_split(_LLAMA3_SPLIT), False),
    "dbrx": (lambda: _byte_level_split(_LLAMA3_SPLIT), False),
    "falcon3": (lambda: _byte_level_split(_LLAMA3_SPLIT), False),
    "qwen2": (lambda: _byte_level_split(_QWEN2_SPLIT), False),
    "deepseek-r1-qwen": (lambda: _byte_level_split(_QWEN2_SPLIT), False),
    "stablelm2": (lambda: _byte_level_split(_QWEN2_SPLIT), False),
}

_TOKEN_TYPE_CONTROL = 3       # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL: special, skipped on decode
_TOKEN_TYPE_USER_DEFINED = 4  # added token matched whole in text, kept on decode


def _tokenizer_from_gguf(path: Path) -> HFTokenizer:
    reader = open_gguf(path)
    kind = gguf_field(reader, "tokenizer.ggml.model", None)
    if kind != "gpt2":
        raise ModelLoadError(
            f"GGUF file {path} has a {kind!r} tokenizer; kvserve reads only byte-level BPE ('gpt2') "
            "tokenizers from GGUF (SentencePiece 'llama' tokenizers are unsupported); use the model's "
            "Hugging Face directory instead")
    pre = gguf_field(reader, "tokenizer.ggml.pre", "default")
    if pre not in _GGUF_PRE_TOKENIZERS:
        raise ModelLoadError(
            f"GGUF file {path}: pre-tokenizer {pre!r} is not supported; supported: "
            f"{', '.join(sorted(_GGUF_PRE_TOKENIZERS))}")
    tokens: list[str] = gguf_field(reader, "tokenizer.ggml.tokens")
    token_types: list[int] = gguf_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in gguf_field(reader, "tokenizer.ggml.merges")]
    make_pre_tokenizer, ignore_merges = _GGUF_PRE_TOKENIZERS[pre]

    vocab = {token: token_id for token_id, token in enumerate(tokens)}
    tokenizer = RustTokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer = make_pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    _add_gguf_special_tokens(tokenizer, vocab, tokens, token_types)
    return HFTokenizer(
        tokenizer,
        bos_token_id=gguf_field(reader, "tokenizer.ggml.bos_token_id", None),
        eos_token_ids=gguf_eos_token_ids(reader),
        chat_template=gguf_field(reader, "tokenizer.chat_template", None),
        add_bos=bool(gguf_field(reader, "tokenizer.ggml.add_bos_token", False)),
        add_eos=bool(gguf_field(reader, "tokenizer.ggml.add_eos_token", False)),
    )


def _add_gguf_special_tokens(tokenizer: RustTokenizer, vocab: dict[str, int], tokens: list[str],
                             token_types: list[int]) -> None:
    """Control tokens become special tokens, user-defined ones plain added tokens: both match whole.

    They already have ids in the vocabulary, and `tokenizers` reuses those ids.
    """
    control = [AddedToken(t, special=True, normalized=False)
               for t, kind in zip(tokens, token_types) if kind == _TOKEN_TYPE_CONTROL]
    user = [AddedToken(t, special=False, normalized=False)
            for t, kind in zip(tokens, token_types) if kind == _TOKEN_TYPE_USER_DEFINED]
    tokenizer.add_special_tokens(control)
    tokenizer.add_tokens(user)
    for added in control + user:
        assert tokenizer.token_to_id(added.content) == vocab[added.content], added.content


# --- from a Hugging Face directory -----------------------------------------------------------


def _tokenizer_from_directory(directory: Path) -> HFTokenizer:
    file = directory / "tokenizer.json"
    if not file.is_file():
        raise ModelLoadError(
            f"directory {directory} has no tokenizer.json (slow sentencepiece-only tokenizers are unsupported)")
    try:
        tokenizer = RustTokenizer.from_file(str(file))
    except Exception as error:  # tokenizers raises a bare Exception on bad files
        raise ModelLoadError(f"cannot read {file}: {error}") from error
    config = _read_tokenizer_config(directory)
    bos_token_id = _special_token_id(tokenizer, config.get("bos_token"), file)
    eos_token_id = _special_token_id(tokenizer, config.get("eos_token"), file)
    eos_ids = [i for i in (eos_token_id,) if i is not None] + list(hf_eos_token_ids(directory))
    # With explicit add_bos_token/add_eos_token we add them ourselves and bypass the post-processor
    # (what transformers' Llama tokenizers do); otherwise tokenizer.json's post-processor decides.
    explicit = "add_bos_token" in config or "add_eos_token" in config
    return HFTokenizer(
        tokenizer,
        bos_token_id=bos_token_id,
        eos_token_ids=list(dict.fromkeys(eos_ids)),
        chat_template=_directory_chat_template(directory, config),
        add_bos=bool(config.get("add_bos_token", False)),
        add_eos=bool(config.get("add_eos_token", False)),
        use_post_processor=not explicit,
    )


def _read_tokenizer_config(directory: Path) -> dict:
    file = directory / "tokenizer_config.json"
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"cannot read {file}: {error}") from error


def _special_token_id(tokenizer: RustTokenizer, token: str | dict | None, file: Path) -> int | None:
    """tokenizer_config.json spells special tokens as a string or as {"content": ...}."""
    if token is None:
        return None
    text = token["content"] if isinstance(token, dict) else token
    token_id = tokenizer.token_to_id(text)
    if token_id is None:
        raise ModelLoadError(f"special token {text!r} of {file.parent / 'tokenizer_config.json'} is not in {file}")
    return token_id


def _directory_chat_template(directory: Path, config: dict) -> str | None:
    """tokenizer_config.json's chat_template (a string, or a list of named templates), else chat_template.jinja."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template}
        template = named.get("default")
    if template is None and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    return template


# --------------------------------------------------------------------------------------------
# Byte tokenizer for tests


class ByteTokenizer:
    """Token ids 0..255 are the raw UTF-8 bytes; 256..259 are <bos>, <eos>, <|im_start|>, <|im_end|>.

    Special tokens written in the text are NOT parsed (they encode as their bytes). Decoding a
    cut-off multi-byte character gives U+FFFD, as real byte-level BPE tokenizers do. A larger
    `vocab_size` (a random model of a real shape) adds ids that decode as "<id>".
    """

    BOS = 256
    EOS = 257
    IM_START = 258
    IM_END = 259
    SPECIAL_TEXT = MappingProxyType({BOS: "<bos>", EOS: "<eos>", IM_START: "<|im_start|>", IM_END: "<|im_end|>"})
    TEMPLATE = ("{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant: {% endif %}")

    def __init__(self, vocab_size: int = 260) -> None:
        if vocab_size < 260:
            raise ValueError(f"a byte tokenizer needs at least 260 ids, not {vocab_size}")
        self.vocab_size = vocab_size
        self.bos_token_id: int | None = self.BOS
        self.eos_token_ids = frozenset({self.EOS})
        self.special_ids = frozenset(self.SPECIAL_TEXT)
        self._template = ChatTemplate(self.TEMPLATE, {"bos_token": "<bos>", "eos_token": "<eos>"})

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.BOS, *ids] if add_special_tokens else ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        pieces: list[str] = []
        run = bytearray()  # consecutive bytes decode together, so multi-byte characters survive
        for token_id in token_ids:
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
            if token_id < 256:
                run.append(token_id)
                continue
            pieces.append(run.decode("utf-8", errors="replace"))
            run.clear()
            if token_id not in self.SPECIAL_TEXT:
                pieces.append(f"<{token_id}>")
            elif not skip_special_tokens:
                pieces.append(self.SPECIAL_TEXT[token_id])
        pieces.append(run.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def encode_with_boundaries(self, text: str, char_positions: Sequence[int],
                               add_special_tokens: bool = True) -> tuple[list[int], list[int]]:
        extra = 1 if add_special_tokens else 0
        return self.encode(text, add_special_tokens), [extra + len(text[:p].encode("utf-8")) for p in char_positions]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        return self._template.render(messages, add_generation_prompt, tools)
