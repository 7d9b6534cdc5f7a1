"""params.yaml and the profiles: every file validates, the paper rows are exact, bad input is one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lors.config import load_params
from lors.errors import ConfigError
from lors.profiles import apply_profile, list_profiles

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
          "merge_branches", "no_aug", "iterations", "eval_every")


def test_profiles_exist_and_validate():
    assert {"demo", "flickr8k", "paper"} <= set(list_profiles(PROFILES))
    for name in list_profiles(PROFILES):
        assert load_params(PROFILES / f"{name}.yaml").profile == name


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
        setting = params.distill.setting(dataset, budget)
        assert tuple(getattr(setting, f) for f in FIELDS) == row, (dataset, budget)
        assert (setting.syn_steps, setting.expert_epochs, setting.lr_lr, setting.init_lr) == (8, 1, 0.01, 0.1)
        assert (setting.loss, setting.similarity, setting.momentum) == ("wbce", "lowrank", 0.5)
    assert (params.evaluate.num_eval, params.evaluate.epochs, params.evaluate.batch_size) == (5, 100, 128)
    assert (params.evaluate.momentum, params.evaluate.weight_decay, params.evaluate.eval_every) == (0.9, 5e-4, 10)
    assert (params.experts.num_experts, params.experts.lr_img, params.experts.lr_txt) == (20, 0.1, 0.1)


@pytest.mark.parametrize("name", ["demo", "flickr8k", "flickr8k-cpu", "paper"])
def test_every_grid_cell_has_an_explicit_distill_setting_and_enough_expert_epochs(name):
    """dvc.yaml reads distill.settings.<dataset>.<budget>, and experts.epochs is set explicitly so the
    experts stage does not depend on distillation knobs; it must cover every setting's last snapshot."""
    params = load_params(PROFILES / f"{name}.yaml")
    for dataset in params.grid.datasets:
        for budget in params.grid.distill_budgets:
            assert budget in params.distill.settings.get(dataset, {}), (dataset, budget)
            setting = params.distill.settings[dataset][budget]
            assert params.experts.epochs >= setting.max_start_epoch - 1 + setting.expert_epochs


def test_demo_profile_is_cpu_sized():
    params = load_params(PROFILES / "demo.yaml")
    assert params.grid.datasets == ["embedded"]
    assert (params.model.image_encoder, params.text_encoder.name) == ("test_nfnet", "minilm")


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_unknown_key_is_one_line(tmp_path):
    data = yaml.safe_load((PROFILES / "demo.yaml").read_text())
    data["distill"]["settings"]["embedded"][50]["lr_imgg"] = 1
    with pytest.raises(ConfigError) as err:
        load_params(_write(tmp_path, data))
    message = str(err.value)
    assert "\n" not in message and "distill.settings.embedded.50.lr_imgg" in message


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
