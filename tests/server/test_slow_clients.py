"""Slow and hostile clients: slowloris on the headers and on the body, idle connections by the
thousand, oversized headers, and clients that stop reading a stream (SSE and WebSocket).

Real sockets against a real uvicorn on a thread (helpers.ServerThread, so the guarded protocol of
kvserve/server/lifecycle.py is in use), with timeouts of about a second. Every wait is bounded:
a server that holds a connection, or a request, past its deadline fails the test instead of
hanging it. Time bounds are generous on the late side (a shared 2-core machine), tight where the
server must not act early.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import select
import selectors
import socket
import struct
import time

import httpx
import pytest
import websockets
from helpers import MODEL, ServerThread, http_request_bytes, metric, metric_samples, single_torch_thread, wait_until

from kvserve.config import ServerConfig

CHAT = "/v1/chat/completions"
HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.0
KEEP_ALIVE_TIMEOUT_S = 2.0     # longer than the header deadline: an idle keep-alive connection is not a slowloris
STREAM_IDLE_TIMEOUT_S = 1.0
MAX_HEADER_BYTES = 4096
SLACK_S = 1.5                  # how late the server may act, on a loaded machine
TRICKLE_INTERVAL_S = 0.2


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    with single_torch_thread():
        yield


def chat(content: str = "hi", **fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


def scrape(server: ServerThread) -> dict:
    return metric_samples(httpx.get(f"{server.base_url}/metrics", timeout=10.0).text)


def served_promptly(server: ServerThread, within_s: float = 5.0) -> None:
    """A normal chat completion, on a connection of its own, answered within `within_s`."""
    start = time.monotonic()
    response = httpx.post(f"{server.base_url}{CHAT}", json=chat(max_tokens=4, ignore_eos=True), timeout=within_s + 5)
    elapsed = time.monotonic() - start
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 4
    assert elapsed < within_s, f"a normal request took {elapsed:.2f} s"


# ---- raw sockets --------------------------------------------------------------------------------

def connect(server: ServerThread, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:   # before connect: the window is negotiated in the handshake
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10.0)
    sock.connect(("127.0.0.1", server.port))
    return sock


def read_until_closed(sock: socket.socket, timeout_s: float) -> bytes:
    """Everything the server sends until it closes the connection (FIN, or a reset after its
    answer); fails if the connection is still open after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    data = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"the server kept the connection open for more than {timeout_s:g} s "
                                 f"(received {bytes(data[:120])!r})")
        sock.settimeout(left)
        try:
            chunk = sock.recv(1 << 20)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return bytes(data)
        if not chunk:
            return bytes(data)
        data += chunk


def trickle(sock: socket.socket, data: bytes, within_s: float, during=None) -> None:
    """Send `data` one byte every TRICKLE_INTERVAL_S until the server answers (the socket turns
    readable); fails if it has not within `within_s`. `during()` runs once, after a few bytes."""
    deadline = time.monotonic() + within_s
    for i in range(len(data)):
        readable, _, _ = select.select([sock], [], [], TRICKLE_INTERVAL_S)
        if readable:
            return
        if time.monotonic() > deadline:
            break
        try:
            sock.send(data[i:i + 1])
        except OSError:   # closed under us: the answer is in the receive buffer
            return
        if i == 3 and during is not None:
            during()
    raise AssertionError(f"no answer within {within_s:g} s to a trickle of {i} bytes")


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def read_one_response(sock: socket.socket, timeout_s: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """One Content-Length response on a connection that stays open (keep-alive)."""
    sock.settimeout(timeout_s)
    data = bytearray()
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a whole response: {bytes(data)!r}"
        data += chunk
    status, headers, body = parse_response(bytes(data))
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed mid-body"
        body += chunk
    assert len(body) == length, "more bytes than the response (nothing was asked for)"
    return status, headers, body


def held_by_server(server: ServerThread, sock: socket.socket) -> bool:
    """Whether the server still holds the connection of `sock` (uvicorn's HTTP and WebSocket
    protocols stay in server_state.connections until the transport is really closed)."""
    address = sock.getsockname()
    for _ in range(100):   # the set changes on the server's thread while this one reads it
        try:
            return any(getattr(c, "client", None) == address for c in list(server.server.server_state.connections))
        except RuntimeError:
            continue
    raise AssertionError("server_state.connections kept changing")


# ---- HTTP deadlines -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def guarded() -> ServerThread:
    config = ServerConfig(header_timeout_s=HEADER_TIMEOUT_S, body_timeout_s=BODY_TIMEOUT_S,
                          keep_alive_timeout_s=KEEP_ALIVE_TIMEOUT_S, max_header_bytes=MAX_HEADER_BYTES,
                          stream_idle_timeout_s=STREAM_IDLE_TIMEOUT_S)
    with ServerThread(config) as server:
        yield server


def test_slowloris_headers_get_408_and_close(guarded: ServerThread):
    request = b"GET /health HTTP/1.1\r\n"
    headers = b"Host: 127.0.0.1\r\nX-Slow: " + b"a" * 200 + b"\r\n\r\n"   # 40+ s at a byte per 0.2 s
    served = []

    def meanwhile() -> None:
        served_promptly(guarded)
        served.append(True)

    with connect(guarded) as sock:
        start = time.monotonic()
        sock.sendall(request)
        trickle(sock, headers, HEADER_TIMEOUT_S + SLACK_S, during=meanwhile)
        data = read_until_closed(sock, HEADER_TIMEOUT_S + SLACK_S)
        elapsed = time.monotonic() - start
    assert served, "the trickle ended before the normal request was tried"
    status, headers_, body = parse_response(data)
    assert status == 408, data
    assert headers_.get("connection") == "close"
    assert b"--header-timeout" in body
    assert HEADER_TIMEOUT_S - 0.1 <= elapsed <= HEADER_TIMEOUT_S + SLACK_S, elapsed


def test_silent_connection_is_closed_after_the_header_timeout(guarded: ServerThread):
    with connect(guarded) as sock:
        start = time.monotonic()
        data = read_until_closed(sock, HEADER_TIMEOUT_S + SLACK_S)
        elapsed = time.monotonic() - start
    assert data == b"" or parse_response(data)[0] == 408, data
    assert HEADER_TIMEOUT_S - 0.1 <= elapsed <= HEADER_TIMEOUT_S + SLACK_S, elapsed


def test_idle_keep_alive_connection_is_closed_after_the_keep_alive_timeout(guarded: ServerThread):
    """After a complete request and its answer, the connection idles: the keep-alive timeout
    closes it, silently. The header deadline (shorter here) must not: no bytes of a next request
    have come, so there is no slowloris to answer 408."""
    with connect(guarded) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, headers, body = read_one_response(sock)
        assert status == 200 and json.loads(body)["status"] == "ok"
        assert headers.get("connection") != "close"
        start = time.monotonic()
        data = read_until_closed(sock, KEEP_ALIVE_TIMEOUT_S + SLACK_S)
        elapsed = time.monotonic() - start
    assert data == b"", f"an idle keep-alive connection was sent {data!r}"
    assert KEEP_ALIVE_TIMEOUT_S - 0.1 <= elapsed <= KEEP_ALIVE_TIMEOUT_S + SLACK_S, elapsed


def test_keep_alive_connection_trickling_its_next_request_gets_408(guarded: ServerThread):
    """The header deadline also bounds the second request of a keep-alive connection."""
    with connect(guarded) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert read_one_response(sock)[0] == 200
        start = time.monotonic()
        trickle(sock, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200 + b"\r\n\r\n",
                HEADER_TIMEOUT_S + SLACK_S)
        data = read_until_closed(sock, HEADER_TIMEOUT_S + SLACK_S)
        elapsed = time.monotonic() - start
    assert parse_response(data)[0] == 408, data
    assert HEADER_TIMEOUT_S - 0.1 <= elapsed <= HEADER_TIMEOUT_S + SLACK_S, elapsed


def test_slowloris_body_gets_408_body_timeout(guarded: ServerThread):
    body = json.dumps(chat(max_tokens=4)).encode().ljust(200)
    assert len(body) == 200
    head = http_request_bytes("POST", CHAT, None, {"Content-Type": "application/json", "Content-Length": "200"})
    with connect(guarded) as sock:
        sock.sendall(head)
        start = time.monotonic()
        trickle(sock, body, BODY_TIMEOUT_S + SLACK_S)
        data = read_until_closed(sock, BODY_TIMEOUT_S + SLACK_S)
        elapsed = time.monotonic() - start
    status, headers, payload = parse_response(data)
    assert status == 408, data
    assert headers.get("connection") == "close"
    error = json.loads(payload)["error"]
    assert error["code"] == "body_timeout" and "--body-timeout" in error["message"], error
    assert BODY_TIMEOUT_S - 0.1 <= elapsed <= BODY_TIMEOUT_S + SLACK_S, elapsed
    assert wait_until(guarded.idle)


@pytest.mark.parametrize("how", ["one_write", "incomplete"])
def test_headers_over_max_header_bytes_get_400_and_close(guarded: ServerThread, how: str):
    """`one_write`: a complete request whose headers are over the limit, in one write (h11 only
    bounds an *incomplete* head, so this one must be caught when it completes); `incomplete`:
    more than the limit and still no end of headers."""
    big = b"X-Big: " + b"b" * (2 * MAX_HEADER_BYTES) + b"\r\n"
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + big
    if how == "one_write":
        request += b"\r\n"
    with connect(guarded) as sock:
        sock.sendall(request)
        data = read_until_closed(sock, 5.0)
    status, headers, body = parse_response(data)
    assert status == 400, data[:200]
    assert headers.get("connection") == "close"
    # just under the limit is fine
    near = b"X-Near: " + b"n" * (MAX_HEADER_BYTES - 200) + b"\r\n"
    with connect(guarded) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + near + b"Connection: close\r\n\r\n")
        assert parse_response(read_until_closed(sock, 5.0))[0] == 200


NUM_IDLE = 1000


def test_a_thousand_idle_connections_are_closed_and_hold_nothing(guarded: ServerThread):
    sockets: list[socket.socket] = []
    selector = selectors.DefaultSelector()
    try:
        for _ in range(NUM_IDLE):
            sockets.append(connect(guarded))
        opened = time.monotonic()
        served_promptly(guarded)   # meanwhile, a normal request
        for sock in sockets:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, bytearray())
        deadline = opened + HEADER_TIMEOUT_S + 3 * SLACK_S
        open_left = NUM_IDLE
        while open_left and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=max(0.0, deadline - time.monotonic())):
                try:
                    chunk = key.fileobj.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                except BlockingIOError:
                    continue
                if chunk:
                    key.data.extend(chunk)
                    continue
                assert key.data == b"" or parse_response(bytes(key.data))[0] == 408, bytes(key.data)
                selector.unregister(key.fileobj)
                open_left -= 1
        assert open_left == 0, f"{open_left} of {NUM_IDLE} idle connections still open " \
                               f"{time.monotonic() - opened:.1f} s after they were opened"
        served_promptly(guarded)
    finally:
        selector.close()
        for sock in sockets:
            sock.close()


# ---- clients that stop reading a stream ---------------------------------------------------------

# n=8 choices with 20 top logprobs each: about 12 KB of frames per step, megabytes a second, so
# the socket buffers fill within a few hundred of the 3,000 tokens each choice may run: the
# stream is always cut short by the idle timeout, never finished.
N_CHOICES = 8
STALL_BODY = dict(max_tokens=3000, ignore_eos=True, logprobs=True, top_logprobs=20)
STALL_DEADLINE_S = 20.0   # buffers fill (seconds) + idle timeout + the abort


@pytest.fixture(scope="module")
def stall_server() -> ServerThread:
    config = ServerConfig(stream_idle_timeout_s=STREAM_IDLE_TIMEOUT_S)
    with ServerThread(config, num_blocks=4096) as server:   # 8 choices x 3,000 tokens fit
        yield server


def test_sse_client_that_never_reads_is_aborted(stall_server: ServerThread):
    server = stall_server
    before = scrape(server)
    body = json.dumps(chat("never read", n=N_CHOICES, stream=True, **STALL_BODY)).encode()
    sock = connect(server, rcvbuf=4096)
    try:
        start = time.monotonic()
        sock.sendall(http_request_bytes("POST", CHAT, body, {"Content-Type": "application/json"}))
        assert wait_until(lambda: server.engine().stats().num_running == N_CHOICES, 10)
        assert held_by_server(server, sock)
        served_promptly(server)   # the stalled stream holds up no one
        assert wait_until(server.idle, STALL_DEADLINE_S), (server.in_flight(), server.engine().stats())
        took = time.monotonic() - start
        after = scrape(server)
        assert metric(after, "kvserve:server_aborts_total", reason="stream_idle_timeout") == \
            metric(before, "kvserve:server_aborts_total", reason="stream_idle_timeout") + 1
        assert metric(after, "kvserve:request_success_total", model_name=MODEL, finished_reason="abort") == \
            metric(before, "kvserve:request_success_total", model_name=MODEL, finished_reason="abort") + N_CHOICES
        # the server lets go of the connection too: it does not wait for the client to read
        assert wait_until(lambda: not held_by_server(server, sock), STREAM_IDLE_TIMEOUT_S + 3 * SLACK_S), \
            f"the stalled connection is still held {time.monotonic() - start:.1f} s after the request"
        served_promptly(server)
        server.engine().engine.check_integrity()
        print(f"sse stall: aborted and idle after {took:.1f} s")
    finally:
        sock.close()


# ---- WebSocket, raw ------------------------------------------------------------------------------

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def client_text_frame(text: str, mask: bytes | None = None) -> bytes:
    """One masked client text frame (RFC 6455 5.2): FIN + opcode 1, the mask bit with a 7-bit
    length, or 126 + 16-bit, or 127 + 64-bit length, then the 4-byte mask and the masked payload."""
    payload = text.encode()
    mask = os.urandom(4) if mask is None else mask
    length = len(payload)
    if length < 126:
        head = struct.pack("!BB", 0x81, 0x80 | length)
    elif length < 1 << 16:
        head = struct.pack("!BBH", 0x81, 0x80 | 126, length)
    else:
        head = struct.pack("!BBQ", 0x81, 0x80 | 127, length)
    key = int.from_bytes((mask * (length // 4 + 1))[:length], "big")
    masked = (int.from_bytes(payload, "big") ^ key).to_bytes(length, "big")
    return head + mask + masked


@pytest.mark.parametrize("length", [0, 125, 126, 65535, 65536])
def test_client_text_frame_is_what_a_websocket_server_reads(length: int):
    from websockets.frames import Frame, Opcode
    from websockets.streams import StreamReader

    text = "é" * (length // 2) + "x" * (length % 2)   # two bytes each, and one: `length` bytes of UTF-8
    assert len(text.encode()) == length
    reader = StreamReader()
    reader.feed_data(client_text_frame(text))
    parser = Frame.parse(reader.read_exact, mask=True)
    try:
        next(parser)
        raise AssertionError("the parser wanted more bytes than the frame has")
    except StopIteration as done:
        frame = done.value
    assert frame.fin and frame.opcode is Opcode.TEXT and frame.data.decode() == text


def ws_handshake(sock: socket.socket) -> None:
    key = base64.b64encode(os.urandom(16))
    sock.sendall(b"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
    data = b""
    while not data.endswith(b"\r\n\r\n"):   # a byte at a time: nothing past the handshake is read
        byte = sock.recv(1)
        assert byte, f"closed during the handshake: {data!r}"
        data += byte
    status, headers, _ = parse_response(data)
    assert status == 101, data
    assert headers["sec-websocket-accept"] == base64.b64encode(hashlib.sha1(key + WS_GUID).digest()).decode()


def test_websocket_client_that_never_reads_is_closed_and_aborted(stall_server: ServerThread):
    server = stall_server
    before = scrape(server)
    per_request = N_CHOICES // 2
    sock = connect(server, rcvbuf=4096)
    try:
        ws_handshake(sock)
        start = time.monotonic()
        for request_id in ("a", "b"):
            frame = {"type": "request", "id": request_id,
                     "body": chat(f"never read {request_id}", n=per_request, **STALL_BODY)}
            sock.sendall(client_text_frame(json.dumps(frame)))
        assert wait_until(lambda: server.engine().stats().num_running == 2 * per_request, 10)
        assert held_by_server(server, sock)
        served_promptly(server)
        assert wait_until(server.idle, STALL_DEADLINE_S), (server.in_flight(), server.engine().stats())
        took = time.monotonic() - start
        after = scrape(server)
        assert metric(after, "kvserve:server_aborts_total", reason="websocket_stalled") == \
            metric(before, "kvserve:server_aborts_total", reason="websocket_stalled") + 2
        assert metric(after, "kvserve:request_success_total", model_name=MODEL, finished_reason="abort") == \
            metric(before, "kvserve:request_success_total", model_name=MODEL, finished_reason="abort") + 2 * per_request
        assert wait_until(lambda: not held_by_server(server, sock), STREAM_IDLE_TIMEOUT_S + 3 * SLACK_S), \
            f"the stalled WebSocket is still held {time.monotonic() - start:.1f} s after its requests"
        # the client, reading at last, finds the connection closed (after what was buffered)
        read_until_closed(sock, 10.0)
        served_promptly(server)
        server.engine().engine.check_integrity()
        print(f"websocket stall: aborted and idle after {took:.1f} s")
    finally:
        sock.close()


# ---- --ws-max-requests ---------------------------------------------------------------------------

def test_ws_max_requests_rejects_the_third_request_in_flight():
    config = ServerConfig(ws_max_requests=2)
    with ServerThread(config, step_delay_s=0.02) as server:   # 30 tokens: 0.6 s or more in flight
        url = server.base_url.replace("http://", "ws://") + "/v1/ws"

        def request(request_id: str) -> str:
            return json.dumps({"type": "request", "id": request_id,
                               "body": chat(request_id, max_tokens=30, ignore_eos=True)})

        async def scenario() -> tuple[dict[str, list[dict]], list[tuple[str, str]]]:
            frames: dict[str, list[dict]] = {}
            order: list[tuple[str, str]] = []   # (id, type) of each request's last frame, as they came
            async with websockets.connect(url, open_timeout=10) as ws:
                for request_id in ("a", "b", "c"):
                    await ws.send(request(request_id))

                async def until_last(ids: set[str]) -> None:
                    left = set(ids)
                    while left:
                        frame = json.loads(await asyncio.wait_for(ws.recv(), 20))
                        frames.setdefault(frame["id"], []).append(frame)
                        if frame["type"] in ("done", "error", "cancelled"):
                            left.discard(frame["id"])
                            order.append((frame["id"], frame["type"]))

                await until_last({"a", "b", "c"})
                assert frames["c"][-1]["type"] == "error"
                await ws.send(request("d"))   # with a and b finished, there is room again
                await until_last({"d"})
            return frames, order

        frames, order = asyncio.run(scenario())
        [rejected] = frames["c"]
        assert rejected["status"] == 429, rejected
        assert rejected["error"]["code"] == "too_many_requests_on_socket", rejected
        assert rejected["error"]["type"] == "rate_limit_error"
        for request_id in ("a", "b", "d"):
            done = frames[request_id][-1]
            assert done["type"] == "done", frames[request_id][-3:]
            assert done["finish_reasons"] == ["length"] and done["usage"]["completion_tokens"] == 30, done
        # c was refused at once, while a and b were still running
        assert order[0] == ("c", "error"), order
        assert wait_until(server.idle)
