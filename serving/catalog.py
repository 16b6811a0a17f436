"""What the serving layer knows about users and items: external ids, texts, logged histories, popularity.

Read once from a prepared dataset directory (``jobs.prepare`` output). External ids are the source's
own ids (strings), exactly what the logs and the HTTP API use; internal indices are the model's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rec_rllib.columns import Col
from rec_rllib.data.dataset import LogDataset


@dataclass
class ServingCatalog:
    item_ids: list[str]
    """Internal index -> external item id (grows with items added at run time)."""
    texts: list[str]
    user_histories: dict[str, np.ndarray]
    """External user id -> logged items (internal indices), oldest first: the whole log, every split."""
    popularity: np.ndarray
    """[n_items] interaction counts in the log (added items: 0)."""
    item_index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.item_index = {iid: i for i, iid in enumerate(self.item_ids)}

    @classmethod
    def from_dataset(cls, path: str | Path) -> ServingCatalog:
        ds = LogDataset.load(str(path))
        inter = ds.interactions.sort_values([Col.USER_IDX, Col.TIMESTAMP, Col.SOURCE_ROW], kind="stable")
        user_ids = ds.users[Col.USER_ID].astype(str).to_numpy()
        users = inter[Col.USER_IDX].to_numpy()
        items = inter[Col.ITEM_IDX].to_numpy().astype(np.int64)
        bounds = np.flatnonzero(np.diff(users)) + 1
        histories = {
            str(user_ids[users[start]]): chunk
            for start, chunk in zip(np.r_[0, bounds], np.split(items, bounds), strict=True)
            if len(chunk)
        }
        pop = np.bincount(items, minlength=ds.n_items).astype(np.float64)
        return cls(
            item_ids=ds.items[Col.ITEM_ID].astype(str).tolist(),
            texts=ds.items[Col.TEXT].astype(str).tolist(),
            user_histories=histories,
            popularity=pop,
        )

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def add(self, item_id: str, text: str) -> int:
        if item_id in self.item_index:
            return self.item_index[item_id]
        self.item_ids.append(item_id)
        self.texts.append(text)
        self.popularity = np.r_[self.popularity, 0.0]
        self.item_index[item_id] = len(self.item_ids) - 1
        return self.item_index[item_id]

    def indices(self, item_ids: list[str]) -> tuple[list[int], list[str]]:
        """Internal indices of known ids, and the ids that are unknown."""
        known, unknown = [], []
        for iid in item_ids:
            idx = self.item_index.get(str(iid))
            (unknown.append(str(iid)) if idx is None else known.append(idx))
        return known, unknown
