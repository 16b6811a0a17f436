"""Loading a trained RL policy from an RLlib checkpoint alone (what evaluation and serving do)."""

from __future__ import annotations

from pathlib import Path

MODULE_SUBDIR = Path("learner_group") / "learner" / "rl_module" / "default_policy"
ALGORITHM_STATE = "algorithm_state.pkl"


def is_rl_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MODULE_SUBDIR).is_dir()


def check_resumable(path: str | Path) -> Path:
    """``path`` resolved if it is an algorithm checkpoint training can continue from (``<out>/checkpoint`` of
    ``jobs.train``: the algorithm's state and the policy module); a FileNotFoundError saying what is missing
    otherwise."""
    path = Path(path).resolve()
    missing = [str(p) for p in (ALGORITHM_STATE, MODULE_SUBDIR) if not (path / p).exists()]
    if missing:
        raise FileNotFoundError(
            f"{path} is not an RLlib algorithm checkpoint to resume from (no {' and no '.join(missing)}); "
            "give the checkpoint directory of an earlier jobs.train run (<out>/checkpoint)"
        )
    return path


def load_policy_module(checkpoint: str | Path):
    """The :class:`RecPolicyModule` saved in an algorithm checkpoint (no algorithm, no env, no Ray needed)."""
    from ray.rllib.core.rl_module.rl_module import RLModule

    path = Path(checkpoint).resolve()
    if not is_rl_checkpoint(path):
        raise FileNotFoundError(f"{checkpoint} is not an RLlib algorithm checkpoint (no {MODULE_SUBDIR})")
    module = RLModule.from_checkpoint(str(path / MODULE_SUBDIR))
    module.eval()
    return module


def load_policy_recommender(
    checkpoint: str | Path, *, name: str | None = None, exposure_window: int | None = None
):
    """The RL policy's network behind the :class:`Recommender` interface (greedy ranking by its logits).

    A policy trained with an exposure cost answers over a tracker of the last ``exposure_window`` slate positions
    it showed (default: :class:`~rec_rllib.exposure.ExposureConfig`'s, as a serving replica keeps by default; the
    training window counts single recommendations, a different unit)."""
    from rec_rllib.models.run import TransformerRecommender

    module = load_policy_module(checkpoint)
    label = name or Path(checkpoint).resolve().parent.name + "-rl"
    rec = TransformerRecommender(module.net, name=label)
    if getattr(module, "exposure_term", None) is None:
        return rec
    # a policy trained with an exposure cost ranks by its scores minus its learned exposure term, over a tracker
    # of the slates it answered (the users in answer order, as in the env's replay)
    from rec_rllib.exposure import ExposureAwareRecommender, ExposureConfig

    window = ExposureConfig.window if exposure_window is None else exposure_window
    cfg = ExposureConfig(slots=0, window=window, **exposure_penalty(module))
    policy = ExposureAwareRecommender(rec, cfg)
    policy.name = label
    return policy


def exposure_weight(module) -> float:
    """β of a policy module's exposure term (0 without one)."""
    term = getattr(module, "exposure_term", None)
    return 0.0 if term is None else float(term.beta.detach())


def exposure_penalty(module) -> dict:
    """The :class:`~rec_rllib.exposure.ExposureConfig` fields that reproduce a policy module's exposure term:
    ``penalty`` (β, 0 without a term) and ``shape``."""
    term = getattr(module, "exposure_term", None)
    return {"penalty": exposure_weight(module), "shape": "log" if term is None else term.shape}
