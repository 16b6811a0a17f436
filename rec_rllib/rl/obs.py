"""Catalogue-wide inputs of the policy, formed inside the RLModule from the observation's item lists.

The environment's observation carries the items a user consumed so far as a fixed-length list of item
indices (``Obs.CONSUMED``, padded with ``n_items``), not a mask over the catalogue, and its exposure and
co-occurrence features as (items, values) lists of fixed length: a step then costs the same to store and ship
at 1,682 items as at 100,000. The module, the learners and the replay evaluation turn them into catalogue-wide
rows where they form logits over the catalogue anyway.
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
