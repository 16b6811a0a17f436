"""RL training with RLlib's new API stack: the training loop (:func:`train`) over the algorithm
:func:`~rec_rllib.rl.algo.build_algo_config` builds from an :class:`~rec_rllib.rl.config.RLTrainConfig`,
checkpoints, metrics and curves (:mod:`rec_rllib.rl.report`)."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from rec_rllib.rl.algo import build_algo_config
from rec_rllib.rl.config import GAMMA_FROM_VALIDATION, RLTrainConfig
from rec_rllib.rl.report import plot_history, read_history, summarize, write_history

log = logging.getLogger(__name__)


def choose_cooccurrence_gamma(cfg: RLTrainConfig, run: Path, progress=print) -> float:
    """``cooccurrence_gamma: validation``: the γ of :data:`~rec_rllib.rl.policy.COOCCURRENCE_GAMMA_GRID` under
    which the fine-tuned model's scores plus γ times the co-occurrence feature rank the validation users best
    (NDCG@10); every γ's figure goes to ``<run>/cooccurrence_gamma.json``."""
    from rec_rllib.data.dataset import LogDataset
    from rec_rllib.models import load_recommender
    from rec_rllib.rl.policy import select_cooccurrence_gamma

    t0 = time.perf_counter()
    dataset = LogDataset.load(cfg.env.dataset)
    best, figures = select_cooccurrence_gamma(
        load_recommender(cfg.finetuned, dataset),
        dataset,
        window=cfg.env.cooccurrence_window,
        scheme=cfg.env.scheme,
    )
    shown = "  ".join(f"{g:g}: {v:.4f}" for g, v in figures.items())
    progress(
        f"co-occurrence weight γ {best:g}, chosen on the validation users (NDCG@10 {shown}; "
        f"{time.perf_counter() - t0:.0f} s)"
    )
    (run / "cooccurrence_gamma.json").write_text(
        json.dumps(
            {
                "gamma": best,
                "metric": "NDCG@10",
                "split": "valid",
                "window": cfg.env.cooccurrence_window,
                "figures": {f"{g:g}": v for g, v in figures.items()},
            },
            indent=2,
        )
        + "\n"
    )
    return best


def train(
    cfg: RLTrainConfig, run_dir: str | Path, *, resume: str | Path | None = None, progress=print
) -> dict[str, Any]:
    """Build the algorithm, train ``cfg.iterations`` iterations, checkpoint, and write metrics and curves.

    Ray must already be initialised (the job starts it). Returns a summary with the checkpoint path.
    """
    from rec_rllib.rl.module import model_config_from_run
    from rec_rllib.rl.policy import check_resumable

    resume = check_resumable(resume) if resume else None  # before anything is written
    run = Path(run_dir).resolve()
    run.mkdir(parents=True, exist_ok=True)
    model_config = model_config_from_run(cfg.finetuned)
    max_len = int(model_config["textseqrec"]["config"]["max_len"])
    if cfg.env.window > max_len:
        log.info("env window %d > the model's max_len %d: using %d", cfg.env.window, max_len, max_len)
        cfg.env.window = max_len
    if cfg.cooccurrence_gamma == GAMMA_FROM_VALIDATION:
        cfg.cooccurrence_gamma = choose_cooccurrence_gamma(cfg, run, progress)
    (run / "rl_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    algo_config = build_algo_config(cfg, model_config)
    algo = algo_config.build_algo()
    history: list[dict[str, float]] = []
    start_iter = 0
    if resume:
        algo.restore_from_path(str(resume))
        start_iter = int(algo.iteration)
        progress(f"resumed from {resume} at iteration {start_iter}")
        history = read_history(run, start_iter)
    checkpoint = None
    exposure, cooccurrence = cfg.env.exposure_cost > 0, cfg.env.cooccurrence
    try:
        for i in range(start_iter, cfg.iterations):
            t0 = time.perf_counter()
            result = algo.train()
            row = summarize(result, time.perf_counter() - t0, exposure=exposure, cooccurrence=cooccurrence)
            for key in ("exposure_weight", "cooccurrence_weight"):  # no update this iteration: unchanged
                if math.isnan(row[key]) and history:
                    row[key] = history[-1].get(key, math.nan)  # (NaN without the term)
            history.append(row)
            shown = (
                f"on-display {row['on_display_share']:.2f}  β {row['exposure_weight']:.3f}  "
                if exposure
                else ""
            ) + (f"γ {row['cooccurrence_weight']:.3f}  " if cooccurrence else "")
            progress(
                f"iter {i + 1:3d}/{cfg.iterations}  return {row['episode_return_mean']:.3f}  "
                f"hit-rate {row['hit_rate']:.3f}  {shown}{row['env_steps_per_s']:.0f} env-steps/s  "
                f"{row['learner_samples_per_s']:.0f} learned/s  "
                f"ref-KL {row['reference_kl']:.4f}  {row['seconds']:.1f}s"
            )
            write_history(run, history)
            if (i + 1) % cfg.checkpoint_every == 0 or i + 1 == cfg.iterations:
                checkpoint = str(run / "checkpoint")
                algo.save_to_path(checkpoint)
        plot_history(run, history, f"{cfg.algorithm.upper()} on {Path(cfg.env.dataset).name}")
    finally:
        algo.stop()
    summary = {"checkpoint": checkpoint, "iterations": len(history), "history": history}
    (run / "rl_summary.json").write_text(
        json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2)
    )
    return summary
