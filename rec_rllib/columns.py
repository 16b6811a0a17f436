"""Column and key names used across the project, defined once (like RLlib's ``Columns``).

Every table of the canonical dataset, every evaluation result and (later) every HTTP payload refers to
these constants instead of bare strings.
"""

from __future__ import annotations


class Col:
    """Columns of the canonical dataset's tables."""

    # interactions
    USER_IDX = "user_idx"  # dense int32 index into users.parquet
    ITEM_IDX = "item_idx"  # dense int32 index into items.parquet
    TIMESTAMP = "timestamp"  # int64, in the unit named by the manifest's ``timestamp_unit``
    REWARD = "reward"  # float32: rating, click, ...
    PROPENSITY = "propensity"  # float64 in (0, 1], logging policy's probability of the shown item
    POSITION = "position"  # int16 slot in the shown list (source's own numbering)
    POLICY = "policy"  # name of the logging policy (e.g. "random", "bts")
    SOURCE_ROW = "source_row"  # int64 data-row number in the source file (0-based), the tie-breaker
    SPLIT_LOO = "split_loo"  # int8 Split code under leave-one-out by time
    SPLIT_TEMPORAL = "split_temporal"  # int8 Split code under the global temporal split
    CONTEXT_PREFIX = "ctx_"  # prefix of context-feature columns

    # users / items (id maps)
    USER_ID = "user_id"  # the source's own id, as a string
    ITEM_ID = "item_id"  # the source's own id, as a string
    TEXT = "text"  # item text read by the language model
    GENRES = "genres"  # list<string> of categories (used by diversity)


class Split:
    """Codes stored in the split columns."""

    TRAIN = 0
    VALID = 1
    TEST = 2

    NAMES = {"train": TRAIN, "valid": VALID, "test": TEST}

    @classmethod
    def code(cls, name: str) -> int:
        try:
            return cls.NAMES[name]
        except KeyError:
            raise ValueError(f"unknown split {name!r}; expected one of {sorted(cls.NAMES)}") from None


class SplitScheme:
    """Names of the split schemes a dataset carries."""

    LEAVE_ONE_OUT = "loo"
    TEMPORAL = "temporal"

    COLUMNS = {LEAVE_ONE_OUT: Col.SPLIT_LOO, TEMPORAL: Col.SPLIT_TEMPORAL}

    @classmethod
    def column(cls, scheme: str) -> str:
        try:
            return cls.COLUMNS[scheme]
        except KeyError:
            raise ValueError(
                f"unknown split scheme {scheme!r}; expected one of {sorted(cls.COLUMNS)}"
            ) from None


class Tokens:
    """Item tokens of the sequence model and of the RL observations: 0 = padding, 1 = [BOS], item i = i +
    2."""

    PAD = 0
    BOS = 1
    OFFSET = 2


class Obs:
    """Keys of the log-replay environment's observation dict (also the RLModule's inputs)."""

    HISTORY = "history"  # int64 [window + 1]: [BOS] + most recent items as tokens, right-padded
    LENGTH = "length"  # int64 [1]: tokens in HISTORY that are not padding
    # int32 [mask_items]: the items consumed so far (never recommended), oldest first, padded with n_items;
    # the RLModule forms the catalogue-wide mask from it (rec_rllib.rl.obs)
    CONSUMED = "consumed"
    # with an exposure cost: the items recommended lately (int32 [feature_items], padded with n_items) and
    # log(1 + times each was recommended) (float32, aligned, padding 0)
    EXPOSED_ITEMS = "exposed_items"
    EXPOSURE = "exposure"
    # with the co-occurrence feature: the items the item-kNN simulator gives a probability above 0 for the
    # recent window (int32 [feature_items], padded with n_items) and those probabilities (float32, aligned)
    COOCCURRING_ITEMS = "cooccurring_items"
    COOCCURRENCE = "cooccurrence"
