"""Memory and speed of the item-kNN simulator (``rec_rllib.simulator.ItemKNNSimulator``: the ``simulator``
reward and the co-occurrence feature), fitted in a fresh process per case so that peak RSS is its own:

* MovieLens-100K's train split (the real data; 1,682 items: the dense path);
* a generated log with a catalogue too large for ``n_items²`` dense arrays (the sparse path): ``--items``
items,
  ``--users`` users with ``--per-user`` distinct items each, drawn from a Zipf(``--zipf``) popularity. It is a
  size probe, not a dataset: it only measures what the fit costs at that shape.

The fit before the sparse rewrite held a dense user × item matrix and two dense ``n × n`` matrices: the script
prints what those would take at each shape beside the measured peak.

    python bench/simulator_memory.py
    python bench/simulator_memory.py --items 50000 --users 100000 --per-user 20
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _case(spec: dict) -> dict:
    import numpy as np

    from rec_rllib.replay import read_train_histories
    from rec_rllib.simulator import ItemKNNSimulator

    if spec["kind"] == "ml-100k":
        from rec_rllib.data.catalog import dataset_path, load_or_prepare

        load_or_prepare("ml-100k")
        histories, manifest = read_train_histories(str(dataset_path("ml-100k")), "loo")
        n_items, n_users = manifest["counts"]["items"], manifest["counts"]["users"]
    else:
        rng = np.random.default_rng(0)
        n_items, n_users = spec["items"], spec["users"]
        p = 1.0 / np.arange(1, n_items + 1) ** spec["zipf"]
        p /= p.sum()
        histories = {
            u: (rng.choice(n_items, spec["per_user"], replace=False, p=p), None) for u in range(n_users)
        }
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    sim = ItemKNNSimulator(histories, n_items, n_users)
    fit_s = time.perf_counter() - t
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    user, (items, _) = next(iter(histories.items()))
    t = time.perf_counter()
    for _ in range(50):
        sim.probabilities(items[-50:])
    step_us = (time.perf_counter() - t) / 50 * 1e6
    t = time.perf_counter()
    for _ in range(10):
        sim.rows(items, without=items)
    rows_ms = (time.perf_counter() - t) / 10 * 1e3
    nnz = sim.co.nnz if hasattr(sim.co, "nnz") else int(np.count_nonzero(sim.co))
    return {
        "items": n_items,
        "users": n_users,
        "interactions": int(sum(len(h[0]) for h in histories.values())),
        "storage": type(sim.co).__name__,
        "pairs": nnz,
        "fit_s": fit_s,
        "fit_peak_mb": peak_mb,
        "dense_before_mb": (n_items * n_users + 2 * n_items**2) * 4 / 2**20,
        "probabilities_us": step_us,
        "rows_ms": rows_ms,
        "rows_of": len(items),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--users", type=int, default=50_000)
    p.add_argument("--per-user", type=int, default=30)
    p.add_argument("--zipf", type=float, default=0.8)
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        print(json.dumps(_case(json.loads(args.case))))
        return
    specs = [
        {"kind": "ml-100k"},
        {
            "kind": "generated",
            "items": args.items,
            "users": args.users,
            "per_user": args.per_user,
            "zipf": args.zipf,
        },
    ]
    print(
        "| log | items | users | interactions | storage | co-occurring pairs | fit s | fit peak MB "
        "| dense fit would hold MB | probabilities(50 items) µs | rows(a user's items) ms |"
    )
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for spec in specs:
        out = subprocess.run(
            [sys.executable, __file__, "--case", json.dumps(spec)], capture_output=True, text=True, check=True
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"| {spec['kind']} | {r['items']:,} | {r['users']:,} | {r['interactions']:,} | {r['storage']} "
            f"| {r['pairs']:,} | {r['fit_s']:.2f} | {r['fit_peak_mb']:,.0f} | {r['dense_before_mb']:,.0f} "
            f"| {r['probabilities_us']:.0f} | {r['rows_ms']:.2f} ({r['rows_of']} items) |",
            flush=True,
        )


if __name__ == "__main__":
    main()
