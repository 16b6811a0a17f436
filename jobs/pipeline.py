"""The main job, end to end: fetch -> prepare -> fine-tune -> RL training -> evaluate, on Ray.

Run it locally (starts an embedded Ray with ``--num-cpus`` CPUs, shut down at the end)::

    python -m jobs.pipeline --out runs/quickstart

or on a cluster (connects to the running Ray instead; ``--out`` must then be storage every node sees)::

    RAY_AUTH_MODE=token ray job submit --working-dir . -- \\
        python -m jobs.pipeline --address auto --out /shared/qs

Stages (``--stages`` picks a subset, in this order):

1. ``prepare``: MovieLens-100K and the Open Bandit sample fetched through pip (cached) and prepared into
   ``<data-root>``.
2. ``finetune``: the text-aware sequence transformer fine-tuned on next-item prediction (a Ray task with
   ``--num-cpus`` CPUs and ``--gpus`` GPUs) into ``<out>/finetune``.
3. ``train``: APPO trains it further as an RLlib policy on env runners replaying user logs, into
   ``<out>/rl`` (checkpoint in ``<out>/rl/checkpoint``). ``--rl-recipe coverage`` (the default): the
   replay prices what the policy has on display (an indicator exposure cost) and RL learns that price on
   top of the fine-tuned scores plus other users' co-consumption of the last 5 items (weighted as the
   validation users prefer), widening the catalogue the lists cover while ranking better; ``relevance``:
   the hit reward alone, RL training the policy head (``jobs.train``'s defaults).
4. ``evaluate``: baselines, the fine-tuned model and the RL policy (these two also with the exposure slot,
   :mod:`rec_rllib.exposure`) on the leave-one-out test and validation users and the global temporal
   split, one Ray task per (model, split).
5. ``serve``: the RL policy (else the fine-tuned model) behind Ray Serve on http://127.0.0.1:``--port``;
   a sample request is answered and printed with the ``curl`` line to repeat it; the endpoint stays up
   until Ctrl-C (or ``--serve-seconds``), then stops cleanly (feedback flushed to ``<out>/feedback``).

What to expect with the defaults on 2 cores: about 14.5 minutes to a live endpoint; ``<out>/report.md``
with popularity at HR@10 0.086 / NDCG@10 0.045, the fine-tuned model near 0.19-0.20 / 0.10-0.11 and the RL
policy above its NDCG@10 with coverage@10 a quarter to a third wider (e.g. test NDCG@10 0.1107 against 0.1065,
coverage@10 0.570 against 0.447).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from jobs._common import check_outlives_job, fail, ray_session, setup_logging, write_json
from rec_rllib.columns import SplitScheme
from rec_rllib.data.catalog import dataset_path, load_or_prepare
from rec_rllib.eval.report import markdown_table, write_report
from rec_rllib.models import BASELINES
from rec_rllib.rl.recipes import RECIPES

log = logging.getLogger("jobs.pipeline")

STAGES = ("prepare", "finetune", "train", "evaluate", "serve")
EVAL_SETTINGS = (
    (SplitScheme.LEAVE_ONE_OUT, "test"),
    (SplitScheme.LEAVE_ONE_OUT, "valid"),
    (SplitScheme.TEMPORAL, "test"),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.pipeline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="runs/quickstart", help="run directory for reports")
    p.add_argument("--data-root", help="root of prepared datasets (default: $REC_RLLIB_DATA or ./data)")
    p.add_argument(
        "--address", help="Ray address ('auto' on a cluster); default: start an embedded local Ray"
    )
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the embedded local Ray")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--models", nargs="+", default=list(BASELINES), help="baselines to evaluate")
    g = p.add_argument_group("fine-tuning and RL budgets")
    g.add_argument("--finetune-minutes", type=float, default=8.0, help="time budget of fine-tuning")
    g.add_argument("--finetune-epochs", type=int, default=300, help="epoch cap of fine-tuning")
    g.add_argument("--hidden-size", type=int, default=None, help="model width (default: ModelConfig's)")
    g.add_argument("--max-len", type=int, default=None, help="history length the model reads")
    g.add_argument(
        "--rl-iterations",
        type=int,
        default=300,
        help="APPO iterations (the coverage recipe's exposure weight is still rising slowly at 300: the "
        "budget "
        "sets where it stops, and with it how much coverage is bought; docs/rl.md)",
    )
    g.add_argument(
        "--rl-recipe",
        choices=RECIPES,
        default="coverage",
        help="coverage: RL learns the price of what is on display (the exposure weight alone, under an "
        "indicator exposure cost, Thompson sampling) on top of the fine-tuned scores plus the co-occurrence "
        "term at the weight the validation users prefer; relevance: APPO trains the policy head on the hit "
        "reward alone (jobs.train's defaults). The settings: rec_rllib/rl/recipes/<name>.yaml (docs/rl.md)",
    )
    g.add_argument("--gpus", type=float, default=0.0, help="GPUs for fine-tuning and the RL learner")
    g.add_argument(
        "--exposure-slots",
        type=int,
        default=1,
        help="evaluate the fine-tuned model and the RL policy also with the exposure slot "
        "(rec_rllib.exposure; 0: not)",
    )
    g.add_argument("--port", type=int, default=8000, help="HTTP port of the Serve endpoint (127.0.0.1)")
    g.add_argument("--serve-seconds", type=float, default=None, help="serve this long (default: Ctrl-C)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


EXPOSED = "+exposure"


def _rl_config(args: argparse.Namespace, ft_dir: Path):
    """The train stage's RLTrainConfig: ``--rl-recipe``'s settings (rec_rllib/rl/recipes) placed on this
    machine's CPUs and GPUs."""
    from rec_rllib.config import merged
    from rec_rllib.rl.config import RLTrainConfig
    from rec_rllib.rl.recipes import recipe

    runners = max(1, min(2, args.num_cpus))
    placement = {
        "finetuned": str(ft_dir),
        "iterations": args.rl_iterations,
        "num_env_runners": runners,
        "num_cpus_per_env_runner": min(1.0, args.num_cpus / (runners + 1)),
        "num_gpus_per_learner": args.gpus,
        "checkpoint_every": max(1, args.rl_iterations),
        "env": {"dataset": str(Path(dataset_path("ml-100k", args.data_root)).resolve())},
    }
    return RLTrainConfig.from_dict(merged(recipe(args.rl_recipe), placement))


def _evaluate_task(dataset, model: str, scheme: str, split: str, exposure_slots: int):
    """The model's RankingResult (metrics and per-user figures); ``<model>+exposure``: the model with the
    exposure slot (a fresh tracker, users in case order)."""
    from rec_rllib.eval import evaluate_ranking
    from rec_rllib.exposure import ExposureAwareRecommender, ExposureConfig
    from rec_rllib.rl.policy import load_any_recommender

    rec = load_any_recommender(model.removesuffix(EXPOSED), dataset, scheme=scheme)
    if model.endswith(EXPOSED):
        rec = ExposureAwareRecommender(rec, ExposureConfig(slots=exposure_slots))
    return evaluate_ranking(rec, dataset, scheme=scheme, split=split)


def _finetune_configs(args: argparse.Namespace):
    """The fine-tune stage's (ModelConfig, FinetuneConfig)."""
    from dataclasses import replace

    from rec_rllib.finetune import FinetuneConfig
    from rec_rllib.models.seqrec import ModelConfig

    model = ModelConfig()
    if args.hidden_size is not None:
        model = replace(model, hidden_size=args.hidden_size)
    if args.max_len is not None:
        model = replace(model, max_len=args.max_len)
    cfg = FinetuneConfig(
        epochs=args.finetune_epochs, max_minutes=args.finetune_minutes, progress=True, threads=args.num_cpus
    )
    return model, cfg


def _finetune_task(dataset, out: str, args: argparse.Namespace) -> dict:
    from rec_rllib.finetune import finetune

    setup_logging(args.verbose)  # this worker's progress and validation lines reach the driver's console
    model, cfg = _finetune_configs(args)
    result = finetune(dataset, model, cfg, out)
    return {"test": result.test_metrics, "epochs_run": result.epochs_run, "seconds": result.seconds}


def _write_reports(out: Path, ml, models: list[str], results: dict) -> None:
    from jobs.evaluate import ranking_analysis

    names = {m: _label(m) for m in models}
    for scheme, split in EVAL_SETTINGS:
        ranked = {names[m]: results[(m, scheme, split)] for m in models}
        table = {name: r.metrics for name, r in ranked.items()}
        sub = out if (scheme, split) == EVAL_SETTINGS[0] else out / f"{scheme}-{split}"
        # intervals, activity buckets, plots, training curves as jobs.evaluate writes them, and the paired
        # differences of every model against the fine-tuned one (listed first there)
        order = sorted(models, key=lambda m: not _label(m).startswith("fine-tuned ("))
        sections = ranking_analysis(
            sub,
            {names[m]: ranked[names[m]] for m in order},
            [m.removesuffix(EXPOSED) for m in order],
            title=f"ml-100k {scheme}/{split}",
        )
        write_report(
            sub,
            table,
            title=f"ml-100k: {scheme} / {split}",
            notes=[
                f"full ranking over {ml.n_items} items, history excluded",
                f"dataset content {ml.manifest['content_hash']}",
            ],
            sections=sections,
        )
        print(f"\n## ml-100k {scheme}/{split}\n{markdown_table(table)}", flush=True)
    print(f"wrote {out / 'metrics.json'} and {out / 'report.md'}", flush=True)


def _serve(args: argparse.Namespace, out: Path, ft_dir: Path, rl_dir: Path, proxy_port: int) -> None:
    from jobs.serve import announce, serve_until_stopped, start, stop

    model = rl_dir / "checkpoint" if (rl_dir / "checkpoint").is_dir() else ft_dir
    if not model.exists():
        fail(f"serve: no model in {out} (run the finetune and train stages first)")
    dataset = str(Path(dataset_path("ml-100k", args.data_root)).resolve())
    try:
        proxy = start(
            {"model": str(model), "dataset": dataset, "feedback_dir": str(out / "feedback")}, proxy_port
        )
        announce(proxy, dataset)
        print(
            "serving until Ctrl-C" if args.serve_seconds is None else f"serving for {args.serve_seconds:g}s"
        )
        sys.stdout.flush()
        serve_until_stopped(args.serve_seconds)
    finally:
        stop()


def _label(model: str) -> str:
    if model.endswith(EXPOSED):
        return _label(model.removesuffix(EXPOSED)) + " + exposure slot"
    p = Path(model)
    if p.name == "checkpoint":
        return f"rl-policy ({p.parent.name})"
    return f"fine-tuned ({p.name})" if p.is_dir() else model


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    check_outlives_job(args.out, "--out")
    if args.exposure_slots < 0:
        fail(f"--exposure-slots must be >= 0, got {args.exposure_slots}")
    import ray

    t0 = time.perf_counter()
    out = Path(args.out).resolve()
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(stages) - set(STAGES)
    if unknown:
        fail(f"--stages: unknown {sorted(unknown)}; choose from {','.join(STAGES)}")
    if args.num_cpus < 1:
        fail(f"--num-cpus must be >= 1, got {args.num_cpus}")
    ft_dir, rl_dir = out / "finetune", out / "rl"
    # every stage's settings checked before the first stage runs (not after a fine-tune of several minutes)
    for stage, build in (
        ("finetune", lambda: _finetune_configs(args)),
        ("train", lambda: _rl_config(args, ft_dir)),
    ):
        try:
            build()
        except ValueError as e:
            fail(f"{stage} stage: {e}")
    proxy_port = args.port
    if "serve" in stages:  # before Ray starts: Serve's processes read the set-up from the environment
        from jobs.serve import fast_path_env

        proxy_port = fast_path_env(args.port, None, embedded=not args.address, direct=None, same_thread=None)
    with ray_session(args.address, num_cpus=args.num_cpus):
        log.info("prepare: MovieLens-100K and the Open Bandit sample, fetched through pip once (cached)")
        ml = load_or_prepare("ml-100k", root=args.data_root)
        obd = load_or_prepare("obd-all", root=args.data_root)
        log.info(
            "ml-100k: %s interactions; obd-all: %s rounds",
            f"{len(ml.interactions):,}",
            f"{len(obd.interactions):,}",
        )
        write_json(
            out / "pipeline_config.json",
            {
                **vars(args),
                "datasets": {"ml-100k": ml.manifest["content_hash"], "obd-all": obd.manifest["content_hash"]},
            },
        )
        ml_ref = ray.put(ml)
        models = list(args.models)
        if "finetune" in stages:
            log.info(
                "finetune: the transformer on next-item prediction for %.0f minutes (a Ray task with %d "
                "CPUs; "
                "a progress line every 30 s, a line per validation) -> %s",
                args.finetune_minutes,
                args.num_cpus,
                ft_dir,
            )
            task = ray.remote(num_cpus=args.num_cpus, num_gpus=args.gpus)(_finetune_task)
            ft = ray.get(task.remote(ml_ref, str(ft_dir), args))
            t = ft["test"]
            log.info(
                "finetune: done in %.0f s, test HR@10 %.4f NDCG@10 %.4f (popularity: 0.0859 / 0.0449)",
                ft["seconds"],
                t["HR@10"],
                t["NDCG@10"],
            )
        if "train" in stages:
            from rec_rllib.rl.train import train

            cfg = _rl_config(args, ft_dir)
            log.info(
                "train: APPO (%s recipe), %d iterations on %d env runners replaying user logs (a line per "
                "iteration; about 3 minutes on 2 cores) -> %s",
                args.rl_recipe,
                cfg.iterations,
                cfg.num_env_runners,
                rl_dir,
            )
            train(cfg, rl_dir, progress=log.info)
        if "evaluate" in stages:
            if ft_dir.is_dir() and (ft_dir / "model.safetensors").exists():
                models.append(str(ft_dir))
            if (rl_dir / "checkpoint").is_dir():
                models.append(str(rl_dir / "checkpoint"))
            if args.exposure_slots > 0:
                models += [m + EXPOSED for m in models if m not in args.models]
            log.info(
                "evaluate: %d models on %d settings (Ray tasks; full ranking of every held-out user) -> %s",
                len(models),
                len(EVAL_SETTINGS),
                out / "report.md",
            )
            evaluate = ray.remote(num_cpus=1)(_evaluate_task)
            jobs = {
                (model, scheme, split): evaluate.remote(ml_ref, model, scheme, split, args.exposure_slots)
                for scheme, split in EVAL_SETTINGS
                for model in models
            }
            results = dict(zip(jobs, ray.get(list(jobs.values())), strict=True))
            _write_reports(out, ml, models, results)
    if "serve" in stages:
        # a Ray of its own: the endpoint shares the machine with none of the training and evaluation
        # stages' workers and objects (on 2 cores, serving beside them answered 1-2 ms slower); on a cluster
        # the driver reconnects, its references to the earlier stages' objects dropped
        with ray_session(args.address, num_cpus=args.num_cpus):
            _serve(args, out, ft_dir, rl_dir, proxy_port)

    print(f"\npipeline done: {','.join(stages)} in {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
