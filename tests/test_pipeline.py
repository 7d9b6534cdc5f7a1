"""dvc.yaml resolves for every profile, covers its whole grid, and names only params keys that exist."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from lors.config import load_params

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"prepare", "embed_text", "experts", "distill", "select", "evaluate", "evaluate_coreset",
          "evaluate_cross", "evaluate_whole", "report"}


def _repo_with(tmp_path: Path, profile: str):
    from dvc.repo import Repo

    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(ROOT / "profiles" / f"{profile}.yaml", tmp_path / "params.yaml")
    shutil.copytree(ROOT / ".dvc", tmp_path / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    return Repo(str(tmp_path))


def _lookup(data: dict, dotted: str):
    node = data
    for part in dotted.split("."):
        key = int(part) if isinstance(node, dict) and part.isdigit() and int(part) in node else part
        node = node[key]
    return node


@pytest.mark.parametrize("profile", ["demo", "flickr8k", "paper"])
def test_dag_covers_the_grid_and_params_exist(tmp_path, profile):
    repo = _repo_with(tmp_path, profile)
    stages = {s.name: s for s in repo.index.stages}
    params = load_params(tmp_path / "params.yaml")
    grid = params.grid
    assert {name.split("@")[0] for name in stages} <= STAGES
    for ds in grid.datasets:
        for stage in ("prepare", "embed_text", "evaluate_whole", "report"):
            assert f"{stage}@{ds}" in stages
        for expert in params.grid.experts:
            assert f"experts@{ds}-{expert}" in stages
        for b in grid.distill_budgets:
            for m in grid.distill_methods:
                assert f"distill@{ds}-{b}-{m}" in stages and f"evaluate@{ds}-{b}-{m}" in stages
            for m in grid.cross_methods:
                for arch in grid.archs:
                    assert f"evaluate_cross@{ds}-{b}-{m}-{arch}" in stages
        for b in grid.select_budgets:
            for m in grid.select_methods:
                assert f"select@{ds}-{b}-{m}" in stages and f"evaluate_coreset@{ds}-{b}-{m}" in stages
    raw = yaml.safe_load((tmp_path / "params.yaml").read_text())
    for stage in stages.values():
        for dep in stage.deps:
            for key in getattr(dep, "params", None) or []:
                _lookup(raw, key)  # KeyError: dvc repro would stop with "params missing"
    # the DAG is acyclic and every evaluation feeds its dataset's report
    graph = repo.index.graph
    report = stages[f"report@{grid.datasets[0]}"]
    upstream = {s.name for s in _ancestors(graph, report)}
    assert f"evaluate@{grid.datasets[0]}-{grid.distill_budgets[0]}-{grid.distill_methods[0]}" in upstream
    assert f"prepare@{grid.datasets[0]}" in upstream


def _ancestors(graph, node):
    import networkx as nx

    return nx.descendants(graph, node)  # DVC's graph points from a stage to the stages it depends on


def _params_of(repo, name: str) -> list[str]:
    stage = next(s for s in repo.index.stages if s.name == name)
    return [k for dep in stage.deps for k in (getattr(dep, "params", None) or [])]


def test_distill_reads_only_its_own_method_and_cell(tmp_path):
    """Changing one (dataset, budget) row or another method's block must not rerun a distillation, and no
    evaluation knob reaches one (evaluation has its own stages)."""
    repo = _repo_with(tmp_path, "paper")
    keys = _params_of(repo, "distill@flickr30k-100-lors")
    assert {"distill.lors.default", "distill.lors.settings.flickr30k.100"} <= set(keys)
    assert not any(k == "distill" or k.startswith(("distill.lors.settings.coco", "distill.tesla_vl", "distill.mtt_vl",
                                                   "evaluate")) for k in keys), keys
    tesla = _params_of(repo, "distill@flickr30k-100-tesla_vl")
    assert not any(k.startswith("distill.lors") for k in tesla), tesla


def test_evaluation_reads_only_its_own_method_entry(tmp_path):
    repo = _repo_with(tmp_path, "paper")
    keys = _params_of(repo, "evaluate@coco-200-lors")
    assert "evaluate.methods.lors" in keys and "evaluate.default" in keys
    assert not any(k == "evaluate" or k.startswith("evaluate.methods.mtt_vl") for k in keys)
    assert "evaluate.methods.herding" in _params_of(repo, "evaluate_coreset@coco-200-herding")


def test_experts_are_one_stage_each_and_distillation_waits_for_all_of_them(tmp_path):
    import networkx as nx

    repo = _repo_with(tmp_path, "paper")
    stages = {s.name: s for s in repo.index.stages}
    assert [f"experts@coco-{i}" in stages for i in range(20)] == [True] * 20
    upstream = {s.name for s in nx.descendants(repo.index.graph, stages["distill@coco-100-lors"])}
    assert {f"experts@coco-{i}" for i in range(20)} <= upstream
    assert not any(name.startswith("experts@flickr30k") for name in upstream)
