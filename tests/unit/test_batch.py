"""Batch jobs without an engine: the SQLite store (lines end exactly once, survive a reopen), the
up-front validation (a 400 naming the line), and the runner with a fake executor (ordering,
concurrency, finalization into result files, cancel, expiry, retry, resume after a crash)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from kvserve.batch import formats
from kvserve.batch.requests import BatchInputError, Limits, group_key, parse_jsonl, validate_anthropic, validate_openai
from kvserve.batch.runner import BatchRunner, Outcome, Retry
from kvserve.batch.store import BatchStore, Line

LIMITS = Limits(max_file_bytes=1 << 20, max_line_bytes=4096, max_lines=100)
CHAT = "/v1/chat/completions"


def jsonl(*objects) -> bytes:
    return b"".join((o if isinstance(o, bytes) else json.dumps(o).encode()) + b"\n" for o in objects)


def request(custom_id: str, text: str = "hi", model: str | None = "m", url: str = CHAT) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url,
            "body": {"model": model, "messages": [{"role": "user", "content": text}]}}


def known(name):
    return name in (None, "m")


# ---- validation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("content, line, message", [
    (jsonl(request("a"), b'{"custom_id": "b", "body": '), 2, "not valid JSON"),
    (jsonl(request("a"), b"[1, 2]"), 2, "JSON object"),
    (jsonl(request("a"), request("a")), 2, "used twice"),
    (jsonl(request("a"), request("b", model="nope")), 2, "not served"),
    (jsonl(request("a"), {"custom_id": "b", "method": "GET", "url": CHAT, "body": {}}), 2, "POST"),
    (jsonl(request("a", url="/v1/completions")), 1, "endpoint"),
    (jsonl({"custom_id": "", "url": CHAT, "body": {}}), 1, "custom_id"),
    (jsonl({"custom_id": "x", "url": CHAT, "body": "text"}), 1, "body must be"),
    (jsonl(request("a"), request("b", text="x" * 5000)), 2, "--max-body-bytes"),
    (b"\xff\xfe", 1, "UTF-8"),
])
def test_a_bad_file_is_refused_naming_the_line(content, line, message):
    with pytest.raises(BatchInputError) as refused:
        validate_openai(parse_jsonl(content, LIMITS), CHAT, known)
    assert refused.value.line == line and f"line {line}:" in str(refused.value), str(refused.value)
    assert message in str(refused.value)


def test_file_and_line_count_limits_and_an_empty_file():
    with pytest.raises(BatchInputError, match="max-batch-file-bytes"):
        parse_jsonl(b"x" * (LIMITS.max_file_bytes + 1), LIMITS)
    with pytest.raises(BatchInputError, match="max-batch-lines"):
        parse_jsonl(jsonl(*[request(str(i)) for i in range(101)]), LIMITS)
    with pytest.raises(BatchInputError, match="no requests"):
        parse_jsonl(b"\n\n", LIMITS)
    with pytest.raises(BatchInputError, match="endpoint must be"):
        validate_openai(parse_jsonl(jsonl(request("a")), LIMITS), "/v1/embeddings", known)


def test_anthropic_requests_are_checked_the_same_way():
    good = [{"custom_id": "a", "params": {"model": "m", "max_tokens": 5, "messages": []}}]
    assert [line.custom_id for line in validate_anthropic(good, known, LIMITS)] == ["a"]
    for requests, message in [([], "non-empty"), ([{"custom_id": "a"}], "params"), (good + good, "used twice"),
                              ([{"custom_id": "a", "params": {"model": "zz"}}], "not served")]:
        with pytest.raises(BatchInputError, match=message):
            validate_anthropic(requests, known, LIMITS)


def test_group_keys_put_a_shared_prefix_together():
    a = group_key({"messages": [{"role": "system", "content": "Summarise."}, {"role": "user", "content": "doc 1"}]})
    b = group_key({"messages": [{"role": "system", "content": "Summarise."}, {"role": "user", "content": "doc 2"}]})
    c = group_key({"messages": [{"role": "system", "content": "Classify."}, {"role": "user", "content": "doc 1"}]})
    assert a.startswith("Summarise.") and b.startswith("Summarise.") and sorted([a, c, b])[1:] == sorted([a, b])
    assert group_key({"prompt": "x" * 1000}) == "x" * 256


# ---- the store ----------------------------------------------------------------------------------
def make_batch(store: BatchStore, n: int, api: str = "openai", window_s: float = 3600, keys=None) -> dict:
    lines = [Line(i, f"c{i}", {"i": i}, (keys or {}).get(i, "")) for i in range(n)]
    return store.create_batch(tenant="t", api=api, endpoint=CHAT, completion_window="1h", window_s=window_s,
                              lines=lines)


def test_a_line_ends_exactly_once_and_survives_a_reopen(tmp_path):
    store = BatchStore(tmp_path)
    batch = make_batch(store, 3)
    assert store.finish_line(batch["id"], 1, "succeeded", 200, {"ok": 1}, 5)
    assert not store.finish_line(batch["id"], 1, "errored", 500, {"no": 1})      # already ended
    store.close()
    reopened = BatchStore(tmp_path)
    assert reopened.counts(batch["id"]) == {"pending": 2, "succeeded": 1, "errored": 0, "cancelled": 0, "expired": 0}
    line = [line for line in reopened.lines(batch["id"]) if line.line_no == 1][0]
    assert (line.state, line.status_code, line.result, line.output_tokens) == ("succeeded", 200, {"ok": 1}, 5)
    assert reopened.get_batch(batch["id"], "other-tenant") is None                # tenants see their own only


def test_pending_lines_come_in_group_key_order_and_skip_those_in_flight(tmp_path):
    store = BatchStore(tmp_path)
    batch = make_batch(store, 6, keys={0: "b", 1: "a", 2: "b", 3: "a", 4: "c", 5: "a"})
    assert [line.line_no for line in store.pending_lines(batch["id"], set(), 10)] == [1, 3, 5, 0, 2, 4]
    assert [line.line_no for line in store.pending_lines(batch["id"], {1, 3}, 2)] == [5, 0]


def test_lists_page_newest_first_per_tenant(tmp_path):
    store = BatchStore(tmp_path)
    ids = [make_batch(store, 1)["id"] for _ in range(5)]
    first, more = store.list_batches("t", "openai", None, 2)
    second, _ = store.list_batches("t", "openai", first[-1]["id"], 10)
    assert more and len(first) == 2 and {b["id"] for b in first + second} == set(ids)
    assert store.list_batches("t", "anthropic", None, 10) == ([], False)


def test_files_are_written_whole_and_deleted_with_their_row(tmp_path):
    store = BatchStore(tmp_path)
    row = store.create_file("t", "batch", "in.jsonl", b"abc\n")
    assert store.file_path(row["id"]).read_bytes() == b"abc\n" and row["bytes"] == 4
    assert store.get_file(row["id"], "u") is None
    (store.files_dir / f".{row['id']}x.partial").write_bytes(b"torn")            # a write a crash cut short
    assert store.delete_file(row["id"], "t") and not store.file_path(row["id"]).exists()
    store.close()
    BatchStore(tmp_path).close()
    assert not list(store.files_dir.glob(".*.partial"))


# ---- the runner ---------------------------------------------------------------------------------
class FakeExecutor:
    def __init__(self, delay_s: float = 0.0, fail: set[int] = frozenset(), retry_once: set[int] = frozenset()):
        self.delay_s, self.fail, self.retry_once = delay_s, set(fail), set(retry_once)
        self.calls: list[int] = []
        self.in_flight = self.peak = 0

    async def __call__(self, batch: dict, line: Line) -> Outcome:
        self.calls.append(line.line_no)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
            if line.line_no in self.retry_once:
                self.retry_once.discard(line.line_no)
                raise Retry("engine restarting")
            if line.line_no in self.fail:
                return Outcome(False, 400, {"error": {"message": "bad"}})
            return Outcome(True, 200, {"echo": line.body}, 3)
        finally:
            self.in_flight -= 1


async def run_until(store: BatchStore, runner: BatchRunner, batch_id: str, statuses: set[str],
                    timeout_s: float = 20.0) -> dict:
    runner.start()
    deadline = time.monotonic() + timeout_s
    try:
        while store.get_batch(batch_id)["status"] not in statuses:
            assert time.monotonic() < deadline, store.get_batch(batch_id)
            await asyncio.sleep(0.02)
    finally:
        await runner.stop()
    return store.get_batch(batch_id)


def test_a_batch_runs_every_line_once_within_the_concurrency_and_writes_its_result_files(tmp_path):
    store = BatchStore(tmp_path)
    batch = make_batch(store, 20)
    executor = FakeExecutor(delay_s=0.01, fail={3, 7}, retry_once={5})
    done = asyncio.run(run_until(store, BatchRunner(store, executor, concurrency=4), batch["id"], {"completed"}))
    assert sorted(set(executor.calls)) == list(range(20)) and len(executor.calls) == 21   # 5 once more (retry)
    assert executor.peak <= 4
    for status in ("in_progress_at", "finalizing_at", "completed_at"):
        assert done[status] is not None
    output = [json.loads(x) for x in store.file_path(done["output_file_id"]).read_text().splitlines()]
    errors = [json.loads(x) for x in store.file_path(done["error_file_id"]).read_text().splitlines()]
    assert [r["custom_id"] for r in output] == [f"c{i}" for i in range(20) if i not in (3, 7)]
    assert [r["custom_id"] for r in errors] == ["c3", "c7"] and errors[0]["response"]["status_code"] == 400
    assert output[0]["response"]["body"] == {"echo": {"i": 0}} and output[0]["id"].startswith("batch_req_")
    counts = formats.openai_batch(done, store.counts(batch["id"]))["request_counts"]
    assert counts == {"total": 20, "completed": 18, "failed": 2}


def test_cancel_aborts_lines_in_flight_and_keeps_what_finished(tmp_path):
    store = BatchStore(tmp_path)
    batch = make_batch(store, 30)

    async def scenario():
        runner = BatchRunner(store, FakeExecutor(delay_s=0.2), concurrency=3)
        runner.start()
        while store.counts(batch["id"])["succeeded"] < 3:
            await asyncio.sleep(0.02)
        store.set_status(batch["id"], "cancelling")
        runner.wake()
        return await run_until(store, runner, batch["id"], {"cancelled"})

    done = asyncio.run(scenario())
    counts = store.counts(batch["id"])
    assert counts["pending"] == 0 and counts["succeeded"] >= 3 and counts["cancelled"] >= 20
    errors = [json.loads(x) for x in store.file_path(done["error_file_id"]).read_text().splitlines()]
    assert {r["error"]["code"] for r in errors} == {"batch_cancelled"}


def test_an_expired_batch_keeps_its_finished_lines(tmp_path):
    store = BatchStore(tmp_path)
    batch = make_batch(store, 40, window_s=3)   # (whole seconds, as OpenAI's timestamps): 2-3 s
    done = asyncio.run(run_until(store, BatchRunner(store, FakeExecutor(delay_s=0.2), concurrency=2), batch["id"],
                                 {"expired"}))
    counts = store.counts(batch["id"])
    assert done["expired_at"] is not None and counts["pending"] == 0
    assert 0 < counts["succeeded"] < 40 and counts["expired"] == 40 - counts["succeeded"]


def test_a_new_runner_resumes_where_a_killed_one_was_and_reruns_no_finished_line(tmp_path):
    store = BatchStore(tmp_path)
    batch = make_batch(store, 12)
    first = FakeExecutor(delay_s=0.05)

    async def crash():   # a runner that dies mid-job: its tasks vanish, nothing is written for them
        runner = BatchRunner(store, first, concurrency=3)
        runner.start()
        while store.counts(batch["id"])["succeeded"] < 5:
            await asyncio.sleep(0.01)
        await runner.stop()

    asyncio.run(crash())
    finished = {line.line_no for line in store.lines(batch["id"]) if line.state == "succeeded"}
    second = FakeExecutor()
    store.close()   # as the killed process's lock goes with it
    reopened = BatchStore(tmp_path)
    asyncio.run(run_until(reopened, BatchRunner(reopened, second, concurrency=3), batch["id"], {"completed"}))
    assert not finished & set(second.calls)                        # finished lines never ran again
    assert sorted(finished | set(second.calls)) == list(range(12))  # every line answered


# ---- the background governor --------------------------------------------------------------------
def test_the_governor_keeps_steps_with_background_work_near_the_target():
    from kvserve.sched.cost import BackgroundGovernor

    governor = BackgroundGovernor(factor=2.0, maximum=64)
    assert governor.allowance() == 64 and governor.target_s is None
    governor.observe(0.020, 0)                                   # a foreground step alone: the floor
    assert governor.target_s == 0.040
    for step in range(200):                                      # a machine where a step costs 20 ms + 1 ms a unit,
        units = governor.allowance() if step % 10 else 0         # and now and then a foreground step alone
        governor.observe(0.020 + 0.001 * units, units)
    assert 10 <= governor.allowance() <= 20                       # settles just under 20 units (a 40 ms step)
    before = governor.allowance()
    governor.observe(0.5, 0)                                      # steps without background work do not move it,
    governor.observe(0.9, 10, governed=False)                     # nor steps planned without the budget
    assert governor.allowance() == before and governor.target_s == 0.040
    assert BackgroundGovernor.units(3, 8) == 5.0


# ---- review findings: the runner never loops forever, transitions never overwrite a cancel -------------
def test_a_line_that_keeps_failing_unexpectedly_ends_as_an_error_record(tmp_path, monkeypatch):
    import kvserve.batch.runner as runner_module

    monkeypatch.setattr(runner_module, "RETRY_DELAY_S", 0.01)
    store = BatchStore(tmp_path)
    batch = make_batch(store, 3)

    class Broken(FakeExecutor):
        async def __call__(self, batch, line):
            if line.line_no == 1:
                self.calls.append(1)
                raise KeyError("a bug this line triggers")
            return await super().__call__(batch, line)

    executor = Broken()
    done = asyncio.run(run_until(store, BatchRunner(store, executor, concurrency=2), batch["id"], {"completed"}))
    assert executor.calls.count(1) == runner_module.MAX_LINE_FAILURES
    [bad] = [json.loads(x) for x in store.file_path(done["error_file_id"]).read_text().splitlines()]
    assert bad["custom_id"] == "c1" and bad["response"]["status_code"] == 500


def test_a_batch_whose_results_cannot_be_written_ends_failed(tmp_path, monkeypatch):
    import kvserve.batch.runner as runner_module

    def full_disk(path, chunks):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runner_module, "write_atomically", full_disk)
    store = BatchStore(tmp_path)
    batch = make_batch(store, 2)
    done = asyncio.run(run_until(store, BatchRunner(store, FakeExecutor(), concurrency=2), batch["id"], {"failed"}))
    assert done["failed_at"] and "No space left" in json.dumps(done["errors"])


def test_status_changes_are_conditional(tmp_path):
    store = BatchStore(tmp_path)
    batch = make_batch(store, 1)
    assert store.set_status(batch["id"], "cancelling", expect=("validating", "in_progress"))
    assert not store.set_status(batch["id"], "in_progress", expect=("validating",))   # a stale runner's step
    assert store.get_batch(batch["id"])["status"] == "cancelling"


def test_one_state_directory_one_server(tmp_path):
    from kvserve.batch.store import StateDirBusy

    first = BatchStore(tmp_path)
    with pytest.raises(StateDirBusy, match="in use by pid"):
        BatchStore(tmp_path)
    first.close()
    BatchStore(tmp_path).close()                                  # free again once its holder is gone
