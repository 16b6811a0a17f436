"""Benchmark: a user state's best items from the item index against scoring every item.

    python bench/retrieval.py                                  # the 100x model of bench/scale_finetune.py
    python bench/retrieval.py --model runs/ft --dataset ml-100k --probes 4 8 43

For a sample of test users of a fine-tuned model (their states from their histories, as the env runners and
the Serve app compute them) it chooses each state's K best unconsumed items two ways -- every item scored
(a product with the item matrix, the consumed items masked, a top-K), and the item index
(:class:`rec_rllib.retrieval.ItemIndex`) searched for K + (history length) items, the consumed ones dropped
-- and prints, per clusters read: the
time per state in batches of 32 (an env runner's vector step) and of 1 (one answer), and the index's recall
against every-item scoring: of the K candidates, and of the top 10. One thread, as an env runner has.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def _ms_per_state(fn, states: torch.Tensor, batch: int, rounds: int = 3) -> float:
    """Milliseconds per state of ``fn(batch of states)`` over the sample, best of ``rounds``."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for i in range(0, len(states), batch):
            fn(slice(i, i + batch))
        best = min(best, (time.perf_counter() - t0) / len(states))
    return 1e3 * best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/bench-scale/100x-sampled", help="fine-tuned run directory")
    p.add_argument("--dataset", default="runs/bench-scale/synth-100x", help="its prepared dataset")
    p.add_argument("--users", type=int, default=512, help="test users sampled")
    p.add_argument("--candidates", type=int, default=512, help="K: candidates per state")
    p.add_argument("--probes", type=int, nargs="+", default=[8, 16, 32, 64], help="clusters read")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)

    from rec_rllib.columns import Obs
    from rec_rllib.data.catalog import load_or_prepare
    from rec_rllib.models.run import load_run
    from rec_rllib.models.seqrec import pad_histories
    from rec_rllib.retrieval import ItemIndex
    from rec_rllib.rl.obs import legal_at

    model, _ = load_run(args.model)
    ds = load_or_prepare(args.dataset)
    cases = ds.eval_cases(split="test")
    rng = np.random.default_rng(args.seed)
    rows = rng.choice(len(cases), size=min(args.users, len(cases)), replace=False)
    histories = [cases.histories[r][-model.cfg.max_len :] for r in rows]
    n, k = model.n_items, args.candidates
    with torch.inference_mode():
        items = model.item_matrix().T.contiguous().T  # column-major, as the scorer keeps it
        offsets = model.item_offsets()
        tokens, lengths = pad_histories(histories, model.cfg.max_len)
        queries = model.score_query(model.user_state(tokens, lengths, items))
    consumed = torch.full((len(histories), max(map(len, histories))), n, dtype=torch.long)
    for i, h in enumerate(histories):
        consumed[i, : len(h)] = torch.as_tensor(h)
    pool = k + consumed.shape[1]

    def exact(rows: slice) -> torch.Tensor:
        scores = queries[rows] @ items.T + offsets
        mask = torch.zeros(scores.shape[0], n + 1, dtype=torch.bool)
        mask.scatter_(1, consumed[rows], True)
        return torch.topk(scores.masked_fill(mask[:, :n], -torch.inf), k, dim=1).indices

    with torch.inference_mode():
        truth = exact(slice(None))
        print(f"{args.model}: {n:,} items, hidden {items.shape[1]}, {len(histories)} test users, K = {k}")
        print(
            f"every item scored: {_ms_per_state(exact, queries, 32):.3f} ms per state in batches of 32, "
            f"{_ms_per_state(exact, queries[:64], 1):.3f} ms alone"
        )
        t0 = time.perf_counter()
        index = ItemIndex(items, offsets)
        print(f"index: {index.lists} clusters, built in {time.perf_counter() - t0:.1f} s\n")
        print(
            "| clusters read | ms per state (batch 32) | ms per state (alone) | recall of the K | recall@10 |"
        )
        print("|---:|---:|---:|---:|---:|")
        for probe in args.probes:
            index.index.nprobe = min(probe, index.lists)

            def search(rows: slice) -> torch.Tensor:
                scores, ids = index.search(queries[rows], pool)
                legal = legal_at({Obs.CONSUMED: consumed[rows]}, ids)  # as the RL module drops them
                return ids.gather(1, torch.topk(scores.masked_fill(~legal, -torch.inf), k, dim=1).indices)

            found = search(slice(None))
            recall = np.mean(
                [len(set(a) & set(b)) / k for a, b in zip(found.tolist(), truth.tolist(), strict=True)]
            )
            at10 = np.mean(
                [
                    len(set(a[:10]) & set(b[:10])) / 10
                    for a, b in zip(found.tolist(), truth.tolist(), strict=True)
                ]
            )
            print(
                f"| {index.probe} of {index.lists} | {_ms_per_state(search, queries, 32):.3f} | "
                f"{_ms_per_state(search, queries[:64], 1):.3f} | {recall:.3f} | {at10:.3f} |"
            )


if __name__ == "__main__":
    main()
