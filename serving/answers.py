"""What the Serve app logs of its answers: every answer (the impression log, for off-policy estimation)
and every feedback row, as Parquet parts a background thread flushes; a replica's latest answers are kept
in memory (feedback on them needs no lookup) and sent to the shared live state in one call per
``STORE_WINDOW_S`` (feedback that reaches another replica first waits for them, see
``serving.app.RecIngress._resolve_feedback``)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from rec_rllib.data.feedback import IMPRESSION_SCHEMA, IMPRESSIONS
from serving.feedback import FeedbackLog

log = logging.getLogger("ray.serve")

RECENT_IMPRESSIONS = 4096
"""Impressions a replica keeps itself, so feedback it receives on its own answers needs no lookup."""

STORE_WINDOW_S = 0.05
"""The answers a replica finishes within this window reach the shared store in one actor call. A call per
answer costs the replica an actor submission and the store a task on every request (at one request at a
time that is a third of the CPU the answer itself takes); the window bounds what a replica killed
mid-window leaves unmatched for feedback that reaches another replica."""

STORE_BATCH = 256
"""...or as soon as this many are waiting, whichever comes first."""


def answer_row(request_id: str, impression: dict[str, Any], timestamp_ms: int) -> dict[str, Any]:
    """What the impression log (and every feedback row on that answer) records of an answer."""
    return {
        "request_id": request_id,
        "timestamp_ms": timestamp_ms,
        "user_id": impression["user_id"],
        "history": impression["history"],
        "shown": impression["shown"],
        "shown_propensities": impression["propensities"],
        "model_version": impression["model_version"],
        "strategy": impression["strategy"],
    }


class AnswerLog:
    """One ingress replica's logs of its answers and of the feedback on them (see the module docstring)."""

    def __init__(self, feedback_dir: str, state: Any, *, flush_rows: int, flush_seconds: float):
        self.state = state
        self.recent: OrderedDict[str, dict[str, Any]] = OrderedDict()  # this replica's latest answers
        self._pending: list[tuple[str, dict[str, Any]]] = []  # not yet sent to the shared store
        self._timer: asyncio.TimerHandle | None = None  # the pending answers' send
        self.feedback = FeedbackLog(feedback_dir, max_rows=flush_rows, max_seconds=flush_seconds)
        # every answer, rewarded or not (no journal: it is on the latency path), for off-policy estimation
        self.impressions = FeedbackLog(
            Path(feedback_dir) / IMPRESSIONS,
            max_rows=max(flush_rows, 1024),
            max_seconds=flush_seconds,
            schema=IMPRESSION_SCHEMA,
            journal=False,
        )
        self._stop = threading.Event()
        self._flusher = threading.Thread(target=self._flush_loop, daemon=True)
        self._flusher.start()

    def _flush_loop(self) -> None:
        while not self._stop.wait(0.5):
            for writer in (self.feedback, self.impressions):
                if writer.due():
                    try:
                        writer.flush()
                    except Exception:  # keep serving; the rows stay buffered for the next try
                        log.exception("%s flush failed", writer.dir)

    def close(self) -> None:
        self._stop.set()
        waiting = len(self._pending)
        try:  # the answers still inside the window (the store may be gone when Ray is stopping)
            self._send()
        except Exception:
            log.warning("could not send the last %d answers to the shared store", waiting)
        self.feedback.close()
        self.impressions.close()

    def record(self, request_id: str, impression: dict[str, Any]) -> None:
        """Kept here at once; sent to the shared store with every answer finished within ``STORE_WINDOW_S``
        of the first one waiting (at most ``STORE_BATCH`` together), not awaited: answers never wait for the
        store."""
        self.recent[request_id] = impression
        self.impressions.append(answer_row(request_id, impression, int(impression["time"] * 1000)))
        while len(self.recent) > RECENT_IMPRESSIONS:
            self.recent.popitem(last=False)
        self._pending.append((request_id, impression))
        if len(self._pending) >= STORE_BATCH:
            self._send()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(STORE_WINDOW_S, self._send)

    def _send(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        if batch:
            self.state.log_impressions.remote(batch)
