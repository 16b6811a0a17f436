"""Ranking metrics against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rec_rllib.eval import metrics as M
from rec_rllib.topk import topk


def test_topk_orders_by_score_and_breaks_ties_by_index():
    scores = np.array([[0.1, 0.5, 0.5, 0.9, 0.0]])
    assert topk(scores, 3).tolist() == [[3, 1, 2]]


def test_topk_excludes_seen_items():
    scores = np.array([[0.1, 0.5, 0.4, 0.9], [0.9, 0.8, 0.7, 0.6]])
    top = topk(scores, 2, exclude=[np.array([3]), np.array([0, 1])])
    assert top.tolist() == [[1, 2], [2, 3]]


@pytest.mark.parametrize("k", [0, -1, 6])
def test_topk_rejects_bad_k(k):
    with pytest.raises(ValueError):
        topk(np.zeros((1, 5)), k)


def test_single_target_metrics_by_hand():
    top = np.array([[5, 2, 7, 1], [0, 1, 2, 3], [9, 8, 7, 6]])
    targets = [np.array([7]), np.array([0]), np.array([4])]
    m = M.per_user_ranking_metrics(top, targets, k=4)
    assert m["HR"].tolist() == [1.0, 1.0, 0.0]
    np.testing.assert_allclose(m["NDCG"], [1 / math.log2(4), 1.0, 0.0])
    np.testing.assert_allclose(m["MRR"], [1 / 3, 1.0, 0.0])
    np.testing.assert_allclose(m["precision"], [0.25, 0.25, 0.0])
    # cut-off below the hit's rank: the first user's hit (rank 3) no longer counts at K=2
    m2 = M.per_user_ranking_metrics(top, targets, k=2)
    assert m2["HR"].tolist() == [0.0, 1.0, 0.0]


def test_multi_target_metrics_by_hand():
    top = np.array([[1, 2, 3, 4, 5]])
    targets = [np.array([2, 5, 9])]
    m = M.per_user_ranking_metrics(top, targets, k=5)
    dcg = 1 / math.log2(3) + 1 / math.log2(6)
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert m["NDCG"][0] == pytest.approx(dcg / idcg)
    assert m["MRR"][0] == pytest.approx(0.5)
    assert m["precision"][0] == pytest.approx(2 / 5)
    assert m["recall"][0] == pytest.approx(2 / 3)


def test_coverage_novelty_diversity_by_hand():
    top = np.array([[0, 1], [0, 2]])
    assert M.coverage(top, 10) == pytest.approx(0.3)
    info = M.self_information(np.array([4, 2, 1, 0]), n_users=4)
    np.testing.assert_allclose(info, [0.0, 1.0, 2.0, math.log2(5)])
    assert M.novelty(top, info) == pytest.approx((0 + 1 + 0 + 2) / 4)
    feats = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # list 1: identical items (distance 0); list 2: orthogonal (distance 1)
    assert M.intra_list_diversity(top, feats) == pytest.approx(0.5)


def test_bootstrap_intervals_drawn_in_blocks_equal_one_draw(monkeypatch):
    """The resamples are drawn a block of rows at a time (memory bounded for any number of users): the same
    draws, hence the same interval, as one draw of every resample at once."""
    from rec_rllib.eval import ranking

    values = np.random.default_rng(1).random(1_001)
    whole = ranking.bootstrap_ci(values, n_boot=300, seed=4)
    rng = np.random.default_rng(4)
    means = values[rng.integers(0, len(values), (300, len(values)))].mean(axis=1)
    assert whole == tuple(float(q) for q in np.quantile(means, [0.025, 0.975]))
    monkeypatch.setattr(ranking, "BOOT_CELLS", 7 * len(values))  # blocks of 7 resamples, the last one short
    assert ranking.bootstrap_ci(values, n_boot=300, seed=4) == whole
