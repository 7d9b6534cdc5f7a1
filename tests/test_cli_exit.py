"""How the `lors-bench` console script ends: a stage that finished well leaves at once (lors.cli.leave,
skipping about 1 s of interpreter teardown per stage process) with its log flushed; any other ending
runs Python's usual exit, exit handlers included."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from conftest import fill_grid_cells, tiny_params_dict

# the console script, plus an exit handler that reports whether the usual exit ran
SCRIPT = "import atexit; atexit.register(print, 'usual exit'); from lors.cli import main; main()"


def _lors_bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(fill_grid_cells(tiny_params_dict(tmp_path / "work"))))
    return subprocess.run([sys.executable, "-c", SCRIPT, *args, "--params", str(params)], cwd=tmp_path,
                          capture_output=True, text=True)


def test_a_finished_stage_leaves_at_once_with_its_log_flushed(tmp_path: Path) -> None:
    done = _lors_bench(tmp_path, "prepare", "--dataset", "embedded")
    assert done.returncode == 0, done.stderr
    assert "usual exit" not in done.stdout
    assert "embedded: prepared train 60 images" in done.stderr  # the stage's last log line
    assert (tmp_path / "work" / "embedded" / "prepared" / "manifest.json").is_file()


def test_a_failed_stage_exits_the_usual_way(tmp_path: Path) -> None:
    failed = _lors_bench(tmp_path, "prepare", "--dataset", "coco")
    assert failed.returncode == 2
    assert "usual exit" in failed.stdout
    assert failed.stderr.strip().splitlines()[-1].startswith("error: ")
