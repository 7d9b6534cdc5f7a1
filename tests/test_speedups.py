"""Every speed-up option against the exact fp32/fp64 path it replaces (issue: GPU speed).

- TESLA pass 2 batched over the K steps (torch.func.vmap) == the loop, to 1e-6 (float64, dropout 0);
- stacked evaluation networks == networks trained one after another with the same seeds (dropout on);
- bf16 autocast + channels_last in the expert step: gradient within the tolerance stated below;
- benchmarks/gpu_suite.py --tiny runs and writes every key.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from distill_toys import TEXT_DIM, TinyConv, paired_data
from lors.config import EvalSettings, Params
from lors.distill.matching import tesla_iteration, walk_batches
from lors.distill.trajectories import Segment
from lors.errors import ConfigError
from lors.evaluation.protocol import train_networks_on_set
from lors.evaluation import parse_arch
from lors.evaluation.stacked import seeded_members, train_stacked
from lors.evaluation.train import RetrievalSplit, synset_epoch, synset_optimizer
from lors.losses import infonce
from lors.models import DualEncoder, FunctionalDualEncoder, build_dual_encoder
from lors.models.functional import AffineAfterLayerNorm
from lors.runtime import member_seed, seed_everything
from lors.synset import SyntheticSet
from test_distill_gradients import N, STEPS, TAU, make_set, student_and_segment

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core CPU two threads run these nested-autograd tests many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def grads(syn) -> list[torch.Tensor]:
    return [p.grad.clone() for p in syn.parameters()]


def run_pass(student, segment, method, similarity, loss, merge, batched, chunk=0):
    syn = make_set(method, similarity)
    batches = walk_batches(N, 4, STEPS, torch.Generator().manual_seed(0))
    result = tesla_iteration(student, syn, segment, batches, loss=loss, temperature=TAU, merge_branches=merge,
                             batched_steps=batched, step_chunk=chunk)
    return result, grads(syn), syn


@pytest.mark.parametrize("arch,method,similarity,loss,merge,chunk", [
    ("test_nfnet", "lors", "lowrank", "wbce", False, 0),
    ("conv", "lors", "lowrank", "wbce", True, 0),
    ("conv", "lors", "full", "ence", False, 2),  # 3 steps in vmaps of 2 and 1
    ("conv", "tesla_vl", "lowrank", "bce", False, 0)])
def test_batched_pass2_equals_the_loop(arch, method, similarity, loss, merge, chunk):
    student, segment = student_and_segment(arch)
    loop_result, loop_grads, syn = run_pass(student, segment, method, similarity, loss, merge, batched=False)
    batched_result, batched_grads, _ = run_pass(student, segment, method, similarity, loss, merge, batched=True,
                                                chunk=chunk)
    assert batched_result == loop_result  # pass 1 and the lr gradients are shared code
    names = [name for name, _ in syn.named_parameters()]
    for name, expected, actual in zip(names, loop_grads, batched_grads):
        if name in ("images", "texts") or name.startswith("similarity."):
            assert expected.abs().max() > 0, name  # every data parameter, S~ factors included, gets a gradient
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item(), msg=name)


class NormedConv(TinyConv):
    """TinyConv with BatchNorm: running-stat buffers that vmap cannot update per step."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(self.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(self.norm(self.conv(x))).mean((2, 3))


def test_batched_pass2_falls_back_to_the_loop_for_batchnorm_students():
    torch.manual_seed(0)
    model = DualEncoder(NormedConv(), TEXT_DIM, temperature=0.07, text_head_dropout=0.0).double().eval()
    student = FunctionalDualEncoder(model)
    assert student.vmappable() is None
    start_img, start_txt = student.initial()
    g = torch.Generator().manual_seed(0)
    segment = Segment(start_img, start_txt,
                      start_img + 0.05 * torch.randn(start_img.shape, generator=g, dtype=start_img.dtype),
                      start_txt + 0.05 * torch.randn(start_txt.shape, generator=g, dtype=start_txt.dtype))
    _, loop_grads, _ = run_pass(student, segment, "lors", "lowrank", "wbce", False, batched=False)
    with pytest.warns(UserWarning, match="uses the loop"):
        _, fallback_grads, _ = run_pass(student, segment, "lors", "lowrank", "wbce", False, batched=True)
    assert loop_grads[0].abs().max() > 0
    for expected, actual in zip(loop_grads, fallback_grads):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_affine_after_layer_norm_is_layer_norm():
    torch.manual_seed(0)
    norm = nn.LayerNorm(12).double()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    twin = nn.LayerNorm(12).double()
    twin.load_state_dict(norm.state_dict())
    twin.__class__ = AffineAfterLayerNorm
    x = torch.randn(5, 12, dtype=torch.float64)
    torch.testing.assert_close(twin(x), norm(x), rtol=1e-12, atol=1e-12)


# --- stacked evaluation networks ----------------------------------------------------------------------

def conv_encoder(dtype: torch.dtype) -> DualEncoder:
    return DualEncoder(TinyConv(), TEXT_DIM, temperature=0.07, text_head_dropout=0.1).to(dtype)


def sequential_curves(build, seeds, images, texts, similarity, cfg: EvalSettings):
    """Networks one after another, exactly as lors.evaluation.protocol.train_networks_on_set trains them."""
    runs = []
    for seed in seeds:
        generator = seed_everything(seed)
        model = build()
        optimizer, scheduler = synset_optimizer(model, 0.1, 0.2, cfg.momentum, cfg.weight_decay, cfg.epochs)
        losses = []
        for _ in range(cfg.epochs + 1):
            losses.append(synset_epoch(model, optimizer, images, texts, similarity, batch_size=cfg.batch_size,
                                       loss=cfg.loss, generator=generator))
            scheduler.step()
        runs.append((losses, model))
    return runs


@pytest.mark.parametrize("arch", ["conv", "test_nfnet"])
def test_stacked_networks_equal_sequential_ones_with_the_same_seeds(arch):
    dtype = torch.float64
    images, texts, _ = paired_data(12, dtype=dtype)
    similarity = torch.eye(12, dtype=dtype) + 0.1 * torch.randn(12, 12, generator=torch.Generator().manual_seed(1),
                                                                dtype=dtype)
    cfg = EvalSettings(epochs=3, batch_size=5, eval_every=1, loss="wbce")

    def build():
        if arch == "conv":
            return conv_encoder(dtype)
        return build_dual_encoder(arch, TEXT_DIM, pretrained=False, text_head_dropout=0.1).to(dtype)

    seeds = [11, 12, 13] if arch == "conv" else [11, 12]
    expected = sequential_curves(build, seeds, images, texts, similarity, cfg)
    members = seeded_members(build, seeds)
    curves = train_stacked(members, images, texts, similarity, lr_img=0.1, lr_txt=0.2, settings=cfg, amp=False,
                           splits={},
                           device=torch.device("cpu"), progress=False)
    assert curves[0]["loss"] != curves[1]["loss"]  # the members really differ
    for k, ((losses, model), curve) in enumerate(zip(expected, curves)):  # each member's module holds its weights
        assert curve["epochs"] == list(range(cfg.epochs + 1))
        torch.testing.assert_close(torch.tensor(curve["loss"]), torch.tensor(losses), rtol=1e-10, atol=1e-12)
        for name, param in model.named_parameters():
            trained = dict(members[k].model.named_parameters())[name]
            torch.testing.assert_close(trained.detach(), param.detach(), rtol=1e-9, atol=1e-11, msg=name)


def test_stacked_evaluation_matches_the_pipeline_in_float32():
    """Losses and retrieval of train_stacked against lors.evaluation.protocol.train_networks_on_set (float32),
    and the pipeline's own `evaluate.stacked` switch giving the same curves."""
    params = Params.model_validate({
        "device": "cpu", "protocol": "clean", "grid": {"datasets": ["bench"]},  # clean: one backbone per network
        "datasets": {"bench": {"kind": "embedded", "image_size": 8}},
        "model": {"image_encoder": "test_nfnet", "pretrained": False},
        "evaluate": {"num_eval": 2, "default": {"epochs": 2, "eval_every": 1, "batch_size": 6}},
        "tracking": {"enabled": False}})
    g = torch.Generator().manual_seed(0)
    n, dim = 10, TEXT_DIM
    synset = SyntheticSet(torch.randn(n, 3, 8, 8, generator=g), torch.randn(n, dim, generator=g),
                          torch.eye(n) + 0.05 * torch.randn(n, n, generator=g), lr_img=0.1, lr_txt=0.1)
    test = RetrievalSplit.upload(torch.randint(0, 256, (12, 3, 8, 8), generator=g, dtype=torch.uint8),
                                 torch.randn(24, dim, generator=g), torch.arange(12).repeat_interleave(2),
                                 torch.device("cpu"))
    arch = parse_arch(None, params)
    settings = params.evaluate.default
    sequential = train_networks_on_set(params, arch, synset, synset.texts, {"test": test}, settings, progress=False)

    def build():
        return build_dual_encoder(arch.image_encoder, dim, False, params.model.temperature,
                                  params.model.text_head_dropout)

    members = seeded_members(build, [member_seed(params.seed, k) for k in range(2)])
    curves = train_stacked(members, synset.images, synset.texts, synset.similarity, lr_img=0.1, lr_txt=0.1,
                           settings=settings, amp=False, splits={"test": test}, device=torch.device("cpu"),
                           progress=False)
    switched = params.model_copy(update={"evaluate": params.evaluate.model_copy(update={"stacked": True})})
    through_pipeline = train_networks_on_set(switched, arch, synset, synset.texts, {"test": test}, settings,
                                             progress=False)
    assert [n["test"] for n in through_pipeline] == [c["test"] for c in curves]
    for net, curve in zip(sequential, curves):
        assert curve["epochs"] == net["epochs"]
        assert curve["loss"] == pytest.approx(net["loss"], rel=1e-5)
        for ours, theirs in zip(curve["test"], net["test"]):
            assert ours == pytest.approx(theirs, abs=1e-6)


def test_stacked_refuses_batchnorm_networks_in_one_line():
    def build():
        return DualEncoder(NormedConv(), TEXT_DIM, temperature=0.07, text_head_dropout=0.1).double()

    images, texts, _ = paired_data(6)
    with pytest.raises(ConfigError, match="evaluate.stacked"):
        train_stacked(seeded_members(build, [1, 2]), images, texts, torch.eye(6, dtype=torch.float64), lr_img=0.1,
                      lr_txt=0.1, settings=EvalSettings(epochs=1), amp=False, splits={}, device=torch.device("cpu"),
                      progress=False)


# --- bf16 autocast and channels_last --------------------------------------------------------------------

BF16_REL_L2 = 5e-2  # stated tolerance: relative L2 error of the bf16 + channels_last gradient vs fp32
CHANNELS_LAST_REL_L2 = 1e-5  # channels_last alone only reorders memory: fp32 rounding only


def expert_step_gradient(model: DualEncoder, pixels: torch.Tensor, texts: torch.Tensor, amp: bool,
                         channels_last: bool) -> torch.Tensor:
    """The expert step's gradient (lors.experts.train_contrastive_epoch: autocast forward, fp32 InfoNCE)."""
    model.zero_grad(set_to_none=True)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        logits = model(pixels, texts)
    infonce(logits.float()).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("amp,channels_last,tolerance", [(False, True, CHANNELS_LAST_REL_L2),
                                                         (True, True, BF16_REL_L2)])
def test_expert_step_gradient_in_bf16_channels_last_matches_fp32(amp, channels_last, tolerance):
    torch.manual_seed(0)
    model = build_dual_encoder("test_nfnet", 32, pretrained=False, text_head_dropout=0.0)
    pixels, texts = torch.randn(16, 3, 32, 32), torch.randn(16, 32)
    exact = expert_step_gradient(model, pixels, texts, amp=False, channels_last=False)
    fast = expert_step_gradient(model, pixels, texts, amp=amp, channels_last=channels_last)
    assert ((fast - exact).norm() / exact.norm()).item() < tolerance


# --- the suite itself -----------------------------------------------------------------------------------

SUITE_KEYS = ["device", "experts_img_per_s", "lors_flickr100_s_per_it", "lors_flickr100_peak_gib",
              "lors_flickr500_s_per_it", "lors_flickr500_peak_gib", "eval_network_s"]


@pytest.mark.slow
def test_gpu_suite_tiny_runs_on_cpu_and_writes_every_key(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--tiny", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (path,) = tmp_path.glob("cpu-tiny-*.json")
    result = json.loads(path.read_text())
    assert set(SUITE_KEYS) <= set(result)
    assert result["experts_img_per_s"] > 0 and result["eval_network_s"] > 0
    assert result["lors_flickr100_s_per_it"] > 0 and result["lors_flickr500_s_per_it"] > 0
    assert result["eval_details"]["first_network_losses_match"]
    assert path.with_suffix(".md").read_text().count("|") > 20


def test_every_stage_process_flushes_denormals_in_all_its_threads():
    """The CLI sets FTZ/DAZ before any torch op, so the OpenMP workers created later inherit it: a
    denormal product is 0 in a parallel op, as on a GPU (without the flag it is 1e-39)."""
    probe = """
import torch
import lors.cli
flags = {}
@lors.cli._stage
def stage():
    torch.set_num_threads(2)
    x = torch.full((1 << 20,), 1e-39)  # big enough for a parallel kernel
    flags["zero"] = bool(((x * 1.0) == 0).all())
stage()
print(flags["zero"])
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"
    plain = subprocess.run([sys.executable, "-c", "import torch; x = torch.full((1 << 20,), 1e-39); "
                            "print(bool(((x * 1.0) == 0).all()))"], capture_output=True, text=True, check=True).stdout
    assert plain.strip() == "False"  # the flag is what makes the difference
