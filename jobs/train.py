"""Train the fine-tuned transformer further as an RLlib policy on env runners that replay user logs.

Examples::

    python -m jobs.train --finetuned runs/ft --out runs/rl                      # embedded local Ray, APPO
    python -m jobs.train --finetuned runs/ft --out runs/rl --algorithm ppo --exploration boltzmann \\
        --temperature 1.0
    python -m jobs.train --finetuned runs/ft --out runs/rl --resume runs/rl/checkpoint --iterations 40
    RAY_AUTH_MODE=token ray job submit --working-dir . -- \\
        python -m jobs.train --address auto --finetuned runs/ft --out runs/rl --num-env-runners 8 \\
        --env-runner-resource env_runner=1 --num-learners 1 --num-gpus-per-learner 1 \\
        --learner-resource learner=1

The policy is RecPolicyModule (rec_rllib.rl.module): the fine-tuned TextSeqRec with a value head, action
masking and the chosen exploration strategy. Env runner i of n replays its own disjoint shard of the
train users (rec_rllib.env.LogReplayEnv). Every --checkpoint-every iterations an RLlib checkpoint is
written to <out>/checkpoint; --resume continues from one.

What to expect on ml-100k with the defaults (2 env runners, 32 envs each, 2 CPU cores): a few seconds per
iteration, per-iteration lines with episode return, hit rate, env steps/s and the KL to the fine-tuned
policy; <out>/train_metrics.csv, <out>/training_curves.png, <out>/checkpoint (loadable by
jobs.evaluate and serving). Settings: command line > --config YAML > defaults.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import yaml

from jobs._common import check_outlives_job, fail, ray_session, setup_logging
from rec_rllib.config import add_flags, apply_flags, merged
from rec_rllib.data.catalog import load_or_prepare, prepared_dir
from rec_rllib.rl.config import RLTrainConfig
from rec_rllib.rl.recipes import RECIPES, recipe
from rec_rllib.rl.train import train

log = logging.getLogger("jobs.train")


def unoffered_resources(cfg: RLTrainConfig) -> list[str]:
    """The resources the run's env runners and learners ask for that no node of the connected Ray offers."""
    import ray

    offered = ray.cluster_resources()
    wanted = {*cfg.env_runner_resources, *cfg.learner_resources}
    if cfg.num_learners and cfg.num_gpus_per_learner:
        wanted.add("GPU")
    return sorted(name for name in wanted if offered.get(name, 0) <= 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--finetuned", required=True, help="fine-tuned run directory (jobs.finetune --out)")
    p.add_argument("--out", required=True, help="RL run directory")
    p.add_argument("--dataset", help="dataset the env replays (default: the one the fine-tuned run used)")
    p.add_argument("--data-root", help="root of prepared datasets (default: $REC_RLLIB_DATA or ./data)")
    p.add_argument(
        "--recipe",
        choices=RECIPES,
        help="named settings shipped with the package (rec_rllib/rl/recipes; docs/rl.md): coverage learns "
        "the price of what is on display; relevance is the defaults. --config and flags override it",
    )
    p.add_argument(
        "--config",
        help="YAML or JSON with RLTrainConfig's fields (exploration: and env: as sections); an earlier "
        "run's rl_config.json runs its settings again",
    )
    p.add_argument("--resume", help="RLlib checkpoint directory to continue from")
    p.add_argument("--address", help="Ray address ('auto' on a cluster); default: an embedded local Ray")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded local Ray")
    p.add_argument("--num-gpus", type=float, default=None, help="logical GPUs of the embedded local Ray")
    add_flags(
        p.add_argument_group("algorithm and resources (rec_rllib.rl.config.RLTrainConfig)"),
        RLTrainConfig,
        section="",
        skip=("finetuned",),
    )
    add_flags(
        p.add_argument_group("exploration (rec_rllib.explore.ExplorationConfig)"),
        RLTrainConfig,
        section="exploration",
    )
    add_flags(p.add_argument_group("environment (rec_rllib.env.EnvConfig)"), RLTrainConfig, section="env")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def resolve_config(args: argparse.Namespace) -> RLTrainConfig:
    """Defaults < recipe < config file (RLTrainConfig's fields, ``exploration:`` and ``env:`` as sections; an
    earlier run's ``rl_config.json`` runs its settings again) < command line."""
    doc: dict = recipe(args.recipe) if args.recipe else {}
    if args.config:
        given = yaml.safe_load(Path(args.config).read_text()) or {}
        if not isinstance(given, dict):
            raise ValueError(
                f"--config {args.config}: expected a mapping of RL settings, got {type(given).__name__}"
            )
        doc = merged(doc, given)
    settings = apply_flags(args, RLTrainConfig, doc)
    settings["finetuned"] = args.finetuned
    try:
        return RLTrainConfig.from_dict(settings)
    except ValueError as e:
        raise ValueError(
            f"--config {args.config}: {e}" if args.config and "unknown" in str(e) else str(e)
        ) from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    check_outlives_job(args.out, "--out")
    from rec_rllib.models.run import is_run_dir

    if not is_run_dir(args.finetuned):
        fail(f"--finetuned {args.finetuned} is not a fine-tuned run directory (run jobs.finetune first)")
    if args.resume:
        from rec_rllib.rl.policy import check_resumable

        try:
            check_resumable(args.resume)
        except FileNotFoundError as e:
            fail(f"--resume: {e}")
    try:
        cfg = resolve_config(args)
    except (ValueError, TypeError) as e:
        fail(str(e))
    except (OSError, yaml.YAMLError) as e:
        fail(f"--config {args.config}: {e}")
    import json

    meta = json.loads((Path(args.finetuned) / "config.json").read_text())
    ds_ref = args.dataset or meta.get("dataset", {}).get("ref") or meta.get("dataset", {}).get("name")
    try:
        dataset = load_or_prepare(ds_ref, root=args.data_root)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    trained_on = meta.get("dataset", {}).get("content_hash")
    if trained_on and trained_on != dataset.manifest.get("content_hash"):
        fail(f"{args.finetuned} was fine-tuned on another dataset than {ds_ref}")
    cfg.env.dataset = str(Path(prepared_dir(ds_ref, args.data_root)).resolve())
    cfg.env.seed = cfg.seed

    with ray_session(args.address, num_cpus=args.num_cpus, num_gpus=args.num_gpus):
        missing = unoffered_resources(cfg)
        if missing:
            said = (
                f"no node of this Ray offers {missing}, which the env runners or learners ask for "
                "(--env-runner-resource, --learner-resource, --num-gpus-per-learner)"
            )
            if args.address is None:  # the embedded Ray has CPUs and --num-gpus only: they would wait forever
                fail(
                    f"{said}; the embedded Ray offers CPU and --num-gpus only: drop those flags, or run on a "
                    "cluster whose nodes offer them"
                )
            log.warning("%s: they wait until one does (an autoscaler may add such a node)", said)
        summary = train(cfg, args.out, resume=args.resume)
    print(f"checkpoint: {summary['checkpoint']}\nwrote {args.out}/train_metrics.csv and training_curves.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
