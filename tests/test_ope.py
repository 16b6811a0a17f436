"""Off-policy estimators: exact identities, a synthetic bandit whose truth is known exactly (interval
coverage at the nominal rate), bad input, and the Open Bandit Dataset validation on the real sample."""

from __future__ import annotations

import numpy as np
import pytest

from rec_rllib.eval import ope

N_ACTIONS, N_POS, DIM = 8, 2, 3


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class SyntheticBandit:
    """Contexts x ~ N(0, I); click probability q(x, a, k) = sigmoid(x . theta_a + b_a + g_k); the logging
    policy mu(a | x, k) = softmax(x . beta_a) (the same at each position, so a row-level bandit); the
    target pi(a | x, k) = softmax(2 x . theta_a + k) -- a better, position-dependent policy."""

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.theta = rng.normal(0, 0.8, (N_ACTIONS, DIM))
        self.b = rng.normal(-1.5, 0.5, N_ACTIONS)
        self.g = np.array([0.0, -0.5])
        self.beta = rng.normal(0, 0.5, (N_ACTIONS, DIM))

    def q(self, x: np.ndarray) -> np.ndarray:  # [n, A, K]
        z = (x @ self.theta.T + self.b)[:, :, None] + self.g[None, None, :]
        return 1 / (1 + np.exp(-z))

    def mu(self, x: np.ndarray) -> np.ndarray:
        return np.repeat(_softmax(x @ self.beta.T)[:, :, None], N_POS, axis=2)

    def pi(self, x: np.ndarray) -> np.ndarray:
        return np.stack([_softmax(2 * x @ self.theta.T + k) for k in range(N_POS)], axis=2)

    def truth(self, n: int = 400_000, seed: int = 99) -> float:
        x = np.random.default_rng(seed).normal(size=(n, DIM))
        return float((self.pi(x) * self.q(x)).sum(axis=1).mean())  # positions equally likely

    def log(self, n: int, rng: np.random.Generator) -> tuple[ope.BanditFeedback, np.ndarray]:
        x = rng.normal(size=(n, DIM))
        k = rng.integers(0, N_POS, n)
        mu = self.mu(x)[np.arange(n), :, k]
        a = (mu.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
        r = (rng.random(n) < self.q(x)[np.arange(n), a, k]).astype(float)
        fb = ope.BanditFeedback(a, k, r, mu[np.arange(n), a], N_ACTIONS, N_POS, context=x, name="synthetic")
        return fb, self.pi(x)


def test_on_policy_identities():
    """Target = logging policy: IPS weights are all 1, so IPS and SNIPS equal the logged mean exactly;
    DR with a reward model equal to the rewards' own values reduces to DM."""
    rng = np.random.default_rng(1)
    bandit = SyntheticBandit()
    fb, _ = bandit.log(2000, rng)
    x = fb.context
    mu = bandit.mu(x)
    assert ope.point_estimate("ips", fb, mu) == pytest.approx(fb.on_policy_value(), rel=1e-12)
    assert ope.point_estimate("snips", fb, mu) == pytest.approx(fb.on_policy_value(), rel=1e-12)
    q = np.zeros((fb.n, N_ACTIONS))
    q[np.arange(fb.n), fb.action] = fb.reward
    assert ope.point_estimate("dr", fb, mu, q) == pytest.approx(ope.point_estimate("dm", fb, mu, q))


def test_confidence_intervals_cover_the_known_truth_at_their_nominal_rate():
    """200 independent logs of 3,000 rounds; 90% bootstrap intervals. Unbiased estimators (IPS, DR with a
    deliberately misspecified context-free reward model, and the consistent SNIPS) must cover the exact
    truth in 80-98% of draws: for a correct 90% interval, fewer than 160 or more than 196 covers out of
    200 has probability below 1e-5. DM with that misspecified model is biased and must fail the same
    bound, which shows the check can fail."""
    bandit = SyntheticBandit()
    truth = bandit.truth()
    rng = np.random.default_rng(7)
    reps, covered = 200, {"ips": 0, "snips": 0, "dr": 0, "dm": 0}
    for rep in range(reps):
        fb, pi = bandit.log(3000, rng)
        q = ope.cross_fit(ope.PositionCTRModel, fb, folds=2, seed=rep)
        for name in covered:
            est = ope.estimate(name, fb, pi, q, n_boot=200, level=0.9, seed=rep)
            covered[name] += est.low <= truth <= est.high
    rates = {k: v / reps for k, v in covered.items()}
    print("coverage of 90% intervals:", rates)
    for name in ("ips", "snips", "dr"):
        assert 0.80 <= rates[name] <= 0.98, rates
    assert rates["dm"] < 0.80, rates


def _item_bandit_logs(ctr: np.ndarray, pi: np.ndarray, n: int, reps: int, seed: int):
    """Context-free logs of a uniformly random policy over len(ctr) items, one position."""
    rng = np.random.default_rng(seed)
    n_items = len(ctr)
    for _ in range(reps):
        a = rng.integers(0, n_items, n)
        r = (rng.random(n) < ctr[a]).astype(float)
        yield ope.BanditFeedback(a, np.zeros(n, int), r, np.full(n, 1 / n_items), n_items, 1)


@pytest.mark.parametrize("items_differ", [False, True])
def test_slope_pools_the_items_unless_the_data_show_the_target_s_items_differ(items_differ):
    """A target that puts 90% of its mass on 3 of 20 items, logged by a uniform policy (40 logs of 4,000
    rounds). When every item has the same click rate, SLOPE must settle on strongly pooled DMs and beat DR's
    root-mean-squared error by a wide margin (DR pays for weights of up to 6). When the target's items
    click 5x more, the pooled DM is off by ~60% and SLOPE must detect it: its error well below the pooled
    DM's. Always-DR fails the first case, always-pooled the second."""
    n_items = 20
    pi = np.full((n_items, 1), 0.1 / 17)
    pi[:3, 0] = 0.3
    ctr = np.full(n_items, 0.05)
    if items_differ:
        ctr[:3] = 0.25
    truth = float(pi[:, 0] @ ctr)
    err = {"slope": [], "dr": [], "pooled": []}
    steps = []
    pooled_strength = float(ope.SLOPE_STRENGTHS[-1])
    for fb in _item_bandit_logs(ctr, pi, 4000, 40, seed=11 if items_differ else 12):
        q = ope.cross_fit(ope.PositionCTRModel, fb, folds=2, seed=0)
        stats = ope.TargetStats.from_dense(pi, fb, q, slope=True)
        num, den, add, detail = ope._terms("slope", fb, stats, clip=None, tau=None)
        err["slope"].append(num.sum() / den.sum() + add.mean() - truth)
        steps.append(detail["slope_step"])
        err["dr"].append(ope.point_estimate("dr", fb, pi, q) - truth)
        pooled = ope.PositionCTRModel(prior_strength=pooled_strength).fit(fb)
        err["pooled"].append(ope.point_estimate("dm", fb, pi, pooled.predict(fb)) - truth)
    rmse = {k: float(np.sqrt(np.mean(np.square(v)))) / truth for k, v in err.items()}
    print("relative RMSE", rmse, "SLOPE steps", np.bincount(np.array(steps, int), minlength=11).tolist())
    if items_differ:
        assert rmse["pooled"] > 0.5 and rmse["slope"] < 0.4 * rmse["pooled"], rmse
    else:
        assert np.median(steps) >= 8 and rmse["slope"] < 0.6 * rmse["dr"], (rmse, steps)


def test_replay_matches_on_uniform_logs_and_refuses_otherwise():
    rng = np.random.default_rng(3)
    n = 20_000
    a = rng.integers(0, N_ACTIONS, n)
    k = rng.integers(0, N_POS, n)
    r = (rng.random(n) < 0.1 + 0.05 * a).astype(float)
    fb = ope.BanditFeedback(a, k, r, np.full(n, 1 / N_ACTIONS), N_ACTIONS, N_POS)
    det = np.zeros((N_ACTIONS, N_POS))
    det[N_ACTIONS - 1, :] = 1.0  # always the best action
    est = ope.estimate("replay", fb, det, n_boot=200)
    assert est.low <= 0.1 + 0.05 * (N_ACTIONS - 1) <= est.high
    assert est.detail["matched"] == pytest.approx((a == N_ACTIONS - 1).sum())
    with pytest.raises(ValueError, match="deterministic"):
        ope.estimate("replay", fb, np.full((N_ACTIONS, N_POS), 1 / N_ACTIONS))
    skewed = ope.BanditFeedback(a, k, r, np.where(a == 0, 0.3, 0.1), N_ACTIONS, N_POS)
    with pytest.raises(ValueError, match="uniformly random"):
        ope.estimate("replay", skewed, det)


def test_bad_input_names_the_field_and_row():
    a = np.array([0, 1, 2])
    with pytest.raises(ValueError, match=r"'pscore' row 1 is 0\.0"):
        ope.BanditFeedback(a, np.zeros(3, int), np.zeros(3), np.array([0.5, 0.0, 0.5]), 3, 1, name="log")
    with pytest.raises(ValueError, match=r"'action' row 2 is 7"):
        ope.BanditFeedback(np.array([0, 1, 7]), np.zeros(3, int), np.zeros(3), np.full(3, 0.5), 3, 1)
    fb = ope.BanditFeedback(a, np.zeros(3, int), np.zeros(3), np.full(3, 0.5), 3, 1)
    with pytest.raises(ValueError, match="sums to 0.9"):
        ope.estimate("ips", fb, np.array([[0.3], [0.3], [0.3]]))
    with pytest.raises(ValueError, match="shape"):
        ope.estimate("ips", fb, np.full((4, 1), 0.25))
    with pytest.raises(ValueError, match="reward model"):
        ope.estimate("dr", fb, np.full((3, 1), 1 / 3))


def test_slate_marginals_sum_to_one_and_follow_the_scores():
    m = ope.slate_position_marginals(np.array([3.0, 1.0, 0.0, -1.0]), 3, n_sim=20_000)
    assert m.shape == (4, 3) and np.allclose(m.sum(axis=0), 1.0)
    assert m[0, 0] > m[1, 0] > m[2, 0] > m[3, 0]
    beta = ope.slate_position_marginals(np.array([[50.0, 5.0, 5.0], [50.0, 50.0, 500.0]]), 2, sampler="beta")
    assert beta[0, 0] > 0.9 and np.allclose(beta.sum(axis=0), 1.0)


# -- the Open Bandit Dataset sample (real data, fetched through pip) ---------------------------------------
def test_obd_bts_distributions_and_a_plain_ips(obd_all):
    """Both BTS definitions are distributions per position; the prior's favourite item leads position 1;
    the logged BTS propensities are not a distribution (why they are not used); and the full-sample IPS
    under the prior definition equals a plain computation straight from the CSV files."""
    import pandas as pd
    import yaml

    from rec_rllib.data import fetch
    from rec_rllib.eval import obd

    bts_log = obd.obd_feedback(obd_all, "bts", context=False)
    random_log = obd.obd_feedback(obd_all, "random", context=False)
    prior = obd.bts_action_dist("prior", dataset=obd_all, campaign="all", bts_log=bts_log, n_sim=50_000)
    empirical = obd.bts_action_dist("empirical", dataset=obd_all, campaign="all", bts_log=bts_log)
    for dist in (prior, empirical):
        assert dist.shape == (80, 3) and np.allclose(dist.sum(axis=0), 1.0)
    doc = yaml.safe_load(fetch.obd_prior_path().read_text())["all"]
    mean = np.array(doc["alpha"]) / (np.array(doc["alpha"]) + np.array(doc["beta"]))
    ids = obd_all.items["item_id"].astype(int).to_numpy()
    assert ids[prior[:, 0].argmax()] == mean.argmax()
    per_position_sum = [bts_log.pscore[bts_log.position == k].mean() * 80 for k in range(3)]
    assert min(per_position_sum) > 1.5  # 2-4 "probabilities" per position: not a distribution

    raw = pd.read_csv(fetch.obd_dir() / "random" / "all" / "all.csv", index_col=0)
    by_id = {int(i): row for i, row in zip(ids, prior, strict=True)}
    plain = np.mean(
        [
            c * by_id[i][p - 1] / ps
            for i, p, c, ps in zip(raw.item_id, raw.position, raw.click, raw.propensity_score, strict=True)
        ]
    )
    assert ope.point_estimate("ips", random_log, prior) == pytest.approx(plain, rel=1e-9)
    assert random_log.on_policy_value() == pytest.approx(raw.click.mean())


def test_obd_protocol_reproduces_the_reference_library_s_published_figures(obd_all):
    """The reference library's published benchmark (campaign all, BTS by its prior, from the random logs, 30
    bootstrap resamples) reports IPW 0.311082 and SNIPW 0.311795 as the mean relative error. Our protocol
    draws the same resamples and the same Monte Carlo BTS distribution, so our IPS and SNIPS -- the same
    estimators -- must give the same figures to the sixth digit; a different resample, slate draw, row
    order or estimator would not."""
    from rec_rllib.eval import obd

    res = obd.validate(obd_all, campaign="all", estimators=("ips", "snips"), n_boot=30)
    errors = {k: v["mean_relative_error"] for k, v in res.summary().items()}
    assert errors["ips"] == pytest.approx(0.311082, abs=1e-6), errors
    assert errors["snips"] == pytest.approx(0.311795, abs=1e-6), errors
    assert obd.OBP_PUBLISHED["ips"] == 0.311082 and obd.OBP_PUBLISHED["snips"] == 0.311795


def test_obd_validation_both_directions(obd_all):
    """The validation protocol runs end to end on the real sample in both directions; the truth is the
    target's logged click rate; estimates are finite and of the right magnitude."""
    from rec_rllib.eval import obd

    for direction, truth in (("random->bts", 0.0042), ("bts->random", 0.0038)):
        res = obd.validate(obd_all, campaign="all", direction=direction, definition="empirical", n_boot=4)
        assert res.truth == pytest.approx(truth)
        for name, values in res.estimates.items():
            assert values.shape == (4,) and np.isfinite(values).all(), name
            assert 0.1 * truth < values.mean() < 10 * truth, (name, values)
    with pytest.raises(ValueError, match="unknown direction"):
        obd.validate(obd_all, campaign="all", direction="bts->bts")


def test_a_recommender_as_target_policy(ml100k):
    """Any Recommender gives a per-context action distribution: greedy = its top-k, one-hot; Boltzmann's
    first position is exactly softmax(score / T) over unseen items (Monte Carlo within 5 SE); epsilon's
    first position puts 1 - eps + eps/m on the best item; every position sums to 1, seen items get 0."""
    from rec_rllib.columns import SplitScheme
    from rec_rllib.models import load_recommender

    rec = load_recommender("popularity", ml100k, scheme=SplitScheme.LEAVE_ONE_OUT)
    cases = ml100k.eval_cases(SplitScheme.LEAVE_ONE_OUT, "test")
    hist = cases.histories[:3]
    greedy = ope.recommender_action_dist(rec, hist, k=5)
    top = rec.recommend(hist, 5).items
    for i in range(3):
        assert (
            np.array_equal(greedy[i].argmax(axis=0), top[i]) and greedy[i].max(axis=0).tolist() == [1.0] * 5
        )
    n_sim = 20_000
    boltz = ope.recommender_action_dist(rec, hist, k=3, strategy="boltzmann", temperature=100.0, n_sim=n_sim)
    eps = ope.recommender_action_dist(rec, hist, k=3, strategy="epsilon", epsilon=0.3, n_sim=n_sim)
    for i, h in enumerate(hist):
        for dist in (boltz[i], eps[i]):
            assert np.allclose(dist.sum(axis=0), 1.0) and dist[h].sum() == 0.0
        s = rec.score([h])[0].astype(np.float64) / 100.0
        s[h] = -np.inf
        exact = np.exp(s - s[np.isfinite(s)].max())
        exact /= exact.sum()
        big = exact >= 0.005  # the items that carry the mass: each within 5 SE (chance failure < 1e-4)
        se = np.sqrt(exact[big] * (1 - exact[big]) / n_sim)
        assert big.sum() >= 5 and np.all(np.abs(boltz[i][big, 0] - exact[big]) <= 5 * se)
        assert boltz[i][big, 0].sum() == pytest.approx(exact[big].sum(), abs=5 * np.sqrt(0.25 / n_sim))
        m = 1682 - len(set(h.tolist()))
        best = int(np.argmax(np.where(np.isfinite(s), s, -np.inf)))
        p = 0.7 + 0.3 / m
        assert abs(eps[i][best, 0] - p) <= 5 * np.sqrt(p * (1 - p) / n_sim)
