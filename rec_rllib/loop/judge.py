"""Both models judged on what the served one could not have trained on.

* **Held-out clicks** (:func:`ranked_clicks`): each event's clicked item ranked by a model given the history
  the served policy saw when it answered (logged with the event), seen items left out as when serving; per
  event HR/NDCG/MRR@k, paired across models because the events are the same. Items are matched by id, so
  the two models may know different catalogues (an item a model does not know is a miss for it).
* **The Serve log** (:func:`serve_log_estimates`): off-policy estimates of each model's first-slot click
  rate on every answer the endpoint logged (:func:`rec_rllib.eval.servelog.evaluate_serve_log`), with
  intervals, beside the logging policy's own mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from rec_rllib.data.dataset import LogDataset
from rec_rllib.eval import metrics as M
from rec_rllib.eval.ranking import top_items
from rec_rllib.recommender import Recommender


def ranked_clicks(
    rec: Recommender, item_ids: Sequence[str], clicks: pd.DataFrame, *, k: int = 10
) -> dict[str, np.ndarray]:
    """Per click event (rows of a feedback frame with ``history`` and ``item_id``), HR/NDCG/MRR@k of the
    clicked item under ``rec``, whose catalogue is ``item_ids``."""
    if not len(clicks):
        return {f"{m}@{k}": np.zeros(0) for m in ("HR", "NDCG", "MRR")}
    at = {str(iid): i for i, iid in enumerate(item_ids)}
    histories = [np.array([at[i] for i in map(str, h) if i in at], dtype=np.int64) for h in clicks["history"]]
    targets = [np.array([at.get(str(t), -1)], dtype=np.int64) for t in clicks["item_id"]]
    top = top_items(rec, histories, min(k, rec.n_items))
    per = M.per_user_ranking_metrics(top, targets, k)
    return {f"{m}@{k}": per[m] for m in ("HR", "NDCG", "MRR")}


def serve_log_estimates(
    feedback_dir: str | Path,
    dataset: LogDataset,
    targets: dict[str, Recommender],
    *,
    max_rounds: int | None = 20_000,
    n_boot: int = 200,
) -> dict[str, dict]:
    """Each target's off-policy first-slot value on the Serve log (greedy), with intervals, over
    ``dataset``'s catalogue; {} when the endpoint has logged no answer yet."""
    from rec_rllib.eval.servelog import evaluate_serve_log, first_slot_log

    try:
        log = first_slot_log(feedback_dir, dataset, max_rounds=max_rounds)
    except FileNotFoundError:
        return {}
    if log.feedback.n == 0:
        return {}
    return evaluate_serve_log(log, targets, n_boot=n_boot)
