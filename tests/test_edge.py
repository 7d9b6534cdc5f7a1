"""EDGE on CPU with tiny random-weight networks built from configs (no download): trainable subset,
losses against hand computations, one fine-tuning step, seeded sampling, budget accounting, and the
method end to end on a small embedded set through evaluation."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lors.distill.edge import EdgeSettings, check_budget, edge_set
from lors.edge import captions as edge_captions
from lors.edge.finetune import clip_input, edge_losses, finetune, sgd_step, unet_input, vae_input
from lors.edge.losses import contrastive_loss, diversity_loss
from lors.edge.models import TINY, load_clip, load_diffusion, mark_trainable
from lors.edge.sample import choose_prompts, sample_images
from lors.edge.settings import FinetuneSettings, SamplingSettings
from lors.errors import ConfigError

CAPTIONS = ["a red circle on grass", "two blue squares", "a small yellow star at night", "a green triangle",
            "three black dots", "a big white cross"]
CPU = torch.device("cpu")


class FileStore:
    """Stand-in for the suite's checkpoint store: one torch file per name."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.saves = folder, []

    def save(self, name: str, obj: Any) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save(obj, self.folder / f"{name}.pt")
        self.saves.append(name)

    def load(self, name: str) -> Any | None:
        path = self.folder / f"{name}.pt"
        return torch.load(path, weights_only=False) if path.is_file() else None


@dataclass
class Context:
    """The fields of the registry's MethodContext that EDGE reads."""

    params: Any
    dataset: str
    budget: int
    settings: EdgeSettings
    device: torch.device
    generator: torch.Generator
    checkpoints: FileStore
    log_metrics: Any = lambda metrics, step: None


@pytest.fixture(scope="module")
def tiny():
    return load_diffusion(TINY, torch.float32, CPU), load_clip(TINY, torch.float32, CPU)


def fresh(tiny) -> tuple:
    """Copies of the tiny networks, so a test that trains them leaves the fixture untouched."""
    return copy.deepcopy(tiny)


def fixed_batch(n: int = 4, size: int = 16) -> tuple[np.ndarray, list[str]]:
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8).numpy(), CAPTIONS[:n]


# -- trainable subset -----------------------------------------------------------------------------------

def test_trainable_subset_is_exactly_biases_and_norms(tiny):
    parts, _ = fresh(tiny)
    trainable = {id(p) for p in mark_trainable(parts.unet)}
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    expected = set()
    for module in parts.unet.modules():
        if getattr(module, "bias", None) is not None:
            expected.add(id(module.bias))
        if isinstance(module, norms) and module.weight is not None:
            expected.add(id(module.weight))
    assert expected and trainable == expected
    assert {id(p) for p in parts.unet.parameters() if p.requires_grad} == trainable


# -- losses ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_contrastive_loss_equals_the_hand_computation(seed):
    g = torch.Generator().manual_seed(seed)
    img, txt, tau = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g), 0.1
    cos = [[float(img[i] @ txt[j] / (img[i].norm() * txt[j].norm())) for j in range(5)] for i in range(5)]
    i2t = sum(-cos[i][i] / tau + math.log(sum(math.exp(cos[i][j] / tau) for j in range(5))) for i in range(5)) / 5
    t2i = sum(-cos[j][j] / tau + math.log(sum(math.exp(cos[i][j] / tau) for i in range(5))) for j in range(5)) / 5
    assert float(contrastive_loss(img, txt, tau)) == pytest.approx(0.5 * (i2t + t2i), rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_diversity_loss_equals_the_mean_off_diagonal_cosine(seed):
    g = torch.Generator().manual_seed(seed)
    img, txt = torch.randn(6, 4, generator=g), torch.randn(6, 3, generator=g)
    z = [torch.cat([img[i], txt[i]]) for i in range(6)]
    pairs = [float(z[i] @ z[j] / (z[i].norm() * z[j].norm())) for i in range(6) for j in range(6) if i != j]
    assert float(diversity_loss(img, txt)) == pytest.approx(sum(pairs) / len(pairs), rel=1e-5)
    with pytest.raises(ValueError):
        diversity_loss(img[:1], txt[:1])


# -- protocol quirks ----------------------------------------------------------------------------------

def test_reference_keeps_the_quirks_and_clean_fixes_them():
    x = torch.rand(2, 3, 8, 8)
    clean, noisy = torch.zeros(1), torch.ones(1)
    assert torch.equal(unet_input(clean, noisy, "reference"), clean)
    assert torch.equal(unet_input(clean, noisy, "clean"), noisy)
    assert torch.allclose(vae_input(x, "clean"), 2 * x - 1)
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    assert torch.allclose(vae_input(x, "reference"), (x - mean) / std, atol=1e-6)
    decoded = 2 * x - 1
    assert torch.equal(clip_input(decoded, 8, "reference"), decoded)
    assert torch.allclose(clip_input(decoded, 8, "clean"), (x - mean) / std, atol=1e-5)
    assert clip_input(decoded, 4, "reference").shape[-1] == 4


# -- fine-tuning ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", ["reference", "clean"])
def test_one_step_lowers_the_loss_on_a_fixed_batch_as_first_order_predicts(tiny, protocol):
    """Same batch, noise and timesteps before and after one SGD step: the loss drops by ~ lr * |g|^2."""
    parts, clip = fresh(tiny)
    images, captions = fixed_batch()
    pixels, lr = torch.from_numpy(images).float() / 255, 1e-2
    settings = FinetuneSettings(lr=lr, resolution=16)
    params = mark_trainable(parts.unet)
    before = sgd_step(parts, clip, torch.optim.SGD(params, lr=lr), pixels, captions, settings, protocol,
                      torch.Generator().manual_seed(3))
    with torch.no_grad():
        after = edge_losses(parts, clip, pixels, captions, settings, protocol, torch.Generator().manual_seed(3))
    predicted = lr * sum(float((p.grad ** 2).sum()) for p in params)
    assert before["loss"] == pytest.approx(before["contrastive"] + before["diversity"], rel=1e-6)
    assert float(after["loss"]) < before["loss"]
    assert before["loss"] - float(after["loss"]) == pytest.approx(predicted, rel=0.2)


def test_finetune_moves_only_biases_and_norms(tiny, tmp_path):
    parts, clip = fresh(tiny)
    images, captions = fixed_batch()
    settings = FinetuneSettings(lr=1e-2, epochs=1, batch_size=4, resolution=16)
    before = {n: p.detach().clone() for n, p in parts.unet.named_parameters()}
    store = FileStore(tmp_path)
    state = finetune(parts, clip, images, captions, np.arange(4), settings, "clean", seed=0, store=store,
                     log_metrics=lambda m, s: None)
    assert len(state["history"]) == 1 and state["epoch"] == 1 and store.saves == ["edge-finetune"]
    changed = {n for n, p in parts.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("bias" in n or "norm" in n for n in changed)
    assert changed <= set(state["trainable"])


def test_finetune_resumes_from_its_epoch_checkpoint(tiny, tmp_path):
    images, captions = fixed_batch(2)
    settings = FinetuneSettings(lr=1e-2, epochs=2, batch_size=2, resolution=16)

    def run(store, epochs):
        parts, clip = fresh(tiny)
        s = settings.model_copy(update={"epochs": epochs})
        return finetune(parts, clip, images, captions, np.arange(2), s, "clean", 5, store, lambda m, i: None)

    whole = run(FileStore(tmp_path / "a"), 2)
    run(FileStore(tmp_path / "b"), 1)
    resumed = run(FileStore(tmp_path / "b"), 2)
    assert [r["loss"] for r in resumed["history"]] == [r["loss"] for r in whole["history"]]
    for name, value in whole["trainable"].items():
        assert torch.equal(resumed["trainable"][name], value), name


# -- sampling -------------------------------------------------------------------------------------------

def test_sampling_is_deterministic_under_a_seed_and_resumes_by_chunk(tiny, tmp_path):
    parts, _ = tiny
    settings = SamplingSettings(steps=2, batch_size=2, size=16)
    rows = choose_prompts(len(CAPTIONS), 3, torch.Generator().manual_seed(0))
    assert len(set(rows.tolist())) == 3
    assert torch.equal(rows, choose_prompts(len(CAPTIONS), 3, torch.Generator().manual_seed(0)))
    prompts = [CAPTIONS[r] for r in rows]
    first = sample_images(parts, prompts, settings, 11, FileStore(tmp_path / "a"))["images"]
    assert first.shape == (3, 3, 16, 16) and first.dtype == torch.uint8
    store = FileStore(tmp_path / "b")
    sample_images(parts, prompts[:2], settings, 11, store)  # one chunk written, as if killed after it
    resumed = sample_images(parts, prompts, settings, 11, store)["images"]
    assert torch.equal(first, resumed)
    other = sample_images(parts, prompts[:2], settings, 12, FileStore(tmp_path / "c"))["images"]
    assert not torch.equal(first[:2], other)


# -- captions and budget ------------------------------------------------------------------------------

def test_vlm_replies_are_parsed_and_completed():
    assert edge_captions.instruction(1) == "Describe the image in one sentence."
    assert edge_captions.instruction(3) == "Describe the image briefly in 3 different ways."
    reply = "1. A cat.\n\n2) A dog.\n- A bird.\n4. extra"
    assert edge_captions.parse_reply(reply, 3) == ["A cat.", "A dog.", "A bird."]


def test_caption_synthesis_keeps_the_prompt_and_completes_short_replies(tmp_path):
    images = torch.zeros(3, 3, 4, 4, dtype=torch.uint8)
    replies = iter(["one\ntwo", "only one", "a\nb\nc"])
    out = edge_captions.synthesise_captions(lambda image, text: next(replies), images, ["p0", "p1", "p2"], 3,
                                            FileStore(tmp_path))
    assert out["captions"] == [["p0", "one", "two"], ["p1", "only one", "p1"], ["p2", "a", "b"]]
    assert out["short"] == 1


def test_budget_accounting_and_its_errors():
    assert check_budget(EdgeSettings(), 100, 1000) == 100
    assert check_budget(EdgeSettings(vlm="some/vlm"), 500, 1000) == 250  # cpi 2 by default with a VLM
    assert check_budget(EdgeSettings(vlm="some/vlm", cpi=5), 500, 1000) == 100
    with pytest.raises(ConfigError, match="needs distill.edge.vlm"):
        check_budget(EdgeSettings(cpi=2), 100, 1000)
    with pytest.raises(ConfigError, match="not a multiple"):
        check_budget(EdgeSettings(vlm="v", cpi=3), 100, 1000)
    with pytest.raises(ConfigError, match="needs 100 prompts"):
        check_budget(EdgeSettings(), 100, 50)


def test_missing_weights_are_one_line_naming_the_key_and_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"^distill.edge.base_model: .*no-such-sd"):
        load_diffusion(str(tmp_path / "no-such-sd"), torch.float32, CPU, key="distill.edge.base_model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"^clip_model: cannot load .*empty"):
        load_clip(str(tmp_path / "empty"), torch.float32, CPU)


# -- end to end -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    from conftest import tiny_params_dict

    from lors.config import Params
    from lors.data.prepare import prepare_dataset
    from lors.data.text_features import embed_dataset

    raw = tiny_params_dict(tmp_path_factory.mktemp("edge") / "work")
    raw["datasets"]["embedded"]["embedded"].update(n_train=12, n_val=10, n_test=10, captions_per_image=2)
    raw["grid"].update(distill_methods=["edge"], distill_budgets=[6], select_methods=["random"], select_budgets=[6],
                       cross_methods=[])
    raw["experts"]["batch_size"] = 8
    raw["distill"]["edge"] = {"default": {"base_model": TINY, "clip_model": TINY, "dtype": "float32",
                                          "finetune": {"epochs": 1, "batch_size": 8, "resolution": 16, "fraction": 0.5},
                                          "sampling": {"steps": 2, "batch_size": 4, "size": 16}},
                              "settings": {"embedded": {6: {}}}}
    raw["evaluate"].update(num_eval=1, default={"epochs": 2, "eval_every": 1})
    raw["evaluate"]["methods"]["edge"] = {}
    params = Params.model_validate(raw)
    prepare_dataset(params, "embedded")
    embed_dataset(params, "embedded")
    return params


def edge_context(params, budget: int, folder: Path, **settings) -> Context:
    edge = EdgeSettings(base_model=TINY, clip_model=TINY, dtype="float32",
                        finetune=FinetuneSettings(epochs=1, batch_size=8, resolution=16, fraction=0.5),
                        sampling=SamplingSettings(steps=2, batch_size=4, size=16), **settings)
    return Context(params, "embedded", budget, edge, CPU, torch.Generator().manual_seed(params.seed),
                   FileStore(folder))


@pytest.mark.slow
def test_edge_end_to_end_gives_b_pairs_deterministically_and_evaluates(embedded, tmp_path, monkeypatch):
    from lors.data import load_split, load_text_features
    from lors.io import read_json
    from lors.stages.distill import run_distillation
    from lors.stages.evaluate import run_evaluation
    from lors.stages.report import run_report

    out = edge_set(edge_context(embedded, 6, tmp_path / "a"))
    again = edge_set(edge_context(embedded, 6, tmp_path / "b"))
    synset = out.synset
    assert len(synset) == 6 and synset.images.shape == (6, 3, 16, 16)
    assert torch.equal(synset.images, again.synset.images) and torch.equal(synset.texts, again.synset.texts)
    assert torch.equal(synset.similarity, torch.eye(6))
    assert synset.lr_img == embedded.experts.lr_img and synset.meta["method"] == "edge"
    split, features = load_split(embedded, "embedded", "train"), load_text_features(embedded, "embedded", "train")
    rows = synset.meta["prompt_rows"]
    assert synset.meta["captions"] == [split.captions[r] for r in rows]
    assert torch.equal(synset.texts, features[rows])
    assert out.history and {"iteration", "loss"} <= set(out.history[0])
    assert out.metrics["finetune_seconds"] > 0 and out.metrics["sample_seconds"] > 0

    # CPI 2 with a stand-in VLM: 3 images, each paired with its prompt and one new caption
    monkeypatch.setattr("lors.distill.edge.load_vlm", lambda *a: (lambda image, text: "a drawing of shapes"))
    cpi2 = edge_set(edge_context(embedded, 6, tmp_path / "c", vlm="stand-in", cpi=2)).synset
    assert cpi2.meta["n_images"] == 3 and len(cpi2) == 6
    assert torch.equal(cpi2.images[0], cpi2.images[1]) and cpi2.meta["captions"][1] == "a drawing of shapes"
    assert not torch.equal(cpi2.texts[0], cpi2.texts[1])

    # the registered method through the suite's stages: distill -> evaluate -> report
    monkeypatch.undo()
    run_distillation(embedded, "embedded", 6, "edge")
    result = read_json(run_evaluation(embedded, "embedded", 6, "edge"))
    assert result["method"] == "edge" and result["n_pairs"] == 6
    assert 0 <= result["summary"]["best"]["r_mean"]["mean"] <= 100
    run_report(embedded, tmp_path / "reports")
    assert "\nEDGE &" in (tmp_path / "reports" / "tables" / "embedded.tex").read_text()
