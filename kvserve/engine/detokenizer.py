"""Incremental, UTF-8-safe decoding of output tokens; stop strings trimmed exactly.

Each push goes through two stages.

1. Complete characters (token level). The detokenizer keeps only a decode window:

       window = [ tokens of the last emission | tokens not yet decodable ]
                ^ 0                           ^ read_offset             ^ len(window)

       prefix_text = decode(window[:read_offset])    (cached; changes only on emission)
       window_text = decode(window)

   When window_text is longer than prefix_text and does not end in U+FFFD (the decoder's
   rendering of an incomplete UTF-8 sequence), window_text[len(prefix_text):] is new, complete
   text; then the tokens before read_offset are dropped and read_offset = len(window).
   Decoding from one emission back gives context-dependent decoders (SentencePiece's leading
   space, byte-level merges) the neighbour they need, and keeps cost and memory per token
   O(window), not O(output). The first window starts with the prompt's last tokens, so the
   first output token decodes as it would in the full sequence; prompt text is never emitted.

2. Stop strings (character level). New complete text joins `_held`, the longest tail of the
   not-yet-emitted text that is a proper prefix of some stop string. The request stops at the
   first character position where any stop string is complete; the text is cut just before
   that occurrence (ties between stop strings ending at the same place: the earliest start).
   Defined per character, the result does not depend on how tokens were chunked into pushes.
   Invariant: emitted text never contains a stop string, and every occurrence that could
   still complete starts inside `_held` (the held tail is the longest such prefix).

flush() ends a request that finished for another reason (end token, length, abort): it
releases `_held` and any complete text still pending. A dangling incomplete character at the
very end is dropped (every trailing U+FFFD of the pending window is stripped), so the stream
never shows a replacement character that the full decode would only show for a cut-off
character. Text released by flush is still trimmed at a stop string if one completes in it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

_REPLACEMENT_CHAR = "\ufffd"

# Prompt tokens decoded as context before the first output token (leading-space handling).
_NUM_PROMPT_CONTEXT_TOKENS = 5


class TokenDecoder(Protocol):
    """The part of the tokenizer the detokenizer needs (kvserve.model.tokenizer's Tokenizer fits)."""

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


@dataclass(frozen=True)
class DetokenizedDelta:
    text: str          # new text safe to show now
    stop_hit: bool     # a stop string was found; text is cut just before it; the request must finish


class IncrementalDetokenizer:
    """Turns one request's output tokens into text deltas. See the module docstring."""

    def __init__(
        self,
        tokenizer: TokenDecoder,
        prompt_token_ids: Sequence[int],
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        assert all(stop), "stop strings must be non-empty"
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop = tuple(stop)
        # Seeded with the prompt's tail as context; see the module docstring for the window.
        self._window: list[int] = list(prompt_token_ids[-_NUM_PROMPT_CONTEXT_TOKENS:])
        self._read_offset = len(self._window)
        self._prefix_text = self._decode(self._window)
        self._held = ""                    # complete text withheld: a proper prefix of a stop string
        self._emitted: list[str] = []
        self._finished = False             # a stop string was hit, or flush() ran

    @property
    def output_text(self) -> str:
        """Everything emitted so far (push deltas and flush)."""
        return "".join(self._emitted)

    @property
    def finished(self) -> bool:
        return self._finished

    def push(self, token_ids: Sequence[int]) -> DetokenizedDelta:
        """Append new output tokens; return the text that became safe to show."""
        assert not self._finished, "push() after the detokenizer finished (stop string hit or flush)"
        new_text = "".join([self._complete_text_after(token_id) for token_id in token_ids])
        text, stop_hit = self._cut_at_stop(self._held + new_text, final=False)
        self._finished = stop_hit
        self._emitted.append(text)
        return DetokenizedDelta(text, stop_hit)

    def flush(self) -> str:
        """The request ended for another reason: release withheld text (not a dangling partial char).

        Returns "" once finished (after a stop string hit or an earlier flush).
        """
        if self._finished:
            return ""
        self._finished = True
        window_text = self._decode(self._window)
        pending = window_text[len(self._prefix_text):].rstrip(_REPLACEMENT_CHAR)
        text, _ = self._cut_at_stop(self._held + pending, final=True)
        self._emitted.append(text)
        return text

    def _complete_text_after(self, token_id: int) -> str:
        """Stage 1: append one token; return the text it completes ("" while a char is incomplete)."""
        self._window.append(token_id)
        window_text = self._decode(self._window)
        if len(window_text) <= len(self._prefix_text) or window_text.endswith(_REPLACEMENT_CHAR):
            return ""
        del self._window[:self._read_offset]
        self._read_offset = len(self._window)
        new_text = window_text[len(self._prefix_text):]
        self._prefix_text = self._decode(self._window)
        return new_text

    def _cut_at_stop(self, text: str, final: bool) -> tuple[str, bool]:
        """Stage 2: split `text` (held + new) into (emit now, stop hit); keep the rest in _held.

        Every stop occurrence not yet ruled out starts inside `text` (module invariant), so
        searching `text` alone finds the earliest-ending one.
        """
        stop_at = _earliest_stop(text, self._stop)
        if stop_at is not None:
            self._held = ""
            return text[:stop_at], True
        num_held = 0 if final else _longest_stop_prefix_suffix(text, self._stop)
        self._held = text[len(text) - num_held:]
        return text[:len(text) - num_held], False

    def _decode(self, token_ids: Sequence[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)


def _earliest_stop(text: str, stop: Sequence[str]) -> int | None:
    """Start of the stop occurrence that ends first in `text` (ties: earliest start), or None."""
    best: tuple[int, int] | None = None              # (end, start)
    for s in stop:
        start = text.find(s)
        if start >= 0 and (best is None or (start + len(s), start) < best):
            best = (start + len(s), start)
    return None if best is None else best[1]


def _longest_stop_prefix_suffix(text: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    longest = 0
    for s in stop:
        for length in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:length]):
                longest = length
                break
    return longest
