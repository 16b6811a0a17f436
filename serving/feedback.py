"""The feedback log: every rewarded impression, as Parquet part files that ``jobs.prepare`` reads back.

Each serving replica buffers events in memory and writes them as a new part file
(``part-<utc time>-<pid>-<seq>.parquet``) when ``max_rows`` events are buffered, when the oldest is
``max_seconds`` old, and when the replica shuts down. A part is written to a hidden temporary name and
renamed into place, so a reader never sees a half-written file. Each event is also journaled (one JSON
line, handed to the OS) before ``/feedback`` acknowledges it: a killed replica's journal is recovered into a
part by the next writer or reader of the directory, so no acknowledged event is lost.

The row format (:data:`SCHEMA`) and the reader (:func:`read_feedback`) live in ``rec_rllib.data.feedback``.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa

from rec_rllib.data.feedback import JOURNAL_PREFIX, SCHEMA, read_feedback, recover_journals, write_part

__all__ = ["SCHEMA", "FeedbackLog", "read_feedback"]


class FeedbackLog:
    """Buffered, atomic Parquet writer (thread-safe) with a journal: :meth:`append` returns only after the
    event is in this writer's journal file, so an acknowledged event survives even a killed process (the
    next writer or reader in the directory recovers the journal into a part file).

    ``journal=False`` (the impression log: one row per answer, on the latency path) only buffers: rows of a
    killed process are lost, which the off-policy reader reports (feedback whose impression is missing)."""

    def __init__(
        self,
        directory: str | Path,
        *,
        max_rows: int = 256,
        max_seconds: float = 5.0,
        schema: pa.Schema = SCHEMA,
        journal: bool = True,
    ):
        self.schema = schema
        self.journaled = journal
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_rows = max_rows
        self.max_seconds = max_seconds
        self._rows: list[dict[str, Any]] = []
        self._oldest = 0.0
        self._seq = 0
        self._lock = threading.Lock()
        # one writer's parts and journals: unique among the writers of a directory, in a process too
        self._tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._id = f"{socket.gethostname()}-{self._tag}"
        self._generation = 0
        self._stale: list[Path] = []  # journals whose rows went back to the buffer after a failed flush
        self._journal_path, self._journal = self._open_journal()
        if journal:
            recover_journals(self.dir)

    def _open_journal(self):
        if not self.journaled:
            return None, None
        self._generation += 1
        path = self.dir / f"{JOURNAL_PREFIX}{self._id}-{self._generation:06d}.jsonl"
        return path, open(path, "a", buffering=1)

    def append(self, row: dict[str, Any]) -> None:
        missing = set(self.schema.names) - set(row)
        if missing:
            raise ValueError(f"{self.dir}: row lacks {sorted(missing)}")
        line = json.dumps(row) + "\n" if self.journaled else ""
        with self._lock:
            if self.journaled:
                self._journal.write(line)
                self._journal.flush()
            if not self._rows:
                self._oldest = time.monotonic()
            self._rows.append(row)
            due = len(self._rows) >= self.max_rows
        if due:
            self.flush()

    def due(self) -> bool:
        return bool(self._rows) and time.monotonic() - self._oldest >= self.max_seconds

    def flush(self) -> Path | None:
        """Write the buffered rows as one new part file (atomically), then drop their journal."""
        with self._lock:
            rows, self._rows = self._rows, []
            if not rows:
                return None
            self._seq += 1
            seq = self._seq
            done_path, done_file = self._journal_path, self._journal
            self._journal_path, self._journal = self._open_journal()
        if done_file is not None:
            done_file.close()
        try:
            final = write_part(self.dir, rows, f"{self._tag}-{seq:06d}", self.schema)
        except BaseException:
            with self._lock:  # keep the events for the next flush; their journal stays until then
                self._rows[:0] = rows
                self._stale.append(done_path)
            raise
        for path in [done_path, *self._stale]:
            if path is not None:
                path.unlink(missing_ok=True)
        self._stale = []
        return final

    def close(self) -> None:
        """Flush, and remove this writer's (now empty) journal."""
        self.flush()
        with self._lock:
            if self._journal is None:
                return
            self._journal.close()
            if not self._rows:
                self._journal_path.unlink(missing_ok=True)
