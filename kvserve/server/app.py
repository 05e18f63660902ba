"""create_app(...) → the ASGI app. All state lives on app.state; no module globals.

Models load on a background thread after startup, so /health can answer "loading" (503) until
they are ready; every model endpoint answers 503 until then too. /health also answers 503 while
the server drains (SIGTERM) and once an engine has died or the models failed to load; in those
two cases `app.state.on_fatal(reason)` is called (lifecycle.Server exits non-zero).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvserve.config import ServerConfig
from kvserve.engine.async_engine import AsyncEngine, EngineDeadError
from kvserve.sampling import InvalidRequestError
from kvserve.server.auth import ApiKeys, Principal, RateLimits, TenantLimits, authenticate, require_admin
from kvserve.batch.runner import BatchRunner
from kvserve.batch.store import BatchStore
from kvserve.server.batch_api import LineExecutor, register_batch
from kvserve.server.bedrock import register_bedrock
from kvserve.server.sagemaker import register_sagemaker
from kvserve.server.metrics import CONTENT_TYPE, ServerMetrics
from kvserve.server.openapi import install as install_openapi
from kvserve.server.openai_api import Generation, OpenAIServing, ServedModel
from kvserve.routing.replicas import ROUTING_SESSION
from kvserve.routing.router import Router
from kvserve.server.routers import RoutedModel
from kvserve.server.http import ClientGone, serving, serving_of, unless_disconnected
from kvserve.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, as_api_error, validation_error
from kvserve.server.sse import StreamResponse, sse_stream
from kvserve.server.anthropic_api import register_anthropic
from kvserve.server.websocket import register_websocket

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
MAX_LARGE_BODIES = 2   # batch uploads received at once
ModelLoader = Callable[[], dict[str, AsyncEngine]]


class BodyLimitMiddleware:
    """413 for bodies over the limit, checked on Content-Length and while reading (chunked
    bodies), before anything parses them; 408 for a body that does not arrive within
    --body-timeout (a client trickling it a byte at a time).

    The body is read here, whole, and replayed to the app as one message: an error raised from
    inside the app's receive() would reach FastAPI's body parser, which answers every read error
    with 400. Later receive() calls (http.disconnect) go straight through.

    Large bodies (batch uploads, up to --max-batch-file-bytes) are read only for a client that
    `admit_large` lets in (a valid key, within its rate), and at most MAX_LARGE_BODIES at once
    (429 past that), so that nobody can make the server hold many of them."""

    def __init__(self, app, max_body_bytes: int, body_timeout_s: float, large_bodies: dict[str, int] | None = None,
                 admit_large: Callable[[dict], None] | None = None):
        """`large_bodies`: paths whose bodies may be larger, with their limits; `admit_large(scope)`
        raises the APIError that refuses a client before its large body is read."""
        self.app = app
        self.default_max_body_bytes = max_body_bytes
        self.large_bodies = large_bodies or {}
        self.admit_large = admit_large
        self.body_timeout_s = body_timeout_s
        self._large_in_progress = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["path"] not in self.large_bodies or scope["method"] != "POST":
            return await self._read(scope, receive, send, self.default_max_body_bytes)
        try:
            if self.admit_large is not None:
                self.admit_large(scope)
            if self._large_in_progress >= MAX_LARGE_BODIES:
                raise APIError(429, f"{MAX_LARGE_BODIES} large uploads are being received already; retry shortly",
                               type="rate_limit_error", code="uploads_busy", headers={"Retry-After": "2"})
        except APIError as error:
            return await _send_error(send, error)
        self._large_in_progress += 1
        try:
            return await self._read(scope, receive, send, self.large_bodies[scope["path"]])
        finally:
            self._large_in_progress -= 1

    async def _read(self, scope, receive, send, limit: int):
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await _send_error(send, self._too_large(limit))
        body = bytearray()
        deadline = time.monotonic() + self.body_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return await _send_error(send, APIError(
                    408, f"the request body did not arrive within {self.body_timeout_s:g} s (--body-timeout)",
                    code="body_timeout", headers={"Connection": "close"}))
            if message["type"] != "http.request":   # the client left while sending: pass that on
                first = message
                break
            body += message.get("body", b"")
            if len(body) > limit:
                return await _send_error(send, self._too_large(limit))
            if not message.get("more_body", False):
                first = {"type": "http.request", "body": bytes(body), "more_body": False}
                break
        replayed = False

        async def replay_receive():
            nonlocal replayed
            if not replayed:
                replayed = True
                return first
            return await receive()

        await self.app(scope, replay_receive, send)

    def _too_large(self, limit: int) -> APIError:
        flag = "--max-body-bytes" if limit == self.default_max_body_bytes else "--max-batch-file-bytes"
        return APIError(413, f"the request body exceeds {limit} bytes ({flag})", code="body_too_large")


class SessionHeaderMiddleware:
    """`x-session-id` → ROUTING_SESSION for the request's task: a scaled-out engine keeps a
    session's requests on one replica (a body's prompt_cache_key, when given, takes its place)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            for name, value in scope.get("headers") or ():
                if name == b"x-session-id":
                    ROUTING_SESSION.set(value.decode("latin-1")[:1024] or None)
                    break
        return await self.app(scope, receive, send)


async def _send_error(send, error: APIError) -> None:
    response = JSONResponse(error.body(), status_code=error.status, headers=error.headers)
    await response({"type": "http"}, None, send)


def create_app(config: ServerConfig, load_models: ModelLoader, api_keys: ApiKeys | None = None) -> FastAPI:
    """`api_keys` None: no authentication, one shared cache namespace."""
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()

        def load() -> None:
            try:
                engines = load_models()
            except Exception as error:   # /health says why until the process exits
                if isinstance(error, (ValueError, OSError)):   # a bad option or path: the message says it all
                    log.error("model loading failed: %s", error)
                else:
                    log.exception("model loading failed")
                loop.call_soon_threadsafe(_fatal, app, f"the models could not be loaded: {error}", "load_error")
                return
            try:
                loop.call_soon_threadsafe(_install, app, engines)
            except RuntimeError:   # the app shut down while the models loaded
                for engine in engines.values():
                    engine.shutdown()

        threading.Thread(target=load, name="kvserve-load", daemon=True).start()
        yield
        if app.state.batch_runner is not None:   # in-flight lines stay pending, for the next start
            await app.state.batch_runner.stop()
        for served in app.state.models.values():
            served.engine.shutdown()
        if app.state.batch_store is not None:
            app.state.batch_store.close()

    app = FastAPI(title="kvserve", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.config = config
    app.state.api_keys = api_keys
    app.state.rate_limits = RateLimits()
    # per tenant: requests in flight and token buckets; the limits are read from the keys in force
    app.state.tenant_limits = TenantLimits(lambda: app.state.api_keys)
    app.state.models = {}
    app.state.load_error = None
    app.state.engine_error = None
    app.state.draining = False
    app.state.on_fatal = lambda reason: None   # lifecycle.Server: exit non-zero
    app.state.metrics = ServerMetrics(lambda: {n: m.engine.stats() for n, m in app.state.models.items()})
    app.state.serving = None
    app.state.batch_store = BatchStore(config.state_dir) if config.state_dir else None
    app.state.batch_runner = None   # started once the models are loaded
    app.state.metrics.add_batch_source(lambda: app.state.batch_runner)
    app.state.metrics.add_replica_source(lambda: {name: m.engine.book for name, m in app.state.models.items()
                                                  if getattr(m.engine, "book", None) is not None})
    _install_error_handlers(app)
    _install_routes(app)
    register_websocket(app)
    register_anthropic(app)
    register_bedrock(app)
    register_sagemaker(app)
    register_batch(app)
    install_openapi(app)
    batch_upload = config.max_batch_file_bytes + 65536   # the file and its multipart framing
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=config.max_body_bytes, body_timeout_s=config.body_timeout_s,
                       large_bodies={"/v1/files": batch_upload, "/v1/messages/batches": batch_upload},
                       admit_large=lambda scope: authenticate_scope(app, scope))
    app.add_middleware(SessionHeaderMiddleware)
    return app


def _install(app: FastAPI, engines: dict[str, AsyncEngine]) -> None:
    weights = dict(app.state.config.cost_weights)
    app.state.models = {name: ServedModel(name, engine, weight=weights.get(name)) for name, engine in engines.items()}
    try:
        routers = {config.name: RoutedModel(Router(config), app.state.models, app.state.metrics)
                   for config in app.state.config.routers}
    except ValueError as error:    # the pair does not share a tokenizer, say
        log.error("%s", error)
        _fatal(app, f"the routers could not be built: {error}", "load_error")
        return
    app.state.serving = OpenAIServing(app.state.models, app.state.config, app.state.metrics, routers,
                                      app.state.tenant_limits)
    loop = asyncio.get_running_loop()
    for name, engine in engines.items():
        engine.on_fatal(lambda error, name=name: loop.call_soon_threadsafe(
            _fatal, app, f"model {name}: {type(error).__name__}: {error}", "engine_error"))
    if app.state.batch_store is not None:
        capacity = min(model.capacity for model in app.state.models.values())
        app.state.batch_runner = BatchRunner(app.state.batch_store, LineExecutor(lambda: serving_of(app.state)),
                                             app.state.config.batch_concurrency or capacity)
        app.state.batch_runner.start()
    log.info("serving %s", ", ".join([*engines, *(f"{name} (router)" for name in routers)]))


def _fatal(app: FastAPI, reason: str, field: str) -> None:
    """An engine died or the models failed to load: /health says so, and the process exits."""
    if getattr(app.state, field) is None:
        setattr(app.state, field, reason)
    app.state.on_fatal(reason)


def authenticate_scope(app: FastAPI, scope: dict) -> Principal:
    """Who sends this request, from its ASGI scope (before the app has a Request for it)."""
    from starlette.datastructures import Headers

    principal = authenticate(app.state, Headers(scope=scope))
    scope.setdefault("state", {})["principal"] = principal   # charged once: the route reuses it
    return principal


def principal(request: Request) -> Principal:
    """Who is asking (a FastAPI dependency): 401 without a valid key when keys are configured."""
    return authenticate(request.app.state, request.headers)


def health_response(state) -> JSONResponse:
    """200 when serving; 503 with "loading", "draining" (SIGTERM) or "error" (the reason)."""
    error = state.load_error or state.engine_error
    if error:
        return JSONResponse({"status": "error", "error": error}, status_code=503)
    if state.draining:
        return JSONResponse({"status": "draining"}, status_code=503, headers={"Retry-After": "5"})
    if state.serving is None:
        return JSONResponse({"status": "loading"}, status_code=503)
    return JSONResponse({"status": "ok", "models": list(state.models)})


def _install_routes(app: FastAPI) -> None:
    @app.get("/health")
    async def health(request: Request):
        """200 when serving; 503 with "loading", "draining" (SIGTERM) or "error" (the reason)."""
        return health_response(request.app.state)

    @app.get("/v1/models")
    async def models(request: Request, _: Principal = Depends(principal)):
        return serving(request).list_models()

    @app.get("/v1/routers")
    async def routers(request: Request, _: Principal = Depends(principal)):
        """The routers (virtual models) and their settings: models, tolerance, fallback, escalation."""
        return serving(request).list_routers()

    @app.get("/metrics")
    async def metrics(request: Request):
        """Prometheus text. With --metrics-auth (and --api-keys) it needs an admin key."""
        if request.app.state.config.metrics_auth:
            require_admin(principal(request))
        return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request, who: Principal = Depends(principal)):
        return await respond(request, await serving(request).chat(body, who.tenant), body.stream)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, who: Principal = Depends(principal)):
        return await respond(request, await serving(request).completion(body, who.tenant), body.stream)

    @app.get("/v1/cache")
    async def cache_stats(request: Request, who: Principal = Depends(principal)):
        """Per model: blocks used/cached/pinned/free, bytes per tier, hit rate, and the pinned
        prefixes (hash and length only, never text) with their TTL left. Admin only."""
        require_admin(who)
        models = serving(request).models
        return {"models": {name: await m.engine.call(lambda e: e.cache_report()) for name, m in models.items()}}

    @app.delete("/v1/cache")
    async def cache_flush(request: Request, all: bool = False, who: Principal = Depends(principal)):
        """Flush the unpinned cache, or everything (pins included) with ?all=true. Admin only."""
        require_admin(who)
        models = serving(request).models
        dropped = {name: await m.engine.call(lambda e: e.flush_cache(all)) for name, m in models.items()}
        return {"flushed_blocks": dropped, "pins_released": all}

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))


async def respond(request: Request, generation: Generation, stream: bool):
    if stream:
        return StreamResponse(sse_stream(generation), generation, request.app.state.config.stream_idle_timeout_s)
    try:
        return JSONResponse(await unless_disconnected(request, generation.result(), generation))
    except ClientGone:
        return Response(status_code=499)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(EngineDeadError)
    async def engine_dead(request: Request, error: EngineDeadError):
        error = as_api_error(error, request.url.path)
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(InvalidRequestError)
    async def invalid(request: Request, error: InvalidRequestError):
        return JSONResponse(APIError(400, str(error), param=error.param).body(), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def validation(request: Request, error: RequestValidationError):
        errors = error.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return JSONResponse(APIError(400, "the request body is not valid JSON", code="invalid_json").body(),
                                status_code=400)
        return JSONResponse(validation_error(errors).body(), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(error.status_code, str(error.detail), type=kind).body(),
                            status_code=error.status_code, headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        log.exception("unexpected error")
        return JSONResponse(APIError(500, "internal error", type="server_error").body(), status_code=500)
