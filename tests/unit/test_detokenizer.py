"""IncrementalDetokenizer: UTF-8 safety, prompt context, exact stop strings, flush."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from kvserve.engine.detokenizer import DetokenizedDelta, IncrementalDetokenizer

FFFD = "\ufffd"
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None)


class FakeByteTokenizer:
    """ids 0..255 are bytes; decode is lossy UTF-8, like byte-level tokenizers."""

    vocab_size = 256
    eos_token_ids: tuple[int, ...] = ()

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return bytes(token_ids).decode("utf-8", errors="replace")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))


BYTES = FakeByteTokenizer()

_BPE_CORPUS = [
    "Hello world, this is a test of the tokenizer.",
    "Größe über naïve café — déjà vu, smörgåsbord.",
    "日本語のテキストです。東京は大きい。",
    "emoji 😀🎉 and more 😀 with 👍🏽 skin tones",
    "the quick brown fox jumps over the lazy dog",
]


@functools.cache
def bpe() -> Tokenizer:
    """A small real byte-level BPE (GPT-2 style); its merges split multi-byte characters."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"], show_progress=False)
    tokenizer.train_from_iterator(_BPE_CORPUS * 5, trainer)
    return tokenizer


def chunked(token_ids: Sequence[int], sizes: Sequence[int]) -> list[list[int]]:
    """Split token_ids into consecutive chunks, cycling through sizes (each ≥ 1)."""
    chunks, start, i = [], 0, 0
    while start < len(token_ids):
        size = sizes[i % len(sizes)]
        chunks.append(list(token_ids[start:start + size]))
        start, i = start + size, i + 1
    return chunks


def run(detok: IncrementalDetokenizer, chunks: Sequence[Sequence[int]]) -> tuple[list[DetokenizedDelta], str]:
    """Push chunks until done or a stop hit; return the deltas and flush()'s text."""
    deltas = []
    for chunk in chunks:
        deltas.append(detok.push(chunk))
        if deltas[-1].stop_hit:
            break
    return deltas, detok.flush()


def reference_stop_cut(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Char-level spec: stop where a stop string first completes; cut at its start."""
    for end in range(1, len(text) + 1):
        starts = [end - len(s) for s in stop if end >= len(s) and text[end - len(s):end] == s]
        if starts:
            return text[:min(starts)], True
    return text, False


chunk_sizes = st.lists(st.integers(1, 4), min_size=1, max_size=6)
prompt_texts = st.text(max_size=8)
valid_texts = st.text(st.characters(blacklist_characters=FFFD, blacklist_categories=("Cs",)), max_size=30)


# ---------------------------------------------------------------- properties


@PROPERTY_SETTINGS
@given(st.lists(st.integers(0, 255), max_size=40), chunk_sizes, prompt_texts)
def test_random_bytes_stream_equals_full_decode(output_ids, sizes, prompt):
    detok = IncrementalDetokenizer(BYTES, BYTES.encode(prompt))
    deltas, tail = run(detok, chunked(output_ids, sizes))
    streamed = "".join(d.text for d in deltas) + tail
    assert streamed == BYTES.decode(output_ids).rstrip(FFFD)
    assert streamed == detok.output_text


@PROPERTY_SETTINGS
@given(st.data(), chunk_sizes, prompt_texts)
def test_random_bpe_tokens_stream_equals_full_decode(data, sizes, prompt):
    tokenizer = bpe()
    output_ids = data.draw(st.lists(st.integers(0, tokenizer.get_vocab_size() - 1), max_size=30))
    skip_special = data.draw(st.booleans())
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode(prompt).ids, skip_special_tokens=skip_special)
    deltas, tail = run(detok, chunked(output_ids, sizes))
    full = tokenizer.decode(output_ids, skip_special_tokens=skip_special)
    assert "".join(d.text for d in deltas) + tail == full.rstrip(FFFD)


@PROPERTY_SETTINGS
@given(valid_texts, chunk_sizes, prompt_texts, st.booleans())
def test_valid_utf8_never_emits_a_split_character(text, sizes, prompt, use_bpe):
    if use_bpe:
        tokenizer, prompt_ids, output_ids = bpe(), bpe().encode(prompt).ids, bpe().encode(text).ids
    else:
        tokenizer, prompt_ids, output_ids = BYTES, BYTES.encode(prompt), BYTES.encode(text)
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    deltas, tail = run(detok, chunked(output_ids, sizes))
    assert all(FFFD not in d.text for d in deltas)
    assert "".join(d.text for d in deltas) + tail == tokenizer.decode(output_ids) == text
    assert tail == ""                     # valid text completes within the pushes


@PROPERTY_SETTINGS
@given(st.data(), chunk_sizes, st.booleans())
def test_stop_strings_cut_exactly(data, sizes, use_bpe):
    alphabet = "ab é😀"
    text = data.draw(st.text(alphabet, max_size=24))
    stop = data.draw(st.lists(st.text(alphabet, min_size=1, max_size=3), min_size=1, max_size=3))
    tokenizer = bpe() if use_bpe else BYTES
    output_ids = tokenizer.encode(text).ids if use_bpe else tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, [], stop=stop)
    deltas, tail = run(detok, chunked(output_ids, sizes))
    expected, expect_stop = reference_stop_cut(text, stop)
    streamed = "".join(d.text for d in deltas) + tail
    assert streamed == expected
    assert deltas[-1].stop_hit if expect_stop else not any(d.stop_hit for d in deltas)
    assert not any(s in streamed for s in stop)
    assert all(FFFD not in d.text for d in deltas)


# ---------------------------------------------------------------- examples


def push_texts(detok: IncrementalDetokenizer, pieces: Sequence[str]) -> list[DetokenizedDelta]:
    """Push each piece's bytes as one chunk (byte tokenizer)."""
    return [detok.push(BYTES.encode(piece)) for piece in pieces]


def test_emoji_split_over_byte_tokens_is_held_until_complete():
    detok = IncrementalDetokenizer(BYTES, [])
    deltas = [detok.push([b]) for b in "a😀b".encode()]
    assert [d.text for d in deltas] == ["a", "", "", "", "😀", "b"]


def test_character_split_by_bpe_merges_is_held_until_complete():
    tokenizer = bpe()
    ids = tokenizer.encode("東京 日本").ids
    pieces = [tokenizer.decode([i]) for i in ids]
    assert any(FFFD in p for p in pieces), "fixture should split a character across tokens"
    detok = IncrementalDetokenizer(tokenizer, [])
    deltas = [detok.push([i]) for i in ids]
    assert all(FFFD not in d.text for d in deltas)
    assert "".join(d.text for d in deltas) == "東京 日本"


def test_prompt_context_gives_the_first_token_its_leading_space():
    # SentencePiece-style: "▁world" decodes to "world" alone but " world" after another word.
    tokenizer = Tokenizer(models.WordLevel({"<unk>": 0, "▁hello": 1, "▁world": 2, "!": 3}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    assert tokenizer.decode([2]) == "world"
    detok = IncrementalDetokenizer(tokenizer, prompt_token_ids=[1])
    assert [detok.push([t]).text for t in (2, 2, 3)] == [" world", " world", "!"]
    assert IncrementalDetokenizer(tokenizer, []).push([2, 2]).text == "world world"


def test_prompt_text_is_never_emitted():
    detok = IncrementalDetokenizer(BYTES, BYTES.encode("a long prompt ending in é"))
    assert detok.push(BYTES.encode(" and more")).text == " and more"
    assert detok.output_text == " and more"


def test_stop_string_across_token_boundary():
    detok = IncrementalDetokenizer(BYTES, [], stop=["ab"])
    assert push_texts(detok, ["xa"]) == [DetokenizedDelta("x", False)]
    assert push_texts(detok, ["b"]) == [DetokenizedDelta("", True)]
    assert detok.output_text == "x"
    assert detok.flush() == ""
    with pytest.raises(AssertionError):
        detok.push([ord("c")])


def test_stop_string_at_the_very_start():
    detok = IncrementalDetokenizer(BYTES, BYTES.encode("prompt"), stop=["He"])
    assert push_texts(detok, ["Hello"]) == [DetokenizedDelta("", True)]


def test_stop_string_spanning_a_multibyte_character():
    detok = IncrementalDetokenizer(BYTES, [], stop=["é!"])
    deltas, _ = run(detok, [[b] for b in "aé!z".encode()])
    assert [d.text for d in deltas] == ["a", "", "", ""]     # "é" held: a prefix of "é!"
    assert deltas[-1].stop_hit


def test_earliest_stop_wins():
    detok = IncrementalDetokenizer(BYTES, [], stop=["world", "lo"])
    assert push_texts(detok, ["hello world"]) == [DetokenizedDelta("hel", True)]


def test_stop_that_completes_first_wins_whatever_the_chunking():
    # "bc" completes before "abcd" does, so streaming char by char must stop at "bc";
    # pushing everything at once must agree.
    at_once = IncrementalDetokenizer(BYTES, [], stop=["abcd", "bc"])
    assert push_texts(at_once, ["xabcd"]) == [DetokenizedDelta("xa", True)]
    one_by_one = IncrementalDetokenizer(BYTES, [], stop=["abcd", "bc"])
    deltas, _ = run(one_by_one, [[b] for b in b"xabcd"])
    assert "".join(d.text for d in deltas) == "xa" and deltas[-1].stop_hit


def test_held_prefix_that_is_not_a_stop_is_released():
    detok = IncrementalDetokenizer(BYTES, [], stop=["abc"])
    assert push_texts(detok, ["xab", "x", "ab", "ab"]) == [
        DetokenizedDelta("x", False), DetokenizedDelta("abx", False),
        DetokenizedDelta("", False), DetokenizedDelta("ab", False),
    ]
    assert detok.flush() == "ab"
    assert detok.output_text == "xabxabab"


def test_flush_drops_a_dangling_partial_character():
    detok = IncrementalDetokenizer(BYTES, [])
    assert detok.push(list("a€".encode())[:-1]).text == "a"
    assert detok.flush() == ""
    assert detok.output_text == "a"
    assert detok.flush() == ""            # idempotent once finished


def test_flush_releases_complete_text_before_a_partial_character():
    # One token holding "b" plus the first byte of "€": held whole (its decode ends in U+FFFD).
    class TwoByteTokens(FakeByteTokenizer):
        def decode(self, token_ids, skip_special_tokens=True):
            raw = b"".join(b"b\xe2" if t == 256 else bytes([t]) for t in token_ids)
            return raw.decode("utf-8", errors="replace")

    detok = IncrementalDetokenizer(TwoByteTokens(), [], stop=["ab"])
    assert detok.push([ord("x"), 256]).text == "x"
    assert detok.flush() == "b"
    stopped = IncrementalDetokenizer(TwoByteTokens(), [], stop=["ab"])
    assert stopped.push([ord("a"), 256]).text == ""       # "a" held: prefix of "ab"
    assert stopped.flush() == ""                           # "ab" completes in the released text


def test_skip_special_tokens():
    tokenizer = bpe()
    eos = tokenizer.token_to_id("<eos>")
    hello = tokenizer.encode("Hello").ids
    assert IncrementalDetokenizer(tokenizer, []).push(hello + [eos]).text == "Hello"
    kept = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False)
    assert kept.push(hello + [eos]).text == "Hello<eos>"
