"""The batch jobs' durable state: SQLite (WAL) under --state-dir, file contents beside it.

    <state-dir>/batch.sqlite3        files, batches, and one row per line of every batch
    <state-dir>/files/<file id>      the bytes of each file (uploads and results), written whole
                                     under a temporary name, fsync'ed, then renamed into place

A line moves pending → succeeded | errored | cancelled | expired exactly once, in one
transaction that also stores its result, so a result is committed before it is counted (counts
are read from the lines themselves), and a line that is not pending is never run again. There is
no "running" state on disk: after a crash, lines that were in flight are simply still pending.
Commits use WAL with synchronous=NORMAL: durable across a killed process (SIGKILL, OOM), not
across a power cut.

One connection, guarded by a lock, shared by the event loop and worker threads. Pure Python.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvserve.config import ConfigError

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, purpose TEXT NOT NULL, filename TEXT NOT NULL,
    bytes INTEGER NOT NULL, created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, api TEXT NOT NULL, endpoint TEXT NOT NULL,
    input_file_id TEXT, completion_window TEXT NOT NULL, metadata TEXT, status TEXT NOT NULL,
    created_at INTEGER NOT NULL, expires_at INTEGER NOT NULL, in_progress_at INTEGER, finalizing_at INTEGER,
    completed_at INTEGER, failed_at INTEGER, expired_at INTEGER, cancelling_at INTEGER, cancelled_at INTEGER,
    output_file_id TEXT, error_file_id TEXT, errors TEXT
);
CREATE TABLE IF NOT EXISTS lines (
    batch_id TEXT NOT NULL, line_no INTEGER NOT NULL, custom_id TEXT NOT NULL, body TEXT NOT NULL,
    group_key TEXT NOT NULL, state TEXT NOT NULL, status_code INTEGER, result TEXT, output_tokens INTEGER,
    PRIMARY KEY (batch_id, line_no)
);
CREATE INDEX IF NOT EXISTS lines_pending ON lines (batch_id, state, group_key, line_no);
"""

ANONYMOUS = "-"   # the tenant of files and batches made when no API keys are configured
PENDING = "pending"
LINE_STATES = (PENDING, "succeeded", "errored", "cancelled", "expired")
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")   # batches the runner still works on


@dataclass(frozen=True)
class Line:
    """One request of a batch, as submitted (validated) and as it ended."""

    line_no: int
    custom_id: str
    body: dict[str, Any]
    group_key: str = ""               # lines sharing it run close together (a shared prompt prefix)
    state: str = PENDING
    status_code: int | None = None
    result: Any = None
    output_tokens: int | None = None


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def write_atomically(path: Path, chunks: Iterable[bytes]) -> int:
    """A file's whole content from chunks, under a temporary name, fsync'ed, then renamed into
    place: a reader sees all of it or none. Returns its size."""
    partial = path.with_name(f".{path.name}.partial")
    size = 0
    with open(partial, "wb") as out:
        for chunk in chunks:
            out.write(chunk)
            size += len(chunk)
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, path)
    return size


class StateDirBusy(ConfigError):
    """Another process holds the state directory: two servers would run the same batches."""


class BatchStore:
    def __init__(self, state_dir: str | Path):
        """Holds the directory's lock file (flock: released if the process dies) for its life."""
        self.root = Path(state_dir)
        self.files_dir = self.root / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self._owner = open(self.root / "lock", "a+")   # noqa: SIM115 (held until close)
        try:
            fcntl.flock(self._owner.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._owner.seek(0)
            holder = self._owner.read().strip() or "another process"
            self._owner.close()
            raise StateDirBusy(f"the state directory {self.root} is in use by {holder}; give each server its own "
                               "--state-dir") from None
        self._owner.truncate(0)
        self._owner.write(f"pid {os.getpid()}\n")
        self._owner.flush()
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.root / "batch.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._clear_partial_files()

    def close(self) -> None:
        with self._lock:
            self._db.close()
        self._owner.close()   # releases the directory

    # ---- files ------------------------------------------------------------------------------------
    def create_file(self, tenant: str, purpose: str, filename: str, content: bytes, prefix: str = "file-") -> dict:
        file_id = new_id(prefix)
        write_atomically(self.files_dir / file_id, [content])
        return self.add_file_row(file_id, tenant, purpose, filename, len(content))

    def get_file(self, file_id: str, tenant: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM files WHERE id = ? AND tenant = ?", (file_id, tenant)).fetchone()
        return dict(row) if row else None

    def list_files(self, tenant: str, purpose: str | None = None) -> list[dict]:
        query, args = "SELECT * FROM files WHERE tenant = ?", [tenant]
        if purpose:
            query, args = query + " AND purpose = ?", args + [purpose]
        with self._lock:
            return [dict(r) for r in self._db.execute(query + " ORDER BY created_at DESC, id", args)]

    def file_path(self, file_id: str) -> Path:
        return self.files_dir / file_id

    def delete_file(self, file_id: str, tenant: str) -> bool:
        with self._lock:
            deleted = self._db.execute("DELETE FROM files WHERE id = ? AND tenant = ?", (file_id, tenant)).rowcount
        if deleted:
            self.file_path(file_id).unlink(missing_ok=True)
        return bool(deleted)

    # ---- batches ----------------------------------------------------------------------------------
    def create_batch(self, *, tenant: str, api: str, endpoint: str, completion_window: str, window_s: float,
                     lines: Iterable[Line], input_file_id: str | None = None, metadata: dict | None = None,
                     prefix: str = "batch_") -> dict:
        batch_id = new_id(prefix)
        now = int(time.time())
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.execute(
                    "INSERT INTO batches (id, tenant, api, endpoint, input_file_id, completion_window, metadata, "
                    "status, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, 'validating', ?, ?)",
                    (batch_id, tenant, api, endpoint, input_file_id, completion_window,
                     json.dumps(metadata) if metadata is not None else None, now, int(now + window_s)))
                self._db.executemany(
                    "INSERT INTO lines (batch_id, line_no, custom_id, body, group_key, state) "
                    "VALUES (?, ?, ?, ?, ?, 'pending')",
                    ((batch_id, line.line_no, line.custom_id, json.dumps(line.body), line.group_key) for line in lines))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return self.get_batch(batch_id, tenant)

    def get_batch(self, batch_id: str, tenant: str | None = None) -> dict | None:
        query, args = "SELECT * FROM batches WHERE id = ?", [batch_id]
        if tenant is not None:
            query, args = query + " AND tenant = ?", args + [tenant]
        with self._lock:
            row = self._db.execute(query, args).fetchone()
        return self._batch(row) if row else None

    def list_batches(self, tenant: str, api: str, after: str | None, limit: int) -> tuple[list[dict], bool]:
        """Newest first; `after` is the id of the last batch of the previous page."""
        query, args = "SELECT * FROM batches WHERE tenant = ? AND api = ?", [tenant, api]
        if after:
            with self._lock:
                anchor = self._db.execute("SELECT created_at, id FROM batches WHERE id = ? AND tenant = ? AND api = ?",
                                          (after, tenant, api)).fetchone()
            if anchor is not None:
                query += " AND (created_at < ? OR (created_at = ? AND id < ?))"
                args += [anchor["created_at"], anchor["created_at"], anchor["id"]]
        with self._lock:
            rows = self._db.execute(query + " ORDER BY created_at DESC, id DESC LIMIT ?", args + [limit + 1]).fetchall()
        return [self._batch(r) for r in rows[:limit]], len(rows) > limit

    def active_batches(self) -> list[dict]:
        marks = ", ".join("?" * len(ACTIVE))
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM batches WHERE status IN ({marks}) ORDER BY created_at, id",
                                    ACTIVE).fetchall()
        return [self._batch(r) for r in rows]

    def set_status(self, batch_id: str, status: str, expect: tuple[str, ...] | None = None, **fields: Any) -> bool:
        """The status, its `<status>_at` time, and any other columns given; only from a status in
        `expect` when given. True if the batch changed."""
        columns = {"status": status, f"{status}_at": int(time.time()), **fields}
        assignments = ", ".join(f"{name} = ?" for name in columns)
        query, args = f"UPDATE batches SET {assignments} WHERE id = ?", [*columns.values(), batch_id]
        if expect is not None:
            query += f" AND status IN ({', '.join('?' * len(expect))})"
            args += list(expect)
        with self._lock:
            return bool(self._db.execute(query, args).rowcount)

    # ---- lines ------------------------------------------------------------------------------------
    def pending_lines(self, batch_id: str, skip: set[int], limit: int) -> list[Line]:
        """Pending lines in run order (grouped by prefix, then as submitted), minus `skip` (in flight)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM lines WHERE batch_id = ? AND state = 'pending' ORDER BY group_key, line_no LIMIT ?",
                (batch_id, limit + len(skip))).fetchall()
        return [self._line(r) for r in rows if r["line_no"] not in skip][:limit]

    def finish_line(self, batch_id: str, line_no: int, state: str, status_code: int | None, result: Any,
                    output_tokens: int | None = None) -> bool:
        """Record a pending line's end (committed on return). False if it had already ended."""
        assert state in LINE_STATES and state != PENDING, state
        with self._lock:
            changed = self._db.execute(
                "UPDATE lines SET state = ?, status_code = ?, result = ?, output_tokens = ? "
                "WHERE batch_id = ? AND line_no = ? AND state = 'pending'",
                (state, status_code, json.dumps(result), output_tokens, batch_id, line_no)).rowcount
        return bool(changed)

    def end_pending(self, batch_id: str, state: str) -> int:
        """Every pending line of a batch ends as `state` (cancelled or expired)."""
        with self._lock:
            return self._db.execute("UPDATE lines SET state = ? WHERE batch_id = ? AND state = 'pending'",
                                    (state, batch_id)).rowcount

    def counts(self, batch_id: str) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) AS n FROM lines WHERE batch_id = ? GROUP BY state",
                                    (batch_id,)).fetchall()
        counts = dict.fromkeys(LINE_STATES, 0)
        counts.update({r["state"]: r["n"] for r in rows})
        return counts

    def lines(self, batch_id: str) -> Iterator[Line]:
        """Every line, as submitted order (read in pages, so a large batch is never held whole)."""
        last = -1
        while True:
            with self._lock:
                rows = self._db.execute("SELECT * FROM lines WHERE batch_id = ? AND line_no > ? ORDER BY line_no "
                                        "LIMIT 1000", (batch_id, last)).fetchall()
            if not rows:
                return
            for row in rows:
                yield self._line(row)
            last = rows[-1]["line_no"]

    def pending_total(self) -> int:
        """Pending lines over every active batch."""
        marks = ", ".join("?" * len(ACTIVE))
        with self._lock:
            row = self._db.execute(f"SELECT COUNT(*) AS n FROM lines JOIN batches ON lines.batch_id = batches.id "
                                   f"WHERE lines.state = 'pending' AND batches.status IN ({marks})", ACTIVE).fetchone()
        return int(row["n"])

    def output_tokens(self, batch_id: str) -> int:
        with self._lock:
            row = self._db.execute("SELECT COALESCE(SUM(output_tokens), 0) AS n FROM lines WHERE batch_id = ?",
                                   (batch_id,)).fetchone()
        return int(row["n"])

    # ---- helpers ----------------------------------------------------------------------------------
    @staticmethod
    def _batch(row: sqlite3.Row) -> dict:
        batch = dict(row)
        batch["metadata"] = json.loads(batch["metadata"]) if batch["metadata"] else None
        batch["errors"] = json.loads(batch["errors"]) if batch["errors"] else None
        return batch

    @staticmethod
    def _line(row: sqlite3.Row) -> Line:
        return Line(row["line_no"], row["custom_id"], json.loads(row["body"]), row["group_key"], row["state"],
                    row["status_code"], json.loads(row["result"]) if row["result"] is not None else None,
                    row["output_tokens"])

    def add_file_row(self, file_id: str, tenant: str, purpose: str, filename: str, size: int) -> dict:
        row = {"id": file_id, "tenant": tenant, "purpose": purpose, "filename": filename, "bytes": size,
               "created_at": int(time.time())}
        with self._lock:
            self._db.execute("INSERT INTO files VALUES (:id, :tenant, :purpose, :filename, :bytes, :created_at)", row)
        return row

    def _clear_partial_files(self) -> None:
        for partial in self.files_dir.glob(".*.partial"):   # writes a crash interrupted
            partial.unlink(missing_ok=True)
