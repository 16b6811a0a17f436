"""Models behind the :class:`~rec_rllib.recommender.Recommender` interface."""

from __future__ import annotations

from pathlib import Path

from rec_rllib.columns import SplitScheme
from rec_rllib.data.dataset import LogDataset
from rec_rllib.models.baselines import BASELINES, PopularityRecommender, RandomRecommender, make_baseline
from rec_rllib.recommender import Recommender

__all__ = ["BASELINES", "PopularityRecommender", "RandomRecommender", "load_recommender", "make_baseline"]


def load_recommender(
    spec: str,
    dataset: LogDataset,
    *,
    scheme: str = SplitScheme.LEAVE_ONE_OUT,
    seed: int = 0,
    device: str = "cpu",
) -> Recommender:
    """A baseline by name (``popularity``, ``random``) or a fine-tuned run directory, for ``dataset``
    (:func:`rec_rllib.rl.policy.load_any_recommender` takes RLlib checkpoints as well)."""
    if spec in BASELINES:
        return make_baseline(spec, dataset, scheme=scheme, seed=seed)
    from rec_rllib.models.run import TransformerRecommender, is_run_dir, load_run

    if is_run_dir(spec):
        model, meta = load_run(spec, device=device)
        expected = dataset.manifest.get("content_hash")
        trained_on = meta.get("dataset", {}).get("content_hash")
        if expected and trained_on and expected != trained_on:
            raise ValueError(
                f"{spec} was trained on dataset {meta['dataset'].get('name')} ({trained_on[:19]}), "
                f"not on {dataset.name} ({expected[:19]}); evaluate it on the dataset it was trained on"
            )
        return TransformerRecommender(model, name=Path(spec).name)
    raise ValueError(f"unknown model {spec!r}: expected one of {BASELINES} or a fine-tuned run directory")
