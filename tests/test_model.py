"""The text-aware sequence transformer: text encoder, windows, training, save/load, cold start."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch

from rec_rllib.columns import Col
from rec_rllib.data import LogDataset
from rec_rllib.eval import evaluate_ranking
from rec_rllib.finetune import IGNORE, FinetuneConfig, finetune, train_histories, training_windows
from rec_rllib.models import RandomRecommender, load_recommender
from rec_rllib.models.run import TransformerRecommender, build_model, load_run
from rec_rllib.models.seqrec import ModelConfig, pad_histories
from rec_rllib.models.text import TextEncoder, embed_texts
from tests.conftest import PY

TINY = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, max_len=50, dropout=0.1)


@pytest.fixture(scope="module")
def tiny_run(ml100k: LogDataset, tmp_path_factory) -> tuple[str, object]:
    """A tiny model fine-tuned for a few epochs on the real MovieLens-100K."""
    run = tmp_path_factory.mktemp("tiny-run")
    cfg = FinetuneConfig(
        epochs=4,
        eval_every=2,
        batch_size=128,
        lr=3e-3,
        warmup_steps=10,
        progress=False,
        holdout_items=0.05,
        seed=3,
    )
    return str(run), finetune(ml100k, TINY, cfg, run)


def test_packaged_minilm_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = TextEncoder()
    emb = enc.encode(
        ["Toy Story (1995) | Animation, Children's, Comedy", "Heat (1995) | Action, Crime, Thriller"]
    )
    assert emb.shape == (2, 384)
    assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)
    # the language model knows that two animated family films are closer than a crime thriller
    e = enc.encode(
        [
            "Toy Story (1995) | Animation, Children's",
            "Aladdin (1992) | Animation, Children's",
            "Heat (1995) | Action, Crime, Thriller",
        ]
    )
    assert float(e[0] @ e[1]) > float(e[0] @ e[2])


def test_training_windows_cover_every_interaction_once():
    seqs = [np.arange(7), np.arange(3) + 10, np.array([42])]
    tokens, targets, lengths = training_windows(seqs, max_len=3)
    got = sorted(int(t) for t in targets[targets != IGNORE])
    assert got == sorted([*range(7), 10, 11, 12, 42])
    assert (tokens[:, 0] == 1).all()  # every window starts with [BOS]
    assert lengths.max() <= 4


def test_fine_tuning_learns(tiny_run, ml100k):
    run, result = tiny_run
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0] - 0.3
    rand = evaluate_ranking(RandomRecommender(ml100k.n_items, seed=0), ml100k, split="valid").metrics[
        "NDCG@10"
    ]
    # random NDCG@10 is ~0.003 (sd ~0.002 over 943 users); popularity is 0.0345
    assert result.best_valid_ndcg10 > 0.03 > 10 * rand
    for name in (
        "model.safetensors",
        "item_embeddings.safetensors",
        "config.json",
        "metrics.csv",
        "learning_curve.png",
    ):
        assert (result.run_dir / name).exists(), name


def test_save_load_gives_identical_scores(tiny_run, ml100k):
    run, result = tiny_run
    model, meta = load_run(run)
    assert meta["dataset"]["content_hash"] == ml100k.manifest["content_hash"]
    cases = ml100k.eval_cases("loo", "test")
    a = TransformerRecommender(model).score(cases.histories[:64])
    b = load_recommender(run, ml100k).score(cases.histories[:64])
    np.testing.assert_array_equal(a, b)


def test_cold_items_score_from_text_and_new_items_can_be_added(tiny_run, ml100k):
    run, result = tiny_run
    model, meta = load_run(run)
    held_out = np.array(meta["holdout_items"])
    assert len(held_out) == round(0.05 * ml100k.n_items)
    assert (model.known[held_out] == 0).all() and model.known.sum() > 0.9 * ml100k.n_items
    # a brand-new item, from text alone, without retraining
    emb = embed_texts(["Toy Story 2 (1999) | Animation, Children's, Comedy"])
    (new,) = model.add_items(torch.from_numpy(emb))
    assert new == ml100k.n_items
    rec = TransformerRecommender(model)
    toy_story = int(ml100k.items.index[ml100k.items[Col.ITEM_ID] == "1"][0])
    scores = rec.score([np.array([toy_story])])
    assert scores.shape == (1, ml100k.n_items + 1) and np.isfinite(scores).all()
    out = rec.recommend([np.array([toy_story])], k=ml100k.n_items + 1, exclude_seen=True)
    assert new in out.items[0]


def test_empty_history_is_a_valid_input(tiny_run):
    run, _ = tiny_run
    model, _ = load_run(run)
    tokens, lengths = pad_histories([np.array([], dtype=np.int64), np.array([3, 4])], 50)
    with torch.no_grad():
        scores = model(tokens, lengths)
    assert torch.isfinite(scores).all()


def test_training_is_deterministic_with_a_seed(ml100k, tmp_path):
    cfg = FinetuneConfig(epochs=1, eval_every=1, batch_size=256, progress=False, seed=11)
    small = ModelConfig(hidden_size=16, num_layers=1, num_heads=1, max_len=20, dropout=0.1)
    a = finetune(ml100k, small, cfg, tmp_path / "a")
    b = finetune(ml100k, small, cfg, tmp_path / "b")
    assert a.history[0]["train_loss"] == b.history[0]["train_loss"]
    assert a.test_metrics == b.test_metrics


def test_id_only_model_needs_no_text(ml100k):
    cfg = ModelConfig(hidden_size=16, num_layers=1, num_heads=1, max_len=20, text_model=None)
    model = build_model(cfg, list(ml100k.items[Col.TEXT]))
    assert model.item_matrix().shape == (ml100k.n_items, 16)
    with pytest.raises(ValueError, match="id-only"):
        model.add_items(torch.zeros(1, 384))


def test_train_histories_drop_held_out_items(ml100k):
    full = train_histories(ml100k, "loo")
    dropped = train_histories(ml100k, "loo", np.array([0, 1, 2]))
    assert sum(map(len, full)) == 98_114
    assert not any(np.isin(h, [0, 1, 2]).any() for h in dropped)


def test_finetune_and_evaluate_jobs(job_env, tmp_path):
    run = tmp_path / "ft"
    args = [
        PY,
        "-m",
        "jobs.finetune",
        "--dataset",
        "ml-100k",
        "--out",
        str(run),
        *"--hidden-size 16 --num-layers 1 --num-heads 1 --max-len 20 --epochs 1 --no-progress".split(),
    ]
    out = subprocess.run(args, env=job_env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["epochs_run"] == 1 and 0 <= final["test"]["HR@10"] <= 1
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["hidden_size"] == 16 and config["train"]["epochs"] == 1
    out = subprocess.run(
        [PY, "-m", "jobs.evaluate", "--models", str(run), "popularity", "--out", "ev"],
        env=job_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert set(metrics) == {"ft", "popularity"}
    assert metrics["ft"]["HR@10"] == pytest.approx(final["test"]["HR@10"])


def test_seen_mask_matches_brute_force():
    from rec_rllib.finetune import _seen_mask

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(2, 12, (3, 6), generator=g)
    tokens[0, 4:] = 0  # padding
    keep = tokens != 0
    got = _seen_mask(tokens, keep, n_items=10)
    want = []
    for b, t in keep.nonzero().tolist():
        seen = torch.zeros(10, dtype=torch.bool)
        seen[tokens[b, : t + 1][tokens[b, : t + 1] >= 2] - 2] = True
        want.append(seen)
    assert torch.equal(got, torch.stack(want))


@pytest.mark.parametrize(
    "cls, setting, says",
    [
        (ModelConfig, {"max_len": 0}, "max_len must be a number >= 1"),  # fine-tuning hung with it
        (ModelConfig, {"text_max_length": 0}, "text_max_length must be a number >= 1"),
        (ModelConfig, {"num_heads": 0}, "num_heads must be a number >= 1"),  # a modulo by zero before
        (FinetuneConfig, {"lr": -1.0}, "lr must be a number > 0"),  # an optimiser traceback before
        (FinetuneConfig, {"max_minutes": 0}, "max_minutes must be a number > 0"),
        (FinetuneConfig, {"patience": 0}, "patience must be a number >= 1"),
    ],
)
def test_model_and_training_settings_that_cannot_run_are_refused(cls, setting, says):
    with pytest.raises(ValueError, match=says):
        cls(**setting)


@pytest.mark.parametrize("attention,layers", [("causal", 3), ("bidirectional", 3), ("causal", 0)])
def test_inference_user_state_equals_the_training_paths(attention, layers):
    """The inference path (no dropout, no gradient; last layer at the last position only) computes the
    training path's hidden state at each sequence's last token, for any mix of history lengths."""
    from rec_rllib.models.seqrec import TextSeqRec

    torch.manual_seed(0)
    cfg = ModelConfig(
        hidden_size=32,
        num_layers=layers,
        num_heads=4,
        max_len=12,
        dropout=0.2,
        attention=attention,
        text_model=None,
        use_id_embedding=True,
    )
    model = TextSeqRec(cfg, n_items=40).eval()
    histories = [
        list(np.random.default_rng(i).integers(0, 40, n)) for i, n in enumerate([0, 1, 3, 12, 30, 7])
    ]
    tokens, lengths = pad_histories(histories, cfg.max_len, "cpu")
    with torch.no_grad():
        items = model.item_matrix()
        reference = model.encode(tokens, lengths, items)[torch.arange(len(lengths)), lengths - 1]
        fast = model.user_state(tokens, lengths, items)
    assert torch.allclose(fast, reference, atol=1e-5), (fast - reference).abs().max()
    model.train()  # dropout on: the training path (MC dropout draws differ from the reference)
    with torch.no_grad():
        assert not torch.allclose(model.user_state(tokens, lengths, items), reference, atol=1e-3)
    for m in model.modules():  # training mode with every rate at 0 (how RL env runners act): fast path
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    with torch.no_grad():
        assert torch.allclose(model.user_state(tokens, lengths, items), reference, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_the_sequence_encoder_is_bertmodel_s_computation_and_reads_its_checkpoints(causal):
    """The encoder replaced Hugging Face's BertModel: a seed gives the same weights, the same outputs in
    evaluation and in training (dropout draws included), with and without padding; BertModel's state dict
    (the parameter names of runs written before) loads into it."""
    from transformers import BertConfig, BertModel

    from rec_rllib.models.encoder import SequenceEncoder

    h, layers, heads, p, positions = 32, 2, 2, 0.3, 31
    cfg = BertConfig(
        vocab_size=1,
        hidden_size=h,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * h,
        hidden_dropout_prob=p,
        attention_probs_dropout_prob=p,
        max_position_embeddings=positions,
        type_vocab_size=1,
        pad_token_id=0,
        is_decoder=causal,
        use_cache=False,
    )
    torch.manual_seed(0)
    bert = BertModel(cfg, add_pooling_layer=False)
    after_bert = torch.rand(3)
    torch.manual_seed(0)
    ours = SequenceEncoder(h, layers, heads, p, positions, causal=causal)
    assert torch.equal(torch.rand(3), after_bert)  # the same random draws, in the same number
    legacy = SequenceEncoder(h, layers, heads, p, positions, causal=causal)
    legacy.load_state_dict(bert.state_dict())  # BertModel's names, its unused word table dropped
    for name, value in ours.state_dict().items():
        assert torch.equal(value, legacy.state_dict()[name]), name
    x = torch.randn(5, 12, h)
    for lengths in (torch.tensor([12, 7, 3, 12, 1]), torch.full((5,), 12)):
        keep = torch.arange(12)[None] < lengths[:, None]
        pos = torch.where(keep, torch.arange(12)[None] + (positions - lengths[:, None]), 0)
        for training in (False, True):
            bert.train(training)
            ours.train(training)
            torch.manual_seed(1)
            expected = bert(inputs_embeds=x, attention_mask=keep.long(), position_ids=pos).last_hidden_state
            torch.manual_seed(1)
            assert torch.equal(ours(x, keep, pos)[keep], expected[keep])
            if not training:
                evaluated = expected[torch.arange(5), lengths - 1]
        ours.eval()
        with torch.no_grad():  # inference: the last layer at the last position only
            assert torch.allclose(ours.last_state(x, lengths, pos), evaluated, atol=1e-5)
