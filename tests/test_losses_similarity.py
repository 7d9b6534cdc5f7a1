"""Losses (method.md 3.4) against hand-computed values; similarity matrices (method.md 3.3)."""

from __future__ import annotations

import math

import pytest
import torch

from lors.errors import ConfigError
from lors.losses import bce, ence, infonce, soft_contrastive_loss, wbce
from lors.similarity import FullSimilarity, IdentitySimilarity, LowRankSimilarity, build_similarity

Z = [[2.0, -1.0], [0.5, 1.5]]  # rows = images, columns = texts
Y = [[0.8, 0.5], [0.2, 1.1]]  # soft target: 0.5 is NOT positive, 1.1 lies outside [0, 1]


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_ence_by_hand():
    def log_softmax(values, k):
        return values[k] - math.log(sum(math.exp(v) for v in values))

    rows = [-sum(Y[i][j] * log_softmax(Z[i], j) for j in range(2)) for i in range(2)]
    cols = [-sum(Y[i][j] * log_softmax([Z[0][j], Z[1][j]], i) for i in range(2)) for j in range(2)]
    expected = (sum(rows) / 2 + sum(cols) / 2) / 2
    assert ence(torch.tensor(Z), torch.tensor(Y)).item() == pytest.approx(expected, rel=1e-6)


def test_infonce_is_ence_with_identity_and_matches_hand_value():
    z = torch.tensor(Z)
    lse_rows = [math.log(math.exp(Z[i][0]) + math.exp(Z[i][1])) for i in range(2)]
    lse_cols = [math.log(math.exp(Z[0][j]) + math.exp(Z[1][j])) for j in range(2)]
    expected = ((lse_rows[0] - Z[0][0] + lse_rows[1] - Z[1][1]) / 2 + (lse_cols[0] - Z[0][0] + lse_cols[1] - Z[1][1]) / 2) / 2
    assert infonce(z).item() == pytest.approx(expected, rel=1e-6)
    assert ence(z, torch.eye(2)).item() == pytest.approx(expected, rel=1e-6)
    assert ence(z, torch.tensor(Y)).item() != pytest.approx(expected, rel=1e-3)  # a soft target changes it


def test_bce_by_hand():
    terms = [-(Y[i][j] * math.log(sig(Z[i][j])) + (1 - Y[i][j]) * math.log(1 - sig(Z[i][j])))
             for i in range(2) for j in range(2)]
    assert bce(torch.tensor(Z), torch.tensor(Y)).item() == pytest.approx(sum(terms) / 4, rel=1e-6)


def test_wbce_by_hand_with_strict_half_threshold():
    def term(i, j):
        p = sig(Z[i][j])
        return -Y[i][j] * math.log(p + 1e-6) - (1 - Y[i][j]) * math.log(1 - p + 1e-6)

    positive = [(0, 0), (1, 1)]  # 0.8 and 1.1; 0.5 is not > 0.5
    negative = [(0, 1), (1, 0)]
    expected = (sum(term(*ij) for ij in positive) / (2 + 1e-6) + sum(term(*ij) for ij in negative) / (2 + 1e-6)) / 2
    assert wbce(torch.tensor(Z), torch.tensor(Y)).item() == pytest.approx(expected, rel=1e-6)
    # with all targets identity the positives are the diagonal
    eye_terms = [-math.log(sig(Z[0][0]) + 1e-6), -math.log(sig(Z[1][1]) + 1e-6),
                 -math.log(1 - sig(Z[0][1]) + 1e-6), -math.log(1 - sig(Z[1][0]) + 1e-6)]
    expected_eye = ((eye_terms[0] + eye_terms[1]) / (2 + 1e-6) + (eye_terms[2] + eye_terms[3]) / (2 + 1e-6)) / 2
    assert soft_contrastive_loss("wbce", torch.tensor(Z), torch.eye(2)).item() == pytest.approx(expected_eye, rel=1e-6)


def test_wbce_mask_is_detached_but_target_gets_gradient():
    target = torch.tensor(Y, requires_grad=True)
    wbce(torch.tensor(Z), target).backward()
    # d/dY_ij of the weighted sum = -(log p - log(1-p)) / (2 |group|) = -Z_ij / 4 (up to the 1e-6)
    torch.testing.assert_close(target.grad, -torch.tensor(Z) / 4, rtol=1e-4, atol=1e-5)


def test_unknown_loss_and_similarity_are_config_errors():
    with pytest.raises(ConfigError, match="unknown loss 'kl'"):
        soft_contrastive_loss("kl", torch.zeros(2, 2), torch.eye(2))
    with pytest.raises(ConfigError, match="unknown similarity 'sparse'"):
        build_similarity("sparse", 4)


def test_lowrank_starts_at_identity_and_blocks_use_indexed_rows():
    torch.manual_seed(0)
    sim = LowRankSimilarity(6, rank=2, alpha=3.0)
    torch.testing.assert_close(sim.matrix(), torch.eye(6))
    assert sum(p.numel() for p in sim.parameters()) == 6 * (2 * 2 + 1)
    with torch.no_grad():
        sim.R.normal_()
        sim.w.uniform_(0.5, 1.5)
    full = torch.diag(sim.w) + 3.0 / 2 * sim.L @ sim.R.T
    torch.testing.assert_close(sim.matrix(), full)
    idx = torch.tensor([4, 1, 3])
    torch.testing.assert_close(sim.matrix(idx), full[idx][:, idx])


def test_lowrank_gradients_reach_w_L_and_R():
    """R = 0 at start, so L's gradient is zero until one update has moved R."""
    torch.manual_seed(0)
    sim = LowRankSimilarity(5, rank=2, alpha=1.0)
    opt = torch.optim.SGD(sim.parameters(), lr=0.5)
    target = torch.rand(5, 5)

    def step():
        opt.zero_grad()
        (sim.matrix(torch.tensor([0, 2, 4])) - target[[0, 2, 4]][:, [0, 2, 4]]).square().sum().backward()
        grads = {name: p.grad.clone() for name, p in sim.named_parameters()}
        opt.step()
        return grads

    first = step()
    assert first["w"].abs().sum() > 0 and first["R"].abs().sum() > 0
    assert first["L"].abs().sum() == 0
    assert first["w"][[1, 3]].abs().sum() == 0  # rows outside the block get nothing
    second = step()
    assert second["L"].abs().sum() > 0


def test_full_similarity_block_indexing_and_gradient():
    sim = FullSimilarity(4)
    with torch.no_grad():
        sim.S.copy_(torch.arange(16.0).view(4, 4))
    idx = torch.tensor([2, 0])
    torch.testing.assert_close(sim.matrix(idx), torch.tensor([[10.0, 8.0], [2.0, 0.0]]))
    sim.matrix(idx).sum().backward()
    expected = torch.zeros(4, 4)
    expected[[2, 2, 0, 0], [2, 0, 2, 0]] = 1
    torch.testing.assert_close(sim.S.grad, expected)


def test_identity_similarity_follows_dtype_and_has_no_parameters():
    sim = IdentitySimilarity(5).double()
    assert list(sim.parameters()) == []
    torch.testing.assert_close(sim.matrix(), torch.eye(5, dtype=torch.float64))
    assert sim.matrix(torch.tensor([1, 3])).shape == (2, 2)
    assert "anchor" not in sim.state_dict()
