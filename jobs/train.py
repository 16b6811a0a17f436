"""Train the fine-tuned transformer further as an RLlib policy on env runners that replay user logs.

Examples::

    python -m jobs.train --finetuned runs/ft --out runs/rl                      # embedded local Ray, APPO
    python -m jobs.train --finetuned runs/ft --out runs/rl --algorithm ppo --exploration boltzmann --temperature 1.0
    python -m jobs.train --finetuned runs/ft --out runs/rl --resume runs/rl/checkpoint --iterations 40
    RAY_AUTH_MODE=token ray job submit --working-dir . -- \\
        python -m jobs.train --address auto --finetuned runs/ft --out runs/rl --num-env-runners 8 \\
        --env-runner-resource env_runner=1 --num-learners 1 --num-gpus-per-learner 1 --learner-resource learner=1

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
from dataclasses import fields
from pathlib import Path

import yaml

from jobs._common import check_outlives_job, fail, parse_resources, ray_session, setup_logging
from rec_rllib.data.catalog import load_or_prepare, prepared_dir
from rec_rllib.env import REWARDS, EnvConfig
from rec_rllib.explore import STRATEGIES, ExplorationConfig
from rec_rllib.exposure import EXPOSURE_SHAPES
from rec_rllib.rl.train import (
    ALGORITHMS,
    RLTrainConfig,
    parse_candidate_items,
    parse_cooccurrence_gamma,
    train,
)

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
    p.add_argument("--config", help="YAML with RLTrainConfig fields (exploration: and env: as sections)")
    p.add_argument("--resume", help="RLlib checkpoint directory to continue from")
    p.add_argument("--address", help="Ray address ('auto' on a cluster); default: an embedded local Ray")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded local Ray")
    p.add_argument("--num-gpus", type=float, default=None, help="logical GPUs of the embedded local Ray")
    g = p.add_argument_group("algorithm and resources")
    g.add_argument("--algorithm", choices=ALGORITHMS)
    g.add_argument("--iterations", type=int)
    g.add_argument("--num-env-runners", type=int)
    g.add_argument("--num-envs-per-env-runner", type=int)
    g.add_argument("--num-cpus-per-env-runner", type=float)
    g.add_argument(
        "--env-runner-resource", action="append", help="NAME=AMOUNT custom resource per env runner"
    )
    g.add_argument("--num-learners", type=int)
    g.add_argument("--num-gpus-per-learner", type=float)
    g.add_argument("--learner-resource", action="append", help="NAME=AMOUNT custom resource per learner")
    g.add_argument("--train-batch-size", type=int)
    g.add_argument("--rollout-fragment-length", type=int)
    g.add_argument(
        "--train-encoder",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train every weight end to end (default: a policy head on the frozen fine-tuned encoder)",
    )
    g.add_argument(
        "--train-state-head",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="policy head: also train the linear map on the user state (default); --no-train-state-head keeps it "
        "at the fine-tuned identity and trains the item bias, the popularity weight and the exposure weight only",
    )
    g.add_argument(
        "--train-item-terms",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="policy head: train the item bias and the popularity weight (default); with --no-train-state-head and "
        "an exposure cost, --no-train-item-terms trains the exposure weight alone",
    )
    g.add_argument(
        "--candidate-items",
        type=parse_candidate_items,
        help="APPO/PPO: the policy acts and learns over each state's K best items by its scores before the "
        "exposure term; 'auto' (default): the whole catalogue up to 4,096 items, 512 above; 0: always the "
        "whole catalogue",
    )
    g.add_argument("--lr", type=float)
    g.add_argument("--ref-kl-coeff", type=float, help="KL penalty toward the fine-tuned policy (0 = off)")
    g.add_argument("--entropy-coeff", type=float)
    g.add_argument(
        "--next-item-ce-coeff",
        type=float,
        help="dqn: weight of the logged next item's cross-entropy on the Q-values (SQN's anchor; 0 = off)",
    )
    g.add_argument("--gamma", type=float)
    g.add_argument("--checkpoint-every", type=int)
    g.add_argument("--seed", type=int)
    e = p.add_argument_group("exploration (rec_rllib.explore)")
    e.add_argument("--exploration", choices=STRATEGIES, dest="strategy")
    for name in ("epsilon", "epsilon_final", "temperature", "temperature_final"):
        e.add_argument("--" + name.replace("_", "-"), type=float, dest=name)
    e.add_argument("--decay-steps", type=int)
    e.add_argument("--ucb-alpha", type=float, dest="ucb_alpha",
                   help="UCB bonus width in score units (what an item never shown in that direction gains)")  # fmt: skip
    v = p.add_argument_group("environment (rec_rllib.env)")
    v.add_argument("--reward", choices=REWARDS)
    v.add_argument("--horizon", type=int)
    v.add_argument(
        "--novelty-bonus",
        type=float,
        help="add L * item novelty (0-1) to every reward: the accuracy-coverage knob (0 = off)",
    )
    v.add_argument(
        "--exposure-cost",
        type=float,
        help="price what is on display: a recommendation costs L * log(1 + times recommended in the runner's "
        "window) / log(1 + window); the policy learns a weight on those counts (coverage; 0 = off)",
    )
    v.add_argument("--exposure-window", type=int, help="recommendations the exposure tracker remembers")
    v.add_argument(
        "--exposure-shape",
        choices=EXPOSURE_SHAPES,
        help="what the exposure cost and the learned term count: log (log(1 + count), the default) or "
        "indicator (L for an item recommended at all within the window: keeps the order of what is on display)",
    )
    v.add_argument(
        "--cooccurrence",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the observation carries the item-kNN simulator's click probabilities for the recent window "
        "(leave-user-out) and the policy learns a weight on them: co-occurrence evidence the fine-tuned model "
        "lacks (off by default)",
    )
    v.add_argument(
        "--cooccurrence-window",
        type=int,
        help="the most recent items the co-occurrence feature averages over (default 5)",
    )
    v.add_argument(
        "--cooccurrence-gamma",
        type=parse_cooccurrence_gamma,
        help="with --cooccurrence: fix the co-occurrence weight γ at this number instead of learning it, or "
        "'validation': at the γ whose fine-tuned scores plus the feature rank the validation users best "
        "(NDCG@10; chosen before training, written to <out>/cooccurrence_gamma.json)",
    )
    v.add_argument("--window", type=int)
    v.add_argument("--episode-len", type=int)
    v.add_argument(
        "--mask-items",
        type=int,
        help="consumed items the observation lists, the most recent (never recommended; default 1024)",
    )
    v.add_argument(
        "--feature-items",
        type=int,
        help="most items the exposure and co-occurrence features list per step, the largest values "
        "(default 2048)",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def resolve_config(args: argparse.Namespace) -> RLTrainConfig:
    doc: dict = {}
    if args.config:
        doc = yaml.safe_load(Path(args.config).read_text()) or {}
        if not isinstance(doc, dict):
            raise ValueError(
                f"--config {args.config}: expected a mapping of RL settings, got {type(doc).__name__}"
            )
    top = {f.name for f in fields(RLTrainConfig)} - {"exploration", "env"}
    unknown = sorted(set(doc) - top - {"exploration", "env"})
    if unknown:  # a typo would otherwise be ignored
        raise ValueError(
            f"--config {args.config}: unknown settings {unknown}; known: {sorted(top | {'exploration', 'env'})}"
        )
    merged = {k: v for k, v in doc.items() if k in top}
    expl = dict(doc.get("exploration") or {})
    env = dict(doc.get("env") or {})
    for name in top:
        value = getattr(args, name, None)
        if value is not None:
            merged[name] = value
    merged["finetuned"] = args.finetuned
    if args.env_runner_resource:
        merged["env_runner_resources"] = parse_resources(args.env_runner_resource)
    if args.learner_resource:
        merged["learner_resources"] = parse_resources(args.learner_resource)
    for f in fields(ExplorationConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            expl[f.name] = value
    for f in fields(EnvConfig):
        value = getattr(args, f.name, None) if f.name not in ("dataset", "seed") else None
        if value is not None:
            env[f.name] = value
    return RLTrainConfig.from_dict({**merged, "exploration": expl, "env": env})


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
            said = (f"no node of this Ray offers {missing}, which the env runners or learners ask for "
                    "(--env-runner-resource, --learner-resource, --num-gpus-per-learner)")  # fmt: skip
            if args.address is None:  # the embedded Ray has CPUs and --num-gpus only: they would wait forever
                fail(f"{said}; the embedded Ray offers CPU and --num-gpus only: drop those flags, or run on a "
                     "cluster whose nodes offer them")  # fmt: skip
            log.warning("%s: they wait until one does (an autoscaler may add such a node)", said)
        summary = train(cfg, args.out, resume=args.resume)
    print(f"checkpoint: {summary['checkpoint']}\nwrote {args.out}/train_metrics.csv and training_curves.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
