"""`kvserve batch INPUT.jsonl -o OUTPUT.jsonl`: a batch file answered without a server.

The input is OpenAI's batch line format (`custom_id`, `method`, `url` = /v1/chat/completions or
/v1/completions, `body`), checked whole before anything runs: a bad file is refused with the line
named, as the server refuses it. The output holds one OpenAI result line per input line
(formats.py), written as each line finishes, then put in input order when the run ends.

Resumable: run the same command again after an interruption and the lines already in OUTPUT are
skipped (a last line cut off midway is dropped and redone). Since batch answers do not depend on
what else runs, greedy or seeded lines give the same text, finish reasons and token counts as an
uninterrupted run; only each response's own `id`, `created` and its cached-token count may differ.

Lines run `concurrency` at a time, in group-key order (lines that share a prompt prefix side by
side, so its KV is computed once), through `execute` (the server's LineExecutor on an in-process
engine). A progress bar shows lines/s and output tokens/s; the last line printed is JSON.
Pure Python: the engine comes in through `execute`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from pathlib import Path

from tqdm import tqdm

from kvserve.batch import formats
from kvserve.batch.requests import ENDPOINTS, BatchInputError, Limits, parse_jsonl, validate_lines
from kvserve.batch.runner import Execute, Retry
from kvserve.batch.store import ANONYMOUS, Line, write_atomically


def read_lines(path: Path, limits: Limits) -> list[tuple[str, Line]]:
    """(endpoint, line) per input line; BatchInputError names a bad one. One model is served
    here, whatever a line names."""
    lines = validate_lines(parse_jsonl(path.read_bytes(), limits), ENDPOINTS, lambda model: True)
    return [(url, Line(line.line_no, line.custom_id, {**line.body, "model": None}, line.group_key))
            for url, line in lines]


def answered(output: Path) -> dict[str, bytes]:
    """custom_id → its result line, from an output file a previous run left (a torn last line is dropped)."""
    done: dict[str, bytes] = {}
    if not output.exists():
        return done
    for raw in output.read_bytes().splitlines(keepends=True):
        if not raw.endswith(b"\n"):
            break
        try:
            done[json.loads(raw)["custom_id"]] = raw
        except (ValueError, KeyError, TypeError):
            break
    return done


async def run(input_path: Path, output: Path, execute: Execute, concurrency: int, limits: Limits,
              show_progress: bool = True) -> dict:
    lines = read_lines(input_path, limits)
    batch_id = "batch_offline_" + hashlib.sha256(input_path.read_bytes()).hexdigest()[:16]
    done = answered(output)
    unknown = set(done) - {line.custom_id for _, line in lines}
    if unknown:
        raise BatchInputError(f"{output} holds answers to custom_ids the input does not have "
                              f"(e.g. {sorted(unknown)[0]!r}); is it the output of another input?")
    todo = sorted(((endpoint, line) for endpoint, line in lines if line.custom_id not in done),
                  key=lambda item: (item[1].group_key, item[1].line_no))
    _keep_complete_lines(output, done)
    started, tokens = time.monotonic(), 0
    bar = tqdm(total=len(lines), initial=len(done), unit="line", disable=not show_progress, desc="batch")
    queue: asyncio.Queue = asyncio.Queue()
    for item in todo:
        queue.put_nowait(item)
    with open(output, "ab") as out:
        async def worker() -> None:
            nonlocal tokens
            while not queue.empty():
                endpoint, line = queue.get_nowait()
                batch = {"id": batch_id, "tenant": ANONYMOUS, "api": "openai", "endpoint": endpoint}
                while True:
                    try:
                        outcome = await execute(batch, line)
                        break
                    except Retry:
                        await asyncio.sleep(0.5)
                ended = Line(line.line_no, line.custom_id, line.body, line.group_key,
                             "succeeded" if outcome.succeeded else "errored", outcome.status_code, outcome.result)
                record = formats.openai_result_line(batch_id, ended)[1]
                out.write(record)
                out.flush()
                done[line.custom_id] = record
                tokens += outcome.output_tokens
                bar.update(1)
                elapsed = max(time.monotonic() - started, 1e-9)
                bar.set_postfix(tok_s=f"{tokens / elapsed:.0f}")

        await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
        os.fsync(out.fileno())
    bar.close()
    write_atomically(output, [done[line.custom_id] for _, line in lines])   # in input order
    wall_s = time.monotonic() - started
    errors = sum(1 for record in done.values() if json.loads(record)["response"] is None
                 or json.loads(record)["response"]["status_code"] != 200)
    return {"bench": "batch", "input": str(input_path), "output": str(output), "lines": len(lines),
            "resumed_from": len(lines) - len(todo), "ran": len(todo), "errors": errors,
            "output_tokens_this_run": tokens, "wall_s": round(wall_s, 2),
            "lines_per_s": round(len(todo) / wall_s, 2) if wall_s else None,
            "output_tok_s": round(tokens / wall_s, 1) if wall_s else None}


def _keep_complete_lines(output: Path, done: dict[str, bytes]) -> None:
    """Drop a torn last line (a run killed mid-write) before appending."""
    if output.exists() and output.stat().st_size != sum(len(r) for r in done.values()):
        write_atomically(output, done.values())
