"""Writing evaluation results: ``metrics.json`` (model -> metric -> value) and ``report.md``, whose Markdown
sections (ranking with intervals, off-policy estimates) are formed here from the figures the job computed."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rec_rllib.fsutil import write_json, write_text

TABLE_METRICS = (
    "HR@5",
    "HR@10",
    "HR@20",
    "NDCG@10",
    "MRR@10",
    "recall@10",
    "coverage@10",
    "novelty@10",
    "diversity@10",
)


def markdown_table(results: dict[str, dict[str, float]], columns: Sequence[str] = TABLE_METRICS) -> str:
    """One row per model, one column per metric present in any model's results."""
    cols = [c for c in columns if any(c in m for m in results.values())]
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for model, metrics in results.items():
        cells = [f"{metrics[c]:.4f}" if c in metrics else "–" for c in cols]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(
    out_dir: str | Path,
    results: dict[str, dict[str, float]],
    *,
    title: str,
    notes: Sequence[str] = (),
    sections: Sequence[str] = (),
) -> Path:
    """Write ``metrics.json`` and ``report.md`` into ``out_dir`` (atomically, file by file)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", results)
    body = [f"# {title}", ""]
    if results:
        body += [markdown_table(results), ""]
    body += [f"- {n}" for n in notes]
    if sections:
        body += ["", *sections]
    write_text(out / "report.md", "\n".join(body) + "\n")
    return out / "metrics.json"


def ranking_markdown(
    cis: dict[str, dict[str, tuple[float, float, float]]],
    buckets: dict[str, dict[str, dict[str, float]]],
    pairs: dict[str, dict[str, dict[str, float]]],
    shown: Sequence[str],
    *,
    baseline: str,
    curves: Sequence[str] = (),
) -> list[str]:
    """The report's ranking sections: each model's metrics with 95% bootstrap intervals (``cis[model][metric]
    = (value, low, high)``), by user-activity bucket, paired differences against ``baseline``, and the
    plots (``metric_bars.png``, ``accuracy_coverage.png``, ``curves``: Markdown images of training curves)."""
    lines = [
        "## 95% bootstrap intervals",
        "",
        "| model | " + " | ".join(shown) + " |",
        "|---|" + "---:|" * len(shown),
    ]
    for name, row in cis.items():
        lines.append(
            f"| {name} | " + " | ".join(f"{v:.4f} [{lo:.4f}, {hi:.4f}]" for v, lo, hi in row.values()) + " |"
        )
    lines += ["", "![metrics](metric_bars.png)", "", "![accuracy vs coverage](accuracy_coverage.png)", ""]
    lines += [
        "## By user activity (history-length terciles)",
        "",
        "| model | bucket | users | " + " | ".join(shown) + " |",
        "|---|---|---:|" + "---:|" * len(shown),
    ]
    for name, groups in buckets.items():
        for label, row in groups.items():
            lines.append(
                f"| {name} | {label} | {int(row['users'])} | "
                + " | ".join(f"{row[m]:.4f}" for m in shown)
                + " |"
            )
    if pairs:
        lines += [
            "",
            f"## Paired differences against {baseline} (same users)",
            "",
            "| comparison | metric | difference | 95% CI | paired t-test p |",
            "|---|---|---:|---|---:|",
        ]
        for label, per_metric in pairs.items():
            for m, d in per_metric.items():
                lines.append(
                    f"| {label} | {m} | {d['diff']:+.4f} | [{d['low']:+.4f}, {d['high']:+.4f}] | "
                    f"{d['p_value']:.2g} |"
                )
    if curves:
        lines += ["", "## Training curves", "", *curves]
    return lines + [""]


def obd_ope_markdown(
    suite: dict[str, dict],
    *,
    n_boot: int,
    repeats: int,
    reward_model: str,
    reference: str | None,
    published_draws: bool,
) -> list[str]:
    """The report's section on the off-policy estimators' errors on the Open Bandit Dataset sample
    (:func:`rec_rllib.eval.obd.validation_suite`'s ``suite``), beside the reference library's published
    errors for the ``reference`` setting."""
    from rec_rllib.eval.obd import OBP_PUBLISHED

    estimators = list(next(iter(suite.values()))["errors"])
    lines = [
        "## Off-policy estimators on the Open Bandit Dataset sample",
        "",
        f"Mean relative error |estimate - truth| / truth over {n_boot} bootstrap resamples"
        + (f" (averaged over {repeats} sets: resamples 0-{n_boot * repeats - 1})" if repeats > 1 else "")
        + f"; reward model for DM/DR: {reward_model}. Truth: the target policy's own logged click "
        "rate. `prior`: BTS's distribution by Monte Carlo from its production Beta prior; `empirical`: item "
        "frequencies per position in the BTS logs. Resample b is drawn as the reference library draws it, so "
        "resamples 0-29 are the ones behind its published figures. `slope`: SLOPE (Su et al., 2020) over DR "
        "and DM with item rates shrunk by increasing prior strengths (see `rec_rllib.eval.ope`).",
        "",
        "| campaign / direction / BTS definition | truth | " + " | ".join(estimators) + " |",
        "|---|---:|" + "---:|" * len(estimators),
    ]

    def row(label: str, truth: str, errors: dict[str, float]) -> str:
        best = min(errors, key=errors.get)
        cells = [f"**{errors[e]:.3f}**" if e == best else f"{errors[e]:.3f}" for e in estimators]
        return f"| {label} | {truth} | " + " | ".join(cells) + " |"

    for key, v in suite.items():
        lines.append(row(key, f"{v['truth']:.4f}", v["errors"]))
    if published_draws and repeats > 1:
        lines.append(row(f"{reference}, resamples 0-29 only", "", suite[reference]["errors_first_set"]))
    lines.append(
        "| obp published (all / random->bts / prior, resamples 0-29) | | "
        + " | ".join(f"{OBP_PUBLISHED[e]:.3f}" if e in OBP_PUBLISHED else "–" for e in estimators)
        + " |"
    )
    lines += ["", "![OPE estimates vs truth](ope_vs_truth.png)", ""]
    if reference is not None:
        lines += ["![relative error vs obp](ope_relative_error.png)", ""]
    return lines


def serve_log_markdown(
    res: dict[str, dict],
    *,
    feedback_dir: str,
    answers: int,
    dropped: dict,
    max_rounds: int | None,
    strategy: str,
) -> list[str]:
    """The report's section on off-policy estimates from a Serve log
    (:func:`rec_rllib.eval.servelog.evaluate_serve_log`'s ``res``)."""
    from rec_rllib.eval.servelog import SERVE_LOG_ESTIMATORS

    sampled = f"; at most {max_rounds:,}, a seeded uniform subset of a longer log" if max_rounds else ""
    logged = res["logging policy (logged mean)"]["value"]
    lines = [
        "## Off-policy estimates on the Serve log",
        "",
        f"`{feedback_dir}`: {answers:,} answers (first slot; dropped: {dropped}"
        f"{sampled}). "
        f"Logged mean reward of the serving policy: **{logged:.4f}**. Targets under "
        f"`{strategy}`; "
        "estimate [90% bootstrap interval]; ESS = effective sample size of the importance weights.",
        "",
        "| target | " + " | ".join(SERVE_LOG_ESTIMATORS) + " | ESS | max weight |",
        "|---|" + "---:|" * (len(SERVE_LOG_ESTIMATORS) + 2),
    ]
    for name, r in res.items():
        if "estimates" not in r:
            continue
        cells = [f"{e['value']:.4f} [{e['low']:.4f}, {e['high']:.4f}]" for e in r["estimates"].values()]
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {r['effective_sample_size']:.0f} | "
            f"{r['max_weight']:.1f} |"
        )
    return lines + [""]
