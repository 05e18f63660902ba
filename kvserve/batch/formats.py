"""The wire shapes of batch jobs: OpenAI's Batch and File objects and result lines, Anthropic's
MessageBatch object and result lines. Stored rows in, JSON-ready dicts out. Pure Python.

OpenAI result lines (the output file holds the 200s, the error file everything else):

    {"id": "batch_req_…", "custom_id": "…", "response": {"status_code": 200, "request_id": "…",
     "body": {<the /v1/chat/completions or /v1/completions response>}}, "error": null}
    {"id": "batch_req_…", "custom_id": "…", "response": {"status_code": 400, "request_id": "…",
     "body": {"error": {…}}}, "error": null}                      a line the engine refused
    {"id": "batch_req_…", "custom_id": "…", "response": null,
     "error": {"code": "batch_expired" | "batch_cancelled", "message": "…"}}

Anthropic result lines (GET /v1/messages/batches/{id}/results, in submission order):

    {"custom_id": "…", "result": {"type": "succeeded", "message": {…}}}
    {"custom_id": "…", "result": {"type": "errored", "error": {"type": "error", "error": {…}}}}
    {"custom_id": "…", "result": {"type": "canceled"}} | {"type": "expired"}
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Any

from kvserve.batch.store import Line

OPENAI_STATUSES = ("validating", "in_progress", "finalizing", "completed", "failed", "expired", "cancelling",
                   "cancelled")


def file_object(row: dict) -> dict:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed", "expires_at": None,
            "status_details": None}


def openai_batch(batch: dict, counts: dict[str, int]) -> dict:
    total = sum(counts.values())
    return {
        "id": batch["id"], "object": "batch", "endpoint": batch["endpoint"], "errors": batch["errors"],
        "input_file_id": batch["input_file_id"], "completion_window": batch["completion_window"],
        "status": batch["status"], "output_file_id": batch["output_file_id"], "error_file_id": batch["error_file_id"],
        "created_at": batch["created_at"], "in_progress_at": batch["in_progress_at"],
        "expires_at": batch["expires_at"], "finalizing_at": batch["finalizing_at"],
        "completed_at": batch["completed_at"], "failed_at": batch["failed_at"], "expired_at": batch["expired_at"],
        "cancelling_at": batch["cancelling_at"], "cancelled_at": batch["cancelled_at"],
        "request_counts": {"total": total, "completed": counts["succeeded"], "failed": total - counts["succeeded"]
                           - counts["pending"]},
        "metadata": batch["metadata"],
    }


def request_id(batch_id: str, line: Line) -> str:
    """A stable id per line (the same after a restart, and in the offline CLI's output)."""
    return "batch_req_" + hashlib.sha256(f"{batch_id}\0{line.custom_id}".encode()).hexdigest()[:24]


def openai_result_line(batch_id: str, line: Line) -> tuple[bool, bytes]:
    """(goes to the output file, the JSONL line): 200s to the output file, the rest to the error file."""
    rid = request_id(batch_id, line)
    if line.state in ("succeeded", "errored"):
        record = {"id": rid, "custom_id": line.custom_id,
                  "response": {"status_code": line.status_code, "request_id": rid, "body": line.result},
                  "error": None}
    else:
        code = "batch_expired" if line.state == "expired" else "batch_cancelled"
        message = ("the batch expired before this request ran" if line.state == "expired"
                   else "the batch was cancelled before this request ran")
        record = {"id": rid, "custom_id": line.custom_id, "response": None,
                  "error": {"code": code, "message": message}}
    return line.state == "succeeded", _jsonl(record)


def _iso(timestamp: int | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat().replace("+00:00", "Z")


def anthropic_batch(batch: dict, counts: dict[str, int], results_url: str) -> dict:
    ended = batch["status"] in ("completed", "expired", "cancelled", "failed")
    processing = "ended" if ended else ("canceling" if batch["status"] == "cancelling" else "in_progress")
    ended_at = batch["completed_at"] or batch["expired_at"] or batch["cancelled_at"] or batch["failed_at"]
    return {
        "id": batch["id"], "type": "message_batch", "processing_status": processing,
        "request_counts": {"processing": counts["pending"], "succeeded": counts["succeeded"],
                           "errored": counts["errored"], "canceled": counts["cancelled"],
                           "expired": counts["expired"]},
        "ended_at": _iso(ended_at), "created_at": _iso(batch["created_at"]),
        "expires_at": _iso(batch["expires_at"]), "archived_at": None,
        "cancel_initiated_at": _iso(batch["cancelling_at"]), "results_url": results_url if ended else None,
    }


def anthropic_result_line(line: Line) -> bytes:
    if line.state == "succeeded":
        result: dict[str, Any] = {"type": "succeeded", "message": line.result}
    elif line.state == "errored":
        result = {"type": "errored", "error": line.result}
    else:
        result = {"type": "canceled" if line.state == "cancelled" else "expired"}
    return _jsonl({"custom_id": line.custom_id, "result": result})


def _jsonl(record: dict) -> bytes:
    return (json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n").encode()
