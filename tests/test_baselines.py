"""Baselines under the leave-one-out full-ranking protocol on the real MovieLens-100K."""

from __future__ import annotations

import numpy as np
import pytest

from rec_rllib.data import LogDataset
from rec_rllib.eval import evaluate_ranking
from rec_rllib.models import PopularityRecommender, RandomRecommender, make_baseline


@pytest.mark.parametrize(
    ("split", "hr", "ndcg"),
    [("test", 0.0859, 0.0449), ("valid", 0.0742, 0.0345)],
)
def test_popularity_matches_the_independent_protocol(ml100k: LogDataset, split, hr, ndcg):
    res = evaluate_ranking(make_baseline("popularity", ml100k), ml100k, split=split)
    assert res.n_users == 943
    assert res.metrics["HR@10"] == pytest.approx(hr, abs=0.003)
    assert res.metrics["NDCG@10"] == pytest.approx(ndcg, abs=0.003)


def test_random_is_near_chance_and_covers_the_catalogue(ml100k: LogDataset):
    res = evaluate_ranking(RandomRecommender(ml100k.n_items, seed=1), ml100k)
    # chance HR@10 = 10 / ~1570 candidates ~ 0.0064; 943 users -> sd ~ 0.0026
    assert res.metrics["HR@10"] < 0.025
    assert res.metrics["coverage@10"] > 0.95
    pop = evaluate_ranking(make_baseline("popularity", ml100k), ml100k)
    assert res.metrics["novelty@10"] > pop.metrics["novelty@10"] + 2.0  # long-tail picks are more novel


def test_popularity_is_deterministic_and_excludes_history(ml100k: LogDataset):
    pop = PopularityRecommender.fit(ml100k)
    cases = ml100k.eval_cases("loo", "test")
    recs = pop.recommend(cases.histories[:20], 10)
    for h, items in zip(cases.histories[:20], recs.items, strict=True):
        assert not set(items) & set(h)
    np.testing.assert_array_equal(recs.propensities, 1.0)
    assert (np.diff(recs.scores, axis=1) <= 0).all()


def test_random_propensities_are_one_over_candidates(ml100k: LogDataset):
    rec = RandomRecommender(ml100k.n_items)
    h = [np.array([0, 1, 2]), np.array([], dtype=np.int64)]
    out = rec.recommend(h, 5)
    np.testing.assert_allclose(out.propensities[0], 1 / (ml100k.n_items - 3))
    np.testing.assert_allclose(out.propensities[1], 1 / ml100k.n_items)
    with pytest.raises(ValueError, match="k must be in"):
        rec.recommend(h, ml100k.n_items + 1)
