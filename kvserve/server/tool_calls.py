"""Tool calls in an answer: the instruction that asks for them, and the scanner that finds them.

A chat request with `tools` (and `tool_choice` "auto", the default) gets `CALL_INSTRUCTION` after
the tools' lines (tools.py), and each of its choices a `ToolCallScanner`. The forms an answer may
call tools in, the whole answer being nothing else (blank space aside):

    {"name": "get_weather", "arguments": {"city": "Paris"}}          one JSON object
    {"name": ...} {"name": ...}   or   [{"name": ...}, {"name": ...}]  several, or a list of them
    <tool_call>{"name": ...}</tool_call> ...                          Hermes' tags (Qwen's training)
    ```json\n{"name": ...}\n```                                       any of these in a code fence

Each call names one of the request's tools and carries its `arguments` (or `parameters`) as a
JSON object, or as a string holding one; other keys are ignored. Anything else (a call to an
unknown tool, text around the JSON, JSON cut off at max_tokens) is not a call: the answer is
text, sent as it was written.

Streaming: text goes out as it comes until the answer could be a call, that is, while its first
non-blank characters open one of the forms above (`{`, `[`, a fence, the tag). From there the
rest is held back to the end of the answer, then given as the calls, or as the text held if it
is not calls. An answer in prose streams token by token as before.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Collection
from dataclasses import dataclass

CALL_INSTRUCTION = ("To call tools, answer with only a JSON object "
                    "{\"name\": <tool name>, \"arguments\": {<its arguments>}}, one per line for several "
                    "calls; their results come back in tool messages. To answer without a tool, write text.\n")
OPENERS = ("{", "[", "```", "<tool_call>")
_TAGS = re.compile(r"</?tool_call>")
_FENCE = re.compile(r"\A```[A-Za-z0-9_-]*\n?(.*?)\n?```\Z", re.DOTALL)


@dataclass(frozen=True)
class ToolCallOptions:
    """What a request lets its answers call: the tools' names, and more than one call or not."""
    names: frozenset[str]
    parallel: bool = True


def call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class ToolCallScanner:
    """One answer's text on its way out: `feed` each delta (gives what to send now), then `finish`
    (gives the rest of the text, or the calls)."""

    def __init__(self, names: Collection[str], parallel: bool = True):
        self.names = frozenset(names)
        self.parallel = parallel
        self._held = ""
        self._state = "start"        # start: nothing but blanks yet; text: prose, passed through; held

    def feed(self, text: str) -> str:
        if self._state == "text":
            return text
        self._held += text
        if self._state == "start":
            head = self._held.lstrip()
            if not head or any(opener.startswith(head) and opener != head for opener in OPENERS):
                return ""           # blanks, or a prefix of an opener: not decided yet
            if not head.startswith(OPENERS):
                self._state = "text"
                out, self._held = self._held, ""
                return out
            self._state = "held"
        return ""

    def finish(self) -> tuple[str, list[dict]]:
        """At the end of the answer: (the text not sent yet, the calls); one of them is empty."""
        held, self._held = self._held, ""
        calls = parse_calls(held, self.names)
        if calls is None:
            return held, []
        return "", calls if self.parallel else calls[:1]


def parse_calls(text: str, names: Collection[str]) -> list[dict] | None:
    """The OpenAI `tool_calls` an answer makes, or None when it is not (only) tool calls."""
    values = []
    for piece in _TAGS.split(text):
        piece = piece.strip()
        if not piece:
            continue
        fenced = _FENCE.match(piece)
        if fenced:
            piece = fenced.group(1).strip()
        parsed = _json_values(piece)
        if parsed is None:
            return None
        values.extend(parsed)
    calls = []
    for value in values:
        for entry in value if isinstance(value, list) else [value]:
            call = _call(entry, names)
            if call is None:
                return None
            calls.append(call)
    return calls or None


def _json_values(text: str) -> list | None:
    """The JSON values `text` is a sequence of (blank-separated), or None."""
    decoder, values, at = json.JSONDecoder(), [], 0
    while at < len(text):
        try:
            value, at = decoder.raw_decode(text, at)
        except ValueError:
            return None
        values.append(value)
        while at < len(text) and text[at].isspace():
            at += 1
    return values


def _call(entry, names: Collection[str]) -> dict | None:
    if not isinstance(entry, dict) or entry.get("name") not in names:
        return None
    arguments = entry.get("arguments", entry.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return {"id": call_id(), "type": "function",
            "function": {"name": entry["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}}
