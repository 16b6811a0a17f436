"""The loop's ledger: the served model, the feedback part files already taken, and every round's decision.

Feedback parts are immutable once renamed into place (:mod:`rec_rllib.data.feedback`), so "taken" is a set
of part names. A round reads the parts not yet taken, orders their events by (time, part, row) and, when it
ends, records those parts as taken in the same atomic write as its decision: a loop killed mid-round takes
them again on its next start, and no event is counted twice or lost.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from rec_rllib.data.feedback import SCHEMA, feedback_parts, read_part, recover_journals
from rec_rllib.fsutil import write_json

LEDGER_FILE = "loop_state.json"
PART_COL, ROW_COL = "_part", "_row"
"""Columns :func:`read_parts` adds: the part file an event came from and its row there."""


@dataclass
class Ledger:
    """What the loop has done so far (``<out>/loop_state.json``)."""

    served_model: str
    """The model the endpoint serves (the starting model, then each rolled candidate)."""
    served_version: str | None = None
    """Its model version as the endpoint reports it."""
    rounds: int = 0
    """Rounds finished (rolled or kept)."""
    taken: list[str] = field(default_factory=list)
    """Feedback part files (names) already taken by a finished round, in the order they were taken."""
    events_taken: int = 0
    """Feedback events in those parts."""
    decisions: list[dict[str, Any]] = field(default_factory=list)
    """One record per finished round: its figures, the decision and why."""

    @classmethod
    def load_or_start(cls, out: str | Path, model: str) -> Ledger:
        path = Path(out) / LEDGER_FILE
        if not path.exists():
            return cls(served_model=str(model))
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"{path}: not a loop ledger ({e}); move it away to start afresh") from None

    def save(self, out: str | Path) -> Path:
        """Written to a temporary name and renamed: a reader (or a restart) sees the old or the new ledger."""
        path = Path(out) / LEDGER_FILE
        write_json(path, asdict(self))
        return path


def new_parts(feedback_dir: str | Path, taken: list[str]) -> list[Path]:
    """The complete feedback part files not yet taken, oldest name first (dead writers' journals recovered
    into parts first, so acknowledged events of a killed replica are among them)."""
    if not Path(feedback_dir).is_dir():
        return []
    recover_journals(feedback_dir)
    try:
        parts = feedback_parts(feedback_dir)
    except FileNotFoundError:  # none written yet
        return []
    done = set(taken)
    return [p for p in parts if p.name not in done]


def read_parts(parts: list[Path]) -> pd.DataFrame:
    """The events of ``parts`` (:data:`~rec_rllib.data.feedback.SCHEMA` plus :data:`PART_COL`,
    :data:`ROW_COL`), ordered by time, then part, then row: per writer, the order they were acknowledged
    in."""
    frames = []
    for part in parts:
        table = read_part(part, SCHEMA)
        frame = table.to_pandas()
        frame[PART_COL] = part.name
        frame[ROW_COL] = range(len(frame))
        frames.append(frame)
    if not frames:
        empty = pa.Table.from_pylist([], schema=SCHEMA).to_pandas()
        return empty.assign(**{PART_COL: pd.Series(dtype=str), ROW_COL: pd.Series(dtype="int64")})
    events = pd.concat(frames, ignore_index=True)
    return events.sort_values(["timestamp_ms", PART_COL, ROW_COL], kind="stable").reset_index(drop=True)
