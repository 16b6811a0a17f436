"""Benchmark: fine-tuning on Ray Train workers against one process, and where data-parallel training would
stop scaling.

    python bench/ray_train_finetune.py                              # MovieLens-100K, 1 process vs 2 workers
    python bench/ray_train_finetune.py --dataset runs/bench-scale/synth-10x --workers 2 --minutes 5

Prints, for one process and for N Ray Train workers (`jobs.finetune --num-workers N`, the default model,
the same budget): training targets/s in all and per worker, seconds per epoch, test NDCG@10; then the two
costs each step adds per worker as workers are added: the gradient all-reduce (every trainable parameter's
gradient, dense, each step) and the data feed (windows/s one worker pulls from Ray Data and pads into
tensors, with no training).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(dataset: str, out: Path, minutes: float, workers: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "jobs.finetune",
        "--dataset",
        dataset,
        "--out",
        str(out),
        "--max-minutes",
        str(minutes),
        "--no-progress",
    ]
    if workers:
        cmd += ["--num-workers", str(workers), "--threads", "1"]
    else:
        cmd += ["--threads", "2"]
    with open(out.with_suffix(".log"), "w") as log:
        subprocess.run(cmd, cwd=REPO, stdout=log, stderr=log, check=True)
    return json.loads((out / "final_metrics.json").read_text())


def feed_rate(dataset: str, workers: int, seconds: float = 20.0) -> float:
    """Windows per second one Ray Train worker pulls and pads (no model), over ``seconds``."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from rec_rllib.data.catalog import load_or_prepare
    from rec_rllib.finetune import FinetuneConfig, train_histories
    from rec_rllib.finetune_ray import (
        _exactly_once_split,
        collate_windows,
        shard_batches,
        windows_dataset,
        write_windows,
    )
    from rec_rllib.models.seqrec import ModelConfig

    ds = load_or_prepare(dataset)
    tmp = REPO / "runs" / "bench-ray-train" / "windows"
    write_windows(train_histories(ds, "loo"), ModelConfig().max_len, tmp)
    out = tmp.parent / "feed.json"

    def loop(config):
        ctx = ray.train.get_context()
        shard = ray.train.get_dataset_shard("train")
        cfg, n, t0, epoch = FinetuneConfig(), 0, time.perf_counter(), 0
        while time.perf_counter() - t0 < config["seconds"]:
            epoch += 1
            for batch, weight in shard_batches(shard, cfg, epoch, ctx.get_world_rank(), ctx.get_world_size()):
                collate_windows(batch)
                n += len(batch["window"]) if weight > 0 else 0
        if ctx.get_world_rank() == 0:
            Path(config["out"]).write_text(json.dumps(n / (time.perf_counter() - t0)))

    ray.init(address="local", num_cpus=workers + 1, include_dashboard=False, logging_level="ERROR")
    try:
        TorchTrainer(
            loop,
            train_loop_config={"seconds": seconds, "out": str(out)},
            scaling_config=ray.train.ScalingConfig(num_workers=workers),
            run_config=ray.train.RunConfig(storage_path=str(tmp.parent / "rt")),
            datasets={"train": windows_dataset(tmp, workers=workers)},
            dataset_config=_exactly_once_split(),
            torch_config=TorchConfig(backend="gloo"),
        ).fit()
    finally:
        ray.shutdown()
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--minutes", type=float, default=3.0)
    args = p.parse_args()
    root = REPO / "runs" / "bench-ray-train"
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for workers in (0, args.workers):
        t = time.perf_counter()
        final = run(args.dataset, root / f"w{workers}", args.minutes, workers)
        rows.append((workers, final, time.perf_counter() - t))
    print(f"\n{Path(args.dataset).name}, the default model, {args.minutes:g}-minute budget")
    print("| set-up | targets/s | per worker | s/epoch | test NDCG@10 | wall s |")
    print("|---|---:|---:|---:|---:|---:|")
    for workers, f, wall in rows:
        name = "one process (2 threads)" if workers == 0 else f"{workers} Ray Train workers (1 thread each)"
        per = f["targets_per_second"] / max(workers, 1)
        print(
            f"| {name} | {f['targets_per_second']:,.0f} | {per:,.0f} | {f['seconds_per_epoch']:.1f} "
            f"| {f['test']['NDCG@10']:.4f} | {wall:.0f} |"
        )

    from rec_rllib.models.run import load_run

    model, _ = load_run(root / "w0")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    item_rows = model.id_embedding.weight.numel()
    rate = feed_rate(args.dataset, args.workers)
    print(
        f"\ngradient all-reduce per step: {trainable * 4 / 1e6:.1f} MB ({trainable:,} trainable parameters, "
        f"{item_rows * 4 / 1e6:.1f} MB of it the item id embedding, which grows with the catalogue); "
        f"ring all-reduce moves about 2x that per worker per step"
    )
    print(
        f"data feed: {rate:,.0f} windows/s per worker pulled from Ray Data and padded "
        f"({args.workers} workers)"
    )


if __name__ == "__main__":
    main()
