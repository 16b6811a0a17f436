"""The feedback log: every rewarded impression, as Parquet part files that ``jobs.prepare`` reads back.

Each serving replica buffers events in memory and writes them as a new part file
(``part-<utc time>-<pid>-<seq>.parquet``) when ``max_rows`` events are buffered, when the oldest is
``max_seconds`` old, and when the replica shuts down. A part is written to a hidden temporary name and
renamed into place, so a reader never sees a half-written file; a crash loses at most the unflushed
buffer, a clean stop loses nothing.

The row format (:data:`SCHEMA`) and the reader (:func:`read_feedback`) live in ``rec_rllib.data.feedback``.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from rec_rllib.data.feedback import SCHEMA, read_feedback

__all__ = ["SCHEMA", "FeedbackLog", "read_feedback"]


class FeedbackLog:
    """Buffered, atomic Parquet writer (thread-safe)."""

    def __init__(self, directory: str | Path, *, max_rows: int = 256, max_seconds: float = 5.0):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_rows = max_rows
        self.max_seconds = max_seconds
        self._rows: list[dict[str, Any]] = []
        self._oldest = 0.0
        self._seq = 0
        self._lock = threading.Lock()

    def append(self, row: dict[str, Any]) -> None:
        missing = set(SCHEMA.names) - set(row)
        if missing:
            raise ValueError(f"feedback row lacks {sorted(missing)}")
        with self._lock:
            if not self._rows:
                self._oldest = time.monotonic()
            self._rows.append(row)
            due = len(self._rows) >= self.max_rows
        if due:
            self.flush()

    def due(self) -> bool:
        return bool(self._rows) and time.monotonic() - self._oldest >= self.max_seconds

    def flush(self) -> Path | None:
        """Write the buffered rows as one new part file (atomically); returns its path."""
        with self._lock:
            rows, self._rows = self._rows, []
            if not rows:
                return None
            self._seq += 1
            seq = self._seq
        name = f"part-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}-{seq:06d}.parquet"
        final = self.dir / name
        tmp = self.dir / f".{name}.tmp"
        try:
            table = pa.Table.from_pylist(rows, schema=SCHEMA)
            pq.write_table(table, tmp)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            with self._lock:  # keep the events for the next flush
                self._rows[:0] = rows
            raise
        return final
