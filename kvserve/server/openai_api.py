"""/v1/completions, /v1/chat/completions and /v1/models.

A request body becomes a `Generation`: one engine stream per choice (n choices per prompt), the
token accounting, and the timing that metrics need. The SSE endpoint, the WebSocket endpoint and
the non-streaming endpoint all consume the same `Generation.chunks()` iterator of OpenAI chunk
dicts, so a streamed answer and a non-streamed one are built from the same deltas.

    body ──▶ validate (pydantic + limits) ──▶ admission (queue cap, tenant's max_concurrent: 429)
         ──▶ chat template ──▶ tokenize (in a worker thread) ──▶ prompt cap
         ──▶ tenant's tokens_per_minute (429) ──▶ AsyncEngine.add × choices (tenant, weight, priority)

The tenant's share and limits (auth.TenantShare, from the keys file) are applied in one place,
`OpenAIServing._start`, which every API (OpenAI, Anthropic, Bedrock, WebSocket, batch lines,
routers) goes through; what a request holds of its tenant's limits (a TenantLease) is given back
where its admission slots are: `Generation.close()`, or `_start` itself if it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from kvserve.kv.prefix_cache import cache_namespace
from kvserve.config import ServerConfig
from kvserve.engine.async_engine import AsyncEngine, EngineDeadError, RequestStream
from kvserve.outputs import RequestOutput, TokenLogprob, latest_stats
from kvserve.sampling import FinishReason, InvalidRequestError, SamplingParams
from kvserve.routing.compaction import CompactionError, CompactionPolicy, SummaryStore, compact, summary_request
from kvserve.server.auth import TenantLease, TenantLimits, TenantShare
from kvserve.server.metrics import ServerMetrics
from kvserve.server.checkpoints import collect_marks, render_with_marks
from kvserve.server.protocol import (APIError, ChatCompletionRequest, ChatMessage, CompletionRequest, ContentPart,
                                     as_api_error, check_messages, engine_dead)
from kvserve.server.tool_calls import CALL_INSTRUCTION, ToolCallOptions, ToolCallScanner
from kvserve.server.tools import TOOLS_HEADER, tool_line
from kvserve.routing.replicas import ROUTING_SESSION
from kvserve.server.routers import turn_of


log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    name: str
    engine: AsyncEngine
    created: int = field(default_factory=lambda: int(time.time()))
    in_flight: int = 0     # accepted choices not yet finished (admission control)
    background_in_flight: int = 0   # ... of which background (batch) ones: not held against the queue cap
    live: set = field(default_factory=set)   # Generations not yet closed (the drain aborts them)
    weight: float | None = None              # cost weight (None: from the parameter count)

    @property
    def tokenizer(self):
        return self.engine.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len

    @property
    def capacity(self) -> int:
        return self.engine.engine.config.scheduler.max_num_seqs * self.engine.replicas

    @property
    def admission_load(self) -> int:
        """Interactive choices held against the queue cap (batch lines are bounded elsewhere)."""
        return self.in_flight - self.background_in_flight

    @property
    def cost_weight(self) -> float:
        """Cost of a token on this model: --cost-weight, else its parameter count in billions."""
        if self.weight is None:
            self.weight = parameter_count(self.engine.engine.config.model, self.engine.engine.model_config) / 1e9
        return self.weight


def parameter_count(source: str | None, config) -> int:
    """A registered model's published parameter count, else the count of its weights."""
    from kvserve.model import registry
    from kvserve.model.loader import expected_shapes

    registered = registry.lookup(source) if source else None
    if registered is not None:
        return registered.parameters
    return sum(math.prod(shape) for shape in expected_shapes(config).values())


@dataclass
class _Choice:
    index: int
    prompt_index: int
    stream: RequestStream
    num_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    cache_writes_by_ttl: tuple[tuple[float, int], ...] = ()
    finish_reason: str | None = None
    routed: object = None      # the RoutedStream of a routed choice (stream may wrap it)
    tools: ToolCallScanner | None = None   # a chat answer that may call the request's tools


class Generation:
    """One accepted request: its choices' engine streams, consumed as OpenAI chunk dicts."""

    def __init__(self, kind: str, model: ServedModel, streams: list[RequestStream], prompt_lengths: list[int],
                 include_usage: bool, logprobs: int | None, metrics: ServerMetrics, received: float,
                 background: bool = False, tenant: str | None = None, lease: TenantLease | None = None,
                 tool_calls: ToolCallOptions | None = None):
        """`streams` holds n choices per prompt, prompt-major; `prompt_lengths` one entry per prompt.
        `lease`: what the request holds of its tenant's limits, released by close().
        `tool_calls`: the tools a chat answer may call (each choice's text is scanned for calls)."""
        self.kind = kind
        self.background = background
        self.tenant = tenant or ""        # the metrics label ("" for the anonymous tenant)
        self.lease = lease
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = model
        n = len(streams) // len(prompt_lengths)
        self.choices = [_Choice(i, i // n, s, routed=s if hasattr(s, "decision") else None,
                                tools=ToolCallScanner(tool_calls.names, tool_calls.parallel) if tool_calls else None)
                        for i, s in enumerate(streams)]
        self.prompt_tokens = sum(prompt_lengths)
        self.prompt_lengths = list(prompt_lengths)
        self.compaction: dict | None = None       # usage.compaction of a compacted history
        self.include_usage = include_usage
        self.logprobs = logprobs
        self.metrics = metrics
        self.received = received
        self._last_token_time = received
        self._closed = False
        model.live.add(self)
        metrics.admitted.labels(model.name).inc(len(self.choices))

    # ---- consumption ----------------------------------------------------------------------
    async def chunks(self) -> AsyncIterator[dict]:
        """OpenAI chunk dicts: content deltas, one finishing chunk per choice, then usage (if asked)."""
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(self._pump(choice, queue)) for choice in self.choices]
        try:
            if self.kind == "chat":
                for choice in self.choices:
                    yield self._chunk(choice.index, {"role": "assistant", "content": ""}, None, None)
            remaining = len(self.choices)
            while remaining:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                choice, output = item
                chunk = self._on_output(choice, output)
                if chunk is not None:
                    yield chunk
                if output.finished:
                    remaining -= 1
            if self.include_usage:
                yield self._usage_chunk()
        finally:
            for task in tasks:
                task.cancel()
            self.close()

    async def result(self) -> dict:
        """The non-streaming response, built from the same deltas as the stream."""
        collected: dict[int, list[dict]] = {c.index: [] for c in self.choices}
        async for chunk in self.chunks():
            for c in chunk["choices"]:
                collected[c["index"]].append(c)
        return self._response(collected)

    def close(self) -> None:
        """Abort unfinished choices and give back their admission slots (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for choice in self.choices:
            if choice.finish_reason is None:   # cut short (client gone, engine failed): nobody reads its last delta
                self.metrics.finished.labels(self.model.name, "abort").inc()
                stats = latest_stats(choice.stream)
                if stats is not None:   # what it cost is what the engine generated, read or not
                    choice.num_tokens = max(choice.num_tokens, stats.num_output_tokens)
            choice.stream.abort()
        self.model.in_flight -= len(self.choices)
        if self.background:
            self.model.background_in_flight -= len(self.choices)
        self.model.live.discard(self)
        generated = sum(choice.num_tokens for choice in self.choices)
        if self.lease is not None:   # the tenant's concurrency slots, and the max_tokens not used
            self.lease.release(generated)
        try:    # after the slots are given back: accounting never holds them
            self.metrics.tenant_tokens.labels(self.tenant, "prompt").inc(self.prompt_tokens)
            self.metrics.tenant_tokens.labels(self.tenant, "generation").inc(generated)
            self.metrics.weighted_cost.labels(self.model.name).inc(self.cost()["weighted"])
            for choice in self.choices:
                if choice.routed is not None and choice.finish_reason is not None:
                    self.metrics.routing_decisions.labels(self.model.name, self.answering_model(choice),
                                                          choice.routed.decision.reason).inc()
        except Exception:   # noqa: BLE001
            log.exception("cost accounting failed")

    def abort(self) -> None:
        """Abort the unfinished choices on the server's behalf (shutdown) while the consumer goes
        on reading: each ends with finish_reason "abort", and the consumer closes as usual."""
        for choice in self.choices:
            choice.stream.abort()

    async def _pump(self, choice: _Choice, queue: asyncio.Queue) -> None:
        try:
            async for output in choice.stream:
                await queue.put((choice, output))
        except EngineDeadError as error:
            await queue.put(engine_dead(error))
        except Exception as error:   # noqa: BLE001 - a routed stream starts engines as it goes: its errors
            # end the answer as they would have ended its start (an APIError: an in-band error frame)
            await queue.put(as_api_error(error, "a routed stream"))

    # ---- shaping ----------------------------------------------------------------------------
    def _on_output(self, choice: _Choice, output: RequestOutput) -> dict | None:
        name = self.model.name
        now = time.monotonic()
        if output.token_ids and not choice.stream.quiet:   # a quiet stream's timing is not per token
            if choice.num_tokens == 0:
                self.metrics.ttft.labels(name).observe(now - self.received)
            else:
                self.metrics.tbt.labels(name).observe((now - self._last_token_time) / len(output.token_ids))
            self._last_token_time = now
        choice.num_tokens += len(output.token_ids)
        choice.cached_tokens = output.stats.num_cached_tokens
        choice.cache_write_tokens = output.stats.num_cache_write_tokens
        choice.cache_writes_by_ttl = output.stats.cache_writes_by_ttl
        if output.finish_reason is FinishReason.ERROR:
            choice.finish_reason = "error"
            self.metrics.finished.labels(name, "error").inc()
            raise APIError(500, "the engine could not run this request (the error is in the server's log); "
                           "other requests were not affected", type="server_error", code="engine_error")
        finish = output.finish_reason.value if output.finish_reason else None
        logprobs = self._logprobs(output.logprobs) if self.logprobs is not None and output.logprobs else None
        text, calls = output.text, []
        if choice.tools is not None:   # text that may be tool calls is held back to the end
            text = choice.tools.feed(text)
            if output.finished:
                rest, calls = choice.tools.finish()
                text += rest
        if output.finished:
            self._observe_finished(output, finish)
            if calls and finish in ("stop", "length"):
                finish = "tool_calls"
            choice.finish_reason = finish
        if not text and not output.finished and logprobs is None:
            return None
        if calls:
            delta = {"tool_calls": [{"index": k, **call} for k, call in enumerate(calls)]}
        else:
            delta = {"content": text} if self.kind == "chat" else text
        chunk = self._chunk(choice.index, delta, finish, logprobs, self.answering_model(choice))
        routing = self.routing(choice) if output.finished else None
        if routing is not None:
            chunk["routing"] = routing
        return chunk

    # ---- routing and cost -------------------------------------------------------------------
    def answering_model(self, choice: _Choice) -> str:
        """The model that wrote the choice's latest text: a router's choice, or the model named."""
        return choice.routed.answering_model if choice.routed is not None else self.model.name

    def routing(self, choice: _Choice) -> dict | None:
        """The routing record of a routed choice (None for a model named directly)."""
        return choice.routed.decision.to_json() if choice.routed is not None else None

    def cost(self) -> dict:
        """Weighted cost: cost weight x (prompt + generated tokens) of every model run, prompt
        tokens once per prompt (and model); a routed answer counts the tokens of every model that
        ran for it, the ones thrown away by an escalation included."""
        by_model: dict[str, float] = {}
        seen: set[int] = set()
        routed_seen: set[tuple[int, str]] = set()     # (prompt, model): that model's run already paid the prompt
        for c in self.choices:
            if c.routed is not None:
                members = self.model.members
                prompt = self.prompt_lengths[c.prompt_index]
                for run in c.routed.runs:
                    key = (c.prompt_index, run["model"])
                    # A hand-off's run reads the prompt plus the tokens sent: those count for every choice.
                    tokens = run["output_tokens"] + (run["prompt_tokens"] - prompt if key in routed_seen
                                                     else run["prompt_tokens"])
                    routed_seen.add(key)
                    by_model[run["model"]] = by_model.get(run["model"], 0.0) + members[run["model"]].cost_weight * tokens
                continue
            tokens = c.num_tokens + (self.prompt_lengths[c.prompt_index] if c.prompt_index not in seen else 0)
            seen.add(c.prompt_index)
            by_model[self.model.name] = by_model.get(self.model.name, 0.0) + self.model.cost_weight * tokens
        return {"weighted": round(sum(by_model.values()), 3), "by_model": {k: round(v, 3) for k, v in by_model.items()}}

    def _observe_finished(self, output: RequestOutput, finish: str) -> None:
        name = self.model.name
        self.metrics.finished.labels(name, finish).inc()
        self.metrics.e2e.labels(name).observe(time.monotonic() - self.received)
        self.metrics.prompt_tokens.labels(name).observe(output.stats.num_prompt_tokens)
        self.metrics.generation_tokens.labels(name).observe(output.stats.num_output_tokens)
        self.metrics.cache_read_tokens.labels(name).inc(output.stats.num_cached_tokens)
        self.metrics.cache_write_tokens.labels(name).inc(output.stats.num_cache_write_tokens)
        if output.stats.queue_time_s is not None:
            self.metrics.queue_time.labels(name).observe(output.stats.queue_time_s)
            self.metrics.tenant_queue_time.labels(self.tenant).observe(output.stats.queue_time_s)

    def _chunk(self, index: int, delta, finish: str | None, logprobs, model: str | None = None) -> dict:
        choice = {"index": index, "logprobs": logprobs, "finish_reason": finish}
        if self.kind == "chat":
            choice["delta"] = delta
            obj = "chat.completion.chunk"
        else:
            choice["text"] = delta
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": model or self.model.name,
                "choices": [choice]}

    def usage(self) -> dict:
        """Prompt tokens count once per prompt (not per choice); so do cached ones (first choice's)."""
        completion = sum(c.num_tokens for c in self.choices)
        seen, cached, written, by_ttl = set(), 0, 0, {300.0: 0, 3600.0: 0}
        for c in self.choices:
            if c.prompt_index not in seen:
                seen.add(c.prompt_index)
                cached += c.cached_tokens
                written += c.cache_write_tokens
                for ttl_s, tokens in c.cache_writes_by_ttl:
                    by_ttl[ttl_s] = by_ttl.get(ttl_s, 0) + tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion,
                "prompt_tokens_details": {"cached_tokens": cached},
                "cache_read_input_tokens": cached, "cache_creation_input_tokens": written,
                # Anthropic's breakdown of the written tokens by checkpoint TTL
                "cache_creation": {"ephemeral_5m_input_tokens": by_ttl[300.0],
                                   "ephemeral_1h_input_tokens": by_ttl[3600.0]},
                "cost": self.cost(),
                **({"compaction": self.compaction} if self.compaction else {})}

    def _usage_chunk(self) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created,
                "model": self.answering_model(self.choices[0]), "choices": [], "usage": self.usage()}

    def _logprobs(self, entries: tuple[TokenLogprob, ...]) -> dict:
        decode = self.model.tokenizer.decode

        def token(token_id: int) -> str:
            return decode([token_id], skip_special_tokens=False)

        if self.kind == "chat":
            return {"content": [
                {"token": token(e.token_id), "logprob": e.logprob, "bytes": list(token(e.token_id).encode()),
                 "top_logprobs": [{"token": token(t), "logprob": lp, "bytes": list(token(t).encode())}
                                  for t, lp in e.top]}
                for e in entries]}
        return {"tokens": [token(e.token_id) for e in entries],
                "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{token(t): lp for t, lp in e.top} for e in entries]}

    def _response(self, collected: dict[int, list[dict]]) -> dict:
        choices = []
        for choice in self.choices:
            parts = collected[choice.index]
            logprobs = _join_logprobs([p["logprobs"] for p in parts if p.get("logprobs")], self.kind)
            if self.kind == "chat":
                text = "".join(p["delta"].get("content", "") for p in parts)
                calls = [{k: v for k, v in call.items() if k != "index"}
                         for p in parts for call in p["delta"].get("tool_calls", ())]
                message = {"role": "assistant", "content": text}
                if calls:
                    message = {"role": "assistant", "content": text or None, "tool_calls": calls}
                choices.append({"index": choice.index, "message": message,
                                "logprobs": logprobs, "finish_reason": choice.finish_reason})
            else:
                text = "".join(p["text"] for p in parts)
                choices.append({"index": choice.index, "text": text, "logprobs": logprobs,
                                "finish_reason": choice.finish_reason})
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        response = {"id": self.id, "object": obj, "created": self.created,
                    "model": self.answering_model(self.choices[0]), "choices": choices, "usage": self.usage()}
        routing = [self.routing(choice) for choice in self.choices]
        if routing[0] is not None:
            response["routing"] = routing[0]
            if len(routing) > 1:
                for entry, record in zip(choices, routing):
                    entry["routing"] = record
        return response


def _join_logprobs(parts: list[dict], kind: str) -> dict | None:
    if not parts:
        return None
    if kind == "chat":
        return {"content": [entry for p in parts for entry in p["content"]]}
    return {key: [x for p in parts for x in p[key]] for key in ("tokens", "token_logprobs", "top_logprobs")}


def latest_message_text(messages: Sequence[ChatMessage]) -> str:
    """The text of the message being answered: the last one not written by the assistant (an
    assistant message at the end is a reply being continued, not what it answers)."""
    for message in reversed(messages):
        if message.role != "assistant":
            return message.text_content()
    return messages[-1].text_content() if messages else ""


def with_tools(messages: list[ChatMessage], tools: list[dict] | None,
               calls: ToolCallOptions | None = None) -> list[ChatMessage]:
    """OpenAI function tools as text at the start of the system prompt (see tools.py); a tool's
    `cache_control` marks the end of its line. With `calls` (tool_choice "auto"), the line after
    them says how to call them (tool_calls.py)."""
    if not tools:
        return messages
    parts = [ContentPart(type="text", text=TOOLS_HEADER)]
    for tool in tools:
        function = tool["function"]
        line = tool_line(function["name"], str(function.get("description", "")), function.get("parameters") or {})
        parts.append(ContentPart(type="text", text=line, cache_control=tool.get("cache_control")))
    if calls is not None:
        parts.append(ContentPart(type="text", text=CALL_INSTRUCTION))
    if messages[0].role == "system":
        system = messages[0].content if isinstance(messages[0].content, list) else \
            [ContentPart(type="text", text=messages[0].text_content())]
        return [ChatMessage(role="system", content=parts + [ContentPart(type="text", text="\n")] + system),
                *messages[1:]]
    return [ChatMessage(role="system", content=parts), *messages]


def tool_call_options(body: ChatCompletionRequest) -> ToolCallOptions | None:
    """The tools a chat answer may call: None without tools or with tool_choice "none". kvserve
    cannot force a call (no constrained decoding), so "required" and a named function are 400s."""
    tools = body.tools or []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type") != "function" or not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise APIError(400, f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}",
                           param=f"tools.{i}")
    choice = body.tool_choice
    if choice is not None and choice not in ("auto", "none"):
        raise APIError(400, "tool_choice must be \"auto\" or \"none\": kvserve cannot force a tool call "
                       "(\"required\" or a named function); with \"auto\" the model calls a tool when it chooses to",
                       param="tool_choice")
    if not tools or choice == "none":
        return None
    return ToolCallOptions(frozenset(t["function"]["name"] for t in tools), body.parallel_tool_calls is not False)


class OpenAIServing:
    """Turns validated bodies into Generations, enforcing every server limit."""

    def __init__(self, models: dict[str, ServedModel], config: ServerConfig, metrics: ServerMetrics,
                 routers: dict | None = None, tenants: TenantLimits | None = None):
        """`routers`: name → RoutedModel (server/routers.py), virtual models clients name like models.
        `tenants`: the tenants' shares and limits (None: every tenant the defaults, no limits)."""
        self.models = models
        self.config = config
        self.metrics = metrics
        self.routers = routers or {}
        self.tenants = tenants or TenantLimits()
        self.summaries = SummaryStore()      # compaction summaries, by tenant, model and history

    def model(self, name: str | None) -> ServedModel:
        if name is None:
            return next(iter(self.models.values()))
        if name in self.routers:
            return self.routers[name]
        if name not in self.models:
            known = ", ".join([*self.models, *self.routers])
            raise APIError(404, f"model {name!r} does not exist; available: {known}",
                           type="not_found_error", param="model", code="model_not_found")
        return self.models[name]

    def list_models(self) -> dict:
        entries = [{"id": m.name, "object": "model", "created": m.created, "owned_by": "kvserve",
                    "max_model_len": m.max_model_len} for m in self.models.values()]
        entries += [{"id": r.name, "object": "model", "created": r.created, "owned_by": "kvserve-router",
                     "max_model_len": r.max_model_len, "router": r.describe()} for r in self.routers.values()]
        return {"object": "list", "data": entries}

    def list_routers(self) -> dict:
        return {"object": "list", "data": [r.describe() for r in self.routers.values()]}

    async def chat(self, body: ChatCompletionRequest, tenant: str | None = None,
                   background: bool = False) -> Generation:
        """`tenant` (from the API key) namespaces the prefix cache: tenants never share KV; its
        share and limits (auth.TenantShare) apply in `_start`.
        `background` (a batch job's line): waits behind interactive work and gives way to it,
        and does not count against the interactive queue cap, nor against the tenant's
        max_concurrent and tokens_per_minute (the batch runner bounds it)."""
        model = self.model(body.model)
        check_messages(body.messages)
        messages, compacted = body.messages, None
        if body.compaction_options is not None:
            messages, compacted = await self._compact(model, body, tenant)
        calls = tool_call_options(body)
        messages = with_tools(messages, body.tools, calls)
        marks = collect_marks(messages)
        try:
            prompt, positions = render_with_marks(model.tokenizer, messages, marks)
        except APIError:
            raise
        except Exception as error:   # a template's raise_exception: the conversation is not acceptable
            raise APIError(400, f"the chat template rejected the messages: {error}", param="messages") from error
        checkpoints = [(position, mark.ttl_s) for position, mark in zip(positions, marks)]
        generation = await self._start("chat", model, body, [prompt], body.requested_max_tokens, add_special=False,
                                       checkpoints=checkpoints, tenant=tenant, background=background,
                                       turn=latest_message_text(messages), tool_calls=calls)
        generation.compaction = compacted
        return generation

    async def _compact(self, model, body: ChatCompletionRequest, tenant: str | None
                       ) -> tuple[list[ChatMessage], dict | None]:
        """The history under its budget (routing/compaction.py), and `usage.compaction` when it
        was compacted. The summary is written by the small model of a router, or by the model."""
        options = body.compaction_options
        tokenizer = model.tokenizer
        output_room = body.requested_max_tokens or min(self.config.max_tokens_default, model.max_model_len // 4)
        room = model.max_model_len - output_room
        budget = min(room if options.budget_tokens is None else options.budget_tokens, room)
        if budget < 1 or options.keep_recent < 1:
            raise APIError(400, "compaction needs a positive budget (max_tokens leaves no room) and keep_recent >= 1",
                           param="compaction")
        as_dicts = [{"role": m.role, "content": m.text_content()} for m in body.messages]

        def count(messages: list[dict]) -> int:
            try:
                rendered = tokenizer.apply_chat_template(messages)
            except Exception as error:   # a template's raise_exception: the conversation is not acceptable
                raise APIError(400, f"the chat template rejected the messages: {error}", param="messages") from error
            return len(tokenizer.encode(rendered, add_special_tokens=False))

        writer = model.members[model.router.config.small] if hasattr(model, "members") else model
        summary_tokens = max(32, min(512, budget // 4))

        writer_room = writer.max_model_len - summary_tokens - 1

        def request_ids(previous: str | None, turns: list[dict]) -> list[int]:
            request = summary_request(previous, turns, max_words=summary_tokens * 2 // 3)
            return writer.tokenizer.encode(writer.tokenizer.apply_chat_template(request), add_special_tokens=False)

        share = self.tenants.share(tenant)

        async def summarize_once(ids: list[int]) -> str:
            stream = await writer.engine.add(ids, SamplingParams(max_tokens=summary_tokens, temperature=0.0),
                                             cache_salt=cache_namespace(tenant, None), priority=share.priority,
                                             tenant=tenant, weight=share.weight)
            text = []
            try:
                async for output in stream:
                    text.append(output.text)
                    if output.finish_reason is FinishReason.ERROR:
                        raise APIError(500, "the summary of the history could not be written", type="server_error",
                                       code="engine_error")
            finally:   # the client went away (the handler cancelled) or it failed: the writer stops too
                if not stream.finished:
                    stream.abort()
            return "".join(text).strip()

        async def summarize(previous: str | None, turns: list[dict]) -> str:
            """Folded over pieces that fit the writer's context: each extends the summary so far; a
            single message too long for it is cut in its middle."""
            start = 0
            while start < len(turns):
                end = start + 1
                while end < len(turns) and len(request_ids(previous, turns[start:end + 1])) <= writer_room:
                    end += 1
                piece = turns[start:end]
                ids = request_ids(previous, piece)
                while len(ids) > writer_room and len(piece[0]["content"]) > 64:
                    text = piece[0]["content"]
                    keep = len(text) * writer_room // (2 * len(ids))
                    piece = [{**piece[0], "content": f"{text[:keep]} [...] {text[-keep:]}"}]
                    ids = request_ids(previous, piece)
                previous = await summarize_once(ids[-writer_room:])
                start = end
            return previous or ""

        try:
            result = await compact(as_dicts, CompactionPolicy(budget, keep_recent=options.keep_recent), count,
                                   summarize, self.summaries, f"{tenant or ''}\x00{model.name}")
        except CompactionError as error:
            raise APIError(400, str(error), param="messages", code="context_length_exceeded") from None
        if not result.compacted_messages:
            return body.messages, None
        self.metrics.compactions.labels(model.name, "reused" if result.summary_reused else "new").inc()
        kept = body.messages[result.compacted_messages:]
        return [ChatMessage(role="system", content=result.messages[0]["content"]), *kept], result.usage()

    async def completion(self, body: CompletionRequest, tenant: str | None = None,
                         background: bool = False) -> Generation:
        model = self.model(body.model)
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo")
        return await self._start("completion", model, body, body.prompts(), body.requested_max_tokens,
                                 add_special=True, tenant=tenant, background=background)

    async def _start(self, kind: str, model: ServedModel, body, prompts: list, max_tokens: int | None,
                     add_special: bool, checkpoints: list[tuple[int, float]] = (),
                     tenant: str | None = None, background: bool = False, turn: str | None = None,
                     tool_calls: ToolCallOptions | None = None) -> Generation:
        """`checkpoints`: (character position, ttl_s) in prompts[0] (chat has one prompt).
        `turn`: the text of the chat message being answered, which a router's signals read.
        The tenant's share: its weight and default priority go to the engine; an interactive
        request also holds concurrency slots and a token charge (a TenantLease) until it ends."""
        received = time.monotonic()
        self._check_fields(body)
        if body.prompt_cache_key:   # a scaled-out engine keeps the requests sharing it on one replica
            ROUTING_SESSION.set(body.prompt_cache_key)
        num_choices = body.n * len(prompts)
        share = self.tenants.share(tenant)
        # The tenant's default priority, unless the request names its own.
        priority = body.priority if "priority" in body.model_fields_set else share.priority
        lease = None
        if not background:
            with self._rejections(share):
                self._admit(model, num_choices)
                lease = self.tenants.hold(share, num_choices)
        model.in_flight += num_choices
        model.background_in_flight += num_choices if background else 0
        try:
            param = "messages" if kind == "chat" else "prompt"
            token_lists, pins = [], []
            for i, prompt in enumerate(prompts):
                ids, prompt_pins = await self._tokenize(model, prompt, add_special, param,
                                                        checkpoints if i == 0 else ())
                token_lists.append(ids)
                pins.append(prompt_pins)
            params = [self._sampling_params(model, body, len(ids), max_tokens, i) for ids in token_lists
                      for i in range(body.n)]
            if lease is not None:   # prompts once each, max_tokens per choice; refunded by close()
                with self._rejections(share):
                    lease.charge(sum(len(ids) for ids in token_lists), sum(p.max_tokens for p in params))
            streams = []
            # A router reads the message being answered (its lexical signals; tokenized once, off the
            # event loop, as the prompt is); a model takes no such argument.
            routed = {}
            if turn is not None and hasattr(model, "router"):
                routed["turn"] = await asyncio.to_thread(turn_of, token_lists[0], model.tokenizer, turn)
            try:
                per_choice = [(ids, p) for ids, p in zip(token_lists, pins) for _ in range(body.n)]
                for (ids, prompt_pins), choice_params in zip(per_choice, params):
                    streams.append(await model.engine.add(ids, choice_params,
                                                          cache_salt=cache_namespace(tenant, body.cache_salt),
                                                          priority=priority, checkpoints=prompt_pins,
                                                          background=background, quiet=background,
                                                          tenant=tenant, weight=share.weight, **routed))
            except BaseException:
                for stream in streams:
                    stream.abort()
                raise
        except BaseException:
            model.in_flight -= num_choices
            model.background_in_flight -= num_choices if background else 0
            if lease is not None:
                lease.release(never_ran=True)   # the slots and the whole charge come back
            raise
        return Generation(kind, model, streams, [len(ids) for ids in token_lists], body.include_usage,
                          body.num_logprobs, self.metrics, received, background, tenant, lease, tool_calls)

    @contextlib.contextmanager
    def _rejections(self, share: TenantShare):
        """Counts the tenant's refusals (429s, and the 400s of a request its limits can never admit)."""
        try:
            yield
        except APIError as error:
            self.metrics.tenant_rejections.labels(share.label, error.code or str(error.status)).inc()
            raise

    def _check_fields(self, body) -> None:
        if not 1 <= body.n <= self.config.max_n:
            raise APIError(400, f"n must be between 1 and {self.config.max_n}, got {body.n}", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name) not in (None, 0, 0.0):
                raise APIError(400, f"{name} is not supported (only 0)", param=name)
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")

    def _admit(self, model: ServedModel, num_choices: int) -> None:
        limit = model.capacity + self.config.max_queued_requests
        if model.admission_load + num_choices > limit:
            self.metrics.rejected.labels("queue_full").inc()
            raise APIError(429, f"the server is at capacity ({model.in_flight} requests in flight, limit {limit}); "
                           f"retry later", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(self.config.retry_after_s)})

    async def _tokenize(self, model: ServedModel, prompt: str | list[int], add_special: bool,
                        param: str, checkpoints: Sequence[tuple[int, float]] = ()
                        ) -> tuple[list[int], tuple[tuple[int, float], ...]]:
        """Token ids, and the checkpoints as (num_tokens, ttl_s) pins. A checkpoint whose prefix is
        shorter than --cache-min-tokens pins nothing (the request still succeeds). `param` names
        the field the prompt came from ("messages" or "prompt") in errors."""
        counts: list[int] = []
        if isinstance(prompt, list):
            ids = prompt
        else:
            if not prompt:
                raise APIError(400, "the prompt is empty", param="prompt")
            try:   # JSON's \ud800 escapes decode to lone surrogates, which no tokenizer can encode
                prompt.encode("utf-8")
            except UnicodeEncodeError as error:
                raise APIError(400, f"{param} contains text that is not valid Unicode "
                               f"(a lone surrogate at character {error.start})", param=param) from None
            # Tokenizing is bounded by --max-body-bytes and runs off the event loop.
            ids, counts = await asyncio.to_thread(model.tokenizer.encode_with_boundaries, prompt,
                                                  [position for position, _ in checkpoints], add_special)
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        cap = self.config.max_prompt_tokens or model.max_model_len - 1
        cap = min(cap, model.max_model_len - 1)
        if len(ids) > cap:
            self.metrics.rejected.labels("prompt_too_long").inc()
            raise APIError(400, f"the prompt has {len(ids)} tokens; at most {cap} are allowed "
                           f"(context {model.max_model_len})", param=param, code="context_length_exceeded")
        pins = tuple((n, ttl_s) for n, (_, ttl_s) in zip(counts, checkpoints)
                     if n >= max(1, self.config.cache_min_tokens))
        return ids, pins

    def _sampling_params(self, model: ServedModel, body, num_prompt_tokens: int, max_tokens: int | None,
                         choice: int) -> SamplingParams:
        room = model.max_model_len - num_prompt_tokens
        if max_tokens is None:   # the server's cap, so that no request runs to the end of the context unasked
            max_tokens = min(self.config.max_tokens_default, room)
        elif max_tokens < 1:
            raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        elif max_tokens > room:
            raise APIError(400, f"max_tokens ({max_tokens}) plus the prompt ({num_prompt_tokens} tokens) exceeds "
                           f"the context of {model.max_model_len} tokens", param="max_tokens",
                           code="context_length_exceeded")
        seed = body.seed + choice if body.seed is not None else None
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                top_k=body.top_k or 0, seed=seed, stop=tuple(body.stop_list),
                stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=body.ignore_eos,
                logprobs=body.num_logprobs)
        except InvalidRequestError as error:
            raise APIError(400, str(error), param=error.param) from error
