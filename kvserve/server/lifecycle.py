"""The serving process around the app: uvicorn's limits and timeouts, the header deadline,
draining on SIGTERM, reloading the keys on SIGHUP, and a non-zero exit when an engine dies.

    kvserve serve ──▶ Server(uvicorn_config(app, ServerConfig))
        connection   ──▶ GuardedH11Protocol: the request line and headers must arrive within
                         --header-timeout (else 408 and close; a slowloris holds nothing for
                         long); at most --max-header-bytes of them (else 400); idle keep-alive
                         connections close after --keep-alive-timeout
        SIGTERM      ──▶ drain(): /health 503 "draining"; new requests 503 + Retry-After; the
                         streams in flight may finish within --shutdown-timeout, the rest are
                         aborted (each ends with finish_reason "abort"); then exit 0
        SIGINT       ──▶ uvicorn's own quick shutdown
        SIGHUP       ──▶ the --api-keys file is read again (a bad file keeps the old keys)
        engine dies  ──▶ every request in flight has its 503 already (AsyncEngine); /health 503;
                         exit 1, so that a supervisor restarts the process
        load fails   ──▶ exit 1 as well, with the reason logged

Bodies have their own deadline (--body-timeout, BodyLimitMiddleware in app.py), and streams
whose client stops reading are aborted after --stream-idle-timeout (sse.py, websocket.py).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from kvserve.config import ServerConfig

log = logging.getLogger(__name__)

EXIT_FATAL = 1
FATAL_EXIT_DELAY_S = 2.0   # /health answers 503 meanwhile, and the requests' 503s go out
_LATE = b"the request line and headers did not arrive in time (--header-timeout)"
_REQUEST_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_LATE), _LATE))


class ServeConfig(uvicorn.Config):
    """uvicorn's Config, plus the header deadline the guarded protocol reads."""

    def __init__(self, app, server: ServerConfig, **overrides):
        options = dict(
            host=server.host, port=server.port, http=GuardedH11Protocol,
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


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request's line and headers: armed when the
    connection opens and after each response (a keep-alive connection's next request), disarmed
    once the headers are complete. uvicorn itself bounds only idle keep-alive connections, so
    without this a client trickling a byte at a time, or one connecting and sending nothing,
    would hold its connection forever."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self._header_timeout_s = getattr(config, "header_timeout_s", 10.0)
        self._header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:   # the request's headers are complete
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

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


def uvicorn_config(app, server: ServerConfig, **overrides) -> ServeConfig:
    return ServeConfig(app, server, **overrides)


class Server(uvicorn.Server):
    """uvicorn's Server, with SIGTERM draining, SIGHUP key reloading and the exit code."""

    def __init__(self, config: ServeConfig, app, server: ServerConfig, reload_keys=None):
        super().__init__(config)
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


def in_flight(state) -> int:
    """Accepted requests (choices) not yet finished, over every served model."""
    return sum(model.in_flight for model in state.models.values())


def abort_all(state) -> int:
    """Abort every generation in flight; each ends with finish_reason "abort". Returns how many."""
    live = [generation for model in state.models.values() for generation in list(model.live)]
    for generation in live:
        generation.abort()
    return len(live)
