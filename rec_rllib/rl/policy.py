"""Loading a trained RL policy from an RLlib checkpoint alone (what evaluation and serving do)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rec_rllib.recommender import Recommender

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


def load_any_recommender(spec: str, dataset, **kwargs) -> Recommender:
    """A recommender from any spec a job takes: an RLlib checkpoint (:func:`load_policy_recommender`), else a
    baseline name or a fine-tuned run directory (:func:`rec_rllib.models.load_recommender`, given
    ``kwargs``)."""
    from rec_rllib.models import BASELINES, load_recommender

    if spec not in BASELINES and is_rl_checkpoint(spec):
        return load_policy_recommender(spec, dataset=dataset)
    try:
        return load_recommender(spec, dataset, **kwargs)
    except ValueError as e:
        if str(e).startswith(f"unknown model {spec!r}"):
            raise ValueError(f"{e} or an RLlib checkpoint") from None
        raise


def load_policy_recommender(
    checkpoint: str | Path, *, name: str | None = None, exposure_window: int | None = None, dataset=None
):
    """The RL policy's network behind the :class:`Recommender` interface (greedy ranking by its logits).

    A policy trained with an exposure cost answers over a tracker of the last ``exposure_window`` slate
    positions it showed (default: :class:`~rec_rllib.exposure.ExposureConfig`'s, as a serving replica keeps by
    default; the training window counts single recommendations, a different unit). A policy trained with the
    co-occurrence feature adds its learned γ times the item-kNN simulator's probabilities, the simulator
    fitted on the train split of ``dataset`` (a :class:`~rec_rllib.data.dataset.LogDataset`: the one it was
    trained on), as in training."""
    from rec_rllib.models.run import TransformerRecommender

    module = load_policy_module(checkpoint)
    label = name or Path(checkpoint).resolve().parent.name + "-rl"
    rec = TransformerRecommender(module.net, name=label)
    if getattr(module, "cooccurrence_term", None) is not None:
        if dataset is None:
            raise ValueError(
                f"{checkpoint}: the policy reads the item-kNN simulator's probabilities (trained with the "
                "co-occurrence feature); give the dataset it was trained on"
            )
        co = cooccurrence_settings(module)
        rec = CooccurrenceRecommender(
            rec, simulator_of(dataset, co["scheme"]), co["weight"], co["window"], top=co["items"]
        )
        rec.name = label
    if getattr(module, "exposure_term", None) is None:
        return rec
    # a policy trained with an exposure cost ranks by its scores minus its learned exposure term, over a
    # tracker of the slates it answered (the users in answer order, as in the env's replay)
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


def cooccurrence_weight(module) -> float:
    """γ of a policy module's co-occurrence term (0 without one)."""
    term = getattr(module, "cooccurrence_term", None)
    return 0.0 if term is None else float(term.gamma.detach())


def cooccurrence_settings(module) -> dict | None:
    """A policy module's co-occurrence term as what scoring needs (None without one): ``weight`` γ, ``window``
    (the recent items the feature reads), ``items`` (the most items it lists, None: all) and ``scheme`` (whose
    train split the simulator is fitted on)."""
    if getattr(module, "cooccurrence_term", None) is None:
        return None
    from rec_rllib.rl.module import PolicyModelConfig

    mc = PolicyModelConfig.of(module.model_config)
    return {
        "weight": cooccurrence_weight(module),
        "window": int(mc.cooccurrence_window),
        "items": mc.feature_items,
        "scheme": str(mc.cooccurrence_scheme),
    }


def simulator_of(dataset, scheme: str | None = None):
    """The :class:`~rec_rllib.simulator.ItemKNNSimulator` of a :class:`~rec_rllib.data.dataset.LogDataset`'s
    train split (the same fit as the environment's: every train user's items)."""
    from rec_rllib.columns import Col, Split, SplitScheme
    from rec_rllib.simulator import ItemKNNSimulator

    df = dataset.interactions
    train = df[df[SplitScheme.column(scheme or SplitScheme.LEAVE_ONE_OUT)] == Split.TRAIN]
    return ItemKNNSimulator.from_pairs(
        train[Col.USER_IDX], train[Col.ITEM_IDX], dataset.n_items, dataset.n_users
    )


class CooccurrenceRecommender(Recommender):
    """A recommender's scores plus γ times the item-kNN simulator's probabilities for each history's last
    ``window`` items (the RL policy's co-occurrence term, :class:`~rec_rllib.rl.module.CooccurrenceTerm`), the
    ``top`` most probable items of each (None: all)."""

    def __init__(self, base: Recommender, simulator, gamma: float, window: int, *, top: int | None = None):
        self.base, self.simulator, self.gamma, self.window = base, simulator, float(gamma), int(window)
        self.top = top
        self.name = base.name

    @property
    def n_items(self) -> int:  # the base's catalogue (items added from text have no co-occurrence: 0)
        return self.base.n_items

    def reset(self) -> None:
        self.base.reset()

    def score(self, histories) -> np.ndarray:
        scores = np.asarray(self.base.score(histories), dtype=np.float64)
        n = self.simulator.n_items
        scores[:, :n] += self.gamma * cooccurrence_feature(
            self.simulator, histories, self.window, top=self.top
        )
        return scores


COOCCURRENCE_GAMMA_GRID = (0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0)


def select_cooccurrence_gamma(
    base: Recommender,
    dataset,
    *,
    window: int,
    scheme: str | None = None,
    grid=COOCCURRENCE_GAMMA_GRID,
    metric: str = "NDCG@10",
) -> tuple[float, dict[float, float]]:
    """The γ of ``grid`` under which ``base`` + γ · the co-occurrence feature (last ``window`` items, the
    simulator fitted on ``scheme``'s train split) ranks the validation users best by ``metric``, and every
    γ's figure (``TrainConfig.cooccurrence_gamma``). One evaluation of the validation users per γ; the test
    users are never read."""
    from rec_rllib.columns import SplitScheme
    from rec_rllib.eval import evaluate_ranking

    scheme = scheme or SplitScheme.LEAVE_ONE_OUT
    simulator = simulator_of(dataset, scheme)
    figures: dict[float, float] = {}
    for gamma in sorted({float(g) for g in grid}):
        if gamma < 0:
            raise ValueError(f"co-occurrence weights must be >= 0, got {gamma} in the grid")
        rec = base if gamma == 0 else CooccurrenceRecommender(base, simulator, gamma, window)
        figures[gamma] = float(evaluate_ranking(rec, dataset, scheme=scheme, split="valid").metrics[metric])
    return max(figures, key=lambda g: (figures[g], -g)), figures


def cooccurrence_feature(simulator, histories, window: int, *, top: int | None = None) -> np.ndarray:
    """[B, n] the co-occurrence feature of each history, as the environment computes it in training: the
    simulator's probabilities for its last ``window`` items, the history's owner taken out of the fit (items
    the simulator was not fitted on, e.g. added from text at run time, are skipped), the ``top`` most probable
    items kept (None: all; :meth:`~rec_rllib.simulator.ItemKNNSimulator.feature`)."""
    out = np.zeros((len(histories), simulator.n_items), dtype=np.float64)
    for row, (items, probs) in zip(
        out, cooccurrence_lists(simulator, histories, window, top=top), strict=True
    ):
        row[items] = probs
    return out


def cooccurrence_lists(simulator, histories, window: int, *, top: int | None = None):
    """Per history, the (items, probabilities) of :func:`cooccurrence_feature`'s row that are above 0."""
    n = simulator.n_items
    for h in histories:
        h = np.asarray(h, dtype=np.int64)
        h = h[h < n]
        yield simulator.feature(h[-window:], without=h, top=top)
