"""Compaction of long conversations: rarely, deeply, and so that the cached prefix survives.

A conversation over its budget is not refused (when the client allows compaction): its older
turns are replaced by a summary the small model writes, and the recent turns stay verbatim:

    [system] [summary of turns 0..c) ] [turn c] ... [turn n]      (the system prompt is kept)

Clients resend the whole history every turn, so the same cut must be found again next turn;
otherwise each turn would summarise a slightly different history, change the prompt's start, and
lose every cached block after the system prompt (a compaction that fires on every turn is a
defect). Hence:

  - summaries are stored by the hash of the history they replace (scoped by tenant and model), and
    the longest stored cut that still fits the budget is reused as it is: the prompt keeps the
    same prefix turn after turn, and only grows at its end;
  - when none fits, the new cut is deep: the result is brought down to `target` (half the budget
    by default), so the next compaction waits until the conversation has grown by the other half;
  - a deeper cut extends the previous summary (old summary + the turns newly cut) instead of
    re-reading the whole history.

Messages are OpenAI-shaped dicts ({"role", "content": str}); the token counter and the summariser
are given by the caller (a chat template + tokenizer; the small model), so this module runs no
model and imports no torch.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

SUMMARY_HEADER = "Summary of the earlier conversation (written by the assistant to keep the facts):"


class CompactionError(ValueError):
    """The conversation cannot be brought under the budget (its recent turns alone exceed it)."""


@dataclass(frozen=True)
class CompactionPolicy:
    budget_tokens: int                  # compact when the prompt exceeds this
    target: float = 0.5                 # a new cut brings the prompt down to this share of the budget
    keep_recent: int = 2                # messages always kept verbatim at the end (the last turn at least)

    def __post_init__(self) -> None:
        if self.budget_tokens < 1:
            raise ValueError("the compaction budget must be at least 1 token")
        if not 0.0 < self.target <= 1.0:
            raise ValueError("the compaction target must be in (0, 1]")
        if self.keep_recent < 1:
            raise ValueError("at least the last message is kept")


@dataclass
class Compacted:
    """What the model sees, and what `usage.compaction` reports."""

    messages: list[dict]
    tokens_before: int
    tokens_after: int
    compacted_messages: int = 0         # history messages the summary stands for (0: not compacted)
    summary_reused: bool = False
    summary_tokens: int = 0

    def usage(self) -> dict:
        return {"tokens_before": self.tokens_before, "tokens_after": self.tokens_after,
                "compacted_messages": self.compacted_messages, "summary_reused": self.summary_reused}


@dataclass
class SummaryStore:
    """Summaries by (namespace, hash of the history they replace); least recently used dropped."""

    capacity: int = 1024
    _entries: OrderedDict = field(default_factory=OrderedDict)

    def get(self, namespace: str, history: list[dict]) -> str | None:
        key = (namespace, history_hash(history))
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        return None

    def put(self, namespace: str, history: list[dict], summary: str) -> None:
        key = (namespace, history_hash(history))
        self._entries[key] = summary
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


def history_hash(messages: list[dict]) -> str:
    canonical = json.dumps([{"role": m.get("role"), "content": m.get("content")} for m in messages],
                           sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


CountTokens = Callable[[list[dict]], int]
Summarize = Callable[[str | None, list[dict]], Awaitable[str]]    # (previous summary, turns) → summary


async def compact(messages: list[dict], policy: CompactionPolicy, count_tokens: CountTokens,
                  summarize: Summarize, store: SummaryStore, namespace: str) -> Compacted:
    """`messages` as the model should see them, under policy.budget_tokens."""
    before = count_tokens(messages)
    if before <= policy.budget_tokens:
        return Compacted(list(messages), before, before)
    head = 1 if messages and messages[0].get("role") == "system" else 0
    system = messages[0] if head else None
    turns = messages[head:]
    last_cut = len(turns) - policy.keep_recent          # the most that may be summarised
    cuts = [c for c in range(1, last_cut + 1) if _starts_turn(turns, c)]
    if not cuts:
        raise CompactionError(f"the conversation has {before} tokens, over the budget of {policy.budget_tokens}, "
                              f"and nothing before its last {policy.keep_recent} messages to compact")

    # 1. The deepest stored cut whose result fits: the same prompt prefix as last turn.
    for cut in reversed(cuts):
        summary = store.get(namespace, messages[:head + cut])
        if summary is None:
            continue
        candidate = _assemble(system, summary, turns[cut:])
        tokens = count_tokens(candidate)
        if tokens <= policy.budget_tokens:
            return Compacted(candidate, before, tokens, compacted_messages=head + cut, summary_reused=True)
        previous = (cut, summary)
        break
    else:
        previous = None

    # 2. A new, deep cut: the shallowest one that brings the prompt under the target (a summary
    #    is budgeted at a quarter of it), else the deepest allowed.
    target = int(policy.budget_tokens * policy.target)
    reserve = max(1, target // 4)
    start = previous[0] if previous else 0
    chosen = cuts[-1]
    for cut in cuts:
        if cut <= start:
            continue
        if count_tokens(_assemble(system, "x", turns[cut:])) + reserve <= target:
            chosen = cut
            break
    if chosen <= start:
        raise CompactionError(f"the conversation has {before} tokens, over the budget of {policy.budget_tokens}, "
                              f"and its last {len(turns) - start} messages alone are too long to fit")
    summary = await summarize(previous[1] if previous else None, turns[start:chosen])
    store.put(namespace, messages[:head + chosen], summary)
    result = _assemble(system, summary, turns[chosen:])
    tokens = count_tokens(result)
    if tokens > policy.budget_tokens:
        raise CompactionError(f"compacted to {tokens} tokens, still over the budget of {policy.budget_tokens}: "
                              f"the last {len(turns) - chosen} messages alone are too long")
    return Compacted(result, before, tokens, compacted_messages=head + chosen)


def _starts_turn(turns: list[dict], cut: int) -> bool:
    """A cut falls before a user message, so the kept turns start with the user speaking."""
    return turns[cut].get("role") == "user"


def _assemble(system: dict | None, summary: str, kept: list[dict]) -> list[dict]:
    block = f"{SUMMARY_HEADER}\n{summary}"
    if system is not None:
        return [{"role": "system", "content": f"{system['content']}\n\n{block}"}, *kept]
    return [{"role": "system", "content": block}, *kept]


def summary_request(previous: str | None, turns: list[dict], max_words: int) -> list[dict]:
    """The messages that ask the small model for a summary (kept short and factual)."""
    transcript = "\n".join(f"{m['role'].upper()}: {m['content']}" for m in turns)
    earlier = f"Summary so far:\n{previous}\n\n" if previous else ""
    return [{"role": "system", "content": "You write compact, factual summaries of conversations."},
            {"role": "user", "content":
                f"{earlier}Conversation to add:\n{transcript}\n\nWrite one summary of everything above in at most "
                f"{max_words} words. Keep every name, number, date, preference, decision and open question that "
                "was stated, as plain sentences. Do not add anything."}]
