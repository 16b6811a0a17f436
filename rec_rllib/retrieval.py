"""A user state's best items by inner product, without scoring the whole catalogue.

A model scores item ``i`` for a user state as ``q · v_i + c_i``: ``q`` the state (through the policy
head when there is one), ``v_i`` the item's vector, ``c_i`` its additive terms (bias, popularity). That is
the inner product of ``[q, 1]`` and ``[v_i, c_i]``, so finding the items with the highest scores is a
maximum-inner-product search. :class:`ItemIndex` keeps ``[v_i, c_i]`` in an inverted-file index (faiss
``IndexIVFFlat``, inner product): k-means splits the items into ``lists`` clusters once, when the index is
built; a search scores the ``lists`` centroids, then exactly the items of the ``probe`` clusters whose
centroids score highest. Its cost follows ``lists`` plus ``probe / lists`` of the catalogue instead of the
catalogue; what it can miss is an item whose cluster's centroid scores below ``probe`` others (recall
against exact search: ``bench/retrieval.py``).

The additive terms may move after the index is built (RL trains the item bias): :meth:`ItemIndex.search`
adds each returned item's change since the build, so the scores it returns are the current model's, exactly;
only which items the probed clusters hold was decided at the build.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SEARCHES = ("auto", "exact", "ivf")
"""How a policy over candidates chooses them: ``exact`` scores every item; ``ivf`` searches an
:class:`ItemIndex`; ``auto`` searches an index from :data:`AUTO_INDEX_ITEMS` items on."""
AUTO_INDEX_ITEMS = 50_000
"""``auto``: the catalogue size from which candidates come from an index."""
DEFAULT_PROBE = 32
"""Clusters a search reads (of about 4·√n: about 2.5% of a 100,000-item catalogue)."""


def uses_index(search: str, n_items: int) -> bool:
    """Whether a candidate ``search`` setting means an :class:`ItemIndex` for ``n_items`` items."""
    if search not in SEARCHES:
        raise ValueError(f"candidate search must be one of {SEARCHES}, got {search!r}")
    return search == "ivf" or (search == "auto" and n_items >= AUTO_INDEX_ITEMS)


class ItemIndex:
    """An inverted-file index of ``[v_i, c_i]`` for maximum-inner-product search (module docstring).

    ``vectors`` [n, H] and ``offsets`` [n] as the model scores them; ``lists`` clusters (default about
    4·√n, at most n / 39 so k-means has its 39 points per centroid); a search reads ``probe`` of them.
    """

    def __init__(
        self,
        vectors: torch.Tensor,
        offsets: torch.Tensor,
        *,
        probe: int = DEFAULT_PROBE,
        lists: int | None = None,
    ):
        import faiss  # imported here: only large catalogues need it

        n, h = vectors.shape
        if offsets.shape != (n,):
            raise ValueError(f"offsets must be [{n}], got {tuple(offsets.shape)}")
        if probe < 1:
            raise ValueError(f"probe must be at least 1, got {probe}")
        self.n_items = n
        self.lists = int(lists or max(1, min(n // 39, round(4 * math.sqrt(n)))))
        self._quantizer = faiss.IndexFlatIP(h + 1)  # kept: the index does not own it
        self.index = faiss.IndexIVFFlat(self._quantizer, h + 1, self.lists, faiss.METRIC_INNER_PRODUCT)
        faiss.omp_set_num_threads(max(1, torch.get_num_threads()))  # as many threads as torch uses here
        rows = self._rows(vectors, offsets)
        self.index.train(rows)
        self.index.add(rows)
        self.index.nprobe = min(int(probe), self.lists)
        self._indexed_offsets = offsets.detach().float().cpu().clone()

    @staticmethod
    def _rows(vectors: torch.Tensor, offsets: torch.Tensor) -> np.ndarray:
        rows = torch.cat([vectors.detach().float().cpu(), offsets.detach().float().cpu()[:, None]], dim=1)
        return np.ascontiguousarray(rows.numpy(), dtype=np.float32)

    @property
    def probe(self) -> int:
        return int(self.index.nprobe)

    def search(
        self, queries: torch.Tensor, k: int, offsets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, k] scores, [B, k] item indices) of each query's ``k`` best items found, best first; the
        index pads a row with item ``n_items`` and score ``-inf`` when the probed clusters hold fewer than
        ``k`` items. ``offsets`` [n]: the items' additive terms now (default: as indexed); a returned score
        is ``q · v_i + offsets[i]``."""
        k = min(int(k), self.n_items)
        q = queries.detach().float().cpu()
        q = torch.cat([q, torch.ones(len(q), 1)], dim=1).numpy()
        scores, ids = self.index.search(np.ascontiguousarray(q), k)
        ids = torch.from_numpy(ids)
        scores = torch.from_numpy(scores)
        found = ids >= 0
        ids = ids.masked_fill(~found, self.n_items)
        if offsets is not None:
            moved = offsets.detach().float().cpu() - self._indexed_offsets
            scores = scores + moved[ids.clamp(max=self.n_items - 1)]
        scores = scores.masked_fill(~found, -torch.inf)
        return scores.to(queries.device), ids.to(queries.device)
