"""A replica's view of the live state every replica shares (:mod:`serving.state`): the users' session items
from a mirror the replica keeps current by polling (no round trip per request while it is trusted), and the
items added at run time, synced into the replica's catalogue."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from serving.catalog import ServingCatalog
from serving.state import SessionMirror

log = logging.getLogger("ray.serve")


class LiveView:
    def __init__(self, state: Any, catalog: ServingCatalog, replica: str):
        self.state, self.catalog, self.replica = state, catalog, replica
        self._base_items = catalog.n_items
        self.synced = 0
        """The catalogue version this replica's catalogue holds."""
        self.mirror = SessionMirror()
        self._poller: asyncio.Task | None = None
        self._stopped = False

    def stop(self) -> None:
        self._stopped = True

    def start_polling(self) -> None:
        """Keep the session mirror current (started by the first request, on the loop requests run on)."""
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll_loop())

    async def _poll_loop(self) -> None:
        while not self._stopped:
            sent = time.monotonic()
            try:
                answer = await self.state.poll.remote(self.replica, self.mirror.seq)
            except Exception:  # the store restarting: the mirror's lease runs out, requests read directly
                log.warning("live-state poll failed; retrying", exc_info=True)
                await asyncio.sleep(0.2)
                continue
            self.mirror.apply(answer, sent)
            if self.mirror.catalog_version > self.synced:
                try:
                    await self.sync(self.mirror.catalog_version)
                except Exception:
                    log.exception("catalogue sync failed")
                    self.mirror.valid_until = 0.0  # distrust until a later poll syncs it

    async def session(self, user: str | None) -> tuple[list[str], int]:
        """The user's live session items and the catalogue version: from the mirror while it is trusted
        (no round trip), else from the shared store."""
        self.start_polling()
        if self.mirror.trusted() and self.synced >= self.mirror.catalog_version:
            return self.mirror.session(user), self.mirror.catalog_version
        session, version = await self.state.context.remote(user)
        await self.sync(version)
        return session, version

    async def refresh(self) -> int:
        """The shared store's catalogue version, with this replica's catalogue synced to it."""
        _, version = await self.state.context.remote(None)
        await self.sync(version)
        return version

    async def publish(self, seq: int | None) -> None:
        """Return only once every replica's mirror holds change ``seq`` (or has stopped being trusted)."""
        if seq is not None and not await self.state.wait_synced.remote(seq):
            log.warning("a replica did not acknowledge change %d within its lease", seq)

    async def sync(self, version: int) -> None:
        if version > self.synced:
            added, current = await self.state.items_since.remote(self.catalog.n_items - self._base_items)
            for a in added:
                self.catalog.add(a["item_id"], a["text"])
            self.synced = current
