"""State every replica shares: live session histories, recent impressions, and items added at run time.

One named Ray actor (:class:`LiveState`) holds it, so whichever replica answers a request sees the same
thing:

* **sessions** — per user, the items of positive feedback since the user's logged history (bounded per
  user and in users, each entry expiring ``ttl_s`` after its last use). ``/recommend`` appends them to
  the logged history, so the next answer reflects a click at once, without retraining;
* **impressions** — what a ``/recommend`` showed (context, slate, propensities, model version), kept
  until feedback names its request id (bounded, expiring);
* **added items** — items created by ``POST /items`` (id, text, text embedding), with a catalogue
  version that model replicas compare with theirs to pull what they lack.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

import numpy as np

STATE_ACTOR = "rec_rllib_live_state"
STATE_NAMESPACE = "rec_rllib"


def live_state(name: str = STATE_ACTOR):
    """The shared state actor (created on first use, detached: it outlives any single replica)."""
    import ray

    return (
        ray.remote(LiveState)
        .options(name=name, namespace=STATE_NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0)
        .remote()
    )


def shutdown_state(name: str = STATE_ACTOR) -> None:
    """Kill the shared state actor (when the app is deleted)."""
    import contextlib

    import ray

    with contextlib.suppress(ValueError):
        ray.kill(ray.get_actor(name, namespace=STATE_NAMESPACE))


class _Expiring:
    """An LRU dict with a size bound and per-entry expiry."""

    def __init__(self, max_entries: int, ttl_s: float):
        self.max_entries, self.ttl_s = max_entries, ttl_s
        self._d: OrderedDict[str, tuple[float, Any]] = OrderedDict()

    def get(self, key: str) -> Any:
        hit = self._d.get(key)
        if hit is None:
            return None
        if time.monotonic() - hit[0] > self.ttl_s:
            del self._d[key]
            return None
        return hit[1]

    def put(self, key: str, value: Any) -> None:
        self._d[key] = (time.monotonic(), value)
        self._d.move_to_end(key)
        while len(self._d) > self.max_entries:
            self._d.popitem(last=False)

    def pop(self, key: str) -> Any:
        hit = self._d.pop(key, None)
        return None if hit is None or time.monotonic() - hit[0] > self.ttl_s else hit[1]

    def __len__(self) -> int:
        return len(self._d)


class LiveState:
    """The shared state (run as a named, detached-free Ray actor by the app; plain class for tests)."""

    def __init__(
        self,
        *,
        max_users: int = 100_000,
        max_session_items: int = 200,
        max_impressions: int = 200_000,
        ttl_s: float = 24 * 3600.0,
    ):
        self.sessions = _Expiring(max_users, ttl_s)
        self.impressions = _Expiring(max_impressions, ttl_s)
        self.max_session_items = max_session_items
        self.added: list[dict[str, Any]] = []  # {"item_id", "text", "embedding"}
        self.catalog_version = 0

    # -- sessions ---------------------------------------------------------------------------------------
    def context(self, user: str | None) -> tuple[list[str], int]:
        """The user's live session items (oldest first) and the catalogue version."""
        items = self.sessions.get(user) if user else None
        return list(items or []), self.catalog_version

    def has_session(self, user: str) -> bool:
        return self.sessions.get(user) is not None

    # -- impressions and feedback ------------------------------------------------------------------------------
    def log_impression(self, request_id: str, impression: dict[str, Any]) -> None:
        self.impressions.put(request_id, impression)

    def feedback(self, request_id: str, item_id: str, reward: float) -> dict[str, Any]:
        """Resolve feedback against its impression; a positive reward extends the user's session.

        Returns ``{"status": "ok", "impression": ...}``, or ``{"status": "unknown_request"}`` /
        ``{"status": "not_shown", "shown": [...]}``. The impression stays for further feedback on other
        items of the same slate.
        """
        imp = self.impressions.get(request_id)
        if imp is None:
            return {"status": "unknown_request"}
        if item_id not in imp["shown"]:
            return {"status": "not_shown", "shown": imp["shown"]}
        user = imp.get("user_id")
        if reward > 0 and user:
            items = list(self.sessions.get(user) or [])
            items.append(item_id)
            self.sessions.put(user, items[-self.max_session_items :])
        return {"status": "ok", "impression": imp}

    # -- catalogue growth -----------------------------------------------------------------------------------
    def add_item(self, item_id: str, text: str, embedding: np.ndarray) -> int:
        if any(a["item_id"] == item_id for a in self.added):
            raise ValueError(f"item {item_id!r} was already added")
        self.added.append({"item_id": item_id, "text": text, "embedding": np.asarray(embedding, np.float32)})
        self.catalog_version += 1
        return self.catalog_version

    def items_since(self, count: int) -> tuple[list[dict[str, Any]], int]:
        """Added items after the first ``count`` ones, and the current version."""
        return self.added[count:], self.catalog_version

    def stats(self) -> dict[str, int]:
        return {
            "sessions": len(self.sessions),
            "impressions": len(self.impressions),
            "added_items": len(self.added),
            "catalog_version": self.catalog_version,
        }
