"""The exposure slot (rec_rllib.exposure): its rule by hand, and what it does on the real MovieLens-100K."""

from __future__ import annotations

import numpy as np
import pytest

from rec_rllib.data import LogDataset
from rec_rllib.eval import evaluate_ranking
from rec_rllib.eval.ranking import paired_comparison
from rec_rllib.exposure import ExposureAwareRecommender, ExposureConfig, ExposureTracker
from rec_rllib.models import load_recommender, make_baseline

NEG = -np.inf


def test_the_last_position_goes_to_the_best_unexposed_candidate_in_the_pool():
    t = ExposureTracker(8, ExposureConfig(slots=1, pool=3, window=100))
    scores = np.array([8.0, 7, 6, 5, 4, 3, 2, 1])
    first, replaced = t.slate(scores, 3)
    np.testing.assert_array_equal(first, [0, 1, 2])  # nothing shown yet: the plain top 3
    assert not replaced.any()
    second, replaced = t.slate(scores, 3)
    np.testing.assert_array_equal(second, [0, 1, 3])  # item 2 is on display already; 3 is not
    np.testing.assert_array_equal(replaced, [False, False, True])
    third, _ = t.slate(scores, 3)
    np.testing.assert_array_equal(third, [0, 1, 4])
    # excluded items (-inf) are never candidates; the pool ends after `pool` items below the slate
    s = scores.copy()
    s[5] = NEG
    fourth, _ = t.slate(s, 3)
    np.testing.assert_array_equal(fourth, [0, 1, 6])
    fifth, replaced = t.slate(s, 3)  # the pool (items 3, 4, 6) is all on display: no swap
    np.testing.assert_array_equal(fifth, [0, 1, 2])
    assert not replaced.any()
    np.testing.assert_array_equal(t.counts, [5, 5, 2, 1, 1, 0, 1, 0])
    assert (t.answers, t.swaps) == (5, 3)


def test_with_a_refresh_every_answer_of_an_epoch_is_priced_alike():
    """refresh 3: the counts that price answers and choose the slot's items move every third answer, so the
    same scores get the same slate within an epoch; the live counts still follow every answer; refresh 1
    (the default) prices each answer by everything shown before it, as above."""
    t = ExposureTracker(
        8, ExposureConfig(slots=1, pool=3, window=100, penalty=0.5, shape="indicator", refresh=3)
    )
    scores = np.array([8.0, 7, 6, 5, 4, 3, 2, 1])
    slates = []
    for _ in range(6):
        epoch = t.epoch
        row, _ = t.slate(scores, 3)
        slates.append((epoch, row.tolist()))
    assert [e for e, _ in slates] == [0, 0, 0, 1, 1, 1]
    assert slates[0][1] == slates[1][1] == slates[2][1] == [0, 1, 2]  # nothing priced yet
    # epoch 1 prices items 0, 1, 2 (each shown 3 times) at β 0.5 and the slot gives the last position to the
    # best candidate not on display then, for all three answers
    assert slates[3][1] == slates[4][1] == slates[5][1] == [0, 1, 3]
    np.testing.assert_array_equal(t.counts[:5], [6, 6, 3, 3, 0])  # the live counts follow every answer
    np.testing.assert_array_equal(t.priced[:5], [6, 6, 3, 3, 0])  # updated after the sixth answer
    t.grow(10)
    assert len(t.priced) == len(t.counts) == 10 and t.priced is not t.counts


def test_first_position_is_never_replaced_and_two_slots_keep_score_order():
    t = ExposureTracker(10, ExposureConfig(slots=5, pool=6, window=100))
    scores = np.linspace(10, 1, 10)
    t.slate(scores, 4)  # shows 0-3
    items, replaced = t.slate(scores, 4)
    np.testing.assert_array_equal(items, [0, 4, 5, 6])  # positions 2-4 replaced, position 1 kept
    np.testing.assert_array_equal(replaced, [False, True, True, True])
    single, replaced = ExposureTracker(3, ExposureConfig(slots=1, pool=2)).slate(np.ones(3), 1)
    assert len(single) == 1 and not replaced.any()


def test_the_window_forgets_old_slates_and_new_items_start_unexposed():
    t = ExposureTracker(6, ExposureConfig(slots=1, pool=4, window=3))
    scores = np.array([6.0, 5, 4, 3, 2, 1])
    t.slate(scores, 3)
    np.testing.assert_array_equal(t.counts, [1, 1, 1, 0, 0, 0])
    t.record(np.array([5]))  # evicts item 0's position
    np.testing.assert_array_equal(t.counts, [0, 1, 1, 0, 0, 1])
    assert t.exposed_share() == pytest.approx(0.5)
    t.grow(8)
    assert t.n_items == 8 and t.counts[6:].tolist() == [0, 0]
    with pytest.raises(ValueError, match="scores cover 6 items, the tracker 8"):
        t.slate(scores, 2)


def test_an_exposure_penalty_lowers_what_is_on_display_by_its_log_count(ml100k: LogDataset):
    t = ExposureTracker(4, ExposureConfig(slots=0, penalty=1.0, window=100))
    scores = np.array([3.0, 2.5, 2.0, 0.0])
    np.testing.assert_array_equal(t.slate(scores, 2)[0], [0, 1])  # nothing shown yet: the plain top 2
    # 0 and 1 now shown once: 3 - log 2 = 2.31, 2.5 - log 2 = 1.81 < 2.0
    np.testing.assert_array_equal(t.slate(scores, 2)[0], [0, 2])
    # counts [2, 1, 1, 0]: 3 - log 3 = 1.90, 2.5 - log 2 = 1.81, 2 - log 2 = 1.31
    np.testing.assert_array_equal(t.slate(scores, 2)[0], [0, 1])
    with pytest.raises(ValueError, match="penalty must be a finite number"):
        ExposureConfig(penalty=float("nan"))
    # a policy with a penalty gets the slot on top of it (one tracker), and every evaluation starts afresh
    pop = make_baseline("popularity", ml100k)
    penalised = ExposureAwareRecommender(pop, ExposureConfig(slots=0, penalty=20.0))  # scores: counts
    both = ExposureAwareRecommender(penalised, ExposureConfig(slots=1))
    assert both.base is pop and (both.cfg.slots, both.cfg.penalty) == (1, 20.0)
    first, again = evaluate_ranking(penalised, ml100k), evaluate_ranking(penalised, ml100k)
    assert first.metrics == again.metrics
    plain = evaluate_ranking(pop, ml100k)
    assert first.metrics["coverage@10"] > 1.1 * plain.metrics["coverage@10"]  # 0.054 -> 0.063
    assert evaluate_ranking(both, ml100k).metrics["coverage@10"] > first.metrics["coverage@10"]


@pytest.mark.parametrize("shape", ["log", "indicator"])
@pytest.mark.parametrize("refresh", [1, 3])
def test_the_prices_of_some_items_are_those_of_every_item_at_them(shape, refresh):
    """What a pooled answer reads (the pool's prices) equals what the whole catalogue's prices say of those
    items, before and after a price update; items beyond the tracker's catalogue are unpriced."""
    t = ExposureTracker(50, ExposureConfig(slots=0, penalty=0.7, window=20, shape=shape, refresh=refresh))
    rng = np.random.default_rng(0)
    items = np.array([0, 3, 7, 11, 49, 60, 3])
    for _ in range(7):
        np.testing.assert_array_equal(t.penalties_at(items), t.penalties(61)[items])
        t.record(rng.choice(20, size=4, replace=False))
    assert t.penalties(61)[items].any()


def test_an_indicator_penalty_lowers_everything_on_display_alike(ml100k: LogDataset):
    """shape="indicator": β once an item is on display, however often; the order among displayed items stays
    (the log shape pushes the most shown item down ever further)."""
    scores = np.array([3.0, 2.2, 2.0, 0.0])
    ind = ExposureTracker(4, ExposureConfig(slots=0, penalty=0.5, window=100, shape="indicator"))
    log = ExposureTracker(4, ExposureConfig(slots=0, penalty=0.5, window=100))
    np.testing.assert_array_equal(ind.slate(scores, 2)[0], [0, 1])
    np.testing.assert_array_equal(ind.slate(scores, 2)[0], [0, 2])  # 2.5, 1.7 vs 2.0 unshown
    tops_ind = [int(ind.slate(scores, 1)[0][0]) for _ in range(20)]
    tops_log = [int(log.slate(scores, 1)[0][0]) for _ in range(20)]
    assert set(tops_ind) == {0}  # 3 - 0.5 = 2.5 stays above 2.2 - 0.5 and 2 - 0.5
    # log: 3 - 0.5 · log(1 + 4) = 2.195 < 2.2, item 1 takes over after four showings of item 0
    assert tops_log[:4] == [0] * 4 and tops_log[4] == 1
    np.testing.assert_allclose(ind.penalties(4), 0.5 * (ind.counts > 0))
    with pytest.raises(ValueError, match="unknown exposure shape 'sqrt'"):
        ExposureConfig(shape="sqrt")
    # a policy's shape travels with its penalty when the slot is put on top
    pop = ExposureAwareRecommender(
        make_baseline("popularity", ml100k), ExposureConfig(slots=0, penalty=1.0, shape="indicator")
    )
    assert ExposureAwareRecommender(pop, ExposureConfig(slots=1)).cfg.shape == "indicator"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"slots": -1}, "exposure slots must be a non-negative integer"),
        ({"pool": 0}, "needs pool >= 1"),
        ({"window": 2.5}, "exposure window"),
        ({"refresh": 0}, "exposure refresh must be an integer >= 1"),
    ],
)
def test_bad_settings_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ExposureConfig(**kwargs)


def test_popularity_with_the_exposure_slot_covers_far_more_of_the_catalogue(ml100k: LogDataset):
    pop = make_baseline("popularity", ml100k)
    plain = evaluate_ranking(pop, ml100k)
    wide = ExposureAwareRecommender(pop, ExposureConfig(slots=1, pool=40))
    widened = evaluate_ranking(wide, ml100k)
    assert wide.name == "popularity+exposure"
    # popularity shows nearly everybody the same ~60 items; the 10th slot walks down the chart instead
    assert plain.metrics["coverage@10"] < 0.06
    assert widened.metrics["coverage@10"] > plain.metrics["coverage@10"] + 0.015
    # the first nine positions are untouched
    cases = ml100k.eval_cases("loo", "test")
    a = pop.recommend(cases.histories[:50], 10).items
    wide.reset()
    b = wide.recommend(cases.histories[:50], 10).items
    np.testing.assert_array_equal(a[:, :9], b[:, :9])
    assert (a[:, 9] != b[:, 9]).sum() > 25


def test_fine_tuned_model_gains_coverage_without_losing_accuracy(ml100k: LogDataset, finetuned_run: str):
    """The issue's accuracy-coverage target on the real data, with the small fine-tuned model of the suite."""
    rec = load_recommender(finetuned_run, ml100k)
    plain = evaluate_ranking(rec, ml100k)
    widened = evaluate_ranking(ExposureAwareRecommender(rec), ml100k)
    print(
        f"coverage@10 {plain.metrics['coverage@10']:.4f} -> {widened.metrics['coverage@10']:.4f}, "
        f"NDCG@10 {plain.metrics['NDCG@10']:.4f} -> {widened.metrics['NDCG@10']:.4f}"
    )
    assert widened.metrics["coverage@10"] >= 1.25 * plain.metrics["coverage@10"]
    diff = paired_comparison(plain, widened, "NDCG@10")
    assert widened.metrics["NDCG@10"] >= 0.98 * plain.metrics["NDCG@10"]
    assert diff["p_value"] > 0.05 or diff["diff"] > 0  # no significant loss


def test_partial_ranking_orders_and_breaks_ties_like_the_shared_topk():
    from rec_rllib.exposure import _top
    from rec_rllib.topk import topk

    rng = np.random.default_rng(0)
    for _ in range(300):
        s = rng.integers(0, 15, size=200).astype(float)  # many ties
        s[rng.integers(0, 200, 30)] = NEG
        depth = int(rng.integers(1, 201))
        np.testing.assert_array_equal(_top(s, depth), topk(s[None], depth)[0])


def test_the_items_on_display_are_listed_at_the_cost_of_the_display():
    """``on_display`` lists exactly the items with a count above 0, as the window slides and the catalogue
    grows, and its ``top`` the most shown (ties to the lower item)."""
    tracker = ExposureTracker(50, ExposureConfig(slots=0, window=30))
    rng = np.random.default_rng(4)
    for step in range(400):
        tracker.record(rng.integers(0, tracker.n_items, size=int(rng.integers(1, 6))))
        if step == 200:
            tracker.grow(60)
            tracker.record(np.array([59, 59]))
        items, counts = tracker.on_display()
        assert sorted(items.tolist()) == np.flatnonzero(tracker.counts).tolist()
        assert np.array_equal(counts, tracker.counts[items])
        top, top_counts = tracker.on_display(top=5)
        order = np.lexsort((np.arange(tracker.n_items), -tracker.counts))[:5]
        assert sorted(top.tolist()) == sorted([i for i in order.tolist() if tracker.counts[i] > 0][:5])
        assert np.array_equal(top_counts, tracker.counts[top])
