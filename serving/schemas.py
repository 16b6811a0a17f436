"""Request and response bodies of the HTTP API (pydantic). Unknown fields are refused, with their names."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from rec_rllib.explore import ExplorationConfig

MAX_HISTORY = 2_000
MAX_TEXT = 2_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _not_blank(v: str) -> str:
    if not v.strip():
        raise ValueError("must contain more than whitespace")
    return v


class Exploration(_Strict):
    exploration: Literal["greedy", "epsilon", "boltzmann", "thompson", "ucb"] = Field(
        "greedy",
        description="greedy (propensity 1), epsilon (epsilon-greedy), boltzmann (softmax / T), thompson "
        "(softmax / T of one MC-dropout sample of the scores; propensities given the sample) or ucb (top-k "
        "of score + a LinUCB bonus for items this replica has shown little in the user's direction; "
        "propensity 1)",
    )
    epsilon: float = Field(0.1, ge=0.0, le=1.0, description="exploration probability of `epsilon`")
    temperature: float = Field(1.0, gt=0.0, le=100.0, description="temperature of `boltzmann` and `thompson`")
    ucb_alpha: float = Field(
        ExplorationConfig.ucb_alpha,
        ge=0.0,
        le=100.0,
        description="`ucb` bonus width in score units (what a never-shown item gains)",
    )
    exposure: bool = Field(
        True,
        description="apply the replica's exposure rotation (the policy's price on items shown lately, the "
        "exposure slot); false: the policy's scores alone",
    )
    seed: int | None = Field(
        None,
        ge=0,
        le=2**63 - 1,
        description="seeds the exploration draw: the same request and seed against the same state give the "
        "same list (a replayed request; two endpoints compared on the same draws); null: a fresh draw",
    )


class RecommendRequest(Exploration):
    user: str | None = Field(None, max_length=200, description="a known user id (logged or live session)")
    history: list[str] | None = Field(
        None, max_length=MAX_HISTORY, description="item ids, oldest first; [] for a brand-new user"
    )
    k: int = Field(10, ge=1, description="how many items (at most the catalogue size)")
    exclude_seen: bool = True
    explain: bool = Field(
        False, description="per item, the history items its score owes most to (the drop without each)"
    )


class QueryRequest(Exploration):
    text: str = Field(..., min_length=1, max_length=MAX_TEXT, description="what the user is looking for")
    user: str | None = Field(None, max_length=200)
    history: list[str] | None = Field(None, max_length=MAX_HISTORY)
    k: int = Field(10, ge=1)
    exclude_seen: bool = True
    query_weight: float = Field(
        0.8, ge=0.0, le=1.0, description="weight of the text match vs. the history (when there is one)"
    )

    @field_validator("text")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        return _not_blank(v)


class FeedbackRequest(_Strict):
    request_id: str = Field(
        ..., min_length=1, max_length=64, description="from a /recommend or /query answer"
    )
    item_id: str = Field(..., min_length=1, max_length=200, description="one of the items that answer showed")
    reward: float = Field(..., description="click = 1, rating, ...; > 0 extends the user's live history")

    @field_validator("reward")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("reward must be a finite number")
        return v


class NewItemRequest(_Strict):
    item_id: str = Field(..., min_length=1, max_length=200, description="a new, unused item id")
    text: str = Field(..., min_length=1, max_length=MAX_TEXT, description='e.g. "Title (2031) | Genre|Genre"')

    @field_validator("item_id", "text")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        return _not_blank(v)


class Because(BaseModel):
    item_id: str
    text: str
    score_drop: float = Field(
        description="how much the recommended item's score falls when the history is read without this item"
    )


class ShownItem(BaseModel):
    item_id: str
    text: str
    score: float = Field(
        description="what the list is sorted by (greedy, ucb) or drawn from (explored): the policy's score, "
        "less the exposure price when applied, plus the `ucb` bonus"
    )
    propensity: float = Field(description="probability that the policy showed this item at this position")
    exposure: bool = Field(
        False, description="given the exposure slot: an item not shown lately that this user ranks just below"
    )
    bonus: float | None = Field(None, description="`ucb`: the exploration bonus added to the score")
    because: list[Because] | None = None


class RecommendResponse(BaseModel):
    request_id: str
    model_version: str
    user: str | None
    strategy: str = Field(description="how the list was chosen: greedy, or the exploration that drew it")
    cold_start: bool
    history_items: int = Field(description="items of the user's history the answer was computed from")
    session_items: int = Field(description="of those, items added live by feedback (or sent in `history`)")
    exposure_epoch: int | None = Field(
        description="the scoring replica's exposure rotation the list was priced by (answers of one epoch "
        "and replica are priced alike); null when no exposure rotation applied"
    )
    seed: int | None = Field(None, description="the seed the exploration draw used (the request's), or null")
    items: list[ShownItem]
    served_by: dict[str, str]
