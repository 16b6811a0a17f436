"""Evaluation splits, computed once at prepare time and stored with the dataset.

* **Leave-one-out by time** (the protocol of RecBole and the SASRec/BERT4Rec papers): each user's
  interactions are ordered by timestamp, ties broken by the source file's row order (a stable sort);
  the last one is the test interaction, the second-to-last the validation one, the rest train. Users with
  fewer than 3 interactions stay train-only.
* **Global temporal split**: cut points at timestamp quantiles over all interactions; everything before
  the first cut is train, between the cuts validation, from the second cut on test.

Both expect interactions already sorted by (user, timestamp, source row).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from rec_rllib.columns import Col, Split


def leave_one_out(interactions: pd.DataFrame, *, min_interactions: int = 3) -> np.ndarray:
    """Split codes (int8) for interactions sorted by (user, timestamp, source row)."""
    users = interactions[Col.USER_IDX].to_numpy()
    n = len(users)
    codes = np.full(n, Split.TRAIN, dtype=np.int8)
    if n == 0:
        return codes
    # position of each row counted from the end of its user's sequence: 0 = last
    is_last = np.ones(n, dtype=bool)
    is_last[:-1] = users[1:] != users[:-1]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    lengths = np.diff(np.r_[starts, n])
    eligible = lengths >= min_interactions
    last = starts + lengths - 1
    codes[last[eligible]] = Split.TEST
    codes[last[eligible] - 1] = Split.VALID
    return codes


def temporal(
    timestamps: np.ndarray, *, valid_quantile: float = 0.8, test_quantile: float = 0.9
) -> tuple[np.ndarray, dict]:
    """Split codes by global timestamp cut points; returns (codes, boundaries for the manifest)."""
    if not 0 < valid_quantile <= test_quantile < 1:
        raise ValueError(
            "temporal split quantiles must satisfy "
            f"0 < valid ({valid_quantile}) <= test ({test_quantile}) < 1"
        )
    ts = np.asarray(timestamps, dtype=np.int64)
    # "lower" keeps the cut an observed, integer timestamp
    valid_start = int(np.quantile(ts, valid_quantile, method="lower"))
    test_start = int(np.quantile(ts, test_quantile, method="lower"))
    codes = np.full(len(ts), Split.TRAIN, dtype=np.int8)
    codes[ts >= valid_start] = Split.VALID
    codes[ts >= test_start] = Split.TEST
    return codes, {
        "valid_quantile": valid_quantile,
        "test_quantile": test_quantile,
        "valid_start": valid_start,
        "test_start": test_start,
        "rule": "train: t < valid_start; valid: valid_start <= t < test_start; test: t >= test_start",
    }
