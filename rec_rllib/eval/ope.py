"""Off-policy estimators: the value of a target policy from logs of another (the behaviour policy).

A log (:class:`BanditFeedback`) holds, per round i, the shown action ``a_i`` at slate position ``k_i``,
its reward ``r_i`` and the behaviour policy's propensity ``p_i = mu(a_i | x_i, k_i)``. A target policy is
an action distribution per position: an array ``pi`` of shape ``[A, K]`` (the same for every round, e.g.
a context-free bandit) or ``[n, A, K]`` (one per logged round), each ``pi[..., :, k]`` summing to 1. The
estimand is the target's expected reward per shown slot, over the logged contexts and positions:
``V = mean_i sum_a pi(a | x_i, k_i) q(x_i, a, k_i)``, which is what the logged click rate measures when the
target is the logging policy itself (position-aware: every estimator looks up ``pi`` at the logged
position).

Estimators (``w_i = pi(a_i | x_i, k_i) / p_i``, optionally clipped at ``clip``; ``q_hat`` a reward model):

* ``ips``      mean(w r)                                    unbiased when p > 0 wherever pi > 0.
* ``snips``    sum(w r) / sum(w)                            self-normalised: consistent, lower variance.
* ``dm``       mean(sum_a pi q_hat)                         no weights; biased as far as q_hat is wrong.
* ``dr``       dm + mean(w (r - q_hat(a_i)))                unbiased if the propensities are right.
* ``sndr``     dm + sum(w (r - q_hat(a_i))) / sum(w)        self-normalised DR.
* ``switch-dr``  DR's correction only where w <= tau, DM elsewhere (Wang et al., 2017); tau is chosen per
  log by minimising an MSE estimate: (switch-dr(tau) - dr)^2 + var(terms)/n.
* ``slope``    SLOPE (Su et al., 2020) over the family {DR, DM with :class:`PositionCTRModel` at prior
  strengths m = 0 ... inf (:data:`SLOPE_STRENGTHS`)}: bias grows and width shrinks along the family; walking
  it in that order, the first estimate whose interval (half-width: the one-sided 95% Student-t bound, DM's
  from a Poisson bootstrap of its fit) no longer overlaps all earlier ones (Lepski's rule,
  |theta_i - theta_j| <= cnf_i + (sqrt(6) - 1) cnf_j) stops the walk and the one before it is used. The
  shrinkage is thus chosen for the *policy value*, not for the per-item likelihood: with few clicks per item
  it pools the items unless the data show that the target's items differ.
* ``replay``   mean of r over rounds where the logged action is the target's action (Li et al., 2011);
  for deterministic targets and a uniformly random logging policy (anything else is refused).

Reward models for DM/DR: :class:`PositionCTRModel` (empirical-Bayes item click rates with a position
effect; context-free) and :class:`LogisticRewardModel` (logistic regression on action, position and
context features). :func:`cross_fit` fits a model on K-1 folds and predicts the held-out fold, so a DR
correction never sees its own round's reward through q_hat.

Every estimate comes with a percentile-bootstrap confidence interval over rounds (:func:`estimate`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

ESTIMATORS = ("ips", "snips", "dm", "dr", "sndr", "switch-dr", "slope", "replay")
"""Every estimator :func:`estimate` knows, in report order."""
MODEL_FREE = ("ips", "snips", "replay")
"""The estimators that need no reward model."""


@dataclass(frozen=True)
class BanditFeedback:
    """Logged rounds of a (slate) bandit; positions are 0-based."""

    action: np.ndarray
    position: np.ndarray
    reward: np.ndarray
    pscore: np.ndarray
    n_actions: int
    n_positions: int
    context: np.ndarray | None = None
    name: str = "log"

    def __post_init__(self) -> None:
        n = len(self.action)
        for f in ("position", "reward", "pscore"):
            if len(getattr(self, f)) != n:
                raise ValueError(f"{self.name}: field {f!r} has {len(getattr(self, f))} rows, action has {n}")
        if self.context is not None and len(self.context) != n:
            raise ValueError(f"{self.name}: context has {len(self.context)} rows, action has {n}")
        _first_bad(
            self.name,
            "action",
            (self.action < 0) | (self.action >= self.n_actions),
            self.action,
            f"an integer in [0, {self.n_actions})",
        )
        _first_bad(
            self.name,
            "position",
            (self.position < 0) | (self.position >= self.n_positions),
            self.position,
            f"an integer in [0, {self.n_positions})",
        )
        _first_bad(self.name, "reward", ~np.isfinite(self.reward), self.reward, "a finite number")
        _first_bad(
            self.name,
            "pscore",
            ~(np.isfinite(self.pscore) & (self.pscore > 0) & (self.pscore <= 1)),
            self.pscore,
            "the behaviour policy's probability of the logged action, in (0, 1]",
        )

    @property
    def n(self) -> int:
        return len(self.action)

    def on_policy_value(self) -> float:
        """The logged mean reward: the behaviour policy's own value (the ground truth of on-policy logs)."""
        return float(self.reward.mean())

    def subset(self, rows: np.ndarray) -> BanditFeedback:
        ctx = None if self.context is None else self.context[rows]
        return BanditFeedback(
            self.action[rows],
            self.position[rows],
            self.reward[rows],
            self.pscore[rows],
            self.n_actions,
            self.n_positions,
            ctx,
            self.name,
        )


def _first_bad(name: str, field_name: str, bad: np.ndarray, values: np.ndarray, want: str) -> None:
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{name}: field {field_name!r} row {row} is {values[row].item()!r} ({int(bad.sum())} rows "
            f"like it); expected {want}"
        )


# -- target policies ----------------------------------------------------------------------------------------
def check_action_dist(pi: np.ndarray, fb: BanditFeedback, *, atol: float = 1e-6) -> np.ndarray:
    """Validate a target distribution (``[A, K]`` or ``[n, A, K]``) against a log and return it as float."""
    pi = np.asarray(pi, dtype=np.float64)
    want = (fb.n_actions, fb.n_positions)
    if pi.shape not in (want, (fb.n, *want)):
        raise ValueError(
            f"action distribution has shape {pi.shape}; expected {want} or {(fb.n, *want)} "
            "(actions x positions, optionally per logged round)"
        )
    if (pi < 0).any() or not np.isfinite(pi).all():
        raise ValueError("action distribution has negative or non-finite entries")
    sums = pi.sum(axis=-2)
    if not np.allclose(sums, 1.0, atol=atol):
        worst = np.unravel_index(np.argmax(np.abs(sums - 1)), sums.shape)
        raise ValueError(
            f"action distribution at {worst} sums to {sums[worst]:.6f}, not 1: each position's "
            "distribution over actions must sum to 1"
        )
    return pi


def _pi_rows(pi: np.ndarray, fb: BanditFeedback) -> np.ndarray:
    """[n, A] pi(. | x_i, k_i)."""
    if pi.ndim == 2:
        return pi[:, fb.position].T
    return pi[np.arange(fb.n), :, fb.position]


def slate_position_marginals(
    scores: np.ndarray, k: int, *, n_sim: int = 20_000, sampler: str = "plackett-luce", seed: int = 0
) -> np.ndarray:
    """[A, k] probability of each action at each of the top k positions, by Monte Carlo.

    ``sampler="plackett-luce"``: a slate is drawn without replacement with probabilities softmax(scores)
    (Boltzmann exploration). ``sampler="beta"``: ``scores`` is ``[2, A]`` (alpha, beta); theta ~ Beta per
    action and the top k of theta fill the slate (Bernoulli Thompson sampling with that posterior).
    """
    rng = np.random.default_rng(seed)
    if sampler == "beta":
        alpha, beta = np.asarray(scores, dtype=np.float64)
        n_actions = len(alpha)
        draws = rng.beta(alpha, beta, size=(n_sim, n_actions))
    elif sampler == "plackett-luce":
        n_actions = len(scores)
        draws = np.asarray(scores, dtype=np.float64) + rng.gumbel(size=(n_sim, n_actions))  # Gumbel top-k
    else:
        raise ValueError(f"unknown sampler {sampler!r}; expected 'plackett-luce' or 'beta'")
    if not 0 < k <= n_actions:
        raise ValueError(f"k={k} must be in [1, {n_actions}]")
    top = np.argsort(-draws, axis=1, kind="stable")[:, :k]
    counts = np.zeros((n_actions, k))
    for j in range(k):
        counts[:, j] = np.bincount(top[:, j], minlength=n_actions)
    return counts / n_sim


def recommender_action_dist(
    recommender,
    histories,
    *,
    k: int,
    strategy: str = "greedy",
    temperature: float = 1.0,
    epsilon: float = 0.1,
    exclude_seen: bool = True,
    n_sim: int = 4000,
    seed: int = 0,
) -> np.ndarray:
    """[n, A, k]: the probability that ``recommender`` (any :class:`~rec_rllib.recommender.Recommender`)
    shows each item at each of the top ``k`` positions for each logged context (history), under an
    exploration mode: ``greedy`` (one-hot: the top k), ``boltzmann`` (slates drawn without replacement
    from softmax(score / temperature); Monte Carlo marginals, exact for k = 1) or ``epsilon`` (each position
    the best remaining item with probability 1 - epsilon, else a uniformly random remaining one; Monte Carlo).
    Items in the history are never shown when ``exclude_seen``."""
    _check_strategy(strategy)
    # the first pick's Boltzmann distribution is formed from single-precision scores
    scores = _scores(recommender, histories, np.float32 if k == 1 and strategy == "boltzmann" else np.float64)
    if exclude_seen:
        _exclude(scores, histories)
    n, n_items = scores.shape
    if not 0 < k <= n_items:
        raise ValueError(f"k={k} must be in [1, {n_items}]")
    if k == 1:
        return _first_position_dist(scores, strategy, temperature, epsilon)[:, :, None]
    out = np.zeros((n, n_items, k))
    rng = np.random.default_rng(seed)
    for i in range(n):
        s = scores[i]
        allowed = np.isfinite(s)
        if allowed.sum() < k:
            raise ValueError(f"context {i}: only {int(allowed.sum())} items may be shown, fewer than k={k}")
        if strategy == "greedy":
            top = np.argsort(-s, kind="stable")[:k]
            out[i, top, np.arange(k)] = 1.0
            continue
        if strategy == "boltzmann":
            z = np.where(allowed, s / max(temperature, 1e-8), -np.inf)
            top = np.argsort(-(z + rng.gumbel(size=(n_sim, n_items))), axis=1, kind="stable")[:, :k]
        else:
            order = np.argsort(-s, kind="stable")
            top = np.empty((n_sim, k), dtype=np.int64)
            taken = np.zeros((n_sim, n_items), dtype=bool)
            taken[:, ~allowed] = True
            rows = np.arange(n_sim)
            for j in range(k):
                best = order[np.argmax(~taken[:, order], axis=1)]  # best remaining per simulation
                noise = rng.random((n_sim, n_items)) + taken * 2.0  # taken items sort last
                random_pick = np.argmin(noise, axis=1)  # a uniformly random remaining item
                pick = np.where(rng.random(n_sim) < epsilon, random_pick, best)
                top[:, j] = pick
                taken[rows, pick] = True
        for j in range(k):
            out[i, :, j] = np.bincount(top[:, j], minlength=n_items) / n_sim
    return out


def _check_strategy(strategy: str) -> None:
    if strategy not in ("greedy", "boltzmann", "epsilon"):
        raise ValueError(f"unknown exploration {strategy!r}; expected greedy, boltzmann or epsilon")


def _scores(recommender, histories, dtype) -> np.ndarray:
    # a writable copy in row order (a recommender may return a broadcast view, whose copy would be
    # column-major)
    return np.array(recommender.score(histories), dtype=dtype, order="C")


def _exclude(scores: np.ndarray, histories) -> None:
    offsets = getattr(histories, "offsets", None)
    if offsets is not None:  # flat item indices and offsets (servelog.Histories): one scatter for the block
        rows = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
        scores[rows, histories.flat[offsets[0] : offsets[-1]]] = -np.inf
        return
    for i, h in enumerate(histories):
        scores[i, np.asarray(h, dtype=np.int64)] = -np.inf


def recommender_first_pick(
    recommender,
    histories,
    *,
    strategy: str = "greedy",
    temperature: float = 1.0,
    epsilon: float = 0.1,
    exclude_seen: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """The first pick's distribution per context in factored form ``(rows, scale)``: pi(a | x_i) =
    ``rows[i, a] * scale[i]``, what :func:`recommender_action_dist` gives for k = 1. Boltzmann's rows are
    the unnormalised single-precision exp(score / temperature) and its scale the inverse of their sum, so a
    caller that only needs sums and products of the rows (:meth:`TargetStatsBuilder.add`) never forms the
    normalised [n, A] array; greedy and epsilon give their rows with scale 1."""
    _check_strategy(strategy)
    scores = _scores(recommender, histories, np.float32 if strategy == "boltzmann" else np.float64)
    if exclude_seen:
        _exclude(scores, histories)
    if strategy == "boltzmann":
        return boltzmann_weights(scores, temperature)
    return _first_position_dist(scores, strategy, temperature, epsilon), np.ones(len(scores))


def boltzmann_weights(scores: np.ndarray, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """softmax(scores / temperature) per row (``-inf``: may not be shown) as ``(e, scale)``: ``e`` =
    exp((s - max) / temperature) in single precision, computed in place when ``scores`` is a contiguous
    float32 array, and ``scale`` = 1 / the row's sum, summed in double precision (rows over 100,000 items
    sum to 1 within rounding)."""
    e = np.ascontiguousarray(scores, dtype=np.float32)
    if temperature != 1:
        np.divide(e, np.float32(max(temperature, 1e-8)), out=e)
    top = e.max(axis=1, keepdims=True)
    _check_some_allowed(top[:, 0] == -np.inf)
    np.subtract(e, top, out=e)
    np.exp(e, out=e)  # excluded items (-inf) become 0
    return e, 1.0 / e.sum(axis=1, dtype=np.float64)


def _check_some_allowed(empty: np.ndarray) -> None:
    if empty.any():
        i = int(np.flatnonzero(empty)[0])
        raise ValueError(f"context {i}: only 0 items may be shown, fewer than k=1")


def _first_position_dist(scores: np.ndarray, strategy: str, temperature: float, epsilon: float) -> np.ndarray:
    """[n, A] the first pick's distribution in closed form, as serving draws it, every context at once
    (``-inf``: may not be shown): greedy the best item (the first of tied ones), boltzmann softmax(score /
    temperature) over the allowed items, epsilon the best with 1 - epsilon plus epsilon spread uniformly.
    Boltzmann works in place on ``scores`` when they are a contiguous float32 array."""
    n = len(scores)
    if strategy == "boltzmann":
        # in single precision, as serving draws and logs its propensities; normalised in double precision
        e, scale = boltzmann_weights(scores, temperature)
        return e * scale[:, None]
    top = scores.max(axis=1)
    _check_some_allowed(top == -np.inf)
    best = np.argmax(scores, axis=1)
    if strategy == "greedy":
        out = np.zeros_like(scores)
        out[np.arange(n), best] = 1.0
        return out
    allowed = np.isfinite(scores)
    counts = allowed.sum(axis=1)
    out = np.where(allowed, epsilon / counts[:, None], 0.0)
    out[np.arange(n), best] += 1.0 - epsilon
    return out


def empirical_action_dist(fb: BanditFeedback, *, smoothing: float = 0.0) -> np.ndarray:
    """[A, K] frequency of each action at each position in a log (a logged policy's empirical
    distribution, context ignored); ``smoothing`` adds a pseudo-count to every cell."""
    counts = np.zeros((fb.n_actions, fb.n_positions))
    np.add.at(counts, (fb.action, fb.position), 1.0)
    counts += smoothing
    return counts / counts.sum(axis=0, keepdims=True)


# -- reward models -----------------------------------------------------------------------------------------
class RewardModel:
    """Fits on a log; predicts q_hat(x_i, a, k_i) for every action of every round of a log: [n, A]."""

    name = "reward-model"

    def fit(self, fb: BanditFeedback) -> RewardModel:
        raise NotImplementedError

    def predict(self, fb: BanditFeedback) -> np.ndarray:
        raise NotImplementedError


@dataclass
class PositionCTRModel(RewardModel):
    """q(a, k) = theta_a * gamma_k: a position effect gamma_k (the position's click rate over the overall
    one) times an item click rate theta_a shrunk toward the mean by empirical Bayes: theta_a =
    (clicks_a + m * mean) / (exposure_a + m), exposure_a = sum_k shows_ak * gamma_k. The prior strength m
    (a pseudo-exposure) is ``prior_strength`` when given (``inf`` pools every item: q = mean * gamma_k),
    else fitted by the method of moments (at least ``min_strength``). With few clicks per item (the Open
    Bandit sample has ~40 per 10,000 rounds) this keeps DM's variance small where per-item rates would be
    noise. Context-free; rewards may be any non-negative numbers (clicks, ratings). ``fit`` takes optional
    per-round weights (a Poisson bootstrap refits with them)."""

    min_strength: float = 1.0
    prior_strength: float | None = None
    name: str = "position-ctr"
    theta: np.ndarray = field(default=None, repr=False)
    gamma: np.ndarray = field(default=None, repr=False)
    strength: float = 0.0
    _stats: tuple[np.ndarray, np.ndarray, float] = field(default=None, repr=False)

    def fit(self, fb: BanditFeedback, weights: np.ndarray | None = None) -> PositionCTRModel:
        wt = np.ones(fb.n) if weights is None else np.asarray(weights, dtype=np.float64)
        mean = max(float(wt @ fb.reward / max(wt.sum(), 1e-12)), 1e-12)
        shows_k = np.bincount(fb.position, weights=wt, minlength=fb.n_positions)
        clicks_k = np.bincount(fb.position, weights=wt * fb.reward, minlength=fb.n_positions)
        # position effect, itself shrunk toward 1 with a pseudo-exposure of 1/mean (one expected click)
        self.gamma = (clicks_k + 1.0) / (shows_k * mean + 1.0)
        expo = np.bincount(fb.action, weights=wt * self.gamma[fb.position], minlength=fb.n_actions)
        clicks = np.bincount(fb.action, weights=wt * fb.reward, minlength=fb.n_actions)
        self._stats = (clicks, expo, mean)
        if self.prior_strength is not None:
            self.strength = float(self.prior_strength)
        else:
            seen = expo > 0
            rates = clicks[seen] / expo[seen]
            # method of moments for a Gamma-Poisson prior: var(rate) = mean/expo (Poisson) + prior variance
            noise = np.mean(mean / expo[seen]) if seen.any() else 0.0
            prior_var = max(float(np.var(rates)) - noise, 0.0)
            self.strength = max(mean / prior_var if prior_var > 0 else 1e12, self.min_strength)
        self.theta = self.theta_at(self.strength)
        return self

    def theta_at(self, strength: float) -> np.ndarray:
        """[A] the fitted item rates under prior strength ``strength`` (``inf``: every item at the mean)."""
        clicks, expo, mean = self._stats
        if np.isinf(strength):
            return np.full(len(clicks), mean)
        return (clicks + strength * mean) / np.maximum(expo + strength, 1e-12)

    def predict(self, fb: BanditFeedback) -> np.ndarray:
        return np.outer(self.gamma[fb.position], self.theta)


@dataclass
class LogisticRewardModel(RewardModel):
    """Logistic regression of a 0/1 reward on one-hot action, one-hot position and the log's context
    features (standardised), with an L2 penalty ``l2``; fitted by L-BFGS (scipy)."""

    l2: float = 1.0
    name: str = "logistic"
    coef: np.ndarray = field(default=None, repr=False)
    _mu: np.ndarray = field(default=None, repr=False)
    _sd: np.ndarray = field(default=None, repr=False)

    def _ctx(self, fb: BanditFeedback) -> np.ndarray:
        if fb.context is None:
            return np.zeros((fb.n, 0))
        return (np.asarray(fb.context, dtype=np.float64) - self._mu) / self._sd

    def fit(self, fb: BanditFeedback) -> LogisticRewardModel:
        from scipy.optimize import minimize

        if fb.context is not None:
            c = np.asarray(fb.context, dtype=np.float64)
            self._mu, self._sd = c.mean(0), np.where(c.std(0) > 0, c.std(0), 1.0)
        ctx = self._ctx(fb)
        a, k, y = fb.action, fb.position, (fb.reward > 0).astype(np.float64)
        n_a, n_k, d = fb.n_actions, fb.n_positions, ctx.shape[1]

        def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
            b, wa, wk, wc = (
                theta[0],
                theta[1 : 1 + n_a],
                theta[1 + n_a : 1 + n_a + n_k],
                theta[1 + n_a + n_k :],
            )
            z = b + wa[a] + wk[k] + ctx @ wc
            p = 1.0 / (1.0 + np.exp(-z))
            nll = np.sum(np.logaddexp(0, z) - y * z) + 0.5 * self.l2 * np.sum(theta[1:] ** 2)
            g = p - y
            grad = np.concatenate([[g.sum()], np.bincount(a, g, n_a), np.bincount(k, g, n_k), ctx.T @ g])
            grad[1:] += self.l2 * theta[1:]
            return nll, grad

        x0 = np.zeros(1 + n_a + n_k + d)
        x0[0] = np.log(max(y.mean(), 1e-6) / max(1 - y.mean(), 1e-6))
        self.coef = minimize(loss, x0, jac=True, method="L-BFGS-B").x
        self._shape = (n_a, n_k)
        return self

    def predict(self, fb: BanditFeedback) -> np.ndarray:
        n_a, n_k = self._shape
        b, wa, wk, wc = (
            self.coef[0],
            self.coef[1 : 1 + n_a],
            self.coef[1 + n_a : 1 + n_a + n_k],
            self.coef[1 + n_a + n_k :],
        )
        z = b + wk[fb.position][:, None] + wa[None, :] + (self._ctx(fb) @ wc)[:, None]
        return 1.0 / (1.0 + np.exp(-z))


REWARD_MODELS: dict[str, Callable[[], RewardModel]] = {
    "position-ctr": PositionCTRModel,
    "logistic": LogisticRewardModel,
}


def _fold_of_rounds(n: int, folds: int, seed: int) -> np.ndarray:
    """[n] each round's cross-fitting fold (seeded: :func:`cross_fit` and :func:`cross_fit_ctr` agree)."""
    return np.random.default_rng(seed).permutation(n) % folds


def cross_fit(
    make_model: Callable[[], RewardModel], fb: BanditFeedback, *, folds: int = 3, seed: int = 0
) -> np.ndarray:
    """[n, A] q_hat where each round's row comes from a model fitted without that round's fold."""
    if folds < 2:
        return make_model().fit(fb).predict(fb)
    fold = _fold_of_rounds(fb.n, folds, seed)
    q = np.zeros((fb.n, fb.n_actions))
    for f in range(folds):
        held = fold == f
        q[held] = make_model().fit(fb.subset(np.flatnonzero(~held))).predict(fb.subset(np.flatnonzero(held)))
    return q


@dataclass
class FoldedCTR:
    """Cross-fitted :class:`PositionCTRModel` fits in factored form: round i's q_hat(a, k) is
    ``models[fold[i]].gamma[k] * models[fold[i]].theta[a]``, what :func:`cross_fit` returns as an ``[n, A]``
    array, without the array (its rows are formed a block at a time by :class:`TargetStatsBuilder`)."""

    fold: np.ndarray
    models: list[PositionCTRModel]

    def predict(self, fb: BanditFeedback) -> np.ndarray:
        """[n, A] the dense q_hat (what :func:`cross_fit` gives)."""
        q = np.zeros((fb.n, fb.n_actions))
        for f, model in enumerate(self.models):
            held = np.flatnonzero(self.fold == f)
            q[held] = model.predict(fb.subset(held))
        return q


def cross_fit_ctr(fb: BanditFeedback, *, folds: int = 3, seed: int = 0) -> FoldedCTR:
    """:func:`cross_fit` of :class:`PositionCTRModel`, the same folds and fits, in factored form."""
    if folds < 2:
        return FoldedCTR(np.zeros(fb.n, dtype=np.int64), [PositionCTRModel().fit(fb)])
    fold = _fold_of_rounds(fb.n, folds, seed)
    return FoldedCTR(
        fold, [PositionCTRModel().fit(fb.subset(np.flatnonzero(fold != f))) for f in range(folds)]
    )


# -- what the estimators read of a target -------------------------------------------------------------------
SLOPE_BOOT = 200
"""Poisson-bootstrap refits of SLOPE's DM family (seeded 0: the same resamples for every target)."""
SLOPE_GROUP_CELLS = 1 << 25
"""Most cells (resampled groups × positions × actions, float64: 256 MB) of SLOPE's per-group target masses.
A log of at most ``SLOPE_GROUP_CELLS / (positions × actions)`` rounds resamples single rounds; a longer one
resamples that many groups of consecutive rounds (a block bootstrap), so that its cost per round does not
grow with the number of resamples."""


@dataclass
class SlopeStats:
    """SLOPE's view of a target on a log: the DM family's values from the full fit (``values`` [S]) and from
    each bootstrap refit (``boot`` [B, S]), and per round pi(. | x_i, k_i) . theta(m_s) (``pi_theta`` [n, S])
    with the full fit's position effect ``gamma`` [K]."""

    values: np.ndarray
    boot: np.ndarray
    pi_theta: np.ndarray
    gamma: np.ndarray


@dataclass
class TargetStats:
    """Everything the estimators read of a target policy on a log, per round: ``pi_logged``
    pi(a_i | x_i, k_i); ``dm`` sum_a pi(a | x_i, k_i) q_hat(x_i, a, k_i) and ``q_logged`` q_hat(x_i, a_i, k_i)
    (with a reward model); ``deterministic``: every probability 0 or 1 (replay); ``slope``
    (:class:`SlopeStats`). Vectors of the log's length, whatever the catalogue: :class:`TargetStatsBuilder`
    forms them from blocks of rounds."""

    pi_logged: np.ndarray
    deterministic: bool
    dm: np.ndarray | None = None
    q_logged: np.ndarray | None = None
    slope: SlopeStats | None = None

    @classmethod
    def from_dense(
        cls,
        pi: np.ndarray,
        fb: BanditFeedback,
        q: np.ndarray | FoldedCTR | None = None,
        *,
        slope: bool = False,
    ) -> TargetStats:
        """From a whole (checked) action distribution, ``[A, K]`` or ``[n, A, K]``, in one block."""
        builder = TargetStatsBuilder(fb, q, slope=slope)
        builder.add(np.arange(fb.n), _pi_rows(pi, fb), deterministic=bool(np.all((pi == 0) | (pi == 1))))
        return builder.finish()


class TargetStatsBuilder:
    """:class:`TargetStats` of one target, formed from blocks of rounds (:meth:`add`: each block's rows of
    pi(. | x_i, k_i)), so that no ``[n, A]`` array is ever held: its memory is the block's, the rounds'
    vectors and, for SLOPE, the target's mass per resampled group of rounds ([G, K, A], at most
    :data:`SLOPE_GROUP_CELLS`) and the groups' resample counts ([B, G] bytes).

    ``q``: the reward model's predictions, dense ``[n, A]`` or factored (:class:`FoldedCTR`), or None."""

    def __init__(
        self, fb: BanditFeedback, q: np.ndarray | FoldedCTR | None = None, *, slope: bool = True
    ) -> None:
        n, n_a = fb.n, fb.n_actions
        if isinstance(q, np.ndarray) and q.shape != (n, n_a):
            raise ValueError(f"q_hat has shape {q.shape}; expected {(n, n_a)}")
        if isinstance(q, FoldedCTR):
            self._fold_theta = np.stack([m.theta for m in q.models], axis=1)  # [A, F]
            self._fold_gamma = np.stack([m.gamma for m in q.models])  # [F, K]
        self.fb, self.q = fb, q
        self.pi_logged = np.full(n, np.nan)
        self.deterministic = True
        self.dm = None if q is None else np.full(n, np.nan)
        self.q_logged = None if q is None else np.full(n, np.nan)
        self.slope = slope
        if slope:
            self.full = PositionCTRModel(prior_strength=0.0).fit(fb)
            strengths = [c * n / n_a for c in SLOPE_STRENGTHS]
            self.strengths = strengths
            self.thetas = np.stack([self.full.theta_at(m) for m in strengths], axis=1)  # [A, S]
            # what the bootstrap resamples: single rounds, or (a long log over a large catalogue) groups of
            # consecutive rounds; the Poisson counts drawn group by group (the same stream as one [B, G] draw)
            groups = max(1, min(n, SLOPE_GROUP_CELLS // (fb.n_positions * n_a)))
            self.group_of = np.arange(n, dtype=np.int64) * groups // n
            rng = np.random.default_rng(0)
            self.weights = np.empty((SLOPE_BOOT, groups), dtype=np.uint8)
            for b in range(SLOPE_BOOT):
                row = rng.poisson(1.0, groups)
                if row.max(initial=0) > 255:
                    raise OverflowError("a Poisson(1) resample count above 255")
                self.weights[b] = row
            self.group_mass = np.zeros((groups, fb.n_positions, n_a))
            self.pi_theta = np.full((n, len(strengths)), np.nan)
        # [A, F + S] the item rates each block's rows are multiplied with: the folds' (DM, DR) and SLOPE's
        rates = [
            r for r in (getattr(self, "_fold_theta", None), getattr(self, "thetas", None)) if r is not None
        ]
        self._rates = np.concatenate(rates, axis=1) if rates else None
        self._rates32: np.ndarray | None = None

    def add(
        self,
        rows: np.ndarray,
        pi_rows: np.ndarray,
        *,
        deterministic: bool | None = None,
        scale: np.ndarray | None = None,
    ) -> None:
        """Rounds ``rows`` (indices into the log) and their ``[len(rows), A]`` pi(. | x_i, k_i), or with
        ``scale`` the factored form pi(. | x_i, k_i) = ``pi_rows[i] * scale[i]``
        (:func:`recommender_first_pick`): the rows may then be single precision, and their products with the
        item rates and their sums over rounds are taken in it (the normalised rows are never formed)."""
        import torch

        fb, rows = self.fb, np.asarray(rows, dtype=np.int64)
        if scale is None:
            pi_rows = np.asarray(pi_rows, dtype=np.float64)
        else:
            scale = np.asarray(scale, dtype=np.float64)
            if pi_rows.dtype not in (np.float32, np.float64):
                pi_rows = np.asarray(pi_rows, dtype=np.float64)
        at = np.arange(len(rows))
        action, position = fb.action[rows], fb.position[rows]
        self.pi_logged[rows] = pi_rows[at, action] if scale is None else pi_rows[at, action] * scale
        if deterministic is None:  # every row one-hot: a 1 and nothing else above 0 (two passes, not four)
            p = pi_rows if scale is None else pi_rows * scale[:, None]
            deterministic = bool((p.max(axis=1) == 1).all()) and np.count_nonzero(p) == len(rows)
        self.deterministic &= deterministic
        # the products of the rows with the folds' item rates and SLOPE's, in one pass over the block
        products = None
        if self._rates is not None and pi_rows.dtype == np.float64:
            products = pi_rows @ self._rates
        elif self._rates is not None:  # single precision: [F + S, A] @ [A, n], MKL's fast shape for it
            products = (torch.from_numpy(self._rates_t32()) @ torch.from_numpy(pi_rows).T).numpy().T
        if products is not None and scale is not None:
            products = products * scale[:, None]
        if isinstance(self.q, FoldedCTR):
            fold = self.q.fold[rows]
            g = self._fold_gamma[fold, position]
            self.dm[rows] = g * products[at, fold]
            self.q_logged[rows] = g * self._fold_theta[action, fold]
        elif self.q is not None:
            q = self.q[rows]
            p = pi_rows if scale is None else pi_rows * scale[:, None]
            self.dm[rows] = (p * q).sum(axis=1)
            self.q_logged[rows] = q[at, action]
        if self.slope:
            for k in np.unique(position):
                sel = np.flatnonzero(position == k)
                group = self.group_of[rows[sel]]
                if np.any(group[1:] < group[:-1]):
                    order = np.argsort(group, kind="stable")
                    group, sel = group[order], sel[order]
                whole = len(sel) == len(rows) and np.array_equal(sel, at)
                block = pi_rows if whole else pi_rows[sel]
                if group[0] == group[-1]:  # the block lies in one group (a long log: the usual case)
                    if scale is None:
                        self.group_mass[group[0], k] += block.sum(axis=0)
                    else:  # the scaled rows' sum as one product, in the rows' precision (torch's BLAS, as
                        # for the products above: numpy's would compete with torch's threads for the cores)
                        w = torch.from_numpy(scale[sel].astype(block.dtype))
                        self.group_mass[group[0], k] += (w @ torch.from_numpy(block)).numpy()
                    continue
                starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
                if scale is None:
                    self.group_mass[group[starts], k] += np.add.reduceat(block, starts, axis=0)
                    continue
                # each group's scaled sum as one product: [groups, rows] scales @ [rows, A]
                segment = np.cumsum(np.r_[False, group[1:] != group[:-1]])
                weights = np.zeros((len(starts), len(sel)), dtype=block.dtype)
                weights[segment, np.arange(len(sel))] = scale[sel]
                self.group_mass[group[starts], k] += (
                    torch.from_numpy(weights) @ torch.from_numpy(block)
                ).numpy()
            self.pi_theta[rows] = products[:, products.shape[1] - self.thetas.shape[1] :]

    def _rates_t32(self) -> np.ndarray:
        if self._rates32 is None:
            self._rates32 = np.ascontiguousarray(self._rates.T, dtype=np.float32)
        return self._rates32

    def finish(self) -> TargetStats:
        if np.isnan(self.pi_logged).any():
            missing = int(np.flatnonzero(np.isnan(self.pi_logged))[0])
            raise ValueError(f"{self.fb.name}: round {missing} of {self.fb.n} was never added")
        slope = None
        if self.slope:

            def dm_values(model: PositionCTRModel, wt_sum: float, mass: np.ndarray) -> np.ndarray:
                """DM at every strength from a fit under resample weights summing to ``wt_sum``; ``mass``
                [K, A] = sum_i w_i pi(. | i) over the rounds at each position."""
                v = (model.gamma[:, None] * mass).sum(axis=0) / wt_sum
                return np.array([v @ model.theta_at(m) for m in self.strengths])

            values = dm_values(self.full, float(self.fb.n), self.group_mass.sum(axis=0))
            # each resample's mass: its groups' masses weighted by their counts ([B, G] @ [G, K * A])
            masses = self.weights.astype(np.float64) @ self.group_mass.reshape(len(self.weights[0]), -1)
            boot = np.empty((SLOPE_BOOT, len(self.strengths)))
            for b in range(SLOPE_BOOT):
                wt = self.weights[b][self.group_of].astype(np.float64)
                refit = PositionCTRModel(prior_strength=0.0).fit(self.fb, weights=wt)
                boot[b] = dm_values(refit, wt.sum(), masses[b].reshape(self.group_mass.shape[1:]))
            slope = SlopeStats(values, boot, self.pi_theta, self.full.gamma)
        return TargetStats(self.pi_logged, self.deterministic, self.dm, self.q_logged, slope)


# -- estimators --------------------------------------------------------------------------------------------
@dataclass
class Estimate:
    """A policy value with its percentile-bootstrap interval at ``level``."""

    estimator: str
    value: float
    low: float
    high: float
    level: float
    n: int
    detail: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, float | str | int]:
        return {
            "estimator": self.estimator,
            "value": self.value,
            "low": self.low,
            "high": self.high,
            "level": self.level,
            "n": self.n,
            **self.detail,
        }


Terms = tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, float]]


def _value(num: np.ndarray, den: np.ndarray, add: np.ndarray) -> float:
    d = den.sum()
    return float(num.sum() / d + add.mean()) if d > 0 else float("nan")


def _terms(
    name: str, fb: BanditFeedback, stats: TargetStats, *, clip: float | None, tau: float | None
) -> Terms:
    """Per-round (num, den, add, detail): estimate = sum(num) / sum(den) + mean(add), so a bootstrap
    resample of rounds re-evaluates every estimator exactly, self-normalised ones included."""
    ones, zeros = np.ones(fb.n), np.zeros(fb.n)
    pi_a = stats.pi_logged
    w = pi_a / fb.pscore
    if clip is not None:
        w = np.minimum(w, clip)
    r = fb.reward
    if name == "ips":
        return w * r, ones, zeros, {}
    if name == "snips":
        return w * r, w, zeros, {}
    if name == "replay":
        if not stats.deterministic:
            raise ValueError(
                "replay evaluates deterministic target policies (one action per context and "
                "position); use ips/snips/dr for a stochastic one"
            )
        per_pos = [np.ptp(fb.pscore[fb.position == k]) for k in np.unique(fb.position)]
        if max(per_pos, default=0.0) > 1e-9 * max(fb.pscore.max(), 1e-12):
            raise ValueError(
                "replay is unbiased only on logs of a uniformly random policy (one propensity "
                "per position); this log's propensities vary: use snips or dr"
            )
        match = pi_a
        return match * r, match, zeros, {"matched": float(match.sum())}
    if stats.dm is None:
        raise ValueError(f"{name} needs a reward model's predictions q_hat ([n, A])")
    dm = stats.dm
    resid = r - stats.q_logged
    if name == "dm":
        return dm, ones, zeros, {}
    if name == "dr":
        return dm + w * resid, ones, zeros, {}
    if name == "sndr":
        return w * resid, w, dm, {}
    if name == "switch-dr":
        taus = [tau] if tau is not None else sorted(set(np.quantile(w, [0.5, 0.8, 0.9, 0.95, 0.99, 1.0])))
        dr_val = float(np.mean(dm + w * resid))
        best = None
        for t in taus:
            terms = dm + np.where(w <= t, w * resid, 0.0)
            mse = (terms.mean() - dr_val) ** 2 + terms.var() / fb.n
            if best is None or mse < best[0]:
                best = (mse, t, terms)
        return best[2], ones, zeros, {"tau": float(best[1])}
    if name == "slope":
        if stats.slope is None:
            raise ValueError(
                "slope needs the target's SLOPE statistics (TargetStatsBuilder(..., slope=True))"
            )
        return _slope_terms(fb, stats.slope, dm + w * resid)
    raise ValueError(f"unknown estimator {name!r}; expected one of {ESTIMATORS}")


SLOPE_STRENGTHS = (0.0, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, np.inf)
"""The DM family SLOPE walks: :class:`PositionCTRModel` prior strengths, as multiples of the mean
exposure per action (n / A): 0 is every item's own click rate, inf the pooled one."""


def _slope_terms(
    fb: BanditFeedback, slope: SlopeStats, dr_terms: np.ndarray, *, delta: float = 0.05
) -> Terms:
    """SLOPE's choice among DR (its per-round terms given) and DM at every :data:`SLOPE_STRENGTHS`; the
    terms of the chosen estimator, ``detail["slope_step"]``: 0 for DR, i for the i-th strength."""
    from scipy.stats import t as student_t

    t_q = float(student_t.ppf(1.0 - delta, fb.n - 1))
    thetas = np.concatenate([[dr_terms.mean()], slope.values])
    cnfs = t_q * np.concatenate([[dr_terms.std(ddof=1) / np.sqrt(fb.n)], slope.boot.std(axis=0, ddof=1)])
    # the family's own order (DR, then m increasing: bias up, variance down by construction), not the
    # estimated widths: a Poisson bootstrap of rare clicks understates the width of weakly shrunk DMs
    chosen = len(thetas) - 1
    c = np.sqrt(6.0) - 1.0
    for i in range(1, len(thetas)):
        if np.any(np.abs(thetas[:i] - thetas[i]) > cnfs[i] + c * cnfs[:i]):
            chosen = i - 1
            break
    ones, zeros = np.ones(fb.n), np.zeros(fb.n)
    if chosen == 0:
        return dr_terms, ones, zeros, {"slope_step": 0.0, "sd": float(cnfs[0] / t_q)}
    dm_rows = slope.gamma[fb.position] * slope.pi_theta[:, chosen - 1]
    return dm_rows, ones, zeros, {"slope_step": float(chosen), "sd": float(cnfs[chosen] / t_q)}


def point_estimate(
    name: str,
    fb: BanditFeedback,
    pi: np.ndarray,
    q: np.ndarray | None = None,
    *,
    clip: float | None = None,
    tau: float | None = None,
) -> float:
    stats = TargetStats.from_dense(check_action_dist(pi, fb), fb, q, slope=name == "slope")
    num, den, add, _ = _terms(name, fb, stats, clip=clip, tau=tau)
    return _value(num, den, add)


def estimate(
    name: str,
    fb: BanditFeedback,
    pi: np.ndarray,
    q: np.ndarray | None = None,
    *,
    clip: float | None = None,
    tau: float | None = None,
    n_boot: int = 500,
    level: float = 0.9,
    seed: int = 0,
) -> Estimate:
    """Point estimate and a percentile-bootstrap interval (rounds resampled with replacement; the reward
    model's predictions are held fixed, as is switch-DR's chosen tau). SLOPE's interval is normal around
    its choice's standard error instead (a refitting Poisson bootstrap for a DM), since holding a pooled
    DM's fit fixed would leave out the very noise it is chosen by."""
    stats = TargetStats.from_dense(check_action_dist(pi, fb), fb, q, slope=name == "slope")
    return estimate_stats(name, fb, stats, clip=clip, tau=tau, n_boot=n_boot, level=level, seed=seed)


BOOT_CELLS = 1 << 23
"""Resampled rounds drawn at once by :func:`estimate_stats`' bootstrap (64 resamples at a time, fewer on logs
longer than ``BOOT_CELLS / 64`` rounds, so that its memory stays bounded whatever the log's length)."""


def estimate_stats(
    name: str,
    fb: BanditFeedback,
    stats: TargetStats,
    *,
    clip: float | None = None,
    tau: float | None = None,
    n_boot: int = 500,
    level: float = 0.9,
    seed: int = 0,
) -> Estimate:
    """:func:`estimate` from a target's :class:`TargetStats` (formed in blocks: no ``[n, A]`` array)."""
    num, den, add, detail = _terms(name, fb, stats, clip=clip, tau=tau)
    value = _value(num, den, add)
    if name == "slope":
        from scipy.stats import norm

        half = float(norm.ppf((1 + level) / 2)) * detail["sd"]
        return Estimate(name, value, value - half, value + half, level, fb.n, detail)
    rng = np.random.default_rng(seed)
    boots = np.empty(n_boot)
    step = max(1, min(64, BOOT_CELLS // fb.n))
    for start in range(0, n_boot, step):  # vectorised, ``step`` resamples at a time
        idx = rng.integers(0, fb.n, (min(step, n_boot - start), fb.n))
        d = den[idx].sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            boots[start : start + len(idx)] = np.where(d > 0, num[idx].sum(axis=1) / d, np.nan) + add[
                idx
            ].mean(axis=1)
    lo, hi = np.nanquantile(boots, [(1 - level) / 2, (1 + level) / 2])
    return Estimate(name, value, float(lo), float(hi), level, fb.n, detail)


def estimate_all(
    fb: BanditFeedback,
    pi: np.ndarray,
    q: np.ndarray | None = None,
    *,
    estimators: Sequence[str] = ESTIMATORS,
    **kwargs,
) -> dict[str, Estimate]:
    """Every estimator in ``estimators`` that applies (replay is skipped for stochastic targets or
    non-uniform logs, model-based ones when ``q`` is None)."""
    out = {}
    for name in estimators:
        try:
            out[name] = estimate(name, fb, pi, q, **kwargs)
        except ValueError:
            if name == "replay" or (q is None and name not in MODEL_FREE):
                continue
            raise
    return out


PAIRED_ESTIMATORS = ("ips", "snips", "dm", "dr", "sndr")
"""Estimators :func:`estimate_difference` pairs (their per-round terms are the same function of each
target's statistics; SLOPE's and switch-DR's data-driven choices are per target)."""


def estimate_difference(
    name: str,
    fb: BanditFeedback,
    a: TargetStats,
    b: TargetStats,
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """V(a) - V(b) by estimator ``name`` on one log, with a **paired** percentile-bootstrap interval: each
    resample of rounds re-evaluates both targets on the same rounds, so what the two share (the rounds, their
    rewards, the reward model) cancels instead of adding its noise twice. ``detail``: each target's value."""
    if name not in PAIRED_ESTIMATORS:
        raise ValueError(f"no paired difference by {name!r}; expected one of {PAIRED_ESTIMATORS}")
    num_a, den_a, add_a, _ = _terms(name, fb, a, clip=None, tau=None)
    num_b, den_b, add_b, _ = _terms(name, fb, b, clip=None, tau=None)
    va, vb = _value(num_a, den_a, add_a), _value(num_b, den_b, add_b)
    rng = np.random.default_rng(seed)
    boots = np.empty(n_boot)
    step = max(1, min(64, BOOT_CELLS // max(fb.n, 1)))

    def value(num: np.ndarray, den: np.ndarray, add: np.ndarray, idx: np.ndarray) -> np.ndarray:
        d = den[idx].sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(d > 0, num[idx].sum(axis=1) / d, np.nan) + add[idx].mean(axis=1)

    for start in range(0, n_boot, step):
        idx = rng.integers(0, fb.n, (min(step, n_boot - start), fb.n))
        boots[start : start + len(idx)] = value(num_a, den_a, add_a, idx) - value(num_b, den_b, add_b, idx)
    lo, hi = np.nanquantile(boots, [(1 - level) / 2, (1 + level) / 2])
    return Estimate(f"{name} difference", va - vb, float(lo), float(hi), level, fb.n, {"a": va, "b": vb})
