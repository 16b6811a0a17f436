"""Atomic file writes: a reader (or a crash) never sees a half-written file."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a sibling temp path, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def write_json(path: str | Path, payload: Any) -> Path:
    return write_text(path, json.dumps(payload, indent=2, default=str) + "\n")


def write_csv(
    path: str | Path, rows: Iterable[dict[str, Any]], fieldnames: Sequence[str] | None = None
) -> Path:
    """Rows as CSV; columns are ``fieldnames`` or, by default, every key any row has, in order of first
    appearance (a row without one leaves its cell empty)."""
    rows = list(rows)
    keys = list(fieldnames) if fieldnames is not None else list(dict.fromkeys(k for row in rows for k in row))

    def write(p: Path) -> None:
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)

    return atomic_write(path, write)
