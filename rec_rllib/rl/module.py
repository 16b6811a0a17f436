"""RecPolicyModule: the fine-tuned TextSeqRec as an RLlib (new API stack) policy.

The module wraps the *same* ``nn.Module`` as fine-tuning and serving (:class:`TextSeqRec`), initialised
from its weights, and adds what the actor-critic algorithms need:

* policy logits = the model's next-item scores over the catalogue, masked by the observation's action
  mask in every forward path (consumed items are never recommended);
* a value head on the user state (PPO, APPO: :class:`ValueFunctionAPI`);
* a target copy of the network for APPO's KL/trust region (:class:`TargetNetworkAPI`);
* a frozen reference copy of the fine-tuned network for the optional KL penalty toward it.

``_forward_exploration`` turns the logits into the behaviour distribution of the configured exploration
strategy (:mod:`rec_rllib.explore`), so the log-probabilities RLlib records are the true propensities.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from ray.rllib.algorithms.dqn.dqn_learner import QF_NEXT_PREDS, QF_PREDS, QF_TARGET_NEXT_PREDS
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.utils import make_target_network
from ray.rllib.core.rl_module.apis import (
    TARGET_NETWORK_ACTION_DIST_INPUTS,
    InferenceOnlyAPI,
    TargetNetworkAPI,
    ValueFunctionAPI,
)
from ray.rllib.core.rl_module.torch import TorchRLModule
from ray.rllib.utils.annotations import override
from torch import nn

from rec_rllib.columns import Obs
from rec_rllib.explore import ExplorationConfig, behaviour_log_probs
from rec_rllib.models.seqrec import ModelConfig, TextSeqRec

REF_LOGITS = "reference_action_dist_inputs"
MASK_VALUE = -1e9


def model_config_from_run(
    run_dir: str, *, exploration: dict | None = None, value_hidden: int = 64
) -> dict[str, Any]:
    """The RLModule's ``model_config``: the fine-tuned weights travel inside it, so every env runner and
    learner on every node builds the same network without shared storage."""
    from rec_rllib.models.run import load_run

    model, meta = load_run(run_dir)
    if model.cfg.text_finetune_layers:
        raise ValueError(f"{run_dir}: RL training needs a frozen-text run (text_finetune_layers=0)")
    return {
        "textseqrec": {
            "config": model.cfg.to_dict(),
            "n_items": model.n_items,
            "state": {k: v.cpu().numpy() for k, v in model.state_dict().items()},
            "run_dir": str(run_dir),
            "dataset": meta.get("dataset", {}),
        },
        "exploration": exploration or {},
        "value_hidden": value_hidden,
    }


def build_textseqrec(spec: dict[str, Any]) -> TextSeqRec:
    cfg = ModelConfig.from_dict(spec["config"])
    state = {k: torch.as_tensor(np.asarray(v)) for k, v in spec["state"].items()}
    net = TextSeqRec(
        cfg, int(spec["n_items"]), text_embeddings=state.get("text_embeddings"), known_items=state["known"]
    )
    net.load_state_dict(state)
    return net


class RecPolicyModule(TorchRLModule, ValueFunctionAPI, TargetNetworkAPI, InferenceOnlyAPI):
    """Observation {history, length, action_mask} -> logits over the catalogue (+ value)."""

    @override(TorchRLModule)
    def setup(self) -> None:
        mc = self.model_config
        self.net = build_textseqrec(mc["textseqrec"])
        self.exploration = ExplorationConfig(**mc.get("exploration", {}))
        # Dropout off for RL (it would make behaviour and learner log-probs disagree); Thompson sampling
        # turns it back on, at the fine-tuned rates, for its posterior samples.
        self._dropouts = [m for m in self.net.modules() if isinstance(m, nn.Dropout)]
        self._dropout_p = [m.p for m in self._dropouts]
        self._set_dropout(on=False)
        hidden = self.net.cfg.hidden_size
        if not self.inference_only:
            vh = int(mc.get("value_hidden", 64))
            self.value_head = nn.Sequential(nn.Linear(hidden, vh), nn.Tanh(), nn.Linear(vh, 1))
            # frozen copy of the fine-tuned network: the KL-penalty reference (learner side only, and only
            # when the penalty is on: it costs one more forward pass per train batch)
            if float(mc.get("ref_kl_coeff", 1.0)) > 0:
                self._ref_net = copy.deepcopy(self.net).requires_grad_(False).eval()

    def _set_dropout(self, *, on: bool) -> None:
        for m, p in zip(self._dropouts, self._dropout_p, strict=True):
            m.p = p if on else 0.0

    # -- shared computation ------------------------------------------------------------------------------------
    def _logits_and_state(
        self, batch: dict[str, Any], net: TextSeqRec | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        net = net or self.net
        obs = batch[Columns.OBS]
        tokens = obs[Obs.HISTORY].long()  # [B, W+1]
        lengths = obs[Obs.LENGTH].long().reshape(-1)  # [B]
        items = net.item_matrix()  # [n_items, H]
        state = net.user_state(tokens, lengths, items)  # [B, H]
        logits = net.scores_from_state(state, items)  # [B, n_items]
        mask = obs[Obs.ACTION_MASK] > 0.5
        return logits.masked_fill(~mask, MASK_VALUE), state

    # -- the three forward paths ---------------------------------------------------------------------------------
    @override(TorchRLModule)
    def _forward_inference(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        with torch.no_grad():
            logits, _ = self._logits_and_state(batch)
        return {Columns.ACTION_DIST_INPUTS: logits}

    @override(TorchRLModule)
    def _forward_exploration(self, batch: dict[str, Any], t: int = 0, **kwargs) -> dict[str, Any]:
        with torch.no_grad():
            if self.exploration.strategy == "thompson":
                # one posterior sample: the network with (MC) dropout active
                was_training = self.net.training
                self._set_dropout(on=True)
                self.net.train()
                try:
                    logits, _ = self._logits_and_state(batch)
                finally:
                    self.net.train(was_training)
                    self._set_dropout(on=False)
            else:
                logits, _ = self._logits_and_state(batch)
            mask = batch[Columns.OBS][Obs.ACTION_MASK] > 0.5
            log_probs = behaviour_log_probs(logits, self.exploration, step=int(t), allowed=mask)
        # finite everywhere: the Categorical distribution needs no -inf
        return {Columns.ACTION_DIST_INPUTS: log_probs.clamp(min=MASK_VALUE)}

    @override(TorchRLModule)
    def _forward_train(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        if Columns.NEXT_OBS in batch:  # DQN: Q-values of this and the next step, and the target net's
            return self._q_forward_train(batch)
        logits, state = self._logits_and_state(batch)
        out = {Columns.ACTION_DIST_INPUTS: logits, Columns.EMBEDDINGS: state}
        if getattr(self, "_ref_net", None) is not None:
            with torch.no_grad():
                out[REF_LOGITS], _ = self._logits_and_state(batch, self._ref_net)
        return out

    def _q_forward_train(self, batch: dict[str, Any]) -> dict[str, Any]:
        """DQN reads the catalogue scores as Q-values (Q(s, a) = score of item a given the history): one
        online pass over [obs; next_obs] (double Q picks the next action online) and one target pass."""
        obs, nxt = batch[Columns.OBS], batch[Columns.NEXT_OBS]
        both = {Columns.OBS: {k: torch.cat([obs[k], nxt[k]], dim=0) for k in obs}}
        q, _ = self._logits_and_state(both)
        q_now, q_next = torch.chunk(q, 2, dim=0)
        with torch.no_grad():
            q_target_next, _ = self._logits_and_state({Columns.OBS: nxt}, self._old_net)
        return {QF_PREDS: q_now, QF_NEXT_PREDS: q_next, QF_TARGET_NEXT_PREDS: q_target_next}

    # -- APIs of the algorithms -----------------------------------------------------------------------------
    @override(ValueFunctionAPI)
    def compute_values(self, batch: dict[str, Any], embeddings: Any = None) -> torch.Tensor:
        if embeddings is None:
            _, embeddings = self._logits_and_state(batch)
        return self.value_head(embeddings.detach()).squeeze(-1)

    @override(TargetNetworkAPI)
    def make_target_networks(self) -> None:
        self._old_net = make_target_network(self.net)

    @override(TargetNetworkAPI)
    def get_target_network_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.net, self._old_net)]

    @override(TargetNetworkAPI)
    def forward_target(self, batch: dict[str, Any]) -> dict[str, Any]:
        logits, _ = self._logits_and_state(batch, self._old_net)
        return {TARGET_NETWORK_ACTION_DIST_INPUTS: logits}

    @override(InferenceOnlyAPI)
    def get_non_inference_attributes(self) -> list[str]:
        return ["value_head", "_ref_net", "_old_net"]
