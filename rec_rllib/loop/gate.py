"""The safety gate: a candidate replaces the served model only when the data say it is better.

Two rules, by what they compare (``on``):

* ``ope`` (the default): the answers the endpoint gave after the round's training cut (which neither model
  trained on) are an exploration log with the propensity of each first pick. Both models, each under the
  exploration the traffic uses (``exploration``, ``temperature``), are estimated off-policy on it by the
  same estimator (``estimator``: SNIPS by default), and the difference candidate - served gets a paired
  bootstrap interval (:func:`rec_rllib.eval.servelog.compare_on_serve_log`). This measures what a roll would
  do to the first slot's click rate without favouring either model, when the traffic explores; on greedy
  traffic a candidate can only match or lose (the log holds nothing of what it would show instead).
* ``clicks``: each held-out click (the newest, which neither model trained on) gives both models a value of
  ``metric`` (e.g. NDCG@10 of the clicked item given the history the served policy saw), and the interval
  is of the mean per-click difference. Every such click is on an item the served model itself showed, so
  this rule favours the served model.

Either way the candidate is rolled when the lower end of the interval lies above ``margin``, with at least
``min_events`` held-out clicks; otherwise the served model stays, and the decision says why (too few
clicks, an interval that reaches the margin, or a worse candidate).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from rec_rllib.config import DictConfig, setting
from rec_rllib.eval.ranking import bootstrap_ci

GATE_METRICS = ("NDCG@10", "HR@10", "MRR@10")
GATE_RULES = ("ope", "clicks")
GATE_ESTIMATORS = ("snips", "ips", "dr")
GATE_EXPLORATIONS = ("boltzmann", "epsilon", "greedy")


@dataclass
class GateConfig(DictConfig):
    """When a candidate replaces the served model."""

    config_label = "gate config"

    on: str = setting("ope", flag="gate-on", choices=GATE_RULES)
    """What the two models are compared on: ``ope``, off-policy estimates of the first slot's click rate on
    the answers after the training cut (needs exploring traffic); ``clicks``, ranking metrics on the
    held-out clicks (favours the served model)."""
    estimator: str = setting("snips", flag="gate-estimator", choices=GATE_ESTIMATORS)
    """``ope``: the estimator of each model's first-slot click rate."""
    exploration: str = setting("boltzmann", flag="gate-exploration", choices=GATE_EXPLORATIONS)
    """``ope``: how both models are taken to draw their first pick (set it to what the traffic asks for)."""
    temperature: float = setting(1.0, flag="gate-temperature")
    """``ope``: the temperature of ``boltzmann`` (the traffic's)."""
    epsilon: float = setting(0.1, flag="gate-epsilon")
    """``ope``: the exploration probability of ``epsilon`` (the traffic's)."""
    metric: str = setting("NDCG@10", flag="gate-metric", choices=GATE_METRICS)
    """``clicks``: per-event ranking metric of the clicked item, compared on the held-out feedback."""
    level: float = setting(0.95, flag="gate-level")
    """Confidence level of the paired-bootstrap interval of the improvement."""
    margin: float = setting(0.0, flag="gate-margin")
    """The interval's lower end must lie above this (0: any improvement the data support)."""
    min_events: int = setting(30, flag="gate-min-events")
    """Held-out clicks a decision needs; with fewer the served model is kept."""
    n_boot: int = setting(2000, flag="gate-resamples")
    """Bootstrap resamples of the interval."""
    seed: int = setting(0, flag=False)
    """Seeds the resamples."""

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("on", self.on, GATE_RULES),
            ("estimator", self.estimator, GATE_ESTIMATORS),
            ("exploration", self.exploration, GATE_EXPLORATIONS),
            ("metric", self.metric, GATE_METRICS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {self.epsilon}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be above 0, got {self.temperature}")
        if not 0.5 <= self.level < 1.0:
            raise ValueError(f"level must be in [0.5, 1), got {self.level}")
        self.check_numbers(at_least={"min_events": 1, "n_boot": 100})


@dataclass
class Decision:
    """A round's verdict: roll the candidate or keep the served model, with the figures behind it."""

    roll: bool
    reason: str
    metric: str
    events: int
    """Held-out clicks (``clicks``: the events compared; ``ope``: those among the answers estimated on)."""
    served: float
    """The served model's figure: the metric's mean over the held-out clicks, or its estimated click rate."""
    candidate: float
    diff: float
    """candidate - served."""
    low: float
    high: float
    answers: int | None = None
    """``ope``: the logged answers the estimates rest on."""

    def to_dict(self) -> dict:
        return asdict(self)


def _verdict(figures: str, low: float, high: float, cfg: GateConfig) -> tuple[bool, str]:
    if low > cfg.margin:
        return True, f"rolled: {figures}, above {cfg.margin:g}"
    if high < 0:
        return False, f"kept: the candidate is worse, {figures}"
    return False, f"kept: {figures} reaches {cfg.margin:g}: not shown better"


def decide_ope(estimate, clicks: int, cfg: GateConfig) -> Decision:
    """The gate's verdict on a paired off-policy difference candidate - served
    (:class:`~rec_rllib.eval.ope.Estimate` with each model's value in ``detail`` ``a`` and ``b``) over
    answers holding ``clicks`` held-out clicks; ``estimate`` None: no answer was logged after the cut."""
    metric = f"{cfg.estimator.upper()} first-slot click rate ({cfg.exploration})"
    if estimate is None:
        nan = float("nan")
        return Decision(
            roll=False,
            reason="kept: no answer logged after the training cut to estimate on",
            metric=metric,
            events=clicks,
            served=nan,
            candidate=nan,
            diff=nan,
            low=nan,
            high=nan,
            answers=0,
        )
    figures = dict(
        metric=metric,
        events=clicks,
        served=float(estimate.detail["b"]),
        candidate=float(estimate.detail["a"]),
        diff=float(estimate.value),
        low=float(estimate.low),
        high=float(estimate.high),
        answers=estimate.n,
    )
    if clicks < cfg.min_events:
        reason = f"kept: {clicks} held-out clicks, fewer than the {cfg.min_events} a decision needs"
        return Decision(roll=False, reason=reason, **figures)
    if not np.isfinite([estimate.value, estimate.low, estimate.high]).all():
        reason = (
            f"kept: {cfg.estimator} is undefined on these {estimate.n} answers (a model gives no weight to "
            "any logged first pick: the traffic did not explore where it would go)"
        )
        return Decision(roll=False, reason=reason, **figures)
    said = (
        f"{cfg.estimator} {estimate.value:+.4f}, {estimate.level:.0%} interval "
        f"[{estimate.low:+.4f}, {estimate.high:+.4f}] on {estimate.n} answers"
    )
    roll, reason = _verdict(said, estimate.low, estimate.high, cfg)
    return Decision(roll=roll, reason=reason, **figures)


def decide(served: np.ndarray, candidate: np.ndarray, cfg: GateConfig) -> Decision:
    """The gate's verdict on per-event values of both models over the same held-out events."""
    served = np.asarray(served, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    if served.shape != candidate.shape:
        raise ValueError(f"paired values differ in shape: {served.shape} vs {candidate.shape}")
    n = len(served)
    if n < cfg.min_events:
        nan = float("nan")
        return Decision(
            roll=False,
            reason=f"kept: {n} held-out clicks, fewer than the {cfg.min_events} a decision needs",
            metric=cfg.metric,
            events=n,
            served=float(served.mean()) if n else nan,
            candidate=float(candidate.mean()) if n else nan,
            diff=float((candidate - served).mean()) if n else nan,
            low=nan,
            high=nan,
        )
    diff = candidate - served
    low, high = bootstrap_ci(diff, level=cfg.level, n_boot=cfg.n_boot, seed=cfg.seed)
    mean = float(diff.mean())
    figures = f"{cfg.metric} {mean:+.4f}, {cfg.level:.0%} interval [{low:+.4f}, {high:+.4f}]"
    roll, reason = _verdict(figures, low, high, cfg)
    return Decision(
        roll=roll,
        reason=reason,
        metric=cfg.metric,
        events=n,
        served=float(served.mean()),
        candidate=float(candidate.mean()),
        diff=mean,
        low=low,
        high=high,
    )
