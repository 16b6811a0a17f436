"""PNG plots for the evaluation report (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only: jobs run on machines without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


def metric_bars(path: Path, values: dict[str, dict[str, tuple[float, float, float]]], *, title: str) -> Path:
    """Grouped bars: one group per metric, one bar per model, 95% CI whiskers.
    ``values[model][metric] = (mean, low, high)``."""
    plt = pyplot()
    models = list(values)
    metrics = list(next(iter(values.values())))
    x = np.arange(len(metrics))
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(metrics) + 1.2 * len(models)), 4.2))
    for i, m in enumerate(models):
        mean = np.array([values[m][k][0] for k in metrics])
        err = np.array(
            [[mean[j] - values[m][k][1], values[m][k][2] - mean[j]] for j, k in enumerate(metrics)]
        ).T
        ax.bar(x + (i - (len(models) - 1) / 2) * width, mean, width, yerr=err, capsize=3, label=m)
    ax.set_xticks(x, metrics)
    ax.set_ylabel("mean over test users (95% bootstrap CI)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def tradeoff(
    path: Path, points: dict[str, tuple[float, float]], *, x_label: str, y_label: str, title: str
) -> Path:
    """Scatter of labelled points (e.g. coverage@10 vs NDCG@10 per model)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, (xv, yv) in points.items():
        ax.scatter(xv, yv, s=40)
        ax.annotate(name, (xv, yv), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.margins(0.15)
    return _save(fig, path)


def ope_vs_truth(
    path: Path, panels: dict[str, dict[str, np.ndarray]], truths: dict[str, float], *, title: str
) -> Path:
    """One panel per setting: each estimator's bootstrap estimates (box) against the truth (dashed line)."""
    plt = pyplot()
    n = len(panels)
    cols = min(n, 3)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    for ax, (name, est) in zip(axes.ravel(), panels.items(), strict=False):
        labels = list(est)
        ax.boxplot([est[k] for k in labels], tick_labels=labels, showfliers=False)
        ax.axhline(truths[name], color="k", linestyle="--", linewidth=1, label="on-policy truth")
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("estimated click rate")
        ax.tick_params(axis="x", labelsize=7, rotation=30)
        ax.legend(fontsize=7, loc="upper right")
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    fig.suptitle(title)
    return _save(fig, path)


def relative_error_bars(
    path: Path,
    ours: dict[str, float],
    reference: dict[str, float] | None,
    *,
    title: str,
    labels: Sequence[str] | None = None,
) -> Path:
    """Mean relative error per estimator, ours beside the reference library's published figures."""
    plt = pyplot()
    names = list(labels or ours)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 4))
    width = 0.4 if reference else 0.6
    ax.bar(
        x - (width / 2 if reference else 0), [ours.get(k, np.nan) for k in names], width, label="rec-rllib"
    )
    if reference:
        ax.bar(x + width / 2, [reference.get(k, np.nan) for k in names], width, label="obp (published)")
    ax.set_xticks(x, names)
    ax.set_ylabel("mean relative error |est - truth| / truth")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)
