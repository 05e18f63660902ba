"""The official `openai` SDK, used as any client would, against a real `kvserve serve` subprocess
(tiny random model, fp32). The tiny model's ByteTokenizer makes one token per UTF-8 byte."""

from __future__ import annotations

import uuid

import openai
import pytest
from helpers import MODEL, serve_subprocess

CHAT = [{"role": "user", "content": "Tell me a story."}]


@pytest.fixture(scope="module")
def base_url():
    with serve_subprocess() as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60.0) as client:
        yield client


def unique(text: str) -> str:
    """A prompt no earlier request shared a prefix block with (the server lives for the module)."""
    return f"[{uuid.uuid4().hex}] {text}"


def test_models_list(client: openai.OpenAI):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model"


def test_chat_streams_token_by_token(client: openai.OpenAI):
    stream = client.chat.completions.create(model=MODEL, messages=CHAT, stream=True, max_tokens=64,
                                            temperature=0.9, seed=3, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    texts, so_far = [], ""
    for chunk in chunks:
        content = chunk.choices[0].delta.content if chunk.choices else None
        if content:
            so_far += content
            texts.append(so_far)
    # the text arrives incrementally: several content chunks, each one extending the last
    assert len(texts) >= 3, texts
    assert all(len(a) < len(b) and b.startswith(a) for a, b in zip(texts, texts[1:]))
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_stream_usage_in_last_chunk(client: openai.OpenAI):
    stream = client.chat.completions.create(model=MODEL, messages=CHAT, stream=True, max_tokens=8,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 8
    assert last.usage.prompt_tokens == len("user: Tell me a story.\nassistant: ".encode())
    assert last.usage.total_tokens == last.usage.prompt_tokens + 8
    assert last.usage.prompt_tokens_details is not None
    assert isinstance(last.usage.prompt_tokens_details.cached_tokens, int)   # 0 included
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_equals_non_stream_for_a_seeded_request(client: openai.OpenAI):
    request = dict(model=MODEL, messages=[{"role": "user", "content": unique("Once upon a time")}],
                   max_tokens=40, temperature=0.9, seed=7)
    # Separate cache salts: both requests compute their prompt from scratch (same path, same numbers).
    stream = client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True},
                                            extra_body={"cache_salt": "streamed"})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    usage = chunks[-1].usage

    result = client.chat.completions.create(**request, extra_body={"cache_salt": "whole"})
    assert result.object == "chat.completion"
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].message.content == text
    assert [result.choices[0].finish_reason] == finish
    assert result.usage.completion_tokens == usage.completion_tokens
    assert result.usage.prompt_tokens == usage.prompt_tokens
    assert text   # a random model still says something in 40 tokens


def test_cached_tokens_reported_and_counted(client: openai.OpenAI):
    prompt = unique("The quick brown fox jumps over the lazy dog. " * 3)
    assert len(prompt.encode()) >= 64
    messages = [{"role": "user", "content": prompt}]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert first.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    second = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    cached = second.usage.prompt_tokens_details.cached_tokens
    block_size = 16
    assert cached >= 64 and cached % block_size == 0, cached
    assert cached < second.usage.prompt_tokens


def test_completions_non_streaming(client: openai.OpenAI):
    result = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, extra_body={"ignore_eos": True})
    assert result.object == "text_completion"
    assert len(result.choices) == 1
    assert result.choices[0].finish_reason == "length"
    assert result.usage.prompt_tokens == 1 + len("Hello")   # <bos> + bytes
    assert result.usage.completion_tokens == 5


def test_completions_streaming(client: openai.OpenAI):
    request = dict(model=MODEL, prompt=unique("Hello"), max_tokens=24, temperature=0.9, seed=11,
                   extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(**request, stream=True))
    assert all(c.object == "text_completion" for c in chunks)
    text = "".join(c.choices[0].text for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert sum(1 for c in chunks if c.choices[0].text) >= 2
    whole = client.completions.create(**request)
    assert whole.choices[0].text == text


def test_n_choices(client: openai.OpenAI):
    result = client.chat.completions.create(model=MODEL, messages=CHAT, n=2, max_tokens=6, temperature=1.0,
                                            seed=5, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in result.choices) == [0, 1]
    assert result.usage.completion_tokens == 12
    completions = client.completions.create(model=MODEL, prompt="abc", n=2, max_tokens=3,
                                            extra_body={"ignore_eos": True})
    assert sorted(c.index for c in completions.choices) == [0, 1]
    streamed = list(client.chat.completions.create(model=MODEL, messages=CHAT, n=2, max_tokens=4, stream=True,
                                                   extra_body={"ignore_eos": True}))
    finished = {c.choices[0].index: c.choices[0].finish_reason for c in streamed if c.choices[0].finish_reason}
    assert finished == {0: "length", 1: "length"}


def test_chat_logprobs(client: openai.OpenAI):
    result = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, logprobs=True,
                                            top_logprobs=2, extra_body={"ignore_eos": True})
    content = result.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert entry.logprob <= 0.0
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert isinstance(entry.token, str) and entry.bytes is not None


def test_completions_logprobs(client: openai.OpenAI):
    result = client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, logprobs=3,
                                       extra_body={"ignore_eos": True})
    logprobs = result.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    assert all(len(top) <= 3 for top in logprobs.top_logprobs)


def test_errors_raise_sdk_exceptions(client: openai.OpenAI):
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="nope", messages=CHAT, max_tokens=2)
    assert error.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, temperature=5)
    assert error.value.body["param"] == "temperature"
