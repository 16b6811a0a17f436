"""Evaluating a policy on a fixed set of replayed episodes (paired comparisons between policies).

Training returns are noisy (different users, different starting points, exploration). To compare two
policies honestly, both are run on the *same* episodes: episode ``i`` resets the environment with seed
``seed + i``, which fixes its user and starting point, and the policy acts greedily (or as given).
The per-episode returns come back as an array so callers can test a paired difference.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from rec_rllib.env import LogReplayEnv
from rec_rllib.rl.obs import legal_actions

PolicyFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]
"""Batched observations (as tensors) -> one action per row."""


def greedy_policy(module) -> PolicyFn:
    """Argmax of a :class:`~rec_rllib.rl.module.RecPolicyModule`'s (masked) inference logits."""
    from ray.rllib.core.columns import Columns

    def act(obs: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            out = module.forward_inference({Columns.OBS: obs})
        if Columns.ACTIONS_FOR_ENV in out:  # a policy over candidates: the item its arg-max stands for
            return out[Columns.ACTIONS_FOR_ENV]
        return out[Columns.ACTION_DIST_INPUTS].argmax(-1)

    return act


def sampling_policy(module, seed: int = 0) -> PolicyFn:
    """Samples from the module's behaviour (exploration) distribution, with a seeded generator."""
    from ray.rllib.core.columns import Columns

    gen = torch.Generator().manual_seed(seed)

    def act(obs: dict[str, torch.Tensor]) -> torch.Tensor:
        from rec_rllib.rl.columns import CANDIDATES

        with torch.no_grad():
            out = module.forward_exploration({Columns.OBS: obs}, t=0)
        drawn = torch.multinomial(
            torch.softmax(out[Columns.ACTION_DIST_INPUTS].double(), -1), 1, generator=gen
        )
        if CANDIDATES in out:  # a policy over candidates: the item the drawn index stands for
            return out[CANDIDATES].long().gather(1, drawn).squeeze(-1)
        return drawn.squeeze(-1)

    return act


def random_policy(n_items: int, seed: int = 0) -> PolicyFn:
    """Uniform over the legal (not consumed) items of an ``n_items`` catalogue."""
    gen = torch.Generator().manual_seed(seed)

    def act(obs: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = legal_actions(obs, n_items).float()
        return torch.multinomial(mask / mask.sum(-1, keepdim=True), 1, generator=gen).squeeze(-1)

    return act


def replay_returns(
    policy: PolicyFn, env_config: dict[str, Any], *, episodes: int = 200, seed: int = 10_000, batch: int = 50
) -> np.ndarray:
    """Per-episode returns of ``policy`` on episodes ``seed .. seed + episodes - 1`` (all users' shard)."""
    cfg = {**env_config, "num_shards": 1, "shard_id": 0}
    envs = [LogReplayEnv(cfg) for _ in range(min(batch, episodes))]
    returns = np.zeros(episodes)
    for start in range(0, episodes, len(envs)):
        idx = list(range(start, min(start + len(envs), episodes)))
        obs = [envs[j].reset(seed=seed + i)[0] for j, i in enumerate(idx)]
        done = np.zeros(len(idx), dtype=bool)
        while not done.all():
            live = np.flatnonzero(~done)
            stacked = {k: torch.as_tensor(np.stack([obs[j][k] for j in live])) for k in obs[0]}
            actions = policy(stacked).cpu().numpy()
            for j, a in zip(live, actions, strict=True):
                obs[j], r, term, trunc, _ = envs[j].step(int(a))
                returns[idx[j]] += r
                done[j] = term or trunc
    return returns


def paired_gain(after: np.ndarray, before: np.ndarray) -> tuple[float, float]:
    """Mean of ``after - before`` and its standard error (same episodes on both sides)."""
    d = np.asarray(after) - np.asarray(before)
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))


def current_module(algo):
    """The algorithm's policy with the learner's *current* weights (synced to the local env runner)."""
    algo.env_runner_group.sync_weights(from_worker_or_learner_group=algo.learner_group, inference_only=True)
    return algo.get_module()
