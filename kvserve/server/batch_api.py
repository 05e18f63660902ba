"""Batch jobs over HTTP: OpenAI's Files and Batches APIs and Anthropic's Message Batches, so the
`openai` and `anthropic` SDKs work unchanged; and the executor that runs one line as a background
engine request (kvserve/batch/ holds the store, validation, runner and wire formats).

    POST   /v1/files                    multipart (file, purpose=batch): JSONL, checked line by line
    GET    /v1/files, /v1/files/{id}, /v1/files/{id}/content;  DELETE /v1/files/{id}
    POST   /v1/batches                  {input_file_id, endpoint, completion_window, metadata}
    GET    /v1/batches (?limit, after), /v1/batches/{id};  POST /v1/batches/{id}/cancel
    POST   /v1/messages/batches         {requests: [{custom_id, params}]}
    GET    /v1/messages/batches (?limit, after_id), /v1/messages/batches/{id}, .../{id}/results
    POST   /v1/messages/batches/{id}/cancel

Batch jobs need --state-dir (kvserve serve has one by default); without it these routes answer
404 saying so. Every file and batch belongs to the tenant of the key that made it: other tenants
get 404 for it and never see it in a list. A bad input is a 400 naming its line
(kvserve/batch/requests.py); a line that fails when it runs (a value out of range, a prompt too
long) gets its own error record and the batch goes on.

Lines run as background requests (they wait behind interactive ones and give way to them), at
most --batch-concurrency at once (default: the engine's --max-num-seqs, which fills its batch when
nothing else runs). A line cut short by a shutdown or an engine failure is not recorded: it stays
pending and runs again after the restart.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kvserve.batch import formats
from kvserve.batch.requests import BatchInputError, Limits, parse_jsonl, validate_anthropic, validate_openai
from kvserve.batch.runner import Outcome, Retry
from kvserve.batch.store import ANONYMOUS, BatchStore, Line
from kvserve.server.anthropic_api import AnthropicMessage, MessagesRequest
from kvserve.server.anthropic_api import error_body as anthropic_error_body
from kvserve.server.anthropic_api import to_chat_request
from kvserve.server.auth import authenticate
from kvserve.server.http import serving_of
from kvserve.server.openai_api import OpenAIServing
from kvserve.server.openapi import request_body
from kvserve.engine.async_engine import EngineDeadError
from kvserve.sampling import InvalidRequestError
from kvserve.server.protocol import (APIError, ChatCompletionRequest, CompletionRequest, as_api_error,
                                     validation_error)

WINDOW = re.compile(r"^(\d+)([mh])$")
MAX_WINDOW_S = 7 * 24 * 3600
RETRYABLE = {"loading", "shutting_down", "engine_dead", "queue_full"}


# ---- request bodies (published at /docs) ------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class CreateBatch(_Body):
    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None


class BatchRequest(_Body):
    custom_id: str
    params: dict[str, Any]


class CreateMessageBatch(_Body):
    requests: list[BatchRequest] = Field(min_length=1)


# ---- running one line ---------------------------------------------------------------------------
class LineExecutor:
    """One line → a background engine request → (the API's result shape, status). Given to the
    BatchRunner; the offline CLI uses it too, with no HTTP server around it. `serving()` gives the
    OpenAIServing to use, or raises the 503 that says why there is none."""

    def __init__(self, serving: Callable[[], OpenAIServing]):
        self.serving = serving

    async def __call__(self, batch: dict, line: Line) -> Outcome:
        tenant = None if batch["tenant"] == ANONYMOUS else batch["tenant"]
        try:
            serving = self.serving()
            if batch["api"] == "anthropic":
                return await self._anthropic(serving, line.body, tenant)
            return await self._openai(serving, batch["endpoint"], line.body, tenant)
        except (APIError, InvalidRequestError, EngineDeadError) as failure:   # answered as a direct request is
            error = as_api_error(failure, "batch")
            if error.code in RETRYABLE or error.status == 429:
                raise Retry(error.message) from None
            body = anthropic_error_body(error) if batch["api"] == "anthropic" else error.body()
            return Outcome(False, error.status, body)

    async def _openai(self, serving, endpoint: str, body: dict, tenant: str | None) -> Outcome:
        kind = ChatCompletionRequest if endpoint == "/v1/chat/completions" else CompletionRequest
        try:
            parsed = kind.model_validate({**body, "stream": False, "stream_options": None})
        except ValidationError as error:
            raise validation_error(error.errors()) from None
        start = serving.chat if kind is ChatCompletionRequest else serving.completion
        generation = await start(parsed, tenant, background=True)
        try:
            result = await generation.result()
        finally:
            generation.close()
        _refuse_aborted(c["finish_reason"] for c in result["choices"])
        return Outcome(True, 200, result, result["usage"]["completion_tokens"])

    async def _anthropic(self, serving, params: dict, tenant: str | None) -> Outcome:
        try:
            parsed = MessagesRequest.model_validate({**params, "stream": False})
        except ValidationError as error:
            invalid = validation_error(error.errors())
            raise APIError(400, invalid.message, param=invalid.param, code=invalid.code) from None
        generation = await serving.chat(to_chat_request(parsed), tenant, background=True)
        message = AnthropicMessage(generation, parsed.stop_sequences or ())
        try:
            result = await message.result()
        finally:
            generation.close()
        _refuse_aborted(choice.finish_reason for choice in generation.choices)
        return Outcome(True, 200, result, result["usage"]["output_tokens"])


def _refuse_aborted(finish_reasons) -> None:
    """A line the server cut short (a drain, a stall) is not an answer: it runs again later."""
    if any(reason == "abort" for reason in finish_reasons):
        raise Retry("the request was aborted by the server")


# ---- routes ---------------------------------------------------------------------------------------
def register_batch(app: FastAPI) -> None:
    @app.post("/v1/files", openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "required": ["file", "purpose"], "properties": {
            "file": {"type": "string", "format": "binary"}, "purpose": {"type": "string", "enum": ["batch"]}}}}}}})
    async def upload_file(request: Request):
        store, tenant = _store(request), _tenant(request)
        try:
            form = await request.form()
        except Exception as error:   # not multipart, or a malformed one
            raise APIError(400, f"expected a multipart/form-data body with `file` and `purpose`: {error}",
                           param="file") from None
        purpose, upload = form.get("purpose"), form.get("file")
        if purpose != "batch":
            raise APIError(400, f"purpose must be 'batch', got {purpose!r}", param="purpose")
        if upload is None or isinstance(upload, str):
            raise APIError(400, "`file` must be an uploaded file", param="file")
        content = await upload.read()
        limits, filename = _limits(request), upload.filename or "batch.jsonl"

        def check_and_store() -> dict:   # off the event loop: a large file takes a while
            parse_jsonl(content, limits)
            return store.create_file(tenant, "batch", filename, content)

        try:
            return formats.file_object(await asyncio.to_thread(check_and_store))
        except BatchInputError as error:
            raise APIError(400, str(error), param=error.param, code="invalid_batch_file") from None

    @app.get("/v1/files")
    async def list_files(request: Request, purpose: str | None = None):
        rows = _store(request).list_files(_tenant(request), purpose)
        return {"object": "list", "data": [formats.file_object(r) for r in rows], "has_more": False}

    @app.get("/v1/files/{file_id}")
    async def get_file(file_id: str, request: Request):
        return formats.file_object(_file(request, file_id))

    @app.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str, request: Request):
        _file(request, file_id)
        path = _store(request).file_path(file_id)
        return StreamingResponse(_chunks(path), media_type="application/jsonl")

    @app.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str, request: Request):
        _file(request, file_id)
        _store(request).delete_file(file_id, _tenant(request))
        return {"id": file_id, "object": "file", "deleted": True}

    @app.post("/v1/batches")
    async def create_batch(body: CreateBatch, request: Request):
        store, tenant = _store(request), _tenant(request)
        window_s = _window(body.completion_window)
        _file(request, body.input_file_id, param="input_file_id")
        limits, known_model = _limits(request), _known_model(request)

        def check_and_store() -> dict:   # off the event loop: up to --max-batch-lines rows
            content = store.file_path(body.input_file_id).read_bytes()
            lines = validate_openai(parse_jsonl(content, limits), body.endpoint, known_model)
            return store.create_batch(tenant=tenant, api="openai", endpoint=body.endpoint,
                                      completion_window=body.completion_window, window_s=window_s, lines=lines,
                                      input_file_id=body.input_file_id, metadata=body.metadata)

        try:
            batch = await asyncio.to_thread(check_and_store)
        except BatchInputError as error:
            raise APIError(400, str(error), param=error.param, code="invalid_batch_file") from None
        _wake(request)
        return formats.openai_batch(batch, store.counts(batch["id"]))

    @app.get("/v1/batches")
    async def list_batches(request: Request, limit: int = 20, after: str | None = None):
        store = _store(request)
        batches, more = store.list_batches(_tenant(request), "openai", after, max(1, min(limit, 100)))
        data = [formats.openai_batch(b, store.counts(b["id"])) for b in batches]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": more}

    @app.get("/v1/batches/{batch_id}")
    async def get_batch(batch_id: str, request: Request):
        batch = _batch(request, batch_id, "openai")
        return formats.openai_batch(batch, _store(request).counts(batch_id))

    @app.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str, request: Request):
        batch = _cancel(request, batch_id, "openai")
        return formats.openai_batch(batch, _store(request).counts(batch_id))

    # ---- Anthropic ----------------------------------------------------------------------------------
    @app.post("/v1/messages/batches", openapi_extra=request_body(CreateMessageBatch))
    async def create_message_batch(request: Request):
        try:
            store, tenant = _store(request), _tenant(request)
            try:
                data = json.loads(await request.body())
            except ValueError:
                raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
            requests = data.get("requests") if isinstance(data, dict) else None
            limits, known_model = _limits(request), _known_model(request)

            def check_and_store() -> dict:
                lines = validate_anthropic(requests, known_model, limits)
                return store.create_batch(tenant=tenant, api="anthropic", endpoint="/v1/messages",
                                          completion_window="24h", window_s=24 * 3600, lines=lines, prefix="msgbatch_")

            try:
                batch = await asyncio.to_thread(check_and_store)
            except BatchInputError as error:
                raise APIError(400, str(error), param=error.param) from None
            _wake(request)
            return _message_batch(request, batch)
        except APIError as error:
            return _anthropic_error(error)

    @app.get("/v1/messages/batches")
    async def list_message_batches(request: Request, limit: int = 20, after_id: str | None = None):
        try:
            store = _store(request)
            batches, more = store.list_batches(_tenant(request), "anthropic", after_id, max(1, min(limit, 1000)))
            data = [_message_batch(request, b) for b in batches]
            return {"data": data, "has_more": more, "first_id": data[0]["id"] if data else None,
                    "last_id": data[-1]["id"] if data else None}
        except APIError as error:
            return _anthropic_error(error)

    @app.get("/v1/messages/batches/{batch_id}")
    async def get_message_batch(batch_id: str, request: Request):
        try:
            return _message_batch(request, _batch(request, batch_id, "anthropic"))
        except APIError as error:
            return _anthropic_error(error)

    @app.get("/v1/messages/batches/{batch_id}/results")
    async def message_batch_results(batch_id: str, request: Request):
        try:
            batch = _batch(request, batch_id, "anthropic")
            if batch["status"] not in ("completed", "cancelled", "expired", "failed"):
                raise APIError(400, f"batch {batch_id} has not ended yet; its results come when it has",
                               param="batch_id")
        except APIError as error:
            return _anthropic_error(error)
        lines = _store(request).lines(batch_id)
        return StreamingResponse((formats.anthropic_result_line(line) for line in lines),
                                 media_type="application/x-jsonl")

    @app.post("/v1/messages/batches/{batch_id}/cancel")
    async def cancel_message_batch(batch_id: str, request: Request):
        try:
            return _message_batch(request, _cancel(request, batch_id, "anthropic"))
        except APIError as error:
            return _anthropic_error(error)


def _store(request: Request) -> BatchStore:
    store = request.app.state.batch_store
    if store is None:
        raise APIError(404, "batch jobs are off: start the server with --state-dir DIR", type="not_found_error",
                       code="batch_disabled")
    return store


def _wake(request: Request) -> None:
    """Tell the runner there is work (it is None while the models load: it starts later anyway)."""
    if request.app.state.batch_runner is not None:
        request.app.state.batch_runner.wake()


def _tenant(request: Request) -> str:
    """The request's tenant, authenticated once per request (a rate limit charges each call; an
    upload was authenticated before its body was read, app.BodyLimitMiddleware)."""
    if not hasattr(request.state, "principal"):
        request.state.principal = authenticate(request.app.state, request.headers)
    return request.state.principal.tenant or ANONYMOUS


def _file(request: Request, file_id: str, param: str = "file_id") -> dict:
    row = _store(request).get_file(file_id, _tenant(request))
    if row is None:
        raise APIError(404, f"no file {file_id!r}", type="not_found_error", param=param, code="file_not_found")
    return row


def _batch(request: Request, batch_id: str, api: str) -> dict:
    batch = _store(request).get_batch(batch_id, _tenant(request))
    if batch is None or batch["api"] != api:
        raise APIError(404, f"no batch {batch_id!r}", type="not_found_error", param="batch_id",
                       code="batch_not_found")
    return batch


def _cancel(request: Request, batch_id: str, api: str) -> dict:
    store = _store(request)
    batch = _batch(request, batch_id, api)
    if store.set_status(batch_id, "cancelling", expect=("validating", "in_progress")):
        _wake(request)
    elif (batch := store.get_batch(batch_id))["status"] not in ("cancelling", "cancelled"):
        raise APIError(409, f"batch {batch_id} is {batch['status']}; only a running batch can be cancelled",
                       param="batch_id", code="batch_not_running")
    return store.get_batch(batch_id)


def _message_batch(request: Request, batch: dict) -> dict:
    url = str(request.base_url).rstrip("/") + f"/v1/messages/batches/{batch['id']}/results"
    return formats.anthropic_batch(batch, _store(request).counts(batch["id"]), url)


def _anthropic_error(error: APIError) -> JSONResponse:
    return JSONResponse(anthropic_error_body(error), status_code=error.status, headers=error.headers)


def _window(text: str) -> float:
    match = WINDOW.match(text)
    seconds = int(match.group(1)) * (60 if match.group(2) == "m" else 3600) if match else 0
    if not 0 < seconds <= MAX_WINDOW_S:
        raise APIError(400, f"completion_window must be a duration such as '24h' or '30m', at most 7 days; "
                       f"got {text!r}", param="completion_window")
    return seconds


def _limits(request: Request) -> Limits:
    config = request.app.state.config
    return Limits(config.max_batch_file_bytes, config.max_body_bytes, config.max_batch_lines)


def _known_model(request: Request):
    serving = serving_of(request.app.state)
    return lambda name: name is None or name in serving.models or name in serving.routers


def _chunks(path) -> Iterator[bytes]:
    with open(path, "rb") as content:
        while chunk := content.read(1 << 16):
            yield chunk

