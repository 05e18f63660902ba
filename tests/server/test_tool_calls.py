"""Tool calls on the OpenAI chat API (server/tool_calls.py): the forms an answer calls tools in,
the response and stream shapes (checked with the openai SDK's own types), and the request rules.
A real model calling a tool, and the round trip through its result, are in
tests/integration/test_chat_pair.py."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from helpers import ServerThread
from kvserve.outputs import RequestOutput, RequestStats
from kvserve.sampling import FinishReason
from kvserve.server.metrics import ServerMetrics
from kvserve.server.openai_api import Generation
from kvserve.server.tool_calls import ToolCallOptions, ToolCallScanner, parse_calls

NAMES = {"get_weather", "add"}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def scan(deltas: list[str], parallel: bool = True) -> tuple[str, list[tuple[str, dict]]]:
    """(the text sent, [(name, arguments)]) of an answer written in `deltas`."""
    scanner = ToolCallScanner(NAMES, parallel)
    sent = "".join(scanner.feed(d) for d in deltas)
    rest, calls = scanner.finish()
    return sent + rest, [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


@pytest.mark.parametrize("deltas, calls", [
    (['{"name": "get_weather", ', '"arguments": {"city": "Paris"}}'], [("get_weather", {"city": "Paris"})]),
    (["  ", "`", '``json\n{"name": "add", "arguments": {"a": 2, "b": 2}}\n```'], [("add", {"a": 2, "b": 2})]),
    (["<tool", '_call>\n{"name": "add", "arguments": "{\\"a\\": 1}"}\n</tool_call>\n',
      '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>'], [("add", {"a": 1}), ("get_weather", {})]),
    (['[{"name": "add", "arguments": {}}, {"name": "get_weather", "parameters": {"city": "Oslo"}}]'],
     [("add", {}), ("get_weather", {"city": "Oslo"})]),
    (['{"name": "get_weather", "arguments": {"city": "Oslo"}, "result": "sunny"}\n'
      '{"name": "get_weather", "arguments": {"city": "Rome"}}'],
     [("get_weather", {"city": "Oslo"}), ("get_weather", {"city": "Rome"})]),
])
def test_each_form_of_a_call_is_found_and_nothing_of_it_is_sent_as_text(deltas, calls):
    assert scan(deltas) == ("", calls)


@pytest.mark.parametrize("answer", [
    '{"name": "delete_everything", "arguments": {}}',            # not one of the request's tools
    '{"name": "add", "arguments": {"a"',                          # cut off at max_tokens
    '{"name": "add", "arguments": {}} and that is the call',     # text around it
    '{"name": "add", "arguments": "not json"}',
    '{"a": 1}',
    "<b>bold</b>",
    "`",
])
def test_what_is_not_only_calls_is_text_exactly_as_written(answer):
    assert scan([answer[:5], answer[5:]]) == (answer, [])


def test_prose_streams_as_it_comes_and_only_a_possible_call_is_held_back():
    scanner = ToolCallScanner(NAMES)
    assert [scanner.feed(d) for d in ["\n", "The", " weather"]] == ["", "\nThe", " weather"]
    scanner = ToolCallScanner(NAMES)
    assert [scanner.feed(d) for d in ["<", "tool", "_call>", "{"]] == ["", "", "", ""]


def test_parallel_calls_off_keeps_the_first():
    answer = '{"name": "add", "arguments": {}}\n{"name": "get_weather", "arguments": {}}'
    assert scan([answer], parallel=False) == ("", [("add", {})])
    assert parse_calls("", NAMES) is None


# ---- the response shapes ----------------------------------------------------------------------

class Scripted:
    """An engine stream that writes `deltas` and stops."""
    quiet, finished = False, False

    def __init__(self, deltas: list[str], finish: FinishReason = FinishReason.STOP):
        self.deltas, self.finish = list(deltas), finish

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.finished:
            raise StopAsyncIteration
        text = self.deltas.pop(0)
        self.finished = not self.deltas
        return RequestOutput("r", text, (1,), None, self.finish if self.finished else None, RequestStats(3, 0, 1, 4))

    def abort(self):
        pass


class Model:
    name, live, in_flight, background_in_flight, cost_weight = "m", set(), 1, 0, 1.0


def generation(deltas: list[str], finish=FinishReason.STOP) -> Generation:
    return Generation("chat", Model(), [Scripted(deltas, finish)], [3], False, None, ServerMetrics(lambda: {}),
                      time.monotonic(), tool_calls=ToolCallOptions(frozenset(NAMES)))


CALL = ['{"name": "get_weather",', ' "arguments": {"city": "Paris"}}']


def test_a_call_is_a_message_with_tool_calls_and_finish_reason_tool_calls():
    response = ChatCompletion.model_validate(asyncio.run(generation(CALL).result()))
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_a_streamed_call_comes_as_one_tool_calls_delta_with_the_finish():
    async def chunks():
        return [chunk async for chunk in generation(CALL).chunks()]

    parsed = [ChatCompletionChunk.model_validate(c) for c in asyncio.run(chunks())]
    assert not "".join(c.choices[0].delta.content or "" for c in parsed)
    [last] = [c for c in parsed if c.choices[0].delta.tool_calls]
    assert last.choices[0].finish_reason == "tool_calls" and last is parsed[-1]
    [call] = last.choices[0].delta.tool_calls
    assert call.index == 0 and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_a_text_answer_is_unchanged_and_a_call_cut_off_stays_text():
    response = asyncio.run(generation(["Sunny", " in Paris."]).result())
    assert response["choices"][0]["message"] == {"role": "assistant", "content": "Sunny in Paris."}
    assert response["choices"][0]["finish_reason"] == "stop"
    response = asyncio.run(generation(['{"name": "add", ', '"argu'], FinishReason.LENGTH).result())
    assert response["choices"][0]["message"]["content"] == '{"name": "add", "argu'
    assert response["choices"][0]["finish_reason"] == "length"


# ---- the request rules, on a real server --------------------------------------------------------

@pytest.fixture(scope="module")
def server():
    with ServerThread() as running:
        yield running


def chat(server, **fields):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Weather in Paris?"}], "max_tokens": 2,
            "temperature": 0, **fields}
    return httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=30)


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_call_kvserve_cannot_force_is_a_400_that_says_so(server, tool_choice):
    response = chat(server, tools=[WEATHER], tool_choice=tool_choice)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "tool_choice" and "cannot force" in error["message"]


def test_tool_choice_none_shows_the_tools_without_asking_for_calls(server):
    auto = chat(server, tools=[WEATHER]).json()["usage"]["prompt_tokens"]
    none = chat(server, tools=[WEATHER], tool_choice="none").json()["usage"]["prompt_tokens"]
    bare = chat(server).json()["usage"]["prompt_tokens"]
    assert bare < none < auto                     # the tools' lines, then the instruction to call them


def test_the_openai_sdk_accepts_the_fields(server):
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    answer = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                            tools=[WEATHER], tool_choice="auto", parallel_tool_calls=False,
                                            max_tokens=2, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")


# ---- Anthropic's tool_use -------------------------------------------------------------------------

def anthropic_message(deltas: list[str]):
    from kvserve.server.anthropic_api import AnthropicMessage

    class Tokenized(Model):
        tokenizer = None

    return AnthropicMessage(Generation("chat", Tokenized(), [Scripted(deltas)], [3], False, None,
                                       ServerMetrics(lambda: {}), time.monotonic(),
                                       tool_calls=ToolCallOptions(frozenset(NAMES))), ())


def test_an_anthropic_answer_that_calls_is_a_tool_use_block_and_stop_reason_tool_use():
    from anthropic.types import Message

    message = Message.model_validate(asyncio.run(anthropic_message(CALL).result()))
    assert message.stop_reason == "tool_use"
    [block] = message.content                       # no empty text block before it
    assert block.type == "tool_use" and block.name == "get_weather" and block.input == {"city": "Paris"}
    assert block.id.startswith("toolu_")


def test_anthropic_stream_events_of_a_call_and_of_prose_with_tools():
    async def events(deltas):
        return [(name, data) async for name, data in anthropic_message(deltas).events()]

    names = [name for name, _ in asyncio.run(events(CALL))]
    assert names == ["message_start", "ping", "content_block_start", "content_block_delta", "content_block_stop",
                     "message_delta", "message_stop"]
    prose = asyncio.run(events(["Sunny", " today."]))
    starts = [data["content_block"] for name, data in prose if name == "content_block_start"]
    assert starts == [{"type": "text", "text": ""}]
    assert "".join(d["delta"]["text"] for n, d in prose if n == "content_block_delta") == "Sunny today."
    assert prose[-2][1]["delta"]["stop_reason"] == "end_turn"


def test_tool_use_and_tool_result_blocks_become_a_call_and_its_result():
    from kvserve.server.anthropic_api import MessagesRequest, to_chat_request

    body = MessagesRequest.model_validate({
        "model": "m", "max_tokens": 8, "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
        "messages": [{"role": "user", "content": "Weather in Paris?"},
                     {"role": "assistant", "content": [{"type": "text", "text": "Let me look."},
                                                       {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                                        "input": {"city": "Paris"}}]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                                   "content": [{"type": "text", "text": "31 C"}]},
                                                  {"type": "text", "text": "And tomorrow?"}]}]})
    chat = to_chat_request(body)
    roles = [m.role for m in chat.messages]
    assert roles == ["user", "assistant", "tool", "user"]          # the tools are added by the chat path
    call = chat.messages[1].tool_calls[0]
    assert (call.id, call.function.name, json.loads(call.function.arguments)) == ("toolu_1", "get_weather",
                                                                                 {"city": "Paris"})
    assert chat.messages[2].tool_call_id == "toolu_1" and chat.messages[2].text_content() == "31 C"
    assert chat.tools[0]["function"]["name"] == "get_weather" and chat.tool_choice is None


@pytest.mark.parametrize("messages, tool_choice, message", [
    ([{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "get_weather", "input": {}}]}], None,
     "tool_use blocks belong in assistant messages"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": [
        {"type": "tool_result", "tool_use_id": "t", "content": "x"}]}, {"role": "user", "content": "ok"}], None,
     "tool_result blocks belong in user messages"),
    ([{"role": "user", "content": [{"type": "tool_result", "content": "x"}]}], None, "needs tool_use_id"),
    ([{"role": "user", "content": "hi"}], {"type": "any"}, "cannot force a tool call"),
])
def test_misplaced_tool_blocks_and_forced_calls_are_anthropic_400s(server, messages, tool_choice, message):
    body = {"model": "tiny", "max_tokens": 2, "messages": messages,
            "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}]}
    if tool_choice is not None:
        body["tool_choice"] = tool_choice
    response = httpx.post(server.base_url + "/v1/messages", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["type"] == "error" and message in response.json()["error"]["message"]


# ---- Bedrock Converse's toolUse ---------------------------------------------------------------------

def converse_reply(deltas: list[str]):
    from types import SimpleNamespace

    from kvserve.server.bedrock import Converse, _Reply
    from kvserve.server.protocol import ChatCompletionRequest

    class Engined(Model):
        engine = SimpleNamespace(engine=SimpleNamespace(eos_token_ids={2}))

    generation = Generation("chat", Engined(), [Scripted(deltas)], [3], False, None, ServerMetrics(lambda: {}),
                            time.monotonic(), tool_calls=ToolCallOptions(frozenset(NAMES)))
    converse = Converse(ChatCompletionRequest(messages=[{"role": "user", "content": "x"}]), True, False)
    return _Reply(generation, converse, time.monotonic())


def test_a_converse_answer_that_calls_is_tool_use_blocks_and_stop_reason_tool_use():
    response = asyncio.run(converse_reply(CALL).response())
    assert response["stopReason"] == "tool_use"
    [block] = response["output"]["message"]["content"]
    assert block["toolUse"]["name"] == "get_weather" and block["toolUse"]["input"] == {"city": "Paris"}

    async def events(deltas):
        return [e async for e in converse_reply(deltas).events(event=lambda name, body: (name, body),
                                                                exception=lambda *a: ("exception", a))]

    streamed = asyncio.run(events(CALL))
    assert [name for name, _ in streamed] == ["messageStart", "contentBlockStart", "contentBlockDelta",
                                              "contentBlockStop", "messageStop", "metadata"]
    assert streamed[1][1]["start"]["toolUse"]["name"] == "get_weather"
    assert json.loads(streamed[2][1]["delta"]["toolUse"]["input"]) == {"city": "Paris"}
    assert streamed[4][1] == {"stopReason": "tool_use"}
    prose = asyncio.run(events(["Sunny", "."]))
    assert [(n, b.get("contentBlockIndex")) for n, b in prose[1:4]] == [("contentBlockDelta", 0),
                                                                         ("contentBlockDelta", 0),
                                                                         ("contentBlockStop", 0)]


def test_converse_tool_blocks_become_a_call_and_its_result():
    from kvserve.server.bedrock import to_chat_request

    chat = to_chat_request("m", {
        "toolConfig": {"tools": [{"toolSpec": {"name": "get_weather", "inputSchema": {"json": {"type": "object"}}}},
                                 {"cachePoint": {"type": "default"}}], "toolChoice": {"auto": {}}},
        "messages": [{"role": "user", "content": [{"text": "Weather in Paris?"}]},
                     {"role": "assistant", "content": [{"toolUse": {"toolUseId": "t1", "name": "get_weather",
                                                                    "input": {"city": "Paris"}}}]},
                     {"role": "user", "content": [{"toolResult": {"toolUseId": "t1", "content": [{"json": {"c": 31}}]}}]}],
    }).chat
    assert [m.role for m in chat.messages] == ["user", "assistant", "tool"] and chat.tool_choice == "auto"
    assert chat.tools[0]["cache_control"] == {"type": "ephemeral", "ttl": "5m"}
    assert chat.messages[1].tool_calls[0].id == "t1" and chat.messages[2].text_content() == '{"c": 31}'


@pytest.mark.parametrize("body, message", [
    ({"messages": [{"role": "user", "content": [{"toolUse": {"toolUseId": "t", "name": "get_weather", "input": {}}}]}]},
     "belongs in assistant messages"),
    ({"toolConfig": {"tools": [{"toolSpec": {"name": "get_weather"}}], "toolChoice": {"any": {}}},
      "messages": [{"role": "user", "content": [{"text": "hi"}]}]}, "cannot force a tool call"),
])
def test_converse_misplaced_tool_blocks_and_forced_calls_are_validation_errors(server, body, message):
    response = httpx.post(server.base_url + "/model/tiny/converse", json=body, timeout=30)
    assert response.status_code == 400 and response.headers["x-amzn-ErrorType"].startswith("ValidationException")
    assert message in response.json()["message"]
