"""RLlib training of the fine-tuned transformer: module paths, APPO/PPO, checkpoints, multi-node sharding."""

from __future__ import annotations

import copy
import json
import os
import signal
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.training_data import TrainingData
from safetensors.torch import load_file

from rec_rllib.columns import Obs, Tokens
from rec_rllib.data.dataset import LogDataset
from rec_rllib.env import EnvConfig, LogReplayEnv
from rec_rllib.eval import evaluate_ranking
from rec_rllib.explore import ExplorationConfig
from rec_rllib.exposure import ExposureConfig
from rec_rllib.models import load_recommender
from rec_rllib.rl.algo import build_algo_config
from rec_rllib.rl.columns import UCB_STATS
from rec_rllib.rl.config import RLTrainConfig
from rec_rllib.rl.module import MASK_VALUE, RecPolicyModule, model_config_from_run
from rec_rllib.rl.obs import candidate_count, legal_actions
from rec_rllib.rl.policy import (
    COOCCURRENCE_GAMMA_GRID,
    CooccurrenceRecommender,
    cooccurrence_feature,
    cooccurrence_weight,
    exposure_weight,
    load_policy_module,
    load_policy_recommender,
)
from rec_rllib.rl.replay_eval import (
    current_module,
    paired_gain,
    random_policy,
    replay_returns,
    sampling_policy,
)
from rec_rllib.rl.train import train
from serving.scorer import PolicyScorer


def _obs_batch(env: LogReplayEnv, n: int = 8) -> dict[str, torch.Tensor]:
    obs = []
    for seed in range(n):
        o, _ = env.reset(seed=seed)
        obs.append(o)
    return {k: torch.as_tensor(np.stack([o[k] for o in obs])) for k in obs[0]}


def _module(
    finetuned_run: str,
    env: LogReplayEnv,
    *,
    train_encoder: bool = False,
    counts=None,
    settings: dict | None = None,
    **exploration,
) -> RecPolicyModule:
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    mc = model_config_from_run(finetuned_run, exploration=exploration)
    mc.update(train_encoder=train_encoder, item_counts=counts, **(settings or {}))
    spec = RLModuleSpec(
        module_class=RecPolicyModule,
        observation_space=env.observation_space,
        action_space=env.action_space,
        model_config=mc,
    )
    return spec.build()


def test_metrics_history_survives_a_resume_that_adds_columns(tmp_path):
    """A run resumed from an older version's train_metrics.csv (fewer columns) writes every column, and can
    be resumed again."""
    from rec_rllib.rl.report import read_history, write_history

    write_history(tmp_path, [{"iteration": 1.0, "q_loss": 0.5}, {"iteration": 2.0, "q_loss": 0.4}])
    history = read_history(tmp_path, 1)  # resumed at iteration 1
    history.append({"iteration": 2.0, "q_loss": 0.3, "next_item_ce": 5.2})
    write_history(tmp_path, history)
    again = read_history(tmp_path, 2)
    assert [r["iteration"] for r in again] == [1.0, 2.0] and again[1]["next_item_ce"] == 5.2
    assert np.isnan(again[0]["next_item_ce"]) and again[0]["q_loss"] == 0.5
    assert read_history(tmp_path / "none", 3) == []


def test_dqn_anchor_reads_the_logged_next_item_from_the_next_observation(ml_dir):
    """What RecDQNLearner's cross-entropy targets: the item the log advanced by, whatever was recommended,
    also once the window is full and slides."""
    from rec_rllib.rl.learners import logged_next_items

    env = LogReplayEnv({"dataset": ml_dir, "window": 4, "episode_len": 12})
    _, info = env.reset(seed=3)
    items, _ = env.histories[info["user"]]
    expected, nexts = [], []
    for step in range(12):
        expected.append(int(items[env._pos]))
        obs, _, term, trunc, _ = env.step((step * 97) % env.n_items)  # arbitrary recommendations
        nexts.append(obs)
        if term or trunc:
            break
    batch = {k: torch.as_tensor(np.stack([o[k] for o in nexts])) for k in nexts[0]}
    assert len(expected) > 4  # the window slid
    assert logged_next_items(batch).tolist() == expected


def test_module_masks_consumed_items_in_every_path(finetuned_run, ml_dir):
    env = LogReplayEnv({"dataset": ml_dir, "window": 30})
    module = _module(finetuned_run, env, strategy="boltzmann", temperature=1.0)
    batch = {Columns.OBS: _obs_batch(env)}
    mask = legal_actions(batch[Columns.OBS], env.n_items)
    for out in (
        module.forward_inference(dict(batch)),
        module.forward_exploration(dict(batch), t=0),
        module.forward_train(dict(batch)),
    ):
        logits = out[Columns.ACTION_DIST_INPUTS]
        assert logits.shape == mask.shape
        assert (logits[~mask] <= MASK_VALUE / 2).all()
    values = module.compute_values(dict(batch))
    assert values.shape == (8,)


@pytest.mark.parametrize("strategy", ["boltzmann", "epsilon"])
def test_the_consumed_items_give_the_dense_mask_s_actions_and_log_probabilities(
    strategy, finetuned_run, ml_dir
):
    """The observation lists the consumed items instead of masking the catalogue; fed through the module, a
    batch gives the same logits, behaviour log-probabilities and greedy actions as the catalogue-wide mask
    formed from each replayed user's history (the observation the env used to carry), for users whose
    consumed items fill the list and overflow it (only the most recent are then listed)."""
    from rec_rllib.explore import behaviour_log_probs

    env = LogReplayEnv({"dataset": ml_dir, "window": 30, "mask_items": 64})
    module = _module(finetuned_run, env, strategy=strategy, temperature=0.7, epsilon=0.2, epsilon_final=0.2)
    rows = []
    for seed in range(24):
        env.reset(seed=seed)
        dense = np.ones(env.n_items, dtype=bool)
        dense[env._items[: env._pos][-64:]] = False  # what the old observation's mask held, last 64 items
        rows.append(dense)
    obs = _obs_batch(env, 24)
    dense = torch.as_tensor(np.stack(rows))
    assert torch.equal(legal_actions(obs, env.n_items), dense)
    lengths = (obs[Obs.CONSUMED] < env.n_items).sum(1)
    assert (lengths == 64).any() and (lengths < 64).any()  # full lists and short ones
    inference = module.forward_inference({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS]
    with torch.no_grad():
        raw = module.net.scores_from_state(module._encode(obs, module.net), module._item_matrix(module.net))
    reference = raw.masked_fill(~dense, MASK_VALUE)
    assert torch.equal(inference, reference) and torch.equal(inference.argmax(-1), reference.argmax(-1))
    explore = module.forward_exploration({Columns.OBS: obs}, t=0)[Columns.ACTION_DIST_INPUTS]
    expected = behaviour_log_probs(reference, module.exploration, step=0, allowed=dense).clamp(min=MASK_VALUE)
    assert torch.equal(explore, expected)


def test_the_listed_features_give_the_catalogue_wide_features_actions_and_log_probabilities(
    finetuned_run, ml_dir
):
    """The exposure counts and the co-occurrence probabilities travel as lists of (item, value); fed through
    the module with learned weights on both, a batch gives the same features over the catalogue, logits,
    behaviour log-probabilities and greedy actions as the catalogue-wide vectors the env used to carry (the
    runner's counts as they stood, the simulator's leave-user-out probabilities)."""
    from rec_rllib.explore import behaviour_log_probs
    from rec_rllib.rl.obs import dense_feature

    cfg = {"dataset": ml_dir, "window": 30, "seed": 41, "exposure_cost": 0.5, "cooccurrence": True}
    env = LogReplayEnv(cfg)
    terms = {"exposure_window": env.cfg.exposure_window, "cooccurrence": True}
    module = _module(finetuned_run, env, settings=terms, strategy="boltzmann", temperature=0.7)
    with torch.no_grad():  # as learned: β 0.8, γ 3
        module.exposure_term.weight.fill_(0.08)
        module.cooccurrence_term.weight.fill_(0.3)
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(400):  # the runner's recommendations so far: some items often, many once
        env.step(int(rng.zipf(1.5) % env.n_items))
    obs_rows, exposure_rows, co_rows = [], [], []
    for seed in range(1, 25):
        o, _ = env.reset(seed=seed)
        if env._pos == 0:
            continue  # an empty window: the old feature was a flat 0.01, which moves no item against another
        obs_rows.append(o)
        exposure_rows.append(np.log1p(env.exposure.counts).astype(np.float32))
        recent = env._items[max(0, env._pos - env.cfg.cooccurrence_window) : env._pos]
        co_rows.append(env.simulator.probabilities(recent, without=env._items).astype(np.float32))
    obs = {k: torch.as_tensor(np.stack([o[k] for o in obs_rows])) for k in obs_rows[0]}
    exposure, co = torch.as_tensor(np.stack(exposure_rows)), torch.as_tensor(np.stack(co_rows))
    assert (exposure > 0).sum(1).min() > 50
    assert torch.equal(dense_feature(obs, Obs.EXPOSED_ITEMS, Obs.EXPOSURE, env.n_items), exposure)
    assert torch.equal(dense_feature(obs, Obs.COOCCURRING_ITEMS, Obs.COOCCURRENCE, env.n_items), co)
    mask = legal_actions(obs, env.n_items)
    with torch.no_grad():
        raw = module.net.scores_from_state(module._encode(obs, module.net), module._item_matrix(module.net))
        terms = module.cooccurrence_term(module.exposure_term(raw, exposure), co)
    reference = terms.masked_fill(~mask, MASK_VALUE)
    inference = module.forward_inference({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS]
    assert torch.equal(inference, reference) and torch.equal(inference.argmax(-1), reference.argmax(-1))
    assert not torch.equal(reference.argmax(-1), raw.masked_fill(~mask, MASK_VALUE).argmax(-1))  # terms act
    explore = module.forward_exploration({Columns.OBS: obs}, t=0)[Columns.ACTION_DIST_INPUTS]
    expected = behaviour_log_probs(reference, module.exploration, step=0, allowed=mask).clamp(min=MASK_VALUE)
    assert torch.equal(explore, expected)


def _after_recommendations(env: LogReplayEnv, rows: int = 24) -> dict[str, torch.Tensor]:
    """A batch of observations of users replayed after 400 recommendations in Zipf proportions (many items on
    display, some often)."""
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(400):
        env.step(int(rng.zipf(1.5) % env.n_items))
    obs_rows = [env.reset(seed=seed)[0] for seed in range(1, rows + 1)]
    return {k: torch.as_tensor(np.stack([o[k] for o in obs_rows])) for k in obs_rows[0]}


def _one_runner_ucb_algo(finetuned_run: str, env: EnvConfig, **settings):
    """APPO under UCB with one env runner of 4 envs and train batches of 80 steps, built (not trained)."""
    cfg = RLTrainConfig(
        finetuned=finetuned_run,
        exploration=ExplorationConfig(strategy="ucb"),
        num_env_runners=1,
        num_envs_per_env_runner=4,
        train_batch_size=80,
        env=env,
        **settings,
    )
    return build_algo_config(cfg, model_config_from_run(finetuned_run)).build_algo()


def test_a_policy_over_candidates_acts_and_learns_as_the_catalogue_policy_at_its_candidates(
    finetuned_run, ml_dir
):
    """With ``candidate_items`` K below the catalogue, each state's candidates are its K best legal items by
    the scores before the exposure term; acting, the learner's online, target and reference passes and the
    behaviour log-probabilities give, at those items, what the catalogue-wide policy gives there; the env
    receives the item the drawn index stands for. K at least the catalogue: the catalogue-wide policy."""
    from rec_rllib.explore import behaviour_log_probs
    from rec_rllib.rl.columns import CANDIDATES, REF_LOGITS, USER_STATE
    from rec_rllib.rl.obs import dense_feature

    cfg = {"dataset": ml_dir, "window": 30, "seed": 41, "exposure_cost": 0.5, "cooccurrence": True}
    env = LogReplayEnv(cfg)
    k = 100
    terms = {"exposure_window": env.cfg.exposure_window, "cooccurrence": True, "ref_kl_coeff": 0.05}
    whole = _module(finetuned_run, env, settings=terms, strategy="boltzmann", temperature=0.7)
    assert whole.n_candidates == 0
    assert _module(finetuned_run, env, settings={"candidate_items": env.n_items}).n_candidates == 0
    assert _module(finetuned_run, env, settings={"candidate_items": "auto"}).n_candidates == 0  # 1,682 items
    assert [candidate_count("auto", n) for n in (4096, 4097)] == [0, 512]
    module = _module(
        finetuned_run, env, settings={**terms, "candidate_items": k}, strategy="boltzmann", temperature=0.7
    )
    assert module.n_candidates == k
    for m in (whole, module):
        with torch.no_grad():  # as learned: β 0.8, γ 3, a trained map and bias
            m.exposure_term.weight.fill_(0.08)
            m.cooccurrence_term.weight.fill_(0.3)
            m.net.state_head.weight.add_(
                0.01 * torch.randn(m.net.state_head.weight.shape, generator=torch.Generator().manual_seed(3))
            )
            m.net.bias.add_(0.1)
        m.make_target_networks()
    obs = _after_recommendations(env)
    state = whole._encode(obs, whole.net)
    full = whole.forward_inference({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS]
    before = full + whole.exposure_term.beta * dense_feature(
        obs, Obs.EXPOSED_ITEMS, Obs.EXPOSURE, env.n_items
    )
    before = before.masked_fill(~legal_actions(obs, env.n_items), MASK_VALUE)
    out = module.forward_inference({Columns.OBS: obs})
    cand = out[CANDIDATES].long()
    assert cand.shape == (len(state), k) and out[Columns.ACTION_DIST_INPUTS].shape == (len(state), k)
    # the candidates: the K best before the exposure term, all legal; the exposure term acts within them
    assert torch.equal(cand.sort(1).values, torch.topk(before, k).indices.sort(1).values)
    assert (before.gather(1, cand) > MASK_VALUE / 2).all()
    assert torch.allclose(out[Columns.ACTION_DIST_INPUTS], full.gather(1, cand), atol=1e-4)
    assert torch.equal(out[Columns.ACTIONS_FOR_ENV], cand.gather(1, out[Columns.ACTIONS][:, None]).squeeze(1))
    assert not torch.equal(out[Columns.ACTIONS_FOR_ENV], before.argmax(-1))  # the exposure term acts
    # acting: the behaviour log-probabilities over the candidates; the env gets the drawn index's item
    explore = module.forward_exploration({Columns.OBS: obs}, t=0)
    logp = explore[Columns.ACTION_DIST_INPUTS]
    expected = behaviour_log_probs(full.gather(1, cand), module.exploration, step=0).clamp(min=MASK_VALUE)
    assert torch.equal(explore[CANDIDATES], out[CANDIDATES])
    assert torch.allclose(logp, expected, atol=1e-4)
    acted = explore[Columns.ACTIONS]
    assert torch.allclose(explore[Columns.ACTION_LOGP], logp.gather(1, acted[:, None]).squeeze(1))
    assert torch.equal(explore[Columns.ACTIONS_FOR_ENV], cand.gather(1, acted[:, None]).squeeze(1))
    # learning: the online, target and reference logits at the shipped candidates
    batch = {Columns.OBS: obs, USER_STATE: explore[USER_STATE], CANDIDATES: explore[CANDIDATES]}
    train = module.forward_train(batch)
    assert torch.allclose(train[Columns.ACTION_DIST_INPUTS], full.gather(1, cand), atol=1e-4)
    whole_train = whole.forward_train({Columns.OBS: obs, USER_STATE: state})
    assert torch.allclose(train[REF_LOGITS], whole_train[REF_LOGITS].gather(1, cand), atol=1e-4)
    target = module.forward_target(batch)
    whole_target = whole.forward_target({Columns.OBS: obs, USER_STATE: state})
    key = next(iter(target))
    assert torch.allclose(target[key], whole_target[key].gather(1, cand), atol=1e-4)
    with pytest.raises(ValueError, match="learns from the candidates each step acted among"):
        module.forward_train({Columns.OBS: obs, USER_STATE: explore[USER_STATE]})
    train[Columns.ACTION_DIST_INPUTS].logsumexp(-1).sum().backward()  # the trained head gets a gradient
    assert module.net.state_head.weight.grad.abs().sum() > 0 and module.exposure_term.weight.grad != 0


def test_candidates_from_the_item_index_are_the_exact_ones_when_every_cluster_is_read_and_score_exactly(
    finetuned_run, ml_dir
):
    """``candidate_search="ivf"``: reading every cluster, the index gives each state the candidates exact
    search gives (the co-occurrence feature listing fewer items than the candidates); reading few, each
    candidate is still legal, once per row, and scored as the learner scores it at the shipped candidates
    (co-occurrence term, a bias moved since the index was built). The index is built once and kept while
    only the trained head changes."""
    from rec_rllib.retrieval import ItemIndex, uses_index
    from rec_rllib.rl.columns import CANDIDATES, USER_STATE

    cfg = {
        "dataset": ml_dir,
        "window": 30,
        "seed": 41,
        "exposure_cost": 0.5,
        "cooccurrence": True,
        "feature_items": 64,
    }
    env = LogReplayEnv(cfg)
    terms = {"exposure_window": env.cfg.exposure_window, "cooccurrence": True, "candidate_items": 100}
    assert [uses_index("auto", n) for n in (49_999, 50_000)] == [False, True]
    assert not _module(finetuned_run, env, settings=terms).searches_index  # "exact" when not set
    exact = _module(finetuned_run, env, settings=terms, strategy="boltzmann")
    every = _module(
        finetuned_run, env, settings={**terms, "candidate_search": "ivf", "candidate_probe": 10_000}
    )
    few = _module(finetuned_run, env, settings={**terms, "candidate_search": "ivf", "candidate_probe": 3})
    obs = _after_recommendations(env)
    for m in (exact, every, few):
        with torch.no_grad():
            m.exposure_term.weight.fill_(0.08)
            m.cooccurrence_term.weight.fill_(0.3)
    want = exact.forward_inference({Columns.OBS: obs})
    got = every.forward_inference({Columns.OBS: obs})
    assert every._index[1].probe == every._index[1].lists == 1682 // 39
    assert torch.equal(got[CANDIDATES].long().sort(1).values, want[CANDIDATES].long().sort(1).values)
    order_w, order_g = want[CANDIDATES].long().argsort(1), got[CANDIDATES].long().argsort(1)
    assert torch.allclose(
        got[Columns.ACTION_DIST_INPUTS].gather(1, order_g),
        want[Columns.ACTION_DIST_INPUTS].gather(1, order_w),
        atol=1e-4,
    )
    index = few._item_index(few.net)
    assert isinstance(index, ItemIndex) and index.probe == 3
    with torch.no_grad():  # RL moves the bias after the index was built
        few.net.bias.add_(0.5 * torch.randn(few.net.bias.shape, generator=torch.Generator().manual_seed(5)))
    explore = few.forward_exploration({Columns.OBS: obs}, t=0)
    assert few._item_index(few.net) is index  # kept: the item vectors did not change
    cand = explore[CANDIDATES].long()
    assert (cand.sort(1).values.diff(dim=1) > 0).all()  # distinct within a row
    assert legal_actions(obs, env.n_items).gather(1, cand).all()
    overlap = [len(set(a) & set(b)) for a, b in zip(cand.tolist(), want[CANDIDATES].tolist(), strict=True)]
    assert min(overlap) < 100  # three of 43 clusters: not the exact candidates
    batch = {Columns.OBS: obs, USER_STATE: explore[USER_STATE], CANDIDATES: explore[CANDIDATES]}
    acting = few.forward_inference({Columns.OBS: obs})
    assert torch.equal(acting[CANDIDATES], explore[CANDIDATES])
    learner = few.forward_train(batch)[Columns.ACTION_DIST_INPUTS]
    assert torch.allclose(acting[Columns.ACTION_DIST_INPUTS], learner, atol=1e-4)


@pytest.mark.parametrize("search", ["exact", "ivf"])
def test_env_runners_hand_the_env_the_candidate_item_and_the_learner_its_statistics(
    finetuned_run, ml_dir, local_ray, search
):
    """APPO with UCB over 64 candidates, chosen by scoring every item or from the item index: every step's
    action indexes its candidates, the env's exposure counts are the candidate items acted on (the env
    received the items, not the indices), and the learner adds those items to the synced UCB statistics."""
    from rec_rllib.rl.columns import CANDIDATES

    env = EnvConfig(dataset=ml_dir, window=30, exposure_cost=0.1, exposure_window=100_000)
    algo = _one_runner_ucb_algo(finetuned_run, env, candidate_items=64, candidate_search=search)

    def sample(runner):
        episodes = runner.sample(num_timesteps=200)
        indexed = runner.module._index is not None  # the runner's module searched its index
        return episodes, runner.env.unwrapped.envs[0].unwrapped.exposure.counts.copy(), indexed

    try:
        chunks, counts, indexed = algo.env_runner_group.foreach_env_runner(sample, local_env_runner=False)[0]
        assert indexed == (search == "ivf")
        items = []
        for e in chunks:
            actions = np.asarray(e.get_actions())
            candidates = np.asarray(e.get_extra_model_outputs(CANDIDATES))
            assert candidates.shape == (len(e), 64) and actions.max() < 64
            items.append(np.take_along_axis(candidates, actions[:, None], axis=1)[:, 0])
        learner = algo.learner_group._learner
        module = learner.module["default_policy"]
        learner._learner_connector(  # (appends each chunk's bootstrap step to the episodes)
            rl_module=learner.module, batch={}, episodes=chunks, shared_data={}, metrics=learner.metrics
        )
    finally:
        algo.stop()
    items = np.concatenate(items)
    assert items.max() >= 64  # item ids, not the indices into the candidates
    assert np.array_equal(np.bincount(items, minlength=len(counts)), counts)
    recorded = (getattr(module, UCB_STATS) - 1).sum(-1)
    assert torch.allclose(recorded, torch.as_tensor(counts).float(), atol=1e-3)


def test_env_runners_receive_only_what_rl_trains(finetuned_run, ml_dir):
    """The weights the learner sends the env runners (inference-only state) hold the policy head and item
    bias, not the frozen encoder and item vectors; an inference-only module given them acts exactly as the
    learner's module, and a checkpoint's (full) state still holds every weight."""
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    env = LogReplayEnv({"dataset": ml_dir, "window": 30})
    learner = _module(finetuned_run, env, strategy="boltzmann", temperature=1.0)
    with torch.no_grad():  # as after some RL updates
        learner.net.bias.add_(torch.randn_like(learner.net.bias))
        learner.net.state_head.weight.mul_(1.3)
    sent = learner.get_state(inference_only=True)
    full = learner.get_state()
    assert {k for k in sent if k.startswith("net.")} == {
        k
        for k in full
        if k.startswith(("net.bias", "net.state_head", "net.popularity_weight", "net.log_popularity"))
    }
    assert sum(np.asarray(v).nbytes for v in sent.values()) < 0.1 * sum(
        np.asarray(v).nbytes for v in full.values()
    )
    assert not any(k.startswith(("value_head.", "_old_net.")) for k in sent)  # the learner's own parts
    assert all(np.array_equal(v, full[k]) for k, v in sent.items())
    runner = RLModuleSpec(
        module_class=RecPolicyModule,
        observation_space=env.observation_space,
        action_space=env.action_space,
        model_config=learner.model_config,
        inference_only=True,
    ).build()
    runner.set_state(sent)
    obs = _obs_batch(env)
    assert torch.equal(
        runner.forward_inference({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS],
        learner.forward_inference({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS],
    )
    with pytest.raises(ValueError, match="lacks"):
        runner.set_state({k: v for k, v in sent.items() if not k.startswith("net.state_head")})


def test_copies_of_the_algorithm_config_share_the_fine_tuned_weights(finetuned_run, ml_dir):
    """RLlib deep-copies the algorithm config on every iteration: the weights inside the module's model config
    are shared, not copied, while pickling (to actors, into checkpoints) still carries them whole."""
    import pickle

    cfg = RLTrainConfig.from_dict({"finetuned": finetuned_run, "env": {"dataset": ml_dir}})
    config = build_algo_config(cfg, model_config_from_run(finetuned_run))
    weights = config.rl_module_spec.model_config["textseqrec"]["state"]
    copied = copy.deepcopy(config).rl_module_spec.model_config["textseqrec"]["state"]
    assert copied is weights
    back = pickle.loads(pickle.dumps(weights))
    assert back.keys() == weights.keys() and all(np.array_equal(back[k], v) for k, v in weights.items())


def test_the_target_network_update_averages_what_rl_trains(finetuned_run, ml_dir):
    """Frozen encoder: the target network's Polyak update pairs every parameter RL trains (policy head, item
    bias, popularity weight) and none of the frozen item vectors and text embeddings; after an update with
    tau = 1 the target network holds the online network's every weight."""
    from ray.rllib.core.learner.utils import update_target_network

    env = LogReplayEnv({"dataset": ml_dir, "window": 30})
    module = _module(finetuned_run, env, strategy="boltzmann", temperature=1.0)
    module.make_target_networks()
    with torch.no_grad():  # as after some RL updates
        module.net.bias.add_(torch.randn_like(module.net.bias))
        module.net.state_head.weight.mul_(1.3)
        module.net.popularity_weight.add_(0.5)
    pairs = module.get_target_network_pairs()
    paired = {id(p) for main, _ in pairs for p in main.parameters()}
    trained = [p for p in module.net.parameters() if p.requires_grad]
    assert trained and all(id(p) in paired for p in trained)
    assert sum(p.numel() for main, _ in pairs for p in main.parameters()) < 0.1 * sum(
        v.numel() for v in module.net.state_dict().values()
    )
    for main, target in pairs:
        update_target_network(main_net=main, target_net=target, tau=1.0)
    target = module._old_net.state_dict()
    assert all(torch.equal(v, target[k]) for k, v in module.net.state_dict().items())


def test_the_observation_has_no_catalogue_sized_array(ml_dir):
    """Nothing in the observation grows with the catalogue: its arrays are sized by the history window, the
    consumed-item list and (with the exposure and co-occurrence features) the feature lists."""
    env = LogReplayEnv({"dataset": ml_dir, "window": 30})
    sizes = {k: space.shape for k, space in env.observation_space.spaces.items()}
    assert sizes == {Obs.HISTORY: (31,), Obs.LENGTH: (1,), Obs.CONSUMED: (env.cfg.mask_items,)}
    assert env.n_items not in {n for shape in sizes.values() for n in shape}
    cfg = {"dataset": ml_dir, "window": 30, "exposure_cost": 0.5, "cooccurrence": True, "feature_items": 64}
    env = LogReplayEnv(cfg)
    sizes = {k: space.shape for k, space in env.observation_space.spaces.items()}
    lists = {k: (64,) for k in (Obs.EXPOSED_ITEMS, Obs.EXPOSURE, Obs.COOCCURRING_ITEMS, Obs.COOCCURRENCE)}
    assert sizes == {Obs.HISTORY: (31,), Obs.LENGTH: (1,), Obs.CONSUMED: (env.cfg.mask_items,), **lists}


def test_policy_head_starts_at_the_fine_tuned_policy_and_learns_from_shipped_states(finetuned_run, ml_dir):
    """Frozen encoder: only the head learns, the start is the fine-tuned policy, and the learner's logits
    from the states the env runners shipped equal a full re-encoding (bootstrap rows re-encoded)."""
    from rec_rllib.models.run import load_run
    from rec_rllib.replay import train_item_counts
    from rec_rllib.rl.columns import REF_LOGITS, USER_STATE

    env = LogReplayEnv({"dataset": ml_dir, "window": 30})
    counts = train_item_counts(ml_dir, "loo")
    module = _module(finetuned_run, env, counts=counts, strategy="boltzmann")
    module.make_target_networks()
    trainable = {n for n, p in module.net.named_parameters() if p.requires_grad}
    assert trainable == {"bias", "popularity_weight", "state_head.weight", "state_head.bias"}
    assert module.net.log_popularity.argmax() == int(np.argmax(counts))

    obs = _obs_batch(env)
    mask = legal_actions(obs, env.n_items)
    fine_tuned, _ = load_run(finetuned_run)
    with torch.no_grad():
        expected = fine_tuned(obs[Obs.HISTORY], obs[Obs.LENGTH].reshape(-1)).masked_fill(~mask, MASK_VALUE)
    explore = module.forward_exploration({Columns.OBS: obs}, t=0)
    assert set(explore) == {Columns.ACTION_DIST_INPUTS, USER_STATE}
    assert torch.allclose(
        module.forward_inference({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS], expected, atol=1e-4
    )

    # rows 0 and 5 are RLlib's bootstrap steps: they carry the previous step's (here: wrong) state
    shipped = explore[USER_STATE].clone()
    shipped[0], shipped[5] = shipped[1], shipped[4]
    loss_mask = torch.ones(8, dtype=torch.bool)
    loss_mask[[0, 5]] = False
    batch = {Columns.OBS: obs, USER_STATE: shipped, Columns.LOSS_MASK: loss_mask}
    out = module.forward_train(batch)
    assert torch.allclose(out[Columns.ACTION_DIST_INPUTS], expected, atol=1e-4)
    assert torch.allclose(out[REF_LOGITS], expected, atol=1e-4)  # reference: the fine-tuned policy
    out[Columns.ACTION_DIST_INPUTS].logsumexp(-1).sum().backward()
    assert module.net.popularity_weight.grad is not None and module.net.state_head.weight.grad is not None
    assert all(p.grad is None for n, p in module.net.named_parameters() if n not in trainable)

    end_to_end = _module(finetuned_run, env, train_encoder=True, strategy="boltzmann")
    assert end_to_end.net.state_head is None
    assert all(p.requires_grad for p in end_to_end.net.encoder.parameters())


def test_env_runners_ship_bootstrap_states_so_the_learner_never_encodes(finetuned_run, ml_dir, local_ray):
    """APPO with the policy head: each chunk's appended bootstrap step gets the user state of its own final
    observation from the env runner, and the learner's forward pass runs no encoder at all. Under UCB the
    learner connector adds each real step (not the appended ones) once to the module's synced statistics."""
    from rec_rllib.rl.columns import BOOTSTRAP_STATE_MISSING, FINAL_USER_STATE, USER_STATE

    algo = _one_runner_ucb_algo(
        finetuned_run, EnvConfig(dataset=ml_dir, window=30), rollout_fragment_length=20
    )
    try:
        chunks = []
        for _ in range(4):  # enough calls for some episodes to end inside a chunk
            chunks += algo.env_runner_group.foreach_env_runner(lambda r: r.sample(), local_env_runner=False)[
                0
            ]
        assert any(e.is_terminated for e in chunks) and any(not e.is_terminated for e in chunks)
        assert all((FINAL_USER_STATE in e.custom_data) != e.is_terminated for e in chunks)
        # the catalogue-wide distribution inputs stay in the runner; the behaviour log-probability travels
        assert all(set(e.extra_model_outputs) >= {Columns.ACTION_LOGP, USER_STATE} for e in chunks)
        assert not any(Columns.ACTION_DIST_INPUTS in e.extra_model_outputs for e in chunks)
        # a chunk that arrives without its state (e.g. from an older runner) is flagged, and encoded
        stripped = copy.deepcopy(chunks)
        lost = next(i for i, e in enumerate(stripped) if not e.is_terminated)
        del stripped[lost].custom_data[FINAL_USER_STATE]
        learner = algo.learner_group._learner
        module = learner.module["default_policy"]
        assert torch.equal(getattr(module, UCB_STATS), torch.ones_like(getattr(module, UCB_STATS)))
        batch, partial = (
            learner._learner_connector(
                rl_module=learner.module, batch={}, episodes=eps, shared_data={}, metrics=learner.metrics
            )["default_policy"]
            for eps in (chunks, stripped)
        )
    finally:
        algo.stop()
    appended = ~batch[Columns.LOSS_MASK].bool()
    assert int(appended.sum()) == len(chunks) and not batch[BOOTSTRAP_STATE_MISSING].any()
    # two pipeline calls (chunks, stripped), each real step counted once per call: unit states add 1 a pair
    shown = torch.bincount(batch[Columns.ACTIONS][~appended].long(), minlength=module.net.n_items)
    recorded = (getattr(module, UCB_STATS) - 1).sum(-1)
    assert shown.sum() > 0 and torch.allclose(recorded, 2 * shown.float(), atol=1e-3)
    bootstraps = appended.clone()
    bootstraps[appended.nonzero().reshape(-1)] = ~torch.tensor([e.is_terminated for e in chunks])
    obs = batch[Columns.OBS]
    own = torch.as_tensor(module.encode_observations({k: v[bootstraps].numpy() for k, v in obs.items()}))
    assert torch.allclose(batch[USER_STATE][bootstraps], own, atol=1e-5)
    assert partial[BOOTSTRAP_STATE_MISSING].nonzero().reshape(-1).tolist() == [
        appended.nonzero().reshape(-1)[lost].item()
    ]
    out = module.forward_train(partial)
    assert torch.allclose(out[Columns.EMBEDDINGS][bootstraps], own, atol=1e-5)

    def no_encoder(*_args, **_kwargs):
        raise AssertionError("the learner ran the encoder")

    module._per_batch.clear()  # nothing of an earlier batch reused
    module._encode = no_encoder
    out = module.forward_train(batch)
    assert torch.isfinite(out[Columns.ACTION_DIST_INPUTS]).all()
    assert torch.allclose(out[Columns.EMBEDDINGS][bootstraps], own, atol=1e-5)


def test_frozen_head_parts_leave_rl_the_rest_down_to_the_exposure_weight_alone(finetuned_run, ml_dir):
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    env = LogReplayEnv({"dataset": ml_dir, "exposure_cost": 0.5, "seed": 21})
    mc = model_config_from_run(finetuned_run)
    mc.update(train_state_head=False, exposure_window=env.cfg.exposure_window)
    spec = RLModuleSpec(
        module_class=RecPolicyModule,
        observation_space=env.observation_space,
        action_space=env.action_space,
        model_config=mc,
    )
    module = spec.build()
    trained = {n for n, p in module.named_parameters() if p.requires_grad and not n.startswith("value_head.")}
    assert trained == {"net.bias", "net.popularity_weight", "exposure_term.weight"}
    assert not any(p.requires_grad for p in module.net.state_head.parameters())
    with pytest.raises(ValueError, match="end to end"):
        RLTrainConfig(finetuned=finetuned_run, train_encoder=True, train_state_head=False)

    # the item terms frozen too: the exposure weight is the only policy parameter RL trains
    module = replace(spec, model_config={**mc, "train_item_terms": False}).build()
    trained = {n for n, p in module.named_parameters() if p.requires_grad and not n.startswith("value_head.")}
    assert trained == {"exposure_term.weight"}
    with pytest.raises(ValueError, match="end to end"):
        RLTrainConfig(finetuned=finetuned_run, train_encoder=True, train_item_terms=False)
    with pytest.raises(ValueError, match="nothing to train"):
        RLTrainConfig(finetuned=finetuned_run, train_state_head=False, train_item_terms=False)
    cfg = RLTrainConfig(
        finetuned=finetuned_run,
        train_state_head=False,
        train_item_terms=False,
        env=EnvConfig(dataset=ml_dir, exposure_cost=0.5),
    )
    assert not cfg.train_item_terms

    # a fixed co-occurrence weight is not trained either (and alone leaves RL nothing to train)
    module = replace(
        spec, model_config={**mc, "train_item_terms": False, "cooccurrence": True, "cooccurrence_gamma": 2.5}
    ).build()
    trained = {n for n, p in module.named_parameters() if p.requires_grad and not n.startswith("value_head.")}
    assert trained == {"exposure_term.weight"} and cooccurrence_weight(module) == pytest.approx(2.5)
    learned = replace(spec, model_config={**mc, "train_item_terms": False, "cooccurrence": True}).build()
    assert learned.cooccurrence_term.weight.requires_grad and cooccurrence_weight(learned) == 0.0
    co_env = EnvConfig(dataset=ml_dir, cooccurrence=True)
    with pytest.raises(ValueError, match="nothing to train"):
        RLTrainConfig(
            finetuned=finetuned_run,
            train_state_head=False,
            train_item_terms=False,
            cooccurrence_gamma=1.0,
            env=co_env,
        )
    for bad in (-1.0, float("nan"), "best", True):
        with pytest.raises(ValueError, match="cooccurrence_gamma must be a number >= 0 or 'validation'"):
            RLTrainConfig(finetuned=finetuned_run, cooccurrence_gamma=bad, env=co_env)
    with pytest.raises(ValueError, match="only with env.cooccurrence"):
        RLTrainConfig(finetuned=finetuned_run, cooccurrence_gamma=1.0)
    assert RLTrainConfig(
        finetuned=finetuned_run, cooccurrence_gamma="validation", env=co_env
    ).cooccurrence_gamma


def test_exploration_log_probs_are_the_behaviour_distribution(finetuned_run, ml_dir):
    env = LogReplayEnv({"dataset": ml_dir, "window": 30})
    batch = {Columns.OBS: _obs_batch(env)}
    mask = legal_actions(batch[Columns.OBS], env.n_items)
    eps = _module(finetuned_run, env, strategy="epsilon", epsilon=0.2, epsilon_final=0.2)
    lp = eps.forward_exploration(dict(batch), t=0)[Columns.ACTION_DIST_INPUTS]
    p = lp.exp() * mask
    assert torch.allclose(p.sum(-1), torch.ones(8, dtype=p.dtype), atol=1e-5)
    greedy = eps.forward_inference(dict(batch))[Columns.ACTION_DIST_INPUTS].argmax(-1)
    n_legal = mask.sum(-1)
    expected = 0.8 + 0.2 / n_legal
    assert torch.allclose(p[torch.arange(8), greedy], expected.to(p.dtype), atol=1e-5)
    hot = _module(finetuned_run, env, strategy="boltzmann", temperature=2.0, temperature_final=2.0)
    cold = _module(finetuned_run, env, strategy="boltzmann", temperature=0.5, temperature_final=0.5)
    from rec_rllib.explore import entropy

    assert entropy(hot.forward_exploration(dict(batch), t=0)[Columns.ACTION_DIST_INPUTS]) > entropy(
        cold.forward_exploration(dict(batch), t=0)[Columns.ACTION_DIST_INPUTS]
    )


def test_greedy_is_refused_for_training_and_ucb_for_ppo(finetuned_run):
    with pytest.raises(ValueError, match="never explores"):
        RLTrainConfig(finetuned=finetuned_run, exploration=ExplorationConfig(strategy="greedy"))
    with pytest.raises(ValueError, match="no gradient"):
        RLTrainConfig(algorithm="ppo", finetuned=finetuned_run, exploration=ExplorationConfig(strategy="ucb"))
    assert (
        RLTrainConfig(finetuned=finetuned_run, exploration=ExplorationConfig(strategy="ucb")).algorithm
        == "appo"
    )


@pytest.mark.parametrize(
    "setting, says",
    [
        ({"iterations": 0}, "iterations must be a number >= 1"),
        ({"num_env_runners": -1}, "num_env_runners must be a number >= 0"),
        ({"num_envs_per_env_runner": 0}, "num_envs_per_env_runner must be a number >= 1"),
        ({"checkpoint_every": 0}, "checkpoint_every must be a number >= 1"),
        ({"train_batch_size": "640"}, "train_batch_size must be a number >= 1"),
        ({"lr": 0.0}, "lr must be a number > 0"),
        ({"gamma": 1.5}, r"gamma must be in \[0, 1\]"),
        ({"env_runner_resources": {"": 1.0}}, "each resource needs a name"),
        ({"learner_resources": {"learner": 0.0}}, "each resource needs a name and an amount > 0"),
        ({"candidate_items": 5}, "candidate_items must be 'auto', 0 .* or a number of at least 10"),
        ({"candidate_items": "many"}, "candidate_items must be 'auto'"),
    ],
)
def test_rl_config_refuses_settings_it_cannot_run(setting, says, finetuned_run):
    """Values that would crash mid-run (checkpoint_every 0: a modulo by zero after the first iteration), run
    nothing (0 iterations) or hang (a resource of amount 0) are refused when the config is built."""
    with pytest.raises(ValueError, match=says):
        RLTrainConfig(finetuned=finetuned_run, **setting)


def test_ucb_acts_greedily_on_score_plus_bonus_and_moves_off_what_it_showed(finetuned_run, ml_dir):
    """UCB's behaviour distribution is the arg-max of logits + bonus (log-probability 0: propensity 1);
    the module records what it acted on, so the same users are next shown something else when the bonus
    (here wider than any score gap among the top items) outweighs the scores."""
    env = LogReplayEnv({"dataset": ml_dir, "window": 30})
    obs = _obs_batch(env)
    mask = legal_actions(obs, env.n_items)
    module = _module(finetuned_run, env, strategy="ucb", ucb_alpha=50.0)
    greedy = module.forward_inference({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS].argmax(-1)
    first = module.forward_exploration({Columns.OBS: obs}, t=0)[Columns.ACTION_DIST_INPUTS]
    a1 = first.argmax(-1)
    assert torch.equal(a1, greedy)  # nothing shown yet: the bonus is the same for every item
    assert torch.allclose(first[torch.arange(8), a1], torch.zeros(8, dtype=first.dtype))
    assert (first.exp() * mask).sum(-1).allclose(torch.ones(8, dtype=first.dtype))
    assert module._ucb.shown == 8
    a2 = module.forward_exploration({Columns.OBS: obs}, t=1)[Columns.ACTION_DIST_INPUTS].argmax(-1)
    assert not torch.equal(a1, a2)
    assert mask[torch.arange(8), a2].all()  # the bonus never lifts a consumed item
    mild = _module(finetuned_run, env, strategy="ucb", ucb_alpha=1e-6)
    for t in range(2):  # a bonus far below the score gaps: UCB is the greedy policy
        out = mild.forward_exploration({Columns.OBS: obs}, t=t)[Columns.ACTION_DIST_INPUTS]
        assert torch.equal(out.argmax(-1), greedy)


def test_ppo_optimises_the_distribution_that_acted(finetuned_run, ml_dir):
    """PPO has no off-policy correction: its train logits are the tempered ones the runner sampled from."""
    from rec_rllib.rl.columns import BEHAVIOUR_TEMPERATURE

    with pytest.raises(ValueError, match="epsilon"):
        RLTrainConfig(
            algorithm="ppo", finetuned=finetuned_run, exploration=ExplorationConfig(strategy="epsilon")
        )
    env = LogReplayEnv({"dataset": ml_dir, "window": 30})
    module = _module(
        finetuned_run,
        env,
        strategy="boltzmann",
        temperature=0.5,
        temperature_final=0.5,
        settings={"train_behaviour_policy": True},
    )
    obs = _obs_batch(env)
    explore = module.forward_exploration({Columns.OBS: obs}, t=0)
    assert torch.allclose(explore[BEHAVIOUR_TEMPERATURE], torch.full((8,), 0.5))
    batch = {Columns.OBS: obs, **{k: v for k, v in explore.items() if k != Columns.ACTION_DIST_INPUTS}}
    train_logits = module.forward_train(batch)[Columns.ACTION_DIST_INPUTS]
    legal = legal_actions(obs, env.n_items)
    behaviour = explore[Columns.ACTION_DIST_INPUTS][legal]
    assert torch.allclose(torch.log_softmax(train_logits, -1)[legal], behaviour, atol=1e-4)


@pytest.mark.parametrize("algorithm", ["appo", "ppo", "dqn"])
def test_default_resources_are_a_valid_rllib_config_for_every_algorithm(algorithm, finetuned_run, ml_dir):
    """The defaults (2 runners x 32 envs, fragment 20, train batch 640) pass RLlib's own checks; PPO's
    batch = runners x envs x fragment rule once rejected them."""
    expl = ExplorationConfig(strategy="epsilon") if algorithm == "dqn" else ExplorationConfig()
    cfg = RLTrainConfig(
        algorithm=algorithm, finetuned=finetuned_run, exploration=expl, env=EnvConfig(dataset=ml_dir)
    )
    config = build_algo_config(cfg, model_config_from_run(finetuned_run))
    config.validate()  # raises where RLlib refuses the combination
    assert config.num_envs_per_env_runner == 32
    if algorithm == "ppo":  # synchronous: one sampling round per train batch
        assert 2 * 32 * config.get_rollout_fragment_length() == cfg.train_batch_size


@pytest.fixture
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.mark.parametrize(
    "algorithm,train_encoder", [("appo", False), ("ppo", False), ("dqn", False), ("appo", True)]
)
def test_training_checkpoint_restore_and_standalone_module(
    algorithm, train_encoder, finetuned_run, ml_dir, tmp_path, local_ray
):
    # the frozen-encoder APPO and DQN runs also price exposure (an extra observation, a learned weight): APPO
    # by log(1 + count), DQN by whether an item is on display at all (within its runner's last 500
    # recommendations); the frozen-encoder APPO run keeps the item bias and the popularity weight at their
    # fine-tuned values and learns a weight on the co-occurrence feature (another observation)
    frozen_item_terms = algorithm == "appo" and not train_encoder
    env_cfg = {
        "dataset": ml_dir,
        "window": 30,
        "cooccurrence": frozen_item_terms,
        "exposure_cost": 1.0 if algorithm != "ppo" and not train_encoder else 0.0,
        **({"exposure_shape": "indicator", "exposure_window": 500} if algorithm == "dqn" else {}),
    }
    cfg = RLTrainConfig(
        algorithm=algorithm,
        train_encoder=train_encoder,
        exploration=ExplorationConfig(strategy="epsilon", epsilon=0.2)
        if algorithm == "dqn"
        else ExplorationConfig(strategy="ucb" if algorithm == "appo" else "boltzmann"),
        finetuned=finetuned_run,
        iterations=2,
        num_env_runners=1,
        num_envs_per_env_runner=4,
        train_batch_size=160,
        rollout_fragment_length=20,
        checkpoint_every=2,
        train_item_terms=not frozen_item_terms,
        env=EnvConfig(**env_cfg),
    )
    summary = train(cfg, tmp_path / "rl", progress=lambda *_: None)
    assert summary["iterations"] == 2 and Path(summary["checkpoint"]).is_dir()
    assert all(h["env_steps"] > 0 for h in summary["history"])
    # the hit rate counts every sampled step once (not the return per step, which the exposure cost lowers)
    assert all(h["replay_steps"] == h["env_steps"] and 0 <= h["hit_rate"] <= 1 for h in summary["history"])
    assert any(h["hit_rate"] > 0 for h in summary["history"]), summary["history"]
    shares = [h["on_display_share"] for h in summary["history"]]  # priced runs only: the share shown again
    if env_cfg["exposure_cost"]:  # the fine-tuned policy recommends some items to several users
        assert all(0 <= x <= 1 for x in shares) and any(x > 0 for x in shares), shares
    else:
        assert all(x != x for x in shares), shares
    if algorithm == "dqn":  # learning started (after one train batch of samples): a finite TD loss, and the
        # logged next item's cross-entropy beside it, in nats: about ln(1,682) = 7.4 for a uniform guess
        learned = [h for h in summary["history"] if h["q_loss"] == h["q_loss"]]
        assert learned and all(0 < h["next_item_ce"] < 7.4 for h in learned), summary["history"]
    assert (tmp_path / "rl" / "training_curves.png").exists()
    rows = (tmp_path / "rl" / "train_metrics.csv").read_text().splitlines()
    assert len(rows) == 3

    # the module alone, from the checkpoint, gives the same greedy actions as the restored algorithm
    module = load_policy_module(summary["checkpoint"])
    if frozen_item_terms:  # trained: the map on the user state (and β); not the item terms
        fine_tuned_bias = load_file(Path(finetuned_run) / "model.safetensors")["bias"]
        assert torch.equal(module.net.bias.detach(), fine_tuned_bias)
        assert float(module.net.popularity_weight) == 0.0
        assert not torch.equal(module.net.state_head.weight.detach(), torch.eye(module.net.cfg.hidden_size))
    algo = build_algo_config(cfg, model_config_from_run(finetuned_run)).build_algo()
    try:
        algo.restore_from_path(summary["checkpoint"])
        restored = algo.get_module()
        env = LogReplayEnv({**env_cfg, "seed": 99})
        batch = {Columns.OBS: _obs_batch(env)}
        if env_cfg["exposure_cost"]:  # items 0-49 on display, nothing else: the learned term acts
            batch[Columns.OBS][Obs.EXPOSED_ITEMS][:] = env.n_items
            batch[Columns.OBS][Obs.EXPOSED_ITEMS][:, :50] = torch.arange(50)
            batch[Columns.OBS][Obs.EXPOSURE][:] = 0
            batch[Columns.OBS][Obs.EXPOSURE][:, :50] = float(np.log(10))
        a = module.forward_inference(dict(batch))[Columns.ACTION_DIST_INPUTS].argmax(-1)
        b = restored.forward_inference(dict(batch))[Columns.ACTION_DIST_INPUTS].argmax(-1)
        assert torch.equal(a, b)
        if env_cfg["exposure_cost"]:
            # learned (it starts at 0), saved, and applied by evaluation to its own tracker of what it showed
            beta = exposure_weight(module)
            assert beta != 0 and beta == exposure_weight(restored)
            # the learner reports β after its updates: one update moves it ~0.01 (APPO may update once more
            # between the last report and the checkpoint)
            assert abs(summary["history"][-1]["exposure_weight"] - beta) < 0.05, summary["history"]
            rec = load_policy_recommender(summary["checkpoint"], dataset=LogDataset.load(ml_dir))
            shape = env_cfg.get("exposure_shape", "log")
            assert module.exposure_window == cfg.env.exposure_window  # training's; evaluation keeps its own
            assert (rec.cfg.slots, rec.cfg.penalty, rec.cfg.window, rec.cfg.shape) == (
                0,
                beta,
                ExposureConfig.window,
                shape,
            )
            logits = module.forward_inference(dict(batch))[Columns.ACTION_DIST_INPUTS]
            batch[Columns.OBS][Obs.EXPOSURE][:] = 0
            unexposed = module.forward_inference(dict(batch))[Columns.ACTION_DIST_INPUTS]
            shift = (unexposed - logits)[:, :50]
            allowed = legal_actions(batch[Columns.OBS], module.net.n_items)[:, :50]
            feature = 1.0 if shape == "indicator" else float(np.log(10))
            assert torch.allclose(shift[allowed], torch.tensor(beta * feature), atol=1e-4)
            # serving brings the same weight to each replica's tracker of what it showed
            scorer = PolicyScorer(summary["checkpoint"], ml_dir)
            assert scorer.exposure.cfg.penalty == beta and scorer.info()["exposure"]["penalty"] == beta
            assert scorer.exposure.cfg.shape == shape == scorer.info()["exposure"]["shape"]
            scorer._set_exposure(replace(scorer.exposure.cfg, penalty=5.0))  # strong enough to see it act
            req = {"history": list(range(0, 60, 3)), "k": 5}
            first, second = (scorer.score_requests([req])[0]["items"] for _ in range(2))
            assert first != second  # what the first answer showed now weighs on the second
            explored = scorer.score_requests([{**req, "strategy": "thompson", "temperature": 0.5}])[0]
            assert len(explored["items"]) == 5 and all(0 < p <= 1 for p in explored["propensities"])
        else:
            assert module.exposure_term is None
        if env_cfg["cooccurrence"]:
            _check_cooccurrence_term(
                module,
                restored,
                summary,
                ml_dir,
                window=cfg.env.window,
                co_window=cfg.env.cooccurrence_window,
            )
        else:
            assert module.cooccurrence_term is None
        if algorithm == "appo" and not train_encoder:
            # UCB statistics: accumulated from the runners' steps, saved, and back in the runner on restore
            saved = getattr(module, UCB_STATS)
            pairs = float((saved - 1).sum())  # each (unit state, item) pair adds 1
            assert pairs >= cfg.train_batch_size and abs(pairs - round(pairs)) < 1e-2
            in_runner = algo.env_runner_group.foreach_env_runner(
                lambda r: getattr(r.module, UCB_STATS).numpy().copy(), local_env_runner=False
            )
            assert np.allclose(in_runner[0], saved.numpy())
        if algorithm == "appo":  # a package whose episodes all died with their runner: skipped, no crash
            lost = TrainingData(episodes_refs=[ray.put([])])
            assert algo.learner_group.update(training_data=lost, timesteps={}) == [{}]
    finally:
        algo.stop()
    config = json.loads((tmp_path / "rl" / "rl_config.json").read_text())
    assert config["algorithm"] == algorithm


def test_cooccurrence_weight_chosen_on_the_validation_users_stays_fixed(
    finetuned_run, ml_dir, tmp_path, local_ray
):
    """``cooccurrence_gamma: validation``: before training, γ is the grid's best for the validation users (the
    fine-tuned scores plus γ times the feature, NDCG@10; every γ's figure recorded), and RL trains around it:
    the checkpoint's γ is the chosen one to the bit, while the exposure weight β is learned."""
    cfg = RLTrainConfig(
        finetuned=finetuned_run,
        exploration=ExplorationConfig(strategy="thompson"),
        iterations=2,
        num_env_runners=1,
        num_envs_per_env_runner=4,
        train_batch_size=160,
        rollout_fragment_length=20,
        train_state_head=False,
        train_item_terms=False,
        cooccurrence_gamma="validation",
        env=EnvConfig(
            dataset=ml_dir,
            window=30,
            horizon=1,
            cooccurrence=True,
            exposure_cost=0.5,
            exposure_shape="indicator",
            exposure_window=500,
        ),
    )
    summary = train(cfg, tmp_path / "rl", progress=lambda *_: None)
    chosen = json.loads((tmp_path / "rl" / "cooccurrence_gamma.json").read_text())
    figures = {float(g): v for g, v in chosen["figures"].items()}
    assert set(figures) == set(COOCCURRENCE_GAMMA_GRID) and chosen["gamma"] == max(figures, key=figures.get)
    assert (chosen["split"], chosen["window"]) == ("valid", cfg.env.cooccurrence_window)
    ds = LogDataset.load(ml_dir)
    plain = evaluate_ranking(load_recommender(finetuned_run, ds), ds, split="valid").metrics["NDCG@10"]
    assert figures[0.0] == pytest.approx(plain)  # γ 0: the fine-tuned model itself
    assert len(set(figures.values())) > 1  # the feature moves the ranking
    assert (
        json.loads((tmp_path / "rl" / "rl_config.json").read_text())["cooccurrence_gamma"] == chosen["gamma"]
    )
    module = load_policy_module(summary["checkpoint"])
    assert cooccurrence_weight(module) == pytest.approx(chosen["gamma"], abs=1e-6)
    assert not module.cooccurrence_term.weight.requires_grad
    assert exposure_weight(module) != 0  # what RL learned


def _check_cooccurrence_term(module, restored, summary, ml_dir, *, window, co_window):
    """γ is learned (it starts at 0), saved, and applied as in training by evaluation and by serving, over the
    last ``co_window`` items (not the observation's ``window``)."""
    gamma = cooccurrence_weight(module)
    assert gamma != 0 and gamma == cooccurrence_weight(restored)
    assert abs(summary["history"][-1]["cooccurrence_weight"] - gamma) < 0.05, summary["history"]
    with pytest.raises(ValueError, match="give the dataset it was trained on"):
        load_policy_recommender(summary["checkpoint"])
    rec = load_policy_recommender(
        summary["checkpoint"], dataset=LogDataset.load(ml_dir)
    ).base  # no exposure term
    assert co_window < window and module.model_config["cooccurrence_window"] == co_window
    assert isinstance(rec, CooccurrenceRecommender) and (rec.gamma, rec.window) == (gamma, co_window)
    h = np.arange(0, 90, 3)  # a history longer than the window
    recent = h[-window:]
    tokens = np.zeros((1, window + 1), dtype=np.int64)
    tokens[0, 0], tokens[0, 1:] = Tokens.BOS, recent + Tokens.OFFSET
    n_items = module.net.n_items
    mask = np.ones((1, n_items), dtype=np.float32)
    mask[0, h] = 0.0
    co_items, co_probs = rec.simulator.feature(h[-co_window:], without=h)
    obs = {
        Obs.HISTORY: tokens,
        Obs.LENGTH: np.array([[window + 1]]),
        Obs.CONSUMED: np.asarray([h], dtype=np.int64),
        Obs.EXPOSED_ITEMS: np.full((1, 16), n_items, dtype=np.int32),  # nothing on display
        Obs.EXPOSURE: np.zeros((1, 16), dtype=np.float32),
        Obs.COOCCURRING_ITEMS: co_items[None].astype(np.int32),
        Obs.COOCCURRENCE: co_probs[None],
    }
    dense = np.zeros(n_items, dtype=np.float32)
    dense[co_items] = co_probs
    assert np.array_equal(dense, cooccurrence_feature(rec.simulator, [h], co_window)[0].astype(np.float32))
    logits = module.forward_inference({Columns.OBS: {k: torch.as_tensor(v) for k, v in obs.items()}})
    logits = logits[Columns.ACTION_DIST_INPUTS][0].double().numpy()
    scores, allowed = rec.score([h])[0], mask[0] > 0.5
    assert np.allclose(logits[allowed], scores[allowed], atol=1e-4)  # evaluation ranks as the policy acts
    without = rec.base.score([h])[0]
    assert np.abs(scores - without)[allowed].max() > 1e-3  # and the term is there
    scorer = PolicyScorer(summary["checkpoint"], ml_dir)
    expected = {"weight": gamma, "window": co_window, "items": EnvConfig.feature_items, "scheme": "loo"}
    assert scorer.info()["cooccurrence"] == expected
    answer = scorer.score_requests([{"history": h.tolist(), "k": 5}])[0]
    assert np.allclose(answer["scores"], scores[answer["items"]], atol=1e-4)  # serving scores the same


def test_appo_learns_on_movielens(finetuned_run, ml_dir, local_ray):
    """APPO raises the policy's mean episode return on the same replayed episodes, far beyond chance.

    Returns are compared *paired*: before and after training, the behaviour policy (Boltzmann, T=1) plays
    the same 600 episodes (same users, same starting points, same sampling seed). The gain must exceed
    four standard errors of the paired difference (chance: p < 1e-4); the trained policy must also beat
    a uniformly random recommender by a wide margin.
    """
    env_cfg = {"dataset": ml_dir, "window": 30}
    cfg = RLTrainConfig(
        finetuned=finetuned_run,
        iterations=60,
        lr=1e-3,
        ref_kl_coeff=0.0,
        num_env_runners=2,
        num_envs_per_env_runner=8,
        num_cpus_per_env_runner=0.5,
        train_batch_size=320,
        env=EnvConfig(**env_cfg),
    )
    algo = build_algo_config(cfg, model_config_from_run(finetuned_run)).build_algo()
    try:
        before = replay_returns(sampling_policy(current_module(algo)), env_cfg, episodes=600)
        first = None
        for _ in range(cfg.iterations):
            result = algo.train()
            first = first if first is not None else result
        after = replay_returns(sampling_policy(current_module(algo)), env_cfg, episodes=600)
    finally:
        algo.stop()
    rnd = replay_returns(random_policy(LogReplayEnv(env_cfg).n_items), env_cfg, episodes=600)
    gain, se = paired_gain(after, before)
    assert gain > 4 * se, (before.mean(), after.mean(), se)
    assert after.mean() > 5 * rnd.mean() + 0.1
    assert first["env_runners"]["num_env_steps_sampled"] > 0


def _two_runner_config(finetuned_run: str, ml_dir: str, **overrides) -> RLTrainConfig:
    """Two env runners pinned to `env_runner` nodes, tiny batches: the multi-node tests' set-up."""
    return RLTrainConfig(
        finetuned=finetuned_run,
        num_env_runners=2,
        num_envs_per_env_runner=2,
        env_runner_resources={"env_runner": 1},
        train_batch_size=80,
        rollout_fragment_length=20,
        env=EnvConfig(dataset=ml_dir, window=30),
        **overrides,
    )


def _describe_runner(runner) -> dict:
    """Where an env runner lives and which users it replays (run inside the runner)."""
    envs = [e.unwrapped for e in runner.env.unwrapped.envs]
    return {
        "node": ray.get_runtime_context().get_node_id(),
        "pid": os.getpid(),
        "index": runner.worker_index,
        "shard": sorted(set().union(*[set(e.shard_users.tolist()) for e in envs])),
        "seen": sorted(set().union(*[e.users_seen for e in envs])),
    }


@pytest.mark.slow
def test_env_runners_on_two_nodes_replay_disjoint_shards(finetuned_run, ml_dir, tmp_path):
    """A real multi-node Ray on one machine: head + two worker nodes tagged with `env_runner`."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=1, resources={"env_runner": 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR")
    try:
        cfg = _two_runner_config(finetuned_run, ml_dir, iterations=1)
        algo = build_algo_config(cfg, model_config_from_run(finetuned_run)).build_algo()
        try:
            for _ in range(2):
                algo.train()

            info = algo.env_runner_group.foreach_env_runner(_describe_runner, local_env_runner=False)
        finally:
            algo.stop()
    finally:
        ray.shutdown()
        cluster.shutdown()
    worker_nodes = {w.node_id for w in workers}
    assert len(info) == 2
    assert {i["node"] for i in info} == worker_nodes  # one runner on each tagged worker node
    a, b = (set(i["shard"]) for i in info)
    assert not a & b and len(a | b) == 943  # disjoint, and together every train user
    for i in info:
        assert i["seen"] and set(i["seen"]) <= set(i["shard"])  # each replays only its own users


@pytest.mark.slow
def test_training_survives_losing_a_worker_node_and_an_env_runner(finetuned_run, ml_dir):
    """Head + three `env_runner` worker nodes, two env runners. The node of one runner is removed
    mid-training, later one runner process is killed: RLlib restarts each runner (on a node that still
    offers `env_runner`), training goes on, and the runners' shards again cover every train user."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = [cluster.add_node(num_cpus=1, resources={"env_runner": 1}) for _ in range(3)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR")

    def train_until_restored(algo, max_iterations: int = 25) -> tuple[int, list[dict]]:
        """Train until both runners answer again (a restarted runner can flap while it comes back)."""
        for i in range(max_iterations):
            algo.train()  # never raises: failed runners are restarted
            if i >= 1 and algo.env_runner_group.num_healthy_remote_workers() == 2:
                info = algo.env_runner_group.foreach_env_runner(_describe_runner, local_env_runner=False)
                if len(info) == 2:
                    return i + 1, info
        raise AssertionError("env runners were not restored")

    try:
        cfg = _two_runner_config(finetuned_run, ml_dir)
        algo = build_algo_config(cfg, model_config_from_run(finetuned_run)).build_algo()
        try:
            for _ in range(2):
                algo.train()
            before = algo.env_runner_group.foreach_env_runner(_describe_runner, local_env_runner=False)
            victim = next(n for n in nodes if n.node_id == before[0]["node"])
            cluster.remove_node(victim, allow_graceful=False)
            after_node, placed = train_until_restored(algo)

            pid = algo.env_runner_group.foreach_env_runner(lambda r: os.getpid(), local_env_runner=False)[0]
            os.kill(pid, signal.SIGKILL)  # a crashed env runner process (one this test's cluster started)
            after_kill, final = train_until_restored(algo)
            restarts = algo.env_runner_group.num_remote_worker_restarts()
        finally:
            algo.stop()
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert after_node <= 25 and after_kill <= 25
    assert restarts >= 1  # RLlib's own count (a runner Ray restarted in place may not add to it)
    assert pid not in {i["pid"] for i in final}
    for info in (placed, final):
        assert len(info) == 2 and victim.node_id not in {i["node"] for i in info}
        assert sorted(i["index"] for i in info) == [1, 2]  # the same runner slots, so the same shards
        a, b = (set(i["shard"]) for i in info)
        assert not a & b and len(a | b) == 943
