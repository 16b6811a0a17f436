"""Benchmark: off-policy estimation of a long Serve log over a large catalogue, time and peak memory.

    python bench/scale_ope.py                                          # 1,000,000 answers on the 100x log
    python bench/scale_ope.py --answers 100000 --targets popularity runs/bench-scale/100x-sampled

It writes a Serve feedback directory in the server's format (impression and feedback part files of 100,000
answers each) for a prepared dataset -- by default the 100x generated log of bench/scale_finetune.py, 100,000
items: each answer a random user's last 50 train items as the history, the first pick drawn from the
popularity softmax with its propensity, about 5% of first picks clicked -- unless it exists, then runs what
`jobs.evaluate --ope-serve-log` runs (the first-slot log, every estimator with 90% bootstrap intervals for
each target under Boltzmann exploration) in a child process and prints its time and peak RSS. Run it alone:
it measures time and memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PART_ANSWERS = 100_000


def write_serve_log(dataset_dir: str, out: Path, answers: int, seed: int = 0) -> None:
    """``answers`` answers in the server's impression and feedback format under ``out``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rec_rllib.columns import Col, Split, SplitScheme
    from rec_rllib.data.catalog import load_or_prepare
    from rec_rllib.data.feedback import IMPRESSION_SCHEMA, IMPRESSIONS, SCHEMA

    ds = load_or_prepare(dataset_dir)
    ids = pa.array(ds.items["item_id"].astype(str).tolist(), pa.string())
    split = SplitScheme.column(SplitScheme.LEAVE_ONE_OUT)
    inter = pq.read_table(
        Path(dataset_dir) / "interactions.parquet", columns=[Col.USER_IDX, Col.ITEM_IDX, split]
    )
    train = inter.filter(pa.compute.equal(inter.column(2), Split.TRAIN))
    users = train.column(Col.USER_IDX).to_numpy()  # sorted by user, then time
    items = train.column(Col.ITEM_IDX).to_numpy().astype(np.int64)
    ends = np.flatnonzero(np.r_[users[1:] != users[:-1], True]) + 1
    begins = np.r_[0, ends[:-1]]
    pop = np.bincount(items, minlength=ds.n_items).astype(np.float64)
    p = np.exp(np.log1p(pop) - np.log1p(pop).max())
    p /= p.sum()
    rng = np.random.default_rng(seed)
    (out / IMPRESSIONS).mkdir(parents=True, exist_ok=True)
    clicks = []
    for part, start in enumerate(range(0, answers, PART_ANSWERS)):
        n = min(PART_ANSWERS, answers - start)
        who = rng.integers(0, len(ends), n)
        lo = np.maximum(begins[who], ends[who] - 50)
        length = ends[who] - lo
        offsets = np.r_[0, np.cumsum(length)].astype(np.int32)
        flat = np.repeat(lo - offsets[:-1], length) + np.arange(offsets[-1])
        history = pa.ListArray.from_arrays(pa.array(offsets), ids.take(pa.array(items[flat])))
        first = rng.choice(ds.n_items, n, p=p)
        second = (first + 1) % ds.n_items
        pairs = pa.array(np.arange(n + 1, dtype=np.int32) * 2)  # two shown items an answer
        shown = pa.ListArray.from_arrays(pairs, ids.take(pa.array(np.stack([first, second], 1).ravel())))
        props = pa.ListArray.from_arrays(pairs, pa.array(np.stack([p[first], np.full(n, 0.5)], 1).ravel()))
        rids = pa.array([f"r{start + i}" for i in range(n)], pa.string())
        table = pa.table(
            {
                "request_id": rids,
                "timestamp_ms": pa.array(np.arange(start, start + n)),
                "user_id": pa.array(who.astype(str)),
                "history": history,
                "shown": shown,
                "shown_propensities": props,
                "model_version": pa.array(["bench"] * n),
                "strategy": pa.array(["boltzmann"] * n),
            },
            schema=IMPRESSION_SCHEMA,
        )
        pq.write_table(table, out / IMPRESSIONS / f"part-{part:05d}-bench.parquet")
        hit = np.flatnonzero(rng.random(n) < 0.05)
        clicks.append(
            pa.table({"request_id": rids.take(pa.array(hit)), "item_id": ids.take(pa.array(first[hit]))})
        )
    fb = pa.concat_tables(clicks)
    n = len(fb)
    cols = {name: pa.nulls(n, SCHEMA.field(name).type) for name in SCHEMA.names}
    cols.update(
        request_id=fb.column("request_id"),
        item_id=fb.column("item_id"),
        position=pa.array(np.zeros(n, np.int16)),
        propensity=pa.array(np.full(n, 0.1)),
        reward=pa.array(np.ones(n)),
    )
    pq.write_table(pa.table(cols, schema=SCHEMA), out / "part-00000-bench.parquet")


def measure(dataset_dir: str, feedback: str, targets: list[str], strategy: str) -> dict:
    """In this process: the first-slot log and every target's estimates; seconds and peak RSS."""
    import resource

    from rec_rllib.data.catalog import load_or_prepare
    from rec_rllib.eval.servelog import evaluate_serve_log, first_slot_log
    from rec_rllib.models import load_recommender

    t0 = time.perf_counter()
    ds = load_or_prepare(dataset_dir)
    log = first_slot_log(feedback, ds)
    t_log = time.perf_counter() - t0
    recs = {name: load_recommender(name, ds) for name in targets}
    res = evaluate_serve_log(log, recs, strategy=strategy)
    total = time.perf_counter() - t0
    return {
        "answers": log.feedback.n,
        "items": ds.n_items,
        "read_s": round(t_log, 1),
        "total_s": round(total, 1),
        "peak_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
        "snips": {name: r["estimates"]["snips"]["value"] for name, r in res.items() if "estimates" in r},
        "logged": res["logging policy (logged mean)"]["value"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="runs/bench-scale/synth-100x", help="a prepared dataset directory")
    p.add_argument("--answers", type=int, default=1_000_000)
    p.add_argument(
        "--targets",
        nargs="+",
        default=["popularity"],
        help="target policies: popularity or a model run directory",
    )
    p.add_argument("--strategy", default="boltzmann", choices=["greedy", "boltzmann", "epsilon"])
    p.add_argument("--root", default="runs/bench-scale", help="where the generated Serve log goes")
    p.add_argument("--measure", metavar="FEEDBACK_DIR", help=argparse.SUPPRESS)  # the child process
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(args.dataset, args.measure, args.targets, args.strategy)))
        return
    feedback = Path(args.root) / f"serve-log-{Path(args.dataset).name}-{args.answers}"
    if not (feedback / "part-00000-bench.parquet").exists():
        t = time.perf_counter()
        write_serve_log(args.dataset, feedback, args.answers)
        print(f"wrote {args.answers:,} answers to {feedback} in {time.perf_counter() - t:.0f} s", flush=True)
    child = [
        sys.executable,
        __file__,
        "--dataset",
        args.dataset,
        "--targets",
        *args.targets,
        "--strategy",
        args.strategy,
        "--measure",
        str(feedback),
    ]
    out = subprocess.run(child, cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print("| answers | items | targets | read s | total s | peak RSS GB |")
    print("|---:|---:|---|---:|---:|---:|")
    print(
        f"| {r['answers']:,} | {r['items']:,} | {', '.join(Path(t).name for t in args.targets)} | "
        f"{r['read_s']} | {r['total_s']} | {r['peak_gb']} |"
    )
    print(f"logged mean {r['logged']:.4f}; SNIPS: {r['snips']}")


if __name__ == "__main__":
    main()
