"""The sequence encoder of :class:`~rec_rllib.models.seqrec.TextSeqRec`: a BERT-style transformer (post-
LayerNorm, GELU feed-forward, learned positions) over given input embeddings, written on
``torch.nn.functional.scaled_dot_product_attention``. One implementation serves training (every position,
dropout) and inference (:meth:`SequenceEncoder.last_state`: the last layer evaluated at each sequence's last
position only).

It computes what Hugging Face's ``BertModel`` computed for this model before (same operations in the same
order, so the same numbers), and its initialisation draws the random numbers BertModel drew, so a seed gives
the same weights and the same training run. Checkpoints written with BertModel's parameter names load
through :meth:`SequenceEncoder._load_from_state_dict`.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

LAYER_NORM_EPS = 1e-12
INIT_STD = 0.02

# BertModel's parameter names (checkpoints written before this encoder) -> this encoder's
_LEGACY = [
    (r"embeddings\.position_embeddings\.", "positions."),
    (r"embeddings\.token_type_embeddings\.", "segment."),
    (r"embeddings\.LayerNorm\.", "norm."),
    (r"encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.", r"layers.\1.\2."),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.attn_out."),
    (r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"layers.\1.attn_norm."),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.ff_in."),
    (r"encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.ff_out."),
    (r"encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"layers.\1.ff_norm."),
]
_LEGACY_UNUSED = ("embeddings.word_embeddings.weight",)


class EncoderLayer(nn.Module):
    """Self-attention (padding mask, causal when configured), output projection + residual + LayerNorm,
    feed-forward + residual + LayerNorm; dropout on the attention weights and after each projection."""

    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden_size {hidden} is not a multiple of num_heads {heads}")
        self.heads = heads
        self.query, self.key, self.value = (
            nn.Linear(hidden, hidden),
            nn.Linear(hidden, hidden),
            nn.Linear(hidden, hidden),
        )
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)
        self.ff_in = nn.Linear(hidden, 4 * hidden)
        self.ff_out = nn.Linear(4 * hidden, hidden)
        self.ff_norm = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, h: torch.Tensor, mask: torch.Tensor | None, causal: bool
    ) -> torch.Tensor:
        """``x`` [B, Tq, H]: the positions whose outputs are wanted (all of ``h``, or its last ones) attending
        over ``h`` [B, T, H]; ``mask`` [B, 1, Tq, T] (True: may attend), None: no padding anywhere."""
        b, tq, _ = x.shape
        t, size = h.shape[1], h.shape[2] // self.heads
        q = self.query(x).view(b, tq, self.heads, size).transpose(1, 2)
        k = self.key(h).view(b, t, self.heads, size).transpose(1, 2)
        v = self.value(h).view(b, t, self.heads, size).transpose(1, 2)
        a = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout.p if self.training else 0.0,
            scale=size**-0.5,
            is_causal=causal and mask is None and tq > 1,
        )
        a = a.transpose(1, 2).contiguous().reshape(b, tq, -1).contiguous()
        a = self.attn_norm(self.dropout(self.attn_out(a)) + x)
        return self.ff_norm(self.dropout(self.ff_out(F.gelu(self.ff_in(a)))) + a)


class SequenceEncoder(nn.Module):
    """Learned positions and the token-type vector added to the input embeddings, LayerNorm, dropout, then
    :class:`EncoderLayer` s."""

    def __init__(
        self, hidden: int, layers: int, heads: int, dropout: float, max_positions: int, causal: bool
    ):
        super().__init__()
        self.causal = causal
        # the random draws of BertModel's one-row word table (never used: the encoder is fed vectors)
        nn.Embedding(1, hidden, padding_idx=0)
        self.positions = nn.Embedding(max_positions, hidden)
        self.segment = nn.Embedding(1, hidden)  # BERT's token-type vector, added to every position
        self.norm = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(EncoderLayer(hidden, heads, dropout) for _ in range(layers))
        self._init_weights(hidden)

    @torch.no_grad()
    def _init_weights(self, hidden: int) -> None:
        """Normal(0, 0.02) weights and zero biases, in BertModel's order (its word table first)."""
        torch.empty(1, hidden).normal_(0.0, INIT_STD)
        self.positions.weight.normal_(0.0, INIT_STD)
        self.segment.weight.normal_(0.0, INIT_STD)
        for layer in self.layers:
            for linear in (layer.query, layer.key, layer.value, layer.attn_out, layer.ff_in, layer.ff_out):
                linear.weight.normal_(0.0, INIT_STD)
                linear.bias.zero_()

    def _embed(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # the token-type vector through a lookup, not a broadcast: its gradient then sums as BertModel's did
        segment = self.segment(torch.zeros_like(positions))
        return self.dropout(self.norm(x + segment + self.positions(positions)))

    def _mask(self, keep: torch.Tensor) -> torch.Tensor | None:
        """[B, 1, T, T] which keys each query may attend to (not padding; not later, when causal); None
        when nothing is padded (the kernel then applies causality itself)."""
        if bool(keep.all()):
            return None
        b, t = keep.shape
        mask = keep[:, None, None, :].expand(b, 1, t, t)
        if self.causal:
            mask = mask & torch.ones(t, t, dtype=torch.bool, device=keep.device).tril()
        return mask

    def forward(self, x: torch.Tensor, keep: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[B, T, H] input embeddings, [B, T] True on real tokens, [B, T] position ids -> [B, T, H]."""
        h = self._embed(x, positions)
        mask = self._mask(keep)
        for layer in self.layers:
            h = layer(h, h, mask, self.causal)
        return h

    def last_state(self, x: torch.Tensor, lengths: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[B, H]: :meth:`forward`'s output at each sequence's last real token (right padding), with the last
        layer evaluated at that position only."""
        b, t = x.shape[:2]
        keep = torch.arange(t, device=x.device)[None, :] < lengths[:, None]
        h = self._embed(x, positions)
        rows, last = torch.arange(b, device=x.device), lengths - 1
        if not self.layers:
            return h[rows, last]
        mask = self._mask(keep)
        for layer in self.layers[:-1]:
            h = layer(h, h, mask, self.causal)
        # the last query sees every real token (right padding: none comes after it)
        final = keep[:, None, None, :] if mask is not None else None
        return self.layers[-1](h[rows, last][:, None], h, final, False)[:, 0]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Reads checkpoints written with BertModel's parameter names (renamed here; its unused word table
        dropped)."""
        for key in [k for k in state_dict if k.startswith(prefix)]:
            rest = key[len(prefix) :]
            if rest in _LEGACY_UNUSED:
                del state_dict[key]
                continue
            for old, new in _LEGACY:
                if re.match(old, rest):
                    state_dict[prefix + re.sub(old, new, rest, count=1)] = state_dict.pop(key)
                    break
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
