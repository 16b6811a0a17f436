"""RL training with RLlib's new API stack: the algorithm config (one builder chain) and the training loop.

APPO (the default: asynchronous actor-learner with V-trace) or PPO train :class:`RecPolicyModule` on env
runners that replay disjoint user shards (:class:`~rec_rllib.env.LogReplayEnv`). Resources come from the
config: env runners' CPUs and custom resources (e.g. ``{"env_runner": 1}`` to pin them to a node group),
learners' count, GPUs (fractions allowed) and custom resources.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rec_rllib.config import DictConfig
from rec_rllib.env import EnvConfig, LogReplayEnv, train_item_counts
from rec_rllib.explore import ExplorationConfig
from rec_rllib.fsutil import write_csv
from rec_rllib.rl.obs import CANDIDATES_AUTO

log = logging.getLogger(__name__)
ALGORITHMS = ("appo", "ppo", "dqn")
GAMMA_FROM_VALIDATION = "validation"
"""``cooccurrence_gamma``'s value for a γ chosen on the validation users
(:func:`choose_cooccurrence_gamma`)."""
SAMPLER_WAIT_S = 0.05
"""APPO's driver waits up to this long for env-runner samples per training step (RLlib's default: 0)."""


@dataclass
class RLTrainConfig(DictConfig):
    """Settings of an RL training run (defaults: a 2-core laptop)."""

    config_label = "RL config"

    algorithm: str = "appo"
    """``appo`` (V-trace actor-learner, asynchronous sampling), ``ppo``, or ``dqn`` (double Q-learning
    from a replay buffer; the catalogue scores are the Q-values, anchored by ``next_item_ce_coeff``; explore
    with ``epsilon`` and its decay)."""
    finetuned: str = "runs/finetune"
    """Fine-tuned run directory whose weights initialise the policy."""
    iterations: int = 20
    """Training iterations (``algo.train()`` calls)."""
    num_env_runners: int = 2
    """Remote env runners; each replays its own shard of users."""
    num_envs_per_env_runner: int = 32
    """Vectorised sub-environments per runner (one batched forward pass for all of them: on 2 cores, 32
    envs sample 1.3x faster than 8)."""
    num_cpus_per_env_runner: float = 1.0
    """CPUs each env runner reserves."""
    env_runner_resources: dict[str, float] = field(default_factory=dict)
    """Custom resources each env runner needs, e.g. {"env_runner": 1} to place runners on tagged nodes."""
    rollout_fragment_length: int = 20
    """Env steps per sub-environment per sample call (APPO, DQN; PPO derives it from the train batch)."""
    train_batch_size: int = 640
    """Env steps per learner update (per learner)."""
    num_learners: int = 0
    """Remote learners (0 = learn in the driver process)."""
    num_gpus_per_learner: float = 0.0
    """GPUs per learner (fractions allowed); 0 = CPU."""
    learner_resources: dict[str, float] = field(default_factory=dict)
    """Custom resources each learner needs, e.g. {"learner": 1}."""
    train_encoder: bool = False
    """False: train a policy head (a linear map on the user state, a weight on item popularity) and the item
    bias on the frozen fine-tuned encoder: env runners ship the user state, so the learner never runs the
    encoder. True: train every weight end to end (the learner runs the encoder for the online, target and
    reference networks)."""
    train_state_head: bool = True
    """Policy head only: train its linear map on the user state. False keeps the map at its fine-tuned identity
    and trains the item bias, the popularity weight and (with an exposure cost) the exposure weight: each user's
    relevance ranking stays the fine-tuned model's (with an exposure cost, a trained map scatters from seed to
    seed; docs/rl.md)."""
    train_item_terms: bool = True
    """Policy head only: train the item bias and the popularity weight. False keeps them at the fine-tuned values:
    with ``train_state_head=False`` and an exposure cost, RL trains the exposure weight β alone: the policy is the
    fine-tuned scores minus the price RL learned for what is on display, a point of the fine-tuned model's own
    accuracy-coverage frontier. With a small exposure cost β settles where the reward balances; with a large
    one it keeps climbing (by up to about 0.01 an update) and the iteration budget sets where it stops."""
    cooccurrence_gamma: float | str | None = None
    """With ``env.cooccurrence``: None = RL learns γ, the co-occurrence term's weight (from 0); a number fixes
    γ there and RL learns the rest (β, with an exposure cost); ``"validation"``: fixed at the γ under which
    the fine-tuned scores plus the term rank the validation users best
    (:func:`rec_rllib.rl.policy.select_cooccurrence_gamma`, chosen when training starts;
    ``cooccurrence_gamma.json`` in the run). RL's reward (the replay's hits less the exposure price) settles a
    learned γ well below where ranking wants it, so the coverage recipe chooses γ on the validation users
    (docs/rl.md)."""
    lr: float | None = None
    """Learning rate; None = 1e-3 for the policy head, 3e-5 end to end (the encoder starts fine-tuned)."""
    entropy_coeff: float = 0.0
    """Entropy bonus."""
    ref_kl_coeff: float = 0.05
    """Weight of KL(pi || fine-tuned policy) in the loss (0 disables)."""
    next_item_ce_coeff: float = 20.0
    """DQN only: weight of the cross-entropy of the logged next item on the Q-values (the supervised anchor
    of SQN; 0 = plain double Q-learning, which pulls the fine-tuned ranking apart; 20 ranks best on the
    validation users)."""
    gamma: float = 0.9
    """Discount."""
    candidate_items: int | str = "auto"
    """APPO and PPO: the policy ranks, in each state, its K best items by the scores before the exposure
    term, and acts and learns over those (the learner's cost per sample then follows K, not the catalogue).
    ``auto``: the whole catalogue up to 4,096 items (MovieLens-100K's 1,682: exactly the catalogue-wide
    policy), 512 candidates above; a number K: K candidates whenever the catalogue has more items; 0: the
    whole catalogue at any size. DQN always scores the whole catalogue (its target takes the maximum over the
    next state's items)."""
    checkpoint_every: int = 5
    """Save an RLlib checkpoint every N iterations (and at the end)."""
    seed: int = 0
    """Seeds the env runners and learners."""
    exploration: ExplorationConfig = field(default_factory=ExplorationConfig)
    env: EnvConfig = field(default_factory=EnvConfig)

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 3e-5 if self.train_encoder else 1e-3

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {self.algorithm!r}; expected one of {ALGORITHMS}")
        self.check_numbers(
            at_least={"iterations": 1, "num_env_runners": 0, "num_envs_per_env_runner": 1, "num_cpus_per_env_runner": 0,
                      "rollout_fragment_length": 1, "train_batch_size": 1, "num_learners": 0,
                      "num_gpus_per_learner": 0, "entropy_coeff": 0, "ref_kl_coeff": 0, "checkpoint_every": 1},
            above={"lr": 0} if self.lr is not None else {},
        )  # fmt: skip
        k = self.candidate_items
        if k != CANDIDATES_AUTO and (
            isinstance(k, bool) or not isinstance(k, int) or not (k == 0 or k >= 10)
        ):
            raise ValueError(
                f"candidate_items must be {CANDIDATES_AUTO!r}, 0 (the whole catalogue) or a number of at "
                f"least 10, got {k!r}"
            )
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma!r}")
        for name in ("env_runner_resources", "learner_resources"):
            for key, amount in getattr(self, name).items():
                if not key or not amount > 0:
                    raise ValueError(
                        f"{name}: {key!r}={amount!r}; each resource needs a name and an amount > 0"
                    )
        if isinstance(self.exploration, dict):
            self.exploration = ExplorationConfig(**self.exploration)
        if isinstance(self.env, dict):
            self.env = EnvConfig(**self.env)
        if self.next_item_ce_coeff < 0:
            raise ValueError(f"next_item_ce_coeff must be >= 0 (0 = off), got {self.next_item_ce_coeff}")
        if self.algorithm == "dqn" and self.exploration.strategy != "epsilon":
            raise ValueError("dqn explores epsilon-greedily (with exploration.decay_steps); set exploration "
                             f"strategy 'epsilon', not {self.exploration.strategy!r}")  # fmt: skip
        if self.algorithm == "ppo" and self.exploration.strategy in ("epsilon", "ucb"):
            raise ValueError(
                f"ppo optimises the distribution that acted and {self.exploration.strategy}'s has no gradient "
                "(measured for epsilon: it collapses onto popular items); use boltzmann or thompson with ppo, "
                "or epsilon/ucb with appo"
            )
        if self.train_encoder and not self.train_state_head:
            raise ValueError("train_state_head=False freezes the policy head's map; end to end (train_encoder) "
                             "has no policy head: drop one of the two")  # fmt: skip
        if self.train_encoder and not self.train_item_terms:
            raise ValueError("train_item_terms=False freezes the policy head's item terms; end to end "
                             "(train_encoder) trains every weight: drop one of the two")  # fmt: skip
        # (end to end implies both head flags, checked above)
        if not (
            self.train_state_head
            or self.train_item_terms
            or self.env.exposure_cost > 0
            or (self.env.cooccurrence and self.cooccurrence_gamma is None)
        ):
            raise ValueError("train_state_head=False and train_item_terms=False leave RL nothing to train without an "
                             "exposure cost or a learned co-occurrence weight: set env.exposure_cost > 0, or "
                             "env.cooccurrence without cooccurrence_gamma")  # fmt: skip
        if self.cooccurrence_gamma is not None:
            if not self.env.cooccurrence:
                raise ValueError(
                    f"cooccurrence_gamma={self.cooccurrence_gamma} weighs the co-occurrence feature, which "
                    "the env adds only with env.cooccurrence: set it, or drop the weight"
                )
            g = self.cooccurrence_gamma
            if g != GAMMA_FROM_VALIDATION and not (
                isinstance(g, (int, float)) and not isinstance(g, bool) and math.isfinite(g) and g >= 0
            ):
                raise ValueError(
                    f"cooccurrence_gamma must be a number >= 0 or {GAMMA_FROM_VALIDATION!r}, got {g!r}"
                )
        if self.exploration.strategy == "greedy":
            raise ValueError(
                "exploration 'greedy' never explores: RL training needs a behaviour policy that tries other "
                "items: use boltzmann, epsilon, thompson or ucb (greedy is for serving)"
            )


REPLAY_HITS, REPLAY_STEPS, REPLAY_ON_DISPLAY = "replay_hits", "replay_steps", "replay_on_display"


def count_replay_hits(*, metrics_logger=None, samples, **kwargs) -> None:
    """``on_sample_end``: the steps sampled and how many recommended one of the user's next logged items (the
    env's ``hit`` info), summed per iteration. The hit rate is their ratio: the mean return per step is not one
    once a novelty reward or an exposure cost is added, or the hit is weighted by the rating. With an exposure
    cost also how many recommended an item already on display (the ``on_display`` info)."""
    if metrics_logger is None:
        return
    hits = steps = shown = 0
    for episode in samples:
        infos = episode.get_infos()[1:]  # the first belongs to the chunk's first observation (a reset, or the
        # previous chunk's last step)
        hits += sum(bool(i.get("hit")) for i in infos)
        shown += sum(bool(i.get("on_display")) for i in infos)
        steps += len(infos)
    metrics_logger.log_value(REPLAY_HITS, hits, reduce="sum")
    metrics_logger.log_value(REPLAY_STEPS, steps, reduce="sum")
    metrics_logger.log_value(REPLAY_ON_DISPLAY, shown, reduce="sum")


def build_algo_config(cfg: RLTrainConfig, model_config: dict[str, Any]):
    """The RLlib AlgorithmConfig, as one builder chain."""
    from ray.rllib.algorithms.appo import APPOConfig
    from ray.rllib.algorithms.dqn import DQNConfig
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from rec_rllib.rl.connectors import (
        DropActionDistInputs,
        FillBootstrapUserState,
        RecordUCBStatistics,
        ship_final_user_states,
    )
    from rec_rllib.rl.learners import (
        NEXT_ITEM_CE_COEFF,
        REF_KL_COEFF,
        RecAPPOLearner,
        RecDQNLearner,
        RecPPOLearner,
    )
    from rec_rllib.rl.module import RecPolicyModule

    base, learner_class = {
        "appo": (APPOConfig(), RecAPPOLearner),
        "ppo": (PPOConfig(), RecPPOLearner),
        "dqn": (DQNConfig(), RecDQNLearner),  # the module supplies Q-values and a target net
    }[cfg.algorithm]
    ref_kl = 0.0 if cfg.algorithm == "dqn" else cfg.ref_kl_coeff
    model_config = {
        **model_config,
        "exploration": asdict(cfg.exploration),
        "ref_kl_coeff": ref_kl,
        "train_encoder": cfg.train_encoder,
        "train_state_head": cfg.train_state_head,
        "train_item_terms": cfg.train_item_terms,
        # PPO (no off-policy correction) optimises the behaviour distribution itself
        "train_behaviour_policy": cfg.algorithm == "ppo",
        # the policy head's popularity feature, from the split the env replays
        "item_counts": None if cfg.train_encoder else train_item_counts(cfg.env.dataset, cfg.env.scheme),
        # the env prices exposure: the module learns a weight on the exposure counts it observes
        "exposure_window": cfg.env.exposure_window if cfg.env.exposure_cost > 0 else 0,
        "exposure_shape": cfg.env.exposure_shape,
        # the env's observation carries the item-kNN simulator's probabilities: the module learns a weight on them
        "cooccurrence": cfg.env.cooccurrence,
        "cooccurrence_window": cfg.env.cooccurrence_window,
        "feature_items": cfg.env.feature_items,  # what scoring keeps of the feature, as the env does
        "cooccurrence_scheme": cfg.env.scheme,
        "cooccurrence_gamma": cfg.cooccurrence_gamma,  # None: learned
        "candidate_items": 0 if cfg.algorithm == "dqn" else cfg.candidate_items,
    }
    config = (
        # normalize_actions off: a policy over candidates hands the env the item its action stands for
        # (ACTIONS_FOR_ENV), which RLlib's action normalisation (a no-op for a discrete space) would overwrite
        base.environment(
            LogReplayEnv, env_config=asdict(cfg.env), disable_env_checking=True, normalize_actions=False
        )
        .env_runners(
            num_env_runners=cfg.num_env_runners,
            num_envs_per_env_runner=cfg.num_envs_per_env_runner,
            num_cpus_per_env_runner=cfg.num_cpus_per_env_runner,
            custom_resources_per_env_runner=dict(cfg.env_runner_resources),
            rollout_fragment_length=cfg.rollout_fragment_length,
        )
        .learners(
            num_learners=cfg.num_learners,
            num_gpus_per_learner=cfg.num_gpus_per_learner,
            custom_resources_per_learner=dict(cfg.learner_resources),
        )
        .rl_module(rl_module_spec=RLModuleSpec(module_class=RecPolicyModule, model_config=model_config))
        .training(lr=cfg.learning_rate, gamma=cfg.gamma, train_batch_size_per_learner=cfg.train_batch_size)
        .fault_tolerance(restart_failed_env_runners=True)
        .reporting(min_time_s_per_iteration=0, metrics_num_episodes_for_smoothing=100)
        .debugging(seed=cfg.seed)
        .callbacks(on_sample_end=count_replay_hits)
    )
    if cfg.algorithm == "dqn":
        return config.training(
            learner_class=learner_class,
            learner_config_dict={NEXT_ITEM_CE_COEFF: cfg.next_item_ce_coeff},
            replay_buffer_config={"type": "EpisodeReplayBuffer", "capacity": 50_000},
            double_q=True,
            dueling=False,
            num_atoms=1,
            n_step=1,
            td_error_loss_fn="huber",
            target_network_update_freq=max(1, 4 * cfg.train_batch_size),
            num_steps_sampled_before_learning_starts=cfg.train_batch_size,
        )
    config = config.training(
        entropy_coeff=cfg.entropy_coeff,
        learner_class=learner_class,
        learner_config_dict={REF_KL_COEFF: cfg.ref_kl_coeff},
    )
    if cfg.algorithm == "ppo":
        # synchronous PPO needs train batch = runners x envs x fragment: RLlib derives the fragment ("auto"),
        # so the defaults (2 x 32 envs) work with any train batch size
        config = config.training(minibatch_size=min(128, cfg.train_batch_size), num_epochs=2).env_runners(
            rollout_fragment_length="auto"
        )
    else:
        # the catalogue-wide behaviour-distribution inputs stay in the runners (APPO reads the log-probability)
        config = config.env_runners(module_to_env_connector=lambda *_args: DropActionDistInputs())
        if not cfg.train_encoder:
            # env runners encode each chunk's final observation, so the learner never runs the encoder;
            # UCB: the learner keeps the statistics of every runner's actions (synced to them, checkpointed)
            def learner_pieces(*_spaces) -> list:
                pieces = [FillBootstrapUserState()]
                if cfg.exploration.strategy == "ucb":
                    pieces.append(RecordUCBStatistics(num_learners=cfg.num_learners))
                return pieces

            config = config.callbacks(on_sample_end=[count_replay_hits, ship_final_user_states]).training(
                learner_connector=learner_pieces
            )
        # APPO samples asynchronously: an iteration lasts until at least one train batch was learned on
        # (otherwise `train()` returns at once while the runners are still producing their first episodes).
        config = (
            config.reporting(
                min_sample_timesteps_per_iteration=cfg.train_batch_size,
                min_train_timesteps_per_iteration=cfg.train_batch_size,
            )
            .training(
                # RLlib's default (0 s) makes the driver poll its env runners in a busy loop: thousands of
                # training steps per iteration that take a whole core from the runners on a small machine.
                # Blocking up to this long for sample results frees it (measured: runners scale again).
                timeout_s_sampler_manager=SAMPLER_WAIT_S,
                use_circular_buffer=False,
            )
            .env_runners(max_requests_in_flight_per_env_runner=2)
        )
    return config


def _get(d: dict[str, Any], *path: str, default: float = float("nan")) -> float:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return default
        d = d[p]
    try:
        return float(d)
    except (TypeError, ValueError):
        return default


def summarize(
    result: dict[str, Any], seconds: float, *, exposure: bool = False, cooccurrence: bool = False
) -> dict[str, float]:
    """The per-iteration figures we log, from an RLlib result dict; ``exposure``: the env prices exposure (the
    share of recommendations already on display and the learned exposure weight β, else NaN); ``cooccurrence``:
    the policy has the co-occurrence term (its learned weight γ, else NaN)."""
    from ray.rllib.utils.metrics import (
        ENV_RUNNER_RESULTS,
        EPISODE_LEN_MEAN,
        EPISODE_RETURN_MEAN,
        LEARNER_RESULTS,
        NUM_ENV_STEPS_SAMPLED,
        NUM_ENV_STEPS_SAMPLED_LIFETIME,
    )

    from rec_rllib.rl.learners import COOCCURRENCE_WEIGHT_METRIC, EXPOSURE_WEIGHT_METRIC

    steps = _get(result, ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED)
    ret = _get(result, ENV_RUNNER_RESULTS, EPISODE_RETURN_MEAN)
    ep_len = _get(result, ENV_RUNNER_RESULTS, EPISODE_LEN_MEAN)
    replay_steps = _get(result, ENV_RUNNER_RESULTS, REPLAY_STEPS)
    learner = result.get(LEARNER_RESULTS, {}).get("default_policy", {})
    updates = _get(learner, "num_module_steps_trained", default=0.0)  # samples the learner trained on
    return {
        "iteration": float(result.get("training_iteration", 0)),
        "episode_return_mean": ret,
        "episode_len_mean": ep_len,
        # the share of this iteration's steps that recommended one of the next logged items
        "hit_rate": _get(result, ENV_RUNNER_RESULTS, REPLAY_HITS) / replay_steps
        if replay_steps > 0
        else float("nan"),
        "replay_steps": replay_steps,
        "env_steps": steps,
        "env_steps_lifetime": _get(result, ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME),
        "env_steps_per_s": steps / seconds if seconds > 0 else float("nan"),
        "learner_updates": updates,
        "learner_samples_per_s": updates / seconds if seconds > 0 else float("nan"),
        "policy_loss": _get(learner, "policy_loss"),
        "entropy": _get(learner, "entropy"),
        "reference_kl": _get(learner, "reference_kl"),
        "q_loss": _get(learner, "qf_loss"),
        "next_item_ce": _get(learner, "next_item_ce"),
        # the share of this iteration's recommendations whose item its runner had on display already
        "on_display_share": _get(result, ENV_RUNNER_RESULTS, REPLAY_ON_DISPLAY) / replay_steps
        if exposure and replay_steps > 0
        else float("nan"),
        # β after the iteration's last update (NaN in an iteration without one)
        "exposure_weight": _get(learner, EXPOSURE_WEIGHT_METRIC) if exposure else float("nan"),
        # γ of the co-occurrence term, likewise
        "cooccurrence_weight": _get(learner, COOCCURRENCE_WEIGHT_METRIC) if cooccurrence else float("nan"),
        "seconds": seconds,
    }


def read_history(run_dir: Path, iterations: int) -> list[dict[str, float]]:
    """The first ``iterations`` rows of a run's ``train_metrics.csv`` (none if it has none)."""
    path = run_dir / "train_metrics.csv"
    if not path.exists():
        return []
    with open(path) as f:
        rows = list(csv.DictReader(f))[:iterations]
    # a column an older version did not write is empty in its rows
    return [{k: float(v) if v else float("nan") for k, v in row.items()} for row in rows]


def write_history(run_dir: Path, history: list[dict[str, float]]) -> None:
    # every column any row has (write_csv's default): a run resumed from an older version's metrics gains
    # the new ones
    write_csv(run_dir / "train_metrics.csv", history)


def smoothed(values: list[float], span: int) -> list[float]:
    """Exponential moving average over ``span`` points (NaNs skipped, not spread)."""
    alpha, out, level = 2.0 / (span + 1), [], math.nan
    for v in values:
        if not math.isnan(v):
            level = v if math.isnan(level) else level + alpha * (v - level)
        out.append(level)
    return out


def plot_history(run_dir: Path, history: list[dict[str, float]], title: str) -> None:
    """``training_curves.png``: one panel per metric in a grid of three columns; each iteration's value
    (faint) and its moving average; the dashed line is where training started (the fine-tuned policy under the
    run's exploration: its first iteration; 0 for the learned weights, which the fine-tuned policy lacks)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it = [h["iteration"] for h in history]
    panels = [("episode_return_mean", "mean episode return"), ("hit_rate", "hit rate")]
    if any(not math.isnan(h.get("exposure_weight", math.nan)) for h in history):  # the env priced exposure
        panels += [
            ("on_display_share", "share recommended while on display"),
            ("exposure_weight", "exposure weight β"),
        ]
    if any(not math.isnan(h.get("cooccurrence_weight", math.nan)) for h in history):
        panels.append(("cooccurrence_weight", "co-occurrence weight γ"))
    panels.append(("env_steps_per_s", "env steps / s"))
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    span = max(3, len(history) // 15)
    for ax, (key, label) in zip(axes.flat, panels, strict=False):
        # .get: the rows of a run resumed from an older version lack the newer columns
        values = [h.get(key, math.nan) for h in history]
        ax.plot(it, values, color="tab:blue", alpha=0.3, lw=0.8)
        ax.plot(it, smoothed(values, span), color="tab:blue", lw=1.8, label=f"moving average ({span})")
        if key in ("exposure_weight", "cooccurrence_weight"):
            start = 0.0
        else:
            start = next((v for v in values if not math.isnan(v)), math.nan)
        if key != "env_steps_per_s" and not math.isnan(start):
            ax.axhline(start, color="grey", ls="--", lw=1, label="fine-tuned policy (start)")
        ax.set_xlabel("iteration")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8, loc="best")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(run_dir / "training_curves.png", dpi=110)
    plt.close(fig)


def parse_candidate_items(text: str) -> int | str:
    """A command line's ``candidate_items``: ``auto`` or a whole number (an ``ArgumentTypeError`` else)."""
    import argparse

    if text == CANDIDATES_AUTO:
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {CANDIDATES_AUTO!r} or a number, got {text!r}") from None


def parse_cooccurrence_gamma(text: str) -> float | str:
    """A command line's ``cooccurrence_gamma``: a number or ``validation`` (an ``ArgumentTypeError`` else)."""
    import argparse

    if text == GAMMA_FROM_VALIDATION:
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number >= 0 or {GAMMA_FROM_VALIDATION!r}, got {text!r}"
        ) from None


def choose_cooccurrence_gamma(cfg: RLTrainConfig, run: Path, progress=print) -> float:
    """``cooccurrence_gamma: validation``: the γ of :data:`~rec_rllib.rl.policy.COOCCURRENCE_GAMMA_GRID` under
    which the fine-tuned model's scores plus γ times the co-occurrence feature rank the validation users best
    (NDCG@10); every γ's figure goes to ``<run>/cooccurrence_gamma.json``."""
    from rec_rllib.data.dataset import LogDataset
    from rec_rllib.models import load_recommender
    from rec_rllib.rl.policy import select_cooccurrence_gamma

    t0 = time.perf_counter()
    dataset = LogDataset.load(cfg.env.dataset)
    best, figures = select_cooccurrence_gamma(
        load_recommender(cfg.finetuned, dataset),
        dataset,
        window=cfg.env.cooccurrence_window,
        scheme=cfg.env.scheme,
    )
    shown = "  ".join(f"{g:g}: {v:.4f}" for g, v in figures.items())
    progress(f"co-occurrence weight γ {best:g}, chosen on the validation users (NDCG@10 {shown}; "
             f"{time.perf_counter() - t0:.0f} s)")  # fmt: skip
    (run / "cooccurrence_gamma.json").write_text(json.dumps({
        "gamma": best, "metric": "NDCG@10", "split": "valid", "window": cfg.env.cooccurrence_window,
        "figures": {f"{g:g}": v for g, v in figures.items()},
    }, indent=2) + "\n")  # fmt: skip
    return best


def train(
    cfg: RLTrainConfig, run_dir: str | Path, *, resume: str | Path | None = None, progress=print
) -> dict[str, Any]:
    """Build the algorithm, train ``cfg.iterations`` iterations, checkpoint, and write metrics and curves.

    Ray must already be initialised (the job starts it). Returns a summary with the checkpoint path.
    """
    from rec_rllib.rl.module import model_config_from_run
    from rec_rllib.rl.policy import check_resumable

    resume = check_resumable(resume) if resume else None  # before anything is written
    run = Path(run_dir).resolve()
    run.mkdir(parents=True, exist_ok=True)
    model_config = model_config_from_run(cfg.finetuned)
    max_len = int(model_config["textseqrec"]["config"]["max_len"])
    if cfg.env.window > max_len:
        log.info("env window %d > the model's max_len %d: using %d", cfg.env.window, max_len, max_len)
        cfg.env.window = max_len
    if cfg.cooccurrence_gamma == GAMMA_FROM_VALIDATION:
        cfg.cooccurrence_gamma = choose_cooccurrence_gamma(cfg, run, progress)
    (run / "rl_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    algo_config = build_algo_config(cfg, model_config)
    algo = algo_config.build_algo()
    history: list[dict[str, float]] = []
    start_iter = 0
    if resume:
        algo.restore_from_path(str(resume))
        start_iter = int(algo.iteration)
        progress(f"resumed from {resume} at iteration {start_iter}")
        history = read_history(run, start_iter)
    checkpoint = None
    exposure, cooccurrence = cfg.env.exposure_cost > 0, cfg.env.cooccurrence
    try:
        for i in range(start_iter, cfg.iterations):
            t0 = time.perf_counter()
            result = algo.train()
            row = summarize(result, time.perf_counter() - t0, exposure=exposure, cooccurrence=cooccurrence)
            for key in ("exposure_weight", "cooccurrence_weight"):  # no update this iteration: unchanged
                if math.isnan(row[key]) and history:
                    row[key] = history[-1].get(key, math.nan)  # (NaN without the term)
            history.append(row)
            shown = (
                f"on-display {row['on_display_share']:.2f}  β {row['exposure_weight']:.3f}  "
                if exposure
                else ""
            ) + (f"γ {row['cooccurrence_weight']:.3f}  " if cooccurrence else "")
            progress(
                f"iter {i + 1:3d}/{cfg.iterations}  return {row['episode_return_mean']:.3f}  "
                f"hit-rate {row['hit_rate']:.3f}  {shown}{row['env_steps_per_s']:.0f} env-steps/s  "
                f"{row['learner_samples_per_s']:.0f} learned/s  "
                f"ref-KL {row['reference_kl']:.4f}  {row['seconds']:.1f}s"
            )
            write_history(run, history)
            if (i + 1) % cfg.checkpoint_every == 0 or i + 1 == cfg.iterations:
                checkpoint = str(run / "checkpoint")
                algo.save_to_path(checkpoint)
        plot_history(run, history, f"{cfg.algorithm.upper()} on {Path(cfg.env.dataset).name}")
    finally:
        algo.stop()
    summary = {"checkpoint": checkpoint, "iterations": len(history), "history": history}
    (run / "rl_summary.json").write_text(
        json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2)
    )
    return summary
