"""Learners: RLlib's PPO/APPO losses plus an optional KL penalty toward the fine-tuned reference policy;
DQN's loss plus the cross-entropy of the logged next item (:class:`RecDQNLearner`). Each reports the module's
exposure weight β after every update, when it has one.

Each subclass changes only the loss and calls ``super()``: ``loss += ref_kl_coeff * KL(pi || pi_ref)``,
with ``pi_ref`` the frozen fine-tuned network (:class:`~rec_rllib.rl.module.RecPolicyModule`'s
``_ref_net``), averaged over the (masked) batch. ``ref_kl_coeff`` comes from ``learner_config_dict``.
"""

from __future__ import annotations

from typing import Any

import torch
from ray.rllib.algorithms.appo.torch.appo_torch_learner import APPOTorchLearner
from ray.rllib.algorithms.dqn.dqn_learner import QF_PREDS
from ray.rllib.algorithms.dqn.torch.dqn_torch_learner import DQNTorchLearner
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.core import ALL_MODULES
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.training_data import TrainingData
from ray.rllib.utils.annotations import override

from rec_rllib.columns import Obs, Tokens
from rec_rllib.rl.columns import REF_LOGITS
from rec_rllib.rl.obs import is_legal

REF_KL_COEFF = "ref_kl_coeff"
REF_KL_METRIC = "reference_kl"
NEXT_ITEM_CE_COEFF = "next_item_ce_coeff"
NEXT_ITEM_CE_METRIC = "next_item_ce"
EXPOSURE_WEIGHT_METRIC = "exposure_weight"
COOCCURRENCE_WEIGHT_METRIC = "cooccurrence_weight"
LOST_UPDATES_METRIC = "updates_skipped_all_episodes_lost"


class _ReferenceKLMixin:
    def compute_loss_for_module(
        self, *, module_id: str, config: Any, batch: dict[str, Any], fwd_out: dict[str, Any]
    ):
        loss = super().compute_loss_for_module(
            module_id=module_id, config=config, batch=batch, fwd_out=fwd_out
        )
        coeff = float(config.learner_config_dict.get(REF_KL_COEFF, 0.0))
        if coeff <= 0.0 or REF_LOGITS not in fwd_out:
            return loss
        logp = torch.log_softmax(fwd_out[Columns.ACTION_DIST_INPUTS], dim=-1)  # [B, n_items]
        ref = torch.log_softmax(fwd_out[REF_LOGITS], dim=-1)
        kl = (logp.exp() * (logp - ref)).sum(-1)  # [B]
        if Columns.LOSS_MASK in batch:
            mask = batch[Columns.LOSS_MASK].float().reshape(kl.shape)
            kl = (kl * mask).sum() / mask.sum().clamp(min=1.0)
        else:
            kl = kl.mean()
        self.metrics.log_value((module_id, REF_KL_METRIC), kl.item(), window=1)
        return loss + coeff * kl


class _TermWeightsMixin:
    """Logs the learned weights of the policy's terms after every update: β of the exposure term and γ of the
    co-occurrence term (modules that have them)."""

    def after_gradient_based_update(self, *, timesteps: dict[str, Any]) -> None:
        super().after_gradient_based_update(timesteps=timesteps)
        for module_id, module in self.module.items():
            m = module.unwrapped()
            for attr, weight, metric in (
                ("exposure_term", "beta", EXPOSURE_WEIGHT_METRIC),
                ("cooccurrence_term", "gamma", COOCCURRENCE_WEIGHT_METRIC),
            ):
                term = getattr(m, attr, None)
                if term is not None:
                    self.metrics.log_value(
                        (module_id, metric), float(getattr(term, weight).detach()), window=1
                    )


class RecAPPOLearner(_TermWeightsMixin, _ReferenceKLMixin, APPOTorchLearner):
    """APPO (V-trace actor-learner) + KL toward the fine-tuned policy."""

    @override(APPOTorchLearner)
    def compute_loss_for_module(self, **kwargs):
        return super().compute_loss_for_module(**kwargs)

    @override(APPOTorchLearner)
    def update(self, training_data: TrainingData, **kwargs) -> dict[str, Any]:
        """Skips a package whose every episode was lost with its env runner.

        The algorithm packs episode refs from the runners' ``sample()`` calls into learner packages;
        :meth:`TrainingData.solve_refs` drops the refs whose owner died (a runner crashed, its node went
        away). When that leaves nothing, RLlib 2.60's learner connector fails on the empty episode list
        (``IndexError`` in ``AddOneTsToEpisodesAndTruncate``) and ``algo.train()`` raises, although
        the runners are being restarted. Such a package carries no data: count it and go on."""
        training_data.solve_refs()
        if training_data.episodes is not None and len(training_data.episodes) == 0:
            self.metrics.log_value((ALL_MODULES, LOST_UPDATES_METRIC), 1, reduce="sum")
            return {}
        return super().update(training_data, **kwargs)


class RecPPOLearner(_TermWeightsMixin, _ReferenceKLMixin, PPOTorchLearner):
    """PPO + KL toward the fine-tuned policy."""

    @override(PPOTorchLearner)
    def compute_loss_for_module(self, **kwargs):
        return super().compute_loss_for_module(**kwargs)


def logged_next_items(next_obs: dict[str, Any]) -> torch.Tensor:
    """[B] the item the log advanced each step's history by: the last item of the next observation's window
    (:class:`~rec_rllib.env.LogReplayEnv` appends the logged item whatever was recommended)."""
    history = next_obs[Obs.HISTORY].long()  # [B, W+1]: BOS, then the items
    last = next_obs[Obs.LENGTH].long().reshape(-1) - 1
    return history.gather(1, last[:, None]).squeeze(1) - Tokens.OFFSET


class RecDQNLearner(_TermWeightsMixin, DQNTorchLearner):
    """Double Q-learning on the catalogue scores + the cross-entropy of the logged next item on the same
    scores (``next_item_ce_coeff``; SQN's supervised head, Xin et al., SIGIR 2020, here sharing the Q head).

    Without it, the TD targets of a 0-1 hit reward are nearly equal across items, and every update lowers the
    Q-value of the item just recommended (mostly the greedy one, rarely rewarded) and nothing else, so
    items never tried rise to the top. The cross-entropy term holds the
    ranking to the log, over every item at every step; TD moves the scores where the rewards say."""

    @override(DQNTorchLearner)
    def compute_loss_for_module(
        self, *, module_id: str, config: Any, batch: dict[str, Any], fwd_out: dict[str, Any]
    ):
        loss = super().compute_loss_for_module(
            module_id=module_id, config=config, batch=batch, fwd_out=fwd_out
        )
        coeff = float(config.learner_config_dict.get(NEXT_ITEM_CE_COEFF, 0.0))
        if coeff <= 0.0:
            return loss
        q = fwd_out[QF_PREDS]  # [B, n_items], consumed items masked
        target = logged_next_items(batch[Columns.NEXT_OBS])
        log_p = torch.log_softmax(q.float(), dim=-1).gather(1, target[:, None]).squeeze(1)
        # a logged item the mask hides (a repeat consumption) has no usable log-probability: skipped
        legal = is_legal(batch[Columns.OBS], target)
        ce = -(log_p * legal).sum() / legal.sum().clamp(min=1)
        self.metrics.log_value((module_id, NEXT_ITEM_CE_METRIC), ce.item(), window=1)
        return loss + coeff * ce
