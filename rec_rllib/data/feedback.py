"""The serving feedback log's format, shared by its writer (``serving.feedback``) and its readers
(``jobs.prepare --dataset feedback`` and the off-policy estimators).

The log is a directory of Parquet part files ``part-*.parquet``; a part is written under a hidden
temporary name and renamed into place, so the glob below never sees a half-written file. One row per
feedback event: the context (user, the history the policy saw), the shown slate with each item's
propensity, the model version and exploration strategy that produced it, and the reward.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rec_rllib.data.validate import Checker

SCHEMA = pa.schema([
    ("request_id", pa.string()),
    ("timestamp_ms", pa.int64()),
    ("user_id", pa.string()),
    ("history", pa.list_(pa.string())),
    ("shown", pa.list_(pa.string())),
    ("shown_propensities", pa.list_(pa.float64())),
    ("item_id", pa.string()),
    ("item_text", pa.string()),
    ("position", pa.int16()),
    ("propensity", pa.float64()),
    ("reward", pa.float64()),
    ("model_version", pa.string()),
    ("strategy", pa.string()),
])  # fmt: skip


def feedback_parts(directory: str | Path) -> list[Path]:
    """The complete part files under ``directory``, oldest name first."""
    parts = sorted(Path(directory).glob("part-*.parquet"))
    if not parts:
        raise FileNotFoundError(
            f"{directory}: no feedback part files (part-*.parquet); serve and send POST /feedback first, "
            "and stop the app cleanly so buffers are flushed"
        )
    return parts


def read_feedback(directory: str | Path) -> pa.Table:
    """Every part file under ``directory`` as one table in :data:`SCHEMA`. A part that lacks a column
    raises :class:`~rec_rllib.data.validate.DataValidationError` naming the file and the column."""
    tables = []
    for part in feedback_parts(directory):
        table = pq.read_table(part)
        check = Checker(str(part), header_lines=None)
        check.require_columns(table.schema.empty_table().to_pandas(), {c: c for c in SCHEMA.names})
        check.raise_if_any()
        tables.append(table.select(SCHEMA.names).cast(SCHEMA))
    return pa.concat_tables(tables)
