"""Off-policy estimation in blocks: the same estimates as the whole-array computation, on the Open Bandit
Dataset sample and on a Serve log written in the server's format, with memory that does not grow with
answers × catalogue."""

from __future__ import annotations

import numpy as np
import pytest

from rec_rllib.eval import ope

FIELDS = ("value", "low", "high")


def _same_estimates(got: dict, want: dict, *, rel: float = 1e-9) -> None:
    for field in FIELDS:
        assert got[field] == pytest.approx(want[field], rel=rel, abs=1e-12), (field, got, want)
    if "slope_step" in want:
        assert got["slope_step"] == want["slope_step"]


def test_block_statistics_give_the_whole_array_estimates_on_the_obd_sample(obd_all):
    """Every estimator (replay aside: the target is stochastic) from statistics formed 997 rounds at a time
    with the factored cross-fit equals the estimate from the whole [n, A, K] distribution and the dense
    cross-fit, interval included; the factored cross-fit's predictions are the dense ones."""
    from rec_rllib.eval import obd

    log = obd.obd_feedback(obd_all, "random", context=False)
    bts = obd.obd_feedback(obd_all, "bts", context=False)
    prior = obd.bts_action_dist("empirical", dataset=obd_all, campaign="all", bts_log=bts)
    # a distribution per round: the BTS one, tilted per round so that rounds differ
    tilt = np.random.default_rng(1).gamma(4.0, 0.25, (log.n, log.n_actions, 1))
    pi = prior[None] * tilt
    pi /= pi.sum(axis=1, keepdims=True)
    dense_q = ope.cross_fit(ope.PositionCTRModel, log, folds=3, seed=4)
    folded = ope.cross_fit_ctr(log, folds=3, seed=4)
    assert np.array_equal(folded.predict(log), dense_q)

    builder = ope.TargetStatsBuilder(log, folded, slope=True)
    rows_pi = pi[np.arange(log.n), :, log.position]
    for start in range(0, log.n, 997):
        rows = np.arange(start, min(start + 997, log.n))
        builder.add(rows, rows_pi[rows])
    stats = builder.finish()
    for name in ("ips", "snips", "dm", "dr", "sndr", "switch-dr", "slope"):
        want = ope.estimate(name, log, pi, dense_q, n_boot=200, seed=2).to_dict()
        got = ope.estimate_stats(name, log, stats, n_boot=200, seed=2).to_dict()
        _same_estimates(got, want)
    with pytest.raises(ValueError, match="deterministic"):
        ope.estimate_stats("replay", log, stats)
    half = ope.TargetStatsBuilder(log, folded, slope=False)
    half.add(np.arange(10), rows_pi[:10])
    with pytest.raises(ValueError, match="round 10 .* never added"):
        half.finish()


def test_a_long_log_resamples_groups_of_consecutive_rounds(obd_all, monkeypatch):
    """Past SLOPE_GROUP_CELLS, SLOPE's bootstrap resamples groups of consecutive rounds: each resample's refit
    and target mass are those of per-round weights equal to their group's Poisson count, whatever the order
    the blocks come in; the full fit's values are unchanged."""
    from rec_rllib.eval import obd

    log = obd.obd_feedback(obd_all, "random", context=False)
    pi = np.random.default_rng(1).dirichlet(np.ones(log.n_actions), size=(log.n, log.n_positions))
    pi = pi.transpose(0, 2, 1)  # [n, A, K]: a distribution over the actions per round and position
    rows_pi = pi[np.arange(log.n), :, log.position]
    folded = ope.cross_fit_ctr(log, folds=3, seed=4)
    whole = ope.TargetStats.from_dense(pi, log, folded, slope=True)
    groups = 37
    monkeypatch.setattr(ope, "SLOPE_GROUP_CELLS", groups * log.n_positions * log.n_actions)
    builder = ope.TargetStatsBuilder(log, folded, slope=True)
    order = np.random.default_rng(2).permutation(log.n)
    for start in range(0, log.n, 997):  # blocks of shuffled rounds
        rows = order[start : start + 997]
        builder.add(rows, rows_pi[rows])
    stats = builder.finish()
    assert np.allclose(stats.slope.values, whole.slope.values, rtol=1e-12)
    assert np.allclose(stats.dm, whole.dm, rtol=1e-12) and np.array_equal(stats.pi_logged, whole.pi_logged)
    group = np.arange(log.n) * groups // log.n
    rng = np.random.default_rng(0)
    counts = np.stack([rng.poisson(1.0, groups) for _ in range(ope.SLOPE_BOOT)])
    for b in (0, 1, ope.SLOPE_BOOT - 1):
        wt = counts[b][group].astype(np.float64)
        refit = ope.PositionCTRModel(prior_strength=0.0).fit(log, weights=wt)
        mass = np.zeros((log.n_positions, log.n_actions))
        np.add.at(mass, log.position, wt[:, None] * rows_pi)
        v = (refit.gamma[:, None] * mass).sum(axis=0) / wt.sum()
        expected = [v @ refit.theta_at(m) for m in builder.strengths]
        assert np.allclose(stats.slope.boot[b], expected, rtol=1e-9, atol=1e-15)
    assert not np.allclose(stats.slope.boot, whole.slope.boot)  # single rounds resampled there


def _write_serve_log(directory, dataset, rng) -> dict:
    """A Serve feedback directory in the server's format (impression and feedback part files): answers to
    held-out MovieLens-100K users, first picks drawn from a softmax of popularity, some clicked; plus the rows
    a live log has: an item added at run time (first and in a history), an empty answer, a click whose
    impression was lost. Returns what the first-slot log must hold."""
    from rec_rllib.data.feedback import IMPRESSION_SCHEMA, IMPRESSIONS, SCHEMA, write_part

    ids = dataset.items["item_id"].astype(str).to_numpy()
    pop = np.bincount(dataset.interactions["item_idx"], minlength=dataset.n_items).astype(np.float64)
    p = np.exp(np.log1p(pop) - np.log1p(pop).max())
    p /= p.sum()
    imps, clicks = [], []
    want = {"action": [], "pscore": [], "reward": [], "history": [], "request_id": [], "timestamp_ms": []}
    for i in range(700):
        hist = rng.choice(dataset.n_items, rng.integers(0, 40), replace=False)
        hist_ids = [str(ids[h]) for h in hist]
        if i % 50 == 3:
            hist_ids.insert(1, "new-item-from-text")
        rid = f"req-{i}"
        if i % 100 == 7:  # the first item was added by POST /items: dropped
            imps.append(
                {
                    "request_id": rid,
                    "timestamp_ms": i,
                    "user_id": "u",
                    "history": hist_ids,
                    "shown": ["new-item-from-text", str(ids[0])],
                    "shown_propensities": [0.5, 0.5],
                    "model_version": "m",
                    "strategy": "boltzmann",
                }
            )
            continue
        if i % 100 == 8:  # an empty answer: dropped
            imps.append(
                {
                    "request_id": rid,
                    "timestamp_ms": i,
                    "user_id": "u",
                    "history": hist_ids,
                    "shown": [],
                    "shown_propensities": [],
                    "model_version": "m",
                    "strategy": "boltzmann",
                }
            )
            continue
        a = int(rng.choice(dataset.n_items, p=p))
        imps.append(
            {
                "request_id": rid,
                "timestamp_ms": i,
                "user_id": "u",
                "history": hist_ids,
                "shown": [str(ids[a]), str(ids[(a + 1) % dataset.n_items])],
                "shown_propensities": [float(p[a]), 0.3],
                "model_version": "m",
                "strategy": "boltzmann",
            }
        )
        reward = 0.0
        if rng.random() < 0.3:
            reward = float(rng.integers(1, 3))
            for _ in range(int(reward)):  # rewards of one (answer, item) add up
                clicks.append({"request_id": rid, "item_id": str(ids[a]), "reward": 1.0})
        if rng.random() < 0.1:  # a click on the second item: not the first slot's reward
            clicks.append({"request_id": rid, "item_id": str(ids[(a + 1) % dataset.n_items]), "reward": 1.0})
        want["action"].append(a)
        want["pscore"].append(float(p[a]))
        want["reward"].append(reward)
        want["history"].append(hist)
        want["request_id"].append(rid)
        want["timestamp_ms"].append(i)
    clicks.append({"request_id": "lost-impression", "item_id": str(ids[5]), "reward": 1.0})
    full = {name: None for name in SCHEMA.names}
    rows = [{**full, "position": 0, "propensity": 0.1, **c} for c in clicks]
    (directory / IMPRESSIONS).mkdir(parents=True)
    for j, part in enumerate(np.array_split(np.arange(len(imps)), 3)):  # three part files
        write_part(directory / IMPRESSIONS, [imps[k] for k in part], f"t{j}", IMPRESSION_SCHEMA)
    write_part(directory, rows, "t0", SCHEMA)
    return want


def test_a_serve_log_in_blocks_gives_the_whole_array_estimates(ml100k, finetuned_run, tmp_path):
    """The first-slot log read part by part holds exactly the answers, propensities, summed first-slot
    rewards and catalogue histories written, and counts what it dropped; each target's estimates scored 37
    answers at a time equal those of the whole [answers, catalogue] distribution with the dense cross-fit
    (every estimator, intervals included), for a stochastic and a greedy target; a subset keeps its rows, and
    reading only the answers since a time gives that subset."""
    from rec_rllib.columns import SplitScheme
    from rec_rllib.eval.servelog import SERVE_LOG_ESTIMATORS, evaluate_serve_log, first_slot_log
    from rec_rllib.models import load_recommender

    want = _write_serve_log(tmp_path / "fb", ml100k, np.random.default_rng(0))
    served = first_slot_log(tmp_path / "fb", ml100k)
    fb = served.feedback
    assert fb.action.tolist() == want["action"] and served.request_ids == want["request_id"]
    assert fb.pscore.tolist() == want["pscore"] and fb.reward.tolist() == want["reward"]
    assert served.timestamps_ms.tolist() == want["timestamp_ms"]
    assert len(served.histories) == fb.n and all(
        np.array_equal(served.histories[i], h) for i, h in enumerate(want["history"])
    )
    assert served.dropped == {
        "first_item_not_in_catalogue": 14,
        "history_items_not_in_catalogue": 14,
        "feedback_without_impression": 1,
    }
    # the newest answers alone (the first part file holds none of them): the same rows as a subset
    newest = first_slot_log(tmp_path / "fb", ml100k, since_ms=350)
    same = served.subset(np.flatnonzero(served.timestamps_ms >= 350))
    assert newest.request_ids == same.request_ids and newest.timestamps_ms.min() >= 350
    for name in ("action", "pscore", "reward"):
        assert np.array_equal(getattr(newest.feedback, name), getattr(same.feedback, name))
    assert all(np.array_equal(newest.histories[i], same.histories[i]) for i in range(len(same.histories)))

    targets = {
        "popularity": load_recommender("popularity", ml100k, scheme=SplitScheme.LEAVE_ONE_OUT),
        "fine-tuned": load_recommender(finetuned_run, ml100k),
    }
    for strategy in ("boltzmann", "greedy"):
        res = evaluate_serve_log(
            served, targets, strategy=strategy, temperature=0.7, n_boot=100, seed=3, block_rows=37
        )
        q = ope.cross_fit(ope.PositionCTRModel, fb, folds=3, seed=3)
        for name, rec in targets.items():
            pi = ope.recommender_action_dist(
                rec, list(served.histories), k=1, strategy=strategy, temperature=0.7
            )
            # the transformer's float32 scores differ in their last bits between batch shapes; a Boltzmann
            # target's blocks multiply its single-precision rows by the reward model's item rates in single
            # precision (DM, DR and SLOPE read those products)
            rel = 1e-9 if name == "popularity" else 1e-5
            for e in SERVE_LOG_ESTIMATORS:
                dense = ope.estimate(e, fb, pi, q, n_boot=100, seed=3).to_dict()
                products = strategy == "boltzmann" and e in ("dm", "dr", "slope")
                _same_estimates(res[name]["estimates"][e], dense, rel=max(rel, 1e-6) if products else rel)
            w = pi[np.arange(fb.n), fb.action, 0] / fb.pscore
            assert res[name]["max_weight"] == pytest.approx(w.max(), rel=rel)

    sub = first_slot_log(tmp_path / "fb", ml100k, max_rounds=100, seed=5)
    rows = [served.request_ids.index(rid) for rid in sub.request_ids]
    assert len(rows) == sub.feedback.n == len(sub.histories) == 100 and rows == sorted(rows)
    assert sub.dropped["not_sampled"] == fb.n - 100
    assert all(np.array_equal(sub.histories[j], served.histories[i]) for j, i in enumerate(rows))
    assert np.array_equal(sub.feedback.action, fb.action[rows])
    assert np.array_equal(sub.timestamps_ms, served.timestamps_ms[rows])
    late = served.subset(np.flatnonzero(served.timestamps_ms >= 600))
    assert late.request_ids == [
        r for r, t in zip(want["request_id"], want["timestamp_ms"], strict=True) if t >= 600
    ]
    assert np.array_equal(late.feedback.reward, fb.reward[served.timestamps_ms >= 600])


def test_a_paired_difference_is_the_difference_of_the_estimates_with_a_paired_interval(ml100k, tmp_path):
    """V(a) - V(b) by each paired estimator is the difference of the two targets' own estimates; a target
    against itself differs by exactly 0 with the interval [0, 0]; the paired interval of two close targets is
    narrower than the unpaired intervals side by side."""
    from rec_rllib.columns import SplitScheme
    from rec_rllib.eval.servelog import compare_on_serve_log, first_slot_log, target_stats
    from rec_rllib.models import load_recommender

    _write_serve_log(tmp_path / "fb", ml100k, np.random.default_rng(1))
    log = first_slot_log(tmp_path / "fb", ml100k)
    fb = log.feedback
    pop = load_recommender("popularity", ml100k, scheme=SplitScheme.LEAVE_ONE_OUT)
    q = ope.cross_fit_ctr(fb, folds=3, seed=0)
    kw = dict(strategy="boltzmann", temperature=50.0)
    hot = target_stats(log, pop, q, **kw)
    warm = target_stats(log, pop, q, strategy="boltzmann", temperature=80.0)
    for name in ope.PAIRED_ESTIMATORS:
        d = ope.estimate_difference(name, fb, hot, warm, n_boot=400, seed=2)
        a = ope.estimate_stats(name, fb, hot, n_boot=400, seed=2)
        b = ope.estimate_stats(name, fb, warm, n_boot=400, seed=2)
        assert d.value == pytest.approx(a.value - b.value, rel=1e-12, abs=1e-15)
        assert d.detail == pytest.approx({"a": a.value, "b": b.value})
        assert d.low <= d.value <= d.high
        assert d.high - d.low < (a.high - a.low) + (b.high - b.low)
    same = compare_on_serve_log(log, pop, pop, estimators=("snips", "dr"), **kw)
    for e in same.values():
        assert (e.value, e.low, e.high) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="no paired difference by 'slope'"):
        ope.estimate_difference("slope", fb, hot, warm)


def test_the_first_pick_distribution_is_the_closed_form_per_context(ml100k):
    """k = 1, every context at once: greedy one-hot on the first best unseen item, Boltzmann softmax over the
    unseen items (in single precision, as serving logs its propensities), epsilon-greedy 1 - eps + eps/m on
    the best; seen items get 0."""
    from rec_rllib.columns import SplitScheme
    from rec_rllib.models import load_recommender

    rec = load_recommender("popularity", ml100k, scheme=SplitScheme.LEAVE_ONE_OUT)
    hist = ml100k.eval_cases(SplitScheme.LEAVE_ONE_OUT, "test").histories[:20]
    scores = rec.score(hist).astype(np.float64)
    for strategy in ("greedy", "boltzmann", "epsilon"):
        dist = ope.recommender_action_dist(rec, hist, k=1, strategy=strategy, temperature=2.0, epsilon=0.2)
        for i, h in enumerate(hist):
            s = scores[i].copy()
            s[h] = -np.inf
            allowed = np.isfinite(s)
            if strategy == "greedy":
                exact = np.eye(len(s))[np.argsort(-s, kind="stable")[0]]
            elif strategy == "boltzmann":
                z = s[allowed] / 2.0
                exact = np.zeros(len(s))
                exact[allowed] = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
            else:
                exact = np.where(allowed, 0.2 / allowed.sum(), 0.0)
                exact[int(np.argmax(s))] += 0.8
            rtol, atol = (1e-5, 1e-12) if strategy == "boltzmann" else (1e-12, 1e-15)
            assert np.allclose(dist[i, :, 0], exact, rtol=rtol, atol=atol) and dist[i, h, 0].sum() == 0
    # over 100,000 items the single-precision rows still sum to 1 as the estimators check (1e-6)
    wide = np.random.default_rng(0).normal(0.0, 3.0, (8, 100_000))
    wide[:, :10] = -np.inf
    rows = ope._first_position_dist(wide, "boltzmann", 1.0, 0.1)
    assert np.allclose(rows.sum(axis=1, dtype=np.float64), 1.0, rtol=0, atol=1e-6)
    assert (rows[:, :10] == 0).all()


def test_the_loop_judges_no_usable_answer_as_none_and_a_corrupt_log_as_an_error(ml100k, tmp_path):
    """The loop's off-policy judgement: no impression yet, or none whose first item is in the catalogue,
    gives None (the round keeps the served model); an impression without its propensities is an error that
    names the log, not a silent "no answers"."""
    from rec_rllib.columns import SplitScheme
    from rec_rllib.data.feedback import IMPRESSION_SCHEMA, IMPRESSIONS, write_part
    from rec_rllib.loop.gate import GateConfig
    from rec_rllib.loop.judge import serve_log_comparison
    from rec_rllib.models import load_recommender

    pop = load_recommender("popularity", ml100k, scheme=SplitScheme.LEAVE_ONE_OUT)
    judge = dict(dataset=ml100k, candidate=pop, served=pop, gate=GateConfig(), since_ms=0)
    assert serve_log_comparison(tmp_path / "none", **judge) is None
    answer = {
        "request_id": "r0",
        "timestamp_ms": 5,
        "user_id": "u",
        "history": ["1"],
        "shown": ["added-from-text"],
        "shown_propensities": [0.5],
        "model_version": "m",
        "strategy": "boltzmann",
    }
    (tmp_path / "added" / IMPRESSIONS).mkdir(parents=True)
    write_part(tmp_path / "added" / IMPRESSIONS, [answer], "t0", IMPRESSION_SCHEMA)
    assert serve_log_comparison(tmp_path / "added", **judge) is None
    (tmp_path / "corrupt" / IMPRESSIONS).mkdir(parents=True)
    bad = {**answer, "shown": ["1"], "shown_propensities": []}
    write_part(tmp_path / "corrupt" / IMPRESSIONS, [bad], "t0", IMPRESSION_SCHEMA)
    with pytest.raises(ValueError, match=r"corrupt.*r0.*without their propensities"):
        serve_log_comparison(tmp_path / "corrupt", **judge)
