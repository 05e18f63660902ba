"""The serving process around the app: uvicorn's limits and timeouts, the header deadline,
draining on SIGTERM, reloading the keys on SIGHUP, and a non-zero exit when an engine dies.

    kvserve serve ──▶ Server(uvicorn_config(app, ServerConfig))
        connection   ──▶ GuardedH11Protocol: the request line and headers must arrive within
                         --header-timeout of the connection opening, or of a keep-alive
                         connection's next request beginning (else 408 and close; a slowloris
                         holds nothing for long); at most --max-header-bytes of them (else 400);
                         idle keep-alive connections close after --keep-alive-timeout; a closed
                         connection whose unsent data stops draining for --stream-idle-timeout
                         (a client that stopped reading) is aborted, not held until it reads
        SIGTERM      ──▶ drain(): /health 503 "draining"; new requests 503 + Retry-After; the
                         streams in flight may finish within --shutdown-timeout, the rest are
                         aborted (each ends with finish_reason "abort"); then exit 0
        SIGINT       ──▶ uvicorn's own quick shutdown
        SIGHUP       ──▶ the --api-keys file is read again (a bad file keeps the old keys); the
                         tenants' new limits apply to the next request, and their
                         requests in flight and token buckets are kept (auth.TenantLimits)
        engine dies  ──▶ every request in flight has its 503 already (AsyncEngine); /health 503;
                         exit 1, so that a supervisor restarts the process
        load fails   ──▶ exit 1 as well, with the reason logged

Bodies have their own deadline (--body-timeout, BodyLimitMiddleware in app.py), and streams
whose client stops reading are aborted after --stream-idle-timeout (sse.py, websocket.py).
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import threading
import time

import h11
import uvicorn
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
from uvicorn.protocols.http.h11_impl import H11Protocol

from kvserve.config import ServerConfig

log = logging.getLogger(__name__)

EXIT_FATAL = 1
FATAL_EXIT_DELAY_S = 2.0   # /health answers 503 meanwhile, and the requests' 503s go out
_LATE = b"the request line and headers did not arrive in time (--header-timeout)"
_REQUEST_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_LATE), _LATE))


class ServeConfig(uvicorn.Config):
    """uvicorn's Config, plus the deadlines the guarded protocol reads."""

    def __init__(self, app, server: ServerConfig, **overrides):
        options = dict(
            host=server.host, port=server.port, http=GuardedH11Protocol,
            # asyncio's own loop, even where uvloop is installed (ray[serve] brings it): the close
            # guards (_UnstickableClose) and the header deadline are written against its transports.
            loop="asyncio",
            timeout_keep_alive=server.keep_alive_timeout_s,
            h11_max_incomplete_event_size=server.max_header_bytes,
            # A frame over --max-body-bytes gets a 413 error frame (websocket.py); one far past it
            # closes the socket (1009) before it is buffered.
            ws_max_size=2 * server.max_body_bytes + 65536,
            timeout_graceful_shutdown=max(1, int(server.shutdown_timeout_s)),
            log_level="warning",
        )
        options.update(overrides)
        super().__init__(app, **options)
        self.header_timeout_s = server.header_timeout_s
        self.stream_idle_timeout_s = server.stream_idle_timeout_s


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request's line and headers: armed when the
    connection opens and when the first bytes of a keep-alive connection's next request arrive
    (until then the connection is idle, and uvicorn's keep-alive timeout closes it silently),
    disarmed once the headers are complete. uvicorn itself bounds only idle keep-alive
    connections, so without this a client trickling a byte at a time, or one connecting and
    sending nothing, would hold its connection forever.

    h11 bounds only an incomplete head (h11_max_incomplete_event_size); a complete one that
    arrives in a single read is checked here against the same limit (400 and close).

    The protocols (this one, and the WebSocket protocol after an upgrade) see the transport
    through _UnstickableClose, so a connection they close cannot be held by a client that
    stopped reading."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self._header_timeout_s = getattr(config, "header_timeout_s", 10.0)
        self._drain_timeout_s = getattr(config, "stream_idle_timeout_s", 30.0)
        self._max_header_bytes = config.h11_max_incomplete_event_size or DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
        self._header_deadline: asyncio.TimerHandle | None = None
        self._h11_next_event = self.conn.next_event
        self.conn.next_event = self._next_event   # uvicorn's handle_events reads every event through it

    def connection_made(self, transport) -> None:
        super().connection_made(_UnstickableClose(transport, self.loop, self._drain_timeout_s))
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._header_deadline is None and self.conn.their_state is h11.IDLE:
            self._arm()   # a keep-alive connection's next request begins
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:   # the request's headers are complete
            self._disarm()

    def _next_event(self):
        event = self._h11_next_event()
        if type(event) is h11.Request and _head_bytes(event) > self._max_header_bytes:
            # uvicorn answers any RemoteProtocolError with 400 and closes the connection
            raise h11.RemoteProtocolError("the request line and headers are too large", error_status_hint=431)
        return event

    def handle_websocket_upgrade(self, event) -> None:
        self._disarm()
        super().handle_websocket_upgrade(event)

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_deadline = self.loop.call_later(self._header_timeout_s, self._headers_late)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_late(self) -> None:
        self._header_deadline = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(_REQUEST_TIMEOUT)
        self.transport.close()


def _head_bytes(request: h11.Request) -> int:
    """The size of a request's line and headers, as sent with single spaces (h11 keeps no count)."""
    line = len(request.method) + len(request.target) + len(b"  HTTP/1.1\r\n")
    return line + sum(len(name) + len(value) + 4 for name, value in request.headers) + 2


class _UnstickableClose:
    """A transport whose close() a client cannot hold open by not reading. asyncio's close()
    waits for the write buffer to be sent first: for ever, if the client reads nothing (a stream
    given up after --stream-idle-timeout, sse.py and websocket.py, closes with its buffers full).
    Once a closed transport's unsent data has not shrunk for `stall_s`, it is aborted. Everything
    else goes straight to the transport."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop, stall_s: float):
        self._transport = transport
        self._loop = loop
        self._stall_s = stall_s
        self._watching = False

    def __getattr__(self, name):
        return getattr(self._transport, name)

    def close(self) -> None:
        self._transport.close()
        if not self._watching:
            self._watching = True
            self._watch(None)

    def _watch(self, unsent_before: int | None) -> None:
        unsent = self._transport.get_write_buffer_size()
        if unsent == 0:   # all sent (or the connection is gone): asyncio has closed it, or will
            return
        if unsent_before is not None and unsent >= unsent_before:
            log.info("a closed connection's last %d bytes were not read for %g s; aborting it", unsent, self._stall_s)
            self._transport.abort()
            return
        self._loop.call_later(self._stall_s, self._watch, unsent)


def uvicorn_config(app, server: ServerConfig, **overrides) -> ServeConfig:
    return ServeConfig(app, server, **overrides)


class Server(uvicorn.Server):
    """uvicorn's Server, with SIGTERM draining, SIGHUP key reloading and the exit code."""

    def __init__(self, config: ServeConfig, app, server: ServerConfig, reload_keys=None):
        super().__init__(config)
        redact_keys_in_logs()
        self.app = app
        self.server_config = server
        self.reload_keys = reload_keys
        self.exit_code = 0
        self._drain_task: asyncio.Task | None = None
        app.state.on_fatal = self.fail

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        if threading.current_thread() is threading.main_thread() and self.reload_keys is not None:
            self.loop.add_signal_handler(signal.SIGHUP, self._reload_keys)
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        if sig == signal.SIGTERM and not self.should_exit:
            self.loop.call_soon_threadsafe(self.drain)
            return
        super().handle_exit(sig, frame)

    def drain(self) -> None:
        """Begin the graceful shutdown (idempotent; on the event loop)."""
        if self._drain_task is None:
            self._drain_task = self.loop.create_task(self._drain())

    async def _drain(self) -> None:
        state = self.app.state
        state.draining = True
        if state.batch_runner is not None:   # batch lines in flight stop and stay pending, for the next start
            await state.batch_runner.stop()
        deadline = time.monotonic() + self.server_config.shutdown_timeout_s
        log.warning("SIGTERM: draining; %d requests in flight may finish within %.0f s",
                    in_flight(state), self.server_config.shutdown_timeout_s)
        while in_flight(state) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = abort_all(state)
        if left:
            log.warning("shutdown timeout: aborted %d requests still in flight", left)
            flush_deadline = time.monotonic() + 5.0   # their last chunks ("abort") go out
            while in_flight(state) and time.monotonic() < flush_deadline:
                await asyncio.sleep(0.05)
        self.should_exit = True

    def fail(self, reason: str) -> None:
        """An engine died or the models could not load: exit non-zero (on the event loop)."""
        if self.exit_code == EXIT_FATAL:
            return
        log.error("exiting in %g s: %s", FATAL_EXIT_DELAY_S, reason)
        self.exit_code = EXIT_FATAL
        self.loop.call_later(FATAL_EXIT_DELAY_S, setattr, self, "should_exit", True)

    def _reload_keys(self) -> None:
        try:
            self.app.state.api_keys = self.reload_keys()
        except Exception as error:   # keep serving with the keys already loaded
            log.error("SIGHUP: the keys file was not reloaded (%s); the previous keys stay in force", error)
        else:
            log.warning("SIGHUP: API keys reloaded (%d keys)", len(self.app.state.api_keys))


_KEY_IN_URL = re.compile(r"(api_key=)[^&\s\"']+")


class _RedactKeys(logging.Filter):
    """Hides `?api_key=` values (WebSocket clients in browsers put their key there) in uvicorn's
    access and connection lines, which --verbose shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_KEY_IN_URL.sub(r"\1***", arg) if isinstance(arg, str) else arg for arg in record.args)
        if isinstance(record.msg, str):
            record.msg = _KEY_IN_URL.sub(r"\1***", record.msg)
        return True


def redact_keys_in_logs() -> None:
    for name in ("uvicorn.access", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _RedactKeys) for f in logger.filters):
            logger.addFilter(_RedactKeys())


def in_flight(state) -> int:
    """Accepted requests (choices) not yet finished, over every served model."""
    return sum(model.in_flight for model in _served(state))


def _served(state) -> list:
    """The served models and the routers (virtual models with their own generations)."""
    serving = getattr(state, "serving", None)
    return [*state.models.values(), *(serving.routers.values() if serving is not None else ())]


def abort_all(state) -> int:
    """Abort every generation in flight; each ends with finish_reason "abort". Returns how many."""
    live = [generation for model in _served(state) for generation in list(model.live)]
    for generation in live:
        generation.abort()
    return len(live)
