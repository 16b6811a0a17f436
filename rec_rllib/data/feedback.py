"""The serving feedback log's format, shared by its writer (``serving.feedback``) and its readers
(``jobs.prepare --dataset feedback`` and the off-policy estimators).

The log is a directory of Parquet part files ``part-*.parquet``; a part is written under a hidden
temporary name and renamed into place, so the glob below never sees a half-written file. One row per
feedback event: the context (user, the history the policy saw), the shown slate with each item's
propensity, the model version and exploration strategy that produced it, and the reward.

Its subdirectory ``impressions/`` holds every answer, rewarded or not (:data:`IMPRESSION_SCHEMA`, same
part-file layout): the denominator that off-policy estimation needs (``rec_rllib.eval.servelog``).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rec_rllib.data.validate import Checker

SCHEMA = pa.schema(
    [
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
    ]
)


IMPRESSIONS = "impressions"
"""The impression log's subdirectory of a feedback directory."""

IMPRESSION_SCHEMA = pa.schema(
    [
        SCHEMA.field(name)
        for name in (
            "request_id",
            "timestamp_ms",
            "user_id",
            "history",
            "shown",
            "shown_propensities",
            "model_version",
            "strategy",
        )
    ]
)
"""One row per answer of /recommend or /query: ``shown_propensities[j]`` is the probability of the item at
position j given the items above it, so ``shown_propensities[0]`` is the exact probability of the first
pick."""


def impression_parts(directory: str | Path) -> list[Path]:
    """The impression part files under ``directory/impressions``, oldest name first; a FileNotFoundError
    when there are none."""
    parts = sorted((Path(directory) / IMPRESSIONS).glob("part-*.parquet"))
    if not parts:
        raise FileNotFoundError(
            f"{Path(directory) / IMPRESSIONS}: no impression part files; they are written by a server of "
            "this version, when buffers flush and when it stops cleanly"
        )
    return parts


def read_impressions(directory: str | Path) -> pa.Table:
    """Every impression part under ``directory/impressions`` as one table in :data:`IMPRESSION_SCHEMA`."""
    return _read_parts(impression_parts(directory), IMPRESSION_SCHEMA)


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
    """Every part file under ``directory`` as one table in :data:`SCHEMA` (journals of dead writers are
    recovered into parts first). A part that lacks a column raises
    :class:`~rec_rllib.data.validate.DataValidationError` naming the file and the column."""
    recover_journals(directory)
    return _read_parts(feedback_parts(directory), SCHEMA)


def iter_impressions(directory: str | Path, *, since_ms: int | None = None):
    """The impression parts under ``directory/impressions`` one table at a time (:data:`IMPRESSION_SCHEMA`),
    oldest first: what a reader of a long log holds at once is one part. ``since_ms``: only the answers
    logged at or after it; a part with none is skipped after reading its timestamps alone, so a reader of
    the newest answers does not read the whole log."""
    import pyarrow.compute as pc

    for part in impression_parts(directory):
        if since_ms is not None:
            stamps = pq.read_table(part, columns=["timestamp_ms"]).column("timestamp_ms")
            if not len(stamps) or pc.max(stamps).as_py() < since_ms:
                continue
        table = read_part(part, IMPRESSION_SCHEMA)
        if since_ms is not None:
            table = table.filter(pc.greater_equal(table.column("timestamp_ms"), since_ms))
        yield table


def read_part(part: Path, schema: pa.Schema) -> pa.Table:
    """A part file in ``schema``; one that lacks a column raises
    :class:`~rec_rllib.data.validate.DataValidationError` naming the file and the column."""
    table = pq.read_table(part)
    check = Checker(str(part), header_lines=None)
    check.require_columns(table.schema.empty_table().to_pandas(), {c: c for c in schema.names})
    check.raise_if_any()
    return table.select(schema.names).cast(schema)


def _read_parts(parts: list[Path], schema: pa.Schema) -> pa.Table:
    """Part files as one table in ``schema`` (:func:`read_part` each)."""
    return pa.concat_tables([read_part(part, schema) for part in parts])


# -- writing parts and recovering journals ----------------------------------------------------------------
JOURNAL_PREFIX = ".journal-"
"""Writers journal each event (one JSON line, flushed to the OS before the event is acknowledged) in
``.journal-<host>-<pid>-<tag>-<generation>.jsonl`` until it is in a part file; a journal whose process
died is turned into a part by :func:`recover_journals`, so a killed replica loses no acknowledged event."""


def write_part(directory: str | Path, rows: list[dict], tag: str, schema: pa.Schema = SCHEMA) -> Path:
    """Rows as a new part file ``part-<utc time>-<tag>.parquet``, written under a hidden temporary name
    and renamed into place."""
    import os
    import time

    directory = Path(directory)
    final = directory / f"part-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{tag}.parquet"
    tmp = directory / f".{final.name}.tmp"
    try:
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_journals(directory: str | Path) -> list[Path]:
    """Turn the journals of dead writers on this host into part files (and delete them); returns the new
    parts. Journals of live processes and of other hosts are left alone. A torn last line (the process
    died mid-write, before the event was acknowledged) is skipped."""
    import json
    import os
    import socket

    host = socket.gethostname()
    out = []
    for journal in sorted(Path(directory).glob(f"{JOURNAL_PREFIX}*.jsonl")):
        fields = journal.name[len(JOURNAL_PREFIX) : -len(".jsonl")].rsplit("-", 3)
        if len(fields) != 4 or fields[0] != host or not fields[1].isdigit():
            continue
        pid = int(fields[1])
        if pid == os.getpid() or _alive(pid):
            continue
        claimed = journal.with_name(".recovering" + journal.name)
        try:
            os.rename(journal, claimed)  # one recoverer wins; a concurrent one finds it gone
        except FileNotFoundError:
            continue
        rows = []
        for line in claimed.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        if rows:
            out.append(write_part(directory, rows, f"recovered-{pid}-{fields[2]}-{fields[3]}"))
        claimed.unlink()
    return out
