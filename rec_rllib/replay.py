"""The logged histories an environment replays, read from a prepared dataset's Parquet: the train split of
the users of one shard (env runner ``i`` of ``n`` owns the users with ``user_idx % n == i - 1``; the union
of the shards is every train user, and shards are disjoint), each shard read once per process and shared by
every sub-environment of the runner. Only the shard's rows are read.

This module never imports torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads

from rec_rllib.columns import Col, Split, SplitScheme


@dataclass(frozen=True)
class ReplayShard:
    """One shard's replayable users, read once per process (every sub-environment of an env runner replays the
    same shard: one copy, not one per sub-environment)."""

    histories: dict[int, tuple[np.ndarray, np.ndarray]]
    """{user_idx: (items, rewards)} of the shard's users with at least 2 train items, time-ordered."""
    users: np.ndarray
    """Their user indices, sorted."""
    max_rating: float
    """The largest reward in the shard (the ``hit`` reward's scale)."""
    novelty: np.ndarray
    """[n_items] each item's self-information under the shard's train popularity, over its maximum."""


_SHARDS: dict[tuple, ReplayShard] = {}


def shared_shard(dataset: str, scheme: str, shard_id: int, num_shards: int, manifest: dict) -> ReplayShard:
    """The :class:`ReplayShard` of a dataset's users ``user_idx % num_shards == shard_id``, read on first use
    in this process (keyed by the dataset's content too: a dataset prepared again into the same directory is
    read again)."""
    key = (str(dataset), str(scheme), int(shard_id), int(num_shards), manifest.get("content_hash"))
    if key not in _SHARDS:
        n_items = int(manifest["counts"]["items"])
        n_users = int(manifest["counts"]["users"])
        users = np.arange(shard_id, n_users, num_shards, dtype=np.int64)
        histories, _ = read_train_histories(dataset, scheme, users)
        replayable = {u: h for u, h in histories.items() if len(h[0]) >= 2}
        if not replayable:
            raise ValueError(f"shard {shard_id}/{num_shards} of {dataset} has no user with >= 2 train items")
        max_rating = max(float(max(r.max() for _, r in replayable.values())), 1e-9)
        counts = np.bincount(np.concatenate([h[0] for h in histories.values()]), minlength=n_items)
        info = -np.log2((counts + 1.0) / (counts.sum() + n_items))
        _SHARDS[key] = ReplayShard(
            histories=replayable,
            users=np.array(sorted(replayable), dtype=np.int64),
            max_rating=max_rating,
            novelty=info / info.max(),  # [n_items] in (0, 1]
        )
    return _SHARDS[key]


def shard_of(worker_index: int, num_workers: int) -> tuple[int, int]:
    """(shard_id, num_shards) of an env runner: remote runners 1..n split the users; a lone local runner owns
    all."""
    if num_workers <= 0:
        return 0, 1
    return max(worker_index, 1) - 1, num_workers


def read_train_histories(
    dataset: str, scheme: str, users: np.ndarray | None = None
) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]], dict]:
    """{user_idx: (items, rewards)} of the train split, time-ordered, reading only ``users``' rows."""
    root = Path(dataset)
    manifest = json.loads((root / "manifest.json").read_text())
    col = SplitScheme.column(scheme)
    ds = pads.dataset(str(root / "interactions.parquet"), format="parquet")
    flt = pads.field(col) == Split.TRAIN
    if users is not None:
        flt = flt & pads.field(Col.USER_IDX).isin(users.astype(np.int32))
    table = ds.to_table(columns=[Col.USER_IDX, Col.ITEM_IDX, Col.REWARD], filter=flt)
    u = table.column(Col.USER_IDX).to_numpy()
    i = table.column(Col.ITEM_IDX).to_numpy().astype(np.int64)
    r = table.column(Col.REWARD).to_numpy().astype(np.float64)
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    if len(u):
        cuts = np.flatnonzero(u[1:] != u[:-1]) + 1  # the file is sorted by (user, time, source row)
        for us, it, rw in zip(np.split(u, cuts), np.split(i, cuts), np.split(r, cuts), strict=True):
            out[int(us[0])] = (it, rw)
    return out, manifest


def train_item_counts(dataset: str, scheme: str) -> np.ndarray:
    """[n_items] interactions per item in the train split (the popularity the policy head calibrates)."""
    root = Path(dataset)
    n_items = int(json.loads((root / "manifest.json").read_text())["counts"]["items"])
    ds = pads.dataset(str(root / "interactions.parquet"), format="parquet")
    table = ds.to_table(columns=[Col.ITEM_IDX], filter=pads.field(SplitScheme.column(scheme)) == Split.TRAIN)
    return np.bincount(table.column(Col.ITEM_IDX).to_numpy().astype(np.int64), minlength=n_items)
