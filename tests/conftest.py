"""Shared fixtures: the real test data in ../shared (skipped when absent) and tiny params."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lors.config import Params

os.environ.setdefault("LORS_TRACKING", "0")  # unit tests never write to an MLflow store
torch.set_num_threads(min(2, torch.get_num_threads()))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


TINY_TM = {"iterations": 3, "syn_steps": 2, "lr_img": 100, "lr_txt": 100}  # trajectory-matching knobs


def tiny_params_dict(work_dir: Path) -> dict:
    """A CPU-sized configuration on a small embedded dataset: seconds per stage."""
    return {
        "profile": "test",
        "seed": 0,
        "work_dir": str(work_dir),
        "device": "cpu",
        "grid": {"datasets": ["embedded"], "experts": [0, 1], "distill_budgets": [20], "select_budgets": [20]},
        "datasets": {"embedded": {"kind": "embedded", "image_size": 16,
                                  "embedded": {"n_train": 60, "n_val": 20, "n_test": 20, "seed": 0}}},
        "text_encoder": {"name": "minilm", "pooling": "mean", "batch_size": 64},
        "model": {"image_encoder": "test_nfnet", "pretrained": False},
        "experts": {"epochs": 2, "batch_size": 32, "augment": True},
        "distill": {"checkpoint_every": 2,
                    "lors": {"default": {**TINY_TM, "mini_batch": 8, "lr_sim": 10, "rank": 4, "alpha": 1.0},
                             "settings": {"embedded": {20: {}}}},
                    "tesla_vl": {"default": {**TINY_TM, "mini_batch": 8}, "settings": {"embedded": {20: {}}}},
                    "mtt_vl": {"default": TINY_TM, "settings": {"embedded": {20: {}}}}},
        "evaluate": {"num_eval": 2, "default": {"epochs": 4, "eval_every": 2},
                     "methods": {m: {} for m in ("lors", "tesla_vl", "mtt_vl", "random", "herding", "kcenter",
                                                 "forgetting", "vas", "clip_score")}},
        "tracking": {"enabled": False},
    }


def fill_grid_cells(raw: dict) -> dict:
    """After a test edits the grid: the `{}` entries dvc.yaml and validation need for every new cell."""
    grid = raw["grid"]
    for method, block in raw["distill"].items():
        if isinstance(block, dict):
            for dataset in grid.get("datasets", []):
                cells = block.setdefault("settings", {}).setdefault(dataset, {})
                for budget in grid.get("distill_budgets", [20]):
                    cells.setdefault(budget, {})
    for method in [*grid.get("distill_methods", ["lors", "tesla_vl", "mtt_vl"]), *grid.get("select_methods", [])]:
        raw["evaluate"].setdefault("methods", {}).setdefault(method, {})
    return raw


@pytest.fixture
def tiny_params(tmp_path: Path) -> Params:
    return Params.model_validate(tiny_params_dict(tmp_path / "work"))
