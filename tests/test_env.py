"""LogReplayEnv on the real MovieLens-100K: sharding, replay semantics, rewards; no torch import."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from rec_rllib.columns import Obs, Tokens
from rec_rllib.env import EnvConfig, LogReplayEnv
from rec_rllib.replay import read_train_histories, shard_of
from rec_rllib.simulator import ItemKNNSimulator
from tests.conftest import PY, REPO


def dense_of(items: np.ndarray, values: np.ndarray, n_items: int) -> np.ndarray:
    """[n_items] values at ``items`` (padding: ``n_items``), 0 elsewhere."""
    out = np.zeros(n_items + 1, dtype=np.float32)
    out[items] = values
    return out[:n_items]


def dense(obs: dict, items_key: str, values_key: str, n_items: int) -> np.ndarray:
    """[n_items] a sparse feature of an observation with 0 for the items it does not list."""
    return dense_of(obs[items_key], obs[values_key], n_items)


def test_shards_are_disjoint_and_cover_every_train_user(ml_dir):
    shards = [LogReplayEnv({"dataset": ml_dir, "num_shards": 3, "shard_id": i}).shard_users for i in range(3)]
    union = np.concatenate(shards)
    assert len(union) == len(set(union.tolist())) == 943
    assert all((s % 3 == i).all() for i, s in enumerate(shards))


def test_env_context_decides_the_shard():
    assert shard_of(worker_index=0, num_workers=0) == (0, 1)  # a lone local runner owns everybody
    assert shard_of(worker_index=1, num_workers=2) == (0, 2)
    assert shard_of(worker_index=2, num_workers=2) == (1, 2)


def test_replay_rewards_hits_and_advances_the_logged_history(ml_dir):
    env = LogReplayEnv({"dataset": ml_dir, "horizon": 3, "episode_len": 5, "window": 10})
    obs, info = env.reset(seed=1)
    items, ratings = env.histories[info["user"]]
    pos = env._pos
    assert obs[Obs.LENGTH][0] == min(pos, 10) + 1 and obs[Obs.HISTORY][0] == Tokens.BOS
    # the consumed items, oldest first, padded with one past the catalogue
    consumed = obs[Obs.CONSUMED]
    assert consumed.shape == (env.cfg.mask_items,) and consumed[:pos].tolist() == items[:pos].tolist()
    assert (consumed[pos:] == env.n_items).all()
    nxt = int(items[pos])
    obs2, reward, term, trunc, info2 = env.step(nxt)  # recommending the logged next item is a hit
    assert info2["hit"] and reward == pytest.approx(ratings[pos] / env.max_rating)
    assert obs2[Obs.CONSUMED][pos] == nxt  # consumed now
    assert obs2[Obs.HISTORY][obs2[Obs.LENGTH][0] - 1] == nxt + Tokens.OFFSET  # the log advanced
    consumed = int(items[0]) if pos > 0 else None
    miss = next(i for i in range(env.n_items) if i not in set(items[pos : pos + 4].tolist()))
    _, reward, *_ = env.step(miss)
    assert reward == 0.0
    if consumed is not None:
        assert env.observation_space.contains(obs2)


def test_episodes_are_bounded(ml_dir):
    env = LogReplayEnv({"dataset": ml_dir, "episode_len": 7})
    env.reset(seed=0)
    done, steps = False, 0
    while not done:
        _, _, term, trunc, _ = env.step(env.action_space.sample())
        done, steps = term or trunc, steps + 1
    assert steps <= 7


def test_simulator_is_fitted_on_train_and_validated(ml100k, ml_dir):
    histories, manifest = read_train_histories(ml_dir, "loo")
    sim = ItemKNNSimulator(histories, ml100k.n_items, ml100k.n_users)
    cases = ml100k.eval_cases("loo", "valid")
    hr = sim.validate(cases.histories, cases.targets)
    assert hr > 0.074  # better than popularity's 0.0742 on the same validation users
    env = LogReplayEnv({"dataset": ml_dir, "reward": "simulator"})
    env.reset(seed=0)
    _, r, *_ = env.step(0)
    assert r in (0.0, 1.0)


def test_simulator_sparse_fit_equals_the_dense_one(ml_dir, monkeypatch):
    """Catalogues too large for dense ``n²`` arrays keep the co-occurrence sparse: same probabilities and
    rows, with and without the scored user, as MovieLens-100K's dense fit; a repeated item counts once per
    user."""
    histories, manifest = read_train_histories(ml_dir, "loo")
    n_items, n_users = manifest["counts"]["items"], manifest["counts"]["users"]
    dense = ItemKNNSimulator(histories, n_items, n_users)
    monkeypatch.setattr(ItemKNNSimulator, "DENSE_BYTES", 0)
    repeated = {u: (np.concatenate([items, items[:3]]), r) for u, (items, r) in histories.items()}
    sparse = ItemKNNSimulator(repeated, n_items, n_users)
    assert isinstance(dense.co, np.ndarray) and hasattr(sparse.co, "nnz")
    assert np.array_equal(dense.users, sparse.users)
    for user in list(histories)[:: max(1, len(histories) // 25)]:
        items = histories[user][0]
        assert np.allclose(sparse.probabilities(items[-20:]), dense.probabilities(items[-20:]), atol=1e-6)
        assert np.allclose(sparse.rows(items, without=items), dense.rows(items, without=items), atol=1e-6)
        # the policy's feature, sparse: the probabilities above 0, read from the window's rows only
        for fit in (dense, sparse):
            ids, probs = fit.feature(items[-5:], without=items)
            assert np.allclose(dense_of(ids, probs, n_items), dense.probabilities(items[-5:], without=items))
    assert sparse.probabilities(items[-20:]).max() == 1.0
    # the 40 most probable, ties to the lower item; an empty window: nothing to tell items apart
    ids, probs = sparse.feature(items[-5:], without=items, top=40)
    full = dense.probabilities(items[-5:], without=items)
    assert len(ids) == 40 and np.allclose(probs, full[ids]) and full[ids].min() >= np.sort(full)[-40] - 1e-6
    assert [len(x) for x in sparse.feature(items[:0])] == [0, 0]


def test_cooccurrence_feature_leaves_the_replayed_user_out_and_the_reward_alone(ml_dir):
    """With ``cooccurrence`` the observation carries the simulator's probabilities for the recent window,
    fitted as if the replayed user were not in the train split (their own future items must not inform it);
    the hit reward is unchanged (the simulator is then built, but the reward stays ``hit``)."""
    plain = LogReplayEnv({"dataset": ml_dir, "seed": 5, "window": 20})
    env = LogReplayEnv(
        {"dataset": ml_dir, "seed": 5, "window": 20, "cooccurrence": True, "cooccurrence_window": 7}
    )
    assert (
        Obs.COOCCURRENCE in env.observation_space.spaces and Obs.COOCCURRENCE not in plain.observation_space
    )
    histories, manifest = read_train_histories(ml_dir, "loo")
    n_items, n_users = manifest["counts"]["items"], manifest["counts"]["users"]
    full = ItemKNNSimulator(histories, n_items, n_users)
    for seed in range(100):  # an episode that starts past its first window, with room for 8 steps or more
        obs, info = env.reset(seed=seed)
        if env._pos > 25 and len(env._items) - env._pos > 8:
            break
    plain.reset(seed=seed)
    user = info["user"]
    without = ItemKNNSimulator({u: h for u, h in histories.items() if u != user}, n_items, n_users)
    rewards, leaked = [], 0.0
    step, done = 0, False
    while True:  # the whole episode, its last observation included
        recent = env._items[max(0, env._pos - 7) : env._pos]  # the feature's window, not the observation's
        feature = dense(obs, Obs.COOCCURRING_ITEMS, Obs.COOCCURRENCE, n_items)
        assert obs[Obs.COOCCURRENCE].dtype == np.float32 and 0 <= feature.min() <= feature.max() <= 1
        assert np.allclose(feature, without.probabilities(recent), atol=1e-5)
        leaked = max(leaked, float(np.abs(full.probabilities(recent) - feature).max()))
        if done:
            break
        action = int(env._items[env._pos]) if step % 2 == 0 else 0  # a hit, then (mostly) a miss
        obs, r1, terminated, truncated, _ = env.step(action)
        _, r0, *_ = plain.step(action)
        assert r1 == r0
        rewards.append(r1)
        step, done = step + 1, terminated or truncated
    assert step >= 8 and leaked > 0.01  # the user's own row does move the full fit's probabilities
    assert all(r > 0 for r in rewards[::2])
    # evaluation and serving take the given history's owner out the same way
    h = histories[user][0]
    assert np.allclose(full.probabilities(h[-20:], without=h), without.probabilities(h[-20:]), atol=1e-5)


def test_novelty_bonus_rewards_long_tail_recommendations(ml_dir):
    plain = LogReplayEnv({"dataset": ml_dir, "seed": 3})
    bonus = LogReplayEnv({"dataset": ml_dir, "seed": 3, "novelty_bonus": 0.5})
    counts = np.bincount(np.concatenate([h[0] for h in bonus.histories.values()]), minlength=bonus.n_items)
    assert bonus.novelty.min() > 0 and bonus.novelty.max() == 1.0
    assert bonus.novelty[np.argmax(counts)] == bonus.novelty.min()  # the most popular item: least novel
    plain.reset(seed=1)
    bonus.reset(seed=1)
    rewards = []
    for step in range(10):  # the same user and actions in both: a hit, then a miss on the rarest item
        action = int(plain._items[plain._pos]) if step % 2 == 0 else int(np.argmin(counts))
        _, r0, *_ = plain.step(action)
        _, r1, *_ = bonus.step(action)
        assert r1 == pytest.approx(r0 + 0.5 * bonus.novelty[action])
        rewards.append(r0)
    assert all(r > 0 for r in rewards[::2]) and not any(rewards[1::2])


def test_exposure_cost_prices_what_the_runner_recommended_lately(ml_dir):
    """The envs of one runner share one tracker of recent recommendations: the observation carries
    log(1 + count) per item and a recommendation costs λ · log(1 + its count) / log(1 + window)."""
    cfg = {"dataset": ml_dir, "seed": 11, "exposure_cost": 2.0, "exposure_window": 3}
    a, b = LogReplayEnv(cfg), LogReplayEnv(cfg)  # two sub-environments of one runner
    other = LogReplayEnv({**cfg, "seed": 12})  # another runner's population
    plain = LogReplayEnv({"dataset": ml_dir, "seed": 11})
    assert Obs.EXPOSURE not in plain.observation_space.spaces
    oa, _ = a.reset(seed=1)
    plain.reset(seed=1)
    assert a.observation_space.contains(oa) and not oa[Obs.EXPOSURE].any()
    item = int(a._items[a._pos])  # the logged next item: a hit, not yet shown by anybody -> no cost
    _, r, _, _, info = a.step(item)
    _, r0, _, _, plain_info = plain.step(item)
    assert r == r0 > 0 and info["on_display"] is False and "on_display" not in plain_info
    ob, _ = b.reset(seed=2)
    exposure = dense(ob, Obs.EXPOSED_ITEMS, Obs.EXPOSURE, b.n_items)
    assert exposure[item] == pytest.approx(np.log(2)) and exposure.sum() == pytest.approx(np.log(2))
    plain.reset(seed=2)
    _, r1, _, _, info = b.step(item)
    _, r0, *_ = plain.step(item)
    assert r1 == pytest.approx(r0 - 2.0 * np.log(2) / np.log(4)) and info["on_display"] is True
    o, _ = other.reset(seed=1)
    assert not o[Obs.EXPOSURE].any()
    # the window (3 recommendations) forgets: two more steps on other items evict the first of `item`'s two
    for _ in range(2):
        o, *_ = b.step((item + 1) % b.n_items)
    assert dense(o, Obs.EXPOSED_ITEMS, Obs.EXPOSURE, b.n_items)[item] == pytest.approx(np.log(2))
    # the indicator shape: λ for an item recommended at all within the window, however often
    ind = LogReplayEnv({**cfg, "seed": 13, "exposure_shape": "indicator"})
    ind.reset(seed=1)
    plain.reset(seed=1)
    costs = []
    for _ in range(3):
        _, r, *_ = ind.step(item)
        _, r0, *_ = plain.step(item)
        costs.append(r0 - r)
    assert costs == pytest.approx([0.0, 2.0, 2.0])
    with pytest.raises(ValueError, match="exposure_cost must be >= 0"):
        EnvConfig(dataset=ml_dir, exposure_cost=-1)
    with pytest.raises(ValueError, match="unknown exposure_shape 'square'"):
        EnvConfig(dataset=ml_dir, exposure_shape="square")


def test_the_features_list_the_largest_values_up_to_a_set_size(ml_dir, monkeypatch):
    """``feature_items`` bounds the exposure and co-occurrence lists whatever the catalogue: the exposure list
    holds the most recommended items with their log counts (an item left off prices at 0, as the policy saw
    it), the co-occurrence list the most probable items, from a dense fit or from a sparse one alike."""
    cfg = {"dataset": ml_dir, "seed": 31, "exposure_cost": 1.0, "cooccurrence": True, "feature_items": 6}
    env = LogReplayEnv(cfg)
    plain = LogReplayEnv({"dataset": ml_dir, "seed": 31})
    added = set(env.observation_space.spaces) - set(plain.observation_space.spaces)
    lists = (Obs.EXPOSED_ITEMS, Obs.EXPOSURE, Obs.COOCCURRING_ITEMS, Obs.COOCCURRENCE)
    assert added == set(lists) and all(env.observation_space[k].shape == (6,) for k in lists)
    obs, _ = env.reset(seed=3)
    plain.reset(seed=3)
    actions = [900, 901, 901, 902, 902, 902, 903, 904, 905, 906, 907]  # 8 items on display, 902 the most
    for a in actions:
        obs, *_ = env.step(a)
        plain.step(a)
    listed = obs[Obs.EXPOSED_ITEMS][obs[Obs.EXPOSED_ITEMS] < env.n_items]
    assert sorted(listed.tolist()) == [900, 901, 902, 903, 904, 905]  # counts 3, 2, then ties to lower items
    assert dense(obs, Obs.EXPOSED_ITEMS, Obs.EXPOSURE, env.n_items)[902] == pytest.approx(np.log(4))
    _, r, _, _, info = env.step(907)  # on display, but not listed: no cost, not counted as on display
    _, r0, *_ = plain.step(907)
    assert r == r0 and info["on_display"] is False
    obs, r, _, _, info = env.step(902)
    _, r0, *_ = plain.step(902)
    assert r == pytest.approx(r0 - np.log(4) / np.log(1 + env.cfg.exposure_window)) and info["on_display"]
    # the co-occurrence list: the 6 most probable items of the leave-user-out feature, dense or sparse fit
    items = env._items[max(0, env._pos - env.cfg.cooccurrence_window) : env._pos]
    full = env.simulator.probabilities(items, without=env._items)
    listed = obs[Obs.COOCCURRING_ITEMS]
    assert listed.max() < env.n_items and full[listed].min() >= np.sort(full)[-6] - 1e-6
    monkeypatch.setattr(ItemKNNSimulator, "DENSE_BYTES", 0)
    monkeypatch.setattr("rec_rllib.simulator._SIMULATORS", {})
    sparse_env = LogReplayEnv(cfg)
    assert hasattr(sparse_env.simulator.co, "nnz")
    sparse_env.reset(seed=3)
    sparse_env._pos = env._pos
    sparse_obs = sparse_env._obs()
    assert np.allclose(
        dense(sparse_obs, Obs.COOCCURRING_ITEMS, Obs.COOCCURRENCE, env.n_items),
        dense(obs, Obs.COOCCURRING_ITEMS, Obs.COOCCURRENCE, env.n_items),
        atol=1e-6,
    )


def test_bad_config_is_rejected(ml_dir):
    with pytest.raises(ValueError, match="unknown reward"):
        EnvConfig(dataset=ml_dir, reward="dwell")
    with pytest.raises(ValueError, match="shard_id"):
        LogReplayEnv({"dataset": ml_dir, "num_shards": 2, "shard_id": 2})
    with pytest.raises(ValueError, match="cooccurrence_window must be positive"):
        EnvConfig(dataset=ml_dir, cooccurrence=True, cooccurrence_window=0)


def test_environment_never_imports_torch():
    code = "import sys, rec_rllib.env; assert 'torch' not in sys.modules, 'torch imported'"
    out = subprocess.run([PY, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
