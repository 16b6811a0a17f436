"""Off-policy estimation on what the Serve endpoint logged: would another policy have done better?

The server writes one impression row per answer (``impressions/`` of its feedback directory: the shown
slate and each pick's propensity) and one feedback row per rewarded item. Joined on the request id they
make a bandit log over the **first slot** of every answer: the context is the history the policy saw, the
action the item shown first, its propensity ``shown_propensities[0]`` (exactly the behaviour's probability
of that first pick, whatever the exploration), and the reward the feedback for that item (0 when none
came). Deeper slots are not used: their logged propensities are conditional on the items above them, and
a position-aware estimate would need the behaviour's marginals there.

Any :class:`~rec_rllib.recommender.Recommender` is a target through its exploration mode
(:func:`~rec_rllib.eval.ope.recommender_first_pick`); the logging policy's own value is the
logged mean reward, so the estimates are read against it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rec_rllib.data.dataset import LogDataset
from rec_rllib.data.feedback import iter_impressions, read_feedback
from rec_rllib.eval.ope import (
    BanditFeedback,
    Estimate,
    FoldedCTR,
    TargetStats,
    TargetStatsBuilder,
    cross_fit_ctr,
    estimate_difference,
    estimate_stats,
    recommender_first_pick,
)

SERVE_LOG_ESTIMATORS = ("ips", "snips", "dm", "dr", "slope")

BLOCK_CELLS = 1 << 22
"""Answers × catalogue items scored at once by :func:`evaluate_serve_log` (its memory is a few of these
blocks' arrays, 16 MB each for a Boltzmann target's single-precision rows, whatever the log's length: 2,493
answers a block on MovieLens-100K's 1,682 items, 41 on 100,000 items). Blocks under 32 MB also stay below
the allocator's largest mmap threshold, so each block reuses the last one's pages instead of faulting in
new ones."""


class NoUsableAnswers(ValueError):
    """A Serve log holds no answer whose first item is in the catalogue (e.g. none yet)."""


class Histories(Sequence):
    """The histories of a log's rounds as one flat array of item indices and offsets (``histories[i]``: an
    array; a slice: a Histories view over the same flat array): a million answers' histories without a
    million Python objects."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray) -> None:
        self.flat, self.offsets = flat, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                return [self[j] for j in range(start, stop, step)]
            return Histories(self.flat, self.offsets[start : max(start, stop) + 1])
        if i < 0:
            i += len(self)
        return self.flat[self.offsets[i] : self.offsets[i + 1]]

    def subset(self, rows: np.ndarray) -> Histories:
        lengths = np.diff(self.offsets)[rows]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        flat = np.concatenate([self[int(r)] for r in rows]) if len(rows) else self.flat[:0]
        return Histories(flat, offsets)


@dataclass
class ServeLog:
    """The first-slot bandit log of a feedback directory, with what was left out and why."""

    feedback: BanditFeedback
    histories: Histories
    request_ids: list[str]
    dropped: dict[str, int] = field(default_factory=dict)
    timestamps_ms: np.ndarray | None = None
    """When each answer was given (the impression's ``timestamp_ms``)."""

    @property
    def logging_value(self) -> float:
        return self.feedback.on_policy_value()

    def subset(self, rows: np.ndarray) -> ServeLog:
        """The answers ``rows`` (indices, in the order given) as a log of their own."""
        rows = np.asarray(rows, dtype=np.int64)
        return ServeLog(
            self.feedback.subset(rows),
            self.histories.subset(rows),
            [self.request_ids[i] for i in rows],
            dict(self.dropped),
            None if self.timestamps_ms is None else self.timestamps_ms[rows],
        )


def first_slot_log(
    feedback_dir: str | Path,
    dataset: LogDataset,
    *,
    max_rounds: int | None = None,
    seed: int = 0,
    since_ms: int | None = None,
) -> ServeLog:
    """Join ``feedback_dir``'s impressions and feedback into a first-slot bandit log over ``dataset``'s
    catalogue. Answers whose first item is not in the catalogue (added at run time by ``POST /items``)
    are dropped; history items outside it are ignored. ``dropped`` counts both, and feedback rows whose
    impression is missing (an impression buffer lost with a killed replica). The impression log is read one
    part file at a time (Arrow arrays, no Python object per history item).

    ``max_rounds``: of a log with more usable answers, a uniform random subset of that many is kept (seeded by
    ``seed``; ``dropped["not_sampled"]`` counts the rest): the estimators' memory does not need it
    (:func:`evaluate_serve_log` works in blocks), their time grows with the answers.

    ``since_ms``: only the answers logged at or after it (part files older than it are not read); feedback
    on earlier answers is then not counted in ``dropped``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if max_rounds is not None and (
        isinstance(max_rounds, bool) or not isinstance(max_rounds, (int, np.integer)) or max_rounds < 1
    ):
        raise ValueError(f"max_rounds must be an integer >= 1, got {max_rounds!r}")
    try:
        fb_table = read_feedback(feedback_dir).select(["request_id", "item_id", "reward"])
    except FileNotFoundError:  # nothing was clicked yet: every reward is 0
        fb_table = pa.table(
            {
                "request_id": pa.array([], pa.string()),
                "item_id": pa.array([], pa.string()),
                "reward": pa.array([], pa.float64()),
            }
        )
    rewards: dict[tuple[str, str], float] = {}
    fb_cols = fb_table.to_pydict()
    for rid, item, r in zip(fb_cols["request_id"], fb_cols["item_id"], fb_cols["reward"], strict=True):
        rewards[(rid, item)] = rewards.get((rid, item), 0.0) + float(r)
    fb_rids = fb_table.column("request_id")
    fb_rid_set = pa.array(sorted(set(fb_cols["request_id"])), pa.string())
    fb_seen = np.zeros(len(fb_table), dtype=bool)
    catalogue = pa.array(dataset.items["item_id"].astype(str).tolist(), pa.string())
    dropped = {"first_item_not_in_catalogue": 0, "history_items_not_in_catalogue": 0}
    actions, props, rs, flats, lengths, kept, stamps = [], [], [], [], [], [], []

    def starts_of(lists: pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
        n = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        return np.cumsum(n) - n, n  # each row's first value in lists.flatten(), and its length

    for table in iter_impressions(feedback_dir, since_ms=since_ms):
        if not len(table):
            continue
        rid = table.column("request_id").combine_chunks()
        if len(fb_rids):
            fb_seen |= pc.is_in(fb_rids, value_set=rid).to_numpy(zero_copy_only=False)
        shown = table.column("shown").combine_chunks()
        start, n_shown = starts_of(shown)
        first = np.full(len(table), -1, dtype=np.int64)
        has = np.flatnonzero(n_shown > 0)
        first_ids = shown.flatten().take(pa.array(start[has]))
        first[has] = pc.fill_null(pc.index_in(first_ids, value_set=catalogue), -1).to_numpy(
            zero_copy_only=False
        )
        keep = first >= 0
        dropped["first_item_not_in_catalogue"] += int((~keep).sum())
        if not keep.any():
            continue
        p_lists = table.column("shown_propensities").combine_chunks()
        p_start, n_p = starts_of(p_lists)
        short = np.flatnonzero(keep & (n_p < 1))
        if len(short):
            raise ValueError(
                f"{feedback_dir}: impression {rid[int(short[0])]} shows items without their "
                "propensities (shown_propensities is empty)"
            )
        p_first = p_lists.flatten().take(pa.array(p_start[keep])).to_numpy(zero_copy_only=False)
        hist = table.column("history").combine_chunks()
        parent = pc.list_parent_indices(hist).to_numpy(zero_copy_only=False)
        idx = pc.index_in(hist.flatten(), value_set=catalogue)
        known = idx.is_valid().to_numpy(zero_copy_only=False) & keep[parent]
        dropped["history_items_not_in_catalogue"] += int((keep[parent] & ~known).sum())
        flats.append(idx.to_numpy(zero_copy_only=False)[known].astype(np.int64))
        lengths.append(np.bincount(parent[known], minlength=len(table))[keep])
        kept_rid_array = rid.filter(pa.array(keep))
        kept_rids = kept_rid_array.to_pylist()
        kept_first = first[keep]
        r = np.zeros(len(kept_rids))
        clicked = pc.is_in(kept_rid_array, value_set=fb_rid_set).to_numpy(zero_copy_only=False)
        for j in np.flatnonzero(clicked):
            r[j] = rewards.get((kept_rids[j], str(catalogue[int(kept_first[j])])), 0.0)
        actions.append(kept_first)
        stamps.append(table.column("timestamp_ms").to_numpy()[keep].astype(np.int64))
        props.append(p_first.astype(np.float64))
        rs.append(r)
        kept.extend(kept_rids)
    if since_ms is None:  # (feedback on answers before since_ms has no impression read here)
        dropped["feedback_without_impression"] = int((~fb_seen).sum())
    if not kept:
        raise NoUsableAnswers(
            f"{feedback_dir}: no impression whose first item is in the catalogue of {dataset.name}"
        )
    action, pscore, reward = np.concatenate(actions), np.concatenate(props), np.concatenate(rs)
    length = np.concatenate(lengths)
    timestamps = np.concatenate(stamps)
    histories = Histories(np.concatenate(flats), np.concatenate([[0], np.cumsum(length)]).astype(np.int64))
    n = len(action)
    if max_rounds is not None and n > max_rounds:
        keep_rows = np.sort(np.random.default_rng(seed).choice(n, max_rounds, replace=False))
        action, pscore, reward = action[keep_rows], pscore[keep_rows], reward[keep_rows]
        histories = histories.subset(keep_rows)
        timestamps = timestamps[keep_rows]
        kept = [kept[i] for i in keep_rows]
        dropped["not_sampled"] = n - max_rounds
        n = max_rounds
    fb = BanditFeedback(
        action,
        np.zeros(n, dtype=np.int64),
        reward,
        pscore,
        dataset.n_items,
        1,
        name=f"{feedback_dir} (first slot)",
    )
    return ServeLog(fb, histories, kept, dropped, timestamps)


def evaluate_serve_log(
    log: ServeLog,
    targets: Mapping[str, object],
    *,
    strategy: str = "greedy",
    temperature: float = 1.0,
    epsilon: float = 0.1,
    n_boot: int = 500,
    seed: int = 0,
    block_rows: int | None = None,
) -> dict[str, dict]:
    """Every target's first-slot value by :data:`SERVE_LOG_ESTIMATORS` (90% bootstrap intervals), beside
    the logging policy's own logged value. ``targets``: name -> Recommender.

    Each target scores the log ``block_rows`` answers at a time (default: :data:`BLOCK_CELLS` cells a block)
    and keeps per answer only what the estimators read (:class:`~rec_rllib.eval.ope.TargetStats`); the reward
    model is cross-fitted in factored form. Memory: the blocks, a few vectors of the log's length, and SLOPE's
    bootstrap ([200, catalogue] floats and [200, answers] bytes)."""
    fb = log.feedback
    q = cross_fit_ctr(fb, folds=3, seed=seed)
    out: dict[str, dict] = {"logging policy (logged mean)": {"value": log.logging_value, "n": fb.n}}
    for name, rec in targets.items():
        stats = target_stats(
            log,
            rec,
            q,
            strategy=strategy,
            temperature=temperature,
            epsilon=epsilon,
            slope="slope" in SERVE_LOG_ESTIMATORS,
            block_rows=block_rows,
        )
        w = stats.pi_logged / fb.pscore
        out[name] = {
            "estimates": {
                e: estimate_stats(e, fb, stats, n_boot=n_boot, seed=seed).to_dict()
                for e in SERVE_LOG_ESTIMATORS
            },
            "effective_sample_size": float(w.sum() ** 2 / max((w**2).sum(), 1e-300)),
            "max_weight": float(w.max()),
        }
    return out


def target_stats(
    log: ServeLog,
    rec,
    q: FoldedCTR | None,
    *,
    strategy: str = "greedy",
    temperature: float = 1.0,
    epsilon: float = 0.1,
    slope: bool = False,
    block_rows: int | None = None,
) -> TargetStats:
    """What the estimators read of target ``rec`` (a Recommender under ``strategy``) on the log's first slots,
    scored ``block_rows`` answers at a time (default: :data:`BLOCK_CELLS` cells a block)."""
    fb = log.feedback
    rows_per_block = block_rows or max(1, BLOCK_CELLS // max(fb.n_actions, 1))
    builder = TargetStatsBuilder(fb, q, slope=slope)
    for start in range(0, fb.n, rows_per_block):
        rows = np.arange(start, min(start + rows_per_block, fb.n))
        pi_rows, scale = recommender_first_pick(
            rec,
            log.histories[start : start + len(rows)],
            strategy=strategy,
            temperature=temperature,
            epsilon=epsilon,
        )
        builder.add(rows, pi_rows, scale=scale, deterministic=strategy == "greedy")
    return builder.finish()


def compare_on_serve_log(
    log: ServeLog,
    candidate,
    served,
    *,
    estimators: tuple[str, ...] = ("snips", "dr"),
    strategy: str = "boltzmann",
    temperature: float = 1.0,
    epsilon: float = 0.1,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Estimate]:
    """V(candidate) - V(served) of the log's first slots by each estimator, with paired-bootstrap intervals
    (:func:`~rec_rllib.eval.ope.estimate_difference`), both targets under the same exploration."""
    fb = log.feedback
    q = cross_fit_ctr(fb, folds=3, seed=seed) if set(estimators) - {"ips", "snips"} else None
    kw = dict(strategy=strategy, temperature=temperature, epsilon=epsilon)
    a = target_stats(log, candidate, q, **kw)
    b = target_stats(log, served, q, **kw)
    return {e: estimate_difference(e, fb, a, b, n_boot=n_boot, level=level, seed=seed) for e in estimators}
