"""RecPolicyModule: the fine-tuned TextSeqRec as an RLlib (new API stack) policy.

The module wraps the *same* ``nn.Module`` as fine-tuning and serving (:class:`TextSeqRec`), initialised
from its weights, and adds what the actor-critic algorithms need:

* policy logits = the model's next-item scores over the catalogue, masked in every forward path by the
  observation's consumed items (never recommended; :func:`~rec_rllib.rl.obs.legal_actions`);
* a value head on the user state (PPO, APPO: :class:`ValueFunctionAPI`);
* a target copy of the network for APPO's KL/trust region (:class:`TargetNetworkAPI`);
* the fine-tuned policy as the reference of the optional KL penalty.

Two ways to train (``train_encoder`` in the model config):

* ``False`` (default) — **policy head on a frozen encoder**: the fine-tuned sequence encoder and item
  representations stay fixed; RL trains the policy head of :class:`TextSeqRec` (a linear map on the user
  state, initialised to the identity, and a weight on the items' centred log train frequency, initially 0:
  training starts at the fine-tuned policy) and the item score bias. Env runners return the user state of
  every step (``USER_STATE``) with the action, and (APPO) that of each chunk's bootstrap step
  (:mod:`rec_rllib.rl.connectors`), so the learner never runs the encoder; the reference policy is the same
  state through the initial head. The item matrix is computed once, not per forward pass.
* ``True`` — every weight is trained: the learner re-encodes each batch (online, target and reference
  networks: about five encoder passes per sample, the price of end-to-end RL).

With an exposure cost in the env (:mod:`rec_rllib.env`), the observation lists the runner's most recommended
items with their counts (the module spreads them over the catalogue, as it does the consumed items into the
mask and the co-occurrence feature's items and probabilities) and the logits gain ``- β · f(count)`` with one
learned weight β (:class:`ExposureTerm`, 0 at the start: the fine-tuned policy; f the env's
``exposure_shape``: log(1 + count), or whether the item was recommended at all), trained by every algorithm
with the rest of the head; the target network has its own copy, the KL reference none. Evaluation and serving
apply the learned β to their own tracker of what they showed
(:func:`rec_rllib.rl.policy.load_policy_recommender`).

**A policy over candidates** (``candidate_items`` in the model config; K by
:func:`~rec_rllib.rl.obs.candidate_count`): in each state the K legal items with the highest scores before the
exposure term are its candidates. Acting chooses them from the catalogue-wide scores and returns their ids
(``CANDIDATES``, kept with the step), the action as an index into them and the item it stands for
(``ACTIONS_FOR_ENV``, what the env receives); the learner's online, target and reference passes score only the
shipped candidates (their item vectors gathered once per batch), so its cost per sample follows K. With K at
least the catalogue the module is the catalogue-wide policy, path for path.

``_forward_exploration`` turns the logits into the behaviour distribution of the configured exploration
strategy (:mod:`rec_rllib.explore`), so the log-probabilities RLlib records are the true propensities.
UCB acts on logits + bonus, arg-max (propensity 1), from diagonal LinUCB statistics of the (user state,
item) pairs acted on. With the frozen encoder they are a module buffer (``ucb_gram_diag``) that the learner
accumulates from every runner's steps it trains on (:class:`~rec_rllib.rl.connectors.RecordUCBStatistics`,
each step once) and that travels with the weights: each runner sees what *all* runners showed (up to the
batches still in flight; it adds its own steps in between syncs), a restarted runner gets them back with the
weights, and checkpoints keep them. End to end (``train_encoder``) each runner keeps its own, unsaved (the
user states move as the encoder trains).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass, field, fields
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
from ray.rllib.utils.numpy import convert_to_numpy
from torch import nn

from rec_rllib.columns import Obs
from rec_rllib.explore import ExplorationConfig, LinUCB, behaviour_log_probs
from rec_rllib.exposure import check_exposure_shape, exposure_feature
from rec_rllib.models.seqrec import ModelConfig, TextSeqRec
from rec_rllib.retrieval import DEFAULT_PROBE, ItemIndex, uses_index
from rec_rllib.rl.columns import (
    BEHAVIOUR_TEMPERATURE,
    BOOTSTRAP_STATE_MISSING,
    CANDIDATES,
    REF_LOGITS,
    UCB_STATS,
    USER_STATE,
)
from rec_rllib.rl.obs import candidate_count, dense_feature, feature_at, legal_actions, legal_at

MASK_VALUE = -1e9
TRAINED_WITH_FROZEN_ENCODER = (*TextSeqRec.POLICY_HEAD_KEYS, "bias")
"""What RL trains when the encoder is frozen: the policy head and the item score bias."""


def _batch_key(*arrays: Any) -> tuple:
    """What identifies a batch's inputs for the per-batch caches: the arrays themselves and their in-place
    versions (a tensor changed in place is another input)."""
    return tuple((a, getattr(a, "_version", None)) for a in arrays)


def _same_key(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(x is y and vx == vy for (x, vx), (y, vy) in zip(a, b, strict=True))


class ExposureTerm(nn.Module):
    """β of the exposure term: logits - β · f(count), f by ``shape``
    (:func:`~rec_rllib.exposure.exposure_feature`).

    The observation carries log(1 + times the item was recommended lately). β = ``SCALE`` · w with w the
    trained parameter: Adam moves a parameter by about the learning rate per update whatever its gradient's
    scale, so a plain β would move ~1e-3 per update at the policy head's rate, and the β that matters is of
    order 0.1-1 (what one more log-unit of exposure is worth in score units; the fine-tuned scores fall ~1
    apart between ranks 1 and 10) over a run of ~100 updates.
    """

    SCALE = 10.0

    def __init__(self, shape: str = "log") -> None:
        super().__init__()
        self.shape = check_exposure_shape(shape)
        self.weight = nn.Parameter(torch.zeros(()))

    @property
    def beta(self) -> torch.Tensor:
        return self.SCALE * self.weight

    def forward(self, logits: torch.Tensor, exposure: torch.Tensor) -> torch.Tensor:
        return logits - self.beta * exposure_feature(exposure.float(), self.shape)


class CooccurrenceTerm(nn.Module):
    """γ of the co-occurrence term: logits + γ · p_kNN(item | recent window), the item-kNN simulator's click
    probability (:class:`~rec_rllib.simulator.ItemKNNSimulator`, in [0, 1]), which the observation carries
    (``Obs.COOCCURRENCE``; leave-user-out in training). γ = ``SCALE`` · w, w the trained parameter (0 at the
    start: training starts at the fine-tuned policy), for the reason :class:`ExposureTerm` gives. ``fixed``: γ
    is set there and not trained (``TrainConfig.cooccurrence_gamma``)."""

    SCALE = 10.0

    def __init__(self, fixed: float | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(0.0 if fixed is None else fixed / self.SCALE))
        self.weight.requires_grad_(fixed is None)

    @property
    def gamma(self) -> torch.Tensor:
        return self.SCALE * self.weight

    def forward(self, logits: torch.Tensor, probabilities: torch.Tensor) -> torch.Tensor:
        return logits + self.gamma * probabilities.float()


@dataclass
class PolicyModelConfig:
    """The RLModule's ``model_config``, typed: :func:`~rec_rllib.rl.algo.build_algo_config` builds it from
    the run's settings and RLlib hands it to every copy of the module as a dict (:meth:`to_rllib`), merged
    into RLlib's own default model settings, which :meth:`of` leaves out. A key missing (a module built from
    :func:`model_config_from_run` alone, an older checkpoint) takes the default here."""

    textseqrec: dict[str, Any] = field(default_factory=dict)
    """The fine-tuned network: its ModelConfig, catalogue size, weights (arrays), run directory and dataset
    (:func:`model_config_from_run`): every env runner and learner builds it without shared storage."""
    exploration: dict[str, Any] = field(default_factory=dict)
    """The behaviour policy's :class:`~rec_rllib.explore.ExplorationConfig`, as a dict."""
    value_hidden: int = 64
    """Width of the value head's hidden layer."""
    ref_kl_coeff: float = 1.0
    """Weight of the KL penalty toward the fine-tuned policy (0: no reference network is kept)."""
    train_encoder: bool = False
    """Train every weight (True) or the policy head on the frozen encoder."""
    train_state_head: bool = True
    """Policy head: train its map on the user state (else it stays the identity)."""
    train_item_terms: bool = True
    """Policy head: train the item bias and the popularity weight (else they stay fine-tuned)."""
    train_behaviour_policy: bool = False
    """PPO: the loss optimises the behaviour distribution itself (no off-policy correction)."""
    item_counts: Any = None
    """[n_items] train interactions per item: the policy head's popularity feature (None: end to end)."""
    exposure_window: int = 0
    """The env's exposure window when it prices exposure (0: no exposure term)."""
    exposure_shape: str = "log"
    """What the exposure term counts (:func:`~rec_rllib.exposure.exposure_feature`)."""
    cooccurrence: bool = False
    """The observation carries the item-kNN simulator's probabilities: the module has a co-occurrence term."""
    cooccurrence_window: int = 5
    """The most recent items the co-occurrence feature averages over."""
    feature_items: int | None = None
    """Most items the co-occurrence feature lists (None: all)."""
    cooccurrence_scheme: str = "loo"
    """The split whose train part the simulator is fitted on."""
    cooccurrence_gamma: float | str | None = None
    """The co-occurrence term's weight, fixed; None: learned."""
    candidate_items: int | str = 0
    """Items the policy acts and learns over per state (:func:`~rec_rllib.rl.obs.candidate_count`)."""
    candidate_search: str = "exact"
    """How acting chooses the candidates (:data:`~rec_rllib.retrieval.SEARCHES`); a module built without
    this key (an older checkpoint) scores every item."""
    candidate_probe: int = DEFAULT_PROBE
    """With an index: the clusters a search reads (:class:`~rec_rllib.retrieval.ItemIndex`)."""

    @classmethod
    def of(cls, model_config: dict[str, Any] | PolicyModelConfig) -> PolicyModelConfig:
        if isinstance(model_config, cls):
            return model_config
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in model_config.items() if k in known})

    def to_rllib(self) -> dict[str, Any]:
        """The dict RLlib carries (shallow: the weights are not copied)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


class _TrainedParts(nn.Module):
    """What RL trains of a network on a frozen encoder (its policy head, item bias and popularity weight), the
    network's own parameters: the target network's Polyak update averages these instead of every weight of
    the network, whose frozen item vectors and text embeddings are hundreds of MB at a large catalogue and the
    same in both copies. Built per update, never registered in the module (its state dict stays as it is)."""

    def __init__(self, net: TextSeqRec) -> None:
        super().__init__()
        self.state_head = net.state_head
        self.bias = net.bias
        self.popularity_weight = net.popularity_weight


class SharedWeights(dict):
    """Fine-tuned weights (name -> array) that nothing writes to, shared by every copy of a config instead of
    copied: RLlib deep-copies the algorithm config, the module's ``model_config`` with it, on every training
    iteration (its result carries the config), which would copy every weight, hundreds of MB at a large
    catalogue, each time. Pickling (to the env runners and learners, into checkpoints) still carries them."""

    def __deepcopy__(self, memo: dict) -> SharedWeights:
        return self


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
            "state": SharedWeights({k: v.cpu().numpy() for k, v in model.state_dict().items()}),
            "run_dir": str(run_dir),
            "dataset": meta.get("dataset", {}),
        },
        "exploration": exploration or {},
        "value_hidden": value_hidden,
    }


def build_textseqrec(spec: dict[str, Any], *, policy_head: bool = False) -> TextSeqRec:
    """The fine-tuned network from its spec; ``policy_head`` adds the identity-initialised state head."""
    cfg = ModelConfig.from_dict(
        {**spec["config"], "policy_head": policy_head or spec["config"].get("policy_head", False)}
    )
    with warnings.catch_warnings():
        # arrays unpickled from Ray's object store are read-only views of it, which the network only reads
        # from (load_state_dict copies them into its own weights), not copied first
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        state = {k: torch.as_tensor(np.asarray(v)) for k, v in spec["state"].items()}
    # the two tensors the network keeps as its buffers are its own copies
    text = state.get("text_embeddings")
    net = TextSeqRec(
        cfg,
        int(spec["n_items"]),
        text_embeddings=None if text is None else text.clone(),
        known_items=state["known"].clone(),
    )
    missing, unexpected = net.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith(TextSeqRec.POLICY_HEAD_KEYS) for k in missing):
        raise ValueError(
            f"fine-tuned weights do not fit the network: missing {missing}, unexpected {unexpected}"
        )
    return net


class RecPolicyModule(TorchRLModule, ValueFunctionAPI, TargetNetworkAPI, InferenceOnlyAPI):
    """Observation {history, length, consumed} -> logits over the catalogue (+ value)."""

    @override(TorchRLModule)
    def setup(self) -> None:
        mc = self.policy_settings = PolicyModelConfig.of(self.model_config)
        self.train_encoder = bool(mc.train_encoder)
        self.net = build_textseqrec(mc.textseqrec, policy_head=not self.train_encoder)
        self.exploration = ExplorationConfig.from_dict(mc.exploration)
        # Dropout off for RL (it would make behaviour and learner log-probs disagree); Thompson sampling
        # turns it back on, at the fine-tuned rates, for its posterior samples.
        self._dropouts = [m for m in self.net.modules() if isinstance(m, nn.Dropout)]
        self._dropout_p = [m.p for m in self._dropouts]
        self._set_dropout(on=False)
        if not self.train_encoder:
            trained = TRAINED_WITH_FROZEN_ENCODER
            if not mc.train_state_head:  # the map on the user state stays the identity
                trained = tuple(k for k in trained if k != TextSeqRec.STATE_HEAD_KEY)
            if not mc.train_item_terms:  # item bias and popularity weight stay fine-tuned
                trained = tuple(k for k in trained if k not in TextSeqRec.ITEM_TERM_KEYS)
            for name, param in self.net.named_parameters():
                param.requires_grad_(name.startswith(trained))
            if mc.item_counts is not None:
                self.net.set_popularity(np.asarray(mc.item_counts))
        self._items: torch.Tensor | None = None  # item matrix cache (no-grad paths; frozen items)
        # what the last batch's passes share, by name (the completed user states, the mask, the features over
        # the catalogue): (the inputs they were formed from, the rows)
        self._per_batch: dict[str, tuple[tuple, torch.Tensor]] = {}
        self._ucb: LinUCB | None = None  # UCB statistics of the actions taken
        self._gather_buffer: torch.Tensor | None = None  # the learner's candidate item vectors (_gather_rows)
        # a policy over candidates: each state's K best items by the scores before the exposure term (0: the
        # whole catalogue, as with any catalogue of at most K items)
        self.n_candidates = candidate_count(mc.candidate_items, self.net.n_items)
        # acting chooses them by searching an index of the item vectors (built on first use, and again when
        # the item vectors change) instead of scoring every item
        self.candidate_probe = int(mc.candidate_probe)
        self.searches_index = bool(self.n_candidates) and uses_index(mc.candidate_search, self.net.n_items)
        self._index: tuple[torch.Tensor, ItemIndex] | None = None  # (the item matrix it holds, the index)
        # the exposure term (only when the env prices exposure: its observation then carries the counts)
        self.exposure_window = int(mc.exposure_window)
        shape = str(mc.exposure_shape)  # checkpoints from before the shape: log
        self.exposure_term = ExposureTerm(shape) if self.exposure_window else None
        # the co-occurrence term (only when the env's observation carries the simulator's probabilities)
        # γ fixed, or None: learned
        self.cooccurrence_term = CooccurrenceTerm(mc.cooccurrence_gamma) if mc.cooccurrence else None
        hidden = self.net.cfg.hidden_size
        if self.exploration.strategy == "ucb" and not self.train_encoder:
            # [n_items, H] diagonal Gram statistics (ridge 1 = never shown): synced, checkpointed
            self.register_buffer(UCB_STATS, torch.ones(self.net.n_items, hidden))
        if not self.inference_only:
            vh = int(mc.value_hidden)
            self.value_head = nn.Sequential(nn.Linear(hidden, vh), nn.Tanh(), nn.Linear(vh, 1))
            # the KL-penalty reference: the fine-tuned network (learner side only, only when the penalty is
            # on). With a frozen encoder it is the user state through the initial (identity) head: no copy.
            if float(mc.ref_kl_coeff) > 0:
                if self.train_encoder:
                    self._ref_net = copy.deepcopy(self.net).requires_grad_(False).eval()
                else:
                    # its additive item terms: the fine-tuned bias where the item was trained
                    offsets = (self.net.bias * self.net.known).detach().clone()
                    self.register_buffer("_ref_offsets", offsets, persistent=False)

    def _set_dropout(self, *, on: bool) -> None:
        for m, p in zip(self._dropouts, self._dropout_p, strict=True):
            m.p = p if on else 0.0

    def _frozen_key(self, key: str) -> bool:
        """Whether a state key is a weight RL leaves at its fine-tuned value (policy head on the frozen
        encoder): every copy of the module builds it from the same fine-tuned weights (the model config)."""
        return (
            not self.train_encoder
            and key.startswith("net.")
            and not key[4:].startswith(TRAINED_WITH_FROZEN_ENCODER)
        )

    @override(TorchRLModule)
    def get_state(self, components=None, *, not_components=None, inference_only: bool = False, **kwargs):
        if not (inference_only and not self.train_encoder):
            return super().get_state(
                components, not_components=not_components, inference_only=inference_only, **kwargs
            )
        # what the learner sends the env runners every iteration: only what RL trains (the frozen encoder and
        # item vectors are most of the weights, 200 MB at 100,000 items, and the same on both sides), left
        # out before RLlib's conversion to numpy, which copies every array it converts; checkpoints keep all
        state = {k: v for k, v in self.state_dict().items() if not self._frozen_key(k)}
        if not self.inference_only:  # the learner's own parts (value head, target and reference networks)
            own = tuple(self.get_non_inference_attributes())
            state = {
                k: v
                for k, v in state.items()
                if k not in own and not k.startswith(tuple(a + "." for a in own))
            }
        return convert_to_numpy(state)

    @override(TorchRLModule)
    def set_state(self, state) -> None:
        from ray.rllib.utils.torch_utils import convert_to_torch_tensor

        missing, _ = self.load_state_dict(convert_to_torch_tensor(state), strict=False)
        missing = [k for k in missing if not self._frozen_key(k)]
        if self.inference_only and missing:
            raise ValueError(f"the module state lacks {missing} (a state of another architecture?)")
        if self.train_encoder or any(self._frozen_key(k) for k in state):
            self._items = None  # the item vectors may have changed; the trained head leaves them as they are

    # -- shared computation ----------------------------------------------------------------------------------
    def _item_matrix(self, net: TextSeqRec) -> torch.Tensor:
        """[n_items, H]; cached where no gradient reaches it (frozen items: every copy of the network has the
        same; end-to-end training: the online network's, on its no-grad paths, until new weights arrive)."""
        if self.train_encoder and (net is not self.net or torch.is_grad_enabled()):
            return net.item_matrix()
        if self._items is None or self._items.device != net.known.device:
            with torch.no_grad():
                self._items = net.item_matrix()
        return self._items

    def _encode(self, obs: dict[str, Any], net: TextSeqRec) -> torch.Tensor:
        """[B, H] user state from the observation's history window."""
        tokens = obs[Obs.HISTORY].long()  # [B, W+1]
        lengths = obs[Obs.LENGTH].long().reshape(-1)  # [B]
        return net.user_state(tokens, lengths, self._item_matrix(net))

    def encode_observations(self, obs: dict[str, Any]) -> np.ndarray:
        """[B, H] user states of a batch of observations (numpy in, numpy out, no gradient): what the env
        runners ship for the bootstrap steps (:func:`rec_rllib.rl.connectors.ship_final_user_states`)."""
        device = self.net.known.device
        with torch.no_grad():
            tensors = {k: torch.as_tensor(np.asarray(v), device=device) for k, v in obs.items()}
            return self._encode(tensors, self.net).float().cpu().numpy()

    def _user_state(self, batch: dict[str, Any]) -> torch.Tensor:
        """[B, H]: encoded here, or (frozen encoder) read from the batch, as the env runners computed it."""
        obs = batch[Columns.OBS]
        if self.train_encoder:
            return self._encode(obs, self.net)
        if USER_STATE not in batch:
            with torch.no_grad():
                return self._encode(obs, self.net)
        shipped = batch[USER_STATE]

        def completed() -> torch.Tensor:
            state = shipped.float()
            # RLlib appends one bootstrap step per episode chunk (outside the loss) that repeats the previous
            # step's model outputs. The env runners ship those steps' own states (rec_rllib.rl.connectors) and
            # the learner connector flags the rows still without one; lacking that column, every appended row
            # is encoded here from its own observation.
            redo = None
            if BOOTSTRAP_STATE_MISSING in batch:
                redo = batch[BOOTSTRAP_STATE_MISSING].bool().reshape(-1)
            elif Columns.LOSS_MASK in batch:
                redo = ~batch[Columns.LOSS_MASK].bool().reshape(-1)
            if redo is not None and bool(redo.any()):
                with torch.no_grad():
                    state = state.clone()
                    state[redo] = self._encode({k: v[redo] for k, v in obs.items()}, self.net)
            return state

        # forward_train, then forward_target: the same batch, completed once
        return self._once_per_batch(USER_STATE, (shipped,), completed)

    def _once_per_batch(self, name: str, inputs: tuple, build) -> torch.Tensor:
        """``build()``, formed once per batch of observations (as long as ``inputs`` are the same tensors, not
        changed in place): exploration, and the online, target and reference passes of a train batch, read
        the same rows."""
        key = _batch_key(*inputs)
        cached = self._per_batch.get(name)
        if cached is None or not _same_key(cached[0], key):
            cached = self._per_batch[name] = (key, build())
        return cached[1]

    def _legal_actions(self, obs: dict[str, Any]) -> torch.Tensor:
        """[B, n_items] the batch's action mask (:func:`~rec_rllib.rl.obs.legal_actions`)."""
        return self._once_per_batch(
            Obs.CONSUMED, (obs[Obs.CONSUMED],), lambda: legal_actions(obs, self.net.n_items)
        )

    def _feature(self, obs: dict[str, Any], items_key: str, values_key: str) -> torch.Tensor:
        """[B, n_items] a sparse feature of the observation over the catalogue
        (:func:`~rec_rllib.rl.obs.dense_feature`)."""
        return self._once_per_batch(
            values_key,
            (obs[items_key], obs[values_key]),
            lambda: dense_feature(obs, items_key, values_key, self.net.n_items),
        )

    def _logits(
        self,
        state: torch.Tensor,
        obs: dict[str, Any],
        net: TextSeqRec,
        *,
        terms: bool = True,
        exposure: bool = True,
    ) -> torch.Tensor:
        """Masked logits: the network's scores, then (``terms``) the learned exposure (``exposure``) and
        co-occurrence terms."""
        logits = net.scores_from_state(state, self._item_matrix(net))
        old = net is getattr(self, "_old_net", None)  # the target network's pass: its copies of the terms
        if terms and exposure and self.exposure_term is not None:
            term = self._old_exposure_term if old else self.exposure_term
            logits = term(logits, self._feature(obs, Obs.EXPOSED_ITEMS, Obs.EXPOSURE))
        if terms and self.cooccurrence_term is not None:
            term = self._old_cooccurrence_term if old else self.cooccurrence_term
            logits = term(logits, self._feature(obs, Obs.COOCCURRING_ITEMS, Obs.COOCCURRENCE))
        return logits.masked_fill(~self._legal_actions(obs), MASK_VALUE)

    # -- a policy over candidates ---------------------------------------------------------------------------
    def _candidate_logits(
        self, state: torch.Tensor, obs: dict[str, Any], net: TextSeqRec
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Acting (no gradient): ([B, K] candidate items, [B, K] their masked logits). The candidates are the
        K legal items with the highest scores before the exposure term (the network's scores plus the
        co-occurrence term): the scores over the catalogue are formed once, for the choice, and the logits
        are read from them."""
        searched = self._searched_candidates(state, obs, net) if self.searches_index else None
        if searched is not None:
            candidates, logits = searched
        else:
            before = self._logits(state, obs, net, exposure=False)
            candidates = torch.topk(before, self.n_candidates, dim=-1, sorted=False).indices
            logits = before.gather(1, candidates)
        if self.exposure_term is not None:
            logits = self.exposure_term(logits, feature_at(obs, Obs.EXPOSED_ITEMS, Obs.EXPOSURE, candidates))
        return candidates, logits

    def _searched_candidates(
        self, state: torch.Tensor, obs: dict[str, Any], net: TextSeqRec
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """:meth:`_candidate_logits`' choice through the item index. The pool: the K + (consumed items) items
        with the highest network scores the index finds and, with a co-occurrence term, the K items the
        feature rates highest (an item it lifts into the top K need not be among the first); each pool item
        scored exactly (the term added, consumed ones masked); the K best of those. Reading every cluster,
        these are exact search's candidates whenever the feature lists at most K items. None when a probe
        found too few items for a row (tiny clusters): the batch then scores every item."""
        consumed = torch.as_tensor(obs[Obs.CONSUMED])
        n = net.n_items
        pool_size = min(n, self.n_candidates + int((consumed < n).sum(dim=1).max()))
        scores, pool = self._item_index(net).search(net.score_query(state), pool_size, self._offsets(net))
        if bool((pool == n).any()):
            return None
        if self.cooccurrence_term is not None:
            listed = torch.as_tensor(obs[Obs.COOCCURRING_ITEMS]).long()
            rated = torch.as_tensor(obs[Obs.COOCCURRENCE]).float()
            top = torch.topk(rated, min(self.n_candidates, rated.shape[1]), dim=1).indices
            lifted = listed.gather(1, top)  # padded with n
            lifted_scores = net.scores_from_state(state, idx=lifted.clamp(max=n - 1))
            pool = torch.cat([pool, lifted], dim=1)
            scores = torch.cat([scores, lifted_scores.masked_fill(lifted == n, -torch.inf)], dim=1)
            # an item both found and lifted counts once: every copy after the first is masked
            ordered, order = pool.sort(dim=1, stable=True)
            again = torch.zeros_like(pool, dtype=torch.bool)
            again.scatter_(1, order[:, 1:], ordered[:, 1:] == ordered[:, :-1])
            scores = self.cooccurrence_term(
                scores.masked_fill(again, -torch.inf),
                feature_at(obs, Obs.COOCCURRING_ITEMS, Obs.COOCCURRENCE, pool),
            )
        scores = scores.masked_fill(~legal_at(obs, pool.clamp(max=n - 1)) | scores.isinf(), MASK_VALUE)
        best = torch.topk(scores, self.n_candidates, dim=-1, sorted=False)
        return pool.gather(1, best.indices), best.values

    def _item_index(self, net: TextSeqRec) -> ItemIndex:
        """The index of the online network's item vectors, built on first use and again when they change."""
        items = self._item_matrix(net)
        if self._index is None or self._index[0] is not items:
            with torch.no_grad():
                self._index = (items, ItemIndex(items, net.item_offsets(), probe=self.candidate_probe))
        return self._index[1]

    def _offsets(self, net: TextSeqRec) -> torch.Tensor:
        """[n_items] the items' additive score terms now (RL trains the bias), once per set of weights."""
        inputs = (net.bias, net.popularity_weight) if net.state_head is not None else (net.bias,)
        with torch.no_grad():
            return self._once_per_batch("item_offsets", inputs, net.item_offsets)

    def _logits_at(
        self,
        state: torch.Tensor,
        obs: dict[str, Any],
        net: TextSeqRec,
        candidates: torch.Tensor,
        *,
        terms: bool = True,
    ) -> torch.Tensor:
        """[B, K] masked logits of each row's candidate items (what :meth:`_logits` gives at those items), at
        a cost that follows the candidates: the learner's online, target and reference passes."""
        vectors = self._candidate_vectors(net, candidates)
        logits = net.scores_from_state(state, idx=candidates.long(), vectors=vectors)
        old = net is getattr(self, "_old_net", None)
        # the terms in the order acting adds them (co-occurrence with the scores, then exposure)
        if terms and self.cooccurrence_term is not None:
            term = self._old_cooccurrence_term if old else self.cooccurrence_term
            logits = term(logits, self._feature_at(obs, Obs.COOCCURRING_ITEMS, Obs.COOCCURRENCE, candidates))
        if terms and self.exposure_term is not None:
            term = self._old_exposure_term if old else self.exposure_term
            logits = term(logits, self._feature_at(obs, Obs.EXPOSED_ITEMS, Obs.EXPOSURE, candidates))
        return logits.masked_fill(~self._legal_at(obs, candidates), MASK_VALUE)

    def _legal_at(self, obs: dict[str, Any], candidates: torch.Tensor) -> torch.Tensor:
        """[B, K] whether each row's candidates may be recommended (:func:`~rec_rllib.rl.obs.legal_at`), once
        per batch."""
        return self._once_per_batch(
            "legal_candidates", (obs[Obs.CONSUMED], candidates), lambda: legal_at(obs, candidates)
        )

    def _feature_at(
        self, obs: dict[str, Any], items_key: str, values_key: str, candidates: torch.Tensor
    ) -> torch.Tensor:
        """[B, K] a listed feature at each row's candidates (:func:`~rec_rllib.rl.obs.feature_at`), once per
        batch."""
        return self._once_per_batch(
            f"{values_key}_candidates",
            (obs[items_key], obs[values_key], candidates),
            lambda: feature_at(obs, items_key, values_key, candidates),
        )

    def _candidate_vectors(self, net: TextSeqRec, candidates: torch.Tensor) -> torch.Tensor:
        """[B, K, H] the item vectors of each row's candidates: with frozen items gathered once per batch (the
        online, target and reference passes and the backward pass read the same), end to end each network's
        own, computed for those items only."""
        if self.train_encoder:
            idx = candidates.long()
            return net.item_rows(idx.reshape(-1)).reshape(*idx.shape, -1)
        items = self._item_matrix(net)
        return self._once_per_batch(CANDIDATES, (candidates,), lambda: self._gather_rows(items, candidates))

    def _gather_rows(self, items: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """``items[candidates]``, [B, K, H], written into a buffer kept from batch to batch: a new array each
        batch (128 MB for 500 states of 512 candidates) is fresh memory from the OS every time, whose first
        writes cost three times the gather itself. The batch's passes are done before the next batch's
        gather overwrites it, and :meth:`_once_per_batch` keeps only the last batch's rows."""
        if items.requires_grad:
            return nn.functional.embedding(candidates.long(), items)
        n, hidden = candidates.numel(), items.shape[1]
        buf = self._gather_buffer
        if buf is None or buf.numel() < n * hidden or buf.dtype != items.dtype or buf.device != items.device:
            buf = self._gather_buffer = torch.empty(n * hidden, dtype=items.dtype, device=items.device)
        rows = buf[: n * hidden].view(n, hidden)
        torch.index_select(items, 0, candidates.reshape(-1).long(), out=rows)
        return rows.view(*candidates.shape, hidden)

    def _act_on_candidates(
        self, out: dict[str, Any], log_probs: torch.Tensor, candidates: torch.Tensor, *, explore: bool
    ) -> None:
        """The action drawn (or, not exploring, the arg-max) among the candidates, its log-probability, and
        the item it stands for, which the env receives (``ACTIONS_FOR_ENV``); the episode keeps the index,
        which the learner's log-probabilities are of."""
        if explore:  # the draw RLlib's GetActions would make from these inputs
            dist = self.get_exploration_action_dist_cls().from_logits(log_probs)
            actions = dist.sample()
            out[Columns.ACTION_LOGP] = dist.logp(actions)
        else:
            actions = log_probs.argmax(dim=-1)
        out[Columns.ACTIONS] = actions
        out[Columns.ACTIONS_FOR_ENV] = candidates.gather(1, actions[:, None]).squeeze(1)
        out[CANDIDATES] = candidates.int()

    def _acting_logits(
        self, state: torch.Tensor, obs: dict[str, Any]
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(candidates or None, masked logits) the online network acts on: over each state's candidates for a
        policy over candidates, over the catalogue otherwise."""
        if self.n_candidates:
            return self._candidate_logits(state, obs, self.net)
        return None, self._logits(state, obs, self.net)

    def _learner_logits(
        self, state: torch.Tensor, obs: dict[str, Any], net: TextSeqRec, candidates: torch.Tensor | None
    ) -> torch.Tensor:
        """A learner pass's masked logits: at the shipped candidates, or over the catalogue (None)."""
        if candidates is None:
            return self._logits(state, obs, net)
        return self._logits_at(state, obs, net, candidates)

    def _shipped_candidates(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """A train batch's candidates (None for a catalogue-wide policy): its actions index them."""
        if not self.n_candidates:
            return None
        if CANDIDATES not in batch:
            raise ValueError(
                f"a policy over {self.n_candidates} candidates learns from the candidates each step acted "
                f"among (the {CANDIDATES!r} column of the train batch, which the env runners record); the "
                f"batch has {sorted(batch)}"
            )
        return batch[CANDIDATES]

    def _reference_logits(
        self, batch: dict[str, Any], state: torch.Tensor, candidates: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """The fine-tuned policy's masked logits (over ``candidates`` [B, K] when given), or None without a
        reference."""
        obs = batch[Columns.OBS]
        with torch.no_grad():
            if getattr(self, "_ref_net", None) is not None:
                # the fine-tuned policy has neither learned term
                ref_state = self._encode(obs, self._ref_net)
                if candidates is not None:
                    return self._logits_at(ref_state, obs, self._ref_net, candidates, terms=False)
                return self._logits(ref_state, obs, self._ref_net, terms=False)
            if getattr(self, "_ref_offsets", None) is None:
                return None
            # frozen encoder: the fine-tuned policy is the state through the identity head, fine-tuned bias
            if candidates is not None:
                vectors = self._candidate_vectors(self.net, candidates)
                # [B, 1, H] x [B, H, K], as TextSeqRec.scores_from_state multiplies (the matrix-vector form
                # is 2-3x slower on CPU)
                logits = torch.bmm(state.detach().unsqueeze(1), vectors.transpose(1, 2)).squeeze(1)
                logits = logits + self._ref_offsets[candidates.long()]
                return logits.masked_fill(~self._legal_at(obs, candidates), MASK_VALUE)
            logits = state.detach() @ self._item_matrix(self.net).T + self._ref_offsets
            return logits.masked_fill(~self._legal_actions(obs), MASK_VALUE)

    # -- the three forward paths -----------------------------------------------------------------------------
    @override(TorchRLModule)
    def _forward_inference(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        with torch.no_grad():
            obs = batch[Columns.OBS]
            candidates, logits = self._acting_logits(self._encode(obs, self.net), obs)
            if candidates is not None:
                out = {Columns.ACTION_DIST_INPUTS: logits}
                self._act_on_candidates(out, logits, candidates, explore=False)
                return out
        return {Columns.ACTION_DIST_INPUTS: logits}

    @override(TorchRLModule)
    def _forward_exploration(self, batch: dict[str, Any], t: int = 0, **kwargs) -> dict[str, Any]:
        obs = batch[Columns.OBS]
        with torch.no_grad():
            out: dict[str, Any] = {}
            if self.exploration.strategy == "thompson" and self.train_encoder:
                # one posterior sample: the whole network with (MC) dropout active
                was_training = self.net.training
                self._set_dropout(on=True)
                self.net.train()
                try:
                    state = self._encode(obs, self.net)
                    candidates, logits = self._acting_logits(state, obs)
                finally:
                    self.net.train(was_training)
                    self._set_dropout(on=False)
            else:
                state = self._encode(obs, self.net)
                if not self.train_encoder:
                    out[USER_STATE] = state  # the learner scores from it instead of re-encoding
                    if self.exploration.strategy == "thompson":
                        # one posterior sample of the final layer: MC dropout on the user state
                        state = nn.functional.dropout(state, p=self.net.cfg.dropout, training=True)
                candidates, logits = self._acting_logits(state, obs)
            mask = self._legal_actions(obs) if candidates is None else logits > MASK_VALUE / 2
            if self.exploration.strategy == "ucb":
                logits = logits + self._ucb_stats(state).bonus(state, candidates)
            log_probs = behaviour_log_probs(logits, self.exploration, step=int(t), allowed=mask)
            if self.exploration.strategy == "ucb":
                # deterministic: the arg-max is the action RLlib will draw from these log-probabilities
                acted = log_probs.argmax(dim=-1)
                self._ucb.update(state, acted if candidates is None else candidates.gather(1, acted[:, None]))
            if self.policy_settings.train_behaviour_policy:
                # the temperature that acted, so the learner optimises that very distribution (PPO)
                temperature = self.exploration.temperature_at(int(t))
                out[BEHAVIOUR_TEMPERATURE] = torch.full((logits.shape[0],), temperature, device=logits.device)
        # finite everywhere: the Categorical distribution needs no -inf
        out[Columns.ACTION_DIST_INPUTS] = log_probs.clamp(min=MASK_VALUE)
        if self.n_candidates:
            self._act_on_candidates(out, out[Columns.ACTION_DIST_INPUTS], candidates, explore=True)
        return out

    def _ucb_stats(self, state: torch.Tensor) -> LinUCB:
        shared = getattr(self, UCB_STATS, None)
        if self._ucb is None:
            self._ucb = LinUCB(
                self.net.n_items, state.shape[-1], alpha=self.exploration.ucb_alpha, a_diag=shared
            )
        elif shared is not None:
            self._ucb.a_diag = shared  # the buffer is replaced when the module moves to another device
        return self._ucb

    def record_ucb(self, states: torch.Tensor, items: torch.Tensor, *, weight: float = 1.0) -> None:
        """Learner side: add (state, item) pairs, each counted ``weight`` times, to the synced statistics."""
        self._ucb_stats(states).update(states, items, weight=weight)

    @override(TorchRLModule)
    def _forward_train(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        if Columns.NEXT_OBS in batch:  # DQN: Q-values of this and the next step, and the target net's
            return self._q_forward_train(batch)
        state = self._user_state(batch)
        candidates = self._shipped_candidates(batch)
        logits = self._learner_logits(state, batch[Columns.OBS], self.net, candidates)
        ref = self._reference_logits(batch, state, candidates)
        if BEHAVIOUR_TEMPERATURE in batch:
            # PPO: the policy is the tempered softmax that acted (Boltzmann / Thompson), not the plain one,
            # or its ratio pi/mu compares two different distributions and the clipping skews the update
            temperature = batch[BEHAVIOUR_TEMPERATURE].float().reshape(-1, 1)
            logits = logits / temperature
            ref = None if ref is None else ref / temperature
        out = {Columns.ACTION_DIST_INPUTS: logits, Columns.EMBEDDINGS: state}
        if ref is not None:
            out[REF_LOGITS] = ref
        return out

    def _q_forward_train(self, batch: dict[str, Any]) -> dict[str, Any]:
        """DQN reads the catalogue scores as Q-values (Q(s, a) = score of item a given the history): one
        online pass over [obs; next_obs] (double Q picks the next action online) and one target pass."""
        obs, nxt = batch[Columns.OBS], batch[Columns.NEXT_OBS]
        both = {k: torch.cat([obs[k], nxt[k]], dim=0) for k in obs}
        state = self._user_state({Columns.OBS: both})
        q_now, q_next = torch.chunk(self._logits(state, both, self.net), 2, dim=0)
        with torch.no_grad():
            next_state = (
                self._encode(nxt, self._old_net) if self.train_encoder else torch.chunk(state, 2, dim=0)[1]
            )
            q_target_next = self._logits(next_state, nxt, self._old_net)
        return {QF_PREDS: q_now, QF_NEXT_PREDS: q_next, QF_TARGET_NEXT_PREDS: q_target_next}

    # -- APIs of the algorithms -----------------------------------------------------------------------------
    @override(ValueFunctionAPI)
    def compute_values(self, batch: dict[str, Any], embeddings: Any = None) -> torch.Tensor:
        if embeddings is None:
            with torch.no_grad() if not self.train_encoder else contextlib.nullcontext():
                embeddings = self._user_state(batch)
        return self.value_head(embeddings.detach()).squeeze(-1)

    @override(TargetNetworkAPI)
    def make_target_networks(self) -> None:
        self._old_net = make_target_network(self.net)
        if self.exposure_term is not None:
            self._old_exposure_term = make_target_network(self.exposure_term)
        if self.cooccurrence_term is not None:
            self._old_cooccurrence_term = make_target_network(self.cooccurrence_term)

    @override(TargetNetworkAPI)
    def get_target_network_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        if self.train_encoder:
            pairs = [(self.net, self._old_net)]
        else:
            pairs = [(_TrainedParts(self.net), _TrainedParts(self._old_net))]
        if self.exposure_term is not None:
            pairs.append((self.exposure_term, self._old_exposure_term))
        if self.cooccurrence_term is not None:
            pairs.append((self.cooccurrence_term, self._old_cooccurrence_term))
        return pairs

    @override(TargetNetworkAPI)
    def forward_target(self, batch: dict[str, Any]) -> dict[str, Any]:
        obs = batch[Columns.OBS]
        # frozen encoder: the same user state, only the head differs
        state = self._encode(obs, self._old_net) if self.train_encoder else self._user_state(batch)
        candidates = self._shipped_candidates(batch)
        return {
            TARGET_NETWORK_ACTION_DIST_INPUTS: self._learner_logits(state, obs, self._old_net, candidates)
        }

    @override(InferenceOnlyAPI)
    def get_non_inference_attributes(self) -> list[str]:
        return [
            "value_head",
            "_ref_net",
            "_old_net",
            "_ref_offsets",
            "_old_exposure_term",
            "_old_cooccurrence_term",
        ]
