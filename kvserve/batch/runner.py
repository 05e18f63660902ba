"""The batch runner: pending lines → engine requests at background priority, results → the store.

    store.active_batches() ──▶ validating → in_progress; keep up to `concurrency` lines in flight,
        (oldest batch first)    taken in group-key order (lines sharing a prefix side by side)
    a line ends             ──▶ store.finish_line (committed) ──▶ counted; its slot refills at once
    no line left            ──▶ finalizing → result files (OpenAI) → completed
    cancel                  ──▶ cancelling: lines in flight aborted, pending ones cancelled → cancelled
    past expires_at         ──▶ lines in flight aborted, pending ones expired → expired (finished kept)

The runner never holds anything the store does not: after a crash (SIGKILL) it starts from the
store, where lines that were in flight are still pending, so each runs again and finished ones
never do. A line is executed by `execute(batch, line) -> Outcome`, given by the server (it turns
the body into a background engine request and the answer into the API's result shape), which
keeps this package free of the engine and of torch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from kvserve.batch import formats
from kvserve.batch.store import BatchStore, Line, write_atomically

log = logging.getLogger(__name__)

TICK_S = 0.25   # how often the runner looks at the store when nothing wakes it


@dataclass(frozen=True)
class Outcome:
    succeeded: bool
    status_code: int
    result: Any                   # the response body (OpenAI) or result object (Anthropic)
    output_tokens: int = 0


class Retry(Exception):
    """The line could not run now (the engine is loading, draining, restarting or full): it stays
    pending and is taken again later, without an error record."""


Execute = Callable[[dict, Line], Awaitable[Outcome]]
RETRY_DELAY_S = 1.0
ENDS_FROM = {"completed": ("finalizing",), "cancelled": ("cancelling",), "expired": ("in_progress",)}
MAX_LINE_FAILURES = 3   # unexpected failures of one line (or of writing a batch's results) before it errs


@dataclass
class RunnerStats:
    lines_finished: int = 0       # since start
    output_tokens: int = 0        # since start


class BatchRunner:
    def __init__(self, store: BatchStore, execute: Execute, concurrency: int):
        self.store = store
        self.execute = execute
        self.concurrency = concurrency
        self.stats = RunnerStats()
        self._in_flight: dict[str, dict[int, asyncio.Task]] = {}   # batch id → line no → its task
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._failures: dict[tuple[str, int], int] = {}   # unexpected failures per line, in this process
        self._finalize_failures: dict[str, int] = {}

    # ---- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="kvserve-batch-runner")

    async def stop(self) -> None:
        """Stop taking lines and abort those in flight (they stay pending: a restart runs them)."""
        self._stopping = True   # the loop ends at its next turn even if the cancel lands in a wait
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._abort(list(self._in_flight))

    def wake(self) -> None:
        self._wake.set()

    @property
    def num_running(self) -> int:
        return sum(len(tasks) for tasks in self._in_flight.values())

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()   # before the tick: a wake() during it is kept for the wait below
            try:
                await self._tick()
            except Exception:   # a bad batch must not stop the others; the store keeps the state
                log.exception("the batch runner's tick failed; retrying")
            try:
                async with asyncio.timeout(TICK_S):
                    await self._wake.wait()
            except TimeoutError:
                pass

    # ---- one look at the store --------------------------------------------------------------------
    async def _tick(self) -> None:
        """Each active batch, oldest first, read afresh right before acting on it (a cancel may
        land while the tick awaits another batch's end); every transition is conditional on the
        status it leaves, so a concurrent cancel is never overwritten."""
        free = self.concurrency - self.num_running
        for batch_id in [batch["id"] for batch in self.store.active_batches()]:
            batch = self.store.get_batch(batch_id)
            if batch["status"] == "validating" and self.store.set_status(batch_id, "in_progress", expect=("validating",)):
                batch = self.store.get_batch(batch_id)
            status = batch["status"]
            if status == "cancelling":
                await self._end(batch, "cancelled", "cancelled")
            elif status == "finalizing":
                await self._finalize(batch, "completed")
            elif status == "in_progress" and time.time() >= batch["expires_at"]:
                await self._end(batch, "expired", "expired")
            elif status == "in_progress":
                free -= self._fill(batch, free)
                if not self._in_flight.get(batch_id) and not self.store.counts(batch_id)["pending"]:
                    if self.store.set_status(batch_id, "finalizing", expect=("in_progress",)):
                        await self._finalize(self.store.get_batch(batch_id), "completed")

    def _fill(self, batch: dict, free: int) -> int:
        if free <= 0 or self._stopping:
            return 0
        tasks = self._in_flight.setdefault(batch["id"], {})
        lines = self.store.pending_lines(batch["id"], set(tasks), free)
        for line in lines:
            tasks[line.line_no] = asyncio.get_running_loop().create_task(self._run_line(batch, line))
        return len(lines)

    async def _run_line(self, batch: dict, line: Line) -> None:
        try:
            outcome = await self.execute(batch, line)
            state = "succeeded" if outcome.succeeded else "errored"
            if self.store.finish_line(batch["id"], line.line_no, state, outcome.status_code, outcome.result,
                                      outcome.output_tokens):
                self.stats.lines_finished += 1
                self.stats.output_tokens += outcome.output_tokens
        except asyncio.CancelledError:
            raise   # aborted (cancel, expiry, shutdown): the line stays pending
        except Retry as reason:
            log.info("batch %s line %d: %s; it stays pending", batch["id"], line.line_no, reason)
            await asyncio.sleep(RETRY_DELAY_S)
        except Exception as error:   # a bug the line triggers: a few tries, then its own error record
            key = (batch["id"], line.line_no)
            self._failures[key] = self._failures.get(key, 0) + 1
            log.exception("batch %s line %d failed unexpectedly (try %d of %d)", batch["id"], line.line_no,
                          self._failures[key], MAX_LINE_FAILURES)
            if self._failures[key] >= MAX_LINE_FAILURES:
                self.store.finish_line(batch["id"], line.line_no, "errored", 500, {"error": {
                    "message": f"the server could not run this request ({type(error).__name__})",
                    "type": "server_error", "param": None, "code": "internal_error"}})
                self._failures.pop(key)
            else:
                await asyncio.sleep(RETRY_DELAY_S)   # no hot loop on a line that keeps failing
        finally:
            tasks = self._in_flight.get(batch["id"], {})
            tasks.pop(line.line_no, None)
            self.wake()

    # ---- ends ---------------------------------------------------------------------------------------
    async def _end(self, batch: dict, line_state: str, status: str) -> None:
        await self._abort([batch["id"]])
        self.store.end_pending(batch["id"], line_state)
        await self._finalize(batch, status)

    async def _abort(self, batch_ids: list[str]) -> None:
        tasks = [task for batch_id in batch_ids for task in self._in_flight.pop(batch_id, {}).values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _finalize(self, batch: dict, status: str) -> None:
        """Write the OpenAI result files (Anthropic reads results from the store), then the end
        status. A batch whose files cannot be written (a full disk, say) is retried a few times,
        then ends `failed` with the reason."""
        fields: dict[str, Any] = {}
        try:
            if batch["api"] == "openai":
                fields = await asyncio.to_thread(self._write_result_files, batch)
        except Exception as error:
            self._finalize_failures[batch["id"]] = self._finalize_failures.get(batch["id"], 0) + 1
            log.exception("batch %s: writing its results failed (try %d of %d)", batch["id"],
                          self._finalize_failures[batch["id"]], MAX_LINE_FAILURES)
            if self._finalize_failures[batch["id"]] < MAX_LINE_FAILURES:
                return
            status, fields = "failed", {"errors": json.dumps({"object": "list", "data": [
                {"code": "finalize_failed", "message": f"the results could not be written: {error}"}]})}
        self.store.set_status(batch["id"], status, expect=ENDS_FROM.get(status), **fields)
        self._in_flight.pop(batch["id"], None)
        self._finalize_failures.pop(batch["id"], None)
        log.info("batch %s %s: %s", batch["id"], status, self.store.counts(batch["id"]))

    def _write_result_files(self, batch: dict) -> dict:
        """The output file (the 200s) and the error file (the rest), each written in one pass over
        the lines (never all of them in memory)."""
        fields = {}
        for name, to_output, column in (("output", True, "output_file_id"), ("errors", False, "error_file_id")):
            records = (record for is_output, record in
                       (formats.openai_result_line(batch["id"], line) for line in self.store.lines(batch["id"]))
                       if is_output is to_output)
            file_id = f"file-{batch['id'].removeprefix('batch_')}-{name}"
            size = write_atomically(self.store.file_path(file_id), records)
            if not size:
                self.store.file_path(file_id).unlink(missing_ok=True)
                continue
            if self.store.get_file(file_id, batch["tenant"]) is None:   # a finalize again after a crash
                self.store.add_file_row(file_id, batch["tenant"], "batch_output", f"{batch['id']}_{name}.jsonl", size)
            fields[column] = file_id
        return fields
