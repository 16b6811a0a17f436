"""The safety gate: a candidate replaces the served model only when the data say it is better.

The rule: on the held-out feedback events (the newest clicks, which neither model trained on), each event
gives both models a value of the gate's metric (e.g. NDCG@10 of the clicked item given the history the
served policy saw). The candidate is rolled when the lower end of the paired-bootstrap interval of the mean
difference (candidate - served) lies above ``margin``; otherwise the served model stays, and the decision
says why (too few events, an interval that reaches zero, or a worse candidate).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from rec_rllib.config import DictConfig, setting
from rec_rllib.eval.ranking import bootstrap_ci

GATE_METRICS = ("NDCG@10", "HR@10", "MRR@10")


@dataclass
class GateConfig(DictConfig):
    """When a candidate replaces the served model."""

    config_label = "gate config"

    metric: str = setting("NDCG@10", flag="gate-metric", choices=GATE_METRICS)
    """Per-event ranking metric of the clicked item, compared on the held-out feedback."""
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
        if self.metric not in GATE_METRICS:
            raise ValueError(f"metric must be one of {GATE_METRICS}, got {self.metric!r}")
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
    served: float
    """Mean of the metric over the held-out events, served model."""
    candidate: float
    diff: float
    """candidate - served."""
    low: float
    high: float

    def to_dict(self) -> dict:
        return asdict(self)


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
    if low > cfg.margin:
        reason = f"rolled: {figures}, above {cfg.margin:g}"
    elif high < 0:
        reason = f"kept: the candidate is worse, {figures}"
    else:
        reason = f"kept: {figures} reaches {cfg.margin:g}: not shown better"
    return Decision(
        roll=low > cfg.margin,
        reason=reason,
        metric=cfg.metric,
        events=n,
        served=float(served.mean()),
        candidate=float(candidate.mean()),
        diff=mean,
        low=low,
        high=high,
    )
