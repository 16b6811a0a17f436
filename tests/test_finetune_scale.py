"""Fine-tuning at catalogue scale: the sampled loss, the per-step budget, bounded evaluation, Ray Train
data-parallel training (one node and two), and the generated logs the scale benchmark runs on."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import ray
import torch

from rec_rllib.eval import evaluate_ranking
from rec_rllib.finetune import (
    IGNORE,
    FinetuneConfig,
    Validator,
    finetune,
    log_not_target,
    next_item_loss,
    resolve_loss,
    sample_candidates,
    train_histories,
    training_windows,
)
from rec_rllib.models import RandomRecommender
from rec_rllib.models.run import TransformerRecommender, load_run
from rec_rllib.models.seqrec import ModelConfig, TextSeqRec
from rec_rllib.topk import topk
from tests.conftest import REPO

TINY = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, max_len=30, dropout=0.1)


def _small_batch(n_items: int = 40, seed: int = 0):
    g = np.random.default_rng(seed)
    histories = [g.integers(0, n_items, size=int(g.integers(3, 15))) for _ in range(6)]  # repeats included
    tokens, targets, lengths = training_windows(histories, max_len=8)
    return histories, tokens, targets, lengths


@pytest.mark.parametrize("mask_history", [True, False])
def test_sampled_loss_with_every_item_as_a_negative_equals_the_full_softmax(mask_history):
    n = 40
    histories, tokens, targets, lengths = _small_batch(n)
    model = TextSeqRec(ModelConfig(hidden_size=16, num_layers=1, num_heads=2, max_len=8, text_model=None), n)
    with torch.no_grad():
        model.bias.normal_()  # item terms take part too
    model.eval()
    cfg = FinetuneConfig(mask_history=mask_history)
    width = int(lengths.max())
    args = (model, tokens[:, :width], lengths, targets[:, :width], cfg)
    full = next_item_loss(*args, loss="full")
    every = (torch.arange(n), torch.zeros(n))  # every item, included with probability 1
    sampled = next_item_loss(*args, loss="sampled", candidates=every)
    assert torch.allclose(full, sampled, atol=1e-5), (full, sampled)


def test_sampled_loss_is_a_close_estimate_of_the_full_softmax():
    """Uniform plus in-batch negatives with the log-Q correction: averaged over draws, the sampled loss is
    within a few percent of the full softmax's, while its candidates are a fraction of the catalogue."""
    n = 2000
    histories, tokens, targets, lengths = _small_batch(n, seed=1)
    torch.manual_seed(0)
    model = TextSeqRec(ModelConfig(hidden_size=16, num_layers=1, num_heads=2, max_len=8, text_model=None), n)
    with torch.no_grad():  # scores peaked on the popular items, as a trained model's are
        counts = np.bincount(np.concatenate(histories), minlength=n)
        model.bias.copy_(torch.from_numpy(3.0 * np.log1p(counts)).float())
    model.eval()
    cfg = FinetuneConfig(num_negatives=200, in_batch_negatives=50)
    lnt = log_not_target(histories, n)
    width = int(lengths.max())
    args = (model, tokens[:, :width], lengths, targets[:, :width], cfg)
    g = torch.Generator().manual_seed(0)
    y = targets[targets != IGNORE]
    draws = [sample_candidates(y, n, cfg, lnt, g) for _ in range(30)]
    assert max(len(c) for c, _ in draws) <= 250 < n
    with torch.no_grad():
        full = float(next_item_loss(*args, loss="full"))
        estimates = [float(next_item_loss(*args, loss="sampled", candidates=d)) for d in draws]
    assert abs(np.mean(estimates) - full) / full < 0.05, (np.mean(estimates), full)


def test_loss_auto_is_full_for_a_small_catalogue_and_sampled_for_a_large_one():
    assert resolve_loss("auto", 1682) == "full" and resolve_loss("auto", 100_000) == "sampled"
    assert resolve_loss("full", 100_000) == "full" and resolve_loss("sampled", 10) == "sampled"
    with pytest.raises(ValueError, match="loss must be 'auto', 'full' or 'sampled'"):
        FinetuneConfig(loss="bpr")


def test_a_budget_of_seconds_stops_mid_epoch_with_a_final_evaluation_and_a_loadable_model(ml100k, tmp_path):
    cfg = FinetuneConfig(
        epochs=50, eval_every=50, batch_size=16, max_minutes=0.06, progress=False, seed=3, loss="sampled"
    )
    result = finetune(ml100k, TINY, cfg, tmp_path / "ft")
    assert result.stopped_by == "budget"
    last = result.history[-1]
    assert last["epoch"] != int(last["epoch"])  # mid-epoch
    assert "valid_NDCG@10" in last  # the stop evaluates before it keeps the best weights
    assert result.test_metrics["HR@10"] > 0 and result.targets_per_second > 0
    model, meta = load_run(tmp_path / "ft")
    assert meta["loss"] == "sampled" and meta["result"]["stopped_by"] == "budget"
    scores = TransformerRecommender(model).score([np.array([1, 2, 3])])
    assert scores.shape == (1, ml100k.n_items) and np.isfinite(scores).all()


def test_validation_uses_a_fixed_sample_and_the_end_uses_every_user(ml100k, tmp_path):
    model, _ = load_run(_tiny_run(ml100k, tmp_path))
    rec = TransformerRecommender(model)
    cfg = FinetuneConfig(valid_users=200, seed=1)
    v = Validator(rec, ml100k, cfg, n_final=943)
    assert len(v.cases) == 200 and v.sampled and v.n_valid == 943
    first, again = v(), v()
    assert first == again  # the same users every time
    assert len(v.paces) == 3  # the start's warm chunk and each validation price the budget's reserve
    assert v.reserve_seconds() >= v.seconds_per_user * (200 + 943 + 943) > 0
    full = evaluate_ranking(rec, ml100k, split="valid", ks=(10,)).metrics["NDCG@10"]
    assert v.final_valid_ndcg(first["valid_NDCG@10"]) == pytest.approx(full, abs=1e-12)
    all_users = Validator(rec, ml100k, FinetuneConfig(valid_users=0), n_final=943)
    assert not all_users.sampled and all_users()["valid_NDCG@10"] == pytest.approx(full, abs=1e-12)


def _tiny_run(ml100k, tmp_path):
    run = tmp_path / "tiny"
    finetune(ml100k, TINY, FinetuneConfig(epochs=1, batch_size=128, progress=False, seed=2), run)
    return run


def test_top_k_selection_matches_the_stable_full_sort_with_ties_and_exclusions():
    rng = np.random.default_rng(0)
    for n in (300, 5000):
        scores = rng.normal(size=(64, n)).astype(np.float32)
        scores[:, :40] = 0.25  # a block of ties
        scores[3] = 1.0  # a row of nothing but ties
        scores[4] = np.round(scores[4], 1)  # many ties at every level
        exclude = [rng.choice(n, 20, replace=False) for _ in range(64)]
        got = topk(scores, 10, exclude)
        ref = np.array(scores, dtype=np.float64)
        ref[np.repeat(np.arange(64), 20), np.concatenate(exclude)] = -np.inf
        np.testing.assert_array_equal(got, np.argsort(-ref, axis=1, kind="stable")[:, :10])


def test_chunked_evaluation_equals_one_chunk(ml100k, tmp_path, monkeypatch):
    from rec_rllib.eval import ranking

    rec = TransformerRecommender(load_run(_tiny_run(ml100k, tmp_path))[0])
    whole = evaluate_ranking(rec, ml100k, split="test", batch_size=1000)
    monkeypatch.setattr(ranking, "EVAL_CHUNK_CELLS", 37 * ml100k.n_items)  # chunks of 37 users
    chunked = evaluate_ranking(rec, ml100k, split="test", batch_size=1000)
    assert chunked.metrics.keys() == whole.metrics.keys()
    for k, v in whole.metrics.items():
        assert chunked.metrics[k] == pytest.approx(v, abs=1e-9), k


def test_the_recommender_reuses_its_item_matrix_until_a_weight_changes():
    n = 300
    model = TextSeqRec(
        ModelConfig(hidden_size=16, num_layers=1, num_heads=2, max_len=8),
        n,
        text_embeddings=torch.randn(n, 12),
    )
    rec = TransformerRecommender(model)
    histories = [np.array([1, 2, 3]), np.array([7])]
    before = rec.score(histories)
    assert rec.item_matrix() is rec.item_matrix()  # computed once while nothing changes
    with torch.no_grad():
        model.text_proj[0].weight.mul_(2.0)  # an in-place update, as an optimiser step makes
    after = rec.score(histories)
    assert not np.allclose(before, after)
    np.testing.assert_array_equal(after, TransformerRecommender(model).score(histories))


# -- Ray Train -----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ray_data_feed_gives_every_window_once_per_epoch_across_workers(ml100k, tmp_path):
    """Two Ray Train workers iterate their shards in lockstep for two epochs: the windows they train on
    (weight > 0) are every window of the Parquet files, each exactly once per epoch."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from rec_rllib.finetune_ray import _exactly_once_split, shard_batches, windows_dataset, write_windows

    n_windows, _ = write_windows(train_histories(ml100k, "loo"), 30, tmp_path / "windows")

    def loop(config):
        ctx = ray.train.get_context()
        shard = ray.train.get_dataset_shard("train")
        cfg = FinetuneConfig(batch_size=100)
        seen = []
        for epoch in (1, 2):
            ids = []
            for batch, weight in shard_batches(shard, cfg, epoch, ctx.get_world_rank(), ctx.get_world_size()):
                if weight > 0:
                    ids.extend(batch["window"].tolist())
            seen.append(ids)
        with open(os.path.join(config["out"], f"rank{ctx.get_world_rank()}.json"), "w") as f:
            json.dump(seen, f)

    ray.init(address="local", num_cpus=3, include_dashboard=False, logging_level="ERROR")
    try:
        TorchTrainer(
            loop,
            train_loop_config={"out": str(tmp_path)},
            scaling_config=ray.train.ScalingConfig(num_workers=2),
            run_config=ray.train.RunConfig(storage_path=str(tmp_path / "rt")),
            datasets={"train": windows_dataset(tmp_path / "windows", workers=2)},
            dataset_config=_exactly_once_split(),
            torch_config=TorchConfig(backend="gloo"),
        ).fit()
    finally:
        ray.shutdown()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for epoch in (0, 1):
        together = ranks[0][epoch] + ranks[1][epoch]
        assert sorted(together) == list(range(n_windows)), f"epoch {epoch + 1}"
        assert ranks[0][epoch] and ranks[1][epoch], [(len(r[0]), len(r[1])) for r in ranks]


@pytest.mark.slow
def test_two_ray_train_workers_learn_and_their_run_loads_in_evaluation_and_serving(ml100k, ml_dir, tmp_path):
    """`jobs.finetune --num-workers 2` on the real MovieLens-100K, as a user runs it: the loss falls,
    validation NDCG@10 beats random far beyond chance, and the run directory is read by `jobs.evaluate` and
    answered from by the Serve app over HTTP."""
    out = tmp_path / "ft2"
    env = dict(os.environ, REC_RLLIB_DATA=str(tmp_path / "data"))
    flags = [
        *"--hidden-size 32 --num-layers 1 --num-heads 2 --max-len 30 --dropout 0.1 --epochs 3".split(),
        *"--eval-every 1 --batch-size 128 --lr 3e-3 --warmup-steps 10 --threads 1".split(),
    ]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.finetune",
            "--dataset",
            ml_dir,
            "--out",
            str(out),
            "--num-workers",
            "2",
            *flags,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["num_workers"] == 2
    model, meta = load_run(out)
    history = [row for row in _csv_rows(out / "metrics.csv")]
    assert float(history[-1]["train_loss"]) < float(history[0]["train_loss"]) - 0.3
    rand = evaluate_ranking(RandomRecommender(ml100k.n_items, seed=0), ml100k, split="valid").metrics[
        "NDCG@10"
    ]
    assert final["best_valid_NDCG@10"] > 0.03 > 10 * rand
    batches = meta["distributed"]["batches_per_worker"]
    assert len(batches) == 2 and all(b[0] > 0 for b in batches)  # both workers had windows of their own

    ev = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.evaluate",
            "--dataset",
            ml_dir,
            "--models",
            str(out),
            "--out",
            str(tmp_path / "ev"),
            "--ks",
            "10",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["ft2"]["HR@10"] == pytest.approx(final["test"]["HR@10"])

    import httpx

    from jobs.serve import start, stop
    from tests.conftest import free_port

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        url = start(
            {
                "model": str(out),
                "dataset": ml_dir,
                "feedback_dir": str(tmp_path / "fb"),
                "topology": "single",
                "ingress_replicas": 1,
            },
            free_port(),
        )
        with httpx.Client(base_url=url, timeout=60) as client:
            r = client.post("/recommend", json={"user": "196", "k": 5})
        assert r.status_code == 200, r.text
        assert len(r.json()["items"]) == 5
    finally:
        try:
            stop()
        finally:
            ray.shutdown()


def _csv_rows(path):
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_ray_train_workers_on_two_nodes(ml100k, tmp_path):
    """A real multi-node Ray on one machine: head + two worker nodes tagged `trainer`; one Ray Train worker
    lands on each and they train together."""
    from ray.cluster_utils import Cluster

    from rec_rllib.finetune_ray import finetune_distributed

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=1, resources={"trainer": 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR")
    try:
        cfg = FinetuneConfig(epochs=1, batch_size=128, lr=3e-3, warmup_steps=10, threads=1, progress=False)
        result = finetune_distributed(
            ml100k, TINY, cfg, tmp_path / "ft", num_workers=2, worker_resources={"trainer": 1}
        )
    finally:
        ray.shutdown()
        cluster.shutdown()
    _, meta = load_run(tmp_path / "ft")
    assert set(meta["distributed"]["worker_nodes"]) == {w.node_id for w in workers}
    assert result.test_metrics["HR@10"] > 0 and result.history[0]["train_loss"] > 0


# -- the generated logs --------------------------------------------------------------------------------------
def test_generated_log_has_movielens_shape_and_prepares_as_a_custom_dataset(tmp_path):
    from rec_rllib.data import ColumnMapping, load_custom
    from rec_rllib.data.synthetic import generate

    log = generate(1, seed=0)
    inter = log.interactions
    assert 90_000 < len(inter) < 110_000 and inter["user_id"].nunique() == 1500
    assert not inter.duplicated(["user_id", "item_id"]).any()  # nobody sees an item twice
    per_user = inter.groupby("user_id").size()
    assert per_user.max() > 4 * per_user.median()  # heavy-tailed activity
    pop = inter["item_id"].value_counts().to_numpy()
    assert pop[: len(pop) // 10].sum() > 0.25 * len(inter)  # the top 10% of items take a quarter or more
    inter_path, items_path = log.write(tmp_path / "gen")
    mapping = ColumnMapping(reward="rating", item_text="text")
    ds = load_custom(inter_path, mapping, items=items_path, name="gen-1x")
    assert ds.n_users == 1500 and ds.n_items == len(log.items)
    # sequential structure: the successor rule makes a first-order transition predictable far above chance
    seqs = train_histories(ds, "loo")
    pairs = np.concatenate([np.stack([s[:-1], s[1:]], axis=1) for s in seqs if len(s) > 1])
    _, counts = np.unique(pairs, axis=0, return_counts=True)
    assert counts.max() > 20 and (counts > 1).sum() > 0.02 * len(pairs)
