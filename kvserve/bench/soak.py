"""`kvserve bench soak --minutes N`: mixed traffic with random aborts and disconnects, then the
books. It passes only if, at the end:

    zero KV blocks leaked      GET /v1/cache: no block used, no request left, check_integrity ok
    RSS growth bounded         the server's resident memory after the run, against after warm-up
    zero 5xx                   on every route, in every stream (in-band errors included)
    nothing lost               every request the client saw accepted (a 200, a stream, a frame)
                               either completed (a finish reason) or was aborted by its client;
                               and the server finished every request it admitted
                               (kvserve:requests_admitted = the sum of kvserve:request_success)

The traffic, from --concurrency workers until the time is up, each request drawn at random:

    openai-stream     chat, SSE; a third are dropped by the client after a few chunks
    openai-whole      chat or completions, JSON; some abandoned by the client before the answer
    anthropic         /v1/messages, streamed or not; some streams dropped midway
    bedrock           converse
    websocket         one socket, 1-4 requests on it; some cancelled, some sockets closed midway
    bad               a malformed or invalid request: must get a 4xx, never a 5xx

Prompts share a few long prefixes (prefix-cache hits, evictions) and carry cache checkpoints
now and then. Without --url, a server is started (`kvserve serve`, --model and --kvserve-args)
and stopped afterwards. Seeded; a progress bar; one JSON line last; exit 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from kvserve.bench.server_process import free_port, running_process

KINDS = ("openai-stream", "openai-whole", "anthropic", "bedrock", "websocket", "bad")
WEIGHTS = (4, 3, 2, 1, 2, 1)
PREFIXES = [
    "You are a careful assistant for a shipping company. Answer in one short paragraph. " * 6,
    "Summarise the following customer message, then classify its urgency as low, medium or high. " * 5,
    "Translate the user's words into plain English and say which product they ask about. " * 4,
]
WORDS = "parcel late refund address invoice damaged tracking weekend courier label customs payment".split()
BAD = [
    (b'{"messages": [', "POST", "/v1/chat/completions"),
    (json.dumps({"messages": [{"role": "user"}]}).encode(), "POST", "/v1/chat/completions"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": -3}).encode(), "POST",
     "/v1/chat/completions"),
    (json.dumps({"prompt": [10**9]}).encode(), "POST", "/v1/completions"),
    (json.dumps({"max_tokens": 5, "messages": [{"role": "user", "content": []}]}).encode(), "POST", "/v1/messages"),
    (json.dumps({"messages": [{"role": "user", "content": [{"text": " "}]}]}).encode(), "POST",
     "/model/m/converse"),
    (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), "POST", "/v1/chat/completions"),
    (b"", "GET", "/v1/nope"),
]


def add_soak_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--minutes", type=float, default=2.0, help="how long the traffic runs")
    parser.add_argument("--url", default=None, help="a running server (default: start one)")
    parser.add_argument("--model", default="random:tiny",
                        help="the model a started server loads (default random:tiny; '' for the embedded one)")
    parser.add_argument("--kvserve-args", default="--dtype float32", help="extra options of the started server")
    parser.add_argument("--concurrency", type=int, default=8, help="workers sending at once")
    parser.add_argument("--max-tokens", type=int, default=48, help="largest max_tokens drawn per request")
    parser.add_argument("--max-rss-growth-mib", type=float, default=64.0,
                        help="the RSS check: most growth allowed, after warm-up to the end")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-only", action="store_true", help="no progress bar or table: only the JSON line")


@dataclass
class Books:
    sent: Counter = field(default_factory=Counter)          # kind → requests sent
    accepted: int = 0                                       # got a 200 / the stream began / a frame
    completed: int = 0                                      # ... and a finish reason
    client_aborts: int = 0                                  # ... or we left on purpose
    abandoned: int = 0                                      # given up before any answer (admitted or not)
    rejected: Counter = field(default_factory=Counter)      # 4xx status → count (bad or overload)
    server_errors: list[str] = field(default_factory=list)  # 5xx, in-band errors included
    lost: list[str] = field(default_factory=list)           # accepted, then neither completed nor aborted
    unexpected: list[str] = field(default_factory=list)     # a good request refused, or a bad one accepted

    def answer(self, kind: str, status: int, detail: str = "") -> bool:
        """Book a status; True when the request was accepted."""
        if status >= 500:
            self.server_errors.append(f"{kind}: {status} {detail[:200]}")
        elif status >= 400:
            self.rejected[status] += 1
            if kind != "bad" and status not in (429, 503):
                self.unexpected.append(f"{kind}: {status} {detail[:200]}")
        elif kind == "bad":
            self.unexpected.append(f"bad request accepted: {status} {detail[:200]}")
        else:
            self.accepted += 1
            return True
        return False


class Traffic:
    def __init__(self, http, url: str, model: str, rng: random.Random, max_tokens: int, books: Books):
        self.http, self.url, self.model, self.rng, self.max_tokens, self.books = http, url, model, rng, max_tokens, books

    def prompt(self) -> str:
        words = " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(3, 30)))
        return self.rng.choice(PREFIXES) + words

    def messages(self) -> list[dict]:
        text = self.prompt()
        if self.rng.random() < 0.2:   # a cache checkpoint on the shared prefix
            return [{"role": "system", "content": [{"type": "text", "text": text[:200],
                                                    "cache_control": {"type": "ephemeral"}}]},
                    {"role": "user", "content": text[200:] or "hello"}]
        return [{"role": "user", "content": text}]

    def tokens(self) -> int:
        return self.rng.randint(1, self.max_tokens)

    async def one(self) -> None:
        kind = self.rng.choices(KINDS, WEIGHTS)[0]
        self.books.sent[kind] += 1
        await getattr(self, kind.replace("-", "_"))(kind)

    # ---- the kinds ----------------------------------------------------------------------------
    async def openai_stream(self, kind: str) -> None:
        body = {"model": self.model, "messages": self.messages(), "max_tokens": self.tokens(), "stream": True,
                "temperature": self.rng.choice([0, 0.8]), "ignore_eos": self.rng.random() < 0.5}
        leave_after = self.rng.randint(1, 4) if self.rng.random() < 0.33 else None
        await self._sse(kind, "/v1/chat/completions", body, leave_after, self._openai_event)

    async def anthropic(self, kind: str) -> None:
        body = {"model": self.model, "max_tokens": self.tokens(), "messages": [{"role": "user", "content": self.prompt()}]}
        if self.rng.random() < 0.5:
            response = await self.http.post(f"{self.url}/v1/messages", json=body)
            if self.books.answer(kind, response.status_code, response.text):
                self._finished(kind, response.json().get("stop_reason") is not None, response.text)
            return
        leave_after = self.rng.randint(1, 4) if self.rng.random() < 0.33 else None
        await self._sse(kind, "/v1/messages", {**body, "stream": True}, leave_after, self._anthropic_event)

    async def openai_whole(self, kind: str) -> None:
        chat = self.rng.random() < 0.6
        path = "/v1/chat/completions" if chat else "/v1/completions"
        body = {"model": self.model, "max_tokens": self.tokens(), "n": self.rng.choice([1, 1, 2])}
        body.update({"messages": self.messages()} if chat else {"prompt": self.prompt()})
        request = self.http.post(f"{self.url}{path}", json=body)
        if self.rng.random() < 0.2:   # the client gives up before the answer: any engine work must be aborted
            try:
                response = await asyncio.wait_for(request, timeout=self.rng.uniform(0.001, 0.05))
            except asyncio.TimeoutError:
                self.books.abandoned += 1
                return
        else:
            response = await request
        if self.books.answer(kind, response.status_code, response.text):
            choices = response.json().get("choices", [])
            self._finished(kind, bool(choices) and all(c.get("finish_reason") for c in choices), response.text)

    async def bedrock(self, kind: str) -> None:
        body = {"messages": [{"role": "user", "content": [{"text": self.prompt()}]}],
                "inferenceConfig": {"maxTokens": self.tokens()}}
        response = await self.http.post(f"{self.url}/model/{self.model}/converse", json=body)
        if self.books.answer(kind, response.status_code, response.text):
            self._finished(kind, bool(response.json().get("stopReason")), response.text)

    async def bad(self, kind: str) -> None:
        content, method, path = self.rng.choice(BAD)
        path = path.replace("/model/m/", f"/model/{self.model}/")
        response = await self.http.request(method, f"{self.url}{path}", content=content,
                                           headers={"content-type": "application/json"})
        self.books.answer(kind, response.status_code, response.text)

    async def websocket(self, kind: str) -> None:
        import websockets

        count = self.rng.randint(1, 4)
        cancel = {f"r{i}" for i in range(count) if self.rng.random() < 0.2}
        close_midway = self.rng.random() < 0.2
        url = self.url.replace("http", "ws", 1) + "/v1/ws"
        pending: set[str] = set()     # sent, not yet resolved
        streaming: set[str] = set()   # ... of which a delta arrived: accepted for sure
        try:
            async with websockets.connect(url, max_size=None, open_timeout=30) as socket:
                for i in range(count):
                    body = {"model": self.model, "messages": self.messages(), "max_tokens": self.tokens()}
                    await socket.send(json.dumps({"type": "request", "id": f"r{i}", "body": body}))
                    pending.add(f"r{i}")
                for request_id in cancel:
                    await socket.send(json.dumps({"type": "cancel", "id": request_id}))
                while pending:
                    if close_midway and pending <= streaming:   # leave with every one of them in flight
                        self.books.accepted += len(pending)
                        self.books.client_aborts += len(pending)
                        return
                    frame = json.loads(await asyncio.wait_for(socket.recv(), timeout=120))
                    request_id = frame.get("id")
                    if request_id not in pending:
                        continue   # e.g. the 404 of a cancel that raced its request's done
                    if frame["type"] == "delta":
                        streaming.add(request_id)
                        continue
                    pending.discard(request_id)
                    if frame["type"] == "done":
                        self.books.accepted += 1
                        self._finished(kind, all(frame["finish_reasons"]), str(frame))
                    elif frame["type"] == "cancelled":
                        self.books.accepted += 1
                        self.books.client_aborts += 1
                    else:
                        self.books.answer(kind, frame["status"], str(frame))
        except (OSError, asyncio.TimeoutError, websockets.WebSocketException) as error:
            self.books.lost += [f"websocket {request_id}: {error!r}" for request_id in sorted(pending)]

    # ---- shared ---------------------------------------------------------------------------------
    async def _sse(self, kind: str, path: str, body: dict, leave_after: int | None, on_event) -> None:
        async with self.http.stream("POST", f"{self.url}{path}", json=body) as response:
            if not self.books.answer(kind, response.status_code, (await response.aread()).decode()
                                     if response.status_code != 200 else ""):
                return
            finished, events = False, 0
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[6:]
                if payload == "[DONE]":
                    break
                event = json.loads(payload)
                if "error" in event and isinstance(event["error"], dict):
                    self.books.server_errors.append(f"{kind}: in-band {event['error']}")
                    return
                finished = finished or on_event(event)
                events += 1
                if leave_after is not None and events >= leave_after and not finished:
                    self.books.client_aborts += 1
                    return   # closing the response disconnects: the server must abort the request
            self._finished(kind, finished, f"{path} stream ended after {events} events")

    @staticmethod
    def _openai_event(event: dict) -> bool:
        return any(choice.get("finish_reason") for choice in event.get("choices", []))

    @staticmethod
    def _anthropic_event(event: dict) -> bool:
        return event.get("type") == "message_stop"

    def _finished(self, kind: str, finished: bool, detail: str) -> None:
        if finished:
            self.books.completed += 1
        else:
            self.books.lost.append(f"{kind}: {detail[:200]}")


async def _traffic(url: str, model: str, args: argparse.Namespace, books: Books, bar: tqdm) -> None:
    import httpx

    deadline = time.monotonic() + args.minutes * 60
    limits = httpx.Limits(max_connections=args.concurrency * 4, max_keepalive_connections=args.concurrency * 2)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        async def worker(index: int) -> None:
            traffic = Traffic(http, url, model, random.Random(args.seed * 1000 + index), args.max_tokens, books)
            while time.monotonic() < deadline:
                try:
                    await traffic.one()
                except httpx.HTTPError as error:
                    books.lost.append(f"transport: {error!r}")
                except ValueError as error:   # an answer that is not the JSON it should be: a finding, not the end
                    books.unexpected.append(f"unparseable answer: {error!r}")
                bar.update(1)

        await asyncio.gather(*(worker(i) for i in range(args.concurrency)))


def rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def server_state(url: str) -> dict:
    """Per model: blocks used, requests left, integrity; and the server's finished-request count."""
    import httpx

    cache = httpx.get(f"{url}/v1/cache", timeout=30).json()["models"]
    totals = Counter()
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        for name in ("kvserve:request_success_total", "kvserve:requests_admitted_total"):
            if line.startswith(name):
                totals[name] += float(line.rsplit(" ", 1)[1])
    return {"models": {name: {"blocks_used": m["blocks"]["used"], "requests": m["requests"],
                              "integrity": m["integrity"]} for name, m in cache.items()},
            "server_admitted": int(totals["kvserve:requests_admitted_total"]),
            "server_finished": int(totals["kvserve:request_success_total"])}


def settle(url: str, timeout_s: float = 60.0) -> dict:
    """The server's state once nothing runs or waits any more (or after the timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = server_state(url)
        idle = all(m["requests"] == {"running": 0, "waiting": 0} and m["blocks_used"] == 0
                   for m in state["models"].values())
        if idle or time.monotonic() > deadline:
            return state
        time.sleep(0.25)


def soak(url: str, model: str, pid: int | None, args: argparse.Namespace) -> dict:
    warm = Books()
    asyncio.run(_warm_up(url, model, warm))
    rss_start = rss_mib(pid)
    books = Books()
    started = time.monotonic()
    curve, stop = [], threading.Event()     # RSS each minute: a line is a leak, a curve that flattens a cache

    def sample() -> None:
        while not stop.wait(60.0):
            curve.append(_round(rss_mib(pid)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with tqdm(desc=f"soak {args.minutes:g} min", unit="req", disable=args.json_only) as bar:
        asyncio.run(_traffic(url, model, args, books, bar))
    stop.set()
    sampler.join()
    wall_s = time.monotonic() - started
    state = settle(url)
    rss_end = rss_mib(pid)
    checks = {
        "no_leaked_blocks": all(m["blocks_used"] == 0 and m["requests"] == {"running": 0, "waiting": 0}
                                and m["integrity"] == "ok" for m in state["models"].values()),
        "no_5xx": not books.server_errors and not warm.server_errors,
        "nothing_lost": not books.lost and books.completed + books.client_aborts == books.accepted,
        "server_finished_all_it_admitted": state["server_finished"] == state["server_admitted"],
        "no_unexpected_answers": not books.unexpected and not warm.unexpected,
        "rss_growth_bounded": rss_start is None or rss_end is None or rss_end - rss_start <= args.max_rss_growth_mib,
    }
    return {"bench": "soak", "minutes": args.minutes, "wall_s": round(wall_s, 1), "seed": args.seed,
            "concurrency": args.concurrency, "requests": sum(books.sent.values()), "by_kind": dict(books.sent),
            "accepted": books.accepted, "completed": books.completed, "client_aborts": books.client_aborts,
            "abandoned_before_an_answer": books.abandoned,
            "rejected_4xx": {str(k): v for k, v in sorted(books.rejected.items())},
            "server_errors": len(books.server_errors), "lost": len(books.lost), "unexpected": len(books.unexpected),
            "server_admitted": state["server_admitted"], "server_finished": state["server_finished"],
            "rss_mib": {"after_warm_up": _round(rss_start), "end": _round(rss_end),
                        "growth": _round(None if rss_start is None or rss_end is None else rss_end - rss_start),
                        "each_minute": curve},
            "state": state["models"], "checks": checks, "passed": all(checks.values()),
            "examples": {"server_errors": books.server_errors[:5], "lost": books.lost[:5],
                         "unexpected": books.unexpected[:5]}}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


async def _warm_up(url: str, model: str, books: Books) -> None:
    """A few requests of each kind first, so that RSS is measured after the allocators grew."""
    import httpx

    async with httpx.AsyncClient(timeout=120) as http:
        traffic = Traffic(http, url, model, random.Random(-1), 16, books)
        for kind in ("openai-stream", "openai-whole", "anthropic", "bedrock", "websocket"):
            for _ in range(3):
                await getattr(traffic, kind.replace("-", "_"))(kind)


def print_summary(result: dict) -> None:
    rows = [("requests", result["requests"]), ("accepted", result["accepted"]), ("completed", result["completed"]),
            ("aborted by their client", result["client_aborts"]), ("4xx", result["rejected_4xx"]),
            ("abandoned before an answer", result["abandoned_before_an_answer"]),
            ("5xx", result["server_errors"]), ("lost", result["lost"]),
            ("server admitted / finished", (result["server_admitted"], result["server_finished"])),
            ("RSS MiB (warm, end, growth)", tuple(result["rss_mib"][k] for k in ("after_warm_up", "end", "growth")))]
    for name, value in rows:
        print(f"  {name:<30} {value}")
    for name, ok in result["checks"].items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")


def run_soak_bench(args: argparse.Namespace) -> int:
    from kvserve.bench.compare import kvserve_command
    from kvserve.bench.serve import first_model
    from kvserve.model.loader import resolve_model_path

    if args.url:
        result = soak(args.url, first_model(args.url, {}), None, args)
    else:
        port = free_port()
        model = args.model or str(resolve_model_path(None))   # '' → the embedded default model
        with running_process(kvserve_command(model, port, args.kvserve_args), port, name="kvserve") as (url, process):
            result = soak(url, first_model(url, {}), process.pid, args)
    if not args.json_only:
        print_summary(result)
    print(json.dumps(result))
    return 0 if result["passed"] else 1
