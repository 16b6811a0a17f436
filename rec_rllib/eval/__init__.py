"""Evaluation: ranking metrics and protocol (and, later, off-policy estimators and reports)."""

from rec_rllib.eval import metrics
from rec_rllib.eval.ranking import DEFAULT_KS, RankingResult, evaluate_ranking

__all__ = ["DEFAULT_KS", "RankingResult", "evaluate_ranking", "metrics"]
