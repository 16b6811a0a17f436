"""Exploration strategies: the propensities they report are the probabilities they sample with."""

from __future__ import annotations

import torch

from rec_rllib.explore import ExplorationConfig, behaviour_log_probs, epsilon_slate, sample_slate


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
