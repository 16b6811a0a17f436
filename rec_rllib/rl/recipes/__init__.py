"""Named RL settings shipped with the package: ``<name>.yaml`` here holds the :class:`~rec_rllib.rl.config.
RLTrainConfig` settings of a recipe (``jobs.train --recipe``, ``jobs.pipeline --rl-recipe``; docs/rl.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

RECIPES = ("coverage", "relevance")


def recipe(name: str) -> dict[str, Any]:
    """The settings of a named recipe, as a nested dict, checked against :class:`~rec_rllib.rl.config.
    RLTrainConfig`'s keys."""
    import yaml

    from rec_rllib.rl.config import RLTrainConfig

    if name not in RECIPES:
        raise ValueError(f"unknown RL recipe {name!r}; known: {list(RECIPES)}")
    settings = yaml.safe_load((Path(__file__).with_name(f"{name}.yaml")).read_text()) or {}
    RLTrainConfig.from_dict(settings)  # a typo fails here, naming the key
    return settings
