"""What APPO's env runners send the learner: the bootstrap user state, and nothing the learner does not read.

**The bootstrap user state**: env runners encode it, so the learner of the policy head never runs the encoder.

RLlib's APPO learner appends one artificial step to every episode chunk (``AddOneTsToEpisodesAndTruncate``:
the chunk's final observation, whose value V-trace bootstraps from) and copies the previous step's model
outputs into it, so the user state shipped with that step is the previous observation's. Re-encoding those
rows in the learner (one row in eleven) would make it run the encoder, the costly part of the network.

Instead, each env runner encodes the final observation of every chunk that bootstraps (all but the
terminated ones, whose bootstrap V-trace gates to zero) at the end of ``sample()``, in one batched forward
pass (:func:`ship_final_user_states`, an ``on_sample_end`` callback), and sends it in the chunk's
``custom_data``. :class:`FillBootstrapUserState`, a learner connector piece that runs right after RLlib's
``AddOneTsToEpisodesAndTruncate``, writes it into the appended step and marks the rows that still need
encoding (chunks that arrived without it) in the ``BOOTSTRAP_STATE_MISSING`` column, which the module reads.

**No action-distribution inputs in the episodes**: RLlib stores every model output of a step in the episode,
among them the behaviour distribution's inputs, a catalogue-wide vector (1,682 floats a step on
MovieLens-100K, as large as the rest of the step together). APPO's loss reads only the behaviour
log-probability of the action taken, so :class:`DropActionDistInputs`, the last custom piece of the env
runners' module-to-env pipeline (after RLlib's ``GetActions`` sampled the action and its log-probability),
drops the vector before it reaches the episode. PPO keeps it (its KL term reads it).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.core.columns import Columns

from rec_rllib.rl.columns import BOOTSTRAP_STATE_MISSING, CANDIDATES, FINAL_USER_STATE, USER_STATE


def ship_final_user_states(*, env_runner, samples, **kwargs) -> None:
    """``on_sample_end``: the user state of each returned chunk's final observation, batched, into the
    chunk's ``custom_data`` (runners of the frozen-encoder policy only; others return at once)."""
    module = getattr(env_runner, "module", None)
    if not hasattr(module, "encode_observations") or module.train_encoder:  # not a frozen-encoder policy
        return
    chunks = [e for e in samples if not e.is_terminated]  # RLlib returns no empty chunk
    if not chunks:
        return
    last = [e.get_observations(-1) for e in chunks]
    obs = {k: np.stack([o[k] for o in last]) for k in last[0]}
    states = module.encode_observations(obs)
    for episode, state in zip(chunks, states, strict=True):
        episode.custom_data[FINAL_USER_STATE] = state


class FillBootstrapUserState(ConnectorV2):
    """Learner connector piece (after ``AddOneTsToEpisodesAndTruncate``): the appended step of each chunk gets
    the user state its env runner shipped; rows left without one are flagged in ``BOOTSTRAP_STATE_MISSING``.
    """

    def __call__(
        self,
        *,
        rl_module: Any,
        batch: dict[str, Any],
        episodes: list[Any],
        explore: bool | None = None,
        shared_data: dict | None = None,
        **kwargs,
    ) -> Any:
        for episode in self.single_agent_episode_iterator(episodes, agents_that_stepped_only=False):
            n = len(episode)  # the real steps and the appended bootstrap step
            final = episode.custom_data.get(FINAL_USER_STATE)
            if final is not None:
                episode.set_extra_model_outputs(key=USER_STATE, new_data=final, at_indices=-1)
            # a terminated chunk's bootstrap value is multiplied by 0: its (stale) state is never used
            missing = final is None and not episode.is_terminated
            self.add_n_batch_items(batch, BOOTSTRAP_STATE_MISSING, [False] * (n - 1) + [missing], n, episode)
        return batch


class RecordUCBStatistics(ConnectorV2):
    """Learner connector piece (UCB on the frozen encoder, after ``AddOneTsToEpisodesAndTruncate``): adds
    every real step's (user state, action) to the module's synced LinUCB statistics
    (:meth:`~rec_rllib.rl.module.RecPolicyModule.record_ucb`), which then reach the env runners with the
    weights and the checkpoints with them. The connector runs once per train batch (APPO's circular
    buffer may then learn on the batch twice: the statistics count it once). With ``num_learners`` learners
    each sees about 1/n of the batches and weighs its steps n-fold; runners read learner 0's statistics."""

    def __init__(self, *args, num_learners: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight = float(max(1, num_learners))

    def __call__(self, *, rl_module: Any, batch: dict[str, Any], episodes: list[Any], **kwargs) -> Any:
        from ray.rllib.core import DEFAULT_MODULE_ID

        states, actions = [], []
        for episode in self.single_agent_episode_iterator(episodes, agents_that_stepped_only=False):
            real = slice(0, len(episode) - 1)  # the appended bootstrap step was never acted on
            states.append(np.asarray(episode.get_extra_model_outputs(USER_STATE, indices=real)))
            acted = np.asarray(episode.get_actions(indices=real))
            if CANDIDATES in episode.extra_model_outputs:  # a policy over candidates: the items acted on
                candidates = np.asarray(episode.get_extra_model_outputs(CANDIDATES, indices=real))
                acted = np.take_along_axis(candidates, acted.reshape(-1, 1), axis=1).reshape(-1)
            actions.append(acted)
        if states:
            module = rl_module[DEFAULT_MODULE_ID].unwrapped()
            module.record_ucb(
                torch.as_tensor(np.concatenate(states)),
                torch.as_tensor(np.concatenate(actions)),
                weight=self.weight,
            )
        return batch


class DropActionDistInputs(ConnectorV2):
    """Module-to-env piece (after ``GetActions``): removes ``ACTION_DIST_INPUTS`` from what the env runner
    records with each step (APPO's learner never reads it)."""

    def __call__(self, *, rl_module: Any, batch: dict[str, Any], episodes: list[Any], **kwargs) -> Any:
        batch.pop(Columns.ACTION_DIST_INPUTS, None)
        return batch
