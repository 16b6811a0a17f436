"""What a training run reports: each iteration's figures from RLlib's result (:func:`summarize`), the
``train_metrics.csv`` they go to (and a resumed run reads back), and ``training_curves.png``."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from rec_rllib.eval.plots import pyplot
from rec_rllib.fsutil import write_csv
from rec_rllib.rl.algo import REPLAY_HITS, REPLAY_ON_DISPLAY, REPLAY_STEPS


def _get(d: dict[str, Any], *path: str, default: float = float("nan")) -> float:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return default
        d = d[p]
    try:
        return float(d)
    except (TypeError, ValueError):
        return default


def summarize(
    result: dict[str, Any], seconds: float, *, exposure: bool = False, cooccurrence: bool = False
) -> dict[str, float]:
    """The per-iteration figures we log, from an RLlib result dict; ``exposure``: the env prices exposure (the
    share of recommendations already on display and the learned exposure weight β, else NaN);
    ``cooccurrence``: the policy has the co-occurrence term (its learned weight γ, else NaN)."""
    from ray.rllib.utils.metrics import (
        ENV_RUNNER_RESULTS,
        EPISODE_LEN_MEAN,
        EPISODE_RETURN_MEAN,
        LEARNER_RESULTS,
        NUM_ENV_STEPS_SAMPLED,
        NUM_ENV_STEPS_SAMPLED_LIFETIME,
    )

    from rec_rllib.rl.learners import COOCCURRENCE_WEIGHT_METRIC, EXPOSURE_WEIGHT_METRIC

    steps = _get(result, ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED)
    ret = _get(result, ENV_RUNNER_RESULTS, EPISODE_RETURN_MEAN)
    ep_len = _get(result, ENV_RUNNER_RESULTS, EPISODE_LEN_MEAN)
    replay_steps = _get(result, ENV_RUNNER_RESULTS, REPLAY_STEPS)
    learner = result.get(LEARNER_RESULTS, {}).get("default_policy", {})
    updates = _get(learner, "num_module_steps_trained", default=0.0)  # samples the learner trained on
    return {
        "iteration": float(result.get("training_iteration", 0)),
        "episode_return_mean": ret,
        "episode_len_mean": ep_len,
        # the share of this iteration's steps that recommended one of the next logged items
        "hit_rate": _get(result, ENV_RUNNER_RESULTS, REPLAY_HITS) / replay_steps
        if replay_steps > 0
        else float("nan"),
        "replay_steps": replay_steps,
        "env_steps": steps,
        "env_steps_lifetime": _get(result, ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME),
        "env_steps_per_s": steps / seconds if seconds > 0 else float("nan"),
        "learner_updates": updates,
        "learner_samples_per_s": updates / seconds if seconds > 0 else float("nan"),
        "policy_loss": _get(learner, "policy_loss"),
        "entropy": _get(learner, "entropy"),
        "reference_kl": _get(learner, "reference_kl"),
        "q_loss": _get(learner, "qf_loss"),
        "next_item_ce": _get(learner, "next_item_ce"),
        # the share of this iteration's recommendations whose item its runner had on display already
        "on_display_share": _get(result, ENV_RUNNER_RESULTS, REPLAY_ON_DISPLAY) / replay_steps
        if exposure and replay_steps > 0
        else float("nan"),
        # β after the iteration's last update (NaN in an iteration without one)
        "exposure_weight": _get(learner, EXPOSURE_WEIGHT_METRIC) if exposure else float("nan"),
        # γ of the co-occurrence term, likewise
        "cooccurrence_weight": _get(learner, COOCCURRENCE_WEIGHT_METRIC) if cooccurrence else float("nan"),
        "seconds": seconds,
    }


def read_history(run_dir: Path, iterations: int) -> list[dict[str, float]]:
    """The first ``iterations`` rows of a run's ``train_metrics.csv`` (none if it has none)."""
    path = run_dir / "train_metrics.csv"
    if not path.exists():
        return []
    with open(path) as f:
        rows = list(csv.DictReader(f))[:iterations]
    # a column an older version did not write is empty in its rows
    return [{k: float(v) if v else float("nan") for k, v in row.items()} for row in rows]


def write_history(run_dir: Path, history: list[dict[str, float]]) -> None:
    # every column any row has (write_csv's default): a run resumed from an older version's metrics gains
    # the new ones
    write_csv(run_dir / "train_metrics.csv", history)


def smoothed(values: list[float], span: int) -> list[float]:
    """Exponential moving average over ``span`` points (NaNs skipped, not spread)."""
    alpha, out, level = 2.0 / (span + 1), [], math.nan
    for v in values:
        if not math.isnan(v):
            level = v if math.isnan(level) else level + alpha * (v - level)
        out.append(level)
    return out


def plot_history(run_dir: Path, history: list[dict[str, float]], title: str) -> None:
    """``training_curves.png``: one panel per metric in a grid of three columns; each iteration's value
    (faint) and its moving average; the dashed line is where training started (the fine-tuned policy under the
    run's exploration: its first iteration; 0 for the learned weights, which the fine-tuned policy lacks)."""
    plt = pyplot()

    it = [h["iteration"] for h in history]
    panels = [("episode_return_mean", "mean episode return"), ("hit_rate", "hit rate")]
    if any(not math.isnan(h.get("exposure_weight", math.nan)) for h in history):  # the env priced exposure
        panels += [
            ("on_display_share", "share recommended while on display"),
            ("exposure_weight", "exposure weight β"),
        ]
    if any(not math.isnan(h.get("cooccurrence_weight", math.nan)) for h in history):
        panels.append(("cooccurrence_weight", "co-occurrence weight γ"))
    panels.append(("env_steps_per_s", "env steps / s"))
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    span = max(3, len(history) // 15)
    for ax, (key, label) in zip(axes.flat, panels, strict=False):
        # .get: the rows of a run resumed from an older version lack the newer columns
        values = [h.get(key, math.nan) for h in history]
        ax.plot(it, values, color="tab:blue", alpha=0.3, lw=0.8)
        ax.plot(it, smoothed(values, span), color="tab:blue", lw=1.8, label=f"moving average ({span})")
        if key in ("exposure_weight", "cooccurrence_weight"):
            start = 0.0
        else:
            start = next((v for v in values if not math.isnan(v)), math.nan)
        if key != "env_steps_per_s" and not math.isnan(start):
            ax.axhline(start, color="grey", ls="--", lw=1, label="fine-tuned policy (start)")
        ax.set_xlabel("iteration")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8, loc="best")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(run_dir / "training_curves.png", dpi=110)
    plt.close(fig)
