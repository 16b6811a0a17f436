"""The closed loop: serve a fine-tuned model, learn from its own feedback in rounds, roll a candidate into
Serve only when it is better on what the served model could not have trained on.

Examples::

    python -m jobs.loop --model runs/quickstart/finetune --out runs/loop           # until Ctrl-C
    python -m jobs.loop --model runs/ft --out runs/loop --round-events 100 --rounds 3
    ray job submit --working-dir . -- python -m jobs.loop --address auto --model /shared/ft --out /shared/loop

What happens: the endpoint comes up as ``jobs.serve``'s does (the same flags), its feedback and answers
logged under ``--feedback-dir`` (default ``<out>/feedback``). Every ``--round-events`` new feedback events
(or ``--round-minutes``), a round runs as a Ray task beside the endpoint: the next dataset (base log +
feedback, every event once), a candidate fine-tuned from the served model for ``--finetune-minutes``, both
estimated off-policy on the answers given after the training cut (a paired interval of the difference; the
traffic must explore, ``--gate-exploration``) and ranked on the held-out clicks, and the gate's decision
(``--gate-on``). A rolled
candidate becomes the endpoint's new model version with no failed request. Each round's figures and
decision go to ``<out>/rounds.md`` (a table), ``<out>/rounds.jsonl`` (everything) and the endpoint's
``/healthz`` (``loop``).

Stopping: Ctrl-C (or ``--seconds``/``--rounds``) stops cleanly, a round in progress included. A loop that is
killed loses nothing: acknowledged feedback is on disk, the ledger (``<out>/loop_state.json``) changes only
when a round ends, and the next start serves the ledger's model and takes the events no finished round took.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from jobs._common import check_outlives_job, fail, ray_session, setup_logging
from rec_rllib.config import add_flags, add_model_flags, apply_flags, model_flag_values
from rec_rllib.loop.rounds import LoopConfig
from serving.settings import AppArgs

log = logging.getLogger("jobs.loop")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.loop", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="the fine-tuned run served first (a restart: the ledger's)")
    p.add_argument(
        "--out", required=True, help="the ledger, each round's dataset, candidate and figures, rounds.md"
    )
    p.add_argument("--feedback-dir", help="the endpoint's feedback log (default: <out>/feedback)")
    p.add_argument("--dataset", help="the base log (default: the one the model was trained on)")
    p.add_argument("--data-root", help="root of prepared datasets (default: $REC_RLLIB_DATA or ./data)")
    p.add_argument("--rounds", type=int, default=None, help="stop after this many rounds (default: Ctrl-C)")
    p.add_argument("--seconds", type=float, default=None, help="stop after this long (default: Ctrl-C)")
    p.add_argument("--port", type=int, default=8000, help="the endpoint's port (as jobs.serve's)")
    p.add_argument("--address", help="Ray address ('auto' on a cluster); default: an embedded local Ray")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded local Ray")
    p.add_argument("-v", "--verbose", action="store_true")
    add_flags(p.add_argument_group("rounds and the gate"), LoopConfig)
    serving = p.add_argument_group("serving (as jobs.serve)")
    add_model_flags(serving, AppArgs, skip=("model", "dataset", "feedback_dir", "state_name"))
    return p


def healthz(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/healthz", timeout=30) as r:
        return json.loads(r.read())


def roll(app_args: dict[str, Any], model: str, url: str) -> str:
    """Deploy ``model`` as the app's new version (replicas reload it one by one; requests keep being
    answered); returns the version the endpoint reports once it serves it."""
    from ray import serve

    from jobs.serve import APP_NAME
    from serving.app import build_app

    serve.run(build_app({**app_args, "model": model}), name=APP_NAME, route_prefix="/")
    deadline = time.time() + 300
    while True:
        info = healthz(url)
        if info.get("model_path") == str(Path(model).resolve()) or time.time() > deadline:
            return str(info.get("model_version"))
        time.sleep(0.5)


def pending_events(feedback_dir: str | Path, taken: list[str]) -> int:
    """Feedback events in part files no finished round has taken (read from the parts' footers)."""
    import pyarrow.parquet as pq

    from rec_rllib.loop.ledger import new_parts

    return sum(pq.read_metadata(p).num_rows for p in new_parts(feedback_dir, taken))


def summary(record: dict[str, Any]) -> dict[str, Any]:
    """What ``/healthz`` and the ledger keep of a round."""
    d = record["decision"]

    def number(x: float) -> float | None:  # JSON (and /healthz) has no NaN: a figure not formed is null
        return float(x) if x is not None and math.isfinite(x) else None

    return {
        "round": record["round"],
        "decision": "rolled" if d["roll"] else "kept",
        "reason": d["reason"],
        "metric": d["metric"],
        "served": number(d["served"]),
        "candidate": number(d["candidate"]),
        "diff": number(d["diff"]),
        "low": number(d["low"]),
        "high": number(d["high"]),
        "answers": d.get("answers"),
        "held_out_clicks": record["held_out_clicks"],
        "trained_events": record["trained_events"],
        "model": record.get("now_serving"),
        "model_version": record.get("now_serving_version"),
        "click_to_model_s": record.get("click_to_model_s"),
        "finished": record.get("finished"),
    }


ROUNDS_MD_HEAD = (
    "| round | new events | held-out clicks | served | candidate | diff [95% interval] | decision | "
    "click to model (s) | round (s) |\n|---:|---:|---:|---:|---:|---|---|---:|---:|\n"
)


def write_round(out: Path, record: dict[str, Any]) -> None:
    """Append the round to ``rounds.jsonl`` and a row to ``rounds.md``."""
    with open(out / "rounds.jsonl", "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
    md = out / "rounds.md"
    if not md.exists():
        md.write_text(
            f"# Closed-loop rounds\n\nGate metric: {record['decision']['metric']}.\n\n{ROUNDS_MD_HEAD}"
        )
    d = record["decision"]
    latency = record.get("click_to_model_s")
    with open(md, "a") as f:
        f.write(
            f"| {record['round']} | {record['new_events']} | {record['held_out_clicks']} | "
            f"{d['served']:.4f} | {d['candidate']:.4f} | "
            f"{d['diff']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] | "
            f"{'rolled' if d['roll'] else 'kept'} | {'' if latency is None else f'{latency:.0f}'} | "
            f"{record['finished'] - record['started']:.0f} |\n"
        )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        cfg = LoopConfig.from_dict(apply_flags(args, LoopConfig, {}))
    except ValueError as e:
        fail(str(e))
    check_outlives_job(args.out, "--out")
    check_outlives_job(args.feedback_dir, "--feedback-dir")
    out = Path(args.out).resolve()  # the round tasks may run in another directory (or on another node)
    feedback_dir = str(Path(args.feedback_dir).resolve()) if args.feedback_dir else str(out / "feedback")

    from jobs.serve import (
        announce,
        check_app_args,
        dataset_dir,
        fast_path_env,
        resolve_dataset,
        start,
        stop,
        stop_requested,
    )
    from rec_rllib.loop.ledger import Ledger
    from rec_rllib.loop.rounds import run_round, served_run

    try:
        ledger = Ledger.load_or_start(out, str(Path(args.model).resolve()))
        served_run(ledger.served_model)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    if ledger.rounds and Path(args.model).resolve() != Path(ledger.served_model):
        log.warning(
            "%s: round %d served %s; serving that (not --model %s). Start afresh with another --out.",
            out / "loop_state.json",
            ledger.rounds,
            ledger.served_model,
            args.model,
        )
    dataset = str(
        Path(dataset_dir(resolve_dataset(ledger.served_model, args.dataset), args.data_root)).resolve()
    )
    app_args = {
        **model_flag_values(args, AppArgs),
        "model": ledger.served_model,
        "dataset": dataset,
        "feedback_dir": feedback_dir,
    }
    check_app_args(app_args)
    out.mkdir(parents=True, exist_ok=True)
    proxy_port = fast_path_env(args.port, None, embedded=not args.address, direct=None, same_thread=None)
    done = stop_requested()
    deadline = None if args.seconds is None else time.time() + args.seconds
    with ray_session(args.address, num_cpus=args.num_cpus):
        import ray

        from jobs.serve import direct_ingress_urls
        from serving.state import live_state

        try:
            state = live_state()  # the app's shared state, made first so /healthz has the loop from the start
            if ledger.decisions:
                ray.get(state.set_loop_status.remote(ledger.decisions[-1]))
            proxy = start(app_args, proxy_port)
            announce(proxy, dataset)
            url = (direct_ingress_urls() or [proxy])[0]
            task = ray.remote(num_cpus=cfg.cpus)(run_round)
            print(
                f"loop: round {ledger.rounds + 1} starts at {cfg.round_events} new feedback events "
                f"(or after {cfg.round_minutes:g} min with at least {cfg.gate.min_events}); "
                f"figures in {out / 'rounds.md'}",
                flush=True,
            )
            last = time.time()
            finished = 0
            while not done.is_set() and (args.rounds is None or finished < args.rounds):
                if deadline is not None and time.time() > deadline:
                    break
                pending = pending_events(feedback_dir, ledger.taken)
                waited = time.time() - last >= cfg.round_minutes * 60
                if pending < cfg.round_events and not (waited and pending >= cfg.gate.min_events):
                    done.wait(2.0)
                    continue
                n = ledger.rounds + 1
                log.info("round %d: %d new feedback events", n, pending)
                ref = task.remote(ledger, feedback_dir, dataset, out / f"round-{n:03d}", cfg)
                while not done.is_set():
                    ready, _ = ray.wait([ref], timeout=1.0)
                    if ready:
                        break
                if done.is_set():
                    ray.cancel(ref, force=True)
                    log.info("stopped during round %d: the ledger is unchanged, the round runs again", n)
                    break
                record = ray.get(ref)
                if record["decision"]["roll"]:
                    version = roll(app_args, record["candidate_model"], url)
                    ledger.served_model = record["candidate_model"]
                    ledger.served_version = version
                    app_args["model"] = record["candidate_model"]
                    if record["first_new_trained_ms"] is not None:
                        record["click_to_model_s"] = time.time() - record["first_new_trained_ms"] / 1000
                record["now_serving"] = ledger.served_model
                record["now_serving_version"] = healthz(url).get("model_version")
                record["finished"] = time.time()
                ledger.taken += record["parts"]
                ledger.events_taken += record["new_events"]
                ledger.rounds = n
                ledger.decisions.append(summary(record))
                ledger.save(out)
                write_round(out, record)
                ray.get(state.set_loop_status.remote(ledger.decisions[-1]))
                print(f"round {n}: {record['decision']['reason']}", flush=True)
                finished += 1
                last = time.time()
        finally:
            stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
