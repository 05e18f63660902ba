"""OpenAI request bodies (pydantic) and the error type every endpoint answers with.

Errors take OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

    400 invalid_request_error   a value is out of range or inconsistent (malformed JSON included)
    401 authentication_error    (when API keys are configured)
    404 not_found_error         unknown model or route
    413 invalid_request_error   body larger than --max-body-bytes
    422 invalid_request_error   wrong types or missing fields (schema validation)
    429 rate_limit_error        queue full (--max-queued-requests); Retry-After says when to retry
    503 service_unavailable     model still loading, or engine stopped
"""

from __future__ import annotations

import logging

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

from kvserve.sampling import MAX_STOP_STRINGS, MAX_TOP_LOGPROBS


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(errors: Sequence[Mapping[str, Any]]) -> APIError:
    """Pydantic errors → the 422 every transport answers: the first problem named with its
    parameter path, the rest counted. FastAPI's leading "body" is dropped from the path, so HTTP
    and WebSocket name a parameter the same way (`max_tokens`, `messages.0.role`)."""
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    message = f"{param}: {first.get('msg')}" if param else str(first.get("msg", "invalid request body"))
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problems)"
    return APIError(422, message, param=param, code="invalid_body")


Number = Annotated[float, Field(strict=False)]


class _Body(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers commonly do.
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: StrictBool = False


class SamplingFields(_Body):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    max_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    # extensions
    ignore_eos: StrictBool = False
    top_k: StrictInt | None = None
    priority: StrictInt = 0
    cache_salt: str | None = None
    stop_token_ids: list[StrictInt] | None = None
    prompt_cache_key: str | None = Field(default=None, max_length=1024)   # scaled out: requests sharing it stick to one replica

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ContentPart(_Body):
    type: Literal["text"]
    text: str
    cache_control: dict[str, Any] | None = None


class FunctionCall(_Body):
    name: str
    arguments: str


class ToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    """One message of OpenAI's schema. `content` is required on every role but an assistant
    message that carries `tool_calls`; a `tool` message names the call it answers
    (`tool_call_id`). Those role-dependent rules are checked by `check_messages` (400, as OpenAI
    answers), the field types by pydantic (422)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    cache_control: dict[str, Any] | None = None   # only to reject it here with a clear 400

    def text_content(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


def check_messages(messages: Sequence[ChatMessage]) -> None:
    """OpenAI's role-dependent rules (400 naming the message): content is required except on an
    assistant message with tool_calls; tool_calls only on assistant messages; a tool message
    needs its tool_call_id."""
    for i, message in enumerate(messages):
        if message.tool_calls is not None and message.role != "assistant":
            raise APIError(400, f"messages.{i}.tool_calls: only assistant messages carry tool_calls, "
                           f"not {message.role} messages", param=f"messages.{i}.tool_calls", code="invalid_message")
        if message.content is None and not (message.role == "assistant" and message.tool_calls):
            raise APIError(400, f"messages.{i}.content is required for a {message.role} message (only an "
                           "assistant message that carries tool_calls may omit it)",
                           param=f"messages.{i}.content", code="missing_content")
        if message.role == "tool" and not message.tool_call_id:
            raise APIError(400, f"messages.{i}.tool_call_id is required for a tool message",
                           param=f"messages.{i}.tool_call_id", code="missing_tool_call_id")


class CompactionOptions(_Body):
    """kvserve's extension: compact the history when it exceeds `budget_tokens` (default: the
    context the answer leaves), keeping the last `keep_recent` messages verbatim."""

    budget_tokens: StrictInt | None = None
    keep_recent: StrictInt = 2


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    # Compaction of long histories (kvserve/routing/compaction.py): OpenAI Responses' switch, or ours
    truncation: Literal["auto", "disabled"] | None = None
    compaction: CompactionOptions | None = None

    @property
    def compaction_options(self) -> CompactionOptions | None:
        if self.compaction is not None:
            return self.compaction
        return CompactionOptions() if self.truncation == "auto" else None

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if not messages:   # a field validator, so the error's param is "messages"
            raise ValueError("messages must not be empty")
        return messages

    @property
    def num_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs requires logprobs: true", param="top_logprobs")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise APIError(400, f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {self.top_logprobs}",
                           param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    logprobs: StrictInt | None = None
    echo: StrictBool = False

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else 16   # OpenAI's completions default

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


LIMITS_DOC = {"max_stop_strings": MAX_STOP_STRINGS, "max_top_logprobs": MAX_TOP_LOGPROBS}


def engine_dead(error: Exception) -> APIError:
    """The 503 of a request whose engine stopped (shut down, or died: the server restarts; or, scaled
    out, the replica running it died: code replica_lost)."""
    return APIError(503, str(error), type="service_unavailable", code=getattr(error, "code", "engine_dead"),
                    headers={"Retry-After": "5"})


def as_api_error(error: Exception, where: str) -> APIError:
    """Any failure of a request → the APIError to answer with (unexpected ones are logged, 500)."""
    from kvserve.engine.async_engine import EngineDeadError
    from kvserve.sampling import InvalidRequestError

    if isinstance(error, APIError):
        return error
    if isinstance(error, InvalidRequestError):
        return APIError(400, str(error), param=error.param)
    if isinstance(error, EngineDeadError):
        return engine_dead(error)
    logging.getLogger(__name__).error("unexpected error in %s", where, exc_info=error)
    return APIError(500, "internal error", type="server_error")
