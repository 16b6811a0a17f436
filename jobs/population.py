"""A simulated population against live endpoints, over real HTTP: logged users replayed as new live users
who click by their own future (:mod:`rec_rllib.loop.population`), so a closed loop has traffic to learn
from, and two endpoints (e.g. a loop and a frozen copy) can be compared on the same users.

Examples::

    python -m jobs.population --target loop=http://127.0.0.1:8000 --dataset data/ml-100k --users 200 \\
        --minutes 30 --out runs/population
    python -m jobs.population --target loop=http://127.0.0.1:8000 --target frozen=http://127.0.0.1:8200 \\
        --dataset data/ml-100k --users 200 --minutes 30 --out runs/population

Each user visits every ``--think-seconds`` at most: asks for ``--k`` items (sending the history they arrived
with and what they consumed since; the endpoint adds what they clicked), clicks the highest-placed item of
their future and sends the click as feedback, or, seeing none, consumes their next logged item elsewhere.
Explored requests carry a seed per (user, visit), the same at every target, unless ``--fresh-draws``: two
endpoints serving the same model give the same lists to the same users, so a difference between them comes
from their models, not from their draws. Bounded by ``--minutes`` and ``--max-requests`` per target;
loopback endpoints only. Writes
``answers.csv`` (one row per answer), ``summary.json`` and ``ctr.png`` (click-through rate over time per
target); with two targets, the paired per-user difference of their click-through rates with a 95%
interval.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import http.client
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from jobs._common import check_outlives_job, fail, setup_logging

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def target(text: str) -> tuple[str, str]:
    """``NAME=URL`` (a loopback URL)."""
    name, _, url = text.partition("=")
    parts = urlsplit(url)
    if not name or parts.scheme != "http" or parts.hostname not in LOOPBACK:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=http://127.0.0.1:PORT (loopback only)")
    return name, url.rstrip("/")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.population",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--target", type=target, action="append", required=True, metavar="NAME=URL")
    p.add_argument("--dataset", required=True, help="prepared dataset whose users are replayed")
    p.add_argument("--users", type=int, default=200, help="users drawn at random (seeded)")
    p.add_argument("--user-ids", nargs="+", help="these logged users instead of a random draw")
    p.add_argument("--prefix", type=float, default=0.5, help="fraction of a user's items they arrive with")
    p.add_argument("--k", type=int, default=10, help="items asked for per request")
    p.add_argument(
        "--exploration",
        default="greedy",
        choices=["greedy", "epsilon", "boltzmann", "thompson", "ucb"],
        help="the requests' exploration mode (boltzmann or epsilon: a log the loop's gate can estimate on)",
    )
    p.add_argument("--temperature", type=float, default=1.0, help="the requests' boltzmann temperature")
    p.add_argument("--epsilon", type=float, default=0.1, help="the requests' epsilon")
    p.add_argument(
        "--fresh-draws",
        action="store_true",
        help="each answer draws its exploration afresh; by default a visit's draw is seeded by (--seed, the "
        "user, the visit's number), the same at every target: endpoints serving the same model give the "
        "same lists, so what differs between targets is their models (common random numbers)",
    )
    p.add_argument("--minutes", type=float, default=5.0, help="how long the population visits")
    p.add_argument("--max-requests", type=int, default=100_000, help="requests per target at most")
    p.add_argument("--concurrency", type=int, default=4, help="users visiting at once, per target")
    p.add_argument("--think-seconds", type=float, default=2.0, help="a user's visits are this far apart")
    p.add_argument("--id-prefix", default="sim-", help="prefix of the simulated users' ids")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


class Client:
    """One keep-alive HTTP connection to an endpoint."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port or 80
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        data = json.dumps(body).encode()
        for attempt in range(2):  # a connection the server closed while idle: reconnect once
            try:
                self.conn.request("POST", path, data, {"content-type": "application/json"})
                r = self.conn.getresponse()
                return r.status, json.loads(r.read() or b"{}")
            except (ConnectionError, http.client.HTTPException):
                self.conn.close()
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
                if attempt:
                    raise
        raise AssertionError("unreachable")


def visit_all(
    name: str,
    url: str,
    users: list,
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
    errors: list[str],
    stop_at: float,
) -> None:
    """``args.concurrency`` threads, each visiting its share of ``users`` in turn until time or the request
    budget runs out."""
    lock = threading.Lock()
    budget = [args.max_requests]

    def worker(mine: list) -> None:
        client = Client(url)
        back_at = dict.fromkeys(range(len(mine)), 0.0)  # when each user visits next
        visits = dict.fromkeys(range(len(mine)), 0)
        while time.time() < stop_at and not all(u.done for u in mine):
            now = time.time()
            wait = min(back_at[i] for i, u in enumerate(mine) if not u.done) - now
            if wait > 0:
                time.sleep(min(wait, max(0.0, stop_at - now)))
                continue
            for i, user in enumerate(mine):
                if user.done or back_at[i] > time.time():
                    continue
                back_at[i] = time.time() + args.think_seconds  # a visit every think-seconds at most
                with lock:
                    if budget[0] <= 0:
                        return
                    budget[0] -= 1
                if time.time() >= stop_at:
                    return
                body = {"user": user.uid, "history": user.history, "k": args.k}
                body.update(exploration=args.exploration, temperature=args.temperature, epsilon=args.epsilon)
                if not args.fresh_draws:
                    body["seed"] = visit_seed(args.seed, user.logged_user, visits[i])
                visits[i] += 1
                t0 = time.time()
                try:
                    status, answer = client.post("/recommend", body)
                except OSError as e:
                    errors.append(f"{name} /recommend: {e!r}")
                    continue
                if status != 200:
                    errors.append(f"{name} /recommend {status}: {answer}")
                    continue
                shown = [it["item_id"] for it in answer["items"]]
                click = user.click(shown)
                if click is not None:
                    fb = {"request_id": answer["request_id"], "item_id": click[1], "reward": 1.0}
                    try:
                        status, said = client.post("/feedback", fb)
                    except OSError as e:
                        status, said = 0, {"error": repr(e)}
                    if status != 200:
                        errors.append(f"{name} /feedback {status}: {said}")
                with lock:
                    rows.append(
                        {
                            "target": name,
                            "t": t0,
                            "user": user.logged_user,
                            "model_version": answer["model_version"],
                            "clicked": int(click is not None),
                            "position": -1 if click is None else click[0],
                        }
                    )

    shares = [users[i :: args.concurrency] for i in range(args.concurrency)]
    threads = [threading.Thread(target=worker, args=(s,), daemon=True) for s in shares if s]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def visit_seed(seed: int, user: str, visit: int) -> int:
    """The exploration seed of a user's ``visit``-th request: the same for every target, different across
    users and visits."""
    digest = hashlib.blake2b(f"{seed}:{user}:{visit}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # 63 bits: a non-negative int64


def paired_ctr(rows: list[dict[str, Any]], a: str, b: str, seed: int = 0) -> dict[str, float]:
    """Per-user click-through rate of target ``a`` minus target ``b`` over the users both served: the mean
    and a 95% bootstrap interval."""
    from rec_rllib.eval.ranking import bootstrap_ci

    per: dict[str, dict[str, list[int]]] = {a: {}, b: {}}
    for r in rows:
        if r["target"] in per:
            per[r["target"]].setdefault(r["user"], []).append(r["clicked"])
    users = sorted(set(per[a]) & set(per[b]))
    diff = np.array([np.mean(per[a][u]) - np.mean(per[b][u]) for u in users])
    if not len(diff):
        return {"users": 0}
    low, high = bootstrap_ci(diff, n_boot=2000, seed=seed)
    return {"users": len(users), "diff": float(diff.mean()), "low": low, "high": high}


def summarize(rows: list[dict[str, Any]], names: list[str], windows: int = 6) -> dict[str, Any]:
    """Per target: answers, clicks, click-through rate overall, per model version and per time window."""
    out: dict[str, Any] = {}
    t0 = min((r["t"] for r in rows), default=0.0)
    span = max((r["t"] for r in rows), default=t0) - t0 or 1.0
    for name in names:
        mine = [r for r in rows if r["target"] == name]
        clicks = [r["clicked"] for r in mine]
        by_version: dict[str, list[int]] = {}
        by_window: list[list[int]] = [[] for _ in range(windows)]
        for r in mine:
            by_version.setdefault(r["model_version"], []).append(r["clicked"])
            by_window[min(windows - 1, int((r["t"] - t0) / span * windows))].append(r["clicked"])
        out[name] = {
            "answers": len(mine),
            "clicks": int(sum(clicks)),
            "ctr": float(np.mean(clicks)) if clicks else None,
            "ctr_by_model_version": {v: float(np.mean(c)) for v, c in by_version.items()},
            "ctr_by_window": [float(np.mean(w)) if w else None for w in by_window],
            "window_minutes": span / windows / 60,
        }
    if len(names) == 2:
        out["paired"] = {"a": names[0], "b": names[1], **paired_ctr(rows, names[0], names[1])}
    return out


def plot(rows: list[dict[str, Any]], names: list[str], path: Path) -> None:
    """Click-through rate over time per target (a moving mean over answers), a dashed line where a target's
    model version changed; with two targets, below it the running difference of their clicks, each user's
    visits paired in order."""
    from rec_rllib.eval.plots import pyplot

    plt = pyplot()
    pair = len(names) == 2
    fig, axes = plt.subplots(2 if pair else 1, 1, figsize=(7, 6.5 if pair else 4), sharex=True, squeeze=False)
    ax = axes[0, 0]
    t0 = min(r["t"] for r in rows)
    for name in names:
        mine = sorted((r for r in rows if r["target"] == name), key=lambda r: r["t"])
        if not mine:
            continue
        clicks = np.array([r["clicked"] for r in mine], dtype=float)
        width = max(1, len(mine) // 20)
        smooth = np.convolve(clicks, np.ones(width) / width, mode="valid")
        minutes = np.array([(r["t"] - t0) / 60 for r in mine])[width - 1 :]
        (line,) = ax.plot(minutes, smooth, label=f"{name} (moving mean of {width} answers)")
        for before, after in zip(mine, mine[1:], strict=False):
            if after["model_version"] != before["model_version"]:
                ax.axvline((after["t"] - t0) / 60, color=line.get_color(), ls="--", lw=1)
    ax.set_ylabel("click-through rate")
    ax.grid(alpha=0.3)
    ax.legend(title="dashed: a new model version")
    if pair:  # each user's n-th answer at one target against their n-th at the other, once both are given
        a, b = names
        visits: dict[str, dict[str, list]] = {a: {}, b: {}}
        for r in sorted(rows, key=lambda r: r["t"]):
            if r["target"] in visits:
                visits[r["target"]].setdefault(r["user"], []).append(r)
        pairs = sorted(
            (max(x["t"], y["t"]), x["clicked"] - y["clicked"])
            for user, mine in visits[a].items()
            for x, y in zip(mine, visits[b].get(user, []), strict=False)
        )
        low = axes[1, 0]
        low.plot([(t - t0) / 60 for t, _ in pairs], np.cumsum([d for _, d in pairs]), color="black")
        low.axhline(0, color="grey", lw=1)
        low.set_ylabel(f"clicks so far, {a} - {b} (paired visits)")
        low.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("minutes of simulated traffic")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    check_outlives_job(args.out, "--out")
    names = [n for n, _ in args.target]
    if len(set(names)) != len(names):
        fail(f"--target names must differ, got {names}")
    for flag, value in (("--concurrency", args.concurrency), ("--k", args.k), ("--users", args.users)):
        if value < 1:
            fail(f"{flag} must be >= 1, got {value}")
    if not 0 < args.temperature <= 100:
        fail(f"--temperature must be in (0, 100], got {args.temperature}")
    if not 0 <= args.epsilon <= 1:
        fail(f"--epsilon must be in [0, 1], got {args.epsilon}")
    from rec_rllib.data.catalog import load_or_prepare
    from rec_rllib.fsutil import write_csv, write_json
    from rec_rllib.loop.population import population

    try:
        ds = load_or_prepare(args.dataset)
        users = population(
            ds, args.user_ids or args.users, prefix=args.prefix, id_prefix=args.id_prefix, seed=args.seed
        )
    except (FileNotFoundError, ValueError) as e:
        fail(f"--dataset/--users: {e}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    stop_at = time.time() + args.minutes * 60
    print(f"{len(users)} simulated users visit {', '.join(names)} for {args.minutes:g} min", flush=True)
    threads = [
        threading.Thread(
            target=visit_all, args=(name, url, copy.deepcopy(users), args, rows, errors, stop_at), daemon=True
        )
        for name, url in args.target
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows.sort(key=lambda r: r["t"])
    write_csv(out / "answers.csv", rows)
    summary = {"users": len(users), "minutes": args.minutes, "errors": len(errors), **summarize(rows, names)}
    write_json(out / "summary.json", summary)
    if rows:
        plot(rows, names, out / "ctr.png")
    for name in names:
        s = summary[name]
        ctr = "n/a" if s["ctr"] is None else f"{s['ctr']:.4f}"
        print(f"{name}: {s['answers']} answers, {s['clicks']} clicks, click-through rate {ctr}")
    if "paired" in summary and summary["paired"]["users"]:
        p = summary["paired"]
        print(
            f"{p['a']} - {p['b']}, per user over {p['users']} users: {p['diff']:+.4f} "
            f"(95% interval [{p['low']:+.4f}, {p['high']:+.4f}])"
        )
    if errors:
        print(f"{len(errors)} failed requests, e.g. {errors[0]}", file=sys.stderr)
    print(f"wrote {out / 'answers.csv'}, {out / 'summary.json'}", flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
