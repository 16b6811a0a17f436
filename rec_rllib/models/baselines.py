"""Non-learned baselines: uniform random and train-split popularity."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rec_rllib.columns import SplitScheme
from rec_rllib.data.dataset import LogDataset
from rec_rllib.recommender import Recommender


class RandomRecommender(Recommender):
    """Uniformly random ranking of the candidate items (seeded, so a run is reproducible)."""

    name = "random"

    def __init__(self, n_items: int, *, seed: int = 0):
        self.n_items = n_items
        self._rng = np.random.default_rng(seed)

    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        return self._rng.random((len(histories), self.n_items))

    def propensities(
        self, items: np.ndarray, histories: Sequence[np.ndarray], exclude_seen: bool
    ) -> np.ndarray:
        # every candidate is equally likely at every position: 1 / number of candidates
        if exclude_seen:
            n_cand = np.array([self.n_items - len(np.unique(h)) for h in histories], dtype=np.float64)
        else:
            n_cand = np.full(len(histories), float(self.n_items))
        return np.broadcast_to(1.0 / np.maximum(n_cand, 1.0)[:, None], items.shape).copy()


class PopularityRecommender(Recommender):
    """Ranks items by their interaction count in the training split (ties: lower item index first)."""

    name = "popularity"

    def __init__(self, counts: np.ndarray):
        self.counts = np.asarray(counts, dtype=np.float64)
        self.n_items = len(self.counts)

    @classmethod
    def fit(cls, dataset: LogDataset, scheme: str = SplitScheme.LEAVE_ONE_OUT) -> PopularityRecommender:
        return cls(dataset.item_popularity(scheme))

    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        return np.broadcast_to(self.counts, (len(histories), self.n_items))


BASELINES = ("random", "popularity")


def make_baseline(
    name: str, dataset: LogDataset, *, scheme: str = SplitScheme.LEAVE_ONE_OUT, seed: int = 0
) -> Recommender:
    """A baseline by name, fitted on ``dataset``'s train split under ``scheme``."""
    if name == "random":
        return RandomRecommender(dataset.n_items, seed=seed)
    if name == "popularity":
        return PopularityRecommender.fit(dataset, scheme)
    raise ValueError(f"unknown baseline {name!r}; expected one of {BASELINES}")
