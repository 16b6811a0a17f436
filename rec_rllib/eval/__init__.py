"""Evaluation: ranking metrics and protocol, off-policy estimators, plots and reports."""

from rec_rllib.eval import metrics
from rec_rllib.eval.ranking import DEFAULT_KS, RankingResult, evaluate_ranking

__all__ = ["DEFAULT_KS", "RankingResult", "evaluate_ranking", "metrics"]
