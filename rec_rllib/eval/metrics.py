"""Ranking metrics, vectorised over users: one module that every evaluation in the project uses.

Inputs are a top-K matrix of item indices ``[U, K]`` (best first) and per-user target sets. Definitions
(``rel_u`` = the user's held-out items, ``hit_u(j)`` = the item at rank j (0-based) is in ``rel_u``):

* HR@K = 1 if any of the top K is relevant.
* NDCG@K = sum_j hit_u(j) / log2(j + 2), divided by the ideal DCG of min(|rel_u|, K) hits.
* MRR@K = 1 / (1 + rank of the first hit), 0 without a hit in the top K.
* Precision@K = hits / K; Recall@K = hits / |rel_u|.
* Coverage@K = distinct items recommended to anyone / catalogue size.
* Novelty@K = mean self-information -log2(p_i) of recommended items, p_i = fraction of train users who
  interacted with item i (items nobody touched get p = 1 / (n_users + 1)).
* Intra-list diversity@K = mean over users of the mean pairwise distance (1 - cosine similarity) between
  the features (genre multi-hot, or embeddings) of the items in the list.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RANKING_METRICS = ("HR", "NDCG", "MRR", "precision", "recall")


def hit_matrix(top: np.ndarray, targets: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(hits [U, K] bool, n_relevant [U]) for a top-K matrix and per-user target arrays."""
    n_rel = np.fromiter((len(t) for t in targets), dtype=np.int64, count=len(targets))
    if len(targets) and n_rel.max() == 1 and n_rel.min() == 1:
        single = np.fromiter((t[0] for t in targets), dtype=np.int64, count=len(targets))
        return top == single[:, None], n_rel
    hits = np.zeros(top.shape, dtype=bool)
    for u, t in enumerate(targets):
        if len(t):
            hits[u] = np.isin(top[u], t)
    return hits, n_rel


def per_user_ranking_metrics(top: np.ndarray, targets: Sequence[np.ndarray], k: int) -> dict[str, np.ndarray]:
    """Per-user arrays of HR/NDCG/MRR/precision/recall at ``k`` (``top`` may be wider than k)."""
    hits, n_rel = hit_matrix(top[:, :k], targets)
    discounts = 1.0 / np.log2(np.arange(k) + 2.0)
    dcg = (hits * discounts).sum(axis=1)
    ideal_counts = np.minimum(n_rel, k)
    idcg = np.cumsum(discounts)[np.maximum(ideal_counts - 1, 0)] * (ideal_counts > 0)
    any_hit = hits.any(axis=1)
    first = np.where(any_hit, hits.argmax(axis=1), 0)
    n_hits = hits.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "HR": any_hit.astype(np.float64),
            "NDCG": np.where(idcg > 0, dcg / np.where(idcg > 0, idcg, 1.0), 0.0),
            "MRR": np.where(any_hit, 1.0 / (first + 1.0), 0.0),
            "precision": n_hits / k,
            "recall": np.where(n_rel > 0, n_hits / np.maximum(n_rel, 1), 0.0),
        }


def coverage(top: np.ndarray, n_items: int) -> float:
    """Fraction of the catalogue that appears in at least one list."""
    return float(len(np.unique(top)) / n_items) if top.size else 0.0


def self_information(item_user_counts: np.ndarray, n_users: int) -> np.ndarray:
    """[n_items] -log2(p_i), p_i = fraction of users who interacted with item i (floored at 1/(n_users+1))."""
    counts = np.asarray(item_user_counts, dtype=np.float64)
    p = np.where(counts > 0, counts / max(n_users, 1), 1.0 / (n_users + 1))
    return -np.log2(np.minimum(p, 1.0))


def novelty(top: np.ndarray, info: np.ndarray) -> float:
    """Mean self-information of recommended items (higher = less popular picks)."""
    return float(info[top].mean()) if top.size else 0.0


def intra_list_diversity(top: np.ndarray, features: np.ndarray) -> float:
    """Mean pairwise (1 - cosine similarity) of item features within each list, averaged over lists."""
    k = top.shape[1]
    if k < 2 or top.size == 0:
        return 0.0
    f = np.asarray(features, dtype=np.float64)
    norms = np.linalg.norm(f, axis=1, keepdims=True)
    f = f / np.where(norms > 0, norms, 1.0)
    vecs = f[top]  # [U, K, D]
    sims = np.einsum("ukd,ujd->ukj", vecs, vecs)  # [U, K, K]
    off_diag = (sims.sum(axis=(1, 2)) - np.trace(sims, axis1=1, axis2=2)) / (k * (k - 1))
    return float((1.0 - off_diag).mean())
