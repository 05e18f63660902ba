"""Seeded chat workloads for `kvserve bench serve`: the shapes of docs/benchmarks (design/benchmarks.md).

A workload is a list of sessions; a session is a list of turns sent one after another (a single
request for most workloads, a growing conversation for multi-turn). The client runs sessions
concurrently. Text is drawn from a fixed list of common English words (no downloads), so the same
seed always gives the same prompts, byte for byte.

Prompt lengths are approximate and counted in words: each word of the list is one token in most
BPE vocabularies (a leading space included), so words ≈ tokens; a byte-level tokenizer (random:tiny)
sees about 5.5 tokens per word, hence `prompt_scale` to shrink every prompt for small contexts.

    workload        sessions × turns          prompt (words)                     output   concurrency
    latency         N × 1                     ~60                                128      1
    throughput      N × 1                     ~250 (±20%), all distinct           128      32
    shared-prefix   N × 1                     ~1,100 shared system + ~20 question 48       8
    multi-turn      N/4 × 4                   ~100, then ~40 per turn + history   64       8
    doc-qa          N × 1 over 4 documents    ~1,500 document (cache_control) +   32       8
                                              ~20 question
    mixed-priority  N × 1, 1 in 4 interactive background ~500 (priority 10),      128 /    16
                                              interactive ~40 (priority 0)        32
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field

# One token each in the common BPE vocabularies (with a leading space). Fixed: changing it changes every workload.
WORDS = tuple("""
the of and to in is was for on are with as his they be at one have this from or had by word but what some
we can out other were all there when up use your how said an each she which do their time if will way about
many then them write would like so these her long make thing see him two has look more day could go come did
number sound no most people my over know water than call first who may down side been now find any new work
part take get place made live where after back little only round man year came show every good me give our
under name very through just form sentence great think say help low line differ turn cause much mean before
move right boy old too same tell does set three want air well also play small end put home read hand port
large spell add even land here must big high such follow act why ask men change went light kind off need
house picture try us again animal point mother world near build self earth father head stand own page should
country found answer school grow study still learn plant cover food sun four between state keep eye never
last let thought city tree cross farm hard start might story saw far sea draw left late run while press
close night real life few north open seem together next white children begin got walk example ease paper
group always music those both mark often letter until mile river car feet care second book carry took
science eat room friend began idea fish mountain stop once base hear horse cut sure watch color face wood
main enough plain girl usual young ready above ever red list though feel talk bird soon body dog family
direct pose leave song measure door product black short numeral class wind question happen complete ship
area half rock order fire south problem piece told knew pass since top whole king space heard best hour
better true during hundred five remember step early hold west ground interest reach fast verb sing listen
six table travel less morning ten simple several vowel toward war lay against pattern slow center love
person money serve appear road map rain rule govern pull cold notice voice energy hunt probable bed brother
egg ride cell believe perhaps pick sudden count square reason length represent art subject region size
""".split())

WORKLOADS = ("latency", "throughput", "shared-prefix", "multi-turn", "doc-qa", "mixed-priority")
TURNS_PER_CONVERSATION = 4
NUM_DOCUMENTS = 4


@dataclass(frozen=True)
class WorkloadDefaults:
    num_requests: int
    concurrency: int
    max_tokens: int


DEFAULTS = {
    "latency": WorkloadDefaults(16, 1, 128),
    "throughput": WorkloadDefaults(64, 32, 128),
    "shared-prefix": WorkloadDefaults(48, 8, 48),
    "multi-turn": WorkloadDefaults(32, 8, 64),
    "doc-qa": WorkloadDefaults(32, 8, 32),
    "mixed-priority": WorkloadDefaults(48, 16, 128),
}


@dataclass(frozen=True)
class Turn:
    """One request: the new messages it appends to its session's history, and its options."""
    messages: tuple[dict, ...]
    max_tokens: int
    request_class: str = "default"      # reported separately (mixed-priority: background / interactive)
    priority: int | None = None         # sent as `priority` when set (lower first, as vLLM)


@dataclass(frozen=True)
class Session:
    """Turns sent in order; each turn's prompt is the whole history so far, previous answers included."""
    turns: tuple[Turn, ...] = field(default_factory=tuple)


class TextSource:
    """Seeded word streams: `text(n)` gives about n words, `sentence(n)` a question-like line."""

    def __init__(self, seed: int, prompt_scale: float):
        self.rng = random.Random(seed)
        self.prompt_scale = prompt_scale

    def num_words(self, mean: int, jitter: float = 0.0) -> int:
        return max(1, round(mean * self.prompt_scale * self.rng.uniform(1 - jitter, 1 + jitter)))

    def text(self, mean: int, jitter: float = 0.0) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(self.num_words(mean, jitter)))

    def question(self, mean: int) -> str:
        return self.text(mean, jitter=0.3).capitalize() + "?"


def user(content: str | list[dict]) -> dict:
    return {"role": "user", "content": content}


def build_workload(name: str, num_requests: int, max_tokens: int, seed: int,
                   prompt_scale: float = 1.0) -> list[Session]:
    """The sessions of one workload: num_requests requests in all, deterministic in (name, seed, scale)."""
    source = TextSource(seed, prompt_scale)
    single = lambda messages, **options: Session((Turn(tuple(messages), max_tokens, **options),))  # noqa: E731
    if name == "latency":
        return [single([user(source.text(60, 0.2))]) for _ in range(num_requests)]
    if name == "throughput":
        return [single([user(source.text(250, 0.2))]) for _ in range(num_requests)]
    if name == "shared-prefix":
        system = {"role": "system", "content": source.text(1100)}
        return [single([system, user(source.question(20))]) for _ in range(num_requests)]
    if name == "multi-turn":
        return _multi_turn(source, num_requests, max_tokens)
    if name == "doc-qa":
        documents = [source.text(1500) for _ in range(NUM_DOCUMENTS)]
        sessions = []
        for i in range(num_requests):
            content = [{"type": "text", "text": documents[i % NUM_DOCUMENTS], "cache_control": {"type": "ephemeral"}},
                       {"type": "text", "text": "\n\n" + source.question(20)}]
            sessions.append(single([user(content)]))
        source.rng.shuffle(sessions)
        return sessions
    if name == "mixed-priority":
        interactive_tokens = max(1, max_tokens // 4)
        sessions = []
        for i in range(num_requests):
            if i % 4 == 3:
                sessions.append(Session((Turn((user(source.question(40)),), interactive_tokens,
                                              "interactive", priority=0),)))
            else:
                sessions.append(single([user(source.text(500, 0.2))], request_class="background", priority=10))
        return sessions
    raise ValueError(f"unknown workload {name!r}; expected one of {', '.join(WORKLOADS)}")


def _multi_turn(source: TextSource, num_requests: int, max_tokens: int) -> list[Session]:
    """Conversations of TURNS_PER_CONVERSATION turns (the last one shorter when num_requests is not a multiple)."""
    sessions = []
    for start in range(0, num_requests, TURNS_PER_CONVERSATION):
        num_turns = min(TURNS_PER_CONVERSATION, num_requests - start)
        turns = [Turn((user(source.text(100, 0.2)),), max_tokens)]
        turns += [Turn((user(source.question(40)),), max_tokens) for _ in range(num_turns - 1)]
        sessions.append(Session(tuple(turns)))
    return sessions


def workload_digest(sessions: list[Session]) -> str:
    """sha256 (16 hex digits) of every turn as built (before answers): equal digests, equal prompts."""
    data = [[{"messages": turn.messages, "max_tokens": turn.max_tokens, "priority": turn.priority}
             for turn in session.turns] for session in sessions]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
