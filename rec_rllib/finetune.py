"""Fine-tuning :class:`~rec_rllib.models.seqrec.TextSeqRec` on next-item prediction.

Every position of every training window predicts the next item (SASRec's objective), with full-softmax
cross-entropy over the whole catalogue (or sampled softmax with a log-Q correction), AdamW, linear warm-up,
gradient clipping and early stopping on validation NDCG@10 (leave-one-out validation users, full ranking,
the shared evaluation). Long histories are cut into windows of ``max_len`` so every interaction is a target.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from rec_rllib.columns import Col, SplitScheme
from rec_rllib.config import DictConfig
from rec_rllib.data.dataset import LogDataset
from rec_rllib.eval.ranking import evaluate_ranking
from rec_rllib.fsutil import write_csv
from rec_rllib.models.run import TransformerRecommender, build_model, save_run
from rec_rllib.models.seqrec import BOS, OFFSET, ModelConfig, TextSeqRec

log = logging.getLogger(__name__)
IGNORE = -100


@dataclass
class FinetuneConfig(DictConfig):
    """Training settings. Defaults reach the quality reported in the README on 2 CPU cores."""

    config_label = "train config"

    epochs: int = 300
    """Upper bound on passes over the training windows (early stopping usually ends sooner)."""
    batch_size: int = 64
    """Training windows per step."""
    lr: float = 2e-3
    """Peak AdamW learning rate."""
    weight_decay: float = 0.05
    """AdamW weight decay (not applied to biases, LayerNorms and embeddings' padding rows)."""
    warmup_steps: int = 100
    """Linear warm-up from 0 to ``lr``."""
    decay_epochs: int = 40
    """Cosine decay of the learning rate to 5% of ``lr`` over this many epochs after warm-up (0 = constant)."""
    grad_clip: float = 1.0
    """Gradient-norm clip (0 disables)."""
    loss: str = "full"
    """``full`` softmax over all items, or ``sampled`` softmax (uniform negatives, log-Q corrected)."""
    mask_history: bool = True
    """Leave items already in the window out of each position's softmax (as evaluation excludes seen items)."""
    num_negatives: int = 256
    """Negatives per step for ``sampled``."""
    patience: int = 15
    """Stop after this many evaluations without a better validation NDCG@10."""
    eval_every: int = 2
    """Epochs between validation evaluations."""
    max_minutes: float = 15.0
    """Wall-clock budget; training stops at the first evaluation after it (best weights kept)."""
    min_epochs: int = 0
    """Evaluations before this epoch never trigger early stopping."""
    scheme: str = SplitScheme.LEAVE_ONE_OUT
    """Split whose train part is learned from and whose validation part drives early stopping."""
    holdout_items: float = 0.0
    """Fraction of items removed from training entirely (cold-start evaluation); 0 keeps all."""
    id_dropout: float = 0.0
    """Per batch, the fraction of items whose id embedding and bias are dropped (text only), so the model
    learns to score items from their text alone: what cold-start items get."""
    seed: int = 0
    """Seeds model init, shuffling, dropout and the item hold-out."""
    threads: int = 0
    """torch intra-op threads (0 = leave torch's default)."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu`` or ``cuda[:n]``."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        if self.loss not in ("full", "sampled"):
            raise ValueError(f"loss must be 'full' or 'sampled', got {self.loss!r}")
        if not 0.0 <= self.holdout_items < 1.0:
            raise ValueError(f"holdout_items must be in [0, 1), got {self.holdout_items}")
        if not 0.0 <= self.id_dropout < 1.0:
            raise ValueError(f"id_dropout must be in [0, 1), got {self.id_dropout}")
        self.check_numbers(
            at_least={"weight_decay": 0, "warmup_steps": 0, "decay_epochs": 0, "grad_clip": 0, "num_negatives": 1,
                      "patience": 1, "min_epochs": 0, "threads": 0},
            above={"epochs": 0, "batch_size": 0, "eval_every": 0, "lr": 0, "max_minutes": 0},
        )  # fmt: skip


@dataclass
class FinetuneResult:
    run_dir: Path
    best_epoch: int
    best_valid_ndcg10: float
    epochs_run: int
    seconds: float
    seconds_per_epoch: float
    history: list[dict[str, float]] = field(default_factory=list)
    test_metrics: dict[str, float] = field(default_factory=dict)
    holdout: list[int] = field(default_factory=list)


def train_histories(
    dataset: LogDataset, scheme: str, drop_items: np.ndarray | None = None
) -> list[np.ndarray]:
    """Per user with training data, the train-split items in time order (``drop_items`` removed)."""
    train = dataset.train_interactions(scheme)
    users = train[Col.USER_IDX].to_numpy()
    items = train[Col.ITEM_IDX].to_numpy().astype(np.int64)
    if drop_items is not None and len(drop_items):
        keep = ~np.isin(items, drop_items)
        users, items = users[keep], items[keep]
    if len(users) == 0:
        return []
    cuts = np.flatnonzero(users[1:] != users[:-1]) + 1
    return [seq for seq in np.split(items, cuts) if len(seq)]


def training_windows(
    histories: list[np.ndarray], max_len: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens [N, max_len+1], targets [N, max_len+1], lengths [N]) covering every interaction once as a target.

    A window is ``[BOS] + seq[s:e]``; the token at position p predicts ``seq[s + p]``. Only the first window
    of a user lets [BOS] predict (its first item); later windows start mid-history, so [BOS] is silent there.
    """
    toks, tgts, lens = [], [], []
    for seq in histories:
        n = len(seq)
        end = n
        while end > 0:
            start = max(0, end - max_len)
            window = seq[start:end]
            t = np.zeros(max_len + 1, dtype=np.int64)
            y = np.full(max_len + 1, IGNORE, dtype=np.int64)
            t[0] = BOS
            t[1 : len(window) + 1] = window + OFFSET
            nxt = seq[start + 1 : end + 1]  # targets of the window's items (the last may have none)
            y[1 : len(nxt) + 1] = nxt
            if start == 0:
                y[0] = seq[0]
            toks.append(t)
            tgts.append(y)
            lens.append(len(window) + 1)
            end = start
    return torch.from_numpy(np.stack(toks)), torch.from_numpy(np.stack(tgts)), torch.tensor(lens)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or name.endswith("bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def next_item_loss(
    model: TextSeqRec,
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    targets: torch.Tensor,
    cfg: FinetuneConfig,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Cross-entropy of the next item at every non-ignored position."""
    id_keep = None
    if cfg.id_dropout > 0 and model.training and model.cfg.text_model is not None:
        p = torch.full((model.n_items,), 1.0 - cfg.id_dropout, device=tokens.device)
        id_keep = torch.bernoulli(p, generator=generator) if generator is not None else torch.bernoulli(p)
    items = model.item_matrix(id_keep)  # [n_items, H]
    hidden = model.encode(tokens, lengths, items)  # [B, T, H]
    keep = targets != IGNORE
    h = hidden[keep]  # [N, H]
    y = targets[keep]  # [N]
    bias = model.bias * model.known * (1.0 if id_keep is None else id_keep)
    if cfg.loss == "full":
        logits = h @ items.T + bias  # [N, n_items]
        if cfg.mask_history:
            seen = _seen_mask(tokens, keep, model.n_items)  # [N, n_items]
            seen[torch.arange(len(y), device=y.device), y] = False  # a repeated item stays a valid target
            logits = logits.masked_fill(seen, float("-inf"))
        return nn.functional.cross_entropy(logits, y)
    neg = torch.randint(0, model.n_items, (cfg.num_negatives,), device=h.device, generator=generator)
    pos_logit = (h * items[y]).sum(-1) + bias[y]  # [N]
    neg_logit = h @ items[neg].T + bias[neg]  # [N, M]
    # uniform sampling: log-Q correction subtracts log(M / n_items) from the sampled logits
    neg_logit = neg_logit - math.log(cfg.num_negatives / model.n_items)
    neg_logit = neg_logit.masked_fill(neg[None, :] == y[:, None], float("-inf"))  # accidental hits
    logits = torch.cat([pos_logit[:, None], neg_logit], dim=1)
    return nn.functional.cross_entropy(logits, torch.zeros(len(y), dtype=torch.long, device=h.device))


def _seen_mask(tokens: torch.Tensor, keep: torch.Tensor, n_items: int) -> torch.Tensor:
    """[N, n_items] bool for the N kept positions: item i occurs at or before that position of its window."""
    b, t = tokens.shape
    first = torch.full((b, n_items + OFFSET), t, dtype=torch.long, device=tokens.device)
    positions = torch.arange(t, device=tokens.device).expand(b, t)
    first.scatter_reduce_(1, tokens, positions, reduce="amin")  # first position of each token per window
    rows, cols = keep.nonzero(as_tuple=True)  # same order as hidden[keep]
    return first[rows, OFFSET:] <= cols[:, None]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def finetune(
    dataset: LogDataset,
    model_cfg: ModelConfig,
    cfg: FinetuneConfig,
    run_dir: str | Path,
    *,
    dataset_ref: str | None = None,
) -> FinetuneResult:
    """Train, early-stop on validation NDCG@10, evaluate the best weights on test, write the run directory."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = resolve_device(cfg.device)

    holdout = np.array([], dtype=np.int64)
    if cfg.holdout_items > 0:
        holdout = np.sort(
            rng.choice(dataset.n_items, int(round(cfg.holdout_items * dataset.n_items)), replace=False)
        )
    histories = train_histories(dataset, cfg.scheme, holdout)
    known = np.zeros(dataset.n_items, dtype=np.float32)
    for h in histories:
        known[h] = 1.0
    tokens, targets, lengths = training_windows(histories, model_cfg.max_len)
    n_targets = int((targets != IGNORE).sum())
    log.info(
        "%d users, %d windows, %d training targets, %d items (%d held out)",
        len(histories),
        len(tokens),
        n_targets,
        dataset.n_items,
        len(holdout),
    )

    t_build = time.perf_counter()
    model = build_model(model_cfg, list(dataset.items[Col.TEXT]), known_items=known).to(device)
    log.info(
        "model built in %.1fs: %s parameters",
        time.perf_counter() - t_build,
        f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,}",
    )
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr)
    steps_per_epoch = math.ceil(len(tokens) / cfg.batch_size)

    def lr_factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if not cfg.decay_epochs:
            return 1.0
        frac = min(1.0, (step - cfg.warmup_steps) / (cfg.decay_epochs * steps_per_epoch))
        return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    rec = TransformerRecommender(model)

    history: list[dict[str, float]] = []
    best = (-1.0, 0)
    best_state: dict[str, torch.Tensor] | None = None
    bad_evals = 0
    t0 = time.perf_counter()
    train_seconds = 0.0
    epoch = 0
    bar = tqdm(total=cfg.epochs, desc="finetune", disable=not cfg.progress)
    for epoch in range(1, cfg.epochs + 1):
        te = time.perf_counter()
        model.train()
        order = torch.randperm(len(tokens), generator=gen)
        losses = []
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            width = int(lengths[idx].max())
            loss = next_item_loss(
                model,
                tokens[idx, :width].to(device),
                lengths[idx].to(device),
                targets[idx, :width].to(device),
                cfg,
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            losses.append(loss.item())
        train_seconds += time.perf_counter() - te
        row: dict[str, float] = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)),
            "lr": sched.get_last_lr()[0],
            "seconds": time.perf_counter() - t0,
        }
        out_of_time = (time.perf_counter() - t0) / 60 >= cfg.max_minutes
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs or out_of_time:
            model.eval()
            val = evaluate_ranking(rec, dataset, scheme=cfg.scheme, split="valid", ks=(10,)).metrics
            row.update({"valid_NDCG@10": val["NDCG@10"], "valid_HR@10": val["HR@10"]})
            if val["NDCG@10"] > best[0]:
                best = (val["NDCG@10"], epoch)
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                bad_evals = 0
            elif epoch >= cfg.min_epochs:
                bad_evals += 1
        history.append(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_ndcg=f"{best[0]:.4f}")
        _write_metrics_csv(run / "metrics.csv", history)
        if bad_evals >= cfg.patience or out_of_time:
            break
    bar.close()
    seconds = time.perf_counter() - t0
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    test = evaluate_ranking(rec, dataset, scheme=cfg.scheme, split="test").metrics
    result = FinetuneResult(
        run, best[1], best[0], epoch, seconds, train_seconds / max(epoch, 1), history, test, holdout.tolist()
    )
    meta = {
        "train": asdict(cfg),
        "dataset": {
            "name": dataset.name,
            "ref": dataset_ref,
            "content_hash": dataset.manifest.get("content_hash"),
        },
        "item_ids": list(map(str, dataset.items[Col.ITEM_ID])),
        "holdout_items": holdout.tolist(),
        "result": {k: v for k, v in asdict(result).items() if k not in ("history", "run_dir")},
    }
    if model_cfg.text_finetune_layers > 0:
        meta["item_texts"] = list(dataset.items[Col.TEXT])
    save_run(run, model, meta)
    _plot_learning_curve(run / "learning_curve.png", history, title=f"{dataset.name}: fine-tuning")
    return result


def _write_metrics_csv(path: Path, history: list[dict[str, float]]) -> None:
    keys = sorted({k for row in history for k in row}, key=lambda k: (k != "epoch", k))
    write_csv(path, history, keys)


def _plot_learning_curve(path: Path, history: list[dict[str, float]], *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(epochs, [r["train_loss"] for r in history], color="tab:blue", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train cross-entropy", color="tab:blue")
    ax2 = ax.twinx()
    ev = [(r["epoch"], r["valid_NDCG@10"]) for r in history if "valid_NDCG@10" in r]
    if ev:
        ax2.plot(*zip(*ev, strict=True), color="tab:orange", marker="o", ms=3, label="valid NDCG@10")
    ax2.set_ylabel("validation NDCG@10", color="tab:orange")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
