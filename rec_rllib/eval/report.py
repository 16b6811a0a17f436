"""Writing evaluation results: ``metrics.json`` (model -> metric -> value) and a Markdown table."""

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
