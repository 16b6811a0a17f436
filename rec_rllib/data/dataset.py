"""The canonical dataset: interactions, items, users (Parquet) and a manifest (JSON).

Layout of a prepared dataset directory (local path or any URI pyarrow's filesystem layer understands)::

    interactions.parquet   user_idx, item_idx, timestamp, reward, [propensity, position, policy],
                           source_row, split_loo, split_temporal, [ctx_* context features]
                           sorted by (user_idx, timestamp, source_row)
    items.parquet          item_idx, item_id, text, [genres, item features]   (the item id map)
    users.parquet          user_idx, user_id, [user features]                  (the user id map)
    manifest.json          schema version, source, counts, id-map files, split boundaries, content hash

A dataset is written to a temporary sibling directory and renamed into place, so a failed write never
leaves a half-written dataset and never destroys the one already there.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rec_rllib.columns import Col, Split, SplitScheme
from rec_rllib.data import splits

SCHEMA_VERSION = 1
INTERACTIONS_FILE = "interactions.parquet"
ITEMS_FILE = "items.parquet"
USERS_FILE = "users.parquet"
MANIFEST_FILE = "manifest.json"


# -- filesystem helpers ------------------------------------------------------------------------------------
def resolve_fs(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI such as ``s3://bucket/dir``."""
    path = str(path)
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    import os

    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _sortable_ids(ids: pd.Series) -> list[str]:
    """Unique ids ordered numerically when all are integers, else lexically (deterministic either way)."""
    unique = pd.unique(ids.astype(str))
    numeric = pd.to_numeric(pd.Series(unique), errors="coerce")
    if numeric.notna().all() and (numeric == np.floor(numeric)).all():
        order = np.argsort(numeric.to_numpy(), kind="stable")
    else:
        order = np.argsort(unique.astype(str), kind="stable")
    return [str(unique[i]) for i in order]


@dataclass
class EvalCases:
    """Who is evaluated on what: per user, the input history (time-ordered) and the held-out targets."""

    user_idx: np.ndarray
    """[U] dense user indices."""
    histories: list[np.ndarray]
    """U arrays of item indices, oldest first."""
    targets: list[np.ndarray]
    """U arrays of held-out item indices (one for leave-one-out; the distinct items of the period
    otherwise)."""

    def __len__(self) -> int:
        return len(self.user_idx)


@dataclass
class LogDataset:
    """A prepared dataset in memory. Build one with :func:`build_dataset`, or :meth:`load` one."""

    interactions: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.manifest.get("name", "dataset"))

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def n_users(self) -> int:
        return len(self.users)

    # -- persistence --------------------------------------------------------------------------------------
    def save(self, path: str) -> str:
        """Write the dataset atomically to ``path`` (replacing a dataset already there only on success)."""
        fs, final = resolve_fs(path)
        parent = posixpath.dirname(final.rstrip("/"))
        tag = uuid.uuid4().hex[:8]
        tmp = f"{final.rstrip('/')}.tmp-{tag}"
        fs.create_dir(parent, recursive=True)
        fs.create_dir(tmp, recursive=True)
        try:
            for fname, frame in (
                (INTERACTIONS_FILE, self.interactions),
                (ITEMS_FILE, self.items),
                (USERS_FILE, self.users),
            ):
                table = pa.Table.from_pandas(frame, preserve_index=False)
                with fs.open_output_stream(f"{tmp}/{fname}") as out:
                    pq.write_table(table, out, compression="zstd")
            with fs.open_output_stream(f"{tmp}/{MANIFEST_FILE}") as out:
                out.write(json.dumps(self.manifest, indent=2, sort_keys=False).encode())
            old = None
            if _exists(fs, final):
                old = f"{final.rstrip('/')}.old-{tag}"
                fs.move(final, old)
            fs.move(tmp, final)
            if old is not None:
                fs.delete_dir(old)
        except BaseException:
            if _exists(fs, tmp):
                fs.delete_dir(tmp)
            raise
        return final

    @classmethod
    def load(cls, path: str) -> LogDataset:
        """Read a dataset written by :meth:`save`; checks the schema version."""
        fs, root = resolve_fs(path)
        manifest_path = f"{root}/{MANIFEST_FILE}"
        if not _exists(fs, manifest_path):
            raise FileNotFoundError(
                f"{path} is not a prepared dataset (no {MANIFEST_FILE}); run `python -m jobs.prepare` first"
            )
        with fs.open_input_stream(manifest_path) as f:
            manifest = json.loads(f.read().decode())
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"{manifest_path}: schema_version {version!r}, this code reads {SCHEMA_VERSION}; "
                "prepare the dataset again with this version"
            )

        def read(fname: str) -> pd.DataFrame:
            with fs.open_input_file(f"{root}/{fname}") as f:
                return pq.read_table(f).to_pandas()

        return cls(read(INTERACTIONS_FILE), read(ITEMS_FILE), read(USERS_FILE), manifest)

    # -- views --------------------------------------------------------------------------------------------
    def split_mask(self, scheme: str, split: str) -> np.ndarray:
        return self.interactions[SplitScheme.column(scheme)].to_numpy() == Split.code(split)

    def train_interactions(self, scheme: str = SplitScheme.LEAVE_ONE_OUT) -> pd.DataFrame:
        """The interactions a model may learn from when evaluated on the ``scheme``'s valid/test split."""
        return self.interactions[self.split_mask(scheme, "train")]

    def eval_cases(self, scheme: str = SplitScheme.LEAVE_ONE_OUT, split: str = "test") -> EvalCases:
        """Histories and targets of every user who has an interaction in ``split``.

        Test: the history is everything before the test period (train + valid). Valid: train only.
        Users without any history (possible in the temporal split) are kept; they are the cold users.
        """
        code = Split.code(split)
        if code == Split.TRAIN:
            raise ValueError("evaluation cases are built for 'valid' or 'test', not 'train'")
        col = SplitScheme.column(scheme)
        inter = self.interactions
        users = inter[Col.USER_IDX].to_numpy()
        items = inter[Col.ITEM_IDX].to_numpy()
        codes = inter[col].to_numpy()
        n = len(users)
        starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if n else np.array([], dtype=int)
        ends = np.r_[starts[1:], n] if n else np.array([], dtype=int)
        out_users, histories, targets = [], [], []
        for s, e in zip(starts, ends, strict=True):
            c = codes[s:e]
            is_target = c == code
            if not is_target.any():
                continue
            in_history = c < code
            target_items = items[s:e][is_target]
            _, first = np.unique(target_items, return_index=True)
            out_users.append(users[s])
            histories.append(items[s:e][in_history].astype(np.int64))
            targets.append(target_items[np.sort(first)].astype(np.int64))
        return EvalCases(np.asarray(out_users, dtype=np.int64), histories, targets)

    def item_popularity(self, scheme: str = SplitScheme.LEAVE_ONE_OUT) -> np.ndarray:
        """[n_items] interaction counts in the scheme's train split."""
        train = self.train_interactions(scheme)
        return np.bincount(train[Col.ITEM_IDX].to_numpy(), minlength=self.n_items).astype(np.int64)

    def item_genre_matrix(self) -> np.ndarray | None:
        """[n_items, n_genres] multi-hot of item genres, or None when items carry no genres."""
        if Col.GENRES not in self.items.columns:
            return None
        genres = self.items[Col.GENRES]
        vocab = sorted({g for gs in genres for g in (gs if gs is not None else [])})
        if not vocab:
            return None
        index = {g: j for j, g in enumerate(vocab)}
        mat = np.zeros((self.n_items, len(vocab)), dtype=np.float32)
        for i, gs in enumerate(genres):
            for g in gs if gs is not None else []:
                mat[i, index[g]] = 1.0
        return mat


def _content_hash(frames: list[pd.DataFrame]) -> str:
    h = hashlib.sha256()
    for frame in frames:
        table = pa.Table.from_pandas(frame, preserve_index=False)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        h.update(sink.getvalue().to_pybytes())
    return "sha256:" + h.hexdigest()


def build_dataset(
    interactions: pd.DataFrame,
    items: pd.DataFrame,
    *,
    name: str,
    source: dict[str, Any],
    timestamp_unit: str,
    users: pd.DataFrame | None = None,
    temporal_quantiles: tuple[float, float] = (0.8, 0.9),
    min_interactions_loo: int = 3,
) -> LogDataset:
    """Turn validated raw frames into the canonical dataset.

    ``interactions`` has ``user_id``, ``item_id`` (strings), ``timestamp`` (int64), ``reward``,
    ``source_row`` and optionally ``propensity``, ``position``, ``policy`` and ``ctx_*`` columns.
    ``items`` has ``item_id`` and ``text`` (plus optional features). Adapters validate before calling this.
    """
    item_ids = _sortable_ids(items[Col.ITEM_ID])
    item_index = pd.Index(item_ids)
    items = items.assign(**{Col.ITEM_ID: items[Col.ITEM_ID].astype(str)})
    items = items.set_index(Col.ITEM_ID).loc[item_ids].reset_index()
    items.insert(0, Col.ITEM_IDX, np.arange(len(items), dtype=np.int32))

    user_ids = _sortable_ids(interactions[Col.USER_ID])
    user_index = pd.Index(user_ids)
    user_frame = pd.DataFrame({Col.USER_IDX: np.arange(len(user_ids), dtype=np.int32), Col.USER_ID: user_ids})
    if users is not None:
        extra = users.assign(**{Col.USER_ID: users[Col.USER_ID].astype(str)}).drop_duplicates(Col.USER_ID)
        user_frame = user_frame.merge(extra, on=Col.USER_ID, how="left")

    frame = pd.DataFrame(
        {
            Col.USER_IDX: user_index.get_indexer(interactions[Col.USER_ID].astype(str)).astype(np.int32),
            Col.ITEM_IDX: item_index.get_indexer(interactions[Col.ITEM_ID].astype(str)).astype(np.int32),
            Col.TIMESTAMP: interactions[Col.TIMESTAMP].astype(np.int64).to_numpy(),
            Col.REWARD: interactions[Col.REWARD].astype(np.float32).to_numpy(),
        }
    )
    if (frame[Col.ITEM_IDX] < 0).any():  # adapters validate first; this guards the invariant
        raise ValueError("interactions name items that are not in the items table")
    for optional, dtype in ((Col.PROPENSITY, np.float64), (Col.POSITION, np.int16)):
        if optional in interactions.columns:
            frame[optional] = interactions[optional].astype(dtype).to_numpy()
    if Col.POLICY in interactions.columns:
        frame[Col.POLICY] = interactions[Col.POLICY].astype(str).to_numpy()
    frame[Col.SOURCE_ROW] = interactions[Col.SOURCE_ROW].astype(np.int64).to_numpy()
    for col in interactions.columns:
        if col.startswith(Col.CONTEXT_PREFIX):
            frame[col] = interactions[col].to_numpy()

    # stable: ties in a user's timestamps keep the source file's row order
    frame = frame.sort_values([Col.USER_IDX, Col.TIMESTAMP, Col.SOURCE_ROW], kind="stable").reset_index(
        drop=True
    )
    frame[Col.SPLIT_LOO] = splits.leave_one_out(frame, min_interactions=min_interactions_loo)
    temporal_codes, temporal_info = splits.temporal(
        frame[Col.TIMESTAMP].to_numpy(),
        valid_quantile=temporal_quantiles[0],
        test_quantile=temporal_quantiles[1],
    )
    frame[Col.SPLIT_TEMPORAL] = temporal_codes

    def counts(col: str) -> dict[str, int]:
        c = frame[col].to_numpy()
        return {s: int((c == code).sum()) for s, code in Split.NAMES.items()}

    loo_counts = counts(Col.SPLIT_LOO)
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "source": source,
        "timestamp_unit": timestamp_unit,
        "counts": {
            "interactions": len(frame),
            "users": len(user_frame),
            "items": len(items),
            "items_with_interactions": int(frame[Col.ITEM_IDX].nunique()),
        },
        "files": {"interactions": INTERACTIONS_FILE, "items": ITEMS_FILE, "users": USERS_FILE},
        "id_maps": {
            "users": {"file": USERS_FILE, "index": Col.USER_IDX, "id": Col.USER_ID},
            "items": {"file": ITEMS_FILE, "index": Col.ITEM_IDX, "id": Col.ITEM_ID},
        },
        "columns": {
            "interactions": list(frame.columns),
            "items": list(items.columns),
            "users": list(user_frame.columns),
        },
        "splits": {
            SplitScheme.LEAVE_ONE_OUT: {
                "rule": "per user, ordered by (timestamp, source row): last = test, second-to-last = valid, "
                f"rest = train; users with < {min_interactions_loo} interactions are train-only",
                "min_interactions": min_interactions_loo,
                "eligible_users": loo_counts["test"],
                "counts": loo_counts,
            },
            SplitScheme.TEMPORAL: {**temporal_info, "counts": counts(Col.SPLIT_TEMPORAL)},
        },
    }
    manifest["content_hash"] = _content_hash([frame, items, user_frame])
    return LogDataset(frame, items, user_frame, manifest)
