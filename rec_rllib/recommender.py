"""The one interface every policy is evaluated and served through.

A :class:`Recommender` maps user histories (item indices, oldest first) to scores over the whole
catalogue; :meth:`Recommender.recommend` turns scores into a ranked list with the **propensity** of each
shown item: the probability that the policy puts that item at that position (1 for a deterministic
policy). Baselines, the fine-tuned transformer and the RL policy all implement it, so one evaluation
(:mod:`rec_rllib.eval`) and one serving path judge them all.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rec_rllib.topk import topk


@dataclass
class Recommendations:
    """A batch of ranked lists."""

    items: np.ndarray
    """[B, k] item indices, best first."""
    scores: np.ndarray
    """[B, k] the policy's scores of those items."""
    propensities: np.ndarray
    """[B, k] probability that the policy shows that item at that position."""


class Recommender(ABC):
    """History -> scores over all items -> ranked items with scores and propensities."""

    name: str = "recommender"
    n_items: int

    @abstractmethod
    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        """[B, n_items] float scores for a batch of histories (higher = better)."""

    def propensities(
        self, items: np.ndarray, histories: Sequence[np.ndarray], exclude_seen: bool
    ) -> np.ndarray:
        """[B, k] propensities of the shown items; deterministic policies show their top-k with probability
        1."""
        return np.ones(items.shape, dtype=np.float64)

    def reset(self) -> None:
        """Forget what earlier answers left behind (a policy with state, e.g. an exposure tracker); an
        evaluation starts with it."""
        return None  # stateless by default

    def recommend(
        self, histories: Sequence[np.ndarray], k: int, *, exclude_seen: bool = True
    ) -> Recommendations:
        """Top-``k`` items per history, excluding the history's items unless ``exclude_seen`` is False."""
        if not 0 < k <= self.n_items:
            raise ValueError(f"k must be in [1, {self.n_items}] (the catalogue size), got {k}")
        scores = self.score(histories)
        items = topk(scores, k, exclude=histories if exclude_seen else None)
        return Recommendations(
            items=items,
            scores=np.take_along_axis(scores, items, axis=1),
            propensities=self.propensities(items, histories, exclude_seen),
        )
