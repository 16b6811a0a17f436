"""Settings of an RL training run (:class:`RLTrainConfig`: the algorithm, the env, exploration, resources)
and the command line's parsers of its two settings that take a word or a number."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from rec_rllib.config import DictConfig, resource_pair, setting
from rec_rllib.env import EnvConfig
from rec_rllib.explore import ExplorationConfig
from rec_rllib.retrieval import DEFAULT_PROBE, SEARCHES
from rec_rllib.rl.obs import CANDIDATES_AUTO

ALGORITHMS = ("appo", "ppo", "dqn")
GAMMA_FROM_VALIDATION = "validation"
"""``cooccurrence_gamma``'s value for a γ chosen on the validation users
(:func:`~rec_rllib.rl.train.choose_cooccurrence_gamma`)."""


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


@dataclass
class RLTrainConfig(DictConfig):
    """Settings of an RL training run (defaults: a 2-core laptop)."""

    config_label = "RL config"

    algorithm: str = setting("appo", choices=ALGORITHMS)
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
    env_runner_resources: dict[str, float] = setting(
        default_factory=dict, flag="env-runner-resource", parse=resource_pair, metavar="NAME=AMOUNT"
    )
    """Custom resources each env runner needs, e.g. {"env_runner": 1} to place runners on tagged nodes."""
    rollout_fragment_length: int = 20
    """Env steps per sub-environment per sample call (APPO, DQN; PPO derives it from the train batch)."""
    train_batch_size: int = 640
    """Env steps per learner update (per learner)."""
    num_learners: int = 0
    """Remote learners (0 = learn in the driver process)."""
    num_gpus_per_learner: float = 0.0
    """GPUs per learner (fractions allowed); 0 = CPU."""
    learner_resources: dict[str, float] = setting(
        default_factory=dict, flag="learner-resource", parse=resource_pair, metavar="NAME=AMOUNT"
    )
    """Custom resources each learner needs, e.g. {"learner": 1}."""
    train_encoder: bool = False
    """False: train a policy head (a linear map on the user state, a weight on item popularity) and the item
    bias on the frozen fine-tuned encoder: env runners ship the user state, so the learner never runs the
    encoder. True: train every weight end to end (the learner runs the encoder for the online, target and
    reference networks)."""
    train_state_head: bool = True
    """Policy head only: train its linear map on the user state. False keeps the map at its fine-tuned
    identity and trains the item bias, the popularity weight and (with an exposure cost) the exposure weight:
    each user's relevance ranking stays the fine-tuned model's (with an exposure cost, a trained map scatters
    from seed to seed; docs/rl.md)."""
    train_item_terms: bool = True
    """Policy head only: train the item bias and the popularity weight. False keeps them at the fine-tuned
    values: with ``train_state_head=False`` and an exposure cost, RL trains the exposure weight β alone: the
    policy is the fine-tuned scores minus the price RL learned for what is on display, a point of the
    fine-tuned model's own accuracy-coverage frontier. With a small exposure cost β settles where the reward
    balances; with a large one it keeps climbing (by up to about 0.01 an update) and the iteration budget
    sets where it stops."""
    cooccurrence_gamma: float | str | None = setting(None, parse=parse_cooccurrence_gamma)
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
    candidate_items: int | str = setting(CANDIDATES_AUTO, parse=parse_candidate_items)
    """APPO and PPO: the policy ranks, in each state, its K best items by the scores before the exposure
    term, and acts and learns over those (the learner's cost per sample then follows K, not the catalogue).
    ``auto``: the whole catalogue up to 4,096 items (MovieLens-100K's 1,682: exactly the catalogue-wide
    policy), 512 candidates above; a number K: K candidates whenever the catalogue has more items; 0: the
    whole catalogue at any size. DQN always scores the whole catalogue (its target takes the maximum over the
    next state's items)."""
    candidate_search: str = setting("auto", choices=SEARCHES)
    """How acting chooses a policy's candidates: ``exact`` scores every item; ``ivf`` searches an
    inverted-file index of the item vectors (faiss; a state's best items by the network's scores, found by
    reading ``candidate_probe`` clusters of about 4·√n, each found item scored exactly, co-occurrence term
    included) at a cost that follows the clusters read, not the catalogue; an item whose cluster it does not
    read cannot be a candidate in that state. ``auto``: ``ivf`` from 50,000 items on. The learner and
    evaluation are unchanged (the learner reads the candidates acting chose)."""
    candidate_probe: int = DEFAULT_PROBE
    """With ``candidate_search`` ``ivf``: clusters each search reads (more: closer to exact, slower)."""
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
            at_least={
                "iterations": 1,
                "num_env_runners": 0,
                "num_envs_per_env_runner": 1,
                "num_cpus_per_env_runner": 0,
                "rollout_fragment_length": 1,
                "train_batch_size": 1,
                "num_learners": 0,
                "num_gpus_per_learner": 0,
                "entropy_coeff": 0,
                "ref_kl_coeff": 0,
                "checkpoint_every": 1,
                "candidate_probe": 1,
            },
            above={"lr": 0} if self.lr is not None else {},
        )
        k = self.candidate_items
        if k != CANDIDATES_AUTO and (
            isinstance(k, bool) or not isinstance(k, int) or not (k == 0 or k >= 10)
        ):
            raise ValueError(
                f"candidate_items must be {CANDIDATES_AUTO!r}, 0 (the whole catalogue) or a number of at "
                f"least 10, got {k!r}"
            )
        if self.candidate_search not in SEARCHES:
            raise ValueError(f"candidate_search must be one of {SEARCHES}, got {self.candidate_search!r}")
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma!r}")
        for name in ("env_runner_resources", "learner_resources"):
            for key, amount in getattr(self, name).items():
                if not key or not amount > 0:
                    raise ValueError(
                        f"{name}: {key!r}={amount!r}; each resource needs a name and an amount > 0"
                    )
        if isinstance(self.exploration, dict):
            self.exploration = ExplorationConfig.from_dict(self.exploration)
        if isinstance(self.env, dict):
            self.env = EnvConfig.from_dict(self.env)
        if self.next_item_ce_coeff < 0:
            raise ValueError(f"next_item_ce_coeff must be >= 0 (0 = off), got {self.next_item_ce_coeff}")
        if self.algorithm == "dqn" and self.exploration.strategy != "epsilon":
            raise ValueError(
                "dqn explores epsilon-greedily (with exploration.decay_steps); set exploration "
                f"strategy 'epsilon', not {self.exploration.strategy!r}"
            )
        if self.algorithm == "ppo" and self.exploration.strategy in ("epsilon", "ucb"):
            raise ValueError(
                f"ppo optimises the distribution that acted and {self.exploration.strategy}'s has no "
                "gradient "
                "(measured for epsilon: it collapses onto popular items); use boltzmann or thompson with "
                "ppo, "
                "or epsilon/ucb with appo"
            )
        if self.train_encoder and not self.train_state_head:
            raise ValueError(
                "train_state_head=False freezes the policy head's map; end to end (train_encoder) "
                "has no policy head: drop one of the two"
            )
        if self.train_encoder and not self.train_item_terms:
            raise ValueError(
                "train_item_terms=False freezes the policy head's item terms; end to end "
                "(train_encoder) trains every weight: drop one of the two"
            )
        # (end to end implies both head flags, checked above)
        if not (
            self.train_state_head
            or self.train_item_terms
            or self.env.exposure_cost > 0
            or (self.env.cooccurrence and self.cooccurrence_gamma is None)
        ):
            raise ValueError(
                "train_state_head=False and train_item_terms=False leave RL nothing to train without an "
                "exposure cost or a learned co-occurrence weight: set env.exposure_cost > 0, or "
                "env.cooccurrence without cooccurrence_gamma"
            )
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
