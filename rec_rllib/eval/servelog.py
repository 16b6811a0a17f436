"""Off-policy estimation on what the Serve endpoint logged: would another policy have done better?

The server writes one impression row per answer (``impressions/`` of its feedback directory: the shown
slate and each pick's propensity) and one feedback row per rewarded item. Joined on the request id they
make a bandit log over the **first slot** of every answer: the context is the history the policy saw, the
action the item shown first, its propensity ``shown_propensities[0]`` (exactly the behaviour's probability
of that first pick, whatever the exploration), and the reward the feedback for that item (0 when none
came). Deeper slots are not used: their logged propensities are conditional on the items above them, and
a position-aware estimate would need the behaviour's marginals there.

Any :class:`~rec_rllib.recommender.Recommender` is a target through its exploration mode
(:func:`~rec_rllib.eval.ope.recommender_action_dist` with k = 1); the logging policy's own value is the
logged mean reward, so the estimates are read against it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rec_rllib.data.dataset import LogDataset
from rec_rllib.data.feedback import read_feedback, read_impressions
from rec_rllib.eval.ope import (
    BanditFeedback,
    PositionCTRModel,
    cross_fit,
    estimate,
    recommender_action_dist,
)

SERVE_LOG_ESTIMATORS = ("ips", "snips", "dm", "dr", "slope")

OPE_BYTES_PER_CELL = 40
"""Peak memory of :func:`evaluate_serve_log` per answer and catalogue item: the target's action distribution,
the reward model's predictions and the scores are each ``[answers, catalogue]`` (on MovieLens-100K's 1,682
items: 36 bytes with the popularity target, about 40 with a fine-tuned transformer; 100,000 answers: 6-7 GB)."""


def rounds_within(memory_bytes: float, n_items: int) -> int:
    """The most answers :func:`evaluate_serve_log` reads within about ``memory_bytes`` for ``n_items`` items."""
    return max(1, int(memory_bytes // (OPE_BYTES_PER_CELL * max(int(n_items), 1))))


@dataclass
class ServeLog:
    """The first-slot bandit log of a feedback directory, with what was left out and why."""

    feedback: BanditFeedback
    histories: list[np.ndarray]
    request_ids: list[str]
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def logging_value(self) -> float:
        return self.feedback.on_policy_value()


def first_slot_log(
    feedback_dir: str | Path, dataset: LogDataset, *, max_rounds: int | None = None, seed: int = 0
) -> ServeLog:
    """Join ``feedback_dir``'s impressions and feedback into a first-slot bandit log over ``dataset``'s
    catalogue. Answers whose first item is not in the catalogue (added at run time by ``POST /items``)
    are dropped; history items outside it are ignored. ``dropped`` counts both, and feedback rows whose
    impression is missing (an impression buffer lost with a killed replica).

    ``max_rounds``: of a log with more usable answers, a uniform random subset of that many is kept (seeded by
    ``seed``; ``dropped["not_sampled"]`` counts the rest). The estimators' memory grows with answers × catalogue
    (:data:`OPE_BYTES_PER_CELL`, :func:`rounds_within`); on a subset they stay unbiased, their intervals as
    wide as the subset's size makes them."""
    if max_rounds is not None and (
        isinstance(max_rounds, bool) or not isinstance(max_rounds, (int, np.integer)) or max_rounds < 1
    ):
        raise ValueError(f"max_rounds must be an integer >= 1, got {max_rounds!r}")
    imps = read_impressions(feedback_dir).to_pydict()
    try:
        fb_rows = read_feedback(feedback_dir).to_pydict()
    except FileNotFoundError:  # nothing was clicked yet: every reward is 0
        fb_rows = {"request_id": [], "item_id": [], "reward": []}
    rewards: dict[tuple[str, str], float] = {}
    for rid, item, r in zip(fb_rows["request_id"], fb_rows["item_id"], fb_rows["reward"], strict=True):
        rewards[(rid, item)] = rewards.get((rid, item), 0.0) + float(r)
    index = {iid: i for i, iid in enumerate(dataset.items["item_id"].astype(str))}
    actions, props, rs, histories, kept = [], [], [], [], []
    dropped = {"first_item_not_in_catalogue": 0, "history_items_not_in_catalogue": 0}
    seen_requests = set(imps["request_id"])
    dropped["feedback_without_impression"] = sum(
        1 for rid in fb_rows["request_id"] if rid not in seen_requests
    )
    for rid, shown, p, hist in zip(imps["request_id"], imps["shown"], imps["shown_propensities"],
                                   imps["history"], strict=True):  # fmt: skip
        if not shown or shown[0] not in index:
            dropped["first_item_not_in_catalogue"] += 1
            continue
        known = [index[h] for h in hist if h in index]
        dropped["history_items_not_in_catalogue"] += len(hist) - len(known)
        actions.append(index[shown[0]])
        props.append(float(p[0]))
        rs.append(rewards.get((rid, shown[0]), 0.0))
        histories.append(np.asarray(known, dtype=np.int64))
        kept.append(rid)
    if not actions:
        raise ValueError(
            f"{feedback_dir}: no impression whose first item is in the catalogue of {dataset.name}"
        )
    n = len(actions)
    if max_rounds is not None and n > max_rounds:
        keep = np.sort(np.random.default_rng(seed).choice(n, max_rounds, replace=False))
        actions, props, rs, histories, kept = (
            [col[i] for i in keep] for col in (actions, props, rs, histories, kept)
        )
        dropped["not_sampled"] = n - max_rounds
        n = max_rounds
    fb = BanditFeedback(np.asarray(actions), np.zeros(n, dtype=np.int64), np.asarray(rs, dtype=np.float64),
                        np.asarray(props), dataset.n_items, 1, name=f"{feedback_dir} (first slot)")  # fmt: skip
    return ServeLog(fb, histories, kept, dropped)


def evaluate_serve_log(log: ServeLog, targets: Mapping[str, object], *, strategy: str = "greedy",
                       temperature: float = 1.0, epsilon: float = 0.1, n_boot: int = 500,
                       seed: int = 0) -> dict[str, dict]:  # fmt: skip
    """Every target's first-slot value by :data:`SERVE_LOG_ESTIMATORS` (90% bootstrap intervals), beside
    the logging policy's own logged value. ``targets``: name -> Recommender."""
    q = cross_fit(PositionCTRModel, log.feedback, folds=3, seed=seed)
    out: dict[str, dict] = {"logging policy (logged mean)": {"value": log.logging_value, "n": log.feedback.n}}
    for name, rec in targets.items():
        pi = recommender_action_dist(rec, log.histories, k=1, strategy=strategy, temperature=temperature,
                                     epsilon=epsilon, seed=seed)  # fmt: skip
        w = pi[np.arange(log.feedback.n), log.feedback.action, 0] / log.feedback.pscore
        out[name] = {
            "estimates": {
                e: estimate(e, log.feedback, pi, q, n_boot=n_boot, seed=seed).to_dict()
                for e in SERVE_LOG_ESTIMATORS
            },  # fmt: skip
            "effective_sample_size": float(w.sum() ** 2 / max((w**2).sum(), 1e-300)),
            "max_weight": float(w.max()),
        }
    return out
