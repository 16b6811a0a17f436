"""Benchmark: how preparing and fine-tuning grow with the log, on generated logs with MovieLens-100K's shape
at 1x, 10x and 100x its size (rec_rllib.data.synthetic), and on MovieLens-100K itself.

    python bench/scale_finetune.py                                   # everything (about an hour on 2 cores)
    python bench/scale_finetune.py --scales 1 10 --no-ml100k         # the smaller sizes only
    python bench/scale_finetune.py --scales 100 --losses sampled --minutes 10

For each size it prints: prepare time and peak RSS (`jobs.prepare --dataset custom`, as a user runs it);
for each loss, a `jobs.finetune` run with the default model under a time budget: training targets/s,
seconds per epoch (extrapolated when the budget ends the first epoch), the run's time against its budget
(training and the final evaluation; the model's text embeddings are computed before it and cached), peak
RSS, and test NDCG@10 / HR@10 of the model beside popularity's on the same log. A full softmax whose logits
would not fit in memory is skipped and said so. Run it alone: it measures time and memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from rec_rllib.data.catalog import load_or_prepare
from rec_rllib.data.synthetic import SCALES, generate
from rec_rllib.eval import evaluate_ranking
from rec_rllib.models import PopularityRecommender
from rec_rllib.models.seqrec import ModelConfig

REPO = Path(__file__).resolve().parents[1]
FULL_SOFTMAX_MAX_BYTES = 6e9
"""Skip a full-softmax run whose per-step logits (and their gradient and mask) would pass this."""

# runs a command and prints the peak RSS (kB) of its process tree's largest process, as the last line
MEASURE = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"
)


def measured(cmd: list[str], log: Path) -> tuple[float, float]:
    """(seconds, peak RSS in GB) of ``cmd``; its output goes to ``log``."""
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(
            [sys.executable, "-c", MEASURE, *cmd], cwd=REPO, stdout=subprocess.PIPE, stderr=f, text=True
        )
    seconds = time.perf_counter() - t
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")
    Path(log).with_suffix(".out").write_text("\n".join(lines[:-1]))
    return seconds, int(lines[-1]) / 1e6


def prepare(scale: float, root: Path) -> tuple[Path, float, float]:
    """The generated log at ``scale`` prepared as a custom dataset; (dataset dir, seconds, peak GB)."""
    raw = root / f"raw-{scale:g}x"
    if not (raw / "interactions.parquet").exists():
        generate(scale, seed=0).write(raw)
    out = root / f"synth-{scale:g}x"
    cmd = [
        sys.executable,
        "-m",
        "jobs.prepare",
        "--dataset",
        "custom",
        "--interactions",
        str(raw / "interactions.parquet"),
        "--items",
        str(raw / "items.parquet"),
        *"--user-col user_id --item-col item_id --time-col timestamp --reward-col rating".split(),
        *"--item-text-col text --name".split(),
        out.name,
        "--out",
        str(out),
    ]
    seconds, gb = measured(cmd, root / f"prepare-{scale:g}x.log")
    return out, seconds, gb


def finetune_run(dataset: str, n_items: int, loss: str, minutes: float, runs: Path, label: str) -> dict:
    """One `jobs.finetune` run with the default model; its figures, or why it was skipped."""
    m = ModelConfig()
    logit_bytes = 3 * 64 * m.max_len * n_items * 4  # batch 64: logits, their gradient, the history mask
    if loss == "full" and logit_bytes > FULL_SOFTMAX_MAX_BYTES:
        return {"skipped": f"full softmax logits {logit_bytes / 1e9:.0f} GB a step"}
    out = runs / f"{label}-{loss}"
    cmd = [
        sys.executable,
        "-m",
        "jobs.finetune",
        "--dataset",
        dataset,
        "--out",
        str(out),
        "--loss",
        loss,
        "--max-minutes",
        str(minutes),
        "--threads",
        "2",
        "--no-progress",
    ]
    wall, gb = measured(cmd, runs / f"{label}-{loss}.log")
    final = json.loads((out / "final_metrics.json").read_text())
    return {
        "targets_per_second": final["targets_per_second"],
        "seconds_per_epoch": final["seconds_per_epoch"],
        "seconds": final["seconds"],
        "budget": minutes * 60,
        "wall": wall,
        "stopped_by": final["stopped_by"],
        "peak_gb": gb,
        "ndcg10": final["test"]["NDCG@10"],
        "hr10": final["test"]["HR@10"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scales", type=float, nargs="*", default=sorted(SCALES))
    p.add_argument("--losses", nargs="*", default=["full", "sampled"], choices=["full", "sampled"])
    p.add_argument(
        "--minutes",
        type=float,
        nargs="*",
        default=[3, 5, 10],
        help="fine-tuning budget per scale (one value, or one per --scales)",
    )
    p.add_argument("--ml100k-minutes", type=float, default=8.0, help="budget of the MovieLens-100K runs")
    p.add_argument("--no-ml100k", action="store_true", help="leave out the MovieLens-100K rows")
    p.add_argument("--root", default="runs/bench-scale", help="generated logs, datasets and runs")
    args = p.parse_args()
    minutes = args.minutes if len(args.minutes) == len(args.scales) else [args.minutes[0]] * len(args.scales)
    root = (REPO / args.root).resolve()
    root.mkdir(parents=True, exist_ok=True)

    rows = []
    sizes = [] if args.no_ml100k else [("ml-100k", None, args.ml100k_minutes)]
    sizes += [(f"{s:g}x", s, m) for s, m in zip(args.scales, minutes, strict=True)]
    for label, scale, budget in sizes:
        if scale is None:
            dataset, prep_s, prep_gb = "ml-100k", float("nan"), float("nan")
        else:
            path, prep_s, prep_gb = prepare(scale, root)
            dataset = str(path)
        ds = load_or_prepare(dataset)
        pop = evaluate_ranking(
            PopularityRecommender.fit(ds), ds, split="test", ks=(10,), beyond_accuracy=False
        )
        size = {"users": ds.n_users, "items": ds.n_items, "interactions": len(ds.interactions)}
        print(f"{label}: {size}, prepare {prep_s:.1f} s / {prep_gb:.2f} GB", flush=True)
        for loss in args.losses:
            r = finetune_run(dataset, ds.n_items, loss, budget, root, label)
            r.update(
                size=label,
                loss=loss,
                prepare_s=prep_s,
                prepare_gb=prep_gb,
                **size,
                pop_ndcg10=pop.metrics["NDCG@10"],
                pop_hr10=pop.metrics["HR@10"],
            )
            rows.append(r)
            print(json.dumps(r), flush=True)
        del ds
    (root / "results.json").write_text(json.dumps(rows, indent=1))

    print(
        "\n| log | users | items | interactions | prepare s / GB | loss | targets/s | s/epoch "
        "| run s / budget | peak GB | test NDCG@10 (HR@10) | popularity NDCG@10 (HR@10) |"
    )
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        prep = "-" if r["prepare_s"] != r["prepare_s"] else f"{r['prepare_s']:.0f} / {r['prepare_gb']:.1f}"
        head = (
            f"| {r['size']} | {r['users']:,} | {r['items']:,} | {r['interactions']:,} | {prep} "
            f"| {r['loss']} |"
        )
        pop = f"{r['pop_ndcg10']:.4f} ({r['pop_hr10']:.3f})"
        if "skipped" in r:
            print(f"{head} skipped: {r['skipped']} | | | | | {pop} |")
            continue
        print(
            f"{head} {r['targets_per_second']:,.0f} | {r['seconds_per_epoch']:,.0f} "
            f"| {r['seconds']:.0f} / {r['budget']:.0f} ({r['stopped_by']}) | {r['peak_gb']:.1f} "
            f"| {r['ndcg10']:.4f} ({r['hr10']:.3f}) | {pop} |"
        )
    base = {r["loss"]: r for r in rows if r["size"] == "1x" and "skipped" not in r}
    for r in rows:
        if r["size"] != "1x" and r["size"] != "ml-100k" and "skipped" not in r and r["loss"] in base:
            ratio = r["targets_per_second"] / base[r["loss"]]["targets_per_second"]
            print(
                f"{r['size']} {r['loss']}: targets/s {ratio:.2f}x the 1x figure "
                f"({r['items']:,} vs 1,682 items)"
            )


if __name__ == "__main__":
    main()
