"""Exploration strategies, shared by RL sampling and serving. Each reports the propensity of what it chose.

A strategy turns a policy's scores (logits) over the allowed items into a *behaviour distribution*; the
chosen item is drawn from it and its probability is the propensity that off-policy estimators need. The
same distribution, as log-probabilities, is what the RLModule hands RLlib in ``_forward_exploration``, so
the log-probabilities RLlib records for importance weighting (PPO ratios, V-trace) are the true behaviour
probabilities.

* ``greedy`` — the arg-max, propensity 1.
* ``epsilon`` — epsilon-greedy: uniform over allowed items with probability epsilon, else the arg-max;
  epsilon decays linearly from ``epsilon`` to ``epsilon_final`` over ``decay_steps``.
* ``boltzmann`` — softmax(scores / T); T is annealed geometrically from ``temperature`` to
  ``temperature_final`` (a simulated-annealing schedule: hot early, greedy late).
* ``thompson`` — Thompson-style sampling with MC dropout: the model scores with dropout active (one
  posterior sample; the caller draws it) and acts by the annealed Boltzmann rule on that sample. The
  propensity is the probability given the sample; since the dropout mask is drawn independently of the
  action, pi(a) / mu_mask(a) is an unbiased importance weight, as the marginal over masks would be.
* ``ucb`` — upper confidence bound on the final layer (disjoint LinUCB): item i's bonus is
  ``alpha * sqrt(u^T A_i^-1 u)`` for the unit user state u, with ``A_i`` the ridge Gram matrix of the
  states the item was shown to; the arg-max of scores + bonus is shown (deterministic given the state and the
  statistics, so propensity 1). The policy's score is the mean, so the statistics need only what was
  shown, not its reward. :class:`LinUCB` keeps them (RL training: the learner, for all env runners, synced to
  them with the weights; serving: each replica its own).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rec_rllib.config import DictConfig, setting

STRATEGIES = ("greedy", "epsilon", "boltzmann", "thompson", "ucb")
NEG_INF = -1e9


@dataclass
class ExplorationConfig(DictConfig):
    """Which exploration strategy and its schedule."""

    config_label = "exploration config"

    strategy: str = setting("boltzmann", flag="exploration", choices=STRATEGIES)
    """One of greedy, epsilon, boltzmann, thompson, ucb."""
    epsilon: float = 0.1
    """Initial exploration probability of ``epsilon``."""
    epsilon_final: float = 0.01
    """Final exploration probability after ``decay_steps``."""
    temperature: float = 1.0
    """Initial Boltzmann temperature (1 = the policy's own softmax)."""
    temperature_final: float = 0.5
    """Final temperature after ``decay_steps`` (geometric annealing)."""
    decay_steps: int = 100_000
    """Environment steps (or requests) over which epsilon / temperature are annealed."""
    ucb_alpha: float = 0.5
    """Width of the UCB bonus, in score units: what an item never shown in the user's direction gains."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown exploration strategy {self.strategy!r}; expected one of {STRATEGIES}")
        if not (0.0 <= self.epsilon_final <= 1.0 and 0.0 <= self.epsilon <= 1.0):
            raise ValueError(f"epsilon values must be in [0, 1], got {self.epsilon}, {self.epsilon_final}")
        if self.temperature <= 0 or self.temperature_final <= 0:
            raise ValueError("temperatures must be positive")
        if self.ucb_alpha < 0:
            raise ValueError(f"ucb_alpha must be >= 0, got {self.ucb_alpha}")

    def epsilon_at(self, step: int) -> float:
        frac = min(1.0, max(0, step) / max(1, self.decay_steps))
        return self.epsilon + frac * (self.epsilon_final - self.epsilon)

    def temperature_at(self, step: int) -> float:
        frac = min(1.0, max(0, step) / max(1, self.decay_steps))
        return self.temperature * (self.temperature_final / self.temperature) ** frac


def _masked(scores: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    return scores if allowed is None else scores.masked_fill(~allowed.bool(), NEG_INF)


def behaviour_log_probs(
    scores: torch.Tensor, cfg: ExplorationConfig, step: int = 0, allowed: torch.Tensor | None = None
) -> torch.Tensor:
    """[B, n] log-probabilities of the behaviour distribution for greedy/epsilon/boltzmann.

    Thompson and UCB transform the *scores* first (a dropout sample; scores + bonus) and then act through
    the greedy or Boltzmann rule: pass the transformed scores here.
    """
    s = _masked(scores.float(), allowed)
    legal = s > NEG_INF / 2
    if cfg.strategy in ("boltzmann", "thompson"):
        return torch.log_softmax(s / cfg.temperature_at(step), dim=-1).masked_fill(~legal, -torch.inf)
    onehot = torch.nn.functional.one_hot(s.argmax(dim=-1), s.shape[-1]).to(s.dtype)
    eps = cfg.epsilon_at(step) if cfg.strategy == "epsilon" else 0.0
    n_legal = legal.sum(dim=-1, keepdim=True).clamp(min=1)
    probs = (1 - eps) * onehot + eps * legal.to(s.dtype) / n_legal
    return torch.log(probs)


def sample_slate(
    log_probs: torch.Tensor,
    k: int,
    generator: torch.Generator | None = None,
    *,
    normalise: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw k distinct items per row without replacement (Plackett-Luce), in one shot.

    Returns (items [B, k], propensities [B, k]): propensity[b, j] is the probability of drawing that item
    at position j given the items above it (for k=1, the behaviour probability itself). ``normalise``:
    ``log_probs`` are logits (-inf where an item may not be drawn), the distribution their softmax; only their
    log-normaliser is computed, not the log-probabilities of every item (a Boltzmann answer over a large
    catalogue: the same draws as from :func:`behaviour_log_probs`, in fewer passes over the catalogue).

    Gumbel-top-k: the k largest of ``log_probs + Gumbel noise`` are distributed exactly as k sequential
    draws without replacement (Vieira 2014; Kool et al., ICML 2019), so one ``topk`` replaces k softmax +
    multinomial rounds; the conditional propensities follow in closed form,
    p(i_j) / (1 - p(i_1) - ... - p(i_{j-1})). The noise, ``-log(-log U)`` with U uniform, is drawn in single
    precision (the catalogue-wide part of an answer: one uniform draw and two logarithms per item); the
    propensities are computed in double precision for the k drawn items only.
    """
    lp = log_probs.detach().float()
    b, n = lp.shape
    if k > n:
        raise ValueError(f"k={k} exceeds the number of items {n}")
    u = torch.rand(lp.shape, generator=generator, device=lp.device, dtype=torch.float32)
    keys = lp - u.clamp_(min=1e-38).log_().neg_().log_()  # lp + Gumbel noise
    top = torch.topk(keys, k, dim=1)
    if not torch.isfinite(top.values).all():
        raise ValueError(f"fewer than k={k} items have a positive probability in some row")
    chosen = lp.gather(1, top.indices)
    if normalise:
        chosen = chosen - torch.logsumexp(lp, dim=1, keepdim=True)
    chosen = chosen.double().exp()
    above = torch.cumsum(chosen, dim=1) - chosen  # probability mass already drawn above position j
    props = (chosen / (1.0 - above).clamp(min=1e-300)).clamp(max=1.0)
    return top.indices, props


def _draw_sequentially(
    state: torch.Tensor, k: int, probs, removed: float, generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """k draws without replacement: at each position, draw from ``probs(state)``, record the probability
    of the drawn item, then set its entry of ``state`` to ``removed``."""
    b, n = state.shape
    if k > n:
        raise ValueError(f"k={k} exceeds the number of items {n}")
    items = torch.zeros(b, k, dtype=torch.long, device=state.device)
    props = torch.zeros(b, k, dtype=torch.float64, device=state.device)
    rows = torch.arange(b, device=state.device)
    for j in range(k):
        p = probs(state)
        pick = torch.multinomial(p, 1, generator=generator).squeeze(1)
        items[:, j] = pick
        props[:, j] = p[rows, pick].double()
        state[rows, pick] = removed
    return items, props


def epsilon_slate(
    scores: torch.Tensor,
    k: int,
    epsilon: float,
    allowed: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Epsilon-greedy slates: each position is the best remaining item with probability 1 - epsilon, else
    a uniformly random remaining one. Returns (items [B, k], propensities [B, k]) where propensity[b, j] is
    the probability of that item at position j given the items above it."""
    s = _masked(scores.detach().float().clone(), allowed)

    def probs(state: torch.Tensor) -> torch.Tensor:
        legal = state > NEG_INF / 2
        p = epsilon * legal.double() / legal.sum(-1, keepdim=True).clamp(min=1)
        p[torch.arange(len(state), device=state.device), state.argmax(-1)] += 1 - epsilon
        return p

    return _draw_sequentially(s, k, probs, NEG_INF, generator)


class LinUCB:
    """Disjoint LinUCB statistics on the final layer: one ridge Gram matrix per item over the user states it
    was shown to (Li et al., WWW 2010), the policy's score standing in for the item's estimated mean.
    States are scaled to unit length first, so ``alpha`` is in the units of the scores: an item never
    shown in a state's direction gets ``alpha / sqrt(ridge)``, one shown n times there about
    ``alpha / sqrt(ridge + n)``.

    ``diagonal=True`` (the default) keeps only each Gram matrix's diagonal, the approximation NeuralUCB and
    NeuralTS use at scale (Zhou et al., ICML 2020; Zhang et al., ICLR 2021): O(n·d) memory and one [B, d] x
    [d, n] product per batch. The full matrices cost O(n·d²) memory (220 MB for 1,682 items at d = 128) and
    B·n·d² per batch; both are exact when the states are axis-aligned.

    ``a_diag`` (diagonal only): keep the statistics in a given [n, d] tensor, updated in place (of any float
    dtype and device; e.g. an RLModule buffer, so they travel with its weights and checkpoints).
    """

    def __init__(
        self,
        n_items: int,
        dim: int,
        *,
        alpha: float = 0.5,
        ridge: float = 1.0,
        diagonal: bool = True,
        a_diag: torch.Tensor | None = None,
    ):
        if alpha < 0 or ridge <= 0:
            raise ValueError(f"LinUCB needs alpha >= 0 and ridge > 0, got alpha={alpha}, ridge={ridge}")
        self.alpha = alpha
        self.ridge = ridge
        self.diagonal = diagonal
        self.shown = 0
        """(state, item) pairs recorded so far."""
        if a_diag is not None:
            if not diagonal or tuple(a_diag.shape) != (n_items, dim):
                raise ValueError(
                    f"a_diag must be the [{n_items}, {dim}] diagonal statistics, got {tuple(a_diag.shape)}"
                )
            self.a_diag = a_diag
        elif diagonal:
            self.a_diag = torch.full((n_items, dim), ridge, dtype=torch.float64)  # [n, d]
        else:
            self.a_inv = (torch.eye(dim, dtype=torch.float64) / ridge).expand(n_items, dim, dim).clone()

    @property
    def n_items(self) -> int:
        return (self.a_diag if self.diagonal else self.a_inv).shape[0]

    def bonus(self, states: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """[B, d] -> [B, n] exploration bonus alpha * sqrt(u^T A_i^-1 u), u = s / |s|; with ``items`` [B, K]
        (diagonal statistics), the bonus of those items only, [B, K]."""
        s = self._unit(states)
        if items is not None:
            if not self.diagonal:
                raise ValueError("the bonus of given items needs the diagonal statistics")
            rows = self.a_diag[items.to(self.a_diag.device).long()].reciprocal().to("cpu", torch.float64)
            quad = (rows * (s * s)[:, None, :]).sum(-1)  # [B, K]
        elif self.diagonal:
            quad = (s * s) @ self.a_diag.reciprocal().to("cpu", torch.float64).T
        else:
            quad = torch.einsum("bd,nde,be->bn", s, self.a_inv, s)
        return (self.alpha * quad.clamp(min=0.0).sqrt()).to(states.dtype).to(states.device)

    def update(self, states: torch.Tensor, items: torch.Tensor, *, weight: float = 1.0) -> None:
        """Record that row b's items ([B] or [B, k]) were shown to state b: A_i += s s^T for each pair
        (Sherman-Morrison on the inverse for the full matrices); ``weight`` counts each pair that many times
        (diagonal only: e.g. a sample standing for several)."""
        s = self._unit(states)
        items = torch.as_tensor(items).reshape(len(s), -1).cpu()
        rows = s.repeat_interleave(items.shape[1], dim=0)
        flat = items.reshape(-1)
        self.shown += len(flat)
        if self.diagonal:
            a = self.a_diag
            a.index_add_(0, flat.to(a.device), (weight * rows * rows).to(a.device, a.dtype))
            return
        if weight != 1.0:
            raise ValueError("weighted updates need the diagonal statistics")
        for row, i in zip(rows, flat.tolist(), strict=True):
            a = self.a_inv[i]
            v = a @ row
            self.a_inv[i] = a - torch.outer(v, v) / (1.0 + row @ v)

    @staticmethod
    def _unit(states: torch.Tensor) -> torch.Tensor:
        s = states.detach().double().cpu()
        return s / s.norm(dim=-1, keepdim=True).clamp(min=1e-12)

    def add_items(self, n_new: int) -> None:
        """Items added at run time start with the prior (never shown)."""
        if n_new <= 0:
            return
        if self.diagonal:
            a = self.a_diag
            fresh = torch.full((n_new, a.shape[1]), self.ridge, dtype=a.dtype, device=a.device)
            self.a_diag = torch.cat([self.a_diag, fresh])
        else:
            d = self.a_inv.shape[1]
            fresh = (torch.eye(d, dtype=torch.float64) / self.ridge).expand(n_new, d, d)
            self.a_inv = torch.cat([self.a_inv, fresh])


def entropy(log_probs: torch.Tensor) -> float:
    """Mean entropy (nats) of rows of log-probabilities."""
    p = log_probs.exp()
    return float(-(p * log_probs.nan_to_num(0.0, neginf=0.0)).sum(dim=-1).mean())
