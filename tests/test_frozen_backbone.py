"""A frozen pretrained backbone (model.image_trainable: false): the text head is the whole trajectory.

The matching maths is checked against an independent computation in which the backbone is a fixed
function of the images and only the text-head vector moves.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call
from torch.func import grad as func_grad
from torch.nn import functional as F

from distill_toys import TEXT_DIM, TinyConv, expert_trajectory, paired_data
from lors.config import ModelConfig
from lors.distill.matching import tesla_iteration, walk_batches
from lors.distill.mtt import mtt_iteration, random_subsets
from lors.distill.trajectories import Segment
from lors.experts import make_expert_optimizer, train_contrastive_epoch
from lors.losses import infonce, soft_contrastive_loss
from lors.models import DualEncoder, FlatParams, FunctionalDualEncoder, build_dual_encoder
from lors.retrieval import encode_images, test_retrieval
from test_distill_gradients import N, STEPS, TAU, make_set


@pytest.fixture(scope="module")
def frozen():
    """A float64 frozen-backbone student and one segment of its (text-head-only) expert trajectory."""
    torch.manual_seed(0)
    student = FunctionalDualEncoder(DualEncoder(TinyConv(), TEXT_DIM, TAU, 0.0, image_trainable=False).double().train())
    images, texts, _ = paired_data(32, seed=1)
    traj = expert_trajectory(student, images, texts, epochs=2, lr=0.2)
    assert traj.image.shape == (3, 0)
    return student, Segment(traj.image[0], traj.text[0], traj.image[1], traj.text[1])


def text_only_logits(student: FunctionalDualEncoder, theta_txt: torch.Tensor, images: torch.Tensor,
                     texts: torch.Tensor, temperature: float) -> torch.Tensor:
    """The frozen backbone as a plain function of the images; the text head from the flat vector."""
    model = student.model
    head = student.text_layout.unflatten(theta_txt)
    image = F.normalize(model.image_encoder(images), dim=-1)
    text = F.normalize(functional_call(model.text_head, head, (texts,)), dim=-1)
    return image @ text.T / temperature


def test_frozen_backbone_has_no_trainable_parameters_and_stays_in_eval_mode():
    torch.manual_seed(0)
    model = build_dual_encoder("test_efficientnet", TEXT_DIM, pretrained=False, image_trainable=False).train()
    assert not model.image_encoder.training and model.text_head.training
    assert FlatParams(model.image_encoder).numel == 0 and FlatParams(model.text_head).numel > 0
    convs = [m.weight for m in model.image_encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)  # the fast CPU layout
    stats = {k: v.clone() for k, v in model.image_encoder.state_dict().items()}
    optimizer = make_expert_optimizer(model, 0.1, 0.1)
    head = FlatParams(model.text_head).flatten(model.text_head).clone()
    images, texts, _ = paired_data(16, dtype=torch.float32)
    images = torch.nn.functional.interpolate(images, size=32)
    train_contrastive_epoch(model, optimizer, images, texts, torch.arange(16).numpy(), batch_size=8,
                            generator=torch.Generator().manual_seed(0), device=torch.device("cpu"), augment=False)
    for key, value in model.image_encoder.state_dict().items():  # weights and BatchNorm statistics
        torch.testing.assert_close(value, stats[key], rtol=0, atol=0)
    assert not torch.equal(FlatParams(model.text_head).flatten(model.text_head), head)


@pytest.mark.parametrize("merge", [False, True])  # merged or not, the empty image branch adds nothing
def test_tesla_gradient_with_a_frozen_backbone_equals_the_text_only_objective(frozen, merge):
    student, segment = frozen
    syn = make_set("lors")
    batches = walk_batches(N, 4, STEPS, torch.Generator().manual_seed(0))
    result = tesla_iteration(student, syn, segment, batches, loss="wbce", temperature=TAU, merge_branches=merge)

    a = syn.lr_txt.item()
    theta, total = segment.start_txt, 0
    for idx in batches:  # TESLA's truncation: theta_k from detached gradients, each G_k differentiable
        t = theta.detach().requires_grad_(True)
        logits = text_only_logits(student, t, syn.images[idx], syn.texts[idx], TAU)
        (g,) = torch.autograd.grad(soft_contrastive_loss("wbce", logits, syn.similarity.matrix(idx)), (t,),
                                   create_graph=True)
        theta, total = theta - a * g.detach(), total + g
    delta = segment.target_txt - segment.start_txt
    objective = (a * total + delta).square().sum() / delta.square().sum()
    params = [syn.images, syn.texts, *syn.similarity.parameters()]
    expected = torch.autograd.grad(objective, params)
    assert result.loss == pytest.approx(objective.item(), rel=1e-10) and result.loss_img == 0.0
    for p, e in zip(params, expected):
        assert e.abs().max() > 0
        torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=1e-6 * e.abs().max().item())
    assert syn.lr_img.grad.item() == 0.0 and syn.lr_txt.grad.item() != 0.0


def test_mtt_gradient_with_a_frozen_backbone_equals_the_text_only_unroll(frozen):
    student, segment = frozen
    syn = make_set("mtt_vl")
    subsets = random_subsets(N, 6, STEPS, torch.Generator().manual_seed(2))
    result = mtt_iteration(student, syn, segment, subsets, temperature=TAU)

    def objective(images, texts, lr_txt):
        theta = segment.start_txt
        for idx in subsets:
            g = func_grad(lambda t, idx=idx: infonce(text_only_logits(student, t, images[idx], texts[idx], TAU)))(theta)
            theta = theta - lr_txt * g
        return (theta - segment.target_txt).square().sum() / (segment.start_txt - segment.target_txt).square().sum()

    args = tuple(t.detach() for t in (syn.images, syn.texts, syn.lr_txt))
    expected = func_grad(objective, argnums=(0, 1, 2))(*args)
    assert result.loss == pytest.approx(objective(*args).item(), rel=1e-10) and result.loss_img == 0.0
    for p, e in zip((syn.images, syn.texts, syn.lr_txt), expected):
        assert e.abs().max() > 0
        torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=1e-6 * e.abs().max().item())


def test_a_frozen_backbone_needs_pretrained_weights():
    with pytest.raises(ValueError, match="image_trainable: false freezes the backbone"):
        ModelConfig(image_encoder="test_nfnet", pretrained=False, image_trainable=False)


def test_retrieval_from_embeddings_computed_once_equals_encoding_at_every_check():
    """Evaluation embeds a frozen backbone's test images once (lors.evaluation.protocol._embed_if_frozen);
    a network with another text head must score exactly as if it encoded them itself."""
    import copy

    torch.manual_seed(0)
    backbone = build_dual_encoder("test_efficientnet", TEXT_DIM, pretrained=False).image_encoder
    first = DualEncoder(copy.deepcopy(backbone), TEXT_DIM, image_trainable=False)
    other = DualEncoder(copy.deepcopy(backbone), TEXT_DIM, image_trainable=False).train()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=g)
    texts, txt2img = torch.randn(24, TEXT_DIM, generator=g), torch.arange(24) // 2
    cpu = torch.device("cpu")
    embedded = encode_images(first.eval(), images, cpu)
    assert embedded.shape == (12, first.image_encoder.num_features)
    assert test_retrieval(other, embedded, texts, txt2img, cpu) == test_retrieval(other, images, texts, txt2img, cpu)
    assert other.training and not other.image_encoder.training
