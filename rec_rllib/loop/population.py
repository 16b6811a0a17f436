"""A simulated population for the closed loop: logged users replayed as live ones, clicking by their own
future.

Each simulated user is a logged user split in time: the first ``prefix`` fraction of their items is the
history they arrive with (sent with every request, as a client that knows its user's past does), the rest
is their **future**, which no policy is shown. Given a list, the user clicks the highest-placed item of
their future not clicked yet. A visit without a click moves them on anyway: they consume their next logged
item elsewhere (it joins the history they send), as a real user's life goes on between visits; so their
lists keep changing and their future runs out in the order it happened. The click model is the log itself,
not a model any policy was trained on; which users it replays (e.g. users held out of the starting model's
training) is the caller's choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from rec_rllib.columns import Col
from rec_rllib.data.dataset import LogDataset


@dataclass
class SimUser:
    """One simulated user: the id the endpoint knows them by, their history, their future."""

    uid: str
    """The endpoint's user id (a prefix + the logged user's id: a user the endpoint never saw)."""
    logged_user: str
    history: list[str]
    """Item ids, oldest first: what they arrive with."""
    future: set[str]
    """Item ids they will click when shown."""
    ahead: list[str] = field(default_factory=list)
    """Their future in logged order: what they consume next when a visit brings no click."""
    clicked: list[str] = field(default_factory=list)

    @property
    def done(self) -> bool:
        """Nothing of their future left to click or consume."""
        return not any(item not in self.clicked for item in self.ahead)

    def click(self, shown: Sequence[str]) -> tuple[int, str] | None:
        """(position, item) of the first shown item of their future not clicked yet; None when none is, and
        then they consume their next logged item (:meth:`move_on`)."""
        for pos, item in enumerate(shown):
            if item in self.future and item not in self.clicked:
                self.clicked.append(item)
                return pos, item
        self.move_on()
        return None

    def move_on(self) -> None:
        """Consume the next logged item not clicked yet: it joins the history and leaves the future."""
        while self.ahead:
            item = self.ahead.pop(0)
            if item not in self.clicked:
                self.history.append(item)
                self.future.discard(item)
                return


def population(
    dataset: LogDataset,
    users: Sequence[str] | int,
    *,
    prefix: float = 0.5,
    min_items: int = 10,
    id_prefix: str = "sim-",
    seed: int = 0,
) -> list[SimUser]:
    """Simulated users of ``dataset``: the logged users named (or ``users`` of them drawn at random, seeded,
    among those with at least ``min_items`` items), each split in time at ``prefix``."""
    if not 0.0 < prefix < 1.0:
        raise ValueError(f"prefix must be in (0, 1), got {prefix}")
    inter = dataset.interactions.sort_values([Col.USER_IDX, Col.TIMESTAMP, Col.SOURCE_ROW], kind="stable")
    user_ids = dataset.users[Col.USER_ID].astype(str).to_numpy()
    item_ids = dataset.items[Col.ITEM_ID].astype(str).to_numpy()
    seqs: dict[str, list[str]] = {}
    for u, items in inter.groupby(Col.USER_IDX, sort=False)[Col.ITEM_IDX]:
        seqs[str(user_ids[u])] = [str(i) for i in item_ids[items.to_numpy()]]
    eligible = sorted((u for u, s in seqs.items() if len(s) >= min_items), key=_id_order)
    if isinstance(users, int):
        if users > len(eligible):
            raise ValueError(f"{users} users asked for; {len(eligible)} have at least {min_items} items")
        rng = np.random.default_rng(seed)
        chosen = [eligible[i] for i in np.sort(rng.choice(len(eligible), users, replace=False))]
    else:
        unknown = [u for u in users if str(u) not in seqs]
        if unknown:
            raise ValueError(f"users not in {dataset.name}: {unknown[:10]}")
        chosen = [str(u) for u in users]
    out = []
    for u in chosen:
        seq = seqs[u]
        cut = max(1, int(round(prefix * len(seq))))
        past = seq[:cut]
        ahead = [i for i in dict.fromkeys(seq[cut:]) if i not in set(past)]
        out.append(SimUser(f"{id_prefix}{u}", u, past, set(ahead), ahead))
    return out


def _id_order(uid: str) -> tuple[int, int | str]:
    return (0, int(uid)) if uid.isdigit() else (1, uid)
