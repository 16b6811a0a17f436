"""A fine-tuned model's run directory, and the :class:`Recommender` that serves it.

Layout (written by ``jobs.finetune``; read by evaluation, RL training and serving)::

    config.json             {"kind": "textseqrec", "model": ModelConfig, "train": FinetuneConfig,
                             "dataset": {...}, "n_items": ..., "item_ids": [...]}
    model.safetensors       the TextSeqRec state dict (frozen text embeddings included)
    item_embeddings.safetensors   "items": [n_items, H] final item matrix, "text": [n_items, D] text
    embeddings metrics.csv, learning_curve.png, final_metrics.json
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rec_rllib.fsutil import atomic_write, write_json
from rec_rllib.models.seqrec import OFFSET, ModelConfig, TextSeqRec, pad_histories
from rec_rllib.recommender import Recommender

KIND = "textseqrec"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ITEM_TABLE_FILE = "item_embeddings.safetensors"


def build_model(
    cfg: ModelConfig, item_texts: Sequence[str], *, known_items: np.ndarray | None = None
) -> TextSeqRec:
    """A fresh model for a catalogue given by its item texts (text embeddings computed or read from cache)."""
    from rec_rllib.models.text import TextTower, embed_texts

    n_items = len(item_texts)
    known = None if known_items is None else torch.as_tensor(known_items, dtype=torch.float32)
    if cfg.text_model is None:
        return TextSeqRec(cfg, n_items, known_items=known)
    if cfg.text_finetune_layers > 0:
        tower = TextTower(
            item_texts, cfg.text_model, n_layers=cfg.text_finetune_layers, max_length=cfg.text_max_length
        )
        return TextSeqRec(cfg, n_items, text_tower=tower, known_items=known)
    emb = embed_texts(item_texts, cfg.text_model, max_length=cfg.text_max_length)
    return TextSeqRec(cfg, n_items, text_embeddings=torch.from_numpy(emb), known_items=known)


def save_run(run_dir: str | Path, model: TextSeqRec, meta: dict[str, Any]) -> None:
    """Write weights, item tables and config (each file written to a temp name, then renamed)."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(run / WEIGHTS_FILE, lambda p: save_file(state, str(p), metadata={"kind": KIND}))
    with torch.no_grad():
        table = {
            "items": model.item_matrix().cpu().contiguous(),
            "text": model.item_text_embeddings().detach().cpu().contiguous(),
        }
    atomic_write(run / ITEM_TABLE_FILE, lambda p: save_file(table, str(p)))
    payload = {"kind": KIND, "model": model.cfg.to_dict(), "n_items": model.n_items, **meta}
    write_json(run / CONFIG_FILE, payload)


def is_run_dir(path: str | Path) -> bool:
    p = Path(path, CONFIG_FILE)
    return p.exists() and json.loads(p.read_text()).get("kind") == KIND


def load_run(run_dir: str | Path, *, device: str = "cpu") -> tuple[TextSeqRec, dict[str, Any]]:
    """The model (eval mode) and its config dict, from a run directory alone."""
    run = Path(run_dir)
    if not is_run_dir(run):
        raise FileNotFoundError(
            f"{run} is not a fine-tuned run directory (no {CONFIG_FILE} of kind {KIND!r})"
        )
    meta = json.loads((run / CONFIG_FILE).read_text())
    cfg = ModelConfig.from_dict(meta["model"])
    state = load_file(str(run / WEIGHTS_FILE))
    n_items = int(meta["n_items"])
    if cfg.text_model is not None and cfg.text_finetune_layers > 0:
        from rec_rllib.models.text import TextTower

        texts = meta.get("item_texts")
        if texts is None:
            raise ValueError(f"{run}: a fine-tuned text tower needs 'item_texts' in {CONFIG_FILE}")
        tower = TextTower(
            texts, cfg.text_model, n_layers=cfg.text_finetune_layers, max_length=cfg.text_max_length
        )
        model = TextSeqRec(cfg, n_items, text_tower=tower, known_items=state["known"])
    else:
        model = TextSeqRec(
            cfg, n_items, text_embeddings=state.get("text_embeddings"), known_items=state["known"]
        )
    model.load_state_dict(state)
    return model.to(device).eval(), meta


ITEM_ROWS = {"id_embedding.weight": OFFSET, "bias": 0, "log_popularity": 0}
"""Weights with one row per item (after this many special-token rows): a warm start carries them over by item
id. The text table and the ``known`` flags are the new catalogue's own (its texts, its training log)."""


def warm_start(model: TextSeqRec, run_dir: str | Path, item_ids: Sequence[str]) -> dict[str, int]:
    """Start ``model`` (built for the catalogue ``item_ids``) from a fine-tuned run's weights: every weight of
    the same shape copied, the per-item rows of :data:`ITEM_ROWS` matched by item id (the catalogue may have
    gained items, and a dataset orders its items by id, so positions move); items the run did not know
    keep their fresh rows. Returns how many items were carried over and how many are new.

    A ValueError when the architectures differ (another width, depth or history length)."""
    meta = json.loads(Path(run_dir, CONFIG_FILE).read_text())
    old_ids = meta.get("item_ids")
    if old_ids is None:
        raise ValueError(f"{run_dir}: {CONFIG_FILE} lacks item_ids; a warm start matches items by id")
    source = load_file(str(Path(run_dir, WEIGHTS_FILE)))
    old_at = {str(iid): i for i, iid in enumerate(old_ids)}
    pairs = [(j, old_at[str(iid)]) for j, iid in enumerate(item_ids) if str(iid) in old_at]
    new_rows = torch.as_tensor([j for j, _ in pairs], dtype=torch.long)
    old_rows = torch.as_tensor([i for _, i in pairs], dtype=torch.long)
    state = model.state_dict()
    mismatched = []
    with torch.no_grad():
        for key, target in state.items():
            if key in ("text_embeddings", "known") or key not in source:
                continue
            value = source[key]
            if key in ITEM_ROWS and value.shape[1:] == target.shape[1:]:
                skip = ITEM_ROWS[key]
                target[:skip] = value[:skip]
                target[skip + new_rows] = value[skip + old_rows].to(target.dtype)
            elif value.shape == target.shape:
                target.copy_(value)
            else:
                mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(target.shape)}")
    if mismatched:
        raise ValueError(
            f"{run_dir}: cannot warm-start from a model of another shape ({'; '.join(mismatched[:3])}); use "
            "the run's own model settings"
        )
    model.load_state_dict(state)
    return {"carried_items": len(pairs), "new_items": len(item_ids) - len(pairs)}


class TransformerRecommender(Recommender):
    """The fine-tuned :class:`TextSeqRec` behind the :class:`Recommender` interface."""

    name = "transformer"

    def __init__(self, model: TextSeqRec, *, name: str | None = None, batch_size: int = 256):
        self.model = model.eval()
        self.batch_size = batch_size
        self._items: tuple[tuple, torch.Tensor] | None = None  # (weights' versions, item matrix)
        if name:
            self.name = name

    @property
    def n_items(self) -> int:  # grows when items are added from text
        return self.model.n_items

    @classmethod
    def from_run(
        cls, run_dir: str | Path, *, device: str = "cpu", name: str | None = None
    ) -> TransformerRecommender:
        model, _ = load_run(run_dir, device=device)
        return cls(model, name=name or Path(run_dir).name)

    def item_matrix(self) -> torch.Tensor:
        """The model's item matrix, computed again only when a weight or buffer it may depend on changed
        (each in-place update bumps a tensor's version; added items replace tensors): an evaluation scores
        its users in many chunks, and at 100,000 items the matrix costs more than a chunk's users."""
        m = self.model
        key = (m.n_items, *((id(t), t._version) for t in (*m.parameters(), *m.buffers())))
        if self._items is None or self._items[0] != key:
            with torch.no_grad():
                self._items = (key, m.item_matrix())
        return self._items[1]

    @torch.no_grad()
    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        device = next(self.model.parameters()).device
        items = self.item_matrix()
        out = []
        for start in range(0, len(histories), self.batch_size):
            tokens, lengths = pad_histories(
                histories[start : start + self.batch_size], self.model.cfg.max_len, device
            )
            state = self.model.user_state(tokens, lengths, items)
            out.append(self.model.scores_from_state(state, items).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.n_items), dtype=np.float32)
