"""The accuracy-coverage frontier of a fixed exposure penalty on the fine-tuned model: the reference an RL
policy trained with an exposure cost is measured against (it learns one point of it; docs/rl.md).

The fine-tuned model answers the leave-one-out users in the shared evaluation's order with a tracker of the
last ``--window`` shown slate positions (``rec_rllib.exposure``); every item's score is lowered by
``β · shape(times shown)`` before the slate is chosen. Shapes:

* ``log``       — ``log(1 + count)``: the product's default shape (``ExposureConfig.penalty``, what RL
learns);
* ``indicator`` — ``1[count > 0]``: only whether the item is on display at all (``ExposureConfig.shape``);
* ``capped``    — ``min(log(1 + count), log 4)``: log up to three showings, flat above;
* ``spread``    — ``log(1 + count)`` times the user's score spread (standard deviation of the allowed items'
  scores) over its mean: the same rank disruption for confident and unsure users.
* ``prob``      — ``1[count > 0]`` subtracted from the model's probability (softmax over the allowed items),
  not from its score: an item on display gives way to one that is not when their probabilities of being the
  next item (what a swap costs in expected hits) differ by less than β, whatever the user's confidence.

Per split: NDCG@10 and coverage@10 against the plain fine-tuned model, with the paired 95% bootstrap interval
and t-test p of the NDCG difference (943 users: at +25% coverage the interval is about ±6% wide for the log
shape and ±2.5% for the indicator, so no row tells apart changes of a percent or two), then per shape the NDCG
change interpolated at the coverage ``--target`` (+25%).

    python bench/exposure_frontier.py --finetuned runs/bench-finetune/main
    python bench/exposure_frontier.py --finetuned <run> --shapes log --betas 0.3 0.4 0.5 --splits test
    python bench/exposure_frontier.py --finetuned <run> --shapes indicator --cooccurrence 0.25 0.5 1
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np

from rec_rllib.columns import SplitScheme
from rec_rllib.data.catalog import load_or_prepare
from rec_rllib.eval import evaluate_ranking
from rec_rllib.eval.ranking import paired_comparison
from rec_rllib.exposure import (
    EXPOSURE_SHAPES,
    ExposureAwareRecommender,
    ExposureConfig,
    ExposureTracker,
)
from rec_rllib.models import load_recommender
from rec_rllib.recommender import Recommender
from rec_rllib.rl.policy import CooccurrenceRecommender, simulator_of

SHAPES = ("log", "indicator", "capped", "spread", "prob")
EVAL_BATCH = 512  # evaluate_ranking's default batch size


class CachedScores(Recommender):
    """The fine-tuned model's scores, computed once per batch of histories (every β re-ranks the same
    scores)."""

    def __init__(self, base: Recommender):
        self.base, self.n_items, self.name = base, base.n_items, base.name
        self._cache: dict[bytes, np.ndarray] = {}

    def score(self, histories) -> np.ndarray:
        key = b"|".join(np.asarray(h, dtype=np.int64).tobytes() for h in histories)
        if key not in self._cache:
            self._cache[key] = np.asarray(self.base.score(histories), dtype=np.float64)
        return self._cache[key]


class ShapedTracker(ExposureTracker):
    """An exposure tracker whose penalty has a shape the product does not offer (``capped``, ``spread``)."""

    def __init__(self, n_items: int, cfg: ExposureConfig, shape: str, mean_spread: float):
        super().__init__(n_items, cfg)
        self.shape, self.mean_spread = shape, mean_spread

    def penalised(self, scores: np.ndarray) -> np.ndarray:
        c = self.counts[: len(scores)]
        if self.shape == "capped":
            f = np.minimum(np.log1p(c), np.log(4.0))
        elif self.shape == "spread":
            f = np.log1p(c) * np.std(scores[np.isfinite(scores)]) / self.mean_spread
        elif self.shape == "prob":  # ranked by p - β·1[shown], p the model's softmax over the allowed items
            allowed = np.isfinite(scores)
            p = np.exp(scores - scores[allowed].max())
            p /= p[allowed].sum()
            return np.where(allowed, p - self.cfg.penalty * (c > 0), -np.inf)
        else:
            raise ValueError(f"unknown shape {self.shape!r}")
        return scores - self.cfg.penalty * f


class ShapedExposure(ExposureAwareRecommender):
    def __init__(self, base: Recommender, cfg: ExposureConfig, shape: str, mean_spread: float):
        self.shape, self.mean_spread = shape, mean_spread
        super().__init__(base, cfg)
        self.reset()

    def reset(self) -> None:
        self.tracker = ShapedTracker(self.n_items, self.cfg, self.shape, self.mean_spread)


def policy(ft: Recommender, shape: str, beta: float, window: int, mean_spread: float) -> Recommender:
    if shape in EXPOSURE_SHAPES:  # the product's own path (``ExposureConfig.shape``)
        return ExposureAwareRecommender(ft, ExposureConfig(slots=0, window=window, penalty=beta, shape=shape))
    return ShapedExposure(ft, ExposureConfig(slots=0, window=window, penalty=beta), shape, mean_spread)


def _mean_spread(ft: Recommender, ds, split: str) -> float:
    """Mean over the split's users of the standard deviation of their allowed items' scores (the batches the
    shared evaluation scores, so the cache serves them again)."""
    cases = ds.eval_cases(SplitScheme.LEAVE_ONE_OUT, split)
    spreads = []
    for start in range(0, len(cases), EVAL_BATCH):
        hist = cases.histories[start : start + EVAL_BATCH]
        for row, h in zip(ft.score(hist), hist, strict=True):
            allowed = np.ones(len(row), dtype=bool)
            allowed[np.asarray(h, dtype=np.int64)] = False
            spreads.append(np.std(row[allowed]))
    return float(np.mean(spreads))


def at_target(points: list[tuple[float, float]], target: float) -> float | None:
    """NDCG change at coverage change ``target``, linear between the two βs around it."""
    points = sorted(points)
    for (c0, n0), (c1, n1) in itertools.pairwise(points):
        if c0 <= target <= c1:
            return n0 + (n1 - n0) * (target - c0) / (c1 - c0) if c1 > c0 else n0
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--finetuned", default="runs/bench-finetune/main", help="fine-tuned run directory")
    p.add_argument("--betas", nargs="+", type=float, default=[0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0])
    p.add_argument("--shapes", nargs="+", choices=SHAPES, default=list(SHAPES))
    p.add_argument("--splits", nargs="+", choices=["test", "valid"], default=["test", "valid"])
    p.add_argument(
        "--window", type=int, default=ExposureConfig.window, help="shown slate positions remembered"
    )
    p.add_argument("--target", type=float, default=0.25, help="coverage@10 change the summary reads NDCG at")
    p.add_argument(
        "--cooccurrence",
        nargs="*",
        type=float,
        default=[],
        metavar="γ",
        help="also sweep the fine-tuned scores plus γ times the item-kNN simulator's probabilities (the "
        "RL policy's co-occurrence term, fixed), for each γ",
    )
    args = p.parse_args()
    ds = load_or_prepare("ml-100k")
    plain = load_recommender(args.finetuned, ds)
    ft = CachedScores(plain)
    bases = [("", ft)]
    if args.cooccurrence:
        sim = simulator_of(ds)
        bases += [
            (f" + γ {g:g}", CachedScores(CooccurrenceRecommender(plain, sim, g, 50)))
            for g in args.cooccurrence
        ]
    for split in args.splits:
        base = evaluate_ranking(ft, ds, split=split)
        b = base.metrics
        mean_spread = _mean_spread(ft, ds, split)
        print(
            f"\n## {split} users: fine-tuned NDCG@10 {b['NDCG@10']:.4f}, coverage@10 {b['coverage@10']:.4f}\n"
        )
        print("| shape | β | NDCG@10 | coverage@10 | NDCG vs FT [95% interval] (p) | coverage vs FT |")
        print("|---|---:|---:|---:|---:|---:|")
        frontier: dict[str, list[tuple[float, float]]] = {}
        for (label, scores), shape in itertools.product(bases, args.shapes):
            for beta in args.betas:
                r = evaluate_ranking(policy(scores, shape, beta, args.window, mean_spread), ds, split=split)
                m, pc = r.metrics, paired_comparison(base, r, "NDCG@10")
                dn, dc = m["NDCG@10"] / b["NDCG@10"] - 1, m["coverage@10"] / b["coverage@10"] - 1
                frontier.setdefault(shape + label, []).append((dc, dn))
                print(
                    f"| {shape}{label} | {beta:g} | {m['NDCG@10']:.4f} | {m['coverage@10']:.4f} | {dn:+.1%} "
                    f"[{pc['low'] / b['NDCG@10']:+.1%}, {pc['high'] / b['NDCG@10']:+.1%}] "
                    f"({pc['p_value']:.2f}) "
                    f"| {dc:+.1%} |",
                    flush=True,
                )
        print()
        for shape, points in frontier.items():
            at = at_target(points, args.target)
            where = f"{at:+.1%}" if at is not None else "not bracketed by the βs"
            print(f"{split}: {shape} penalty, NDCG@10 change at coverage {args.target:+.0%}: {where}")


if __name__ == "__main__":
    main()
