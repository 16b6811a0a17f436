"""Catalogue-wide inputs of the policy, formed inside the RLModule from the observation's item lists.

The environment's observation carries the items a user consumed so far as a fixed-length list of item
indices (``Obs.CONSUMED``, padded with ``n_items``), not a mask over the catalogue, and its exposure and
co-occurrence features as (items, values) lists of fixed length: a step then costs the same to store and ship
at 1,682 items as at 100,000. The module, the learners and the replay evaluation turn them into catalogue-wide
rows where they form logits over the catalogue anyway; a policy over candidates reads the lists at its
candidates only (:func:`legal_at`, :func:`feature_at`, :func:`candidate_count`).
"""

from __future__ import annotations

from typing import Any

import torch

from rec_rllib.columns import Obs


def legal_actions(obs: dict[str, Any], n_items: int) -> torch.Tensor:
    """[B, n_items] bool: True where the item may be recommended (not among the consumed items)."""
    consumed = torch.as_tensor(obs[Obs.CONSUMED]).long()
    legal = torch.ones(consumed.shape[0], n_items + 1, dtype=torch.bool, device=consumed.device)
    legal.scatter_(1, consumed.clamp(0, n_items), False)  # the padding index n_items falls off the end
    return legal[:, :n_items]


def is_legal(obs: dict[str, Any], items: torch.Tensor) -> torch.Tensor:
    """[B] bool: whether each row's item in ``items`` [B] may be recommended."""
    consumed = torch.as_tensor(obs[Obs.CONSUMED]).long()
    return (consumed != items.long()[:, None]).all(dim=1)


def dense_feature(obs: dict[str, Any], items_key: str, values_key: str, n_items: int) -> torch.Tensor:
    """[B, n_items] float32: a sparse feature of the observation (``items_key``: item indices padded with
    ``n_items``; ``values_key``: their values) with 0 for every item it does not list."""
    items = torch.as_tensor(obs[items_key]).long()
    values = torch.as_tensor(obs[values_key]).float()
    out = torch.zeros(items.shape[0], n_items + 1, dtype=torch.float32, device=items.device)
    out.scatter_(1, items.clamp(0, n_items), values)  # the padding index n_items falls off the end
    return out[:, :n_items]


def _lookup(items: torch.Tensor, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row, where each of ``candidates`` [B, K] stands in that row's list ``items`` [B, L] (sorted
    position, order) and whether it is there at all: a sort and a binary search per row, O(K log L)."""
    ordered, order = items.sort(dim=1)
    pos = torch.searchsorted(ordered, candidates).clamp(max=items.shape[1] - 1)
    found = ordered.gather(1, pos) == candidates
    return order.gather(1, pos), found


def legal_at(obs: dict[str, Any], candidates: torch.Tensor) -> torch.Tensor:
    """[B, K] bool: whether each row's candidate items may be recommended (:func:`legal_actions` at those
    items, at a cost that follows the candidates, not the catalogue)."""
    consumed = torch.as_tensor(obs[Obs.CONSUMED]).long()
    _, found = _lookup(consumed, candidates.long())
    return ~found


def feature_at(
    obs: dict[str, Any], items_key: str, values_key: str, candidates: torch.Tensor
) -> torch.Tensor:
    """[B, K] float32: :func:`dense_feature` at each row's candidate items (0 where the list lacks one)."""
    items = torch.as_tensor(obs[items_key]).long()
    values = torch.as_tensor(obs[values_key]).float()
    where, found = _lookup(items, candidates.long())
    return values.gather(1, where) * found


CANDIDATES_AUTO = "auto"
AUTO_WHOLE_CATALOGUE_ITEMS = 4096
"""``candidate_items="auto"``: a catalogue of at most this many items is ranked whole."""
AUTO_CANDIDATES = 512
"""``candidate_items="auto"``: the candidates per state of a larger catalogue."""


def candidate_count(setting: int | str | None, n_items: int) -> int:
    """How many candidates a policy over ``n_items`` items ranks per state (0: the whole catalogue) for a
    ``candidate_items`` setting: ``"auto"`` (the whole catalogue up to :data:`AUTO_WHOLE_CATALOGUE_ITEMS`
    items, :data:`AUTO_CANDIDATES` above), K (K whenever the catalogue has more) or 0."""
    if setting == CANDIDATES_AUTO:
        return AUTO_CANDIDATES if n_items > AUTO_WHOLE_CATALOGUE_ITEMS else 0
    k = int(setting or 0)
    return k if 0 < k < n_items else 0
