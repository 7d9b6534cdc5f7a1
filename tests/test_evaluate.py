"""Evaluation protocol (method.md 4): epoch selection, mini-batching, learning vs chance, seeds,
architectures and text transfer, resume, the whole-dataset bound, and the stage end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import lors.data
from lors.cli import app
from lors.config import Params
from lors.data import Split
from lors.data.text_features import encode_captions, load_text_encoder
from lors.data.transforms import normalize
from lors.errors import ConfigError, DataError
from lors.checkpoints import CheckpointStore
from lors.config import EvalSettings
from lors.evaluation.protocol import evaluate_synset, evaluate_whole
from lors.evaluation import parse_arch, select_epochs, summarise
from lors.evaluation import train as train_module
from lors.evaluation.texts import training_texts
from lors.evaluation.train import eval_epochs, partition_epoch, synset_epoch, synset_optimizer
from lors.stages.evaluate import run_evaluation
from lors.models import build_dual_encoder
from lors.paths import Layout
from lors.synset import FILENAME, SyntheticSet
from tests.conftest import tiny_params_dict

CPU = torch.device("cpu")
WORDS = ("red", "green", "blue", "dark", "bright", "pale")


# ------------------------------------------------------------------------------------- fake data

def learnable_split(name: str, n: int, captions_per_image: int, rng: np.random.Generator, proj: np.ndarray,
                    size: int = 16) -> tuple[Split, torch.Tensor]:
    """Images whose colour and stripe pattern encode a latent z; caption features = noisy linear map of
    z. A network can only retrieve by learning both sides; the captions are words for z."""
    z = rng.random((n, 3))
    yy, xx = np.mgrid[0:size, 0:size] / size
    stripes = 30 * np.sin(6 * (xx * z[:, 0:1, None] + yy * z[:, 1:2, None]))[:, None]
    images = z[:, :, None, None] * 200 + 28 + stripes + rng.normal(0, 8, (n, 3, size, size))
    txt2img = np.repeat(np.arange(n), captions_per_image)
    features = z[txt2img] @ proj + 0.1 * rng.normal(size=(len(txt2img), proj.shape[1]))
    captions = [f"{WORDS[int(z[i, 0] * 6)]} {WORDS[int(z[i, 1] * 6)]} picture {i} caption {j}"
                for j, i in enumerate(txt2img)]
    return (Split(name, np.clip(images, 0, 255).astype(np.uint8), captions, txt2img, [f"{name}{i}" for i in range(n)]),
            torch.tensor(features, dtype=torch.float32))


def use_splits(monkeypatch: pytest.MonkeyPatch, splits: dict[str, tuple[Split, torch.Tensor]]) -> None:
    """Serve in-memory splits through the lors.data API the evaluator reads."""
    monkeypatch.setattr(lors.data, "load_split", lambda params, dataset, split: splits[split][0])
    monkeypatch.setattr(lors.data, "load_text_features", lambda params, dataset, split: splits[split][1])


@pytest.fixture
def learnable(monkeypatch):
    rng = np.random.default_rng(0)
    proj = rng.normal(size=(3, 16))
    splits = {"train": learnable_split("train", 60, 2, rng, proj), "val": learnable_split("val", 50, 5, rng, proj),
              "test": learnable_split("test", 50, 5, rng, proj)}
    use_splits(monkeypatch, splits)
    return splits


def make_params(tmp_path: Path, **evaluate) -> Params:
    raw = tiny_params_dict(tmp_path / "work")
    num_eval = evaluate.pop("num_eval", 1)
    raw["evaluate"] = {"num_eval": num_eval, "default": {"epochs": 2, "eval_every": 1, **evaluate},
                       "methods": raw["evaluate"]["methods"]}
    return Params.model_validate(raw)


def pairs_synset(split: Split, features: torch.Tensor, rows: list[int] | None = None, lr: float = 0.1,
                 shuffle_texts: bool = False) -> SyntheticSet:
    """Real pairs (caption rows) as a set with identity similarity, as a coreset."""
    rows = list(range(len(features))) if rows is None else rows
    texts = features[rows]
    if shuffle_texts:
        texts = texts[torch.randperm(len(rows), generator=torch.Generator().manual_seed(1))]
    images = normalize(torch.from_numpy(split.images[split.txt2img[rows]]))
    return SyntheticSet(images, texts, torch.eye(len(rows)), lr, lr, meta={"dataset": "embedded"})


def chance_r_mean(n_images: int, captions_per_image: int) -> float:
    """Expected r_mean of random scores: IR R@K = K/n; TR R@K = P(one of c captions in the top K)."""
    n_captions = n_images * captions_per_image
    ir = [k / n_images for k in (1, 5, 10)]
    tr = [1 - math.comb(n_captions - captions_per_image, k) / math.comb(n_captions, k) for k in (1, 5, 10)]
    return 100 * (sum(ir) / 3 + sum(tr) / 3) / 2


# ------------------------------------------------------------------------------ pure pieces

def test_selection_rules_on_a_synthetic_trajectory():
    epochs = [0, 10, 20, 30, 40]
    test = [{"r_mean": v} for v in (5.0, 9.0, 12.0, 12.0, 7.0)]
    val = [{"r_mean": v} for v in (4.0, 11.0, 3.0, 11.0, 2.0)]
    # best: highest TEST r_mean, first of a tie (the reference keeps a strict >); last: final epoch;
    # val: highest VAL r_mean, first of a tie
    assert select_epochs(epochs, test, val) == {"best": 20, "last": 40, "val": 10}
    assert select_epochs(epochs, test) == {"best": 20, "last": 40}
    with pytest.raises(ValueError):
        select_epochs(epochs, test[:3])


def test_summary_is_mean_and_population_std_over_networks():
    metrics = ("ir1", "ir5", "ir10", "tr1", "tr5", "tr10", "ir_mean", "tr_mean", "r_mean")
    nets = [{"final": {"best": dict.fromkeys(metrics, 10.0), "last": dict.fromkeys(metrics, 1.0)}},
            {"final": {"best": dict.fromkeys(metrics, 20.0), "last": dict.fromkeys(metrics, 3.0)}}]
    summary = summarise(nets, ["best", "last"])
    assert summary["best"]["r_mean"] == {"mean": 15.0, "std": 5.0}  # np.std (ddof 0), not 7.07
    assert summary["last"]["tr10"] == {"mean": 2.0, "std": 1.0}


def test_eval_epochs_include_the_last():
    assert eval_epochs(0, 100, 10) == list(range(0, 101, 10))
    assert eval_epochs(0, 4, 3) == [0, 3, 4]
    assert eval_epochs(1, 3, 1) == [1, 2, 3]


def test_each_minibatch_is_an_independent_subset_with_its_similarity_block(monkeypatch):
    torch.manual_seed(0)
    seen = []

    def spy(name, logits, target):
        seen.append((name, logits.shape, target.clone()))
        return logits.mean()

    monkeypatch.setattr(train_module, "soft_contrastive_loss", spy)
    model = build_dual_encoder("test_nfnet", text_dim=4, pretrained=False)
    sim = torch.arange(25.0).view(5, 5)  # entry (i, j) = 5i + j reveals the rows of a block
    optimizer, _ = synset_optimizer(model, 0.1, 0.1, 0.9, 5e-4, epochs=4)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        synset_epoch(model, optimizer, torch.randn(5, 3, 16, 16), torch.randn(5, 4), sim, batch_size=2, loss="wbce",
                     generator=gen)
    assert len(seen) == 2 * math.ceil(5 / 2)  # ceil(N/b) batches per epoch
    for name, shape, block in seen:
        # every batch has min(b, N) = 2 distinct pairs (an epoch partition would end with a batch of 1)
        rows = (block.diagonal() / 6).long()  # diagonal entries are 6i
        assert name == "wbce" and shape == (2, 2) and rows[0] != rows[1]
        torch.testing.assert_close(block, sim[rows][:, rows])
    seen.clear()
    synset_epoch(model, optimizer, torch.randn(3, 3, 16, 16), torch.randn(3, 4), sim[:3, :3], batch_size=128,
                 loss="ence", generator=gen)
    assert len(seen) == 1 and seen[0][1] == (3, 3)  # N < b: one batch of all N pairs
    assert sorted((seen[0][2].diagonal() / 6).long().tolist()) == [0, 1, 2]


def test_vl_distill_epoch_is_a_shuffled_partition_with_identity_infonce(monkeypatch):
    """method.md 4.2: every pair once per epoch, in batches of b (the last one smaller), CLIP loss."""
    seen = []

    def spy(logits):
        seen.append(logits.shape)
        return logits.mean()

    monkeypatch.setattr(train_module, "infonce", spy)
    model = build_dual_encoder("test_nfnet", text_dim=4, pretrained=False)
    optimizer, scheduler = synset_optimizer(model, 0.1, 0.1, 0.9, 5e-4, epochs=None)
    assert scheduler is None  # VL-Distill decays only after its last epoch
    images = torch.randn(5, 3, 16, 16)
    visited = []
    real_model_forward = model.forward
    monkeypatch.setattr(model, "forward", lambda i, t: (visited.append(i.sum((1, 2, 3))), real_model_forward(i, t))[1])
    partition_epoch(model, optimizer, images, torch.randn(5, 4), batch_size=2, generator=torch.Generator())
    assert seen == [(2, 2), (2, 2), (1, 1)]
    torch.testing.assert_close(torch.cat(visited).sort().values, images.sum((1, 2, 3)).sort().values)


def test_vl_distill_protocol_trains_both_branches_at_the_image_lr_and_reports_the_last_epoch(tmp_path, learnable,
                                                                                            monkeypatch):
    params = make_params(tmp_path)
    split, feats = learnable["train"]
    synset = pairs_synset(split, feats, list(range(20)))
    synset.lr_txt = 0.0  # must not be used: VL-Distill sets lr_net = syn_lr_img for both branches
    lrs = []
    real = train_module.synset_optimizer
    monkeypatch.setattr("lors.evaluation.protocol.synset_optimizer",
                        lambda m, a, b, *rest: (lrs.append((a, b, rest[-1])), real(m, a, b, *rest))[1])
    vld = EvalSettings(protocol="vl_distill", epochs=3, batch_size=8)
    result = evaluate_synset(params, synset, "embedded", progress=False, settings=vld)
    assert lrs == [(0.1, 0.1, None)]
    assert result["networks"][0]["epochs"] == [3] and result["eval_protocol"] == "vl_distill"
    assert result["loss"] == "infonce"


def test_optimizer_and_step_decay_follow_the_reference():
    model = build_dual_encoder("test_nfnet", text_dim=4, pretrained=False)
    optimizer, scheduler = synset_optimizer(model, 0.5, 0.25, 0.9, 5e-4, epochs=100)
    assert [g["momentum"] for g in optimizer.param_groups] == [0.9, 0.9]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [5e-4, 5e-4]
    lrs = []
    for _ in range(101):  # epochs 0..100, the scheduler steps after each
        lrs.append([g["lr"] for g in optimizer.param_groups])
        scheduler.step()
    assert lrs[50] == [0.5, 0.25] and lrs[51] == pytest.approx([0.05, 0.025]) and lrs[100] == pytest.approx([0.05, 0.025])


def test_parse_arch(tmp_path):
    params = make_params(tmp_path)  # source: test_nfnet + minilm (mean pooling)
    default = parse_arch(None, params)
    assert (default.image_encoder, default.text.name, default.source_text, default.name) == (
        "test_nfnet", "minilm", True, "test_nfnet+minilm")
    assert parse_arch("-+minilm", params).source_text and parse_arch("+minilm:mean", params).source_text
    cross = parse_arch("test_resnet+distilbert-base-uncased", params)
    assert (cross.image_encoder, cross.text.name, cross.text.pooling, cross.source_text) == (
        "test_resnet", "distilbert-base-uncased", "mean", False)
    cls = parse_arch("-+minilm:cls", params)
    assert (cls.image_encoder, cls.text.pooling, cls.source_text, cls.name) == ("test_nfnet", "cls", False,
                                                                                "test_nfnet+minilm:cls")
    assert parse_arch("test_resnet", params).source_text


def test_unknown_architecture_fails_with_one_clear_line(tmp_path, learnable):
    params = make_params(tmp_path)
    split, feats = learnable["train"]
    with pytest.raises(ConfigError, match="unknown image encoder 'nfnet_l9000'") as info:
        evaluate_synset(params, pairs_synset(split, feats, [0, 1]), "embedded", arch="nfnet_l9000+minilm",
                        progress=False)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="at most one"):
        parse_arch("a+b+c", params)
    # through the CLI: exit 2 and one `error:` line
    params_file = tmp_path / "params.yaml"
    params_file.write_text(json.dumps(tiny_params_dict(tmp_path / "work")))
    result = CliRunner().invoke(app, ["evaluate", "-d", "embedded", "-b", "20", "-m", "lors", "-p", str(params_file),
                                      "--arch", "nfnet_l9000"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: unknown image encoder 'nfnet_l9000'")


def test_a_set_that_does_not_fit_the_dataset_is_one_clear_line(tmp_path, learnable):
    params = make_params(tmp_path)
    split, feats = learnable["train"]
    small = pairs_synset(split, feats, [0, 1])
    small.images = small.images[:, :, :8, :8]
    foreign = pairs_synset(split, feats, [0, 1])
    foreign.meta["dataset"] = "coco"
    negative = pairs_synset(split, feats, [0, 1], lr=-0.5)
    other_space = pairs_synset(split, feats, [0, 1])
    other_space.meta["text_encoder"] = "bert-base-uncased"
    for synset, error, pattern in ((small, DataError, "another image size"), (foreign, ConfigError, "'coco'"),
                                   (negative, DataError, "lr_img = -0.5"),
                                   (other_space, ConfigError, "'bert-base-uncased' but text_encoder.name is 'minilm'")):
        with pytest.raises(error, match=pattern) as info:
            evaluate_synset(params, synset, "embedded", progress=False)
        assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------- training

def test_trained_on_real_pairs_learns_while_shuffled_pairs_stay_near_chance(tmp_path, learnable):
    params = make_params(tmp_path, epochs=15, eval_every=5)
    split, feats = learnable["train"]
    chance = chance_r_mean(50, 5)
    good = evaluate_synset(params, pairs_synset(split, feats), "embedded", progress=False)
    bad = evaluate_synset(params, pairs_synset(split, feats, shuffle_texts=True), "embedded", progress=False)
    good_last, bad_last = good["summary"]["last"]["r_mean"]["mean"], bad["summary"]["last"]["r_mean"]["mean"]
    print(f"\nchance {chance:.1f}, real pairs {good_last:.1f}, shuffled {bad_last:.1f}")
    assert good_last > chance + 20  # measured 40.2 vs chance 10.4
    assert bad_last < chance + 8  # measured 9.0 (1 thread) and 13.4 (2 threads, 30 epochs)
    net = good["networks"][0]
    assert net["epochs"] == [0, 5, 10, 15] and len(net["test"]) == 4 and "val" not in net
    assert good["summary"]["best"]["r_mean"]["mean"] == max(m["r_mean"] for m in net["test"])
    assert net["final"]["last"] == net["test"][-1] and good["summary"]["best"]["r_mean"]["std"] == 0.0


def test_same_seed_same_numbers_and_recorded_seeds(tmp_path, learnable):
    params = make_params(tmp_path, num_eval=2, epochs=1)
    split, feats = learnable["train"]
    synset = pairs_synset(split, feats, list(range(0, 120, 3)))
    first = evaluate_synset(params, synset, "embedded", progress=False)
    second = evaluate_synset(params, synset, "embedded", num_eval=1, progress=False)
    assert first["networks"][0]["test"] == second["networks"][0]["test"]
    assert first["networks"][0]["test"] != first["networks"][1]["test"]  # networks differ by seed
    assert first["seeds"] == [0, 1]
    shifted = evaluate_synset(params.model_copy(update={"seed": 3}), synset, "embedded", num_eval=1, progress=False)
    assert shifted["seeds"] == [3000]
    assert first["summary"].keys() == {"best", "last"}  # protocol reference: no val selection


def test_clean_protocol_selects_on_val(tmp_path, learnable):
    params = make_params(tmp_path).model_copy(update={"protocol": "clean"})
    split, feats = learnable["train"]
    result = evaluate_synset(params, pairs_synset(split, feats, list(range(40))), "embedded", progress=False)
    net = result["networks"][0]
    assert result["summary"].keys() == {"best", "last", "val"} and len(net["val"]) == len(net["epochs"])
    val_epoch = net["epochs"][int(np.argmax([m["r_mean"] for m in net["val"]]))]
    assert net["chosen"]["val"] == val_epoch
    assert net["final"]["val"] == net["test"][net["epochs"].index(val_epoch)]  # chosen on val, reported on test


def test_interrupted_evaluation_resumes_at_the_next_network(tmp_path, learnable, monkeypatch):
    params = make_params(tmp_path, num_eval=2, epochs=1)
    split, feats = learnable["train"]
    synset = pairs_synset(split, feats, list(range(20)))
    cache = CheckpointStore(tmp_path / "ckpt", "fp")
    uninterrupted = evaluate_synset(params, synset, "embedded", progress=False)

    def crash_after_first(k, record):
        if k == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate_synset(params, synset, "embedded", progress=False, checkpoints=cache, on_network=crash_after_first)
    calls = []
    real_run = train_module.run_network
    monkeypatch.setattr("lors.evaluation.protocol.run_network", lambda *a, **k: calls.append(1) or real_run(*a, **k))
    resumed = evaluate_synset(params, synset, "embedded", progress=False, checkpoints=cache)
    assert len(calls) == 1  # network 0 came from the cache
    assert [n["test"] for n in resumed["networks"]] == [n["test"] for n in uninterrupted["networks"]]
    stale = CheckpointStore(tmp_path / "ckpt", "another fingerprint")
    assert stale.load("net0") is None and cache.load("net0") is not None


def test_whole_dataset_bound_uses_the_expert_recipe(tmp_path, learnable):
    raw = tiny_params_dict(tmp_path / "work")
    raw["evaluate"]["num_eval"], raw["evaluate"]["whole_epochs"] = 1, 3
    raw["experts"] = {"batch_size": 20}  # lr 0.1, no momentum, augmentation on: the expert recipe
    params = Params.model_validate(raw)
    result = evaluate_whole(params, "embedded", progress=False)
    net = result["networks"][0]
    print(f"\nwhole: r_mean per epoch {[round(m['r_mean'], 1) for m in net['test']]}")
    assert net["epochs"] == [1, 2, 3] and result["text_transfer"] == "none" and result["n_pairs"] == 120
    assert result["summary"]["best"]["r_mean"]["mean"] > chance_r_mean(50, 5) + 20  # measured 41.2 vs 10.4


# --------------------------------------------------------------------------- text transfer

@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder("minilm", CPU)


@pytest.fixture
def captioned(monkeypatch, tmp_path, minilm):
    """Small splits whose source features are real minilm (mean-pooled) caption features."""
    rng = np.random.default_rng(0)
    proj = rng.normal(size=(3, 4))
    params = make_params(tmp_path, epochs=1)
    raw = {name: learnable_split(name, n, 2, rng, proj)[0] for name, n in (("train", 6), ("val", 4), ("test", 4))}
    features = encode_captions([c for split in raw.values() for c in split.captions], params.text_encoder,
                               encoder=minilm).split([split.n_captions for split in raw.values()])
    splits = {name: (split, feats) for (name, split), feats in zip(raw.items(), features)}
    use_splits(monkeypatch, splits)
    return params, splits


def test_text_transfer_reference_and_nearest_caption(captioned, minilm):
    params, splits = captioned
    train, source_feats = splits["train"]
    rows = [1, 4, 6, 9]
    synset = pairs_synset(train, source_feats, rows)
    cls_arch = parse_arch("-+minilm:cls", params)
    cls_cfg = cls_arch.text

    reference = training_texts(params, "embedded", synset.texts, cls_arch, 384, CPU)
    assert reference.transfer == "reference" and reference.train is synset.texts  # head trains on source vectors

    nearest_params = params.model_copy(update={"evaluate": params.evaluate.model_copy(
        update={"text_transfer": "nearest_caption"})})
    result = evaluate_synset(nearest_params, synset, "embedded", arch="-+minilm:cls", progress=False)
    assert result["text_transfer"] == "nearest_caption" and result["nearest_rows"] == rows
    assert result["arch"] == "test_nfnet+minilm:cls" and result["text_pooling"] == "cls"
    # the test captions were encoded with the new (cls) encoder, cached apart from the source features
    cached = Layout(params.work_dir).text_features("embedded", "minilm:cls") / "test.safetensors"
    from safetensors.torch import load_file

    want_test = encode_captions(splits["test"][0].captions, cls_cfg, encoder=minilm)
    torch.testing.assert_close(load_file(str(cached))["features"], want_test)
    assert not torch.allclose(want_test, splits["test"][1])  # cls and mean pooling really differ
    texts = training_texts(nearest_params, "embedded", synset.texts, cls_arch, 384, CPU)
    torch.testing.assert_close(texts.train, encode_captions([train.captions[r] for r in rows], cls_cfg, encoder=minilm))


def test_reference_transfer_needs_equal_widths(captioned):
    params, splits = captioned
    narrow = torch.randn(3, 16)  # synthetic texts from a 16-d source space
    with pytest.raises(ConfigError, match="nearest_caption") as info:
        training_texts(params, "embedded", narrow, parse_arch("-+minilm:cls", params), 384, CPU)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------ the stage on real data files

class RecordingTracker:
    def __init__(self) -> None:
        self.metrics: list[tuple[dict, int | None]] = []
        self.params: dict = {}
        self.tags: dict = {}
        self.artifacts: list[str] = []

    def log_params(self, params) -> None:
        self.params.update(params)

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.append((dict(metrics), step))

    def set_tags(self, tags) -> None:
        self.tags.update(tags)

    def log_artifact(self, path, folder=None) -> None:
        self.artifacts.append(str(path))


def test_run_evaluation_end_to_end_on_the_embedded_dataset(tmp_path, monkeypatch):
    import contextlib

    from lors.data import load_split, load_text_features
    from lors.data.prepare import prepare_dataset
    from lors.data.text_features import embed_dataset

    raw = tiny_params_dict(tmp_path / "work")
    raw["datasets"]["embedded"]["embedded"] = {"n_train": 10, "n_val": 10, "n_test": 10, "captions_per_image": 1,
                                               "seed": 0}
    raw["evaluate"].update({"num_eval": 2, "default": {"epochs": 2, "eval_every": 2}, "whole_epochs": 1})
    raw["experts"] = {"batch_size": 5}
    raw["grid"].update(distill_budgets=[4], select_budgets=[4])  # prepare refuses budgets over the 10 pairs
    params = Params.model_validate(raw)
    prepare_dataset(params, "embedded")
    embed_dataset(params, "embedded")
    train = load_split(params, "embedded", "train")
    synset = pairs_synset(train, load_text_features(params, "embedded", "train"), [0, 2, 4, 6])
    synset.save(Layout(params.work_dir).synset("embedded", 4, "random") / FILENAME)

    tracker = RecordingTracker()
    opened = []

    @contextlib.contextmanager
    def fake_stage_run(params, stage, name, tags=None):
        opened.append((stage, name, tags))
        yield tracker

    monkeypatch.setattr("lors.stages.evaluate.stage_run", fake_stage_run)
    out = run_evaluation(params, "embedded", 4, "random")
    assert out == Layout(params.work_dir).evaluation("embedded", 4, "random", "test_nfnet+minilm")
    result = json.loads(out.read_text())
    assert (result["dataset"], result["budget"], result["method"], result["arch"]) == (
        "embedded", 4, "random", "test_nfnet+minilm")
    assert result["protocol"] == "reference" and result["text_transfer"] == "none" and result["seeds"] == [0, 1]
    assert set(result["summary"]) == {"best", "last"} and set(result["summary"]["best"]["r_mean"]) == {"mean", "std"}
    assert [n["epochs"] for n in result["networks"]] == [[0, 2], [0, 2]] and result["time_per_network_s"] > 0
    assert not any(p.is_file() for p in (Layout(params.work_dir).work / "checkpoints").rglob("*"))
    # MLflow: tags, per-epoch curves per network (step = epoch), finals, the JSON as artifact
    assert opened == [("evaluate", "embedded/random-4/test_nfnet+minilm",
                       {"dataset": "embedded", "budget": 4, "method": "random", "arch": "test_nfnet+minilm",
                        "image_encoder": "test_nfnet", "text_encoder": "minilm"})]
    steps = {(key, step) for metrics, step in tracker.metrics for key in metrics}
    assert {("net0/test_r_mean", 0), ("net0/test_r_mean", 2), ("net1/test_ir1", 2)} <= steps
    finals = {k: v for metrics, step in tracker.metrics for k, v in metrics.items() if step is None}
    assert finals["best_r_mean_mean"] == result["summary"]["best"]["r_mean"]["mean"]
    assert finals["last_tr10_std"] == result["summary"]["last"]["tr10"]["std"]
    assert tracker.tags == {"text_transfer": "none", "eval_protocol": "lors"} and tracker.artifacts == [str(out)]

    with pytest.raises(DataError, match="synthetic set not found"):
        run_evaluation(params, "embedded", 8, "random")

    whole = run_evaluation(params.model_copy(update={"evaluate": params.evaluate.model_copy(update={"num_eval": 1})}),
                           "embedded", 123, "whole")
    assert whole == Layout(params.work_dir).evaluation("embedded", 0, "whole", "test_nfnet+minilm")
    result = json.loads(whole.read_text())
    assert (result["budget"], result["n_pairs"], result["loss"], result["networks"][0]["epochs"]) == (0, 10, "infonce", [1])
