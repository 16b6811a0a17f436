"""Exploration strategies: the propensities they report are the probabilities they sample with."""

from __future__ import annotations

import pytest
import torch

from rec_rllib.explore import ExplorationConfig, LinUCB, behaviour_log_probs, epsilon_slate, sample_slate


def _empirical_first(draw, n_draws: int = 4000) -> tuple[torch.Tensor, torch.Tensor]:
    firsts, props = [], []
    for _ in range(n_draws):
        items, p = draw()
        firsts.append(items[0, 0])
        props.append(p[0, 0])
    return torch.stack(firsts), torch.stack(props)


def test_boltzmann_slate_propensities_match_sampling_frequencies():
    torch.manual_seed(0)
    scores = torch.tensor([[2.0, 1.0, 0.0, -1.0, -50.0]])
    allowed = torch.tensor([[True, True, True, True, False]])
    cfg = ExplorationConfig(strategy="boltzmann", temperature=1.0, temperature_final=1.0)
    lp = behaviour_log_probs(scores, cfg, allowed=allowed)
    firsts, props = _empirical_first(lambda: sample_slate(lp, 3))
    expected = torch.softmax(scores[0, :4], -1)
    for item in range(4):
        freq = (firsts == item).float().mean()
        assert abs(freq - expected[item]) < 0.03  # 4000 draws: sd <= 0.008
        if (firsts == item).any():
            assert torch.allclose(
                props[firsts == item].float(), expected[item].expand((firsts == item).sum())
            )
    assert not (firsts == 4).any()  # a masked item is never shown


def test_boltzmann_slate_later_positions_follow_plackett_luce():
    """Position 2 given position 1: frequencies and reported propensities both equal p_j / (1 - p_i)."""
    gen = torch.Generator().manual_seed(3)
    scores = torch.tensor([[1.5, 1.0, 0.2, -0.5, -50.0]])
    allowed = torch.tensor([[True, True, True, True, False]])
    cfg = ExplorationConfig(strategy="boltzmann", temperature=1.0, temperature_final=1.0)
    lp = behaviour_log_probs(scores, cfg, allowed=allowed).expand(20_000, -1)
    items, props = sample_slate(lp, 3, generator=gen)
    p = torch.softmax(scores[0, :4], -1).double()
    assert (items < 4).all() and all(len(set(row)) == 3 for row in items.tolist())
    for first in range(4):
        rows = items[:, 0] == first
        for second in range(4):
            if second == first:
                continue
            expected = p[second] / (1 - p[first])
            pair = rows & (items[:, 1] == second)
            # 20,000 draws: the conditional frequency's sd is < 0.012 for every first item (>= 1,500 rows)
            assert abs(pair.sum() / rows.sum() - expected) < 0.05
            assert torch.allclose(props[pair, 1], expected.expand(int(pair.sum())))
    third = props[:, 2]
    i0, i1, i2 = items[:, 0], items[:, 1], items[:, 2]
    assert torch.allclose(third, p[i2] / (1 - p[i0] - p[i1]))


def test_epsilon_slate_positions_and_propensities():
    torch.manual_seed(1)
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    items, props = epsilon_slate(scores, 5, epsilon=0.0)
    assert items.tolist() == [[0, 1, 2, 3, 4]] and torch.all(props == 1)
    firsts, p = _empirical_first(lambda: epsilon_slate(scores, 2, epsilon=0.5))
    assert abs((firsts == 0).float().mean() - 0.6) < 0.03  # 1 - eps + eps / 5
    assert torch.allclose(p[firsts == 0], torch.tensor(0.6, dtype=torch.float64))
    assert torch.allclose(p[firsts == 3], torch.tensor(0.1, dtype=torch.float64))


def test_annealing_schedules():
    cfg = ExplorationConfig(strategy="boltzmann", temperature=2.0, temperature_final=0.5, decay_steps=100)
    assert cfg.temperature_at(0) == 2.0 and abs(cfg.temperature_at(100) - 0.5) < 1e-9
    assert abs(cfg.temperature_at(50) - 1.0) < 1e-9  # geometric: halfway in log space
    eps = ExplorationConfig(strategy="epsilon", epsilon=0.3, epsilon_final=0.1, decay_steps=10)
    assert abs(eps.epsilon_at(5) - 0.2) < 1e-9 and eps.epsilon_at(1000) == 0.1


def test_linucb_bonus_shrinks_where_an_item_was_shown_and_diagonal_matches_full_on_axis_states():
    """A never-shown item gains alpha / sqrt(ridge); one shown n times in a direction alpha / sqrt(ridge + n)
    there, and nothing changes in an orthogonal direction. On axis-aligned states the Gram matrices are
    diagonal, so the diagonal statistics equal the full ones."""
    d, n = 4, 6
    axes = torch.eye(d) * 3.0  # lengths do not matter: states are scaled to unit length
    diag, full = LinUCB(n, d, alpha=2.0, ridge=1.0), LinUCB(n, d, alpha=2.0, ridge=1.0, diagonal=False)
    for ucb in (diag, full):
        assert torch.allclose(ucb.bonus(axes), torch.full((d, n), 2.0))
        ucb.update(axes[[0, 0, 0]], torch.tensor([1, 1, 1]))  # item 1 shown 3 times along axis 0
        ucb.update(axes[[2]], torch.tensor([[4, 5]]))  # a slate: items 4 and 5 shown along axis 2
        assert ucb.shown == 5
    b = diag.bonus(axes)
    assert torch.allclose(b, full.bonus(axes), atol=1e-6)
    assert abs(float(b[0, 1]) - 2.0 / 2.0) < 1e-6  # alpha / sqrt(1 + 3)
    assert abs(float(b[1, 1]) - 2.0) < 1e-6  # orthogonal direction: still unexplored
    assert abs(float(b[2, 4]) - 2.0 / 2**0.5) < 1e-6 and abs(float(b[2, 5]) - 2.0 / 2**0.5) < 1e-6
    mixed = torch.tensor([[1.0, 1.0, 0.0, 0.0]])  # between axes 0 and 1: partly explored for item 1
    assert 1.0 < float(diag.bonus(mixed)[0, 1]) < 2.0
    for ucb in (diag, full):
        ucb.add_items(2)
        assert ucb.n_items == n + 2
        assert torch.allclose(ucb.bonus(axes)[:, n:], torch.full((d, 2), 2.0))
    with pytest.raises(ValueError, match="ucb_alpha"):
        ExplorationConfig(strategy="ucb", ucb_alpha=-1.0)


def test_a_slate_drawn_from_logits_is_the_one_drawn_from_their_log_probabilities():
    """``normalise``: the same generator draws the same items from the logits as from the Boltzmann
    log-probabilities, with the same propensities (only the log-normaliser is computed)."""
    scores = torch.randn(4, 3000) * 3
    allowed = torch.rand(4, 3000) > 0.2
    cfg = ExplorationConfig(strategy="boltzmann", temperature=0.7, temperature_final=0.7)
    lp = behaviour_log_probs(scores, cfg, allowed=allowed)
    items, props = sample_slate(lp, 10, generator=torch.Generator().manual_seed(5))
    logits = scores.masked_fill(~allowed, -torch.inf) / 0.7
    same, same_props = sample_slate(logits, 10, generator=torch.Generator().manual_seed(5), normalise=True)
    assert torch.equal(items, same) and allowed.gather(1, items).all()
    assert torch.allclose(props, same_props, rtol=1e-5)
