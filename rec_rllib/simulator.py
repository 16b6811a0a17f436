"""The item-kNN user-response model: the ``simulator`` reward of the replay environment and the
co-occurrence feature of the RL policy (:class:`ItemKNNSimulator`), fitted once per process and dataset
(:func:`shared_simulator`).

This module never imports torch.
"""

from __future__ import annotations

import numpy as np

from rec_rllib.exposure import largest
from rec_rllib.replay import read_train_histories

_SIMULATORS: dict[tuple[str, str], ItemKNNSimulator] = {}


def shared_simulator(dataset: str, scheme: str) -> ItemKNNSimulator:
    """The :class:`ItemKNNSimulator` of a dataset's train split, fitted once per process (every
    sub-environment of an env runner reads the same; it is fitted on every train user, not only the runner's
    shard)."""
    key = (str(dataset), str(scheme))
    if key not in _SIMULATORS:
        histories, manifest = read_train_histories(dataset, scheme)
        counts = manifest["counts"]
        _SIMULATORS[key] = ItemKNNSimulator(histories, int(counts["items"]), int(counts["users"]))
    return _SIMULATORS[key]


def _no_feature() -> tuple[np.ndarray, np.ndarray]:
    """The co-occurrence feature of an empty window: no item (its flat 0.01 tells no item from another)."""
    return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)


class ItemKNNSimulator:
    """User-response model: P(click | recent items) from item-item cosine similarity of train co-occurrence.

    score(a | window) = mean over the window's items j of cos(a, j), where items are vectors of the users
    who consumed them; scores are mapped to (0, 1) by dividing by the best score among all items.

    Memory: the co-occurrence counts are kept sparse (scipy CSR, O(pairs of items some user consumed both
    of)), and dense when the catalogue is small enough that an ``n_items²`` float32 matrix fits in
    :attr:`DENSE_BYTES` (MovieLens-100K: 11 MB, one array, faster rows). Cosine rows are computed when asked
    for (:meth:`rows`), never as a full ``n × n`` similarity matrix, and the user × item matrix is sparse.
    """

    DENSE_BYTES = 64 << 20

    def __init__(self, histories: dict[int, tuple[np.ndarray, np.ndarray]], n_items: int, n_users: int):
        """Fitted on ``{user_idx: (items, rewards)}`` (:func:`~rec_rllib.replay.read_train_histories`;
        rewards are not used)."""
        items = [np.asarray(i, dtype=np.int64) for i, _ in histories.values()]
        users = [np.full(len(i), u, dtype=np.int64) for u, i in zip(histories, items, strict=True)]
        empty = np.zeros(0, dtype=np.int64)
        self._fit(
            np.concatenate(users) if users else empty,
            np.concatenate(items) if items else empty,
            n_items,
            n_users,
        )

    @classmethod
    def from_pairs(cls, users: np.ndarray, items: np.ndarray, n_items: int, n_users: int) -> ItemKNNSimulator:
        """Fitted on interactions given as two index columns (a data frame's, a Parquet table's)."""
        sim = cls.__new__(cls)
        sim._fit(np.asarray(users, dtype=np.int64), np.asarray(items, dtype=np.int64), n_items, n_users)
        return sim

    def _fit(self, users: np.ndarray, items: np.ndarray, n_items: int, n_users: int) -> None:
        from scipy import sparse

        self.n_items = int(n_items)
        ui = sparse.csr_matrix(  # duplicates summed, then 1: a user who consumed an item twice counts once
            (np.ones(len(items), dtype=np.float32), (items, users)),
            shape=(self.n_items, max(int(n_users), 1)),
        )
        ui.data[:] = 1.0
        co = (ui @ ui.T).tocsr()  # [n, n] users who consumed both items (exact small integers in float32)
        self.users = co.diagonal().astype(np.float32)  # [n] users who consumed each item
        self.co = co.toarray() if self.n_items**2 * 4 <= self.DENSE_BYTES else co
        self._norms = np.sqrt(np.where(self.users > 0, self.users, 1.0)).astype(np.float32)

    def _co_rows(self, items: np.ndarray) -> np.ndarray:
        """[len(items), n] dense co-occurrence counts of ``items`` with every item."""
        rows = self.co[items]
        return rows if isinstance(rows, np.ndarray) else rows.toarray()

    def probabilities(self, window: np.ndarray, *, without: np.ndarray | None = None) -> np.ndarray:
        """[n_items] click probabilities given the recent items.

        ``without``: the train items of the user being scored, taken out of the co-occurrence first
        (leave-user-out: the cosines as if that user were not in the train split), so that replaying a train
        user does not score items by the user's own future: what the policy's co-occurrence feature sees in
        training (:class:`~rec_rllib.env.LogReplayEnv` with ``cooccurrence``). Evaluation and serving compute
        the feature the same way, with the history they are given as ``without`` (its train part is then taken
        out exactly; items the fit never saw with the user change only the normalisation of their own row)."""
        return self.from_rows(self.rows(window, without=without))

    def rows(self, items: np.ndarray, *, without: np.ndarray | None = None) -> np.ndarray:
        """[len(items), n_items] the cosine of each of ``items`` with every item (0 with itself),
        ``without``'s owner taken out of the fit as in :meth:`probabilities`. A replayed episode computes the
        rows of the items its windows can hold once (:class:`~rec_rllib.env.LogReplayEnv`); each step then
        averages the window's."""
        items = np.asarray(items, dtype=np.int64)
        co = self._co_rows(items)
        if without is None:
            out = co / self._norms[items][:, None] / self._norms[None, :]
        else:
            x = np.zeros(self.n_items, dtype=np.float32)
            x[without] = 1.0
            co = np.maximum(co - x[items][:, None] * x[None, :], 0.0)  # [w, n]
            den = np.sqrt(np.maximum(self.users[items] - x[items], 0.0))[:, None] * np.sqrt(
                np.maximum(self.users - x, 0.0)
            )
            out = np.divide(co, den, out=np.zeros_like(co), where=den > 0)
        out[np.arange(len(items)), items] = 0.0
        return out

    def from_rows(self, rows: np.ndarray) -> np.ndarray:
        """[n_items] probabilities from a window's similarity rows (:meth:`rows`): their mean over the best
        item's, in [0, 1]; 0.01 for every item when the window is empty."""
        if len(rows) == 0:
            return np.full(self.n_items, 0.01)
        s = rows.mean(axis=0)
        return np.clip(s / max(float(s.max()), 1e-9), 0.0, 1.0)

    def feature(
        self, window: np.ndarray, *, without: np.ndarray | None = None, top: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The co-occurrence feature of the RL policy, sparse: (items, probabilities) of the items whose
        :meth:`probabilities` given ``window`` (``without`` left out) are above 0, in no particular order;
        with ``top``, only the ``top`` most probable (ties to the lower item index). An empty window gives
        nothing (its flat 0.01 moves no item against another). Sparse fits read only the window items' rows:
        the cost follows how many items co-occur with them, not the catalogue."""
        window = np.asarray(window, dtype=np.int64)
        if len(window) == 0:
            return _no_feature()
        if isinstance(self.co, np.ndarray):
            return self.feature_from_rows(self.rows(window, without=without), top)
        rows = self.co[window].tocoo()  # the window's rows: (row, item, users who consumed both)
        own, items, co = window[rows.row], rows.col.astype(np.int64), rows.data
        keep = items != own  # an item's cosine with itself is 0
        own, items, co = own[keep], items[keep], co[keep]
        if without is None:
            values = co / self._norms[own] / self._norms[items]
        else:
            x_own = np.isin(own, without).astype(np.float32)
            x_items = np.isin(items, without).astype(np.float32)
            co = np.maximum(co - x_own * x_items, 0.0)
            den = np.sqrt(np.maximum(self.users[own] - x_own, 0.0)) * np.sqrt(
                np.maximum(self.users[items] - x_items, 0.0)
            )
            values = np.divide(co, den, out=np.zeros_like(co), where=den > 0)
        uniq, inverse = np.unique(items, return_inverse=True)
        mean = np.bincount(inverse, weights=values, minlength=len(uniq)) / len(window)
        top_value = float(mean.max()) if len(mean) else 0.0
        probs = np.clip(mean / max(top_value, 1e-9), 0.0, 1.0).astype(np.float32)
        keep = probs > 0
        return largest(uniq[keep], probs[keep], top)

    def feature_from_rows(self, rows: np.ndarray, top: int | None) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`feature` from a window's dense similarity rows (:meth:`rows`): how a dense fit computes
        it."""
        if len(rows) == 0:
            return _no_feature()
        probs = self.from_rows(rows)
        items = np.flatnonzero(probs > 0)
        return largest(items, probs[items].astype(np.float32), top)

    def validate(self, dataset_histories: list[np.ndarray], targets: list[np.ndarray], k: int = 10) -> float:
        """HR@k of the simulator's ranking on held-out next items (how well it predicts real behaviour)."""
        hits = 0
        for h, t in zip(dataset_histories, targets, strict=True):
            p = self.probabilities(h[-50:]).copy()
            p[h] = -1.0
            hits += int(t[0] in np.argsort(-p, kind="stable")[:k])
        return hits / max(len(targets), 1)
