"""Benchmark: does the closed loop learn from its own traffic? A loop and a frozen copy of the same starting
policy, visited by the same simulated users over real HTTP, compared on click-through rate.

    python bench/closed_loop.py                        # 150 held-out users, 30 minutes of traffic
    python bench/closed_loop.py --minutes 10 --users 60 --start-model runs/bench-loop/start

1. The population: ``--users`` MovieLens-100K users (at least 20 items each, a seeded draw) are held out:
   the starting model never trains on them. Each visits as a new live user with the first half of their
   history and clicks by their own future (:mod:`rec_rllib.loop.population`).
2. The starting policy: fine-tuned for ``--finetune-epochs`` on MovieLens-100K without those users (all
   items kept), unless ``--start-model`` names one.
3. Two endpoints on loopback: ``python -m jobs.loop`` (rounds every ``--round-events`` feedback events, the
   default off-policy gate at the traffic's temperature) and ``python -m jobs.serve`` (frozen), both
   starting from that policy.
4. ``python -m jobs.population`` sends the same users to both for ``--minutes``, each user every
   ``--think-seconds``, asking for Boltzmann-explored lists at ``--temperature``, each visit's draw seeded
   alike at both endpoints (common random numbers: until the loop rolls a candidate both give the same
   lists, so the difference comes from the rolled models); then both stop.

It prints and writes (``<out>/closed_loop.md``): click-through rate per target over time, the paired
per-user difference loop - frozen with its 95% interval (over all answers, before the loop's first roll,
when both serve the same model, and from it on), the loop's rounds (decision and figures) and the
click-to-model time of each roll. Run it alone: two endpoints, the rounds' fine-tuning and the client
share the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def held_out_dataset(out: Path, users: int, seed: int) -> tuple[str, list[str]]:
    """MovieLens-100K without ``users`` drawn users (their ids returned), every item kept; prepared once."""
    import pandas as pd

    from rec_rllib.columns import Col
    from rec_rllib.data.catalog import load_or_prepare
    from rec_rllib.data.dataset import LogDataset, build_dataset
    from rec_rllib.loop.population import population

    path = out / "data" / "ml-100k-without-population"
    ds = load_or_prepare("ml-100k")
    held = [u.logged_user for u in population(ds, users, min_items=20, seed=seed)]
    if (path / "manifest.json").exists():
        return str(path), held
    user_ids = ds.users[Col.USER_ID].astype(str).to_numpy()
    item_ids = ds.items[Col.ITEM_ID].astype(str).to_numpy()
    inter = ds.interactions
    frame = pd.DataFrame(
        {
            Col.USER_ID: user_ids[inter[Col.USER_IDX].to_numpy()],
            Col.ITEM_ID: item_ids[inter[Col.ITEM_IDX].to_numpy()],
            Col.TIMESTAMP: inter[Col.TIMESTAMP].to_numpy(),
            Col.REWARD: inter[Col.REWARD].to_numpy(),
            Col.SOURCE_ROW: inter[Col.SOURCE_ROW].to_numpy(),
        }
    )
    frame = frame[~frame[Col.USER_ID].isin(set(held))]
    items = ds.items.drop(columns=[Col.ITEM_IDX]).assign(**{Col.ITEM_ID: item_ids})
    kept = build_dataset(
        frame,
        items,
        name="ml-100k-without-population",
        source={"kind": "ml-100k without the closed-loop benchmark's population", "held_out_users": held},
        timestamp_unit=ds.manifest.get("timestamp_unit", "s"),
    )
    kept.save(str(path))
    assert LogDataset.load(str(path)).n_items == ds.n_items
    return str(path), held


def wait_healthy(url: str, proc: subprocess.Popen, seconds: float = 600) -> None:
    deadline = time.time() + seconds
    while True:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=10) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"{url} did not come up (exit code {proc.poll()})")
        time.sleep(1)


def stop(proc: subprocess.Popen) -> None:
    """SIGINT to the process group this script started (the job stops its Ray and Serve cleanly)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=150)
    p.add_argument("--minutes", type=float, default=30.0, help="minutes of simulated traffic")
    p.add_argument("--finetune-epochs", type=int, default=30, help="the starting model's epochs")
    p.add_argument("--finetune-minutes", type=float, default=20.0, help="...and its time budget")
    p.add_argument("--start-model", help="a starting model fine-tuned without the population (reused)")
    p.add_argument("--round-events", type=int, default=300)
    p.add_argument("--round-finetune-minutes", type=float, default=2.0)
    p.add_argument("--concurrency", type=int, default=2, help="users visiting each endpoint at once")
    p.add_argument(
        "--think-seconds",
        type=float,
        default=30.0,
        help="a user's visits are this far apart (a user's future lasts about 50 visits)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=0.5,
        help="the traffic explores: Boltzmann first picks at this temperature (the gate estimates at it)",
    )
    p.add_argument("--ports", type=int, nargs=2, default=[8300, 8500])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench-loop")
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    dataset, held = held_out_dataset(out, args.users, args.seed)
    start_model = args.start_model or str(out / "start")
    if not Path(start_model, "config.json").exists():
        print(f"fine-tuning the starting model without the {len(held)} population users", flush=True)
        subprocess.run(
            [sys.executable, "-m", "jobs.finetune", "--dataset", dataset, "--out", start_model]
            + ["--epochs", str(args.finetune_epochs), "--max-minutes", str(args.finetune_minutes)]
            + ["--no-progress"],
            env=env,
            check=True,
        )
    loop_port, frozen_port = args.ports
    for name in ("loop", "frozen", "population"):
        if (out / name).exists():
            raise SystemExit(f"{out / name} exists: give another --out (the runs are not resumed here)")
    common = ["--model", start_model, "--dataset", dataset, "--no-access-log"]
    with open(out / "loop.log", "w") as loop_log, open(out / "frozen.log", "w") as frozen_log:
        loop = subprocess.Popen(
            [sys.executable, "-m", "jobs.loop", *common, "--out", str(out / "loop"), "--port", str(loop_port)]
            + ["--round-events", str(args.round_events)]
            + ["--finetune-minutes", str(args.round_finetune_minutes), "--num-cpus", "2"]
            + ["--gate-exploration", "boltzmann", "--gate-temperature", str(args.temperature)],
            env=env,
            stdout=loop_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        frozen = subprocess.Popen(
            [sys.executable, "-m", "jobs.serve", *common, "--feedback-dir", str(out / "frozen" / "feedback")]
            + ["--port", str(frozen_port), "--num-cpus", "1"],
            env=env,
            stdout=frozen_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            loop_url, frozen_url = f"http://127.0.0.1:{loop_port}", f"http://127.0.0.1:{frozen_port}"
            wait_healthy(loop_url, loop)
            wait_healthy(frozen_url, frozen)
            print(f"both endpoints up; {len(held)} users visit for {args.minutes:g} min", flush=True)
            subprocess.run(
                [sys.executable, "-m", "jobs.population", "--target", f"loop={loop_url}"]
                + ["--target", f"frozen={frozen_url}", "--dataset", "ml-100k", "--user-ids", *held]
                + ["--minutes", str(args.minutes), "--concurrency", str(args.concurrency)]
                + ["--think-seconds", str(args.think_seconds)]
                + ["--exploration", "boltzmann", "--temperature", str(args.temperature)]
                + ["--out", str(out / "population"), "--seed", str(args.seed)],
                env=env,
                check=False,
            )
        finally:
            stop(loop)
            stop(frozen)
    report(out)
    return 0


def _before_and_after_the_first_roll(out: Path) -> list[str]:
    """The paired per-user difference before the loop's first roll (both serve the same model and draw
    alike: zero up to rounding) and after it, each over the answers given in that time."""
    import csv

    from jobs.population import paired_ctr

    with open(out / "population" / "answers.csv") as f:
        rows = [{**r, "t": float(r["t"]), "clicked": int(r["clicked"])} for r in csv.DictReader(f)]
    loop = sorted((r for r in rows if r["target"] == "loop"), key=lambda r: r["t"])
    if not loop:
        return []
    first = loop[0]["model_version"]
    rolled = [r["t"] for r in loop if r["model_version"] != first]
    if not rolled:
        return ["", "The loop never rolled a candidate: it served the starting model throughout."]
    t_roll, t0 = min(rolled), min(r["t"] for r in rows)
    lines = ["", f"The first roll reached the loop's answers {t_roll - t0:.0f} s into the traffic.", ""]
    lines += ["| answers | users | loop - frozen per user | 95% interval |", "|---|---:|---:|---|"]
    for name, part in (
        ("before the first roll (the same model on both)", [r for r in rows if r["t"] < t_roll]),
        ("from the first roll on", [r for r in rows if r["t"] >= t_roll]),
    ):
        p = paired_ctr(part, "loop", "frozen")
        if p["users"]:
            interval = f"[{p['low']:+.4f}, {p['high']:+.4f}]"
            lines.append(f"| {name} | {p['users']} | {p['diff']:+.4f} | {interval} |")
    return lines


def report(out: Path) -> None:
    summary = json.loads((out / "population" / "summary.json").read_text())
    rounds_file = out / "loop" / "rounds.jsonl"
    text = rounds_file.read_text() if rounds_file.exists() else ""
    rounds = [json.loads(line) for line in text.splitlines()]
    lines = ["# Closed loop against a frozen copy", ""]
    lines.append(
        f"{summary['users']} simulated users, {summary['minutes']:g} minutes of traffic, "
        f"{summary['errors']} failed requests."
    )
    lines += ["", "| endpoint | answers | clicks | click-through rate | by window |"]
    lines += ["|---|---:|---:|---:|---|"]
    for name in ("loop", "frozen"):
        s = summary[name]
        windows = ", ".join("-" if w is None else f"{w:.3f}" for w in s["ctr_by_window"])
        lines.append(f"| {name} | {s['answers']} | {s['clicks']} | {s['ctr']:.4f} | {windows} |")
    paired = summary.get("paired", {})
    if paired.get("users"):
        lines += [
            "",
            f"Per user, loop - frozen: {paired['diff']:+.4f} (95% interval [{paired['low']:+.4f}, "
            f"{paired['high']:+.4f}], {paired['users']} users).",
        ]
    lines += _before_and_after_the_first_roll(out)
    metric = rounds[0]["decision"]["metric"] if rounds else ""
    lines += ["", f"Gate: {metric}.", ""]
    lines += [
        "| round | held-out clicks | answers | served | candidate | diff [95%] | decision "
        "| click to model (s) |"
    ]
    lines += ["|---:|---:|---:|---:|---:|---|---|---:|"]
    for r in rounds:
        d = r["decision"]
        latency = r.get("click_to_model_s")
        lines.append(
            f"| {r['round']} | {r['held_out_clicks']} | {d.get('answers') or ''} | {d['served']:.4f} | "
            f"{d['candidate']:.4f} | "
            f"{d['diff']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] | {'rolled' if d['roll'] else 'kept'} | "
            f"{'' if latency is None else f'{latency:.0f}'} |"
        )
    text = "\n".join(lines) + "\n"
    (out / "closed_loop.md").write_text(text)
    print(text)


if __name__ == "__main__":
    raise SystemExit(main())
