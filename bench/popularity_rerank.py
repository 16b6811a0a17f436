"""Reference point for RL's accuracy-coverage target: the fine-tuned model re-ranked with a fixed popularity
penalty, score(u, i) - alpha * log(1 + train count of i), evaluated by the shared evaluation (leave-one-out
test users by default, ``--split valid`` for the validation users; full ranking, seen items excluded).

    python bench/popularity_rerank.py --finetuned runs/bench-finetune/main --alphas 0 0.3 0.45 0.6 1.0
    python bench/popularity_rerank.py --finetuned runs/bench-finetune/main --split valid
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from rec_rllib.columns import SplitScheme
from rec_rllib.data.catalog import dataset_path, load_or_prepare
from rec_rllib.eval import evaluate_ranking
from rec_rllib.models import load_recommender
from rec_rllib.replay import train_item_counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--finetuned", default="runs/bench-finetune/main", help="fine-tuned run directory")
    p.add_argument("--alphas", nargs="+", type=float, default=[0.0, 0.3, 0.45, 0.6, 1.0])
    p.add_argument("--split", choices=["test", "valid"], default="test", help="leave-one-out users evaluated")
    args = p.parse_args()
    ds = load_or_prepare("ml-100k")
    rec = load_recommender(args.finetuned, ds)
    counts = train_item_counts(str(dataset_path("ml-100k")), SplitScheme.LEAVE_ONE_OUT)
    penalty = torch.as_tensor(np.log1p(counts), dtype=torch.float32)
    bias = rec.model.bias.detach().clone()
    base = None
    print("| alpha | HR@10 | NDCG@10 | coverage@10 | novelty@10 | NDCG vs alpha=0 | coverage vs alpha=0 |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for alpha in args.alphas:
        with torch.no_grad():
            rec.model.bias.copy_(
                bias - alpha * penalty
            )  # the bias counts only for known items, as penalty should
        m = evaluate_ranking(rec, ds, split=args.split).metrics
        base = base or m
        print(
            f"| {alpha:g} | {m['HR@10']:.4f} | {m['NDCG@10']:.4f} | {m['coverage@10']:.4f} | "
            f"{m['novelty@10']:.3f} | "
            f"{m['NDCG@10'] / base['NDCG@10'] - 1:+.1%} | {m['coverage@10'] / base['coverage@10'] - 1:+.1%} "
            "|",
            flush=True,
        )


if __name__ == "__main__":
    main()
