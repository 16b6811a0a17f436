"""Evaluate recommenders on a prepared dataset with full ranking; write metrics.json and report.md.

Examples::

    python -m jobs.evaluate --dataset ml-100k --models popularity random --out runs/eval
    python -m jobs.evaluate --dataset data/ml-100k --scheme temporal --split test --ks 5 10 20 \\
        --out runs/eval-t

Protocol: every user with a held-out interaction in the split is ranked over the whole catalogue, items
already in the user's history excluded (``--keep-seen`` keeps them). Default: leave-one-out test users.
What to expect on ml-100k (leave-one-out, test): popularity HR@10 0.0859, NDCG@10 0.0449; random
HR@10 about 0.006-0.012. ``metrics.json`` is keyed by model, then metric (``"HR@10"``, ``"NDCG@10"``,
``"MRR@10"``, ``"coverage@10"``, ``"novelty@10"``, ``"diversity@10"``, ...).
A dataset name that is not prepared yet is prepared first (into the data root).

Beside ``metrics.json`` and ``report.md`` it writes ``analysis.json`` (95% bootstrap intervals, metrics per
user-activity bucket, paired differences of every model against the first one with a paired t-test) and
PNGs: ``metric_bars.png``, ``accuracy_coverage.png`` and each run's own training curves.

Off-policy estimators, validated on the Open Bandit Dataset sample (``--ope-obd``; see
:mod:`rec_rllib.eval.obd`): every estimator's mean relative error over 30 bootstrap resamples, for each
campaign, both directions (random -> BTS, BTS -> random) and both definitions of BTS's distribution, in
``ope.json``, the report, ``ope_vs_truth.png`` and ``ope_relative_error.png``::

    python -m jobs.evaluate --models popularity --ope-obd --out runs/eval
    python -m jobs.evaluate --models --ope-obd --ope-repeats 5 --out runs/ope   # OPE only, 5 x 30 resamples

Catalogue coverage by the exposure slot (:mod:`rec_rllib.exposure`): ``--exposure-slots 1`` evaluates every
policy a second time as ``<name>+exposure``, the last position of each 10-item slate given to an item not
shown lately when the user ranks one within the next 40 (``--exposure-pool``)::

    python -m jobs.evaluate --models runs/ft runs/rl/checkpoint --exposure-slots 1 --out runs/eval
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

from jobs._common import check_outlives_job, fail, setup_logging, write_json
from rec_rllib.columns import SplitScheme
from rec_rllib.data.catalog import load_or_prepare
from rec_rllib.data.dataset import LogDataset
from rec_rllib.eval import DEFAULT_KS, evaluate_ranking
from rec_rllib.eval.ranking import RankingResult
from rec_rllib.eval.report import (
    markdown_table,
    obd_ope_markdown,
    ranking_markdown,
    serve_log_markdown,
    write_report,
)
from rec_rllib.exposure import ExposureAwareRecommender, ExposureConfig
from rec_rllib.models import BASELINES
from rec_rllib.recommender import Recommender
from rec_rllib.rl.policy import load_any_recommender

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
        "--models",
        nargs="*",
        default=list(BASELINES),
        help=f"models to evaluate: {', '.join(BASELINES)}, fine-tuned run directories, RLlib checkpoints "
        "(none: skip the ranking evaluation); the first is the reference of the paired comparisons",
    )
    p.add_argument("--out", required=True, help="output directory for metrics.json and report.md")
    p.add_argument("--scheme", default=SplitScheme.LEAVE_ONE_OUT, choices=sorted(SplitScheme.COLUMNS))
    p.add_argument("--split", default="test", choices=["valid", "test"])
    p.add_argument("--ks", nargs="+", type=int, default=list(DEFAULT_KS), help="cut-offs K")
    p.add_argument(
        "--keep-seen", action="store_true", help="do not exclude the user's history from the ranking"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of stochastic models (random)")
    p.add_argument("--ope-obd", action="store_true", help="validate the off-policy estimators on OBD")
    p.add_argument(
        "--ope-campaigns", nargs="+", default=["all", "men", "women"], choices=["all", "men", "women"]
    )
    p.add_argument("--ope-boot", type=int, default=30, help="bootstrap resamples per setting (default 30)")
    p.add_argument("--ope-repeats", type=int, default=1, help="independent sets of --ope-boot resamples")
    p.add_argument("--ope-reward-model", default="position-ctr", choices=["position-ctr", "logistic"])
    p.add_argument(
        "--ope-serve-log",
        default=None,
        metavar="FEEDBACK_DIR",
        help="estimate each --models policy's first-slot value from a Serve feedback directory "
        "(its impressions/ and feedback parts; the dataset must be the one the server used)",
    )
    p.add_argument(
        "--ope-serve-strategy",
        default="greedy",
        choices=["greedy", "boltzmann", "epsilon"],
        help="the target policies' exploration for --ope-serve-log",
    )
    p.add_argument(
        "--ope-max-rounds",
        type=int,
        default=None,
        metavar="N",
        help="answers of --ope-serve-log the estimators read: a seeded uniform subset of a longer log "
        "(default: every answer; memory stays bounded either way, time grows with the "
        "answers)",
    )
    p.add_argument("--ope-serve-temperature", type=float, default=1.0)
    p.add_argument("--ope-serve-epsilon", type=float, default=0.1)
    p.add_argument(
        "--exposure-slots",
        type=int,
        default=0,
        metavar="S",
        help="also evaluate every --models policy with the exposure slot (rec_rllib.exposure): the "
        "last S positions of each slate may go to items not shown lately (0: off)",
    )
    p.add_argument(
        "--exposure-pool",
        type=int,
        default=ExposureConfig.pool,
        help="exposure slot candidates: the user's next N items after the slate",
    )
    p.add_argument(
        "--exposure-window",
        type=int,
        default=ExposureConfig.window,
        help="slate positions the exposure tracker remembers",
    )
    p.add_argument("--exposure-slate", type=int, default=10, help="slate size the exposure slot applies to")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def evaluate_models(
    dataset: LogDataset,
    recommenders: list[Recommender],
    *,
    scheme: str,
    split: str,
    ks: list[int],
    exclude_seen: bool,
    progress: bool = True,
) -> dict[str, RankingResult]:
    results: dict[str, RankingResult] = {}
    for rec in recommenders:
        t0 = time.perf_counter()
        res = evaluate_ranking(
            rec, dataset, scheme=scheme, split=split, ks=ks, exclude_seen=exclude_seen, progress=progress
        )
        results[rec.name] = res
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
    check_outlives_job(args.out, "--out")
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
    if args.ope_serve_log and not args.models:
        fail("--ope-serve-log needs target policies in --models")
    if args.ope_max_rounds is not None and args.ope_max_rounds < 1:
        fail(f"--ope-max-rounds must be >= 1, got {args.ope_max_rounds}")
    if args.ope_serve_log:  # before any model is evaluated
        from rec_rllib.data.feedback import impression_parts

        try:
            impression_parts(args.ope_serve_log)
        except FileNotFoundError as e:
            fail(f"--ope-serve-log: {e}")
    try:
        exposure = ExposureConfig(
            slots=args.exposure_slots, pool=args.exposure_pool, window=args.exposure_window
        )
    except ValueError as e:
        fail(f"--exposure-*: {e}")
    if args.exposure_slate < 1:
        fail(f"--exposure-slate must be >= 1, got {args.exposure_slate}")
    try:
        dataset = load_or_prepare(args.dataset, root=args.data_root)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    if max(args.ks) > dataset.n_items:
        fail(f"--ks {max(args.ks)} exceeds the catalogue size {dataset.n_items}")
    out = Path(args.out)
    sections: list[str] = []
    results: dict[str, dict[str, float]] = {}
    # loaded once: the ranking evaluation and --ope-serve-log evaluate the same policies
    recommenders = [load_any_recommender(m, dataset, scheme=args.scheme, seed=args.seed) for m in args.models]
    if recommenders:
        # each policy with the exposure slot answers the users in case order on its own, fresh tracker
        widened = [
            ExposureAwareRecommender(r, exposure, slate_size=args.exposure_slate)
            for r in (recommenders if exposure.enabled else [])
        ]
        ranked = evaluate_models(
            dataset,
            recommenders + widened,
            scheme=args.scheme,
            split=args.split,
            ks=args.ks,
            exclude_seen=not args.keep_seen,
        )
        results = {name: r.metrics for name, r in ranked.items()}
        sections += ranking_analysis(
            out, ranked, args.models, title=f"{dataset.name} {args.scheme}/{args.split}"
        )
    if args.ope_obd:
        sections += ope_section(out, args)
    if args.ope_serve_log:
        sections += serve_log_section(out, args, dataset, recommenders)
    path = write_report(
        out,
        results,
        title=f"{dataset.name}: {args.scheme} / {args.split}",
        notes=[
            f"full ranking over {dataset.n_items} items, history {'kept' if args.keep_seen else 'excluded'}",
            f"dataset content {dataset.manifest.get('content_hash', '?')}",
        ],
        sections=sections,
    )
    write_json(
        out / "eval_config.json",
        {**vars(args), "dataset_name": dataset.name, "content_hash": dataset.manifest.get("content_hash")},
    )
    if results:
        print(markdown_table(results))
    print(f"wrote {path} and {out / 'report.md'}")
    return 0


def ranking_analysis(
    out: Path, ranked: dict[str, RankingResult], model_args: list[str], *, title: str
) -> list[str]:
    """analysis.json, the bar and trade-off PNGs, training curves; returns the report's Markdown sections."""
    from rec_rllib.eval import plots
    from rec_rllib.eval.ranking import activity_buckets, bootstrap_ci, paired_comparison

    out.mkdir(parents=True, exist_ok=True)
    shown = [m for m in ("HR@10", "NDCG@10", "MRR@10") if all(m in r.per_user for r in ranked.values())]
    cis = {
        name: {m: (r.metrics[m], *bootstrap_ci(r.per_user[m])) for m in shown} for name, r in ranked.items()
    }
    buckets = {name: activity_buckets(r) for name, r in ranked.items()}
    names = list(ranked)
    pairs = {
        f"{b} vs {names[0]}": {m: paired_comparison(ranked[names[0]], ranked[b], m) for m in shown}
        for b in names[1:]
    }
    write_json(out / "analysis.json", {"ci95": cis, "activity_buckets": buckets, "paired": pairs})
    plots.metric_bars(out / "metric_bars.png", cis, title=title)
    plots.tradeoff(
        out / "accuracy_coverage.png",
        {
            n: (r.metrics["coverage@10"], r.metrics["NDCG@10"])
            for n, r in ranked.items()
            if "coverage@10" in r.metrics
        },
        x_label="catalogue coverage@10",
        y_label="NDCG@10",
        title=f"{title}: accuracy vs coverage",
    )
    curves = []
    for arg, name in zip(model_args, names, strict=False):
        run = Path(arg)
        for candidate in (run, run.parent):
            for png in ("learning_curve.png", "training_curves.png"):
                if (candidate / png).is_file():
                    target = out / f"curve-{len(curves)}-{png}"
                    shutil.copyfile(candidate / png, target)
                    curves.append(f"![{name}: {png}]({target.name})")
    return ranking_markdown(cis, buckets, pairs, shown, baseline=names[0], curves=curves)


def ope_section(out: Path, args: argparse.Namespace) -> list[str]:
    """Validate the off-policy estimators on the OBD sample; ope.json, two PNGs, the report section."""
    import numpy as np

    from rec_rllib.eval import plots
    from rec_rllib.eval.obd import OBP_PUBLISHED, validation_suite

    out.mkdir(parents=True, exist_ok=True)
    suite = validation_suite(
        campaigns=args.ope_campaigns,
        n_boot=args.ope_boot,
        repeats=args.ope_repeats,
        reward_model=args.ope_reward_model,
        data_root=args.data_root,
        progress=lambda key, errors: log.info("OPE %s: %s", key, {k: round(v, 3) for k, v in errors.items()}),
    )
    write_json(
        out / "ope.json",
        {
            "reward_model": args.ope_reward_model,
            "n_boot": args.ope_boot,
            "repeats": args.ope_repeats,
            "settings": suite,
            "obp_published": OBP_PUBLISHED,
        },
    )
    estimators = list(next(iter(suite.values()))["errors"])
    panels = {k: {e: np.asarray(v["estimates"][e]) for e in estimators} for k, v in suite.items()}
    plots.ope_vs_truth(
        out / "ope_vs_truth.png",
        panels,
        {k: v["truth"] for k, v in suite.items()},
        title="OBD: estimates over bootstrap resamples vs the on-policy click rate",
    )
    ref_key = "all/random->bts/prior"
    published_draws = args.ope_boot == 30 and ref_key in suite
    if ref_key in suite:
        ours = suite[ref_key]["errors_first_set" if published_draws else "errors"]
        plots.relative_error_bars(
            out / "ope_relative_error.png",
            ours,
            OBP_PUBLISHED,
            title="OBD all: BTS (prior) from the random logs"
            + (", resamples 0-29 (obp's)" if published_draws else ""),
        )
    return obd_ope_markdown(
        suite,
        n_boot=args.ope_boot,
        repeats=args.ope_repeats,
        reward_model=args.ope_reward_model,
        reference=ref_key if ref_key in suite else None,
        published_draws=published_draws,
    )


def serve_log_section(
    out: Path, args: argparse.Namespace, dataset: LogDataset, recommenders: list[Recommender]
) -> list[str]:
    """Each --models policy's first-slot value estimated from a Serve feedback directory;
    ope_serve_log.json."""
    from rec_rllib.eval.servelog import (
        evaluate_serve_log,
        first_slot_log,
    )

    max_rounds = args.ope_max_rounds
    try:
        served = first_slot_log(args.ope_serve_log, dataset, max_rounds=max_rounds)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    res = evaluate_serve_log(
        served,
        {rec.name: rec for rec in recommenders},
        strategy=args.ope_serve_strategy,
        temperature=args.ope_serve_temperature,
        epsilon=args.ope_serve_epsilon,
    )
    out.mkdir(parents=True, exist_ok=True)
    write_json(
        out / "ope_serve_log.json",
        {
            "feedback_dir": str(args.ope_serve_log),
            "rounds": served.feedback.n,
            "max_rounds": max_rounds,
            "dropped": served.dropped,
            "strategy": args.ope_serve_strategy,
            "results": res,
        },
    )
    return serve_log_markdown(
        res,
        feedback_dir=str(args.ope_serve_log),
        answers=served.feedback.n,
        dropped=served.dropped,
        max_rounds=max_rounds,
        strategy=args.ope_serve_strategy,
    )


if __name__ == "__main__":
    raise SystemExit(main())
