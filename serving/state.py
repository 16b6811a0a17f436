"""State every replica shares: live session histories, recent impressions, and items added at run time.

One named Ray actor (:class:`LiveState`) holds it, so whichever replica answers a request sees the same
thing:

* **sessions** — per user, the items of positive feedback since the user's logged history (bounded per
  user and in users, each session expiring ``ttl_s`` after its last click). ``/recommend`` appends them
  to the logged history, so the next answer reflects a click at once, without retraining;
* **impressions** — what a ``/recommend`` showed (context, slate, propensities, model version), kept
  until feedback names its request id (bounded, expiring);
* **added items** — items created by ``POST /items`` (id, text, text embedding), with a catalogue
  version that model replicas compare with theirs to pull what they lack.

**Replicas read sessions from a local mirror, not from the actor.** A read per request would cost every
``/recommend`` an actor round trip (~1.3 ms on 2 cores, a third of a plain FastAPI answer). Instead every
change (a session extended or dropped, an item added) gets a sequence number, and each ingress replica
keeps a :class:`SessionMirror` current by long-polling :meth:`LiveState.poll`. Read-your-writes across
replicas comes from two rules:

* a writer (``/feedback``, ``POST /items``) returns only after :meth:`LiveState.wait_synced`: every
  replica that polled within the lease has acknowledged the change (its next poll carries the new
  sequence number), or the lease has run out;
* a replica trusts its mirror only for ``LEASE_S`` after sending the poll that last answered; past that
  (the actor unreachable, the replica stalled) it reads from the actor directly until a poll answers.

So a replica that missed a change has stopped trusting its mirror before the writer gives up waiting on
it, and the next ``/recommend`` for that user, on any replica, sees the click.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict, deque
from typing import Any

import numpy as np

from serving.settings import STATE_ACTOR

STATE_NAMESPACE = "rec_rllib"
LEASE_S = 1.0
"""How long a replica trusts its mirror after sending the poll that last answered."""
POLL_S = 0.25
"""How long a poll waits for a change before it answers empty (a healthy replica renews its lease 4x)."""
CHANGE_LOG = 20_000
"""Changes kept for replicas that fall behind; one further behind gets a snapshot."""


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
    """An LRU dict with a size bound and per-entry expiry (since the entry's last ``put``)."""

    def __init__(self, max_entries: int, ttl_s: float):
        self.max_entries, self.ttl_s = max_entries, ttl_s
        self._d: OrderedDict[str, tuple[float, Any]] = OrderedDict()

    def get(self, key: str) -> Any:
        hit = self._d.get(key)
        if hit is None:
            return None
        if time.time() - hit[0] > self.ttl_s:
            del self._d[key]
            return None
        return hit[1]

    def put(self, key: str, value: Any) -> list[str]:
        """Store; returns the keys evicted to stay within the size bound."""
        self._d[key] = (time.time(), value)
        self._d.move_to_end(key)
        evicted = []
        while len(self._d) > self.max_entries:
            evicted.append(self._d.popitem(last=False)[0])
        return evicted

    def pop(self, key: str) -> Any:
        hit = self._d.pop(key, None)
        return None if hit is None or time.time() - hit[0] > self.ttl_s else hit[1]

    def items(self) -> list[tuple[str, tuple[float, Any]]]:
        now = time.time()
        return [(k, v) for k, v in self._d.items() if now - v[0] <= self.ttl_s]

    def __len__(self) -> int:
        return len(self._d)


class SessionMirror:
    """A replica's copy of the live sessions and the catalogue version, kept current by
    :meth:`LiveState.poll` answers (see the module docstring for when it may be trusted)."""

    def __init__(self, ttl_s: float = 24 * 3600.0):
        self.ttl_s = ttl_s
        self.sessions: dict[str, tuple[float, list[str]]] = {}
        self.seq = -1  # -1: nothing received yet (the first poll answers with a snapshot)
        self.catalog_version = 0
        self.valid_until = 0.0  # time.monotonic() deadline

    def trusted(self) -> bool:
        return self.seq >= 0 and time.monotonic() < self.valid_until

    def session(self, user: str | None) -> list[str]:
        hit = self.sessions.get(user) if user else None
        if hit is None:
            return []
        if time.time() - hit[0] > self.ttl_s:
            del self.sessions[user]
            return []
        return list(hit[1])

    def apply(self, answer: dict[str, Any], sent_at: float) -> None:
        """Apply a poll answer; ``sent_at`` is the monotonic time the poll was sent."""
        if "snapshot" in answer:
            snap = answer["snapshot"]
            self.sessions = {u: (t, list(items)) for u, (t, items) in snap["sessions"].items()}
            self.catalog_version = snap["catalog_version"]
        for _, kind, data in answer.get("changes", ()):
            if kind == "session":
                self.sessions[data["user"]] = (data["t"], list(data["items"]))
            elif kind == "drop":
                self.sessions.pop(data["user"], None)
            elif kind == "item":
                self.catalog_version = max(self.catalog_version, data["catalog_version"])
        self.seq = answer["seq"]
        self.valid_until = sent_at + LEASE_S


class LiveState:
    """The shared state (run as a named, detached Ray actor by the app; a plain class in tests).

    Async methods make it an asyncio actor: a poll that waits for changes does not hold up other calls.
    """

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
        self.seq = 0
        self.changes: deque[tuple[int, str, dict[str, Any]]] = deque(maxlen=CHANGE_LOG)
        self.acks: dict[str, tuple[int, float]] = {}  # replica -> (seq it has applied, monotonic time)
        # one-shot events, replaced after each firing: "a change was published" (wakes polls) and
        # "a replica acknowledged" (wakes wait_synced)
        self._events: dict[str, asyncio.Event] = {}
        self.loop: dict[str, Any] | None = None  # the closed loop's last decision (jobs.loop), if one runs

    def _event(self, name: str) -> asyncio.Event:
        if name not in self._events:
            self._events[name] = asyncio.Event()
        return self._events[name]

    def _fire(self, name: str) -> None:
        event = self._events.pop(name, None)
        if event is not None:
            event.set()

    async def _wait(self, name: str, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event(name).wait(), max(timeout_s, 0.0))

    def _publish(self, kind: str, data: dict[str, Any]) -> int:
        self.seq += 1
        self.changes.append((self.seq, kind, data))
        self._fire("changed")
        return self.seq

    # -- sessions ---------------------------------------------------------------------------------------
    def context(self, user: str | None) -> tuple[list[str], int]:
        """The user's live session items (oldest first) and the catalogue version (the direct read a
        replica falls back to when its mirror is not trusted)."""
        items = self.sessions.get(user) if user else None
        return list(items or []), self.catalog_version

    def has_session(self, user: str) -> bool:
        return self.sessions.get(user) is not None

    # -- replication --------------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        return {
            "sessions": {u: (t, list(items)) for u, (t, items) in self.sessions.items()},
            "catalog_version": self.catalog_version,
        }

    async def poll(self, replica: str, since: int, timeout_s: float = POLL_S) -> dict[str, Any]:
        """Changes after ``since`` (waiting up to ``timeout_s`` for one), or a snapshot when the replica is
        new (``since`` < 0) or further behind than the change log reaches. Calling it acknowledges
        ``since``: the caller has applied everything up to it."""
        self.acks[replica] = (since, time.monotonic())
        self._fire("acked")
        if since >= 0 and since >= self.seq:
            await self._wait("changed", timeout_s)
        oldest = self.changes[0][0] if self.changes else self.seq + 1
        if since < 0 or since + 1 < oldest:
            return {"seq": self.seq, "snapshot": self.snapshot()}
        return {"seq": self.seq, "changes": [c for c in self.changes if c[0] > since]}

    async def wait_synced(self, seq: int, timeout_s: float = LEASE_S + POLL_S) -> bool:
        """Wait until every replica that polled within the lease has applied change ``seq``. False when
        the time ran out first (the laggards' leases have expired by then: they read from here)."""
        start = time.monotonic()
        deadline = start + timeout_s
        waiting = {r for r, (acked, t) in self.acks.items() if acked < seq and start - t <= LEASE_S}
        while True:
            now = time.monotonic()
            waiting = {r for r in waiting if self.acks[r][0] < seq}
            if not waiting:
                return True
            if now >= deadline or all(now - self.acks[r][1] > LEASE_S for r in waiting):
                return False  # the laggards' leases have run out: they read from the store now
            await self._wait("acked", deadline - now)

    # -- impressions and feedback ----------------------------------------------------------------------------
    def log_impression(self, request_id: str, impression: dict[str, Any]) -> None:
        self.impressions.put(request_id, impression)

    def log_impressions(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        for request_id, impression in batch:
            self.impressions.put(request_id, impression)

    async def feedback(
        self, request_id: str, item_id: str, reward: float, impression: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Resolve feedback against its impression (``impression``: the replica that served the request
        still holds it; else it is looked up here); a positive reward extends the user's session.

        Returns ``{"status": "ok", "impression": ..., "seq": <change number or None>}``, or
        ``{"status": "unknown_request"}`` / ``{"status": "not_shown", "shown": [...]}``. The impression
        stays for further feedback on other items of the same slate.
        """
        imp = self.impressions.get(request_id)
        if imp is None and impression is not None:
            imp = impression
            self.impressions.put(request_id, imp)
        if imp is None:
            return {"status": "unknown_request"}
        if item_id not in imp["shown"]:
            return {"status": "not_shown", "shown": imp["shown"]}
        user = imp.get("user_id")
        seq = None
        if reward > 0 and user:
            items = list(self.sessions.get(user) or [])
            items.append(item_id)
            items = items[-self.max_session_items :]
            for dropped in self.sessions.put(user, items):
                self._publish("drop", {"user": dropped})
            seq = self._publish("session", {"user": user, "items": items, "t": time.time()})
        return {"status": "ok", "impression": imp, "seq": seq}

    # -- catalogue growth -----------------------------------------------------------------------------------
    async def add_item(self, item_id: str, text: str, embedding: np.ndarray) -> tuple[int, int]:
        """Returns (catalogue version, change number)."""
        if any(a["item_id"] == item_id for a in self.added):
            raise ValueError(f"item {item_id!r} was already added")
        self.added.append({"item_id": item_id, "text": text, "embedding": np.asarray(embedding, np.float32)})
        self.catalog_version += 1
        seq = self._publish("item", {"item_id": item_id, "catalog_version": self.catalog_version})
        return self.catalog_version, seq

    def set_loop_status(self, status: dict[str, Any]) -> None:
        """What the closed loop (``jobs.loop``) last decided; shown by every replica's ``/healthz``."""
        self.loop = status

    def loop_status(self) -> dict[str, Any] | None:
        return self.loop

    def items_since(self, count: int) -> tuple[list[dict[str, Any]], int]:
        """Added items after the first ``count`` ones, and the current version."""
        return self.added[count:], self.catalog_version

    def stats(self) -> dict[str, int]:
        now = time.monotonic()
        return {
            "sessions": len(self.sessions),
            "impressions": len(self.impressions),
            "added_items": len(self.added),
            "catalog_version": self.catalog_version,
            "seq": self.seq,
            "replicas_polling": sum(now - t <= LEASE_S for _, t in self.acks.values()),
        }
