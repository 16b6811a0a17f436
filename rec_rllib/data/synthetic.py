"""Generated interaction logs with MovieLens-100K's shape, at any multiple of its size: what the scale
benchmarks measure cost growth on (MovieLens-100K itself stays the test bed for quality).

Shape: user activity is heavy-tailed (log-normal from a floor of 20 draws, as MovieLens' users are; a
user whose draws repeat items keeps fewer); items fall into topics whose popularity, and the popularity of
items within a topic, follow Zipf's law. Each next item is, with fixed probabilities, the *successor* of
the previous item (a fixed item-to-item transition, the sequential structure a sequence model can learn),
another item of the previous item's topic, or an item of one of the user's favourite topics. Item text
names the item and its topic's words, so a text encoder can tell topics apart. No user sees an item twice.
Sizes by ``scale``: 1 = 1,500 users / 1,682 items / ~100,000 interactions, 10 = 15,000 / 20,000 / ~1M,
100 = 150,000 / 100,000 / ~10M (:data:`SCALES`; other scales interpolate users linearly and items by
:func:`items_for_scale`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

SCALES = {1: (1_500, 1_682), 10: (15_000, 20_000), 100: (150_000, 100_000)}
"""scale -> (users, items); about 66.7 interactions per user, so scale 1 holds about 100,000."""
MEAN_PER_USER = 74.0
"""Mean interactions drawn per user; about 10% are repeats and dropped, leaving ~66.7."""
MIN_PER_USER = 20
CHUNK_USERS = 20_000

TOPIC_WORDS = (
    "space",
    "western",
    "noir",
    "romance",
    "war",
    "heist",
    "comedy",
    "horror",
    "sport",
    "music",
    "family",
    "history",
    "mystery",
    "fantasy",
    "robot",
    "ocean",
    "desert",
    "winter",
    "city",
    "island",
    "detective",
    "dragon",
    "pirate",
    "court",
    "school",
    "kitchen",
    "road",
    "jungle",
    "castle",
    "ghost",
    "alien",
    "spy",
)
TITLE_WORDS = (
    "return",
    "night",
    "last",
    "secret",
    "city",
    "dream",
    "storm",
    "edge",
    "heart",
    "shadow",
    "river",
    "fire",
    "garden",
    "letter",
    "silver",
    "promise",
    "journey",
    "empire",
    "echo",
    "winter",
    "summer",
    "bridge",
    "crown",
    "road",
    "glass",
    "stone",
    "wild",
    "broken",
    "golden",
    "hidden",
    "lost",
    "first",
)


@dataclass
class SyntheticLog:
    interactions: pd.DataFrame
    """user_id, item_id, timestamp (epoch seconds), rating (1-5): one row per interaction."""
    items: pd.DataFrame
    """item_id, text."""

    def write(self, directory: str | Path) -> tuple[Path, Path]:
        """Write ``interactions.parquet`` and ``items.parquet``, which ``jobs.prepare --dataset custom``
        reads."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        inter, items = out / "interactions.parquet", out / "items.parquet"
        self.interactions.to_parquet(inter, index=False)
        self.items.to_parquet(items, index=False)
        return inter, items


def items_for_scale(scale: float) -> int:
    """The catalogue size at ``scale``: the table's sizes, log-interpolated between them."""
    if scale in SCALES:
        return SCALES[scale][1]
    xs = sorted(SCALES)
    s = min(max(scale, xs[0]), xs[-1])
    lo = max(x for x in xs if x <= s)
    hi = min(x for x in xs if x >= s)
    if lo == hi:
        return SCALES[lo][1]
    f = (math.log(s) - math.log(lo)) / (math.log(hi) - math.log(lo))
    return int(round(math.exp((1 - f) * math.log(SCALES[lo][1]) + f * math.log(SCALES[hi][1]))))


def generate(
    scale: float = 1.0,
    *,
    n_users: int | None = None,
    n_items: int | None = None,
    seed: int = 0,
    p_successor: float = 0.35,
    p_same_topic: float = 0.3,
) -> SyntheticLog:
    """A generated log at ``scale`` × MovieLens-100K (or with ``n_users`` / ``n_items`` given)."""
    rng = np.random.default_rng(seed)
    n_users = n_users or int(round(SCALES[1][0] * scale))
    n_items = n_items or items_for_scale(scale)
    if n_users < 1 or n_items < 2 * MIN_PER_USER:
        raise ValueError(f"need at least 1 user and {2 * MIN_PER_USER} items, got {n_users} / {n_items}")

    # topics: contiguous ranges of item indices, Zipf-sized; topic popularity Zipf too
    n_topics = max(8, n_items // 60)
    topic_weight = 1.0 / np.arange(1, n_topics + 1) ** 0.9
    sizes = np.maximum(3, np.floor(topic_weight / topic_weight.sum() * n_items)).astype(np.int64)
    sizes[0] += n_items - sizes.sum()  # the remainder (either sign) to the largest topic
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    topic_of = np.repeat(np.arange(n_topics), sizes)
    # successor: a fixed random permutation within each topic (item -> the item that tends to follow it)
    successor = np.empty(n_items, dtype=np.int64)
    for t in range(n_topics):
        idx = np.arange(starts[t], starts[t] + sizes[t])
        successor[idx] = rng.permutation(idx)

    # activity: log-normal from MIN_PER_USER, mean MEAN_PER_USER, capped by the catalogue
    sigma = 1.0
    raw = rng.lognormal(mean=0.0, sigma=sigma, size=n_users)
    counts = MIN_PER_USER + raw / raw.mean() * (MEAN_PER_USER - MIN_PER_USER)
    counts = np.minimum(np.round(counts).astype(np.int64), n_items // 2)
    favourites = _zipf_topics(rng, topic_weight, (n_users, 3))
    fav_weight = rng.dirichlet(np.ones(3) * 0.7, size=n_users).cumsum(axis=1)

    # draw more than needed: repeats are dropped, then each user keeps its first ``counts`` distinct items
    drawn = np.ceil(counts * 2.5).astype(np.int64) + 20
    parts = []
    for lo in range(0, n_users, CHUNK_USERS):  # users in chunks: memory follows the chunk's longest history
        users = np.arange(lo, min(n_users, lo + CHUNK_USERS))
        seqs = _draw_sequences(
            rng,
            drawn[users],
            favourites[users],
            fav_weight[users],
            successor,
            topic_of,
            starts,
            sizes,
            p_successor,
            p_same_topic,
        )
        part = pd.DataFrame({"u": np.repeat(users, drawn[users]), "i": seqs[seqs >= 0]})
        part = part.drop_duplicates(["u", "i"], keep="first")  # nobody sees an item twice
        parts.append(part[part.groupby("u", sort=False).cumcount().to_numpy() < counts[part["u"].to_numpy()]])
    frame = pd.concat(parts, ignore_index=True)
    start = rng.integers(874_724_710, 893_286_638, size=n_users)  # MovieLens-100K's time span
    frame["g"] = rng.exponential(3_600.0, size=len(frame)).astype(np.int64) + 1  # seconds between items
    frame["t"] = start[frame["u"].to_numpy()] + frame.groupby("u", sort=False)["g"].cumsum().to_numpy()
    ratings = np.clip(np.round(rng.normal(3.6, 1.1, size=len(frame))), 1, 5).astype(np.int64)
    interactions = pd.DataFrame(
        {
            "user_id": (frame["u"].to_numpy() + 1).astype(str),
            "item_id": (frame["i"].to_numpy() + 1).astype(str),
            "timestamp": frame["t"].to_numpy(),
            "rating": ratings,
        }
    )
    return SyntheticLog(interactions, _item_texts(rng, n_items, topic_of, n_topics))


def _draw_sequences(
    rng: np.random.Generator,
    drawn: np.ndarray,
    favourites: np.ndarray,
    fav_weight: np.ndarray,
    successor: np.ndarray,
    topic_of: np.ndarray,
    starts: np.ndarray,
    sizes: np.ndarray,
    p_successor: float,
    p_same_topic: float,
) -> np.ndarray:
    """[users, longest] item sequences (-1 past each user's ``drawn`` items), all users a step at a time."""
    max_len = int(drawn.max())
    seqs = np.full((len(drawn), max_len), -1, dtype=np.int32)
    prev = _item_in_topic(rng, favourites[:, 0], starts, sizes)
    seqs[:, 0] = prev
    for step in range(1, max_len):
        active = np.flatnonzero(drawn > step)
        if not len(active):
            break
        p = prev[active]
        u = rng.random(len(active))
        nxt = np.empty(len(active), dtype=np.int64)
        succ = u < p_successor
        same = (u >= p_successor) & (u < p_successor + p_same_topic)
        fav = ~(succ | same)
        nxt[succ] = successor[p[succ]]
        nxt[same] = _item_in_topic(rng, topic_of[p[same]], starts, sizes)
        pick = (rng.random(int(fav.sum()))[:, None] > fav_weight[active[fav]]).sum(axis=1)
        nxt[fav] = _item_in_topic(rng, favourites[active[fav], pick], starts, sizes)
        seqs[active, step] = nxt
        prev[active] = nxt
    return seqs


def _zipf_topics(rng: np.random.Generator, weight: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return rng.choice(len(weight), size=shape, p=weight / weight.sum())


def _item_in_topic(
    rng: np.random.Generator, topics: np.ndarray, starts: np.ndarray, sizes: np.ndarray
) -> np.ndarray:
    """An item of each given topic, Zipf-distributed by rank within the topic (rank r with weight ~ 1/r)."""
    size = sizes[topics]
    rank = np.floor(np.exp(rng.random(len(topics)) * np.log(size + 1.0)) - 1.0).astype(np.int64)
    return starts[topics] + np.minimum(rank, size - 1)


def _item_texts(rng: np.random.Generator, n_items: int, topic_of: np.ndarray, n_topics: int) -> pd.DataFrame:
    """A title of two words and a number, then the topic's three words (shared by the topic's items)."""
    topic_words = [" ".join(rng.choice(TOPIC_WORDS, size=3, replace=False)) for _ in range(n_topics)]
    a = rng.integers(0, len(TITLE_WORDS), n_items)
    b = rng.integers(0, len(TITLE_WORDS), n_items)
    text = [
        f"The {TITLE_WORDS[a[i]]} {TITLE_WORDS[b[i]]} {i % 97 + 1} | {topic_words[topic_of[i]]}"
        for i in range(n_items)
    ]
    return pd.DataFrame({"item_id": [str(i + 1) for i in range(n_items)], "text": text})
