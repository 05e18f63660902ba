"""Amazon Bedrock Runtime's Converse and ConverseStream, so that boto3's `bedrock-runtime` client
works unchanged against kvserve (`endpoint_url=<server>`, any region, any credentials).

    POST /model/{modelId}/converse          → JSON
    POST /model/{modelId}/converse-stream   → application/vnd.amazon.eventstream (eventstream.py)

The shapes follow botocore's service model (botocore/data/bedrock-runtime/*/service-2.json).
A Converse body is translated into the OpenAI-shaped `ChatCompletionRequest` and served by the
same `OpenAIServing.chat` as /v1/chat/completions, so limits, checkpoint rules and accounting
are shared:

    toolConfig.tools [{toolSpec}, {toolSpec}, {cachePoint}] ─┐  one system message, tools first:
    system           [{text}, {cachePoint: {ttl: "1h"}}]    ─┴▶ [header, tool₁, tool₂ + cc, how to call, text + cc 1h]
    messages[i]      [{text}, {cachePoint}, {text}]         ──▶ [text + cc 5m, text]
                                                 (cc = cache_control: {"type": "ephemeral", "ttl": ...})

A cachePoint marks the end of the content block before it (in the same list), so it becomes
`cache_control: {"type": "ephemeral", "ttl": <ttl, default 5m>}` on that block; the shared
validation then applies (at most 4, ttl 5m/1h, 1h never after 5m). Tool specs become the chat
path's function tools (rendered as text, with a line saying how to call them: server/tool_calls.py);
an answer that calls them is toolUse blocks and stopReason "tool_use" (streamed: contentBlockStart
with the toolUseId and name, one contentBlockDelta with the input's JSON, contentBlockStop), and
the client's toolUse / toolResult blocks become tool calls and tool messages. toolChoice auto;
any and tool are a ValidationException (a call cannot be forced). Other content blocks (images,
documents, ...) are a ValidationException.

Usage (Bedrock's convention, see the user guide's prompt-caching page): `inputTokens` counts the
prompt tokens neither read from nor written to the cache, so
    inputTokens + cacheReadInputTokens + cacheWriteInputTokens = every prompt token
and `totalTokens` = every prompt token + `outputTokens`. The engine counts each written token
once, for the first checkpoint that covers it, and never a token it read from the cache.
`cacheDetails` lists written tokens per TTL (exact, from the engine), 1h before 5m, empty when
nothing was written.

Errors take Bedrock's shape: status, `x-amzn-ErrorType: <Name>` and `{"message": ...}`, which
botocore raises as `client.exceptions.<Name>`:

    400 ValidationException          bad body, values, checkpoints (the shared 400/413/422 answers)
    403 AccessDeniedException        (when API keys are checked)
    404 ResourceNotFoundException    unknown modelId
    429 ThrottlingException          queue full (botocore retries it)
    429 ModelNotReadyException       the model is still loading (botocore retries it)
    503 ServiceUnavailableException  the engine stopped
    500 InternalServerException      anything unexpected
Once a stream has begun, an error is an exception message in the stream (`:exception-type`
validationException / throttlingException / serviceUnavailableException /
internalServerException), which botocore raises as EventStreamError while iterating.

A client that disconnects aborts the request: the Generation is closed in a `finally`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kvserve.server import eventstream
from kvserve.server.checkpoints import TTLS
from kvserve.server.openai_api import Generation
from kvserve.server.auth import authenticate
from kvserve.server.http import ClientGone, serving, unless_disconnected
from kvserve.server.protocol import as_api_error, APIError, ChatCompletionRequest, validation_error
from kvserve.server.openapi import request_body
from kvserve.server.sse import StreamResponse

log = logging.getLogger(__name__)

DEFAULT_TTL = "5m"
TTL_ORDER = ("1h", "5m")        # cacheDetails order: longest TTL first
ROLES = ("user", "assistant")


# ---- errors -----------------------------------------------------------------------------------
def error_name(error: APIError) -> tuple[int, str]:
    """An APIError (the shared validation's answer) → Bedrock's status and error type."""
    if error.status in (400, 413, 422):
        return 400, "ValidationException"
    if error.status in (401, 403):
        return 403, "AccessDeniedException"
    if error.status == 404:
        return 404, "ResourceNotFoundException"
    if error.status == 429:
        return 429, "ThrottlingException"
    if error.status == 503 and error.code == "loading":
        return 429, "ModelNotReadyException"
    if error.status == 503:
        return 503, "ServiceUnavailableException"
    if 400 <= error.status < 500:
        return 400, "ValidationException"
    return 500, "InternalServerException"


def error_response(error: APIError, request_id: str) -> JSONResponse:
    status, name = error_name(error)
    headers = {**error.headers, "x-amzn-ErrorType": name, "x-amzn-RequestId": request_id}
    return JSONResponse({"message": error.message}, status_code=status, headers=headers)


def stream_exception(error: APIError, encode=eventstream.exception) -> bytes:
    """An error after the stream began, as the ConverseStream union member that names it."""
    _, name = error_name(error)
    member = {"ValidationException": "validationException", "ThrottlingException": "throttlingException",
              "ServiceUnavailableException": "serviceUnavailableException"}.get(name, "internalServerException")
    return encode(member, error.message)


def _invalid(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def _as_api_error(error: Exception) -> APIError:
    return as_api_error(error, "bedrock")


# ---- the published request schema ----------------------------------------------------------------
# What /docs and /openapi.json show for Converse bodies (botocore's shapes, the members kvserve
# reads). Validation itself is to_chat_request's, which names each bad field in Bedrock's terms.
class _Schema(BaseModel):
    model_config = ConfigDict(extra="allow")


class CachePointBlock(_Schema):
    type: Literal["default"]
    ttl: Literal["5m", "1h"] | None = None


class TextContent(_Schema):
    text: str = Field(min_length=1)


class CachePointContent(_Schema):
    cachePoint: CachePointBlock


class Message(_Schema):
    role: Literal["user", "assistant"]
    content: list[TextContent | CachePointContent] = Field(min_length=1)


class InferenceConfiguration(_Schema):
    maxTokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    topP: float | None = Field(default=None, gt=0, le=1)
    stopSequences: list[str] | None = None


class ToolSpecification(_Schema):
    name: str
    description: str | None = None
    inputSchema: dict[str, Any] | None = None


class ToolSpecContent(_Schema):
    toolSpec: ToolSpecification


class ToolConfiguration(_Schema):
    tools: list[ToolSpecContent | CachePointContent] = Field(min_length=1)


class ConverseRequest(_Schema):
    """A Converse / ConverseStream body."""

    messages: list[Message] = Field(min_length=1)
    system: list[TextContent | CachePointContent] | None = None
    inferenceConfig: InferenceConfiguration | None = None
    toolConfig: ToolConfiguration | None = None
    additionalModelRequestFields: dict[str, Any] | None = None


# ---- request translation ------------------------------------------------------------------------
@dataclass(frozen=True)
class Converse:
    """A translated Converse body: the chat request, and what the response needs to know."""

    chat: ChatCompletionRequest
    max_tokens_given: bool
    stop_sequences_given: bool


def _convert(blocks: Any, field: str, item_of: Callable[[str, Any, str], dict]) -> list[dict]:
    """Content blocks → the items `item_of(kind, value, where)` makes of them (text parts, tools, ...),
    in order; a cachePoint marks the item before it (its `cache_control`)."""
    if not isinstance(blocks, list):
        raise _invalid(f"{field} must be a list of content blocks", field)
    items: list[dict] = []
    for i, block in enumerate(blocks):
        where = f"{field}.{i}"
        kind = _member(block, where)
        if kind == "cachePoint":
            if not items or "cache_control" in items[-1]:
                raise _invalid(f"{where}: a cachePoint must follow a content block in the same list", where)
            items[-1]["cache_control"] = _cache_control(block[kind], f"{where}.cachePoint")
            continue
        items.append(item_of(kind, block[kind], where))
    return items


def _member(block: Any, where: str) -> str:
    """The one member set in a union block ({"text": ...}, {"cachePoint": ...}, ...)."""
    if not isinstance(block, dict) or len(block) != 1:
        raise _invalid(f"{where} must be an object with exactly one member (e.g. text or cachePoint)", where)
    return next(iter(block))


def _cache_control(point: Any, where: str) -> dict:
    """A cachePoint → cache_control for the shared checkpoint validation."""
    if not isinstance(point, dict):
        raise _invalid(f"{where} must be an object", where)
    unknown = set(point) - {"type", "ttl"}
    if unknown:
        raise _invalid(f"{where}: unknown fields {', '.join(sorted(unknown))}", where)
    if point.get("type") != "default":
        raise _invalid(f"{where}.type must be 'default', got {point.get('type')!r}", f"{where}.type")
    ttl = point.get("ttl", DEFAULT_TTL)
    if not isinstance(ttl, str) or ttl not in TTLS:   # also checked by the shared rules; here to name the field
        raise _invalid(f"{where}.ttl must be one of {', '.join(TTLS)}, got {ttl!r}", f"{where}.ttl")
    return {"type": "ephemeral", "ttl": ttl}


def _text(kind: str, value: Any, where: str) -> str:
    if kind != "text":
        raise _invalid(f"{where}: {kind} content blocks are not supported; only text and cachePoint", where)
    if not isinstance(value, str):
        raise _invalid(f"{where}.text must be a string", f"{where}.text")
    if not value.strip():   # as Bedrock answers a blank text block
        raise _invalid(f"the text field in the ContentBlock object at {where} is blank; add text to it", f"{where}.text")
    return value


def _text_part(kind: str, value: Any, where: str) -> dict:
    return {"type": "text", "text": _text(kind, value, where)}


def _tool(kind: str, spec: Any, where: str) -> dict:
    """A toolSpec → an OpenAI function tool, which the chat path renders at the start of the
    system prompt (a cachePoint after it becomes its cache_control)."""
    if kind != "toolSpec":
        raise _invalid(f"{where}: {kind} tools are not supported; only toolSpec and cachePoint", where)
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise _invalid(f"{where}.toolSpec needs a name", f"{where}.toolSpec")
    schema = spec.get("inputSchema")
    return {"type": "function", "function": {
        "name": spec["name"], "description": str(spec.get("description", "")),
        "parameters": schema.get("json", {}) if isinstance(schema, dict) else {}}}


def _tool_choice(choice: Any) -> str:
    """toolConfig.toolChoice: auto; any and tool (forcing a call) are refused, as kvserve does not
    constrain decoding."""
    kind = _member(choice, "toolConfig.toolChoice")
    if kind != "auto":
        raise _invalid(f"toolConfig.toolChoice {kind!r} is not supported: kvserve cannot force a tool call "
                       "(any, tool); with auto the model calls a tool when it chooses to", "toolConfig.toolChoice")
    return "auto"


def _chat_messages(message: dict, i: int) -> list[dict]:
    """One Converse message → chat messages: text blocks (a cachePoint marks the one before it);
    an assistant's toolUse blocks → its tool_calls; a user's toolResult blocks → tool messages
    before its text."""
    role, field = message["role"], f"messages.{i}.content"

    def item(kind: str, value: Any, where: str) -> dict:
        if kind not in ("toolUse", "toolResult"):
            return _text_part(kind, value, where)
        belongs = "assistant" if kind == "toolUse" else "user"
        if role != belongs or not isinstance(value, dict) or not isinstance(value.get("toolUseId"), str):
            raise _invalid(f"{where}: a {kind} block needs a toolUseId and belongs in {belongs} messages", where)
        if kind == "toolResult":    # a tool message; a cachePoint after it marks its text
            return {"type": "text", "text": _result_text(value, where), "tool_call_id": value["toolUseId"]}
        if not isinstance(value.get("name"), str) or not isinstance(value.get("input"), dict):
            raise _invalid(f"{where}.toolUse needs a name and an input object", where)
        return {"id": value["toolUseId"], "type": "function",
                "function": {"name": value["name"], "arguments": json.dumps(value["input"])}}

    items = _convert(message.get("content"), field, item)
    if not items:
        raise _invalid(f"{field} must hold at least one text, toolUse or toolResult block", field)
    calls = [call for call in items if call["type"] == "function"]
    if any("cache_control" in call for call in calls):
        raise _invalid(f"{field}: a cachePoint after a toolUse block is not supported", field)
    parts = [part for part in items if part["type"] == "text" and "tool_call_id" not in part]
    results = [{"role": "tool", "tool_call_id": part.pop("tool_call_id"), "content": [part]}
               for part in items if "tool_call_id" in part]
    if role == "assistant":
        return [{"role": "assistant", "content": parts or None, **({"tool_calls": calls} if calls else {})}]
    return results + ([{"role": "user", "content": parts}] if parts else [])


def _result_text(result: dict, where: str) -> str:
    """A toolResult's content (text and json blocks) as the tool message's text."""
    pieces, content = [], result.get("content") or []
    if not isinstance(content, list):
        raise _invalid(f"{where}.toolResult.content must be a list of content blocks", where)
    for k, block in enumerate(content):
        kind = _member(block, f"{where}.toolResult.content.{k}")
        if kind == "text" and isinstance(block[kind], str):
            pieces.append(block[kind])
        elif kind == "json":
            pieces.append(json.dumps(block[kind]))
        else:
            raise _invalid(f"{where}.toolResult.content.{k}: only text and json results are supported", where)
    text = "".join(pieces)
    return f"Error: {text}" if result.get("status") == "error" else text


def to_chat_request(model_id: str, body: Any) -> Converse:
    """A Converse/ConverseStream body → the shared chat request (APIError 400 when malformed).
    `additionalModelRequestFields` and other fields are ignored."""
    if not isinstance(body, dict):
        raise _invalid("the request body must be a JSON object")
    tools, tool_choice = None, None
    tool_config = body.get("toolConfig")
    if tool_config is not None:
        if not isinstance(tool_config, dict):
            raise _invalid("toolConfig must be an object", "toolConfig")
        if not tool_config.get("tools"):
            raise _invalid("toolConfig.tools must be a non-empty list", "toolConfig.tools")
        tools = _convert(tool_config["tools"], "toolConfig.tools", _tool)
        if tool_config.get("toolChoice") is not None:
            tool_choice = _tool_choice(tool_config["toolChoice"])
    system = _convert(body["system"], "system", _text_part) if body.get("system") is not None else []
    messages = [{"role": "system", "content": system}] if system else []
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise _invalid("messages must be a non-empty list", "messages")
    for i, message in enumerate(raw_messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise _invalid(f"messages.{i}.role must be one of {', '.join(ROLES)}", f"messages.{i}.role")
        messages += _chat_messages(message, i)
    config = body.get("inferenceConfig") or {}
    if not isinstance(config, dict):
        raise _invalid("inferenceConfig must be an object", "inferenceConfig")
    fields = {"maxTokens": "max_tokens", "temperature": "temperature", "topP": "top_p", "stopSequences": "stop"}
    sampling = {fields[name]: value for name, value in config.items() if name in fields and value is not None}
    try:
        chat = ChatCompletionRequest.model_validate({"model": model_id, "messages": messages, "tools": tools,
                                                     "tool_choice": tool_choice, **sampling})
    except ValidationError as error:
        raise validation_error(error.errors()) from None
    return Converse(chat, "max_tokens" in sampling, bool(sampling.get("stop")))


# ---- response shaping ---------------------------------------------------------------------------
def bedrock_usage(usage: Mapping[str, Any]) -> dict:
    """Generation.usage() → Bedrock's TokenUsage (conventions in the module docstring)."""
    prompt, output = usage["prompt_tokens"], usage["completion_tokens"]
    read, written = usage["cache_read_input_tokens"], usage["cache_creation_input_tokens"]
    return {"inputTokens": max(0, prompt - read - written), "outputTokens": output, "totalTokens": prompt + output,
            "cacheReadInputTokens": read, "cacheWriteInputTokens": written,
            "cacheDetails": cache_details(usage["cache_creation"])}


def cache_details(by_ttl: Mapping[str, int]) -> list[dict]:
    """Written tokens per TTL, 1h first, from the engine's exact per-TTL counts."""
    tokens = {"1h": by_ttl["ephemeral_1h_input_tokens"], "5m": by_ttl["ephemeral_5m_input_tokens"]}
    return [{"ttl": ttl, "inputTokens": tokens[ttl]} for ttl in TTL_ORDER if tokens[ttl]]


def stop_reason(finish_reason: str | None, ended_with_eos: bool, converse: Converse) -> str:
    """The engine's finish reason → Bedrock's stopReason. "stop" is an end token or a stop
    string; only the last token tells them apart. "length" without maxTokens is the context."""
    if finish_reason == "tool_calls":
        return "tool_use"
    if finish_reason == "length":
        return "max_tokens" if converse.max_tokens_given else "model_context_window_exceeded"
    if finish_reason == "stop" and converse.stop_sequences_given and not ended_with_eos:
        return "stop_sequence"
    return "end_turn"


class _LastToken:
    """Wraps a choice's RequestStream to remember the last token id it delivered (so that an end
    token can be told from a stop string); everything else goes to the stream."""

    def __init__(self, stream):
        self._stream = stream
        self.token_id: int | None = None

    def __aiter__(self):
        return self

    async def __anext__(self):
        output = await self._stream.__anext__()
        if output.token_ids:
            self.token_id = output.token_ids[-1]
        return output

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


class _Reply:
    """One Generation answered in Bedrock's shapes."""

    def __init__(self, generation: Generation, converse: Converse, started: float):
        self.generation = generation
        self.converse = converse
        self.started = started
        choice = generation.choices[0]   # a Converse request has one choice
        self._last = choice.stream = _LastToken(choice.stream)
        self._eos = generation.model.engine.engine.eos_token_ids

    @property
    def stop_reason(self) -> str:
        return stop_reason(self.generation.choices[0].finish_reason, self._last.token_id in self._eos, self.converse)

    def usage(self) -> dict:
        return bedrock_usage(self.generation.usage())

    def metrics(self) -> dict:
        return {"latencyMs": int((time.monotonic() - self.started) * 1000)}

    def trace(self) -> dict | None:
        """A router's answer: the model that answered, as Bedrock's prompt routers report it."""
        choice = self.generation.choices[0]
        if choice.routed is None:
            return None
        return {"promptRouter": {"invokedModelId": self.generation.answering_model(choice)}}

    def _with_routing(self, reply: dict) -> dict:
        trace = self.trace()
        if trace is not None:
            reply["trace"] = trace
            reply["additionalModelResponseFields"] = {
                "routing": self.generation.routing(self.generation.choices[0]),
                "cost": self.generation.cost()}
        return reply

    async def response(self) -> dict:
        result = await self.generation.result()
        message = result["choices"][0]["message"]
        content = [{"text": message["content"] or ""}]
        if message.get("tool_calls"):
            content = ([{"text": message["content"]}] if message["content"] else []) + [
                _tool_use(call) for call in message["tool_calls"]]
        return self._with_routing({"output": {"message": {"role": "assistant", "content": content}},
                                   "stopReason": self.stop_reason, "usage": self.usage(),
                                   "metrics": self.metrics()})

    async def events(self, event=eventstream.event, exception=eventstream.exception) -> AsyncIterator[bytes]:
        """The ConverseStream events; an error midway ends the stream with an exception message.
        `event(name, body)` and `exception(member, message)` encode them (default: AWS event-stream)."""
        # The text block is index 0 from the start, as before, unless the answer may call tools:
        # then it takes the next index at its first text, and each call a block of its own.
        may_call = self.generation.choices[0].tools is not None
        text_index, blocks = (None, 0) if may_call else (0, 1)
        try:
            yield event("messageStart", {"role": "assistant"})
            async with contextlib.aclosing(self.generation.chunks()) as chunks:
                async for chunk in chunks:
                    for choice in chunk["choices"]:
                        text = choice["delta"].get("content")
                        if text:
                            if text_index is None:
                                text_index, blocks = blocks, blocks + 1
                            yield event("contentBlockDelta", {"delta": {"text": text}, "contentBlockIndex": text_index})
                        for call in choice["delta"].get("tool_calls", ()):
                            if text_index is not None:
                                yield event("contentBlockStop", {"contentBlockIndex": text_index})
                                text_index = None
                            index, blocks = blocks, blocks + 1
                            use = _tool_use(call)["toolUse"]
                            yield event("contentBlockStart", {"start": {"toolUse": {
                                "toolUseId": use["toolUseId"], "name": use["name"]}}, "contentBlockIndex": index})
                            yield event("contentBlockDelta", {"delta": {"toolUse": {
                                "input": call["function"]["arguments"]}}, "contentBlockIndex": index})
                            yield event("contentBlockStop", {"contentBlockIndex": index})
            if blocks == 0:    # nothing written at all: the empty text block of an answer without tools
                text_index = 0
            if text_index is not None:
                yield event("contentBlockStop", {"contentBlockIndex": text_index})
            yield event("messageStop", {"stopReason": self.stop_reason})
            metadata = {"usage": self.usage(), "metrics": self.metrics()}
            if self.trace() is not None:
                metadata["trace"] = self.trace()
            yield event("metadata", metadata)
        except Exception as error:   # the engine failed midway: tell the client in-band
            yield stream_exception(_as_api_error(error), exception)
        finally:   # also on disconnect: StreamingResponse cancels this generator
            self.generation.close()


def _tool_use(call: dict) -> dict:
    """An OpenAI tool call as Converse's toolUse block (its id kept, so the toolResult names it)."""
    return {"toolUse": {"toolUseId": call["id"], "name": call["function"]["name"],
                        "input": json.loads(call["function"]["arguments"])}}


# ---- routes -----------------------------------------------------------------------------------
def register_bedrock(app: FastAPI) -> None:
    @app.post("/model/{model_id:path}/converse", openapi_extra=request_body(ConverseRequest))
    async def converse(model_id: str, request: Request) -> Response:
        request_id = str(uuid.uuid4())
        try:
            reply = await _start(request, model_id)
        except Exception as error:
            return error_response(_as_api_error(error), request_id)
        return await _respond(request, reply, request_id)

    @app.post("/model/{model_id:path}/converse-stream", openapi_extra=request_body(ConverseRequest))
    async def converse_stream(model_id: str, request: Request) -> Response:
        request_id = str(uuid.uuid4())
        try:
            reply = await _start(request, model_id)
        except Exception as error:
            return error_response(_as_api_error(error), request_id)
        return StreamResponse(reply.events(), reply.generation, request.app.state.config.stream_idle_timeout_s,
                              media_type=eventstream.CONTENT_TYPE, headers={"x-amzn-RequestId": request_id})


async def _start(request: Request, model_id: str, body: Any = None, who=None) -> _Reply:
    """Starts answering a Converse body (read from the request unless given), for `who` (the
    request's principal unless given: authenticated once, since that also charges its rate limit)."""
    started = time.monotonic()
    if body is None:
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise _invalid("the request body is not valid JSON") from None
    converse = to_chat_request(model_id, body)
    # The SigV4 access key id is the API key (auth.py); its tenant namespaces the prefix cache.
    tenant = (who or authenticate(request.app.state, request.headers)).tenant
    generation = await serving(request).chat(converse.chat, tenant=tenant)
    try:
        return _Reply(generation, converse, started)
    except BaseException:
        generation.close()
        raise


async def _respond(request: Request, reply: _Reply, request_id: str) -> Response:
    """The Converse response, or 499 (engine work aborted) if the client leaves first."""
    try:
        body = await unless_disconnected(request, reply.response(), reply.generation)
    except ClientGone:
        return Response(status_code=499)
    except Exception as error:
        return error_response(_as_api_error(error), request_id)
    return JSONResponse(body, headers={"x-amzn-RequestId": request_id})
