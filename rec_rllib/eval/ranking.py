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
from rec_rllib.data.dataset import EvalCases, LogDataset
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
    history_len: np.ndarray | None = None
    """[n_users] length of each evaluated user's history (what the activity buckets split on)."""


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
    cases: EvalCases | None = None,
    beyond_accuracy: bool = True,
) -> RankingResult:
    """Evaluate ``recommender`` on ``dataset`` under ``scheme``/``split``.

    ``item_features`` ([n_items, D]) drive intra-list diversity; by default the items' genres are used
    when the dataset has them (diversity is omitted otherwise). ``cases`` evaluates those users only (e.g.
    :func:`sample_cases`' fixed sample); ``beyond_accuracy=False`` leaves out coverage, novelty and diversity.
    Users are scored in chunks of at most ``batch_size`` users and :data:`EVAL_CHUNK_CELLS` scores, so memory
    does not grow with the number of users.
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] <= 0:
        raise ValueError(f"ks must be positive integers, got {ks}")
    cases = dataset.eval_cases(scheme, split) if cases is None else cases
    if len(cases) == 0:
        raise ValueError(f"{dataset.name}: no users have a {split!r} interaction under the {scheme!r} split")
    top = top_items(
        recommender,
        cases.histories,
        max(ks),
        exclude_seen=exclude_seen,
        batch_size=batch_size,
        desc=f"{recommender.name} {scheme}/{split}" if progress else None,
    )
    out: dict[str, float] = {}
    per_user: dict[str, np.ndarray] = {}
    for k in ks:
        for name, values in M.per_user_ranking_metrics(top, cases.targets, k).items():
            key = f"{name}@{k}"
            per_user[key] = values
            out[key] = float(values.mean())
    if beyond_accuracy:  # each k's figures together, accuracy first
        out.update(_beyond_accuracy(top, dataset, scheme, ks, item_features))
        out = {key: out[key] for k in ks for key in out if key.endswith(f"@{k}")}
    return RankingResult(
        metrics=out,
        n_users=len(cases),
        per_user=per_user,
        user_idx=cases.user_idx,
        history_len=np.fromiter((len(h) for h in cases.histories), dtype=np.int64, count=len(cases)),
    )


EVAL_CHUNK_CELLS = 1 << 23
"""Most scores (users × items) held at once while evaluating: 32 MB of float32 whatever the catalogue."""


def top_items(
    recommender: Recommender,
    histories: Sequence[np.ndarray],
    k: int,
    *,
    exclude_seen: bool = True,
    batch_size: int = 512,
    desc: str | None = None,
) -> np.ndarray:
    """[U, k] each history's top ``k`` items, scored in chunks of users (a fresh state first)."""
    recommender.reset()  # a stateful policy answers these users from a fresh state, in case order
    chunk = max(1, min(batch_size, EVAL_CHUNK_CELLS // max(recommender.n_items, 1)))
    tops = [
        recommender.recommend(histories[start : start + chunk], k, exclude_seen=exclude_seen).items
        for start in tqdm(range(0, len(histories), chunk), desc=desc, disable=desc is None, leave=False)
    ]
    return np.concatenate(tops, axis=0) if tops else np.zeros((0, k), dtype=np.int64)


def sample_cases(cases: EvalCases, max_users: int, *, seed: int = 0) -> EvalCases:
    """A fixed, seeded sample of at most ``max_users`` evaluation cases (all of them when there are fewer or
    ``max_users`` is 0), in their original order."""
    if not max_users or len(cases) <= max_users:
        return cases
    keep = np.sort(np.random.default_rng(seed).choice(len(cases), max_users, replace=False))
    return EvalCases(
        cases.user_idx[keep], [cases.histories[i] for i in keep], [cases.targets[i] for i in keep]
    )


def _beyond_accuracy(
    top: np.ndarray, dataset: LogDataset, scheme: str, ks: Sequence[int], item_features: np.ndarray | None
) -> dict[str, float]:
    """coverage@k, novelty@k and (with item features or genres) diversity@k of the lists ``top``."""
    train = dataset.train_interactions(scheme)
    n_train_users = int(train[Col.USER_IDX].nunique())
    user_counts = np.bincount(
        train.drop_duplicates([Col.USER_IDX, Col.ITEM_IDX])[Col.ITEM_IDX].to_numpy(),
        minlength=dataset.n_items,
    )
    info = M.self_information(user_counts, n_train_users)
    features = item_features if item_features is not None else dataset.item_genre_matrix()
    out: dict[str, float] = {}
    for k in ks:
        out[f"coverage@{k}"] = M.coverage(top[:, :k], dataset.n_items)
        out[f"novelty@{k}"] = M.novelty(top[:, :k], info)
        if features is not None:
            out[f"diversity@{k}"] = M.intra_list_diversity(top[:, :k], features)
    return out


# -- analysis on per-user values ---------------------------------------------------------------------------
BOOT_CELLS = 1 << 22
"""User draws per block of bootstrap resamples (32 MB of indices)."""


def bootstrap_ci(
    values: np.ndarray, *, level: float = 0.95, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of per-user values. The resamples are drawn a block of rows
    at a time (about :data:`BOOT_CELLS` user draws): memory stays bounded for any number of users, and the
    draws are the ones a single ``(n_boot, users)`` draw makes."""
    rng = np.random.default_rng(seed)
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    rows = max(1, BOOT_CELLS // max(n, 1))
    means = np.concatenate(
        [values[rng.integers(0, n, (min(rows, n_boot - r), n))].mean(axis=1) for r in range(0, n_boot, rows)]
    )
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def activity_buckets(
    result: RankingResult,
    metrics: Sequence[str] = ("HR@10", "NDCG@10", "MRR@10"),
) -> dict[str, dict[str, float]]:
    """Metrics per user-activity bucket: cold / medium / heavy = the evaluated users' history-length
    terciles (labels carry the ranges, e.g. ``"cold (0-31)"``)."""
    if result.history_len is None or not result.per_user:
        raise ValueError("this result has no per-user values; evaluate with evaluate_ranking")
    h = result.history_len
    lo, hi = np.quantile(h, [1 / 3, 2 / 3])
    groups = {"cold": h <= lo, "medium": (h > lo) & (h <= hi), "heavy": h > hi}
    out = {}
    for name, mask in groups.items():
        if not mask.any():
            continue
        label = f"{name} ({int(h[mask].min())}-{int(h[mask].max())})"
        out[label] = {"users": float(mask.sum())}
        out[label].update(
            {m: float(result.per_user[m][mask].mean()) for m in metrics if m in result.per_user}
        )
    return out


def paired_comparison(
    a: RankingResult, b: RankingResult, metric: str = "NDCG@10", *, n_boot: int = 2000, seed: int = 0
) -> dict[str, float]:
    """``b - a`` on the same users: mean difference, 95% paired-bootstrap interval, paired t-test p-value."""
    from scipy import stats

    if a.user_idx is None or b.user_idx is None or not np.array_equal(a.user_idx, b.user_idx):
        raise ValueError("paired comparison needs both models evaluated on the same users, same split")
    diff = b.per_user[metric] - a.per_user[metric]
    lo, hi = bootstrap_ci(diff, n_boot=n_boot, seed=seed)
    p = float(stats.ttest_rel(b.per_user[metric], a.per_user[metric]).pvalue) if diff.any() else 1.0
    return {"diff": float(diff.mean()), "low": lo, "high": hi, "p_value": p, "users": float(len(diff))}
