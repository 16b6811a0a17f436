"""One round of the closed loop: the next dataset, a warm-started candidate, the judgement, the decision.

A round takes the feedback part files no finished round has taken. Their events, in acknowledgement order,
are split by time: the newest ``holdout`` fraction is held out for judging, the rest joins every event of
earlier rounds (their held-out events included) on top of the base log. The candidate is the served model
fine-tuned further on that dataset (a warm start, a short budget); both models are then ranked on the
held-out clicks and estimated off-policy on the Serve log, and the gate (:mod:`rec_rllib.loop.gate`)
decides. The catalogue stays the served one: clicks on items added at run time (which the endpoint serves
from their text) are counted, not trained on.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rec_rllib.columns import Col
from rec_rllib.config import DictConfig
from rec_rllib.data.feedback import SCHEMA
from rec_rllib.loop.gate import GateConfig, decide, decide_ope
from rec_rllib.loop.judge import ranked_clicks, serve_log_comparison
from rec_rllib.loop.ledger import PART_COL, Ledger, new_parts, read_parts

log = logging.getLogger(__name__)


@dataclass
class LoopConfig(DictConfig):
    """When a round starts, what the candidate trains on and for how long, and the gate."""

    config_label = "loop config"

    round_events: int = 200
    """New feedback events that start a round."""
    round_minutes: float = 10.0
    """...or minutes since the last round, once the gate's minimum of new events (``--gate-min-events``)
    came."""
    holdout: float = 0.3
    """Newest fraction of a round's new events held out for judging (the rest is trained on now, the held
    out ones in the next round)."""
    finetune_minutes: float = 2.0
    """The candidate's fine-tuning budget (the final evaluation included)."""
    epochs: int = 20
    """The candidate's epoch cap (early stopping on validation NDCG@10 picks the best)."""
    lr: float = 5e-4
    """The candidate's peak learning rate (a warm start: lower than a fresh model's)."""
    cpus: float = 1.0
    """CPUs of the Ray task that runs a round (its torch threads: the whole part of it)."""
    ope_answers: int = 20_000
    """Serve-log answers after the training cut that the off-policy comparison uses at most (the newest)."""
    gate: GateConfig = field(default_factory=GateConfig)

    def __post_init__(self) -> None:
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"holdout must be in (0, 1), got {self.holdout}")
        self.check_numbers(
            at_least={"round_events": 1, "epochs": 1, "ope_answers": 1},
            above={"round_minutes": 0, "finetune_minutes": 0, "lr": 0, "cpus": 0},
        )


def served_run(model: str | Path) -> dict[str, Any]:
    """The served model's run config; a clear error when it is not a fine-tuned run directory."""
    cfg = Path(model, "config.json")
    meta = json.loads(cfg.read_text()) if cfg.exists() else {}
    if meta.get("kind") != "textseqrec":
        raise ValueError(
            f"{model}: the loop warm-starts fine-tuned runs (a jobs.finetune output); an RL checkpoint "
            "cannot be a loop's starting model yet"
        )
    return meta


def run_round(
    ledger: Ledger,
    feedback_dir: str | Path,
    base: str | Path,
    round_dir: str | Path,
    cfg: LoopConfig,
) -> dict[str, Any]:
    """Run one round (no serving here): returns its record; the ledger is not changed (the caller records
    the parts as taken with the decision, in one write)."""
    from rec_rllib.data.sources import feedback_dataset
    from rec_rllib.finetune import FinetuneConfig, finetune
    from rec_rllib.models.run import TransformerRecommender, load_run
    from rec_rllib.models.seqrec import ModelConfig

    t0 = time.time()
    round_dir = Path(round_dir)
    round_dir.mkdir(parents=True, exist_ok=True)
    served_meta = served_run(ledger.served_model)
    item_ids = [str(i) for i in served_meta["item_ids"]]
    parts = new_parts(feedback_dir, ledger.taken)
    every = read_parts([Path(feedback_dir, name) for name in ledger.taken] + parts)
    is_new = every[PART_COL].isin({p.name for p in parts}).to_numpy()
    new = every[is_new]
    n_hold = math.ceil(cfg.holdout * len(new))
    held = new.iloc[len(new) - n_hold :]
    events = every.drop(held.index)  # earlier rounds' events (their held-out ones included) and the fresh
    fresh = events[is_new[events.index]]
    known = set(item_ids)
    in_catalogue = events["item_id"].astype(str).isin(known).to_numpy()
    trainable = events.loc[in_catalogue, SCHEMA.names]
    clicks = held[(held["reward"] > 0).to_numpy()]

    dataset = feedback_dataset(trainable, base, name=f"{Path(base).name}+loop-{ledger.rounds + 1}")
    dataset.save(str(round_dir / "dataset"))
    if [str(i) for i in dataset.items[Col.ITEM_ID]] != item_ids:
        raise ValueError(f"{base}: its catalogue is not the served model's ({ledger.served_model})")
    train_cfg = FinetuneConfig.from_dict(
        {
            **served_meta["train"],
            "init_from": ledger.served_model,
            "max_minutes": cfg.finetune_minutes,
            "epochs": cfg.epochs,
            "lr": cfg.lr,
            "warmup_steps": 0,
            "decay_epochs": cfg.epochs,
            "eval_every": 1,
            "min_epochs": 0,
            "holdout_items": 0.0,
            "progress": False,
            "threads": max(1, int(cfg.cpus)),
        }
    )
    t_train = time.time()
    result = finetune(
        dataset,
        ModelConfig.from_dict(served_meta["model"]),
        train_cfg,
        round_dir / "candidate",
        dataset_ref=str(Path(base).resolve()),
    )
    t_judge = time.time()
    served_model, _ = load_run(ledger.served_model)
    candidate_model, _ = load_run(result.run_dir)
    served_rec = TransformerRecommender(served_model, name="served")
    candidate_rec = TransformerRecommender(candidate_model, name="candidate")
    per_event = {
        "served": ranked_clicks(served_rec, item_ids, clicks),
        "candidate": ranked_clicks(candidate_rec, item_ids, clicks),
    }
    # the answers given from the first held-out event on: neither model trained on their feedback
    since_ms = int(held["timestamp_ms"].min()) if len(held) else None
    ope = None
    if since_ms is not None:
        ope = serve_log_comparison(
            feedback_dir,
            dataset,
            candidate_rec,
            served_rec,
            cfg.gate,
            since_ms=since_ms,
            max_answers=cfg.ope_answers,
        )
    if cfg.gate.on == "clicks":
        decision = decide(
            per_event["served"][cfg.gate.metric], per_event["candidate"][cfg.gate.metric], cfg.gate
        )
    else:
        decision = decide_ope(None if ope is None else ope[cfg.gate.estimator], len(clicks), cfg.gate)
    trained_ms = fresh["timestamp_ms"].to_numpy()
    return {
        "round": ledger.rounds + 1,
        "started": t0,
        "parts": [p.name for p in parts],
        "new_events": len(new),
        "held_out_events": int(n_hold),
        "held_out_clicks": len(clicks),
        "trained_events": int(in_catalogue.sum()),
        "not_in_catalogue": int((~in_catalogue).sum()),
        "first_new_trained_ms": int(trained_ms.min()) if len(trained_ms) else None,
        "last_new_trained_ms": int(trained_ms.max()) if len(trained_ms) else None,
        "served_model": ledger.served_model,
        "candidate_model": str(result.run_dir),
        "candidate_fit": {
            "epochs": result.epochs_run,
            "best_epoch": result.best_epoch,
            "valid_NDCG@10": result.best_valid_ndcg10,
            "test": result.test_metrics,
        },
        "held_out": {
            name: {metric: float(np.mean(v)) if len(v) else None for metric, v in values.items()}
            for name, values in per_event.items()
        },
        "ope_since_ms": since_ms,
        "ope": None if ope is None else {name: e.to_dict() for name, e in ope.items()},
        "decision": decision.to_dict(),
        "seconds": {
            "data": t_train - t0,
            "finetune": t_judge - t_train,
            "judge": time.time() - t_judge,
        },
    }
