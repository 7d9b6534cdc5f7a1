"""Adding a distillation method: one module, one registry entry, one params block. A toy method
registered here, outside the package's own list, runs through distill -> evaluate -> report."""

from __future__ import annotations

import pytest
import torch
from pydantic import BaseModel, ConfigDict

from baselines.registry import check_params as check_coresets
from lors.config import Params, load_params
from lors.distill.registry import (DistillMethod, MethodContext, MethodResult, check_params, get_method, methods,
                                   register, resolve_settings)
from lors.errors import ConfigError
from lors.similarity import IdentitySimilarity
from lors.synset import SyntheticSet
from tests.conftest import tiny_params_dict


class FirstPairsSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lr: float = 0.1  # the evaluation lr the set carries
    offset: int = 0  # first caption row taken


def run_first_pairs(ctx: MethodContext) -> MethodResult:
    """The first `budget` caption rows of the train split from `offset` on, as they are."""
    from lors.data import load_split, load_text_features
    from lors.data.image_store import gather_images
    from lors.data.transforms import normalize

    split = load_split(ctx.params, ctx.dataset, "train")
    rows = torch.arange(ctx.settings.offset, ctx.settings.offset + ctx.budget)
    images = normalize(gather_images(split.images, split.txt2img[rows.numpy()]))
    texts = load_text_features(ctx.params, ctx.dataset, "train")[rows]
    for step in range(3):
        ctx.log_metrics({"loss": 1.0 / (step + 1)}, step)
    synset = SyntheticSet(images, texts, IdentitySimilarity(ctx.budget).matrix(), ctx.settings.lr, ctx.settings.lr)
    return MethodResult(synset, [{"iteration": 0, "matching_loss": 0.0}], {"rows": ctx.budget})


@pytest.fixture(scope="module")
def toy():
    return register(DistillMethod("first_pairs", FirstPairsSettings, run_first_pairs, needs_experts=False))


def toy_params(tmp_path, **cell) -> Params:
    raw = tiny_params_dict(tmp_path / "work")
    raw["grid"].update({"distill_methods": ["first_pairs"], "select_methods": ["random"], "cross_methods": []})
    raw["distill"]["first_pairs"] = {"default": {"lr": 0.05}, "settings": {"embedded": {20: cell}}}
    raw["evaluate"]["methods"]["first_pairs"] = {}
    return Params.model_validate(raw)


def test_builtin_methods_are_registered_where_they_are_defined():
    assert {"lors", "tesla_vl", "mtt_vl"} <= set(methods())
    assert get_method("lors").settings.__name__ == "LorsSettings"


def test_settings_inherit_schema_then_default_then_cell(toy, tmp_path):
    params = toy_params(tmp_path, offset=3)
    settings = resolve_settings(params, "first_pairs", "embedded", 20)
    assert (settings.lr, settings.offset) == (0.05, 3)
    assert check_params(params) == []
    bad = toy_params(tmp_path, offsett=3)
    assert check_params(bad) == ["distill.first_pairs.settings.embedded.20.offsett: Extra inputs are not permitted"]
    with pytest.raises(ValueError, match="registered twice"):
        register(DistillMethod("first_pairs", FirstPairsSettings, run_first_pairs))


def test_a_registered_method_runs_through_distill_evaluate_and_report(toy, tmp_path):
    from lors.data.prepare import prepare_dataset
    from lors.data.text_features import embed_dataset
    from lors.io import read_json
    from lors.report.collect import collect_results
    from lors.stages.distill import run_distillation
    from lors.stages.evaluate import run_evaluation
    from lors.stages.report import run_report

    params = toy_params(tmp_path, offset=2)
    prepare_dataset(params, "embedded")
    embed_dataset(params, "embedded")
    out = run_distillation(params, "embedded", 20, "first_pairs")
    synset = SyntheticSet.load(out / "synset.safetensors")
    assert len(synset) == 20 and synset.meta["method"] == "first_pairs" and synset.lr_img == pytest.approx(0.05)
    assert read_json(out / "metrics.json") == {"rows": 20}
    result = read_json(run_evaluation(params, "embedded", 20, "first_pairs"))
    assert result["method"] == "first_pairs" and result["n_pairs"] == 20
    run_report(params, tmp_path / "reports")
    assert "first_pairs" in set(collect_results(params, "embedded")["method"])
    assert "first\\_pairs" in (tmp_path / "reports" / "tables" / "embedded.tex").read_text()


def test_a_grid_naming_an_unregistered_method_fails_at_load(tmp_path):
    import yaml

    raw = tiny_params_dict(tmp_path / "work")
    raw["grid"]["distill_methods"] = ["lors", "no_such_method"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="grid.distill_methods: unknown method 'no_such_method'"):
        load_params(path, (check_params, check_coresets))
