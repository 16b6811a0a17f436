"""Validation of raw logs, done once, where data enters (``prepare``).

Raw files are read with every column as text, then each field is parsed here, so a bad value is reported
with the file, the row (data row number and, for text files, the line number) and the field it sits in,
together with what was expected and how to fix it. All problems of a file are collected before raising,
so a user fixes them in one pass.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

MAX_ROWS_SHOWN = 5


@dataclass
class Problem:
    """One validation failure."""

    file: str
    field: str
    message: str
    fix: str
    rows: list[int] = field(default_factory=list)
    """0-based data-row numbers (the first few)."""
    n_rows: int = 0
    """How many rows have this problem in all."""
    header_lines: int | None = 1
    """Lines before the first data row in a text file (None for Parquet); turns rows into line numbers."""

    def __str__(self) -> str:
        where = f"{self.file}"
        if self.rows:
            shown = ", ".join(
                f"row {r}" + (f" (line {r + self.header_lines + 1})" if self.header_lines is not None else "")
                for r in self.rows[:MAX_ROWS_SHOWN]
            )
            more = (
                f" and {self.n_rows - len(self.rows[:MAX_ROWS_SHOWN])} more"
                if self.n_rows > MAX_ROWS_SHOWN
                else ""
            )
            where += f", {shown}{more}"
        return f"{where}, field {self.field!r}: {self.message}. Fix: {self.fix}"


class DataValidationError(ValueError):
    """Raised when raw logs fail validation; ``problems`` lists every failure found."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in the input data:\n{lines}")


class Checker:
    """Collects problems for one file; parse helpers return clean columns and record bad rows."""

    def __init__(self, file: str, *, header_lines: int | None = 1):
        self.file = file
        self.header_lines = header_lines
        self.problems: list[Problem] = []

    def add(self, field: str, message: str, fix: str, rows: Iterable[int] = ()) -> None:
        rows = [int(r) for r in rows]
        self.problems.append(
            Problem(
                self.file,
                field,
                message,
                fix,
                rows=rows[:MAX_ROWS_SHOWN],
                n_rows=len(rows),
                header_lines=self.header_lines,
            )
        )

    def raise_if_any(self) -> None:
        if self.problems:
            raise DataValidationError(self.problems)

    # -- columns -------------------------------------------------------------------------------------
    def require_columns(
        self, df: pd.DataFrame, wanted: dict[str, str | None], *, optional: Iterable[str] = ()
    ) -> bool:
        """Check that each mapped column exists. ``wanted`` maps a canonical field to a source column."""
        ok = True
        optional = set(optional)
        for canonical, col in wanted.items():
            if col is None:
                if canonical not in optional:
                    self.add(
                        canonical,
                        "no source column is mapped to this required field",
                        f"name the column that holds {canonical!r} "
                        f"(e.g. --{canonical.replace('_', '-')}-col)",
                    )
                    ok = False
                continue
            if col not in df.columns:
                self.add(
                    col,
                    f"column missing (needed for {canonical!r}); "
                    f"the file has columns {list(df.columns)[:20]}",
                    "rename the column in the file or map the right column name to this field",
                )
                ok = False
        return ok

    # -- field parsers (input: a column of strings; output: parsed values) ------------------------------
    def ids(self, col: pd.Series, field: str) -> pd.Series:
        values = col.astype("string").str.strip()
        empty = values.isna() | (values == "")
        if empty.any():
            self.add(
                field,
                f"empty id in {int(empty.sum())} row(s)",
                "give every row a non-empty id, or drop those rows",
                np.flatnonzero(empty.to_numpy()),
            )
        return values

    def numbers(self, col: pd.Series, field: str, *, required: bool = True) -> pd.Series:
        raw = col.astype("string").str.strip()
        missing = raw.isna() | (raw == "")
        parsed = pd.to_numeric(raw.where(~missing), errors="coerce")
        bad = parsed.isna() & ~missing
        if bad.any():
            sample = raw[bad].iloc[0]
            self.add(
                field,
                f"not a number (e.g. {sample!r})",
                "write plain numbers in this column",
                np.flatnonzero(bad.to_numpy()),
            )
        if required and missing.any():
            self.add(
                field,
                "missing value",
                "fill in the value or drop those rows",
                np.flatnonzero(missing.to_numpy()),
            )
        infinite = np.isinf(parsed.to_numpy(dtype=float, na_value=np.nan))
        if infinite.any():
            self.add(field, "infinite value", "write finite numbers", np.flatnonzero(infinite))
        return parsed.astype(float)

    def timestamps(self, col: pd.Series, field: str) -> tuple[pd.Series, str | None]:
        """Parse integer timestamps or date-time strings; returns (int64 values, unit): unit None if
        numeric."""
        raw = col.astype("string").str.strip()
        missing = raw.isna() | (raw == "") | raw.str.lower().isin(["nan", "nat", "null", "none"])
        numeric = pd.to_numeric(raw.where(~missing), errors="coerce")
        n_numeric = int(numeric.notna().sum())
        if missing.any():
            self.add(
                field,
                "missing or NaN timestamp",
                "give every interaction a time, or drop those rows",
                np.flatnonzero(missing.to_numpy()),
            )
        if n_numeric >= int((~missing).sum()) and n_numeric > 0:
            values = numeric.to_numpy(dtype=float, na_value=np.nan)
            negative = values < 0
            if negative.any():
                self.add(
                    field,
                    "negative timestamp",
                    "timestamps are times since the epoch and must be >= 0",
                    np.flatnonzero(negative),
                )
            fractional = np.isfinite(values) & (values != np.floor(values))
            if fractional.any():
                self.add(
                    field,
                    "timestamp is not a whole number",
                    "store integer timestamps (e.g. seconds since the epoch)",
                    np.flatnonzero(fractional),
                )
            return pd.Series(np.nan_to_num(values, nan=0).astype(np.int64), index=col.index), None
        if n_numeric > 0:
            bad = numeric.notna() & ~missing
            self.add(
                field,
                "mixes plain numbers and date-time strings",
                "use one format for the whole column",
                np.flatnonzero(bad.to_numpy()),
            )
        parsed = pd.to_datetime(raw.where(~missing), utc=True, errors="coerce", format="ISO8601")
        bad = parsed.isna() & ~missing
        if bad.any():
            self.add(
                field,
                f"neither an integer nor an ISO-8601 date-time (e.g. {raw[bad].iloc[0]!r})",
                "write integer epoch times or ISO-8601 strings like 2019-11-24 00:00:34+00:00",
                np.flatnonzero(bad.to_numpy()),
            )
        micros = (parsed - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(microseconds=1)
        return micros.fillna(0).astype(np.int64), "us"

    def propensities(self, col: pd.Series, field: str) -> pd.Series:
        values = self.numbers(col, field)
        arr = values.to_numpy()
        outside = np.isfinite(arr) & ((arr <= 0) | (arr > 1))
        if outside.any():
            self.add(
                field,
                f"propensity outside (0, 1] (e.g. {arr[outside][0]!r})",
                "propensities are the logging policy's probabilities of the shown item: "
                "fix the column, or leave it unmapped if the log has none",
                np.flatnonzero(outside),
            )
        return values

    def duplicates(self, df: pd.DataFrame, keys: list[str], field: str) -> None:
        dup = df.duplicated(subset=keys, keep=False)
        if dup.any():
            rows = np.flatnonzero(dup.to_numpy())
            self.add(
                field,
                f"{int(dup.sum())} rows repeat the same ({', '.join(keys)})",
                "drop the repeated rows (keep one of each)",
                rows,
            )

    def unknown(self, values: pd.Series, known: set[str] | pd.Index, field: str, what: str) -> None:
        known_index = known if isinstance(known, pd.Index) else pd.Index(list(known))
        bad = ~values.isin(known_index) & values.notna() & (values != "")
        if bad.any():
            self.add(
                field,
                f"{int(bad.sum())} row(s) name {what} absent from the items file "
                f"(e.g. {values[bad].iloc[0]!r})",
                f"add those {what}s to the items file, or drop their interactions",
                np.flatnonzero(bad.to_numpy()),
            )
