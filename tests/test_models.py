"""The dual encoder of method.md 1: head shape and size, timm factory, pretrained weights, functional forward."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from lors.config import Params
from lors.data.text_features import resolve_encoder_source
from lors.errors import ConfigError
from lors.io import sha256_json
from lors.models import (FlatParams, FunctionalDualEncoder, TextProjectionHead, build_dual_encoder,
                         build_image_encoder, image_feature_dim)
from lors.models.pretrained import LITE0_ENCODER, LITE0_PACKAGE, lite0_package_state, rename_by_position
from tests.conftest import tiny_params_dict


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


# --- pretrained weights from a local checkpoint file or a package (lors.models.pretrained) ---

def _checkpoint(tmp_path: Path, name: str, state: dict, suffix: str = ".pth") -> Path:
    path = tmp_path / f"{name}{suffix}"
    if suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("suffix,wrap", [(".pth", lambda s: s), (".pt", lambda s: {"state_dict": s, "epoch": 3}),
                                         (".pth", lambda s: {"model": {f"module.{k}": v for k, v in s.items()}}),
                                         (".safetensors", lambda s: s)])
def test_checkpoint_file_in_the_authors_layout_loads(tmp_path, suffix, wrap):
    torch.manual_seed(1)
    source = timm.create_model("test_nfnet", num_classes=7)  # classifier kept, as in a timm .pth
    path = _checkpoint(tmp_path, "nfnet", wrap(source.state_dict()), suffix)
    torch.manual_seed(2)
    state = torch.random.get_rng_state()
    enc = build_image_encoder("test_nfnet", pretrained=str(path))
    assert torch.equal(torch.random.get_rng_state(), state)  # loading leaves the global RNG alone
    got = enc.state_dict()
    assert got.keys() == {k for k in source.state_dict() if not k.startswith("head.fc.")}
    assert all(torch.equal(got[k], source.state_dict()[k]) for k in got)
    assert build_image_encoder("test_nfnet", pretrained=str(path)) is not enc  # a fresh copy per network


def test_bad_checkpoint_is_one_line_naming_file_and_key(tmp_path):
    state = timm.create_model("test_nfnet", num_classes=0).state_dict()
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "stem.conv1.weight"}, "key 'stem.conv1.weight' missing"),
        "extra": ({**state, "stem.extra": torch.zeros(1)}, "unexpected key 'stem.extra'"),
        "shape": ({**state, "stem.conv1.weight": torch.zeros(1, 1)}, "key 'stem.conv1.weight' has shape (1, 1)"),
        "other_arch": (timm.create_model("test_resnet").state_dict(), "key 'stem.conv1.weight' missing"),
    }
    for name, (bad, expected) in cases.items():
        path = _checkpoint(tmp_path, name, bad)
        with pytest.raises(ConfigError) as info:
            build_image_encoder("test_nfnet", pretrained=str(path))
        message = str(info.value)
        assert str(path) in message and expected in message and "\n" not in message, message
    (tmp_path / "weights.npz").touch()
    for path, expected in [(tmp_path / "absent.pth", "checkpoint file not found"),
                           (tmp_path / "weights.npz", "is neither true/false, a checkpoint file"),
                           ("timm/nfnet_l0.ra2_in1k", "is neither true/false, a checkpoint file")]:
        with pytest.raises(ConfigError, match=expected):
            build_image_encoder("test_nfnet", pretrained=str(path))
    (tmp_path / "broken.pth").write_bytes(b"not a pickle")
    with pytest.raises(ConfigError, match="cannot read checkpoint"):
        build_image_encoder("test_nfnet", pretrained=str(tmp_path / "broken.pth"))


LITE0 = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
         (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]  # repeats, k, stride, expand, in, out


def _lite0_reference(sd: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """EfficientNet-Lite0 written from its TF definition over the package's own tensor names, independent of
    timm: TF 'same' padding, BatchNorm eps 1e-3, ReLU6, no squeeze-excitation. Returns (pooled, logits)."""
    F = torch.nn.functional

    def conv(x, w, stride=1, groups=1):
        k, (h, wd) = w.shape[-1], x.shape[-2:]
        ph, pw = (max((math.ceil(n / stride) - 1) * stride + k - n, 0) for n in (h, wd))
        return F.conv2d(F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2]), w, None, stride, 0, 1, groups)

    def bn(x, p):
        return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"],
                            False, 0.0, 1e-3)

    x = F.relu6(bn(conv(x, sd["_conv_stem.weight"], 2), "_bn0"))
    i = 0
    for repeats, _, stride, expand, c_in, c_out in LITE0:
        for j in range(repeats):
            p, skip = f"_blocks.{i}.", x
            s, c = (stride, c_in) if j == 0 else (1, c_out)  # later repeats keep size and width
            if expand != 1:
                x = F.relu6(bn(conv(x, sd[p + "_expand_conv.weight"]), p + "_bn0"))
            x = F.relu6(bn(conv(x, sd[p + "_depthwise_conv.weight"], s, x.shape[1]), p + "_bn1"))
            x = bn(conv(x, sd[p + "_project_conv.weight"]), p + "_bn2")
            if s == 1 and c == c_out:
                x = x + skip
            i += 1
    pooled = F.relu6(bn(conv(x, sd["_conv_head.weight"]), "_bn1")).mean((2, 3))
    return pooled, F.linear(pooled, sd["_fc.weight"], sd["_fc.bias"])


def test_lite0_package_weights_map_onto_timm_exactly():
    source, origin = lite0_package_state()
    assert len(source) == 296
    x = torch.randn(2, 3, 100, 100, generator=torch.Generator().manual_seed(0))  # odd size: asymmetric padding
    pooled, logits = _lite0_reference(source, x)
    full = timm.create_model(LITE0_ENCODER).eval()
    full.load_state_dict(rename_by_position(source, full.state_dict(), origin), strict=True)
    encoder = build_image_encoder(LITE0_ENCODER, pretrained=LITE0_PACKAGE).eval()
    with torch.no_grad():
        torch.testing.assert_close(full(x), logits, atol=1e-5, rtol=0)  # same ImageNet logits
        torch.testing.assert_close(encoder(x), pooled, atol=1e-5, rtol=0)  # the pooled suite encoder
    with pytest.raises(ConfigError, match=f"'{LITE0_PACKAGE}' holds weights for image encoder '{LITE0_ENCODER}'"):
        build_image_encoder("efficientnet_lite0", pretrained=LITE0_PACKAGE)  # symmetric padding: not the same net


def test_rename_by_position_refuses_drift():
    a = {"x.weight": torch.zeros(2), "x.bias": torch.zeros(2)}
    with pytest.raises(ConfigError, match="has 2 tensors, the model 1"):
        rename_by_position(a, {"y.weight": torch.zeros(2)}, "src")
    with pytest.raises(ConfigError, match="tensor 'x.bias' \\(2,\\) does not fit 'y.running_mean'"):
        rename_by_position(a, {"y.weight": torch.zeros(2), "y.running_mean": torch.zeros(2)}, "src")
    with pytest.raises(ConfigError, match="tensor 'x.weight' \\(2,\\) does not fit 'y.weight' \\(3,\\)"):
        rename_by_position(a, {"y.weight": torch.zeros(3), "y.bias": torch.zeros(2)}, "src")


def test_params_take_a_pretrained_path_and_fingerprint_it(tmp_path):
    raw = tiny_params_dict(tmp_path)
    raw["model"]["pretrained"] = "weights/nfnet_l0_ra2-45c6688d.pth"
    params = Params.model_validate(raw)
    assert params.model.pretrained == "weights/nfnet_l0_ra2-45c6688d.pth"
    other = Params.model_validate({**raw, "model": {**raw["model"], "pretrained": LITE0_PACKAGE}})
    assert sha256_json(params.model.model_dump()) != sha256_json(other.model.model_dump())
    assert Params.model_validate({**raw, "model": {**raw["model"], "pretrained": True}}).model.pretrained is True
    with pytest.raises(ValidationError, match="empty string"):
        Params.model_validate({**raw, "model": {**raw["model"], "pretrained": " "}})


def test_text_encoder_local_folder_problems_are_one_line(tmp_path):
    folder = tmp_path / "bert-base-uncased"
    for name, expected in [(str(folder), "does not exist"), ("./no/such/bert", "does not exist"),
                           ("~/no-such-bert-xyz", "does not exist")]:
        with pytest.raises(ConfigError) as info:
            resolve_encoder_source(name)
        assert str(info.value).startswith(f"text_encoder.name: cannot load '{name}'") and expected in str(info.value)
    folder.mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        resolve_encoder_source(str(folder))
    (folder / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="has no weights"):
        resolve_encoder_source(str(folder))
    (folder / "pytorch_model.bin").touch()
    assert resolve_encoder_source(str(folder)) == str(folder)
    assert resolve_encoder_source("google-bert/bert-base-uncased") == "google-bert/bert-base-uncased"  # hub id


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
