"""Cache checkpoints in chat requests: `cache_control` markers → validated marks → positions in the
rendered prompt.

A content block carrying `"cache_control": {"type": "ephemeral", "ttl": "5m" | "1h"}` marks the end
of a prefix to pin. The chat template is applied first, so a mark becomes a character position in
the rendered prompt (found by rendering once more with an invisible sentinel after each marked
block), and the tokenizer turns positions into token counts.

Rules (400 when broken): at most MAX_CHECKPOINTS marks; type "ephemeral"; ttl "5m" (default) or
"1h"; a longer TTL never follows a shorter one; cache_control only on content blocks.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from kvserve.server.protocol import APIError, ChatMessage

MAX_CHECKPOINTS = 4
TTLS = {"5m": 300.0, "1h": 3600.0}


@dataclass(frozen=True)
class Mark:
    message: int
    part: int
    ttl_s: float


def collect_marks(messages: Sequence[ChatMessage]) -> list[Mark]:
    marks = []
    for i, message in enumerate(messages):
        if message.cache_control is not None:
            raise APIError(400, "cache_control belongs on a content block (messages[].content[]), not on a message",
                           param=f"messages.{i}.cache_control", code="invalid_cache_control")
        if not isinstance(message.content, list):
            continue
        for j, part in enumerate(message.content):
            if part.cache_control is not None:
                marks.append(Mark(i, j, _ttl(part.cache_control, f"messages.{i}.content.{j}.cache_control")))
    if len(marks) > MAX_CHECKPOINTS:
        raise APIError(400, f"at most {MAX_CHECKPOINTS} cache_control checkpoints are allowed per request, "
                       f"got {len(marks)}", param="messages", code="too_many_checkpoints")
    for earlier, later in zip(marks, marks[1:]):
        if later.ttl_s > earlier.ttl_s:
            raise APIError(400, "a checkpoint with a longer ttl must not follow one with a shorter ttl "
                           f"(1h after 5m at messages.{later.message}.content.{later.part})",
                           param=f"messages.{later.message}.content.{later.part}.cache_control",
                           code="invalid_cache_control")
    return marks


def _ttl(cache_control: dict, param: str) -> float:
    if cache_control.get("type") != "ephemeral":
        raise APIError(400, f"cache_control.type must be 'ephemeral', got {cache_control.get('type')!r}",
                       param=param, code="invalid_cache_control")
    unknown = set(cache_control) - {"type", "ttl"}
    if unknown:
        raise APIError(400, f"unknown cache_control fields: {', '.join(sorted(unknown))}", param=param,
                       code="invalid_cache_control")
    ttl = cache_control.get("ttl", "5m")
    if ttl not in TTLS:
        raise APIError(400, f"cache_control.ttl must be one of {', '.join(TTLS)}, got {ttl!r}", param=param,
                       code="invalid_cache_control")
    return TTLS[ttl]


_SENTINEL = "\ue000kvserve-checkpoint-{}\ue001"


def render_with_marks(tokenizer, messages: Sequence[ChatMessage], marks: Sequence[Mark]) -> tuple[str, list[int]]:
    """The rendered prompt and, per mark, the character position where its prefix ends."""
    prompt = tokenizer.apply_chat_template([_as_dict(m) for m in messages], add_generation_prompt=True)
    if not marks:
        return prompt, []
    marked = [_as_dict(m, [(mark.part, k) for k, mark in enumerate(marks) if mark.message == i])
              for i, m in enumerate(messages)]
    text = tokenizer.apply_chat_template(marked, add_generation_prompt=True)
    positions = []
    for k in range(len(marks)):
        sentinel = _SENTINEL.format(k)
        at = text.find(sentinel)
        if at < 0:
            raise APIError(400, "the chat template drops a marked content block, so its checkpoint has no position",
                           param="messages", code="invalid_cache_control")
        text = text[:at] + text[at + len(sentinel):]
        positions.append(at)
    if text != prompt:   # the template treats the sentinel's presence differently (e.g. strips around it)
        raise APIError(400, "cannot place cache checkpoints in this model's chat template", param="messages",
                       code="invalid_cache_control")
    return prompt, positions


def _as_dict(message: ChatMessage, sentinels: Sequence[tuple[int, int]] = ()) -> dict:
    """The template's view of a message: text content, with sentinels after marked parts."""
    if isinstance(message.content, list):
        after = dict(sentinels)
        content = "".join(part.text + (_SENTINEL.format(after[j]) if j in after else "")
                          for j, part in enumerate(message.content))
    else:
        content = message.content or ""
    extra = {"name": message.name} if message.name else {}
    if message.tool_calls:
        extra["tool_calls"] = [_call_for_template(call.model_dump()) for call in message.tool_calls]
    if message.tool_call_id:
        extra["tool_call_id"] = message.tool_call_id
    return {"role": message.role, "content": content, **extra}


def _call_for_template(call: dict) -> dict:
    """A past tool call as chat templates expect it: OpenAI sends the arguments as a JSON string,
    templates (Qwen's, Llama 3.1's) write `arguments | tojson`, so they get the object the string
    holds (a string that is not one is left as it is)."""
    try:
        arguments = json.loads(call["function"]["arguments"])
    except ValueError:
        return call
    if not isinstance(arguments, dict):
        return call
    return {**call, "function": {**call["function"], "arguments": arguments}}
