"""The top items of each row of scores, ties to the lower item index: the one selection that evaluation,
exposure re-ranking and every recommender use."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def topk(scores: np.ndarray, k: int, exclude: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """[B, k] item indices of the highest scores, ties broken by the lower item index (stable).

    ``exclude[b]`` lists items that must not be returned for row b (their scores become -inf, so they
    only appear when fewer than k items remain).
    """
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    scores = np.array(scores, copy=True)
    if scores.dtype not in (np.float32, np.float64):
        scores = scores.astype(np.float64)
    n_items = scores.shape[1]
    if k > n_items:
        raise ValueError(f"k={k} exceeds the catalogue size {n_items}")
    if exclude is not None:
        rows = np.repeat(np.arange(len(exclude)), [len(e) for e in exclude])
        cols = (
            np.concatenate([np.asarray(e, dtype=np.int64) for e in exclude])
            if len(exclude)
            else np.array([], int)
        )
        scores[rows, cols] = -np.inf
    if k * 8 >= n_items:  # a short row: sorting it whole is as cheap as selecting from it
        # a stable sort of -score keeps the lower item index first among ties
        return np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return _select_topk(scores, k)


def _select_topk(scores: np.ndarray, k: int) -> np.ndarray:
    """:func:`topk` without sorting whole rows: torch's top-k, then the k winners ordered by score and item
    index. A row whose k-th highest score is tied beyond the k-th place takes every item above that score and
    then the lowest-indexed tied ones, as the stable sort would."""
    import torch

    t = torch.from_numpy(scores)
    values, idx = torch.topk(t, k, dim=1)  # [B, k]
    ambiguous = ((t >= values[:, -1:]).sum(dim=1) > k).numpy()
    vals, out = values.numpy(), idx.numpy().astype(np.int64)
    by_index = np.argsort(out, axis=1)
    out, vals = np.take_along_axis(out, by_index, axis=1), np.take_along_axis(vals, by_index, axis=1)
    out = np.take_along_axis(out, np.argsort(-vals, axis=1, kind="stable"), axis=1)
    for b in np.flatnonzero(ambiguous):
        row = scores[b]
        v = row[out[b, -1]]
        above = np.flatnonzero(row > v)
        chosen = np.concatenate([above, np.flatnonzero(row == v)[: k - len(above)]])
        out[b] = chosen[np.lexsort((chosen, -row[chosen]))]
    return out
