"""Learners: RLlib's PPO/APPO losses plus an optional KL penalty toward the fine-tuned reference policy.

Each subclass changes only the loss and calls ``super()``: ``loss += ref_kl_coeff * KL(pi || pi_ref)``,
with ``pi_ref`` the frozen fine-tuned network (:class:`~rec_rllib.rl.module.RecPolicyModule`'s
``_ref_net``), averaged over the (masked) batch. ``ref_kl_coeff`` comes from ``learner_config_dict``.
"""

from __future__ import annotations

from typing import Any

import torch
from ray.rllib.algorithms.appo.torch.appo_torch_learner import APPOTorchLearner
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.core import ALL_MODULES
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.training_data import TrainingData
from ray.rllib.utils.annotations import override

from rec_rllib.rl.module import REF_LOGITS

REF_KL_COEFF = "ref_kl_coeff"
REF_KL_METRIC = "reference_kl"
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


class RecAPPOLearner(_ReferenceKLMixin, APPOTorchLearner):
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


class RecPPOLearner(_ReferenceKLMixin, PPOTorchLearner):
    """PPO + KL toward the fine-tuned policy."""

    @override(PPOTorchLearner)
    def compute_loss_for_module(self, **kwargs):
        return super().compute_loss_for_module(**kwargs)
