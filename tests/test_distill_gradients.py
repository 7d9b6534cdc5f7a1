"""The distillation gradients against independent computations (method.md 3.5, 3.7).

float64 and dropout 0 so that different routes to the same derivative must agree closely.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import grad as func_grad

from distill_toys import expert_trajectory, paired_data, tiny_student
from lors.distill.matching import tesla_iteration, walk_batches
from lors.distill.mtt import mtt_iteration, mtt_temperature, random_subsets
from lors.distill.synthetic import LearnableSet
from lors.similarity import build_similarity
from lors.distill.trajectories import Segment
from lors.losses import infonce, soft_contrastive_loss

N, STEPS, TAU = 10, 3, 0.07


_STUDENTS: dict[str, tuple] = {}


def student_and_segment(arch: str):
    """A float64 student without dropout and one segment of a short expert trajectory (cached)."""
    if arch not in _STUDENTS:
        student = tiny_student(arch)
        images, texts, _ = paired_data(32, seed=1)
        traj = expert_trajectory(student, images, texts, epochs=2, lr=0.2)
        _STUDENTS[arch] = student, Segment(traj.image[0], traj.text[0], traj.image[1], traj.text[1])
    return _STUDENTS[arch]


@pytest.fixture
def student():
    return student_and_segment("conv")[0]


@pytest.fixture
def segment():
    return student_and_segment("conv")[1]


def make_set(method: str, similarity: str = "lowrank", lr: tuple[float, float] = (0.05, 0.08), seed: int = 3) -> LearnableSet:
    images, texts, _ = paired_data(N, seed=seed)
    torch.manual_seed(seed)
    kind = similarity if method == "lors" else "identity"  # TESLA-VL and MTT-VL keep S~ = I
    syn = LearnableSet(images, texts, build_similarity(kind, N, rank=3, alpha=2.0), init_lr=0.1).double()
    with torch.no_grad():
        syn.lr_img.fill_(lr[0])
        syn.lr_txt.fill_(lr[1])
        for p in syn.similarity.parameters():  # move S~ away from I so every factor matters
            p.add_(0.3 * torch.randn(p.shape, dtype=p.dtype))
    return syn


def truncated_objective(student, syn, segment, batches, loss, merge):
    """The reference's objective by plain autograd: theta_k from detached gradients, each G_k a
    differentiable function of the data, Sigma = sum G_k, parameter-matching distance."""
    a_img, a_txt = syn.lr_img.item(), syn.lr_txt.item()
    theta_img, theta_txt = segment.start_img, segment.start_txt
    sum_img = sum_txt = 0
    for idx in batches:
        t_img, t_txt = theta_img.detach().requires_grad_(True), theta_txt.detach().requires_grad_(True)
        logits = student.logits(t_img, t_txt, syn.images[idx], syn.texts[idx], TAU)
        g_img, g_txt = torch.autograd.grad(soft_contrastive_loss(loss, logits, syn.similarity.matrix(idx)),
                                           (t_img, t_txt), create_graph=True)
        theta_img, theta_txt = theta_img - a_img * g_img.detach(), theta_txt - a_txt * g_txt.detach()
        sum_img, sum_txt = sum_img + g_img, sum_txt + g_txt
    n_img = (segment.start_img - a_img * sum_img - segment.target_img).square().sum()
    n_txt = (segment.start_txt - a_txt * sum_txt - segment.target_txt).square().sum()
    d_img = (segment.start_img - segment.target_img).square().sum()
    d_txt = (segment.start_txt - segment.target_txt).square().sum()
    return (n_img + n_txt) / (d_img + d_txt) if merge else n_img / d_img + n_txt / d_txt


def assert_close_scaled(actual, expected, rtol=1e-4):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


@pytest.mark.parametrize("arch,similarity,loss,merge", [("test_nfnet", "lowrank", "wbce", False),
                                                        ("conv", "lowrank", "wbce", True),
                                                        ("conv", "full", "ence", False),
                                                        ("conv", "lowrank", "bce", False)])
def test_constant_memory_gradient_equals_autograd_of_truncated_objective(arch, similarity, loss, merge):
    student, segment = student_and_segment(arch)
    syn = make_set("lors", similarity)
    batches = walk_batches(N, 4, STEPS, torch.Generator().manual_seed(0))
    result = tesla_iteration(student, syn, segment, batches, loss=loss, temperature=TAU, merge_branches=merge)

    params = [syn.images, syn.texts, *syn.similarity.parameters()]
    objective = truncated_objective(student, syn, segment, batches, loss, merge)
    expected = torch.autograd.grad(objective, params)
    assert result.loss == pytest.approx(objective.item(), rel=1e-10)
    for p, e in zip(params, expected):
        assert e.abs().max() > 0
        assert_close_scaled(p.grad, e)


def test_tesla_vl_keeps_identity_and_has_no_similarity_gradient(student, segment):
    syn = make_set("tesla_vl")
    assert not syn.learns_similarity
    batches = walk_batches(N, 4, STEPS, torch.Generator().manual_seed(0))
    tesla_iteration(student, syn, segment, batches, loss="wbce", temperature=TAU, merge_branches=False)
    expected = torch.autograd.grad(truncated_objective(student, syn, segment, batches, "wbce", False),
                                   [syn.images, syn.texts])
    assert_close_scaled(syn.images.grad, expected[0])
    assert_close_scaled(syn.texts.grad, expected[1])
    torch.testing.assert_close(syn.to_synset({}).similarity, torch.eye(N, dtype=torch.float64))


def _sigma(student, syn, segment, batches):
    """Sum of the first-order unroll's gradients (the Sigma the lr gradients see)."""
    a_img, a_txt = syn.lr_img.item(), syn.lr_txt.item()
    theta_img, theta_txt, sums = segment.start_img, segment.start_txt, [0, 0]
    for idx in batches:
        t_img, t_txt = theta_img.detach().requires_grad_(True), theta_txt.detach().requires_grad_(True)
        logits = student.logits(t_img, t_txt, syn.images[idx].detach(), syn.texts[idx].detach(), TAU)
        g_img, g_txt = torch.autograd.grad(soft_contrastive_loss("wbce", logits, syn.similarity.matrix(idx).detach()),
                                           (t_img, t_txt))
        theta_img, theta_txt = theta_img - a_img * g_img, theta_txt - a_txt * g_txt
        sums = [sums[0] + g_img, sums[1] + g_txt]
    return sums


@pytest.mark.parametrize("merge", [False, True])
def test_tesla_lr_gradients_agree_with_finite_differences(student, segment, merge):
    """d L^I / d a_I and d L^T / d a_T with Sigma held fixed, separately normalised even when the data
    gradient is merged (quirk 8.6)."""
    syn = make_set("lors")
    batches = walk_batches(N, 4, STEPS, torch.Generator().manual_seed(1))
    tesla_iteration(student, syn, segment, batches, loss="wbce", temperature=TAU, merge_branches=merge)
    sum_img, sum_txt = _sigma(student, syn, segment, batches)

    def branch_loss(a, sigma, start, target):
        return ((start - a * sigma - target).square().sum() / (start - target).square().sum()).item()

    h = 1e-6
    for a, sigma, start, target, grad in ((syn.lr_img.item(), sum_img, segment.start_img, segment.target_img, syn.lr_img.grad),
                                          (syn.lr_txt.item(), sum_txt, segment.start_txt, segment.target_txt, syn.lr_txt.grad)):
        fd = (branch_loss(a + h, sigma, start, target) - branch_loss(a - h, sigma, start, target)) / (2 * h)
        assert grad.item() == pytest.approx(fd, rel=1e-5)
        assert abs(fd) > 1e-6


def mtt_objective_by_func(student, segment, subsets, temperature):
    """The full unroll written with torch.func.grad (an independent route to the same derivative)."""
    def objective(images, texts, lr_img, lr_txt):
        theta_img, theta_txt = segment.start_img, segment.start_txt
        for idx in subsets:
            def inner(ti, tt, idx=idx):
                return infonce(student.logits(ti, tt, images[idx], texts[idx], temperature))
            g_img, g_txt = func_grad(inner, argnums=(0, 1))(theta_img, theta_txt)
            theta_img, theta_txt = theta_img - lr_img * g_img, theta_txt - lr_txt * g_txt
        d_img = (segment.start_img - segment.target_img).square().sum()
        d_txt = (segment.start_txt - segment.target_txt).square().sum()
        return ((theta_img - segment.target_img).square().sum() / d_img
                + (theta_txt - segment.target_txt).square().sum() / d_txt)
    return objective


def test_mtt_full_unroll_gradient_equals_independent_autograd(student, segment):
    syn = make_set("mtt_vl")
    subsets = random_subsets(N, 6, STEPS, torch.Generator().manual_seed(2))
    temperature = mtt_temperature(TAU, "reference")
    result = mtt_iteration(student, syn, segment, subsets, temperature=temperature)

    objective = mtt_objective_by_func(student, segment, subsets, temperature)
    args = tuple(t.detach() for t in (syn.images, syn.texts, syn.lr_img, syn.lr_txt))
    expected = func_grad(objective, argnums=(0, 1, 2, 3))(*args)
    assert result.loss == pytest.approx(objective(*args).item(), rel=1e-10)
    for p, e in zip((syn.images, syn.texts, syn.lr_img, syn.lr_txt), expected):
        assert e.abs().max() > 0
        assert_close_scaled(p.grad, e, rtol=1e-6)


def test_mtt_gradients_agree_with_finite_differences(student, segment):
    """Both learned lrs and a random direction in image space, through the whole unroll."""
    syn = make_set("mtt_vl")
    subsets = random_subsets(N, 6, STEPS, torch.Generator().manual_seed(4))
    temperature = mtt_temperature(TAU, "clean")
    mtt_iteration(student, syn, segment, subsets, temperature=temperature)
    objective = mtt_objective_by_func(student, segment, subsets, temperature)
    images, texts = syn.images.detach(), syn.texts.detach()
    a_img, a_txt = syn.lr_img.detach(), syn.lr_txt.detach()
    h = 1e-6
    fd_img = (objective(images, texts, a_img + h, a_txt) - objective(images, texts, a_img - h, a_txt)) / (2 * h)
    fd_txt = (objective(images, texts, a_img, a_txt + h) - objective(images, texts, a_img, a_txt - h)) / (2 * h)
    assert syn.lr_img.grad.item() == pytest.approx(fd_img.item(), rel=1e-5)
    assert syn.lr_txt.grad.item() == pytest.approx(fd_txt.item(), rel=1e-5)
    direction = torch.randn(images.shape, generator=torch.Generator().manual_seed(0), dtype=images.dtype)
    h = 1e-5
    fd_dir = (objective(images + h * direction, texts, a_img, a_txt)
              - objective(images - h * direction, texts, a_img, a_txt)) / (2 * h)
    assert (syn.images.grad * direction).sum().item() == pytest.approx(fd_dir.item(), rel=1e-4)


def test_mtt_temperature_quirk():
    assert 1 / mtt_temperature(0.07, "reference") == pytest.approx(2.6593, abs=1e-4)
    assert mtt_temperature(0.07, "clean") == 0.07


def test_batches_walk_a_permutation_and_skip_leftovers():
    batches = walk_batches(10, 4, 5, torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [4] * 5
    # 10 = 4 + 4 + (2 skipped): batches 0-1 are disjoint, batch 2 starts a new permutation
    assert len(set(batches[0].tolist()) | set(batches[1].tolist())) == 8
    assert len(set(batches[2].tolist()) | set(batches[3].tolist())) == 8
    assert [len(b) for b in walk_batches(3, 20, 2, torch.Generator())] == [3, 3]
