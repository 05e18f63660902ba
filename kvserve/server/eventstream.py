"""The one AWS event-stream encoder (`application/vnd.amazon.eventstream`): what Bedrock's
ConverseStream answers with, and what botocore's `EventStream` decodes.

One message on the wire (all integers big-endian):

    ┌─────────────────── prelude (12 bytes) ──────────────────┐
    │ total length u32 │ headers length u32 │ prelude CRC u32 │ headers │ payload │ message CRC u32 │

    prelude CRC = CRC32 of the 8 bytes before it; message CRC = CRC32 of every byte before it

    one header:  name length u8 │ name (UTF-8) │ value type u8 (7 = string) │ value length u16 │ value (UTF-8)

An event carries `:message-type: event`, `:event-type: <member of the stream's union>` and
`:content-type: application/json`; an error in the middle of a stream is a message with
`:message-type: exception` and `:exception-type: <the union member naming the error>`, whose
JSON payload is `{"message": ...}`. Only string headers are written: nothing here needs others.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Mapping

CONTENT_TYPE = "application/vnd.amazon.eventstream"

_PRELUDE = struct.Struct(">II")         # total length, headers length
_CRC = struct.Struct(">I")
_STRING = 7                             # header value type: UTF-8 string with a u16 length
MAX_HEADERS_BYTES = 128 * 1024          # the format's limits (botocore refuses larger messages)
MAX_PAYLOAD_BYTES = 16 * 1024 * 1024


def encode_headers(headers: Mapping[str, str]) -> bytes:
    out = bytearray()
    for name, value in headers.items():
        name_bytes, value_bytes = name.encode(), value.encode()
        if not 0 < len(name_bytes) < 256:
            raise ValueError(f"an event-stream header name takes 1 to 255 bytes, got {len(name_bytes)}")
        if len(value_bytes) > 0xFFFF:
            raise ValueError(f"the event-stream header {name!r} is longer than 65535 bytes")
        out += bytes([len(name_bytes)]) + name_bytes + bytes([_STRING]) + struct.pack(">H", len(value_bytes))
        out += value_bytes
    return bytes(out)


def encode_message(headers: Mapping[str, str], payload: bytes) -> bytes:
    """One framed message: prelude, prelude CRC, headers, payload, message CRC."""
    header_bytes = encode_headers(headers)
    if len(header_bytes) > MAX_HEADERS_BYTES:
        raise ValueError(f"event-stream headers take {len(header_bytes)} bytes; at most {MAX_HEADERS_BYTES}")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"an event-stream payload takes {len(payload)} bytes; at most {MAX_PAYLOAD_BYTES}")
    total = _PRELUDE.size + _CRC.size + len(header_bytes) + len(payload) + _CRC.size
    prelude = _PRELUDE.pack(total, len(header_bytes))
    message = prelude + _CRC.pack(zlib.crc32(prelude)) + header_bytes + payload
    return message + _CRC.pack(zlib.crc32(message))


def _json(body: Mapping) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def event(event_type: str, body: Mapping) -> bytes:
    """An event of the stream's union, e.g. event("messageStart", {"role": "assistant"})."""
    return encode_message({":event-type": event_type, ":content-type": "application/json",
                           ":message-type": "event"}, _json(body))


def exception(exception_type: str, message: str) -> bytes:
    """An error member of the stream's union, e.g. exception("internalServerException", "...")."""
    return encode_message({":exception-type": exception_type, ":content-type": "application/json",
                           ":message-type": "exception"}, _json({"message": message}))
