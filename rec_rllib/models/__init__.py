"""Models behind the :class:`~rec_rllib.recommender.Recommender` interface."""

from rec_rllib.models.baselines import BASELINES, PopularityRecommender, RandomRecommender, make_baseline

__all__ = ["BASELINES", "PopularityRecommender", "RandomRecommender", "make_baseline"]
