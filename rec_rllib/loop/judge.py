"""Both models judged on what the served one could not have trained on.

* **Held-out clicks** (:func:`ranked_clicks`): each event's clicked item ranked by a model given the history
  the served policy saw when it answered (logged with the event), seen items left out as when serving; per
  event HR/NDCG/MRR@k, paired across models because the events are the same. Items are matched by id, so
  the two models may know different catalogues (an item a model does not know is a miss for it).
* **The Serve log** (:func:`serve_log_comparison`): the answers the endpoint gave after the candidate's
  training cut, with the propensity of each first pick, as an exploration log: each model's first-slot
  click rate estimated off-policy on the same answers, and the difference with a paired interval.
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


def serve_log_comparison(
    feedback_dir: str | Path,
    dataset: LogDataset,
    candidate: Recommender,
    served: Recommender,
    gate,
    *,
    since_ms: int,
    max_answers: int = 20_000,
) -> dict | None:
    """Paired off-policy differences candidate - served of the first slot's click rate
    (:func:`~rec_rllib.eval.servelog.compare_on_serve_log`) on the answers logged at or after ``since_ms``
    (the newest ``max_answers`` of them), both models under the gate's exploration: the gate's estimator
    and SNIPS and DR beside it, each an :class:`~rec_rllib.eval.ope.Estimate`; None when no answer was
    logged since."""
    from rec_rllib.eval.servelog import NoUsableAnswers, compare_on_serve_log, first_slot_log

    try:
        log = first_slot_log(feedback_dir, dataset, since_ms=since_ms)
    except (FileNotFoundError, NoUsableAnswers):  # nothing logged (since), or no answer in the catalogue
        return None
    if log.feedback.n > max_answers:  # the newest
        log = log.subset(np.arange(log.feedback.n - max_answers, log.feedback.n))
    estimators = tuple(dict.fromkeys((gate.estimator, "snips", "dr")))
    return compare_on_serve_log(
        log,
        candidate,
        served,
        estimators=estimators,
        strategy=gate.exploration,
        temperature=gate.temperature,
        epsilon=gate.epsilon,
        n_boot=gate.n_boot,
        level=gate.level,
        seed=gate.seed,
    )
