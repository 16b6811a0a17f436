"""Data-parallel fine-tuning on Ray Train: the same model, objective and loop as :mod:`rec_rllib.finetune`,
on ``num_workers`` Ray Train workers (PyTorch DDP: gloo on CPU, NCCL on GPU).

Data flow: the driver writes the training windows once as Parquet files in the run directory
(``train_windows/``, one row per window: its items, how many of them are input, whether it starts the user's
history); Ray Data streams them to the workers (``streaming_split`` without dropping rows, block order
shuffled every epoch plus a local shuffle buffer), so each window is a target of exactly one worker once per
epoch and no worker holds the whole log. Each worker pads its batches, computes the loss through DDP
(gradients averaged every step) and agrees with the others every step on whether to go on (the time budget,
early stopping, an uneven last batch). Worker 0 validates on the fixed sample of validation users, shows
progress and reports a checkpoint through Ray Train whenever validation improves. The driver then loads the
best checkpoint, evaluates it on every validation and test user and writes the same run directory as the
single-process path, so RL training, evaluation and serving read it unchanged.

``batch_size`` is per worker: N workers take N × batch_size windows a step (scale ``lr`` with it if needed).
The run directory (and so Ray Train's storage under it) must be reachable from every node: a shared
filesystem or a URI such as ``s3://...``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file

from rec_rllib.columns import Col
from rec_rllib.data.dataset import LogDataset
from rec_rllib.eval.ranking import evaluate_ranking, sample_cases
from rec_rllib.finetune import (
    FinetuneConfig,
    FinetuneResult,
    NextItemLoss,
    TrainingLoop,
    Validator,
    apply_gradients,
    known_items,
    log_not_target,
    make_optimizer,
    pad_windows,
    resolve_device,
    resolve_loss,
    train_histories,
    window_rows,
    write_run,
)
from rec_rllib.models.run import TransformerRecommender, build_model
from rec_rllib.models.seqrec import ModelConfig, TextSeqRec

log = logging.getLogger(__name__)

WINDOWS_DIR = "train_windows"
WINDOWS_PER_FILE = 5_000
"""At most this many windows a file, and at least 32 files: the unit Ray Data balances across workers."""
BEST_WEIGHTS = "model.safetensors"
SUMMARY_FILE = "run_summary.json"


# -- the training windows as Parquet -----------------------------------------------------------------------
def write_windows(histories: list[np.ndarray], max_len: int, directory: str | Path) -> tuple[int, int]:
    """Write the training windows to ``directory`` as Parquet files (``window`` numbers them); (windows,
    targets)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.parquet"):
        old.unlink()
    items, n_input, from_start = window_rows(histories, max_len)
    n = len(items)
    n_files = max(32, math.ceil(n / WINDOWS_PER_FILE))
    per_file = max(1, math.ceil(n / n_files))
    for f, lo in enumerate(range(0, n, per_file)):
        hi = min(n, lo + per_file)
        table = pa.table(
            {
                "window": pa.array(np.arange(lo, hi, dtype=np.int64)),
                "items": pa.array([w.astype(np.int32) for w in items[lo:hi]], type=pa.list_(pa.int32())),
                "n_input": pa.array(n_input[lo:hi].astype(np.int32)),
                "from_start": pa.array(from_start[lo:hi]),
            }
        )
        pq.write_table(table, out / f"part-{f:05d}.parquet")
    return n, int(n_input.sum() + from_start.sum())


def collate_windows(batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Ray Data batch of windows -> (tokens [B, T], lengths [B], targets [B, T]) as training_windows makes
    them (T = the longest window in the batch + 1)."""
    n_input = batch["n_input"]
    tokens, targets, lengths = pad_windows(
        batch["items"], n_input, batch["from_start"], width=int(n_input.max()) + 1
    )
    return tokens, lengths, targets


def windows_dataset(directory: str | Path, *, workers: int, seed: int = 0):
    """The training windows as a Ray Dataset read from their Parquet files, the files in a new seeded order
    every epoch, in blocks small enough (about 16 a worker) for Ray's split to balance the workers: Ray Data
    otherwise reads small files into one block, which one worker would get whole."""
    import ray.data

    files = sorted(Path(directory).glob("*.parquet"))
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    in_memory = sum(_list_values(f) * 4 + 24 for f in files) + 16 * rows  # int32 items, offsets, row ids
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the training loop shows progress
    saved = ctx.target_max_block_size
    ctx.target_max_block_size = int(min(saved, max(16 * 1024, in_memory / (16 * workers))))
    try:  # the dataset keeps a copy of the context it was made in
        order = ray.data.FileShuffleConfig(seed=seed, reseed_after_execution=True)
        return ray.data.read_parquet(str(directory), shuffle=order)
    finally:
        ctx.target_max_block_size = saved


def _list_values(path: Path) -> int:
    """The number of items in a windows file's ``items`` lists (from its metadata)."""
    meta = pq.ParquetFile(path).metadata
    return sum(
        meta.row_group(g).column(c).num_values
        for g in range(meta.num_row_groups)
        for c in range(meta.num_columns)
        if meta.row_group(g).column(c).path_in_schema.startswith("items.")
    )


# -- one worker ---------------------------------------------------------------------------------------------
STAND_IN = {
    "window": np.array([-1]),
    "items": np.array([np.array([0], dtype=np.int32)], dtype=object),
    "n_input": np.array([1], dtype=np.int32),
    "from_start": np.array([True]),
}
"""A one-window batch a worker trains on with weight 0 when its shard ran out before the others'."""


def shard_batches(shard, cfg: FinetuneConfig, epoch: int, rank: int, world: int):
    """(Ray Data batch of windows, loss weight) for one epoch of this worker's shard, in lockstep with the
    other workers: every step all of them agree on how many still have a batch; a worker whose shard ran out
    steps on :data:`STAND_IN` with weight 0 (DDP needs every worker in every step) and the others weigh their
    loss by world / active, so the averaged gradient is the active workers' mean. Ends when every shard is
    done: each window is trained on exactly once per epoch."""
    import torch.distributed as dist

    batches = shard.iter_batches(
        batch_size=cfg.batch_size,
        batch_format="numpy",
        local_shuffle_buffer_size=4 * cfg.batch_size,
        local_shuffle_seed=cfg.seed + 1000 * epoch + rank,
        drop_last=False,
    )
    it = iter(batches)
    count = torch.zeros(1, dtype=torch.int32)
    while True:
        batch = next(it, None)
        count.fill_(int(batch is not None))
        if world > 1:
            dist.all_reduce(count)
        active = int(count.item())
        if active == 0:
            return
        yield (batch, world / active) if batch is not None else (STAND_IN, 0.0)


def _train_worker(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: DDP training of the shared loop on this worker's shard."""
    import ray
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    chief = rank == 0
    cfg = FinetuneConfig.from_dict(config["train"])
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed + rank)
    model_cfg = ModelConfig.from_dict(config["model"])
    state = ray.get(config["initial_state"])
    model = TextSeqRec(
        model_cfg, config["n_items"], text_embeddings=state.get("text_embeddings"), known_items=state["known"]
    )
    model.load_state_dict(state)
    del state
    device = ray.train.torch.get_device() if cfg.device != "cpu" else torch.device("cpu")
    model.to(device)
    objective = NextItemLoss(model, cfg, ray.get(config["log_not_target"]))
    # buffers (the frozen text table) are the same on every worker and never change: not broadcast per step
    ddp = ray.train.torch.prepare_model(
        objective, move_to_device=device, parallel_strategy_kwargs={"broadcast_buffers": False}
    )
    steps_per_epoch = config["steps_per_epoch"]
    opt, sched = make_optimizer(model, cfg, steps_per_epoch)
    validator = None
    if chief:
        cases, n_valid, n_final = ray.get(config["valid_cases"])
        validator = Validator(
            TransformerRecommender(model), None, cfg, n_final=n_final, cases=cases, n_valid=n_valid
        )
    flag = torch.zeros(1, dtype=torch.int32)

    def agree(value: bool) -> bool:
        """Whether any worker says yes (every worker calls this at the same points)."""
        flag.fill_(int(value))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    shard = ray.train.get_dataset_shard("train")
    epoch_steps: list[int] = []  # this worker's own batches per epoch

    def epoch_batches(epoch: int):
        epoch_steps.append(0)
        for batch, weight in shard_batches(shard, cfg, epoch, rank, world):
            epoch_steps[-1] += int(weight > 0)
            yield collate_windows(batch), weight

    def step(item) -> float:
        (tok, lens, tgt), weight = item
        loss = ddp(tok.to(device), lens.to(device), tgt.to(device))
        apply_gradients(loss * weight, model, opt, sched, cfg.grad_clip)
        return loss.item()

    def on_eval(row: dict[str, float], improved: bool) -> None:
        """Every worker reports each validation point to Ray Train; worker 0 attaches the weights when they
        are the best so far (Ray Train keeps that checkpoint)."""
        metrics = {k: v for k, v in row.items() if isinstance(v, (int, float))}
        if chief and improved:
            _report_weights(metrics, model.state_dict(), f"best-{len(loop.history):05d}")
        else:
            ray.train.report(metrics)

    loop = TrainingLoop(
        cfg,
        steps_per_epoch,
        config["targets_per_worker_epoch"],
        validator,
        model.state_dict,
        chief=chief,
        agree=agree,
        on_eval=on_eval,
    )
    loop.run(epoch_batches, step, model=model, lr=lambda: sched.get_last_lr()[0], metrics_csv=None)
    counts, nodes = [None] * world, [None] * world
    dist.all_gather_object(counts, epoch_steps)
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    # the last report's checkpoint carries the best weights and worker 0's record of the run to the driver
    if chief:
        summary = {
            "history": loop.history,
            "best": list(loop.best),
            "epochs_run": loop.epochs_run,
            "epochs_done": loop.epochs_done,
            "train_seconds": loop.train_seconds,
            "stopped_by": loop.stopped_by,
            "batches_per_worker": counts,
            "worker_nodes": nodes,
        }
        best = loop.best_state if loop.best_state is not None else model.state_dict()
        _report_weights(
            {"best_valid_NDCG@10": loop.best[0]}, best, "final", {SUMMARY_FILE: json.dumps(summary)}
        )
    else:
        ray.train.report({"best_valid_NDCG@10": loop.best[0]})


def _report_weights(
    metrics: dict[str, float], state: dict[str, torch.Tensor], name: str, files: dict[str, str] | None = None
) -> None:
    """``ray.train.report`` with a checkpoint named ``name`` holding the weights ``state`` (and ``files``)."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in state.items()}, os.path.join(tmp, BEST_WEIGHTS)
        )
        for fname, text in (files or {}).items():
            Path(tmp, fname).write_text(text)
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name
        )


# -- the driver ----------------------------------------------------------------------------------------------
def finetune_distributed(
    dataset: LogDataset,
    model_cfg: ModelConfig,
    cfg: FinetuneConfig,
    run_dir: str | Path,
    *,
    num_workers: int = 2,
    use_gpu: bool = False,
    cpus_per_worker: float = 1.0,
    worker_resources: dict[str, float] | None = None,
    dataset_ref: str | None = None,
) -> FinetuneResult:
    """Fine-tune on ``num_workers`` Ray Train workers (Ray must be initialised); same run directory as
    :func:`rec_rllib.finetune.finetune`. ``worker_resources`` (custom resources each worker asks for, e.g.
    ``{"trainer": 1}``) places workers on the nodes that offer them."""
    import ray
    import ray.data
    import ray.train
    import torch.distributed as dist
    from ray.train.torch import TorchConfig, TorchTrainer

    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if cfg.holdout_items > 0:
        raise ValueError("holdout_items is a single-process setting; train without --num-workers for it")
    run = Path(run_dir).absolute()
    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    histories = train_histories(dataset, cfg.scheme)
    known = known_items(histories, dataset.n_items)
    n_windows, n_targets = write_windows(histories, model_cfg.max_len, run / WINDOWS_DIR)
    loss_kind = resolve_loss(cfg.loss, dataset.n_items)
    log.info(
        "%d users, %d windows, %d training targets, %d items; %s softmax; %d Ray Train workers%s",
        len(histories),
        n_windows,
        n_targets,
        dataset.n_items,
        loss_kind,
        num_workers,
        " on GPUs" if use_gpu else "",
    )
    model = build_model(model_cfg, list(dataset.items[Col.TEXT]), known_items=known)
    state_ref = ray.put({k: v.detach().cpu() for k, v in model.state_dict().items()})
    lnt_ref = ray.put(log_not_target(histories, dataset.n_items) if loss_kind == "sampled" else None)
    full_valid = dataset.eval_cases(cfg.scheme, "valid")
    test_cases = dataset.eval_cases(cfg.scheme, "test")
    valid_sample = sample_cases(full_valid, cfg.valid_users, seed=cfg.seed)
    cases_ref = ray.put((valid_sample, len(full_valid), len(test_cases)))
    del histories
    config = {
        "train": asdict(cfg),
        "model": model_cfg.to_dict(),
        "n_items": dataset.n_items,
        "initial_state": state_ref,
        "log_not_target": lnt_ref,
        "valid_cases": cases_ref,
        "steps_per_epoch": math.ceil(n_windows / num_workers / cfg.batch_size),
        "targets_per_worker_epoch": math.ceil(n_targets / num_workers),
    }
    backend = "cpu:gloo,cuda:nccl" if use_gpu and dist.is_nccl_available() else "gloo"
    windows = windows_dataset(run / WINDOWS_DIR, workers=num_workers, seed=cfg.seed)
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cpus_per_worker, **(worker_resources or {})},
        ),
        run_config=ray.train.RunConfig(
            name="finetune",
            storage_path=str(run / "ray_train"),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
        ),
        datasets={"train": windows},
        dataset_config=_exactly_once_split(),
        # gloo for the CPU tensors (the workers' agreement flags, CPU training), NCCL for CUDA gradients
        torch_config=TorchConfig(backend=backend),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    with result.checkpoint.as_directory() as ckpt:
        model.load_state_dict(load_file(os.path.join(ckpt, BEST_WEIGHTS)))
        summary = json.loads(Path(ckpt, SUMMARY_FILE).read_text())
    model = model.to(resolve_device("cpu" if not use_gpu else cfg.device)).eval()
    rec = TransformerRecommender(model)
    valid = evaluate_ranking(
        rec, dataset, scheme=cfg.scheme, split="valid", ks=(10,), beyond_accuracy=False, cases=full_valid
    )
    test = evaluate_ranking(rec, dataset, scheme=cfg.scheme, split="test", cases=test_cases).metrics
    seconds = time.perf_counter() - t0
    history = summary["history"]
    best_valid, best_epoch = summary["best"]
    res = FinetuneResult(
        run,
        best_epoch,
        valid.metrics["NDCG@10"],
        summary["epochs_run"],
        seconds,
        summary["train_seconds"] / max(summary["epochs_done"], 1e-9),
        history,
        test,
        [],
        n_targets * summary["epochs_done"] / max(summary["train_seconds"], 1e-9),
        summary["stopped_by"],
    )
    distributed = {
        "num_workers": num_workers,
        "use_gpu": use_gpu,
        "backend": backend,
        "sampled_best_valid_ndcg10": best_valid,
        "batches_per_worker": summary["batches_per_worker"],
        "worker_nodes": summary["worker_nodes"],
    }
    write_run(
        run,
        model,
        cfg,
        dataset,
        res,
        loss_kind,
        dataset_ref=dataset_ref,
        title=f"fine-tuning ({num_workers} workers)",
        extra={"distributed": distributed},
    )
    log.info(
        "done in %.1f min on %d workers: best epoch %s, valid NDCG@10 %.4f, test NDCG@10 %.4f HR@10 %.4f",
        seconds / 60,
        num_workers,
        best_epoch,
        res.best_valid_ndcg10,
        test["NDCG@10"],
        test["HR@10"],
    )
    return res


def _exactly_once_split():
    """Ray Train's data config with ``streaming_split(equal=False)``: the default (``equal=True``) drops rows
    to give every worker the same count; here every window is trained on once per epoch and the loop evens
    out the last steps instead (Ray Train's documented way to change the split: override ``configure``)."""
    from ray.train import DataConfig

    class ExactlyOnceSplit(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            output = [{} for _ in range(world_size)]
            hints = worker_node_ids if self._enable_shard_locality else None
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                for i, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                    output[i][name] = split
            return output

    return ExactlyOnceSplit()
