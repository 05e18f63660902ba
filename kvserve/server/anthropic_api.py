"""Anthropic's Messages API at `POST /v1/messages`, so the official `anthropic` SDK works unchanged.

A request is translated into the internal OpenAI-shaped `ChatCompletionRequest` and served by the
same `OpenAIServing.chat` → `Generation` as /v1/chat/completions (API keys and tenants, limits,
admission, checkpoints); only the wire shapes differ:

    body ──▶ MessagesRequest (pydantic) ──▶ to_chat_request ──▶ OpenAIServing.chat ──▶ Generation
                                                                                     │ chunks()
    stream: true   ◀── sse_frames (keep-alive, abort) ◀── AnthropicMessage.events() ◀┘
    stream: false  ◀── AnthropicMessage.result(): the same events, folded into one message

Translation:
    system (string or text blocks)  → one system message; each block a content part keeping its cache_control
    tools                           → text in that system message, before the system blocks (Anthropic's
                                      cache order: tools, system, messages): a header and one JSON
                                      line per tool; a tool's cache_control marks the end of its line. The
                                      model cannot call tools: answers are text, never `tool_use`.
    messages[].content              → content parts, cache_control kept (validated by server/checkpoints.py)
    cache_control (top level)       → a mark on the prompt's last block (Anthropic's automatic caching)
    stop_sequences, temperature, top_p, top_k, max_tokens → the same sampling fields; metadata is ignored

Stream events, in order (the SDK's accumulator expects exactly these):
    message_start        the message with empty content, and usage (see Accounting)
    content_block_start  index 0, {"type": "text", "text": ""}
    ping
    content_block_delta  {"type": "text_delta", "text": ...}, zero or more
    content_block_stop
    message_delta        {"stop_reason", "stop_sequence"} and the final usage
    message_stop
An engine failure mid-stream ends the stream with `event: error`; a client that disconnects aborts
the engine requests (sse.py's finally).

Accounting (prompt-caching.md, "Anthropic shape"). The design note words it as "`input_tokens` =
tokens after the last cache hit region, plus the two cache fields"; the Anthropic API defines the
three input counts as a partition of the prompt (total = input_tokens + cache_read_input_tokens +
cache_creation_input_tokens; input_tokens are the tokens after the last cache breakpoint), and
clients compute cost from that identity. So here

    input_tokens = prompt_tokens − cache_read_input_tokens − cache_creation_input_tokens

i.e. the prompt tokens neither read from the cache nor written (pinned) by this request. kvserve's
granularity shows through: the partial block before a checkpoint is not pinned, so it counts as
input; and automatic prefix caching may read past the last checkpoint, which lowers input_tokens.
The formula needs read and written regions to be disjoint; it is clamped at 0 so that an engine
count that overlaps them can never produce a negative count on the wire.

Streaming usage: the engine fixes both cache counts when the prompt's prefill completes, which is
before its first output; message_start is sent with the first output, so its usage already carries
the final input and cache numbers (output_tokens 0). message_delta repeats all of them with the
final output_tokens (newer SDKs take the cache fields from there; older ones keep message_start's).

Stop reasons: `length` → "max_tokens". The engine reports `stop` both for an end token and for a
stop string, and trims the stop string from the text; the output token ids still contain it, so
when stop_sequences were given the ids are decoded and the stop string that completed first (the
detokenizer's rule) names "stop_sequence" and `stop_sequence`; otherwise "end_turn".

Errors: {"type": "error", "error": {"type", "message"}}, at the status kvserve uses (schema errors
are 400, as Anthropic answers them; unknown model 404).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, field_validator

from kvserve.engine.async_engine import RequestStream
from kvserve.outputs import RequestOutput
from kvserve.server.auth import authenticate
from kvserve.server.openai_api import Generation
from kvserve.server.tools import TOOLS_HEADER, tool_line
from kvserve.server.http import ClientGone, serving, unless_disconnected
from kvserve.server.protocol import (APIError, ChatCompletionRequest, ChatMessage, CompactionOptions, ContentPart,
                                     Number, as_api_error, validation_error)
from kvserve.server.openapi import request_body
from kvserve.server.sse import StreamResponse, event_json, sse_frames

log = logging.getLogger(__name__)

# kvserve status → Anthropic error type (anything else ≥ 500 is "api_error").
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 422: "invalid_request_error",
               429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error"}


# ---- request ------------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")   # fields kvserve does not use (thinking, tool_choice, ...)


class TextBlock(_Body):
    type: str
    text: str
    cache_control: dict[str, Any] | None = None

    @field_validator("type")
    @classmethod
    def _text_only(cls, kind: str) -> str:
        if kind != "text":
            raise ValueError(f"only text content blocks are supported, got {kind!r}")
        return kind


def _as_blocks(content: Any) -> Any:
    """A string is shorthand for one text block."""
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


class InputMessage(_Body):
    role: Literal["user", "assistant"]
    content: list[TextBlock]

    @field_validator("content", mode="before")
    @classmethod
    def _blocks(cls, content: Any) -> Any:
        return _as_blocks(content)


class Tool(_Body):
    name: str
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    cache_control: dict[str, Any] | None = None

    def line(self) -> str:
        return tool_line(self.name, self.description or "", self.input_schema or {})


class MessagesRequest(_Body):
    model: str
    max_tokens: StrictInt
    messages: list[InputMessage] = Field(min_length=1)
    system: list[TextBlock] | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: StrictInt | None = None
    stop_sequences: list[str] | None = None
    stream: StrictBool = False
    metadata: dict[str, Any] | None = None   # accepted and ignored
    tools: list[Tool] | None = None
    cache_control: dict[str, Any] | None = None   # automatic caching: a mark on the last block
    context_management: dict[str, Any] | None = None   # a compact_* edit turns compaction on
    prompt_cache_key: str | None = Field(default=None, max_length=1024)   # scaled out: one replica per key

    @field_validator("system", mode="before")
    @classmethod
    def _blocks(cls, system: Any) -> Any:
        return [] if system == "" else _as_blocks(system)


def to_chat_request(body: MessagesRequest) -> ChatCompletionRequest:
    """The internal request: tools and system as one system message, then the conversation."""
    if body.messages[-1].role == "assistant":
        raise APIError(400, "a final assistant message (response prefill) is not supported; "
                       "the last message must have role 'user'", param="messages")
    for i, message in enumerate(body.messages):   # Anthropic's rule: every message says something
        if not message.content:
            raise APIError(400, f"messages.{i}.content: all messages must have non-empty content",
                           param=f"messages.{i}.content")
        for j, block in enumerate(message.content):
            if not block.text:
                raise APIError(400, f"messages.{i}.content.{j}.text: text content blocks must be non-empty",
                               param=f"messages.{i}.content.{j}.text")
    messages = []
    system = _system_parts(body)
    if system:
        messages.append(ChatMessage(role="system", content=system))
    messages += [ChatMessage(role=m.role, content=[_part(block) for block in m.content]) for m in body.messages]
    if body.cache_control is not None:
        _mark_last_block(messages, body.cache_control)
    return ChatCompletionRequest(model=body.model, messages=messages, max_tokens=body.max_tokens,
                                 temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                                 stop=body.stop_sequences, stream=body.stream,
                                 compaction=_compaction(body.context_management),
                                 prompt_cache_key=body.prompt_cache_key)


def _compaction(context_management: dict[str, Any] | None) -> CompactionOptions | None:
    """Anthropic's context_management: a `compact_*` edit (trigger {"type": "input_tokens",
    "value": N} sets the budget) turns compaction on; `clear_*` edits have nothing to clear here
    (tool results are not produced) and are accepted; any other edit is a 400."""
    if context_management is None:
        return None
    edits = context_management.get("edits")
    if not isinstance(edits, list):
        raise APIError(400, "context_management.edits must be a list", param="context_management.edits")
    options = None
    for i, edit in enumerate(edits):
        kind = edit.get("type") if isinstance(edit, dict) else None
        if not isinstance(kind, str):
            raise APIError(400, f"context_management.edits.{i}.type is required", param=f"context_management.edits.{i}")
        if kind.startswith("clear_"):
            continue
        if not kind.startswith("compact"):
            raise APIError(400, f"context_management edit type {kind!r} is not supported (compact_*, clear_*)",
                           param=f"context_management.edits.{i}.type")
        trigger = edit.get("trigger") or {}
        budget = trigger.get("value") if isinstance(trigger, dict) else None
        if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 1):
            raise APIError(400, f"context_management.edits.{i}.trigger.value must be a positive integer",
                           param=f"context_management.edits.{i}.trigger.value")
        options = CompactionOptions(budget_tokens=budget)
    return options


def _system_parts(body: MessagesRequest) -> list[ContentPart]:
    parts = []
    if body.tools:
        parts.append(ContentPart(type="text", text=TOOLS_HEADER))
        parts += [ContentPart(type="text", text=tool.line(), cache_control=tool.cache_control)
                  for tool in body.tools]
        if body.system:
            parts.append(ContentPart(type="text", text="\n"))
    parts += [_part(block) for block in body.system or ()]
    return parts


def _mark_last_block(messages: list[ChatMessage], cache_control: dict[str, Any]) -> None:
    """Top-level cache_control ("automatic caching") marks the last block of the prompt, unless
    that block carries its own mark; it counts towards the checkpoint limit like any other."""
    for message in reversed(messages):
        if message.content:
            last = message.content[-1]
            if last.cache_control is None:
                last.cache_control = cache_control
            return


def _part(block: TextBlock) -> ContentPart:
    return ContentPart(type="text", text=block.text, cache_control=block.cache_control)


# ---- response -----------------------------------------------------------------------------------
def anthropic_usage(usage: dict[str, Any], output_tokens: int | None = None) -> dict[str, int]:
    """Generation.usage() → Anthropic's usage (the module docstring's Accounting)."""
    read = usage["cache_read_input_tokens"]
    written = usage["cache_creation_input_tokens"]
    return {"input_tokens": max(0, usage["prompt_tokens"] - read - written),
            "cache_creation_input_tokens": written, "cache_read_input_tokens": read,
            "output_tokens": usage["completion_tokens"] if output_tokens is None else output_tokens,
            "cost": usage["cost"],    # kvserve's weighted cost (README: cost accounting)
            **({"compaction": usage["compaction"]} if "compaction" in usage else {})}


def matched_stop(text: str, stop_sequences: Sequence[str]) -> str | None:
    """The stop string whose first occurrence in `text` ends first (ties: the one starting first),
    as the detokenizer decides where to stop; None when none occurs."""
    best: tuple[tuple[int, int], str] | None = None
    for stop in stop_sequences:
        at = text.find(stop)
        if at >= 0 and (best is None or (at + len(stop), at) < best[0]):
            best = ((at + len(stop), at), stop)
    return None if best is None else best[1]


class _RecordedStream:
    """Stands in for a choice's RequestStream inside a Generation and keeps its output token ids.

    The detokenizer trims a stop string from the text, and FinishReason.STOP covers an end token
    and a stop string alike, so only the token ids still show which stop string ended the output.
    (If the engine ever reports the matched stop string itself, this wrapper can go.)"""

    def __init__(self, stream: RequestStream):
        self._stream = stream
        self.quiet = stream.quiet
        self.token_ids: list[int] = []

    def __aiter__(self) -> "_RecordedStream":
        return self

    async def __anext__(self) -> RequestOutput:
        output = await self._stream.__anext__()
        self.token_ids += output.token_ids
        return output

    def abort(self) -> None:
        self._stream.abort()


class AnthropicMessage:
    """One Generation (a single choice) seen as an Anthropic message: its stream events, or the
    whole message folded from those same events."""

    def __init__(self, generation: Generation, stop_sequences: Sequence[str]):
        assert len(generation.choices) == 1, "the Messages API has one choice"
        self.generation = generation
        self.id = "msg_" + generation.id.removeprefix("chatcmpl-")
        self.stop_sequences = tuple(stop_sequences)
        choice = generation.choices[0]
        self._recorded = _RecordedStream(choice.stream)   # before chunks() starts reading the stream
        choice.stream = self._recorded

    async def events(self) -> AsyncIterator[tuple[str, dict]]:
        """(event name, data) pairs; see the module docstring for the order."""
        started = False
        async for chunk in self.generation.chunks():
            for choice in chunk["choices"]:
                delta = choice["delta"]
                if "role" in delta:
                    continue   # the opening chunk, sent before the engine produced anything
                if not started:   # the first output: the prefill is done, the cache counts are final
                    started = True
                    for event in self._opening():
                        yield event
                if delta.get("content"):
                    yield "content_block_delta", {"type": "content_block_delta", "index": 0,
                                                  "delta": {"type": "text_delta", "text": delta["content"]}}
        if not started:   # chunks() always ends with a finishing chunk; this only guards the event order
            for event in self._opening():
                yield event
        stop_reason, stop_sequence = self._stop()
        yield "content_block_stop", {"type": "content_block_stop", "index": 0}
        delta = {"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                 "usage": anthropic_usage(self.generation.usage())}
        choice = self.generation.choices[0]
        routing = self.generation.routing(choice)
        if routing is not None:   # a router answered: which model, and the routing record
            delta["model"] = self.generation.answering_model(choice)
            delta["routing"] = routing
        yield "message_delta", delta
        yield "message_stop", {"type": "message_stop"}

    def _opening(self) -> list[tuple[str, dict]]:
        model = self.generation.answering_model(self.generation.choices[0])
        message = {"id": self.id, "type": "message", "role": "assistant", "model": model,
                   "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": anthropic_usage(self.generation.usage(), output_tokens=0)}
        return [("message_start", {"type": "message_start", "message": message}),
                ("content_block_start", {"type": "content_block_start", "index": 0,
                                         "content_block": {"type": "text", "text": ""}}),
                ("ping", {"type": "ping"})]

    def _stop(self) -> tuple[str, str | None]:
        finish = self.generation.choices[0].finish_reason
        if finish == "length":
            return "max_tokens", None
        if self.stop_sequences:
            text = self.generation.model.tokenizer.decode(self._recorded.token_ids)
            stop = matched_stop(text, self.stop_sequences)
            if stop is not None:
                return "stop_sequence", stop
        return "end_turn", None

    async def frames(self) -> AsyncIterator[bytes]:
        async for name, data in self.events():
            yield event_frame(name, data)

    async def result(self) -> dict:
        """The non-streaming message, folded from the stream's events as the SDK accumulates them."""
        message: dict = {}
        async for name, data in self.events():
            if name == "message_start":
                message = data["message"]
            elif name == "content_block_start":
                message["content"].append(dict(data["content_block"]))
            elif name == "content_block_delta":
                message["content"][data["index"]]["text"] += data["delta"]["text"]
            elif name == "message_delta":
                message.update(data["delta"])
                message["usage"] = data["usage"]
                if "routing" in data:
                    message["model"] = data["model"]
                    message["routing"] = data["routing"]
        return message


def event_frame(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {event_json(data)}\n\n".encode()


# ---- errors -------------------------------------------------------------------------------------
def error_body(error: APIError) -> dict:
    kind = ERROR_TYPES.get(error.status, "api_error" if error.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": error.message}}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=error.status, headers=error.headers)


def _as_api_error(error: Exception) -> APIError:
    return as_api_error(error, "/v1/messages")


# ---- the endpoint -------------------------------------------------------------------------------
def register_anthropic(app: FastAPI) -> None:
    @app.post("/v1/messages", openapi_extra=request_body(MessagesRequest))
    async def messages(request: Request) -> Response:
        """Anthropic's Messages API (see kvserve/server/anthropic_api.py)."""
        try:
            # The one place the tenant is resolved: the key (x-api-key, as the SDK sends it) → its tenant.
            tenant = authenticate(request.app.state, request.headers).tenant
            body = await _parse(request)
            generation = await serving(request).chat(to_chat_request(body), tenant=tenant)
        except Exception as error:
            return error_response(_as_api_error(error))
        message = AnthropicMessage(generation, body.stop_sequences or ())
        if body.stream:
            frames = sse_frames(message.frames(), generation, lambda error: event_frame("error", error_body(error)))
            return StreamResponse(frames, generation, request.app.state.config.stream_idle_timeout_s)
        return await _whole(request, message)


async def _parse(request: Request) -> MessagesRequest:
    """The body, validated here rather than by FastAPI so that every error takes Anthropic's shape."""
    try:
        data = json.loads(await request.body())
    except ValueError:
        raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
    try:
        return MessagesRequest.model_validate(data)
    except ValidationError as error:
        invalid = validation_error(error.errors())
        raise APIError(400, invalid.message, param=invalid.param, code=invalid.code) from None


async def _whole(request: Request, message: AnthropicMessage) -> Response:
    """The non-streaming answer; a client that leaves first aborts the engine work at once."""
    try:
        return JSONResponse(await unless_disconnected(request, message.result(), message.generation))
    except ClientGone:
        return Response(status_code=499)
    except Exception as error:
        return error_response(_as_api_error(error))
