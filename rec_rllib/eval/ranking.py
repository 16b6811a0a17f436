"""The ranking protocol: full ranking over the catalogue for every evaluated user.

For each user with a held-out interaction in the chosen split, the recommender sees the user's history
(everything before the split, time-ordered), ranks *all* items, with the history's items excluded by
default, and the top K is compared with the held-out items (see :mod:`rec_rllib.eval.metrics`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from rec_rllib.columns import Col, SplitScheme
from rec_rllib.data.dataset import LogDataset
from rec_rllib.eval import metrics as M

if TYPE_CHECKING:
    from rec_rllib.recommender import Recommender

DEFAULT_KS = (5, 10, 20)


@dataclass
class RankingResult:
    """Aggregate metrics (``"HR@10"`` ...) plus per-user values for significance tests."""

    metrics: dict[str, float]
    n_users: int
    per_user: dict[str, np.ndarray] = field(default_factory=dict)
    user_idx: np.ndarray | None = None


def evaluate_ranking(
    recommender: Recommender,
    dataset: LogDataset,
    *,
    scheme: str = SplitScheme.LEAVE_ONE_OUT,
    split: str = "test",
    ks: Sequence[int] = DEFAULT_KS,
    exclude_seen: bool = True,
    batch_size: int = 512,
    item_features: np.ndarray | None = None,
    progress: bool = False,
) -> RankingResult:
    """Evaluate ``recommender`` on ``dataset`` under ``scheme``/``split``.

    ``item_features`` ([n_items, D]) drive intra-list diversity; by default the items' genres are used
    when the dataset has them (diversity is omitted otherwise).
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] <= 0:
        raise ValueError(f"ks must be positive integers, got {ks}")
    cases = dataset.eval_cases(scheme, split)
    if len(cases) == 0:
        raise ValueError(f"{dataset.name}: no users have a {split!r} interaction under the {scheme!r} split")
    kmax = max(ks)
    tops = []
    batches = range(0, len(cases), batch_size)
    for start in tqdm(
        batches, desc=f"{recommender.name} {scheme}/{split}", disable=not progress, leave=False
    ):
        hist = cases.histories[start : start + batch_size]
        tops.append(recommender.recommend(hist, kmax, exclude_seen=exclude_seen).items)
    top = np.concatenate(tops, axis=0)

    train = dataset.train_interactions(scheme)
    n_train_users = int(train[Col.USER_IDX].nunique())
    user_counts = np.bincount(
        train.drop_duplicates([Col.USER_IDX, Col.ITEM_IDX])[Col.ITEM_IDX].to_numpy(),
        minlength=dataset.n_items,
    )
    info = M.self_information(user_counts, n_train_users)
    features = item_features if item_features is not None else dataset.item_genre_matrix()

    out: dict[str, float] = {}
    per_user: dict[str, np.ndarray] = {}
    for k in ks:
        for name, values in M.per_user_ranking_metrics(top, cases.targets, k).items():
            key = f"{name}@{k}"
            per_user[key] = values
            out[key] = float(values.mean())
        out[f"coverage@{k}"] = M.coverage(top[:, :k], dataset.n_items)
        out[f"novelty@{k}"] = M.novelty(top[:, :k], info)
        if features is not None:
            out[f"diversity@{k}"] = M.intra_list_diversity(top[:, :k], features)
    return RankingResult(metrics=out, n_users=len(cases), per_user=per_user, user_idx=cases.user_idx)
