"""The dual encoder of method.md 1: head shape and size, timm factory, functional forward."""

from __future__ import annotations

import pytest
import torch

from lors.errors import ConfigError
from lors.models import (FlatParams, FunctionalDualEncoder, TextProjectionHead, build_dual_encoder,
                         build_image_encoder, image_feature_dim)


def test_projection_head_matches_reference_size():
    head = TextProjectionHead(768, 2304)
    assert sum(p.numel() for p in head.parameters()) == 1_771_776 + 5_310_720 + 4_608 == 7_087_104
    head.eval()
    x = torch.randn(3, 768)
    h = head.projection(x)
    expected = torch.nn.functional.layer_norm(h + head.fc(torch.nn.functional.gelu(h)), (2304,),
                                              head.layer_norm.weight, head.layer_norm.bias)
    torch.testing.assert_close(head(x), expected)


@pytest.mark.parametrize("name", ["test_nfnet", "test_vit", "test_resnet"])
def test_image_encoder_width_is_read_from_the_model(name):
    torch.manual_seed(0)
    enc = build_image_encoder(name, pretrained=False)
    out = enc(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, image_feature_dim(enc))


def test_unknown_image_encoder_is_one_clear_line():
    with pytest.raises(ConfigError, match="unknown image encoder 'nfnet_l9000'"):
        build_image_encoder("nfnet_l9000", pretrained=False)


def test_dual_encoder_embeddings_normalised_and_logits_scaled():
    torch.manual_seed(0)
    model = build_dual_encoder("test_nfnet", text_dim=12, pretrained=False, temperature=0.07).eval()
    x, t = torch.randn(4, 3, 16, 16), torch.randn(5, 12)
    f, g = model.encode_image(x), model.encode_text(t)
    torch.testing.assert_close(f.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(g.norm(dim=1), torch.ones(5))
    logits = model(x, t)
    assert logits.shape == (4, 5)
    torch.testing.assert_close(logits, f @ g.T / 0.07)


@pytest.mark.parametrize("name", ["test_nfnet", "test_vit"])
def test_functional_forward_equals_module_forward(name):
    torch.manual_seed(0)
    model = build_dual_encoder(name, text_dim=8, pretrained=False).eval()
    fmodel = FunctionalDualEncoder(model)
    img, txt = fmodel.initial()
    assert img.numel() == sum(p.numel() for p in model.image_encoder.parameters())
    assert txt.numel() == sum(p.numel() for p in model.text_head.parameters())
    x, t = torch.randn(3, 3, 32, 32), torch.randn(3, 8)
    torch.testing.assert_close(fmodel.logits(img, txt, x, t), model(x, t))
    # a perturbed vector changes the output, and loading it makes the module agree again
    img2 = img + 0.01 * torch.randn_like(img)
    out = fmodel.logits(img2, txt, x, t)
    assert not torch.allclose(out, model(x, t))
    fmodel.load(img2, txt)
    torch.testing.assert_close(out, model(x, t))


def test_functional_gradient_equals_module_gradient():
    torch.manual_seed(0)
    model = build_dual_encoder("test_nfnet", text_dim=8, pretrained=False).eval()
    fmodel = FunctionalDualEncoder(model)
    x, t = torch.randn(2, 3, 16, 16), torch.randn(2, 8)
    img, txt = (v.requires_grad_() for v in fmodel.initial())
    g_img, g_txt = torch.autograd.grad(fmodel.logits(img, txt, x, t).sum(), (img, txt))
    model(x, t).sum().backward()
    torch.testing.assert_close(g_img, torch.cat([p.grad.reshape(-1) for p in model.image_encoder.parameters()]))
    torch.testing.assert_close(g_txt, torch.cat([p.grad.reshape(-1) for p in model.text_head.parameters()]))


def test_flat_params_rejects_wrong_length():
    layout = FlatParams(torch.nn.Linear(3, 2))
    with pytest.raises(ValueError, match="needs 8"):
        layout.unflatten(torch.zeros(7))


def test_shared_backbone_seed_gives_one_backbone_and_fresh_text_heads():
    from lors.models.dual import shared_backbone_seed

    def build(global_seed: int, backbone_seed: int | None):
        torch.manual_seed(global_seed)
        return build_dual_encoder("test_nfnet", 8, pretrained=False, backbone_seed=backbone_seed)

    a, b = build(1, 7), build(2, 7)
    for p, q in zip(a.image_encoder.parameters(), b.image_encoder.parameters()):
        torch.testing.assert_close(p, q, atol=0, rtol=0)
    assert not torch.equal(a.text_head.projection.weight, b.text_head.projection.weight)
    c, d = build(1, None), build(2, None)
    assert not all(torch.equal(p, q) for p, q in zip(c.image_encoder.parameters(), d.image_encoder.parameters()))
    # the backbone draw leaves torch's RNG alone: the text head is what the seed alone would give
    torch.manual_seed(5)
    shared = build_dual_encoder("test_nfnet", 8, pretrained=False, backbone_seed=7)
    torch.manual_seed(5)
    alone = TextProjectionHead(8, 192)
    torch.testing.assert_close(shared.text_head.projection.weight, alone.projection.weight, atol=0, rtol=0)
    assert shared_backbone_seed("reference", False, 3) == 3
    assert shared_backbone_seed("clean", False, 3) is None and shared_backbone_seed("reference", True, 3) is None
