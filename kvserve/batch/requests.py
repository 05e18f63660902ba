"""Batch input → validated lines, checked up front so that a bad file is refused whole with a 400
that names the line (and a bad line never reaches the engine as a surprise):

    OpenAI     a JSONL file, one request per line:
               {"custom_id": "...", "method": "POST", "url": "/v1/chat/completions", "body": {...}}
    Anthropic  {"requests": [{"custom_id": "...", "params": {<a /v1/messages body>}}, ...]}

Refused up front: a line that is not a JSON object, a missing or duplicate custom_id, a method
other than POST, a url other than the batch's endpoint, a body that is not an object, an unknown
model, a line over --max-body-bytes, more than --max-batch-lines lines, a file over
--max-batch-file-bytes. Everything else about a body (a value out of range, a prompt too long for
the context) is checked when the line runs, as for a direct request, and becomes that line's own
error record; the rest of the batch goes on.

Each line also gets a group key, the beginning of its prompt text: the runner takes pending lines
in group-key order, so lines that share instructions run side by side and reuse one prefix's KV.
Pure Python.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kvserve.batch.store import Line

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
GROUP_KEY_CHARS = 256
MAX_CUSTOM_ID_CHARS = 512


class BatchInputError(ValueError):
    """The batch input is refused; `line` is 1-based (None: the input as a whole)."""

    def __init__(self, message: str, line: int | None = None, param: str | None = None):
        super().__init__(message if line is None else f"line {line}: {message}")
        self.line = line
        self.param = param


@dataclass(frozen=True)
class Limits:
    max_file_bytes: int
    max_line_bytes: int
    max_lines: int


def parse_jsonl(content: bytes, limits: Limits) -> list[dict]:
    """An uploaded batch file → its line objects (syntax and sizes only; see validate_openai)."""
    if len(content) > limits.max_file_bytes:
        raise BatchInputError(f"the file is {len(content)} bytes; at most {limits.max_file_bytes} are allowed "
                              "(--max-batch-file-bytes)", param="file")
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as error:
        line = content[:error.start].count(b"\n") + 1
        raise BatchInputError("the file is not UTF-8 text", line, "file") from None
    objects = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        if len(raw.encode()) > limits.max_line_bytes:
            raise BatchInputError(f"the line is {len(raw.encode())} bytes; at most {limits.max_line_bytes} are allowed "
                                  "(--max-body-bytes)", number, "file")
        try:
            value = json.loads(raw)
        except ValueError as error:
            raise BatchInputError(f"not valid JSON ({error.msg} at column {error.colno})", number, "file") from None
        if not isinstance(value, dict):
            raise BatchInputError("a line must be a JSON object", number, "file")
        objects.append({"_line": number, **value})
        if len(objects) > limits.max_lines:
            raise BatchInputError(f"more than {limits.max_lines} requests (--max-batch-lines)", number, "file")
    if not objects:
        raise BatchInputError("the file holds no requests", param="file")
    return objects


def validate_openai(objects: list[dict], endpoint: str, known_model: Callable[[str | None], bool]) -> list[Line]:
    """The lines of a batch on `endpoint` (every line's url must be it)."""
    if endpoint not in ENDPOINTS:
        raise BatchInputError(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}", param="endpoint")
    return [line for _, line in validate_lines(objects, (endpoint,), known_model)]


def validate_lines(objects: list[dict], urls: tuple[str, ...],
                   known_model: Callable[[str | None], bool]) -> list[tuple[str, Line]]:
    """(url, line) for each line object, whose url must be one of `urls`."""
    seen: set[str] = set()
    lines = []
    for index, obj in enumerate(objects):
        number = obj.get("_line", index + 1)
        custom_id = _custom_id(obj.get("custom_id"), number, seen)
        if obj.get("method", "POST") != "POST":
            raise BatchInputError(f"method must be POST, got {obj.get('method')!r}", number, "method")
        if obj.get("url") not in urls:
            expected = f"the batch's endpoint {urls[0]!r}" if len(urls) == 1 else f"one of {', '.join(urls)}"
            raise BatchInputError(f"url must be {expected}, got {obj.get('url')!r}", number, "url")
        body = obj.get("body")
        if not isinstance(body, dict):
            raise BatchInputError("body must be a JSON object", number, "body")
        _check_model(body.get("model"), known_model, number)
        lines.append((obj["url"], Line(index, custom_id, body, group_key(body))))
    return lines


def validate_anthropic(requests: Any, known_model: Callable[[str | None], bool], limits: Limits) -> list[Line]:
    if not isinstance(requests, list) or not requests:
        raise BatchInputError("requests must be a non-empty list", param="requests")
    if len(requests) > limits.max_lines:
        raise BatchInputError(f"{len(requests)} requests; at most {limits.max_lines} are allowed (--max-batch-lines)",
                              param="requests")
    seen: set[str] = set()
    lines = []
    for index, item in enumerate(requests):
        number = index + 1
        if not isinstance(item, dict):
            raise BatchInputError("a request must be an object {custom_id, params}", number, f"requests.{index}")
        custom_id = _custom_id(item.get("custom_id"), number, seen)
        params = item.get("params")
        if not isinstance(params, dict):
            raise BatchInputError("params must be a /v1/messages body (an object)", number, f"requests.{index}.params")
        if len(json.dumps(params).encode()) > limits.max_line_bytes:
            raise BatchInputError(f"params exceed {limits.max_line_bytes} bytes (--max-body-bytes)", number,
                                  f"requests.{index}.params")
        _check_model(params.get("model"), known_model, number)
        lines.append(Line(index, custom_id, params, group_key(params)))
    return lines


def _custom_id(value: Any, number: int, seen: set[str]) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_CUSTOM_ID_CHARS:
        raise BatchInputError(f"custom_id must be a non-empty string of at most {MAX_CUSTOM_ID_CHARS} characters",
                              number, "custom_id")
    if value in seen:
        raise BatchInputError(f"custom_id {value!r} is used twice", number, "custom_id")
    seen.add(value)
    return value


def _check_model(model: Any, known_model: Callable[[str | None], bool], number: int) -> None:
    if model is not None and not isinstance(model, str):
        raise BatchInputError("model must be a string", number, "model")
    if not known_model(model):
        raise BatchInputError(f"model {model!r} is not served here", number, "model")


def group_key(body: dict) -> str:
    """The beginning of a body's prompt text (system, messages or prompt, in order)."""
    parts: list[str] = []
    system = body.get("system")
    if isinstance(system, str):
        parts.append(system)
    elif isinstance(system, list):
        parts += _texts(system)
    for message in body.get("messages") or []:
        if isinstance(message, dict):
            content = message.get("content")
            parts += [content] if isinstance(content, str) else _texts(content if isinstance(content, list) else [])
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        parts.append(prompt)
    elif isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        parts.append(prompt[0])
    return "\n".join(parts)[:GROUP_KEY_CHARS]


def _texts(blocks: Iterable[Any]) -> list[str]:
    return [block["text"] for block in blocks if isinstance(block, dict) and isinstance(block.get("text"), str)]
