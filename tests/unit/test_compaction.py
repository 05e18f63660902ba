"""Compaction over a scripted token counter and summariser: under budget every turn, compacting
rarely and deeply, the same prompt prefix reused between compactions, deeper summaries extending
the previous one, tenants kept apart."""

import asyncio

import pytest

from kvserve.routing.compaction import (CompactionError, CompactionPolicy, SummaryStore, compact,
                                        summary_request)


def words(messages) -> int:
    return sum(len(str(m["content"]).split()) + 4 for m in messages)


class Summarizer:
    def __init__(self):
        self.calls = []

    async def __call__(self, previous, turns):
        self.calls.append((previous, len(turns)))
        facts = [m["content"].split(":")[0] for m in turns if m["role"] == "user"]
        return ((previous + "; ") if previous else "") + ", ".join(facts)


def conversation(turns: int):
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    for i in range(turns):
        messages.append({"role": "user", "content": f"fact{i}: the value of item {i} is {i * 7} " + "detail " * 20})
        messages.append({"role": "assistant", "content": f"Noted, item {i} is {i * 7}. " + "ok " * 15})
    return messages


def run(messages, policy, store, summarizer, namespace="t"):
    return asyncio.run(compact(messages, policy, words, summarizer, store, namespace))


def test_thirty_turns_stay_under_budget_compacting_rarely_and_keeping_the_prefix():
    policy = CompactionPolicy(budget_tokens=600, keep_recent=2)
    store, summarizer = SummaryStore(), Summarizer()
    previous_prefix, compactions, reuses = None, 0, 0
    for turn in range(1, 31):
        history = conversation(turn)[:-1]                 # ends with the user's new message
        result = run(history, policy, store, summarizer)
        assert result.tokens_after <= 600 and words(result.messages) == result.tokens_after
        assert result.messages[-1] == history[-1]          # the new message verbatim
        assert result.messages[0]["content"].startswith("You are a helpful assistant.")
        if result.compacted_messages and not result.summary_reused:
            compactions += 1
        elif result.summary_reused:
            reuses += 1
            assert result.messages[0] == previous_prefix   # the same system + summary: cached prefix kept
        previous_prefix = result.messages[0]
    assert 2 <= compactions <= 5, compactions              # rarely: not every turn
    assert reuses >= 15
    assert len(summarizer.calls) == compactions
    assert summarizer.calls[1][0] is not None              # a deeper cut extends the previous summary
    assert "fact0" in previous_prefix["content"] and "fact10" in previous_prefix["content"]


def test_under_budget_nothing_changes():
    history = conversation(2)
    result = run(history, CompactionPolicy(budget_tokens=10_000), SummaryStore(), Summarizer())
    assert result.messages == history and result.compacted_messages == 0 and result.tokens_before == result.tokens_after


def test_tenants_do_not_share_summaries():
    policy = CompactionPolicy(budget_tokens=400)
    store, summarizer = SummaryStore(), Summarizer()
    history = conversation(12)[:-1]
    run(history, policy, store, summarizer, namespace="alice")
    run(history, policy, store, summarizer, namespace="bob")
    assert len(summarizer.calls) == 2
    assert run(history, policy, store, summarizer, namespace="alice").summary_reused


def test_too_long_recent_turns_are_refused_with_a_reason():
    history = [{"role": "user", "content": "word " * 500}]
    with pytest.raises(CompactionError, match="nothing before its last"):
        run(history, CompactionPolicy(budget_tokens=100), SummaryStore(), Summarizer())
    history = conversation(3)[:-1] + [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y " * 900}]
    with pytest.raises(CompactionError, match="too long"):
        run(history, CompactionPolicy(budget_tokens=300), SummaryStore(), Summarizer())


def test_the_store_is_bounded():
    store = SummaryStore(capacity=2)
    for i in range(4):
        store.put("t", [{"role": "user", "content": str(i)}], f"s{i}")
    assert len(store) == 2 and store.get("t", [{"role": "user", "content": "0"}]) is None
    assert store.get("t", [{"role": "user", "content": "3"}]) == "s3"


def test_policy_limits_and_the_summary_request():
    with pytest.raises(ValueError):
        CompactionPolicy(budget_tokens=0)
    with pytest.raises(ValueError):
        CompactionPolicy(budget_tokens=10, target=1.5)
    request = summary_request("earlier", [{"role": "user", "content": "my name is Ada"}], 120)
    assert "earlier" in request[1]["content"] and "USER: my name is Ada" in request[1]["content"]
