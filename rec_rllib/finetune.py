"""Fine-tuning :class:`~rec_rllib.models.seqrec.TextSeqRec` on next-item prediction.

Every position of every training window predicts the next item (SASRec's objective), with full-softmax
cross-entropy over the whole catalogue (or sampled softmax with a log-Q correction), AdamW, linear warm-up,
gradient clipping and early stopping on validation NDCG@10 (leave-one-out validation users, full ranking,
the shared evaluation). Long histories are cut into windows of ``max_len`` so every interaction is a target.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from rec_rllib.columns import Col, SplitScheme
from rec_rllib.config import DictConfig, none_or_str, setting
from rec_rllib.data.dataset import EvalCases, LogDataset
from rec_rllib.eval import metrics as M
from rec_rllib.eval.plots import pyplot
from rec_rllib.eval.ranking import EVAL_CHUNK_CELLS, evaluate_ranking, sample_cases, top_items
from rec_rllib.fsutil import write_csv
from rec_rllib.models.run import TransformerRecommender, build_model, save_run, warm_start
from rec_rllib.models.seqrec import BOS, OFFSET, ModelConfig, TextSeqRec

log = logging.getLogger(__name__)

PROGRESS_LINE_S = 30.0
"""Seconds between progress log lines when there is no terminal for a progress bar."""
IGNORE = -100


LOSSES = ("auto", "full", "sampled")


@dataclass
class FinetuneConfig(DictConfig):
    """Training settings. Defaults reach the quality in docs/model.md on 2 CPU cores."""

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
    """Cosine decay of the learning rate to 5% of ``lr`` over this many epochs after warm-up (0 =
    constant)."""
    grad_clip: float = 1.0
    """Gradient-norm clip (0 disables)."""
    loss: str = setting("auto", choices=LOSSES)
    """``full`` softmax over all items; ``sampled`` softmax over uniform and in-batch negatives, log-Q
    corrected, whose cost per step does not grow with the catalogue; ``auto``: full up to
    FULL_SOFTMAX_MAX_ITEMS (20,000) items, sampled above."""
    mask_history: bool = True
    """Leave items already in the window out of each position's softmax (as evaluation excludes seen
    items)."""
    num_negatives: int = 256
    """``sampled``: uniform draws over the catalogue per step (negatives shared by the whole batch)."""
    in_batch_negatives: int = 256
    """``sampled``: draws from the batch's own targets per step, as extra negatives (0 = uniform only)."""
    patience: int = 15
    """Stop after this many evaluations without a better validation NDCG@10."""
    eval_every: int = 2
    """Epochs between validation evaluations."""
    max_minutes: float = 15.0
    """Wall-clock budget of training and the final evaluation, checked every step: training stops in time
    for a last validation and the final evaluation to fit (best weights kept). Building the model (text
    embeddings, cached) comes before it."""
    valid_users: int = 10_000
    """Validation users evaluated while training (a fixed seeded sample; 0 = all). The best model is
    evaluated on every validation user at the end."""
    eval_every_minutes: float = 5.0
    """Also validate within an epoch once this many minutes (or a quarter of the budget, if shorter) passed
    since the last validation (0 = only at epoch ends): on a large log one epoch outlasts the budget."""
    min_epochs: int = 0
    """Evaluations before this epoch never trigger early stopping."""
    scheme: str = setting(SplitScheme.LEAVE_ONE_OUT, choices=tuple(SplitScheme.COLUMNS))
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
    init_from: str | None = setting(None, parse=none_or_str, metavar="RUN")
    """A fine-tuned run to start from instead of fresh weights (a warm start: the next round of a model on a
    grown log); its items matched by id, new items start fresh; the model settings must be the run's."""

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be 'auto', 'full' or 'sampled', got {self.loss!r}")
        if not 0.0 <= self.holdout_items < 1.0:
            raise ValueError(f"holdout_items must be in [0, 1), got {self.holdout_items}")
        if not 0.0 <= self.id_dropout < 1.0:
            raise ValueError(f"id_dropout must be in [0, 1), got {self.id_dropout}")
        self.check_numbers(
            at_least={
                "weight_decay": 0,
                "warmup_steps": 0,
                "decay_epochs": 0,
                "grad_clip": 0,
                "num_negatives": 1,
                "in_batch_negatives": 0,
                "patience": 1,
                "min_epochs": 0,
                "threads": 0,
                "valid_users": 0,
                "eval_every_minutes": 0,
            },
            above={"epochs": 0, "batch_size": 0, "eval_every": 0, "lr": 0, "max_minutes": 0},
        )


@dataclass
class FinetuneResult:
    run_dir: Path
    best_epoch: float
    best_valid_ndcg10: float
    epochs_run: float
    seconds: float
    seconds_per_epoch: float
    history: list[dict[str, float]] = field(default_factory=list)
    test_metrics: dict[str, float] = field(default_factory=dict)
    holdout: list[int] = field(default_factory=list)
    targets_per_second: float = 0.0
    """Training targets (next-item predictions) per second of training, evaluation excluded."""
    stopped_by: str = "epochs"
    """What ended training: ``epochs``, ``early stopping`` or ``budget``."""


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


def known_items(histories: list[np.ndarray], n_items: int) -> np.ndarray:
    """[n_items] 1.0 for the items that occur in training, 0.0 for the rest (they score by text alone)."""
    known = np.zeros(n_items, dtype=np.float32)
    for h in histories:
        known[h] = 1.0
    return known


def training_windows(
    histories: list[np.ndarray], max_len: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens [N, max_len+1], targets [N, max_len+1], lengths [N]) covering every interaction once as a
    target.

    A window is ``[BOS] + seq[s:e]``; the token at position p predicts ``seq[s + p]``. Only the first window
    of a user lets [BOS] predict (its first item); later windows start mid-history, so [BOS] is silent there.
    """
    return pad_windows(*window_rows(histories, max_len), width=max_len + 1)


def window_rows(histories: list[np.ndarray], max_len: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """(items, n_input, from_start) of every training window, cut from each history's end back in steps of
    ``max_len``: the window's input items followed by the item after them (when there is one);
    ``from_start`` marks a window that starts the user's history ([BOS] predicts its first item)."""
    items, n_input, from_start = [], [], []
    for seq in histories:
        end = len(seq)
        while end > 0:
            start = max(0, end - max_len)
            items.append(seq[start : end + 1])
            n_input.append(end - start)
            from_start.append(start == 0)
            end = start
    return items, np.asarray(n_input, dtype=np.int64), np.asarray(from_start, dtype=bool)


def pad_windows(
    items, n_input: np.ndarray, from_start: np.ndarray, *, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Windows of :func:`window_rows` -> right-padded (tokens [N, width], targets [N, width], lengths [N])."""
    tokens = np.zeros((len(items), width), dtype=np.int64)
    targets = np.full((len(items), width), IGNORE, dtype=np.int64)
    tokens[:, 0] = BOS
    for b, (seq, n) in enumerate(zip(items, n_input, strict=True)):
        seq = np.asarray(seq, dtype=np.int64)
        tokens[b, 1 : n + 1] = seq[:n] + OFFSET
        targets[b, 1 : len(seq)] = seq[1:]  # targets of the window's items (the last may have none)
        if from_start[b]:
            targets[b, 0] = seq[0]
    lengths = np.asarray(n_input, dtype=np.int64) + 1
    return torch.from_numpy(tokens), torch.from_numpy(targets), torch.from_numpy(lengths)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or name.endswith("bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


FULL_SOFTMAX_MAX_ITEMS = 20_000
"""``loss='auto'`` takes the full softmax up to this catalogue size and the sampled one above it: the full
softmax learns more per target (docs/scale.md), but its logits per step grow with the catalogue and pass what
one machine holds well before 100,000 items."""


def resolve_loss(loss: str, n_items: int) -> str:
    """``full`` or ``sampled``: ``loss`` itself, or for ``auto`` the choice by catalogue size."""
    if loss != "auto":
        return loss
    return "full" if n_items <= FULL_SOFTMAX_MAX_ITEMS else "sampled"


def log_not_target(histories: list[np.ndarray], n_items: int) -> torch.Tensor:
    """[n_items] log(1 - p_i), p_i = item i's share of the training targets: what the in-batch negatives'
    inclusion probabilities are computed from (one catalogue-sized vector, built once)."""
    counts = np.zeros(n_items, dtype=np.float64)
    for seq in histories:
        np.add.at(counts, seq, 1.0)
    p = counts / max(counts.sum(), 1.0)
    return torch.from_numpy(np.log1p(-np.minimum(p, 1.0 - 1e-12)))


def sample_candidates(
    y: torch.Tensor,
    n_items: int,
    cfg: FinetuneConfig,
    log_not_target: torch.Tensor | None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(candidates [C] sorted unique item indices, log inclusion probability [C]) for a sampled softmax.

    The candidates are ``cfg.num_negatives`` uniform draws over the catalogue plus ``cfg.in_batch_negatives``
    draws from the batch's own targets (in-batch negatives: draws from the data's item distribution, which
    the uniform ones rarely reach for popular items). An item's inclusion probability is
    ``1 - (1 - p_i)^K (1 - 1/n)^M`` (K in-batch draws, p_i the item's share of the training targets, M uniform
    draws over n items); subtracting its log from the item's logit is the log-Q correction that makes the sum
    over candidates a Horvitz-Thompson estimate of the full softmax's normaliser (without the positive).
    """
    uniform = torch.randint(0, n_items, (cfg.num_negatives,), generator=generator).to(y.device)
    log_miss_uniform = cfg.num_negatives * math.log1p(-1.0 / n_items) if n_items > 1 else -math.inf
    k = cfg.in_batch_negatives if log_not_target is not None else 0
    if k and len(y):
        picks = torch.randint(0, len(y), (k,), generator=generator).to(y.device)
        cand = torch.unique(torch.cat([y[picks], uniform]))
        log_miss = k * log_not_target.to(y.device, torch.float64)[cand] + log_miss_uniform
    else:
        cand = torch.unique(uniform)
        log_miss = torch.full(cand.shape, log_miss_uniform, dtype=torch.float64, device=y.device)
    log_incl = torch.log(-torch.expm1(log_miss)).float()  # log(1 - P(missed by every draw))
    return cand, log_incl


def next_item_loss(
    model: TextSeqRec,
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    targets: torch.Tensor,
    cfg: FinetuneConfig,
    generator: torch.Generator | None = None,
    *,
    loss: str | None = None,
    log_not_target: torch.Tensor | None = None,
    candidates: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Cross-entropy of the next item at every non-ignored position.

    ``loss`` (default: ``cfg.loss`` resolved by catalogue size) is ``full`` (every item in the softmax) or
    ``sampled`` (the candidates of :func:`sample_candidates`, or ``candidates`` given as (items, log
    inclusion probability); item representations are computed only for the batch's items and candidates).
    """
    loss = resolve_loss(loss or cfg.loss, model.n_items)
    if loss == "full":
        return _full_softmax_loss(model, tokens, lengths, targets, cfg, generator)
    keep = targets != IGNORE
    y = targets[keep]  # [N]
    if candidates is None:
        candidates = sample_candidates(y, model.n_items, cfg, log_not_target, generator)
    cand, log_incl = candidates
    # the items this batch touches: its windows' items, its targets, the candidates
    vocab = torch.unique(torch.cat([tokens[tokens >= OFFSET] - OFFSET, y, cand]))  # [V]
    id_keep = None
    if cfg.id_dropout > 0 and model.training and model.cfg.text_model is not None:
        p = torch.full((len(vocab),), 1.0 - cfg.id_dropout, device=tokens.device)
        id_keep = torch.bernoulli(p, generator=generator) if generator is not None else torch.bernoulli(p)
    rows = model.item_rows(vocab, id_keep)  # [V, H]
    local = torch.where(tokens >= OFFSET, torch.searchsorted(vocab, tokens - OFFSET) + OFFSET, tokens)
    hidden = model.encode(local, lengths, rows)  # [B, T, H]
    h = hidden[keep]  # [N, H]
    bias = model.bias[vocab] * model.known[vocab] * (1.0 if id_keep is None else id_keep)  # [V]
    y_local = torch.searchsorted(vocab, y)
    c_local = torch.searchsorted(vocab, cand)
    pos_logit = (h * rows[y_local]).sum(-1) + bias[y_local]  # [N]
    neg_logit = h @ rows[c_local].T + bias[c_local] - log_incl  # [N, C]
    drop = cand[None, :] == y[:, None]  # the position's own target is its positive, not a negative
    if cfg.mask_history:
        drop = drop | _seen_mask(local, keep, len(vocab), c_local)
    neg_logit = neg_logit.masked_fill(drop, float("-inf"))
    logits = torch.cat([pos_logit[:, None], neg_logit], dim=1)
    return nn.functional.cross_entropy(logits, torch.zeros(len(y), dtype=torch.long, device=h.device))


class NextItemLoss(nn.Module):
    """The model and its training objective as one module whose ``forward`` returns the loss: what Ray
    Train's DistributedDataParallel wraps (its gradient hooks follow a ``forward`` call)."""

    def __init__(self, model: TextSeqRec, cfg: FinetuneConfig, log_not_target: torch.Tensor | None = None):
        super().__init__()
        self.model, self.cfg = model, cfg
        self.loss_kind = resolve_loss(cfg.loss, model.n_items)
        self.log_not_target = log_not_target if self.loss_kind == "sampled" else None

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return next_item_loss(
            self.model,
            tokens,
            lengths,
            targets,
            self.cfg,
            loss=self.loss_kind,
            log_not_target=self.log_not_target,
        )


def _full_softmax_loss(
    model: TextSeqRec,
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    targets: torch.Tensor,
    cfg: FinetuneConfig,
    generator: torch.Generator | None,
) -> torch.Tensor:
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
    logits = h @ items.T + bias  # [N, n_items]
    if cfg.mask_history:
        seen = _seen_mask(tokens, keep, model.n_items)  # [N, n_items]
        seen[torch.arange(len(y), device=y.device), y] = False  # a repeated item stays a valid target
        logits = logits.masked_fill(seen, float("-inf"))
    return nn.functional.cross_entropy(logits, y)


def _seen_mask(
    tokens: torch.Tensor, keep: torch.Tensor, n_items: int, columns: torch.Tensor | None = None
) -> torch.Tensor:
    """[N, n_items] bool for the N kept positions: item i occurs at or before that position of its window.
    ``columns`` ([C] item indices) keeps only those columns ([N, C]) without building the wide mask."""
    b, t = tokens.shape
    first = torch.full((b, n_items + OFFSET), t, dtype=torch.long, device=tokens.device)
    positions = torch.arange(t, device=tokens.device).expand(b, t)
    first.scatter_reduce_(1, tokens, positions, reduce="amin")  # first position of each token per window
    rows, cols = keep.nonzero(as_tuple=True)  # same order as hidden[keep]
    if columns is not None:
        return first[rows[:, None], columns[None, :] + OFFSET] <= cols[:, None]
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
    known = known_items(histories, dataset.n_items)
    tokens, targets, lengths = training_windows(histories, model_cfg.max_len)
    loss_kind = resolve_loss(cfg.loss, dataset.n_items)
    n_targets = int((targets != IGNORE).sum())
    log.info(
        "%d users, %d windows, %d training targets, %d items (%d held out); %s softmax",
        len(histories),
        len(tokens),
        n_targets,
        dataset.n_items,
        len(holdout),
        loss_kind,
    )

    t_build = time.perf_counter()
    model = build_model(model_cfg, list(dataset.items[Col.TEXT]), known_items=known)
    if cfg.init_from:
        carried = warm_start(model, cfg.init_from, list(map(str, dataset.items[Col.ITEM_ID])))
        log.info("warm start from %s: %d items carried over, %d new", cfg.init_from, *carried.values())
    model = model.to(device)
    log.info(
        "model built in %.1fs: %s parameters",
        time.perf_counter() - t_build,
        f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,}",
    )
    objective = NextItemLoss(
        model, cfg, log_not_target(histories, dataset.n_items) if loss_kind == "sampled" else None
    )
    steps_per_epoch = math.ceil(len(tokens) / cfg.batch_size)
    opt, sched = make_optimizer(model, cfg, steps_per_epoch)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    test_cases = dataset.eval_cases(cfg.scheme, "test")
    validator = Validator(TransformerRecommender(model), dataset, cfg, n_final=len(test_cases))

    def epoch_batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(tokens), generator=gen)
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            width = int(lengths[idx].max())
            yield tokens[idx, :width], lengths[idx], targets[idx, :width]

    def step(batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> float:
        tok, lens, tgt = (x.to(device) for x in batch)
        loss = objective(tok, lens, tgt)
        apply_gradients(loss, model, opt, sched, cfg.grad_clip)
        return loss.item()

    loop = TrainingLoop(cfg, steps_per_epoch, n_targets, validator, lambda: model.state_dict())
    log.info(
        "budget %.1f min, of which about %.0f s kept for the last validation and the final evaluation; "
        "%d steps an epoch",
        cfg.max_minutes,
        validator.reserve_seconds(),
        steps_per_epoch,
    )
    loop.run(
        epoch_batches, step, model=model, lr=lambda: sched.get_last_lr()[0], metrics_csv=run / "metrics.csv"
    )
    if loop.best_state is not None:
        model.load_state_dict(loop.best_state)
    model.eval()
    valid_ndcg = validator.final_valid_ndcg(loop.best[0])
    test = evaluate_ranking(
        TransformerRecommender(model), dataset, scheme=cfg.scheme, split="test", cases=test_cases
    ).metrics
    seconds = time.perf_counter() - loop.t0
    result = FinetuneResult(
        run,
        loop.best[1],
        valid_ndcg,
        loop.epochs_run,
        seconds,
        loop.train_seconds / max(loop.epochs_done, 1e-9),
        loop.history,
        test,
        holdout.tolist(),
        n_targets * loop.epochs_done / max(loop.train_seconds, 1e-9),
        loop.stopped_by,
    )
    write_run(run, model, cfg, dataset, result, loss_kind, dataset_ref=dataset_ref, title="fine-tuning")
    log.info(
        "done in %.1f min: best epoch %s, valid NDCG@10 %.4f, test NDCG@10 %.4f HR@10 %.4f",
        seconds / 60,
        loop.best[1],
        valid_ndcg,
        test["NDCG@10"],
        test["HR@10"],
    )
    return result


def apply_gradients(
    loss: torch.Tensor,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    grad_clip: float,
) -> None:
    """One optimiser step on ``loss``: gradients, norm clipping (0 = none), AdamW, the schedule."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    sched.step()


def make_optimizer(
    model: nn.Module, cfg: FinetuneConfig, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with linear warm-up, then a cosine decay to 5% of ``lr`` over ``decay_epochs`` epochs."""
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr)

    def lr_factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if not cfg.decay_epochs:
            return 1.0
        frac = min(1.0, (step - cfg.warmup_steps) / (cfg.decay_epochs * steps_per_epoch))
        return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * frac))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)


class Validator:
    """Validation NDCG@10 / HR@10 while training, on a fixed sample of at most ``cfg.valid_users`` users, and
    an estimate of what the final evaluation will cost (so the time budget can leave room for it)."""

    def __init__(
        self,
        recommender: TransformerRecommender,
        dataset: LogDataset | None,
        cfg: FinetuneConfig,
        *,
        n_final: int,
        cases: EvalCases | None = None,
        n_valid: int | None = None,
    ):
        self.recommender, self.dataset, self.cfg = recommender, dataset, cfg
        self.full_cases: EvalCases | None = None  # every validation user, kept for the final figure
        if cases is None:
            self.full_cases = dataset.eval_cases(cfg.scheme, "valid")
            n_valid, cases = (
                len(self.full_cases),
                sample_cases(self.full_cases, cfg.valid_users, seed=cfg.seed),
            )
        self.cases, self.n_valid = cases, n_valid if n_valid is not None else len(cases)
        self.sampled = len(self.cases) < self.n_valid
        self.n_final = n_final + (self.n_valid if self.sampled else 0)
        self.matrix_seconds = 0.0
        """Seconds to compute the item matrix once (the text tower over the catalogue), paid once per set
        of weights rather than per user."""
        self.paces: list[float] = [self._time_a_chunk()]
        """Seconds per user of every scoring measured so far: the warm chunk at the start, then each
        validation."""

    def _time_item_matrix(self) -> None:
        item_matrix = getattr(self.recommender, "item_matrix", None)
        if item_matrix is not None:
            t = time.perf_counter()
            item_matrix()
            self.matrix_seconds = time.perf_counter() - t

    def _time_a_chunk(self) -> float:
        """Seconds per user of scoring, from a chunk of users after a warm-up (the first call pays one-time
        costs that would make the budget's reserve far too large)."""
        chunk = max(1, min(512, EVAL_CHUNK_CELLS // max(self.recommender.n_items, 1)))  # as evaluation
        histories = self.cases.histories[:chunk]
        self._time_item_matrix()
        top_items(self.recommender, histories, 10)
        t = time.perf_counter()
        top_items(self.recommender, histories, 10)
        return (time.perf_counter() - t) / max(len(histories), 1)

    def __call__(self) -> dict[str, float]:
        self._time_item_matrix()
        t = time.perf_counter()
        top = top_items(self.recommender, self.cases.histories, 10)
        m = M.per_user_ranking_metrics(top, self.cases.targets, 10)
        self.paces.append((time.perf_counter() - t) / max(len(self.cases), 1))
        return {"valid_NDCG@10": float(m["NDCG"].mean()), "valid_HR@10": float(m["HR"].mean())}

    @property
    def seconds_per_user(self) -> float:
        """The pace the reserve is priced at: the mean of every pace measured. One validation's pace drifts
        by about a tenth with what else the machine is doing, and at a large scale the reserve is about half
        the budget, so a single measurement would move the stop by several percent of the budget."""
        return float(np.mean(self.paces))

    def reserve_seconds(self) -> float:
        """Seconds to keep for the stop: one more sampled validation, then the final evaluation of the best
        weights (every user at :attr:`seconds_per_user`, plus the item matrix for each of the two sets of
        weights, and a few seconds to write the run)."""
        users = len(self.cases) + self.n_final
        return self.seconds_per_user * users + 2 * self.matrix_seconds + 5.0

    def final_valid_ndcg(self, sampled_best: float) -> float:
        """The best model's validation NDCG@10 on every validation user (the sample's figure when it held
        them all)."""
        if not self.sampled or self.dataset is None:
            return sampled_best
        res = evaluate_ranking(
            self.recommender,
            self.dataset,
            scheme=self.cfg.scheme,
            split="valid",
            ks=(10,),
            beyond_accuracy=False,
            cases=self.full_cases,
        )
        return res.metrics["NDCG@10"]


class TrainingLoop:
    """Epochs of steps under a wall-clock budget checked every step, validation every ``eval_every`` epochs
    (and every ``eval_every_minutes`` within a long epoch), early stopping, a progress bar over steps and one
    log line per validation. Shared by the single process and each Ray Train worker (``agree`` makes every
    worker take the same decision; ``chief`` is the one that validates, logs and shows progress)."""

    def __init__(
        self,
        cfg: FinetuneConfig,
        steps_per_epoch: int,
        targets_per_epoch: int,
        validator: Validator | None,
        state: Callable[[], dict[str, torch.Tensor]],
        *,
        chief: bool = True,
        agree: Callable[[bool], bool] = lambda stop: stop,
        on_eval: Callable[[dict[str, float], bool], None] | None = None,
    ):
        self.cfg, self.steps_per_epoch, self.targets_per_epoch = cfg, steps_per_epoch, targets_per_epoch
        self.validator, self.state, self.chief, self.agree = validator, state, chief, agree
        self.on_eval = on_eval
        """Called on every worker after each validation point with the row and whether it was the best."""
        self.history: list[dict[str, float]] = []
        self.best: tuple[float, float] = (-1.0, 0)
        self.best_state: dict[str, torch.Tensor] | None = None
        self.bad_evals = 0
        self.t0 = time.perf_counter()
        self.train_seconds = 0.0
        self.epochs_done = 0.0
        self.epochs_run: float = 0
        self.stopped_by = "epochs"
        self.validated = False
        """Whether a validation ran (and so measured the pace the budget's reserve is computed from)."""

    def eval_interval_minutes(self) -> float:
        """Minutes between validations inside an epoch: ``eval_every_minutes``, or a quarter of the budget
        when that is shorter (so even a short run validates, and the budget's reserve is measured, not
        guessed, before the stop)."""
        return min(self.cfg.eval_every_minutes, self.cfg.max_minutes / 4)

    def budget_left(self) -> float:
        reserve = self.validator.reserve_seconds() if self.validator is not None else 0.0
        return self.cfg.max_minutes * 60 - (time.perf_counter() - self.t0) - reserve

    def run(
        self,
        epoch_batches: Callable[[int], Iterator[Any]],
        step: Callable[[Any], float],
        *,
        model: nn.Module,
        lr: Callable[[], float],
        metrics_csv: Path | None,
    ) -> None:
        cfg = self.cfg
        show = cfg.progress and self.chief
        # a progress bar on a terminal; elsewhere (a Ray task or job, a log file: no terminal to redraw a bar
        # on, and a bar's carriage returns reach the log only at the end) a log line every PROGRESS_LINE_S
        terminal = sys.stderr.isatty()
        bar = tqdm(
            total=cfg.epochs * self.steps_per_epoch,
            desc="finetune",
            unit="step",
            disable=not (show and terminal),
            bar_format="{desc}: {n_fmt} steps [{elapsed}, {rate_fmt}{postfix}]",
            mininterval=1.0,
        )
        self._lines = show and not terminal
        self._last_line = time.perf_counter()
        last_eval = time.perf_counter()
        with logging_redirect_tqdm():
            for epoch in range(1, cfg.epochs + 1):
                model.train()
                losses: list[float] = []
                te = time.perf_counter()
                stop, n = False, 0
                for n, batch in enumerate(epoch_batches(epoch), start=1):
                    losses.append(step(batch))
                    bar.update(1)
                    done = (epoch - 1) + n / self.steps_per_epoch
                    self._postfix(bar, losses, done, time.perf_counter() - te, n)
                    stop = self.agree(self.budget_left() <= 0)
                    if stop and not self.validated and n < self.steps_per_epoch:
                        stop = (
                            False  # the reserve is still an estimate from one chunk: validate to measure it
                        )
                        due = True
                    elif stop:
                        self._log_stop()
                        break
                    else:
                        since = time.perf_counter() - last_eval
                        due = bool(cfg.eval_every_minutes) and since >= 60 * self.eval_interval_minutes()
                    if self.agree(due) and n < self.steps_per_epoch:
                        self.train_seconds += time.perf_counter() - te
                        self._row(done, losses, lr(), model, evaluate=True)
                        last_eval, te, losses = time.perf_counter(), time.perf_counter(), []
                        model.train()
                self.train_seconds += time.perf_counter() - te
                self.epochs_done = (epoch - 1) + (n / self.steps_per_epoch if stop else 1.0)
                self.epochs_run = epoch
                evaluate = stop or epoch % cfg.eval_every == 0 or epoch == cfg.epochs
                self._row(self.epochs_done, losses, lr(), model, evaluate=evaluate)
                if evaluate:
                    last_eval = time.perf_counter()
                if metrics_csv is not None and self.chief:
                    _write_metrics_csv(metrics_csv, self.history)
                if stop:
                    self.stopped_by = "budget"
                    break
                if self.agree(self.bad_evals >= cfg.patience):
                    self.stopped_by = "early stopping"
                    break
        bar.close()

    def _log_stop(self) -> None:
        if self.chief and self.validator is not None:
            v = self.validator
            log.info(
                "time budget: stopping at %.0f s of %.0f; %.0f s kept for the last validation and the final "
                "evaluation (%d users at %.2f ms each)",
                time.perf_counter() - self.t0,
                self.cfg.max_minutes * 60,
                v.reserve_seconds(),
                len(v.cases) + v.n_final,
                1e3 * v.seconds_per_user,
            )

    def _postfix(self, bar: tqdm, losses: list[float], done: float, seconds: float, steps: int) -> None:
        line_due = self._lines and time.perf_counter() - self._last_line >= PROGRESS_LINE_S
        if (not bar.disable and (steps % 10 == 0 or steps == 1)) or line_due:
            rate = steps * self.targets_per_epoch / self.steps_per_epoch / max(seconds, 1e-9)
            left_epochs = (self.cfg.epochs - done) * self.steps_per_epoch * seconds / steps
            eta = max(0.0, min(self.budget_left(), left_epochs))
            said = (
                f"epoch {done:.2f}, loss {np.mean(losses[-50:]):.3f}, {rate:,.0f} targets/s, "
                f"best valid NDCG@10 {max(self.best[0], 0):.4f}, ETA {tqdm.format_interval(eta)}"
            )
            if line_due:
                step, total = round(done * self.steps_per_epoch), self.cfg.epochs * self.steps_per_epoch
                log.info("step %d of at most %d: %s", step, total, said)
                self._last_line = time.perf_counter()
            else:
                bar.set_postfix_str(said, refresh=False)

    def _row(self, epoch: float, losses: list[float], lr: float, model: nn.Module, *, evaluate: bool) -> None:
        row: dict[str, float] = {
            "epoch": round(epoch, 4) if epoch != int(epoch) else int(epoch),
            "train_loss": float(np.mean(losses)) if losses else float("nan"),
            "lr": lr,
            "seconds": time.perf_counter() - self.t0,
        }
        improved = False
        self.validated = self.validated or evaluate
        if evaluate and self.validator is not None:
            model.eval()
            t = time.perf_counter()
            row.update(self.validator())
            improved = row["valid_NDCG@10"] > self.best[0]
            if improved:
                self.best = (row["valid_NDCG@10"], row["epoch"])
                self.best_state = {k: v.detach().clone() for k, v in self.state().items()}
                self.bad_evals = 0
            elif epoch >= self.cfg.min_epochs:
                self.bad_evals += 1
            log.info(
                "epoch %s: train loss %.4f, valid NDCG@10 %.4f HR@10 %.4f (%d users, %.1fs)%s",
                row["epoch"],
                row["train_loss"],
                row["valid_NDCG@10"],
                row["valid_HR@10"],
                len(self.validator.cases),
                time.perf_counter() - t,
                " best" if improved else "",
            )
        self.history.append(row)
        if evaluate and self.on_eval is not None:
            self.on_eval(row, improved)


def write_run(
    run: Path,
    model: TextSeqRec,
    cfg: FinetuneConfig,
    dataset: LogDataset,
    result: FinetuneResult,
    loss_kind: str,
    *,
    dataset_ref: str | None,
    title: str,
    extra: dict[str, Any] | None = None,
) -> None:
    """The run directory: weights, item tables, the resolved settings and results (config.json),
    metrics.csv and learning_curve.png: what evaluation, RL training and serving read."""
    meta = {
        "train": asdict(cfg),
        "loss": loss_kind,
        **(extra or {}),
        "dataset": {
            "name": dataset.name,
            "ref": dataset_ref,
            "content_hash": dataset.manifest.get("content_hash"),
        },
        "item_ids": list(map(str, dataset.items[Col.ITEM_ID])),
        "holdout_items": list(result.holdout),
        "result": {k: v for k, v in asdict(result).items() if k not in ("history", "run_dir")},
    }
    if model.cfg.text_finetune_layers > 0:
        meta["item_texts"] = list(dataset.items[Col.TEXT])
    save_run(run, model, meta)
    _write_metrics_csv(run / "metrics.csv", result.history)
    _plot_learning_curve(run / "learning_curve.png", result.history, title=f"{dataset.name}: {title}")


def _write_metrics_csv(path: Path, history: list[dict[str, float]]) -> None:
    keys = sorted({k for row in history for k in row}, key=lambda k: (k != "epoch", k))
    write_csv(path, history, keys)


def _plot_learning_curve(path: Path, history: list[dict[str, float]], *, title: str) -> None:
    plt = pyplot()

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
