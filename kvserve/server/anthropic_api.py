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
    tools                           → OpenAI function tools, which the chat path renders as text in that
                                      system message, before the system blocks (Anthropic's cache order:
                                      tools, system, messages): a header, one JSON line per tool (a tool's
                                      cache_control marks the end of its line), and with tool_choice auto
                                      (the default) the line saying how to call them (server/tool_calls.py)
    tool_choice                     → auto, none; any and tool are 400s (a call cannot be forced)
    messages[].content              → content parts, cache_control kept (validated by server/checkpoints.py);
                                      an assistant's tool_use blocks → its tool_calls; a user's tool_result
                                      blocks → tool messages before its text
    cache_control (top level)       → a mark on the prompt's last block (Anthropic's automatic caching)
    stop_sequences, temperature, top_p, top_k, max_tokens → the same sampling fields; metadata is ignored

Stream events, in order (the SDK's accumulator expects exactly these):
    message_start        the message with empty content, and usage (see Accounting)
    content_block_start  index 0, {"type": "text", "text": ""}
    ping
    content_block_delta  {"type": "text_delta", "text": ...}, zero or more
    content_block_stop
    (a request with tools: the text block opens at the first text instead, after ping, and an answer
    that calls tools has a tool_use block per call instead: start, one input_json_delta, stop)
    message_delta        {"stop_reason", "stop_sequence"} and the final usage ("tool_use" for calls)
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
from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, field_validator,
                      model_validator)

from kvserve.engine.async_engine import RequestStream
from kvserve.outputs import RequestOutput
from kvserve.server.auth import authenticate
from kvserve.server.openai_api import Generation
from kvserve.server.http import ClientGone, serving, unless_disconnected
from kvserve.server.protocol import (APIError, ChatCompletionRequest, ChatMessage, CompactionOptions, ContentPart,
                                     FunctionCall, Number, ToolCall, as_api_error, validation_error)
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


class ContentBlock(_Body):
    """A message's block: text; a tool call the assistant made (tool_use: id, name, input); or its
    result, which the user sends back (tool_result: tool_use_id, content, is_error)."""
    type: str
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: dict[str, Any] | None = None
    tool_use_id: str | None = None
    content: str | list[TextBlock] | None = None
    is_error: StrictBool = False
    cache_control: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _known(self) -> "ContentBlock":
        if self.type == "text":
            if self.text is None:
                raise ValueError("a text block needs text")
        elif self.type == "tool_use":
            if not self.id or not self.name or self.input is None:
                raise ValueError("a tool_use block needs id, name and input")
        elif self.type == "tool_result":
            if not self.tool_use_id:
                raise ValueError("a tool_result block needs tool_use_id")
        else:
            raise ValueError(f"only text content blocks (and tool_use, tool_result) are supported, got {self.type!r}")
        return self

    def result_text(self) -> str:
        text = self.content if isinstance(self.content, str) else "".join(b.text for b in self.content or ())
        return f"Error: {text}" if self.is_error else text


class InputMessage(_Body):
    role: Literal["user", "assistant"]
    content: list[ContentBlock]

    @field_validator("content", mode="before")
    @classmethod
    def _blocks(cls, content: Any) -> Any:
        return _as_blocks(content)


class Tool(_Body):
    name: str
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    cache_control: dict[str, Any] | None = None

    def as_openai(self) -> dict[str, Any]:
        """The OpenAI function tool the chat path renders (server/tools.py), checkpoint included."""
        return {"type": "function", "cache_control": self.cache_control,
                "function": {"name": self.name, "description": self.description or "",
                             "parameters": self.input_schema or {}}}


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
    tool_choice: dict[str, Any] | None = None     # {"type": "auto" | "none"}; "any" and "tool" are 400s
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
            where = f"messages.{i}.content.{j}"
            if block.type == "text" and not block.text:
                raise APIError(400, f"{where}.text: text content blocks must be non-empty", param=f"{where}.text")
            belongs = {"tool_use": "assistant", "tool_result": "user"}.get(block.type, message.role)
            if belongs != message.role:
                raise APIError(400, f"{where}: {block.type} blocks belong in {belongs} messages", param=where)
            if block.type == "tool_use" and block.cache_control is not None:
                raise APIError(400, f"{where}.cache_control: a checkpoint on a tool_use block is not supported",
                               param=f"{where}.cache_control", code="invalid_cache_control")
    messages = [ChatMessage(role="system", content=[_part(block) for block in body.system])] if body.system else []
    for message in body.messages:
        messages += _chat_messages(message)
    if body.cache_control is not None:
        _mark_last_block(messages, body.cache_control)
    return ChatCompletionRequest(model=body.model, messages=messages, max_tokens=body.max_tokens,
                                 temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                                 stop=body.stop_sequences, stream=body.stream,
                                 tools=[tool.as_openai() for tool in body.tools] if body.tools else None,
                                 tool_choice=_tool_choice(body.tool_choice),
                                 compaction=_compaction(body.context_management),
                                 prompt_cache_key=body.prompt_cache_key)


def _chat_messages(message: InputMessage) -> list[ChatMessage]:
    """One Anthropic message as chat messages: an assistant's text and tool calls as one message; a
    user's tool results as `tool` messages (they come first in its content), then its text."""
    texts = [_part(block) for block in message.content if block.type == "text"]
    if message.role == "assistant":
        calls = [ToolCall(id=block.id, function=FunctionCall(name=block.name, arguments=json.dumps(block.input)))
                 for block in message.content if block.type == "tool_use"]
        return [ChatMessage(role="assistant", content=texts or None, tool_calls=calls or None)]
    results = [ChatMessage(role="tool", tool_call_id=block.tool_use_id,
                           content=[ContentPart(type="text", text=block.result_text(), cache_control=block.cache_control)])
               for block in message.content if block.type == "tool_result"]
    return results + ([ChatMessage(role="user", content=texts)] if texts else [])


def _tool_choice(choice: dict[str, Any] | None) -> str | None:
    """Anthropic's tool_choice as OpenAI's: auto and none; any and tool (forcing a call) are 400s,
    kvserve does not constrain decoding."""
    if choice is None:
        return None
    kind = choice.get("type")
    if kind in ("auto", "none"):
        return kind
    raise APIError(400, f"tool_choice type {kind!r} is not supported: kvserve cannot force a tool call (\"any\", "
                   "\"tool\"); with \"auto\" the model calls a tool when it chooses to", param="tool_choice")


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


def _mark_last_block(messages: list[ChatMessage], cache_control: dict[str, Any]) -> None:
    """Top-level cache_control ("automatic caching") marks the last block of the prompt, unless
    that block carries its own mark; it counts towards the checkpoint limit like any other."""
    for message in reversed(messages):
        if message.content:
            last = message.content[-1]
            if last.cache_control is None:
                last.cache_control = cache_control
            return


def _part(block: TextBlock | ContentBlock) -> ContentPart:
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

    def __getattr__(self, name: str):   # the rest (latest_stats, ...) is the stream's
        return getattr(self._stream, name)


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
        """(event name, data) pairs; see the module docstring for the order. An answer that may
        call tools opens its text block at its first text, and its calls follow as tool_use blocks."""
        started = False
        # Without tools the text block opens with the message; with them, at the first text (an
        # answer that is only calls has none: an empty text block would come back to us, refused).
        may_call = self.generation.choices[0].tools is not None
        text_index, blocks = (None, 0) if may_call else (0, 1)
        async for chunk in self.generation.chunks():
            for choice in chunk["choices"]:
                delta = choice["delta"]
                if "role" in delta:
                    continue   # the opening chunk, sent before the engine produced anything
                if not started:   # the first output: the prefill is done, the cache counts are final
                    started = True
                    for event in self._opening(text_block=not may_call):
                        yield event
                if delta.get("content"):
                    if text_index is None:
                        text_index, blocks = blocks, blocks + 1
                        yield "content_block_start", {"type": "content_block_start", "index": text_index,
                                                      "content_block": {"type": "text", "text": ""}}
                    yield "content_block_delta", {"type": "content_block_delta", "index": text_index,
                                                  "delta": {"type": "text_delta", "text": delta["content"]}}
                for call in delta.get("tool_calls", ()):
                    if text_index is not None:
                        yield "content_block_stop", {"type": "content_block_stop", "index": text_index}
                        text_index = None
                    index, blocks = blocks, blocks + 1
                    for event in _tool_use_events(index, call):
                        yield event
        if not started:   # chunks() always ends with a finishing chunk; this only guards the event order
            for event in self._opening(text_block=not may_call):
                yield event
        if blocks == 0:   # nothing at all was written: the empty text block an answer without tools has
            text_index = 0
            yield "content_block_start", {"type": "content_block_start", "index": 0,
                                          "content_block": {"type": "text", "text": ""}}
        stop_reason, stop_sequence = self._stop()
        if text_index is not None:
            yield "content_block_stop", {"type": "content_block_stop", "index": text_index}
        delta = {"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                 "usage": anthropic_usage(self.generation.usage())}
        choice = self.generation.choices[0]
        routing = self.generation.routing(choice)
        if routing is not None:   # a router answered: which model, and the routing record
            delta["model"] = self.generation.answering_model(choice)
            delta["routing"] = routing
        yield "message_delta", delta
        yield "message_stop", {"type": "message_stop"}

    def _opening(self, text_block: bool = True) -> list[tuple[str, dict]]:
        model = self.generation.answering_model(self.generation.choices[0])
        message = {"id": self.id, "type": "message", "role": "assistant", "model": model,
                   "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": anthropic_usage(self.generation.usage(), output_tokens=0)}
        text = [("content_block_start", {"type": "content_block_start", "index": 0,
                                         "content_block": {"type": "text", "text": ""}})] if text_block else []
        return [("message_start", {"type": "message_start", "message": message}), *text, ("ping", {"type": "ping"})]

    def _stop(self) -> tuple[str, str | None]:
        finish = self.generation.choices[0].finish_reason
        if finish == "tool_calls":
            return "tool_use", None
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
        partial_json: dict[int, str] = {}
        async for name, data in self.events():
            if name == "message_start":
                message = data["message"]
            elif name == "content_block_start":
                message["content"].append(dict(data["content_block"]))
            elif name == "content_block_delta" and data["delta"]["type"] == "input_json_delta":
                partial_json[data["index"]] = partial_json.get(data["index"], "") + data["delta"]["partial_json"]
            elif name == "content_block_delta":
                message["content"][data["index"]]["text"] += data["delta"]["text"]
            elif name == "content_block_stop" and data["index"] in partial_json:
                message["content"][data["index"]]["input"] = json.loads(partial_json.pop(data["index"]))
            elif name == "message_delta":
                message.update(data["delta"])
                message["usage"] = data["usage"]
                if "routing" in data:
                    message["model"] = data["model"]
                    message["routing"] = data["routing"]
        return message


def _tool_use_events(index: int, call: dict) -> list[tuple[str, dict]]:
    """One OpenAI tool call as Anthropic's tool_use block: start (empty input), the input's JSON
    in one input_json_delta, stop."""
    block = {"type": "tool_use", "id": "toolu_" + call["id"].removeprefix("call_"), "name": call["function"]["name"],
             "input": {}}
    return [("content_block_start", {"type": "content_block_start", "index": index, "content_block": block}),
            ("content_block_delta", {"type": "content_block_delta", "index": index,
                                     "delta": {"type": "input_json_delta", "partial_json": call["function"]["arguments"]}}),
            ("content_block_stop", {"type": "content_block_stop", "index": index})]


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
