"""Validating the off-policy estimators on the Open Bandit Dataset sample, where the truth is logged.

The sample has, per campaign (all, men, women), 10,000 rounds of a uniform random logging policy and
10,000 of Bernoulli Thompson Sampling (BTS), run side by side in the same week. We estimate one policy's
click rate from the other policy's logs and compare it with that policy's own on-policy click rate.

BTS's action distribution per position (``[A, 3]``), two ways:

* ``prior``: as the reference library defines it, Monte Carlo from the production Beta prior shipped in
  the same sdist (``obp/policy/conf/prior_bts.yaml``: alpha, beta per item and campaign): theta ~ Beta,
  the top 3 items fill positions 1-3. Read as data; obp is never imported.
* ``empirical``: the frequency of each item at each position in the BTS logs.

The BTS logs' own propensity scores are never used as BTS's distribution: BTS was re-fitted during the
week, an item's logged propensity drifts, and their per-position means sum to 2-4, not 1. The random
policy's distribution is uniform (1 / n_items at every position), which is also its logged propensity.

Protocol (the reference library's benchmark, reproduced draw for draw): rounds in timestamp order;
bootstrap resample b is ``numpy.random.RandomState(b).choice(n, n)`` (resamples 0-29 are the ones behind
the published figures, set r of ``repeats`` uses 30r ... 30r + 29); BTS's prior distribution is the Monte
Carlo of 1,000,000 slates drawn by ``RandomState(12345)``, item by item in the prior file's order. On each
resample the reward model is refitted (cross-fitted) and every estimator is computed; the relative error is
``|estimate - truth| / truth`` with truth the target's on-policy click rate over its whole log. With these
draws our IPS and SNIPS give the published 0.311082 and 0.311795 to the sixth digit (tested).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from rec_rllib.columns import Col
from rec_rllib.data.dataset import LogDataset
from rec_rllib.eval.ope import (
    MODEL_FREE,
    REWARD_MODELS,
    BanditFeedback,
    check_action_dist,
    cross_fit,
    empirical_action_dist,
    point_estimate,
)

OPE_ESTIMATORS = ("dm", "ips", "snips", "dr", "sndr", "switch-dr", "slope")
DEFINITIONS = ("prior", "empirical")
DIRECTIONS = {"random->bts": ("random", "bts"), "bts->random": ("bts", "random")}
"""direction -> (logging policy whose logs are used, target policy whose click rate is estimated)."""


def obd_feedback(dataset: LogDataset, policy: str, *, context: bool = True) -> BanditFeedback:
    """One logging policy's rounds of a prepared ``obd-<campaign>`` dataset (positions made 0-based).

    Context features (for the logistic reward model): one-hot of the four hashed user features and the
    user-item affinities."""
    inter = dataset.interactions
    if Col.POLICY not in inter or Col.PROPENSITY not in inter or Col.POSITION not in inter:
        raise ValueError(f"{dataset.name}: needs policy, propensity and position columns (an OBD dataset)")
    rows = inter[inter[Col.POLICY] == policy].sort_values([Col.TIMESTAMP, Col.SOURCE_ROW])
    if rows.empty:
        raise ValueError(
            f"{dataset.name}: no rounds of policy {policy!r}; it has {sorted(inter[Col.POLICY].unique())}"
        )
    pos = rows[Col.POSITION].to_numpy().astype(np.int64)
    first = int(inter[Col.POSITION].min())
    ctx = None
    if context:
        feats = []
        for c in sorted(c for c in rows.columns if c.startswith("ctx_user_feature_")):
            cats = sorted(inter[c].astype(str).unique())
            feats.append((rows[c].astype(str).to_numpy()[:, None] == np.array(cats)[None, :]).astype(float))
        aff = [c for c in rows.columns if c.startswith("ctx_user_item_affinity_")]
        if aff:
            feats.append(rows[aff].to_numpy(dtype=float))
        ctx = np.concatenate(feats, axis=1) if feats else None
    return BanditFeedback(
        action=rows[Col.ITEM_IDX].to_numpy().astype(np.int64),
        position=pos - first,
        reward=rows[Col.REWARD].to_numpy().astype(np.float64),
        pscore=rows[Col.PROPENSITY].to_numpy().astype(np.float64),
        n_actions=dataset.n_items,
        n_positions=int(inter[Col.POSITION].max()) - first + 1,
        context=ctx,
        name=f"{dataset.name}/{policy}",
    )


def bts_prior(prior_yaml: str | Path, campaign: str, dataset: LogDataset) -> tuple[np.ndarray, np.ndarray]:
    """(alpha, beta) per item id of the production prior file (index = item id, the file's order), checked
    to cover every item of ``dataset``."""
    doc = yaml.safe_load(Path(prior_yaml).read_text())
    if campaign not in doc or not {"alpha", "beta"} <= set(doc[campaign]):
        raise ValueError(f"{prior_yaml}: no alpha/beta for campaign {campaign!r} (has {sorted(doc)})")
    alpha = np.asarray(doc[campaign]["alpha"], dtype=np.float64)
    beta = np.asarray(doc[campaign]["beta"], dtype=np.float64)
    ids = dataset.items[Col.ITEM_ID].astype(int).to_numpy()
    if len(alpha) != len(beta) or ids.max() >= len(alpha):
        raise ValueError(
            f"{prior_yaml}: campaign {campaign!r} has {len(alpha)} alphas and {len(beta)} betas; "
            f"the dataset has item ids up to {ids.max()}"
        )
    return alpha, beta


def bts_action_dist(
    definition: str,
    *,
    dataset: LogDataset,
    campaign: str,
    bts_log: BanditFeedback,
    prior_yaml: str | Path | None = None,
    n_sim: int = 1_000_000,
    seed: int = 12345,
) -> np.ndarray:
    """BTS's [A, K] distribution by ``definition`` ('prior' or 'empirical')."""
    if definition == "empirical":
        return empirical_action_dist(bts_log)
    if definition == "prior":
        if prior_yaml is None:
            from rec_rllib.data import fetch

            prior_yaml = fetch.obd_prior_path()
        alpha, beta = bts_prior(prior_yaml, campaign, dataset)
        ids = dataset.items[Col.ITEM_ID].astype(int).to_numpy()
        per_id = _prior_marginals(tuple(alpha), tuple(beta), bts_log.n_positions, n_sim, seed)
        return per_id[ids] / per_id[ids].sum(axis=0, keepdims=True)
    raise ValueError(f"unknown BTS definition {definition!r}; expected one of {DEFINITIONS}")


@functools.lru_cache(maxsize=8)
def _prior_marginals(alpha: tuple, beta: tuple, k: int, n_sim: int, seed: int) -> np.ndarray:
    """[len(alpha), k] Bernoulli Thompson sampling's slate marginals from its Beta prior, drawn exactly as
    the reference library does (one ``RandomState(seed).beta`` vector per slate, the top k by descending
    argsort), in chunks: the same stream, so the same figures."""
    rs = np.random.RandomState(seed)
    a, b = np.asarray(alpha, dtype=np.float64), np.asarray(beta, dtype=np.float64)
    counts = np.zeros((len(a), k))
    for start in range(0, n_sim, 50_000):
        draws = rs.beta(a, b, size=(min(50_000, n_sim - start), len(a)))
        top = np.argsort(draws, axis=1)[:, ::-1][:, :k]
        for j in range(k):
            counts[:, j] += np.bincount(top[:, j], minlength=len(a))
    return counts / n_sim


def uniform_dist(n_actions: int, n_positions: int) -> np.ndarray:
    return np.full((n_actions, n_positions), 1.0 / n_actions)


@dataclass
class ValidationResult:
    campaign: str
    direction: str
    definition: str
    truth: float
    estimates: dict[str, np.ndarray]
    """estimator -> [n_boot] estimates."""

    def relative_errors(self) -> dict[str, np.ndarray]:
        return {k: np.abs(v - self.truth) / self.truth for k, v in self.estimates.items()}

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            name: {
                "mean_relative_error": float(re.mean()),
                "sd_relative_error": float(re.std()),
                "mean_estimate": float(self.estimates[name].mean()),
                "truth": self.truth,
            }
            for name, re in self.relative_errors().items()
        }


def validate(
    dataset: LogDataset,
    *,
    campaign: str,
    direction: str = "random->bts",
    definition: str = "prior",
    estimators: Sequence[str] = OPE_ESTIMATORS,
    reward_model: str = "position-ctr",
    n_boot: int = 30,
    first_resample: int = 0,
    folds: int = 3,
    clip: float | None = None,
    prior_yaml: str | Path | None = None,
    seed: int = 12345,
) -> ValidationResult:
    """Relative error of each estimator over bootstrap resamples ``first_resample`` ... ``first_resample +
    n_boot - 1`` of the logging policy's log (resample b drawn by ``RandomState(b)``, as the reference)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; expected one of {sorted(DIRECTIONS)}")
    if reward_model not in REWARD_MODELS:
        raise ValueError(f"unknown reward model {reward_model!r}; expected one of {sorted(REWARD_MODELS)}")
    logging_name, target_name = DIRECTIONS[direction]
    logs = {p: obd_feedback(dataset, p, context=reward_model == "logistic") for p in ("random", "bts")}
    bts = bts_action_dist(
        definition, dataset=dataset, campaign=campaign, bts_log=logs["bts"], prior_yaml=prior_yaml, seed=seed
    )
    uniform = uniform_dist(dataset.n_items, logs["random"].n_positions)
    dists = {"bts": bts, "random": uniform}
    log = logs[logging_name]
    if logging_name == "bts":
        # BTS's logged propensities are not its distribution (see the module docstring): use the definition's
        log = BanditFeedback(
            log.action,
            log.position,
            log.reward,
            _behaviour_pscore(bts, log),
            log.n_actions,
            log.n_positions,
            log.context,
            log.name,
        )
    pi = check_action_dist(dists[target_name], log)
    truth = logs[target_name].on_policy_value()
    out = {name: np.empty(n_boot) for name in estimators}
    needs_model = any(name not in MODEL_FREE for name in estimators)
    for i, b in enumerate(range(first_resample, first_resample + n_boot)):
        sample = log.subset(np.random.RandomState(b).choice(np.arange(log.n), size=log.n, replace=True))
        q = (
            cross_fit(REWARD_MODELS[reward_model], sample, folds=folds, seed=seed + b)
            if needs_model
            else None
        )
        for name in estimators:
            out[name][i] = point_estimate(name, sample, pi, q, clip=clip)
    return ValidationResult(campaign, direction, definition, truth, out)


def _behaviour_pscore(dist: np.ndarray, fb: BanditFeedback, floor: float = 1e-6) -> np.ndarray:
    """The logging policy's probability of each logged (action, position) under ``dist``, floored so an
    action the distribution (nearly) never shows still gets a finite weight; the floor is reported as
    bias, not hidden: rounds at the floor are where that definition and the logs disagree."""
    return np.maximum(dist[fb.action, fb.position], floor)


OBP_PUBLISHED = {
    "dm": 0.156876,
    "ips": 0.311082,
    "snips": 0.311795,
    "dr": 0.292464,
    "sndr": 0.302407,
    "switch-dr": 0.258410,
}
"""The reference library's published mean relative errors (obp examples/obd: campaign all, BTS by its prior,
estimated from the random logs, bootstrap resamples 0-29; DM/DR with its logistic-regression reward model,
Switch-DR with its own tau). Resamples 0-29 are our first set, so our figures on them compare draw for
draw; ``bench/ope_obd_reference.py`` re-implements its DM/DR for a paired comparison."""


def validation_suite(
    *,
    campaigns: Sequence[str] = ("all", "men", "women"),
    directions: Sequence[str] = tuple(DIRECTIONS),
    definitions: Sequence[str] = DEFINITIONS,
    n_boot: int = 30,
    repeats: int = 1,
    reward_model: str = "position-ctr",
    data_root: str | None = None,
    progress=None,
) -> dict[str, dict]:
    """Every (campaign, direction, definition): mean relative error per estimator, averaged over
    ``repeats`` sets of ``n_boot`` resamples (set r: resamples r * n_boot ...; a single set of 30 has a Monte
    Carlo error of ~0.02-0.06 on the mean itself), and over the first set alone (resamples 0 ... n_boot - 1:
    with n_boot = 30 the reference's published ones). Returns ``{"all/random->bts/prior": {"truth",
    "errors", "errors_first_set", "mean_estimates", "estimates"}}``."""
    from rec_rllib.data.catalog import load_or_prepare

    out: dict[str, dict] = {}
    for campaign in campaigns:
        dataset = load_or_prepare(f"obd-{campaign}", root=data_root)
        for direction in directions:
            for definition in definitions:
                runs = [
                    validate(
                        dataset,
                        campaign=campaign,
                        direction=direction,
                        definition=definition,
                        reward_model=reward_model,
                        n_boot=n_boot,
                        first_resample=r * n_boot,
                    )
                    for r in range(repeats)
                ]
                errors = {
                    name: float(np.mean([r.relative_errors()[name].mean() for r in runs]))
                    for name in runs[0].estimates
                }
                key = f"{campaign}/{direction}/{definition}"
                out[key] = {
                    "truth": runs[0].truth,
                    "errors": errors,
                    "errors_first_set": {n: float(e.mean()) for n, e in runs[0].relative_errors().items()},
                    "mean_estimates": {
                        n: float(np.mean([r.estimates[n].mean() for r in runs])) for n in errors
                    },
                    "estimates": {n: np.concatenate([r.estimates[n] for r in runs]).tolist() for n in errors},
                }
                if progress:
                    progress(key, errors)
    return out
