"""End to end: `dvc repro` of a CI-sized demo grid in a copy of the repo, then the outputs, then a no-op repro."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COPY = ("dvc.yaml", "params.yaml", ".dvc", ".dvcignore", "lors", "baselines", "profiles", "reports/published.csv",
        "reports/expected-demo.csv")


def _ci_params() -> dict:
    """The demo profile shrunk to one budget per family and two methods each: the same stages, minutes less."""
    data = yaml.safe_load((ROOT / "profiles" / "demo.yaml").read_text())
    data["grid"].update({"experts": [0], "distill_methods": ["lors", "tesla_vl"], "distill_budgets": [10],
                         "select_methods": ["random", "herding"], "select_budgets": [10],
                         "archs": ["test_resnet+minilm"]})
    data["datasets"]["embedded"].update({"image_size": 16, "embedded": {"n_train": 60, "n_val": 20, "n_test": 20,
                                                                      "captions_per_image": 5, "seed": 0}})
    for method in ("lors", "tesla_vl"):
        block = data["distill"][method]
        block["default"].update({"iterations": 4, "syn_steps": 2, "lr_lr": 1e-5})  # 16 px: lrs stay positive
        block["settings"] = {"embedded": {10: {}}}
    data["distill"]["lors"]["default"]["lr_sim"] = 1  # the demo's 30 is for its frozen Lite0
    # a random test_nfnet, trained: the cross-architecture stage needs a backbone every arch can build
    # (the demo's frozen Lite0 has weights for Lite0 only; tests/test_frozen_backbone.py covers that path)
    data["model"] = {"image_encoder": "test_nfnet", "pretrained": False}
    data["experts"].update({"batch_size": 32})
    data["evaluate"].update({"num_eval": 1, "whole_epochs": 1})
    data["evaluate"]["default"].update({"epochs": 2, "eval_every": 1})
    return data


def _stale(dvc, cwd, env) -> set[str]:
    """Stage names `dvc status` reports as changed."""
    import json

    out = subprocess.run([*dvc, "status", "--json"], cwd=cwd, env=env, capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout or "{}"))


def copy_project(into: Path) -> None:
    """The files a `dvc repro` of the pipeline needs, copied into a fresh folder."""
    for name in COPY:
        source, target = ROOT / name, into / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
        else:
            shutil.copy(source, target)


@pytest.mark.slow
def test_dvc_repro_demo_end_to_end(tmp_path):
    copy_project(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(_ci_params(), sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(tmp_path),
           "LORS_TRACKING": "1", "LORS_RUN_GROUP": "ci"}
    dvc = [str(Path(sys.executable).parent / "dvc")]
    first = subprocess.run([*dvc, "repro"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    tables = tmp_path / "reports" / "tables"
    main = (tables / "embedded.tex").read_text()
    for method in ("Random", "Herding", "LoRS", "TESLA-VL", "Whole dataset"):
        assert f"\n{method} &" in main
    assert "protocol clean, profile demo" in main
    assert "test\\_resnet+minilm" in (tables / "embedded-cross.tex").read_text()
    figures = {p.name for p in (tmp_path / "reports" / "figures" / "embedded").iterdir()}
    assert {"retrieval-vs-budget.png", "samples-lors-10.png", "similarity-lors-10.png"} <= figures
    assert (tmp_path / "mlflow.db").is_file()
    shown = subprocess.run([*dvc, "metrics", "show"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert "reports/metrics/embedded.json" in shown.stdout

    second = subprocess.run([*dvc, "repro"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and "Running stage" not in second.stdout, second.stdout[-2000:]

    # issue 10's measured defects: each edit marks exactly the stages that depend on it
    params_file = tmp_path / "params.yaml"
    original = params_file.read_text()
    edited = yaml.safe_load(original)
    edited["evaluate"]["num_eval"] = 2
    params_file.write_text(yaml.safe_dump(edited, sort_keys=False))
    stale = _stale(dvc, tmp_path, env)
    assert stale and not any(s.startswith(("distill", "select", "experts")) for s in stale), stale
    edited = yaml.safe_load(original)
    edited["distill"]["lors"]["default"]["rank"] = 3
    params_file.write_text(yaml.safe_dump(edited, sort_keys=False))
    assert _stale(dvc, tmp_path, env) == {"distill@embedded-10-lors"}
    params_file.write_text(original)
    for module in ("lors/retrieval.py", "lors/runtime.py", "lors/synset.py", "lors/checkpoints.py",
                   "lors/data/transforms.py", "lors/data/augment.py"):
        path = tmp_path / module
        text = path.read_text()
        path.write_text(text + "\n# edited\n")
        assert _stale(dvc, tmp_path, env), f"a change to {module} reruns nothing"
        path.write_text(text)
    status = subprocess.run([str(Path(sys.executable).parent / "lors-bench"), "status"], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert status.returncode == 0 and "distill@embedded-10-lors" in status.stdout, status.stdout + status.stderr
    assert status.stdout.strip().splitlines()[-1].startswith(tuple("0123456789")), status.stdout
