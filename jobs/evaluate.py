"""Evaluate recommenders on a prepared dataset with full ranking; write metrics.json and report.md.

Examples::

    python -m jobs.evaluate --dataset ml-100k --models popularity random --out runs/eval
    python -m jobs.evaluate --dataset data/ml-100k --scheme temporal --split test --ks 5 10 20 --out runs/eval-t

Protocol: every user with a held-out interaction in the split is ranked over the whole catalogue, items
already in the user's history excluded (``--keep-seen`` keeps them). Default: leave-one-out test users.
What to expect on ml-100k (leave-one-out, test): popularity HR@10 0.0859, NDCG@10 0.0449; random
HR@10 about 0.006-0.012. ``metrics.json`` is keyed by model, then metric (``"HR@10"``, ``"NDCG@10"``,
``"MRR@10"``, ``"coverage@10"``, ``"novelty@10"``, ``"diversity@10"``, ...).
A dataset name that is not prepared yet is prepared first (into the data root).
"""

from __future__ import annotations

import argparse
import logging
import time

from jobs._common import fail, setup_logging, write_json
from rec_rllib.columns import SplitScheme
from rec_rllib.data.catalog import load_or_prepare
from rec_rllib.data.dataset import LogDataset
from rec_rllib.eval import DEFAULT_KS, evaluate_ranking
from rec_rllib.eval.report import markdown_table, write_report
from rec_rllib.models import BASELINES, load_recommender

log = logging.getLogger("jobs.evaluate")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--dataset", default="ml-100k", help="built-in name (ml-100k, obd-all, ...) or a prepared directory"
    )
    p.add_argument("--data-root", help="root of prepared datasets (default: $REC_RLLIB_DATA or ./data)")
    p.add_argument(
        "--models", nargs="+", default=list(BASELINES), help=f"models to evaluate: {', '.join(BASELINES)}"
    )
    p.add_argument("--out", required=True, help="output directory for metrics.json and report.md")
    p.add_argument("--scheme", default=SplitScheme.LEAVE_ONE_OUT, choices=sorted(SplitScheme.COLUMNS))
    p.add_argument("--split", default="test", choices=["valid", "test"])
    p.add_argument("--ks", nargs="+", type=int, default=list(DEFAULT_KS), help="cut-offs K")
    p.add_argument(
        "--keep-seen", action="store_true", help="do not exclude the user's history from the ranking"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of stochastic models (random)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def evaluate_models(
    dataset: LogDataset,
    models: list[str],
    *,
    scheme: str,
    split: str,
    ks: list[int],
    exclude_seen: bool,
    seed: int,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    for name in models:
        t0 = time.perf_counter()
        rec = load_recommender(name, dataset, scheme=scheme, seed=seed)
        res = evaluate_ranking(
            rec, dataset, scheme=scheme, split=split, ks=ks, exclude_seen=exclude_seen, progress=progress
        )
        results[rec.name] = res.metrics
        log.info(
            "%s: %d users, HR@10 %.4f, NDCG@10 %.4f (%.1fs)",
            rec.name,
            res.n_users,
            res.metrics.get("HR@10", float("nan")),
            res.metrics.get("NDCG@10", float("nan")),
            time.perf_counter() - t0,
        )
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from rec_rllib.models.run import is_run_dir
    from rec_rllib.rl.policy import is_rl_checkpoint

    unknown = [m for m in args.models if m not in BASELINES and not is_run_dir(m) and not is_rl_checkpoint(m)]
    if unknown:
        fail(
            f"unknown model(s) {unknown}; available: {', '.join(BASELINES)}, a fine-tuned run directory "
            "or an RLlib checkpoint"
        )
    if any(k <= 0 for k in args.ks):
        fail(f"--ks must be positive, got {args.ks}")
    try:
        dataset = load_or_prepare(args.dataset, root=args.data_root)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    if max(args.ks) > dataset.n_items:
        fail(f"--ks {max(args.ks)} exceeds the catalogue size {dataset.n_items}")
    results = evaluate_models(
        dataset,
        args.models,
        scheme=args.scheme,
        split=args.split,
        ks=args.ks,
        exclude_seen=not args.keep_seen,
        seed=args.seed,
    )
    path = write_report(
        args.out,
        results,
        title=f"{dataset.name}: {args.scheme} / {args.split}",
        notes=[
            f"full ranking over {dataset.n_items} items, history {'kept' if args.keep_seen else 'excluded'}",
            f"dataset content {dataset.manifest.get('content_hash', '?')}",
        ],
    )
    write_json(
        f"{args.out}/eval_config.json",
        {**vars(args), "dataset_name": dataset.name, "content_hash": dataset.manifest.get("content_hash")},
    )
    print(markdown_table(results))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
