"""The SageMaker real-time endpoint contract, so that the same container deploys there unchanged.

SageMaker's front end talks to the container on three routes (port 8080):

    GET  /ping                          200 when the models are loaded and serving, 503 otherwise
    POST /invocations                   one request, one answer
    POST /invocations-response-stream   one request, its answer streamed (the raw bytes are wrapped
                                        into PayloadPart events by SageMaker for the client)

An invocation body is an OpenAI chat-completions or completions body, or a Bedrock Converse body.
Which one is read from `X-Amzn-SageMaker-Custom-Attributes` (`api=openai` or `api=bedrock`, among
other `key=value` pairs separated by `;` or `,`), else from the body's shape: a Converse body has
`inferenceConfig`, a `system` list, or messages whose content is a list of blocks without a `type`;
an OpenAI body with `prompt` is a completion. The model is the body's `model` (OpenAI), else the
first served model. Streams: OpenAI answers SSE (`stream` forced on), Converse answers one JSON
event per line (`{"contentBlockDelta": {...}}`), since SageMaker frames the bytes itself.

`/endpoints/{name}/invocations` and `/endpoints/{name}/invocations-response-stream` are what the
`sagemaker-runtime` client calls (boto3 with `endpoint_url` pointed here): the same answers, the
stream wrapped into the AWS event-stream PayloadPart events SageMaker's front end sends. The endpoint
name picks the model when it names a served one. `kvserve serve --sagemaker`, or the
`SAGEMAKER_BIND_TO_PORT` variable SageMaker sets, binds 0.0.0.0 on port 8080 (or that variable's port).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from kvserve.server import bedrock, eventstream
from kvserve.server.auth import authenticate
from kvserve.server.http import serving
from kvserve.server.openapi import request_body_one_of
from kvserve.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, as_api_error, validation_error
from kvserve.server.sse import StreamResponse

ATTRIBUTES_HEADER = "X-Amzn-SageMaker-Custom-Attributes"
DEFAULT_PORT = 8080
APIS = ("openai", "bedrock")


def bind_port(environ) -> int | None:
    """The port SageMaker asks for (`SAGEMAKER_BIND_TO_PORT`), None when it asks for none; a value
    that is not a port is a ValueError that names it."""
    value = environ.get("SAGEMAKER_BIND_TO_PORT", "").strip()
    if not value:
        return None
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise ValueError(f"SAGEMAKER_BIND_TO_PORT must be a port number, got {value!r}")
    return int(value)


def api_of(body: dict, attributes: str | None) -> str:
    """"openai" or "bedrock": from the custom attributes' `api=`, else from the body's shape."""
    for pair in re.split(r"[;,]", attributes or ""):
        key, _, value = pair.partition("=")
        if key.strip().lower() == "api":
            value = value.strip().lower()
            if value not in APIS:
                raise APIError(400, f"{ATTRIBUTES_HEADER}: api must be one of {', '.join(APIS)}; got {value!r}",
                               param="api")
            return value
    if "inferenceConfig" in body or isinstance(body.get("system"), list):
        return "bedrock"
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list) and any(isinstance(b, dict) and "type" not in b for b in content):
                return "bedrock"
    return "openai"


def _model(request: Request, endpoint: str | None) -> str:
    models = serving(request).list_models()["data"]
    names = [m["id"] for m in models]
    if endpoint in names:
        return endpoint
    if not names:
        raise APIError(503, "no model is being served", type="service_unavailable")
    return names[0]


async def _body(request: Request) -> dict:
    try:
        body = json.loads(await request.body())
    except (ValueError, RecursionError):
        raise APIError(400, "the request body is not valid JSON (or nested too deeply)", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the invocation body must be a JSON object (an OpenAI chat-completions or "
                            "completions body, or a Bedrock Converse body)")
    return body


def _openai_request(body: dict, model: str, stream: bool):
    """The body as an OpenAI request: its own `model` if it names one, else `model`."""
    body = {"model": model, **body, "stream": stream}
    if not stream:
        body.pop("stream_options", None)
    kind = CompletionRequest if "prompt" in body and "messages" not in body else ChatCompletionRequest
    try:
        return kind.model_validate(body)
    except ValidationError as error:
        raise validation_error(error.errors()) from None


def _json_line(name: str, payload: object) -> bytes:
    return (json.dumps({name: payload}, separators=(",", ":"), ensure_ascii=False) + "\n").encode()


def _json_exception(member: str, message: str) -> bytes:
    return _json_line(member, {"message": message})


async def invoke(request: Request, endpoint: str | None, stream: bool) -> Response:
    """One invocation, in the API its body (or custom attributes) names. Who asks is known (401
    without a valid key, when keys are set) before the body is read."""
    who = authenticate(request.app.state, request.headers)
    body = await _body(request)
    api = api_of(body, request.headers.get(ATTRIBUTES_HEADER))
    model = _model(request, endpoint)
    if api == "bedrock":
        request_id = str(uuid.uuid4())
        try:
            reply = await bedrock._start(request, model, body, who)
        except Exception as error:
            return bedrock.error_response(bedrock._as_api_error(error), request_id)
        if not stream:
            return await bedrock._respond(request, reply, request_id)
        return StreamResponse(reply.events(_json_line, _json_exception), reply.generation,
                              request.app.state.config.stream_idle_timeout_s, media_type="application/jsonlines")
    from kvserve.server.app import respond

    parsed = _openai_request(body, model, stream)
    service = serving(request)
    generation = await (service.completion(parsed, who.tenant) if isinstance(parsed, CompletionRequest)
                        else service.chat(parsed, who.tenant))
    return await respond(request, generation, stream)


async def _payload_parts(frames: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The container's streamed bytes as SageMaker's front end sends them: PayloadPart events."""
    async for frame in frames:
        if frame:
            yield eventstream.encode_message({":event-type": "PayloadPart", ":content-type": "application/octet-stream",
                                              ":message-type": "event"}, frame)


def _runtime_headers(response: Response) -> dict:
    return {"x-Amzn-Invoked-Production-Variant": "AllTraffic", "X-Amzn-SageMaker-Content-Type":
            response.media_type or "application/json", "x-amzn-RequestId": str(uuid.uuid4())}


def _model_error(status: int, original: str, headers: dict | None = None) -> JSONResponse:
    """A container's error as the SageMaker runtime reports it: 424 ModelError, with the container's
    status and body (`OriginalStatusCode`, `OriginalMessage`); a Retry-After is kept."""
    kind = "client" if status < 500 else "server"
    kept = {k: v for k, v in (headers or {}).items() if k.lower() == "retry-after"}
    return JSONResponse({"message": f"Received {kind} error ({status}) from primary with message \"{original}\"",
                         "OriginalStatusCode": status, "OriginalMessage": original}, status_code=424,
                        headers={**kept, "x-amzn-ErrorType": "ModelError", "x-amzn-RequestId": str(uuid.uuid4())})


async def _runtime(request: Request, endpoint: str, stream: bool) -> Response:
    try:
        response = await invoke(request, endpoint, stream)
    except Exception as error:
        error = as_api_error(error, "sagemaker")
        return _model_error(error.status, json.dumps(error.body()), error.headers)
    if response.status_code >= 400:
        return _model_error(response.status_code, bytes(response.body).decode(), dict(response.headers))
    if isinstance(response, StreamResponse):
        response = StreamResponse(_payload_parts(response.body_iterator), response.generation, response.idle_timeout_s,
                                  media_type=eventstream.CONTENT_TYPE)
    response.headers.update(_runtime_headers(response))
    return response


def register_sagemaker(app: FastAPI) -> None:
    body = request_body_one_of(ChatCompletionRequest, CompletionRequest, bedrock.ConverseRequest)

    @app.get("/ping")
    async def ping(request: Request):
        """SageMaker's health check: /health's answer (200 once the models serve, 503 while loading,
        draining or failed)."""
        from kvserve.server.app import health_response

        return health_response(request.app.state)

    @app.post("/invocations", openapi_extra=body)
    async def invocations(request: Request):
        return await invoke(request, None, stream=False)

    @app.post("/invocations-response-stream", openapi_extra=body)
    async def invocations_stream(request: Request):
        return await invoke(request, None, stream=True)

    @app.post("/endpoints/{endpoint}/invocations", openapi_extra=body)
    async def runtime_invocations(endpoint: str, request: Request):
        """What the sagemaker-runtime client's invoke_endpoint calls."""
        return await _runtime(request, endpoint, stream=False)

    @app.post("/endpoints/{endpoint}/invocations-response-stream", openapi_extra=body)
    async def runtime_invocations_stream(endpoint: str, request: Request):
        """What invoke_endpoint_with_response_stream calls: the stream in PayloadPart events."""
        return await _runtime(request, endpoint, stream=True)
