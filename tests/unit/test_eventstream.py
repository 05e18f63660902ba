"""The event-stream encoder, checked against botocore's decoder and ConverseStream's parser."""

import json
import zlib

import botocore.session
import pytest
from botocore.eventstream import ChecksumMismatch, EventStream, EventStreamBuffer, EventStreamError
from botocore.parsers import EventStreamJSONParser

from kvserve.server import eventstream


def decode(data: bytes, piece_bytes: int = 7) -> list:
    """botocore's decoder, fed in small pieces as a socket would deliver them."""
    buffer = EventStreamBuffer()
    messages = []
    for start in range(0, len(data), piece_bytes):
        buffer.add_data(data[start:start + piece_bytes])
        messages.extend(buffer)
    return messages


def test_messages_round_trip_through_botocore():
    data = (eventstream.event("messageStart", {"role": "assistant"})
            + eventstream.event("contentBlockDelta", {"delta": {"text": "héllo ✓"}, "contentBlockIndex": 0})
            + eventstream.encode_message({}, b"")
            + eventstream.exception("internalServerException", "boom"))
    first, second, empty, error = decode(data)
    assert first.headers == {":event-type": "messageStart", ":content-type": "application/json",
                             ":message-type": "event"}
    assert json.loads(first.payload) == {"role": "assistant"}
    assert json.loads(second.payload) == {"delta": {"text": "héllo ✓"}, "contentBlockIndex": 0}
    assert empty.headers == {} and empty.payload == b""
    assert error.headers[":message-type"] == "exception"
    assert error.headers[":exception-type"] == "internalServerException"
    assert json.loads(error.payload) == {"message": "boom"}


def test_prelude_and_crcs():
    message = eventstream.encode_message({"a": "b"}, b"xyz")
    headers = bytes([1]) + b"a" + bytes([7]) + (1).to_bytes(2, "big") + b"b"
    assert int.from_bytes(message[0:4], "big") == len(message) == 12 + len(headers) + 3 + 4
    assert int.from_bytes(message[4:8], "big") == len(headers)
    assert int.from_bytes(message[8:12], "big") == zlib.crc32(message[:8])
    assert message[12:-7] == headers and message[-7:-4] == b"xyz"
    assert int.from_bytes(message[-4:], "big") == zlib.crc32(message[:-4])
    corrupted = message[:-5] + b"Z" + message[-4:]
    with pytest.raises(ChecksumMismatch):
        decode(corrupted)


def test_limits_are_enforced():
    with pytest.raises(ValueError):
        eventstream.encode_message({"x" * 256: "v"}, b"")
    with pytest.raises(ValueError):
        eventstream.encode_message({"h": "v" * 70_000}, b"")
    with pytest.raises(ValueError):
        eventstream.encode_message({}, b"\0" * (eventstream.MAX_PAYLOAD_BYTES + 1))


class _RawStream:
    def __init__(self, data: bytes):
        self.data = data

    def stream(self):
        yield from (self.data[i:i + 5] for i in range(0, len(self.data), 5))

    def close(self):
        pass


def converse_stream(data: bytes) -> EventStream:
    """What boto3's converse_stream()["stream"] is, over `data`."""
    model = botocore.session.get_session().get_service_model("bedrock-runtime")
    shape = model.operation_model("ConverseStream").output_shape.members["stream"]
    return EventStream(_RawStream(data), shape, EventStreamJSONParser(), "ConverseStream")


def test_converse_stream_events_parse_as_boto3_sees_them():
    usage = {"inputTokens": 3, "outputTokens": 2, "totalTokens": 5, "cacheReadInputTokens": 0,
             "cacheWriteInputTokens": 0, "cacheDetails": []}
    data = b"".join([
        eventstream.event("messageStart", {"role": "assistant"}),
        eventstream.event("contentBlockDelta", {"delta": {"text": "Hi"}, "contentBlockIndex": 0}),
        eventstream.event("contentBlockStop", {"contentBlockIndex": 0}),
        eventstream.event("messageStop", {"stopReason": "end_turn"}),
        eventstream.event("metadata", {"usage": usage, "metrics": {"latencyMs": 12}}),
    ])
    assert list(converse_stream(data)) == [
        {"messageStart": {"role": "assistant"}},
        {"contentBlockDelta": {"delta": {"text": "Hi"}, "contentBlockIndex": 0}},
        {"contentBlockStop": {"contentBlockIndex": 0}},
        {"messageStop": {"stopReason": "end_turn"}},
        {"metadata": {"usage": usage, "metrics": {"latencyMs": 12}}},
    ]


def test_an_exception_message_raises_the_modelled_error():
    data = (eventstream.event("messageStart", {"role": "assistant"})
            + eventstream.exception("serviceUnavailableException", "the engine failed"))
    events = iter(converse_stream(data))
    assert next(events) == {"messageStart": {"role": "assistant"}}
    with pytest.raises(EventStreamError) as caught:
        next(events)
    assert caught.value.response["Error"] == {"Code": "serviceUnavailableException", "Message": "the engine failed"}


def test_sse_payloads_stay_on_one_line_for_splitlines_readers():
    """A token may decode to U+0085, U+2028 or U+2029, which JSON leaves raw but httpx's
    aiter_lines (str.splitlines) takes for line ends: the 30-minute soak's client once got half a
    `data:` line. Both SSE encoders escape them; the JSON is unchanged."""
    import json

    from httpx._decoders import LineDecoder

    from kvserve.server.anthropic_api import event_frame
    from kvserve.server.sse import frame

    data = {"choices": [{"delta": {"content": "a\x85b\u2028c\u2029d\ne\x1cf"}}]}
    for raw in (frame(data), event_frame("content_block_delta", data)):
        lines = LineDecoder().decode(raw.decode())
        payloads = [line for line in lines if line.startswith("data: ")]
        assert len(payloads) == 1, lines
        assert json.loads(payloads[0][len("data: "):]) == data
