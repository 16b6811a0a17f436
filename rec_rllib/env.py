"""LogReplayEnv: a gymnasium environment that replays users' logged, time-ordered histories.

One episode is a stretch of one user's train-split history. The observation is the user's recent items
(as sequence-model tokens) and the items already consumed (a list of item indices, the last ``mask_items`` of
them: the RLModule masks them, :mod:`rec_rllib.rl.obs`); the action is one item of the catalogue; the logged
next item then advances the history, whatever the policy recommended — the log is replayed, not rewritten.

Rewards (``reward=`` in the config):

* ``hit`` — ``rating / max_rating`` when the recommended item is among the user's next ``horizon`` logged
  items, else 0 (implicit data without ratings: 1 per hit).
* ``simulator`` — the probability that a user-response model fitted on the train split gives the
  recommended item: :class:`~rec_rllib.simulator.ItemKNNSimulator` (item-item cosine co-occurrence over train
  histories, scored against the user's recent window). It rates items the log never showed. Its fit is
  validated by its HR@10 on the leave-one-out validation users (see
  :meth:`~rec_rllib.simulator.ItemKNNSimulator.validate`).

``novelty_bonus`` (λ ≥ 0) adds ``λ · novelty(item)`` to the reward of every recommendation, hit or not,
novelty being the item's self-information ``-log2 p(item)`` under the train popularity of the runner's own
shard (add-one smoothed), divided by its maximum (so in (0, 1]). It is the accuracy-coverage knob of RL
training (λ = 0: relevance alone): relevance keeps the policy on items the user will consume, the bonus
moves probability from the head of the popularity curve to its tail. (Scaling only the *hit* rewards by
novelty was tried first: hits on tail items are too rare to move the policy, coverage fell.)

``exposure_cost`` (λ ≥ 0) prices *aggregate* exposure, the population-level side of catalogue coverage that a
per-item bonus cannot express (an item counts for coverage once it is shown to anybody). The sub-environments
of one process (one env runner: its vectorised envs, all its users) share a tracker of the last
``exposure_window`` recommendations; the observation lists the items recommended within it with ``log(1 +
times each was)`` (``Obs.EXPOSED_ITEMS``, ``Obs.EXPOSURE``: the ``feature_items`` most recommended; an item
left off counts 0, for the policy and the price alike), and a recommendation costs ``λ · log(1 + its count) /
log(1 + exposure_window)`` (in [0, λ]: λ = 1 prices an item recommended in every step of the window like a
lost full hit). With ``exposure_shape="indicator"`` a recommendation costs λ if its item was recommended at
all within the window, else nothing (:func:`~rec_rllib.exposure.exposure_feature`). The policy can then learn
to lower what is on display everywhere in favour of what this user ranks almost as high (the module's exposure
weight on the same feature, :class:`~rec_rllib.rl.module.RecPolicyModule`); evaluation and serving keep the
same tracker over their answers (:class:`~rec_rllib.exposure.ExposureConfig` ``penalty`` and ``shape``). Each
step's info says ``on_display``: whether the recommended item was already recommended within the window
(training reports the share per iteration).

``cooccurrence`` adds ``Obs.COOCCURRING_ITEMS`` and ``Obs.COOCCURRENCE`` to the observation: the
:class:`~rec_rllib.simulator.ItemKNNSimulator`'s probability of the items given the last
``cooccurrence_window`` items (5 by default: on MovieLens-100K the simulator ranks the next item far better
from the last 5 items than from the last 50; the ``feature_items`` most probable items,
:meth:`~rec_rllib.simulator.ItemKNNSimulator.feature`), fitted on every train user but computed
*leave-user-out* (the replayed user's own row taken out, so the feature never knows the items the user
consumes next). The policy learns a weight on it (:class:`~rec_rllib.rl.module.CooccurrenceTerm`); evaluation
and serving compute it for the history they are given (:func:`rec_rllib.rl.policy.cooccurrence_feature`). The
reward is unchanged.

Both features travel as fixed-length lists of (item, value), never as vectors over the catalogue: a step is
the same size at 1,682 items as at 100,000 (the module spreads the lists over the catalogue where it forms
logits, :mod:`rec_rllib.rl.obs`). Listing what is on display costs what is on display
(:meth:`~rec_rllib.exposure.ExposureTracker.on_display`); a sparse simulator fit reads only the window items'
co-occurrence rows.

Sharding: env runner ``i`` of ``n`` (``worker_index``/``num_workers`` of RLlib's ``EnvContext``; the local
runner, index 0, samples only when there are no remote runners) owns the users with
``user_idx % n == i - 1`` and reads only their rows from Parquet (:mod:`rec_rllib.replay`). The union of the
shards is every train user, and shards are disjoint.

This module never imports torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from rec_rllib.columns import Obs, SplitScheme, Tokens
from rec_rllib.config import NO_FLAG, DictConfig, setting
from rec_rllib.exposure import (
    EXPOSURE_SHAPES,
    ExposureConfig,
    ExposureTracker,
    check_exposure_shape,
    exposure_feature,
)
from rec_rllib.replay import shard_of, shared_shard
from rec_rllib.simulator import ItemKNNSimulator, shared_simulator

REWARDS = ("hit", "simulator")


@dataclass
class EnvConfig(DictConfig):
    """Settings of :class:`LogReplayEnv`."""

    config_label = "env config"

    dataset: str = setting("data/ml-100k", flag=NO_FLAG)
    """Prepared dataset directory (``jobs.prepare``)."""
    scheme: str = setting(SplitScheme.LEAVE_ONE_OUT, choices=tuple(SplitScheme.COLUMNS))
    """Split whose train part is replayed."""
    window: int = 50
    """Most recent items in the observation."""
    horizon: int = 5
    """``hit``: a recommendation counts when it is among the next ``horizon`` logged items."""
    episode_len: int = 20
    """Most steps per episode."""
    reward: str = setting("hit", choices=REWARDS)
    """``hit`` or ``simulator``."""
    novelty_bonus: float = 0.0
    """λ: every recommendation earns ``λ · novelty(item)`` on top of its relevance reward (0 = off)."""
    exposure_cost: float = 0.0
    """λ: a recommendation costs ``λ · log(1 + times recommended in the process's window) / log(1 + window)``;
    > 0 adds the exposure counts to the observation (0 = off)."""
    exposure_window: int = 10_000
    """Recommendations the exposure tracker remembers (all sub-environments of the process together)."""
    exposure_shape: str = setting("log", choices=EXPOSURE_SHAPES)
    """What the cost counts of an item: ``log`` (log(1 + count), normalised) or ``indicator`` (shown at
    all)."""
    cooccurrence: bool = False
    """The observation carries the item-kNN simulator's click probability of every item for the last
    ``cooccurrence_window`` items, leave-user-out (``Obs.COOCCURRENCE``): the feature the policy's
    co-occurrence weight reads."""
    mask_items: int = 1024
    """Consumed items the observation lists, the most recent ones (the policy never recommends them): a user
    who consumed more may be recommended the oldest again. Every MovieLens-100K user fits (at most 737 train
    items, either split)."""
    feature_items: int = 2048
    """Most items the exposure and co-occurrence features list per step, the largest values (items left out
    count as 0): the observation's size stays the same whatever the catalogue; every item of MovieLens-100K's
    1,682 fits."""
    cooccurrence_window: int = 5
    """Most recent items the co-occurrence feature averages over (the next item follows the last few items
    more closely than the whole window: on its own the feature ranks best from about 5)."""
    num_shards: int = setting(0, flag=NO_FLAG)
    """Shards of the user population (0 = from the env context: the number of env runners)."""
    shard_id: int = setting(-1, flag=NO_FLAG)
    """This env's shard (-1 = from the env context: ``worker_index - 1``)."""
    seed: int = setting(0, flag=NO_FLAG)
    """Base seed; each runner and sub-environment derives its own."""

    def __post_init__(self) -> None:
        if self.reward not in REWARDS:
            raise ValueError(f"unknown reward {self.reward!r}; expected one of {REWARDS}")
        if self.novelty_bonus < 0:
            raise ValueError(f"novelty_bonus must be >= 0, got {self.novelty_bonus}")
        if not self.exposure_cost >= 0:
            raise ValueError(f"exposure_cost must be >= 0, got {self.exposure_cost}")
        check_exposure_shape(self.exposure_shape, "exposure_shape")
        for name in (
            "window",
            "horizon",
            "episode_len",
            "exposure_window",
            "cooccurrence_window",
            "mask_items",
            "feature_items",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


_SHARED_EXPOSURE: dict[tuple, ExposureTracker] = {}


def shared_exposure_tracker(key: tuple, n_items: int, window: int) -> ExposureTracker:
    """The exposure tracker shared by every env of this process with the same ``key`` (one env runner's
    population of users); created empty on first use."""
    full = (*key, int(n_items), int(window))
    if full not in _SHARED_EXPOSURE:
        _SHARED_EXPOSURE[full] = ExposureTracker(n_items, ExposureConfig(slots=0, window=int(window)))
    return _SHARED_EXPOSURE[full]


class LogReplayEnv(gym.Env):
    """Replays one user's logged history per episode (see the module docstring)."""

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, config: dict[str, Any] | None = None):
        # RLlib passes an EnvContext: a dict that also carries the runner's worker/vector indices
        worker_index = int(getattr(config, "worker_index", 0))
        num_workers = int(getattr(config, "num_workers", 0))
        vector_index = int(getattr(config, "vector_index", 0))
        self.cfg = EnvConfig.from_dict(dict(config or {}))
        shard_id, num_shards = shard_of(worker_index, num_workers)
        if self.cfg.num_shards:
            num_shards = self.cfg.num_shards
        if self.cfg.shard_id >= 0:
            shard_id = self.cfg.shard_id
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id {shard_id} outside [0, {num_shards})")
        self.shard_id, self.num_shards = shard_id, num_shards

        manifest = json.loads((Path(self.cfg.dataset) / "manifest.json").read_text())
        self.n_items = int(manifest["counts"]["items"])
        shard = shared_shard(self.cfg.dataset, self.cfg.scheme, shard_id, num_shards, manifest)
        self.histories, self.shard_users = shard.histories, shard.users
        self.max_rating, self.novelty = shard.max_rating, shard.novelty
        self.simulator: ItemKNNSimulator | None = None
        if self.cfg.reward == "simulator" or self.cfg.cooccurrence:
            self.simulator = shared_simulator(self.cfg.dataset, self.cfg.scheme)

        self.exposure: ExposureTracker | None = None
        if self.cfg.exposure_cost > 0:
            # one population per env runner: its sub-environments (and nothing else) share the counts
            key = (self.cfg.dataset, self.cfg.scheme, worker_index, shard_id, num_shards, self.cfg.seed)
            self.exposure = shared_exposure_tracker(key, self.n_items, self.cfg.exposure_window)
        self._exposure_seen = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32))
        self._exposure_unit = float(
            exposure_feature(np.log1p(self.cfg.exposure_window), self.cfg.exposure_shape)
        )
        w = self.cfg.window
        spaces = {
            Obs.HISTORY: gym.spaces.Box(0, self.n_items + Tokens.OFFSET - 1, (w + 1,), np.int64),
            Obs.LENGTH: gym.spaces.Box(1, w + 1, (1,), np.int64),
            Obs.CONSUMED: gym.spaces.Box(0, self.n_items, (self.cfg.mask_items,), np.int32),
        }
        f = self.feature_size = min(self.n_items, self.cfg.feature_items)
        if self.exposure is not None:
            top = float(np.log1p(self.cfg.exposure_window))
            spaces[Obs.EXPOSED_ITEMS] = gym.spaces.Box(0, self.n_items, (f,), np.int32)
            spaces[Obs.EXPOSURE] = gym.spaces.Box(0.0, top, (f,), np.float32)
        if self.cfg.cooccurrence:
            spaces[Obs.COOCCURRING_ITEMS] = gym.spaces.Box(0, self.n_items, (f,), np.int32)
            spaces[Obs.COOCCURRENCE] = gym.spaces.Box(0.0, 1.0, (f,), np.float32)
        self.observation_space = gym.spaces.Dict(spaces)
        self.action_space = gym.spaces.Discrete(self.n_items)
        self._seed = self.cfg.seed * 1_000_003 + worker_index * 1_009 + vector_index
        self.np_random, _ = gym.utils.seeding.np_random(self._seed)
        self.users_seen: set[int] = set()
        self._user = -1
        self._items = np.zeros(0, dtype=np.int64)
        self._ratings = np.zeros(0)
        self._pos = 0
        self._steps = 0

    # -- gym API ------------------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._user = int(self.np_random.choice(self.shard_users))
        self.users_seen.add(self._user)
        self._items, self._ratings = self.histories[self._user]
        n = len(self._items)
        self._pos = int(self.np_random.integers(0, max(1, n - 1)))
        self._steps = 0
        if self.cfg.cooccurrence and isinstance(self.simulator.co, np.ndarray):
            # a dense fit (small catalogue): the similarity rows of the items this episode's windows can hold,
            # leave-user-out, once per episode (the history before the start and the steps the episode may
            # take; not the whole history). A sparse fit reads the window's rows at each step.
            self._co_start = max(0, self._pos - self.cfg.cooccurrence_window)
            stretch = self._items[self._co_start : self._pos + self.cfg.episode_len]
            self._cooccurrence_rows = self.simulator.rows(stretch, without=self._items)
        return self._obs(), {"user": self._user}

    def step(self, action):
        a = int(action)
        upcoming = self._items[self._pos : self._pos + self.cfg.horizon]
        hit = bool(np.any(upcoming == a))
        if self.cfg.reward == "simulator":
            p = float(
                self.simulator.probabilities(self._items[max(0, self._pos - self.cfg.window) : self._pos])[a]
            )
            reward = float(self.np_random.random() < p)
        elif hit:
            reward = float(self._ratings[self._pos + int(np.argmax(upcoming == a))] / self.max_rating)
        else:
            reward = 0.0
        if self.cfg.novelty_bonus:
            reward += self.cfg.novelty_bonus * float(self.novelty[a])
        info = {"user": self._user, "hit": hit}
        if self.exposure is not None:
            # priced on the counts the policy observed (other envs of the runner may have acted since; an item
            # the observation left out counts 0, as the policy saw it)
            items, log_counts = self._exposure_seen
            seen = log_counts[items == a]
            log_count = float(seen[0]) if len(seen) else 0.0
            reward -= self.cfg.exposure_cost * self.exposure_price(log_count)
            self.exposure.record(np.array([a]))
            info["on_display"] = log_count > 0  # recommended within the window already
        # the logged item advances the history (and is consumed)
        self._pos += 1
        self._steps += 1
        terminated = self._pos >= len(self._items)
        truncated = not terminated and self._steps >= self.cfg.episode_len
        return self._obs(), reward, terminated, truncated, info

    def exposure_price(self, log_count: float) -> float:
        """The exposure cost of one recommendation per unit of λ, in [0, 1], from its item's observed
        ``log(1 + count)``: the shape's feature over its largest value (an item recommended in every step of
        the window)."""
        return float(exposure_feature(np.float64(log_count), self.cfg.exposure_shape)) / self._exposure_unit

    def _obs(self) -> dict[str, np.ndarray]:
        w = self.cfg.window
        recent = self._items[max(0, self._pos - w) : self._pos]
        history = np.zeros(w + 1, dtype=np.int64)
        history[0] = Tokens.BOS
        history[1 : len(recent) + 1] = recent + Tokens.OFFSET
        m = self.cfg.mask_items
        consumed = np.full(m, self.n_items, dtype=np.int32)  # padding: one past the catalogue
        done = self._items[max(0, self._pos - m) : self._pos]
        # never leave the policy without a legal action (a user who consumed the whole catalogue)
        if not (self._pos >= self.n_items and len(np.unique(self._items[: self._pos])) >= self.n_items):
            consumed[: len(done)] = done
        obs = {
            Obs.HISTORY: history,
            Obs.LENGTH: np.array([len(recent) + 1], dtype=np.int64),
            Obs.CONSUMED: consumed,
        }
        f = self.feature_size
        if self.exposure is not None:
            items, counts = self.exposure.on_display(top=f)
            self._exposure_seen = (items, np.log1p(counts).astype(np.float32))
            obs[Obs.EXPOSED_ITEMS], obs[Obs.EXPOSURE] = self._padded(*self._exposure_seen)
        if self.cfg.cooccurrence:
            # leave-user-out: the replayed user's own (future) items do not inform the feature
            start = max(0, self._pos - self.cfg.cooccurrence_window)
            if isinstance(self.simulator.co, np.ndarray):  # the episode's rows, computed at its reset
                rows = self._cooccurrence_rows[start - self._co_start : self._pos - self._co_start]
                pairs = self.simulator.feature_from_rows(rows, f)
            else:
                pairs = self.simulator.feature(self._items[start : self._pos], without=self._items, top=f)
            obs[Obs.COOCCURRING_ITEMS], obs[Obs.COOCCURRENCE] = self._padded(*pairs)
        return obs

    def _padded(self, items: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A sparse feature as the observation carries it: ``feature_size`` item indices (padding:
        ``n_items``, one past the catalogue) and their values (padding: 0)."""
        ids = np.full(self.feature_size, self.n_items, dtype=np.int32)
        vals = np.zeros(self.feature_size, dtype=np.float32)
        ids[: len(items)] = items
        vals[: len(items)] = values
        return ids, vals

    def describe(self) -> dict[str, Any]:
        return {
            "shard_id": self.shard_id,
            "num_shards": self.num_shards,
            "users": len(self.shard_users),
            **asdict(self.cfg),
        }
