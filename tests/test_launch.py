"""`lors-bench launch`: the plan read from DVC's graph, sbatch scripts and their `--dependency` chain
checked against a fake `sbatch`/`sacct`, a rerun that resubmits only what failed, and (slow) the CI demo
grid run through submitit's local executor, ending clean for DVC."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lors.config import Params
from lors.errors import ConfigError
from lors.launch import launch
from lors.launch.jobs import run_stage
from lors.launch.plan import job_groups, stale_plan
from tests.conftest import tiny_params_dict

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TOY_DVC = """
stages:
  prep:
    foreach: [a, b]
    do:
      cmd: echo ${item} > out/prep-${item}.txt
      outs:
        - out/prep-${item}.txt
  train:
    matrix: {data: [a, b], seed: [0, 1]}
    cmd: cat out/prep-${item.data}.txt > out/train-${item.data}-${item.seed}.txt
    deps:
      - out/prep-${item.data}.txt
    outs:
      - out/train-${item.data}-${item.seed}.txt
  report:
    cmd: cat out/train-* > out/report.txt
    deps: [out/train-a-0.txt, out/train-a-1.txt, out/train-b-0.txt, out/train-b-1.txt]
    outs: [out/report.txt]
"""
# sbatch: keeps each submitted script, answers like SLURM with increasing job ids
FAKE_SBATCH = """#!/bin/sh
n=$(cat "$FAKE_SLURM/next" 2>/dev/null || echo 100)
echo $((n + 1)) > "$FAKE_SLURM/next"
cp "$1" "$FAKE_SLURM/job-$n.sh"
echo "Submitted batch job $n"
"""
FAKE_SACCT = """#!/bin/sh
echo "JobID|State|NodeList"
cat "$FAKE_SLURM/states" 2>/dev/null
"""


def _toy_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / "out").mkdir(parents=True)
    (repo / "dvc.yaml").write_text(TOY_DVC)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=repo, check=True)
    return repo


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    """sbatch, sacct, scancel and srun on PATH that record instead of scheduling."""
    folder = tmp_path / "slurm"
    folder.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("sacct", FAKE_SACCT), ("srun", "#!/bin/sh\n"),
                       ("scancel", "#!/bin/sh\n")):
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(folder))
    return folder


def _cluster_params(tmp_path: Path) -> Params:
    data = tiny_params_dict(tmp_path / "work")
    data["cluster"] = {"partition": "gpu", "account": "proj42", "log_dir": str(tmp_path / "logs"),
                       "array_parallelism": 3, "setup": ["module load cuda"],
                       "default": {"time_min": 30, "cpus": 2, "mem_gb": 4},
                       "stages": {"train": {"gpus": 1, "cpus": 8, "mem_gb": 32, "time_min": 600, "partition": "a100"}}}
    return Params.model_validate(data)


def _scripts(fake: Path) -> dict[int, dict[str, str]]:
    """job id -> its #SBATCH settings, from the scripts the fake sbatch kept."""
    scripts = {}
    for path in fake.glob("job-*.sh"):
        flags = re.findall(r"^#SBATCH --([\w-]+)(?:=(.*))?$", path.read_text(), re.M)
        scripts[int(path.stem.split("-")[1])] = {key: value for key, value in flags} | {"_text": path.read_text()}
    return scripts


def _stages_of(log_dir: Path, job_id: str) -> list[str]:
    """The stage each task of a submitted job runs, read back from submitit's pickles."""
    from submitit.core.utils import DelayedSubmission

    names = []
    def task(path: Path) -> int:  # <job>_<task>_submitted.pkl in arrays, <job>_submitted.pkl otherwise
        index = path.name.split("_")[1]
        return int(index) if index.isdigit() else 0

    for path in sorted(log_dir.glob(f"{job_id}_*submitted.pkl"), key=task):
        delayed = DelayedSubmission.load(path)
        assert delayed.function is run_stage
        names.append(delayed.args[0])
    return names


def test_plan_follows_dvc_graph_and_groups_like_stages(tmp_path):
    repo = _toy_repo(tmp_path)
    plan = stale_plan(repo)
    assert [job.name for job in plan] == ["prep@a", "prep@b", "train@a-0", "train@a-1", "train@b-0", "train@b-1",
                                          "report"]
    upstream = {job.name: job.upstream for job in plan}
    assert upstream["train@a-1"] == ("prep@a",) and upstream["train@b-0"] == ("prep@b",)
    assert upstream["report"] == ("train@a-0", "train@a-1", "train@b-0", "train@b-1")
    groups = [[job.name for job in group] for group in job_groups(plan)]
    assert groups == [["prep@a", "prep@b"], ["train@a-0", "train@a-1"], ["train@b-0", "train@b-1"], ["report"]]
    assert [job.name for job in stale_plan(repo, ["train@b-*"])] == ["prep@b", "train@b-0", "train@b-1"]
    with pytest.raises(ConfigError, match="'evaluate' matches no stage"):
        stale_plan(repo, ["evaluate"])
    subprocess.run([str(BIN / "dvc"), "repro", "-q", "prep"], cwd=repo, check=True)
    assert {job.name for job in stale_plan(repo)} == {"train@a-0", "train@a-1", "train@b-0", "train@b-1", "report"}
    subprocess.run([str(BIN / "dvc"), "repro", "-q"], cwd=repo, check=True)
    assert stale_plan(repo) == []
    (repo / "out" / "prep-a.txt").write_text("changed\n")  # only prep@a and what reads it are stale again
    assert {job.name for job in stale_plan(repo)} == {"prep@a", "train@a-0", "train@a-1", "report"}


def test_sbatch_scripts_and_dependency_chain(tmp_path, fake_slurm, monkeypatch):
    repo = _toy_repo(tmp_path)
    params = _cluster_params(tmp_path)
    outcomes = launch(params, repo, "slurm")
    assert len(outcomes) == 7 and {o.state for o in outcomes} == {"submitted"}
    scripts = _scripts(fake_slurm)
    assert sorted(scripts) == [100, 101, 102, 103]  # prep array, two train arrays, report
    logs = tmp_path / "logs"
    prep, train_a, train_b, report = (scripts[i] for i in (100, 101, 102, 103))
    assert _stages_of(logs, "100") == ["prep@a", "prep@b"]
    assert _stages_of(logs, "101") == ["train@a-0", "train@a-1"] and _stages_of(logs, "102") == ["train@b-0", "train@b-1"]
    first = {"prep@a": "100_0", "prep@b": "100_1"}
    trains = {f"train@{d}-{s}": f"{job}_{s}" for job, d in (("101", "a"), ("102", "b")) for s in (0, 1)}
    assert _stages_of(logs, "103") == ["report"]

    assert prep["array"] == "0-1%2" and "dependency" not in prep and "gpus-per-node" not in prep
    assert prep["partition"] == "gpu" and prep["account"] == "proj42" and prep["time"] == "30"
    assert prep["cpus-per-task"] == "2" and prep["mem"] == "4096MB" and prep["job-name"] == "lors-prep"
    assert prep["output"] == f"{logs}/%A_%a_0_log.out" and "error" not in prep
    assert "module load cuda" in prep["_text"] and "-m submitit.core._submit" in prep["_text"]
    for script, data in ((train_a, "a"), (train_b, "b")):
        assert script["dependency"] == f"afterok:{first[f'prep@{data}']}" and script["kill-on-invalid-dep"] == "yes"
        assert script["gpus-per-node"] == "1" and script["partition"] == "a100" and script["time"] == "600"
        assert script["array"] == "0-1%2"
    assert report["dependency"] == "afterok:" + ":".join(sorted(trains.values()))
    assert "array" not in report and report["output"] == f"{logs}/%j_0_log.out"

    # the former launch: prep ran (DVC recorded it), train@a-0 failed, report was dropped with it,
    # the other trains are still queued; a rerun reports the failures and resubmits only those two
    subprocess.run([str(BIN / "dvc"), "repro", "-q", "prep"], cwd=repo, check=True)
    states = {**{job: "COMPLETED" for job in first.values()}, trains["train@a-0"]: "FAILED",
              trains["train@a-1"]: "RUNNING", trains["train@b-0"]: "PENDING", trains["train@b-1"]: "PENDING",
              "103": "CANCELLED by 0"}
    (fake_slurm / "states").write_text("".join(f"{job}|{state}|node1\n" for job, state in states.items()))
    lines = [outcome.line() for outcome in launch(params, repo, "slurm")]
    assert lines[:2] == [f"failed (FAILED): train@a-0 (job 101_0) log: {logs}/101_0_0_log.out",
                         f"failed (CANCELLED): report (job 103) log: {logs}/103_0_log.out"]
    assert lines[2:] == [f"submitted: train@a-0 (job 104) log: {logs}/104_0_log.out",
                         f"submitted: report (job 105) log: {logs}/105_0_log.out"]
    scripts = _scripts(fake_slurm)
    assert sorted(scripts) == [100, 101, 102, 103, 104, 105]
    assert _stages_of(logs, "104") == ["train@a-0"] and _stages_of(logs, "105") == ["report"]
    assert "dependency" not in scripts[104]  # its prep is done
    waited = sorted(["104", trains["train@a-1"], trains["train@b-0"], trains["train@b-1"]])
    assert scripts[105]["dependency"] == "afterok:" + ":".join(waited)

    # --wait: every former job ended; with prep done the four trains wait for nothing, so they go again as
    # one array (106) before the report (107), and the launch returns once sacct shows them all ended
    ended = {job: "COMPLETED" for job in [*trains.values(), "104", "105"]}
    ended |= {"106_0": "COMPLETED", "106_1": "COMPLETED", "106_2": "TIMEOUT", "106_3": "COMPLETED", "107": "CANCELLED"}
    (fake_slurm / "states").write_text("".join(f"{job}|{state}|node1\n" for job, state in ended.items()))
    monkeypatch.setattr("lors.launch.SLURM_POLL_S", 0)
    lines = [outcome.line() for outcome in launch(params, repo, "slurm", wait=True)]
    assert lines == [f"done: train@a-0 (job 106_0) log: {logs}/106_0_0_log.out",
                     f"done: train@a-1 (job 106_1) log: {logs}/106_1_0_log.out",
                     f"failed (TIMEOUT): train@b-0 (job 106_2) log: {logs}/106_2_0_log.out",
                     f"done: train@b-1 (job 106_3) log: {logs}/106_3_0_log.out",
                     f"failed (CANCELLED): report (job 107) log: {logs}/107_0_log.out"]
    assert _scripts(fake_slurm)[107]["dependency"] == "afterok:106_0:106_1:106_2:106_3"


@pytest.mark.slow
def test_local_executor_on_a_toy_pipeline_ends_clean_and_skips_below_a_failure(tmp_path, monkeypatch):
    """Seven shell stages, two jobs at a time: DVC records each, and a failing stage skips its report."""
    repo = _toy_repo(tmp_path)
    monkeypatch.setenv("LORS_TRACKING", "0")
    monkeypatch.chdir(repo)
    params = _cluster_params(tmp_path)
    outcomes = launch(params, repo, "local", jobs=2)
    assert [(o.stage, o.state) for o in outcomes] == [(name, "done") for name in (
        "prep@a", "prep@b", "train@a-0", "train@a-1", "train@b-0", "train@b-1", "report")]
    assert (repo / "out" / "report.txt").read_text() == "a\na\nb\nb\n" and outcomes[0].log.is_file()
    status = subprocess.run([str(BIN / "dvc"), "status"], cwd=repo, capture_output=True, text=True)
    assert "up to date" in status.stdout and len(yaml.safe_load((repo / "dvc.lock").read_text())["stages"]) == 7
    assert launch(params, repo, "local") == []  # nothing stale, nothing run

    (repo / "dvc.yaml").write_text(TOY_DVC.replace("echo ${item} >", "exit 3 ||"))
    outcomes = {o.stage: o for o in launch(params, repo, "local", jobs=2)}
    assert outcomes["prep@a"].state == "failed" and outcomes["report"].state == "skipped"
    assert "exited with status" in outcomes["prep@a"].log.read_text()


def test_dry_run_lists_job_arrays_of_the_real_pipeline(tmp_path, capsys):
    """The pipeline's own dvc.yaml, nothing run yet: every stage planned, grouped as arrays."""
    from tests.test_demo_e2e import copy_project

    copy_project(tmp_path)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    params = Params.model_validate(yaml.safe_load((tmp_path / "params.yaml").read_text()))
    assert launch(params, tmp_path, dry_run=True) == []
    lines = capsys.readouterr().out.splitlines()
    distill = next(line for line in lines if " x distill " in line)
    count = len(params.grid.distill_methods) * len(params.grid.distill_budgets)
    assert distill.startswith(f"{count} x distill (gpus 1,") and distill.endswith("after experts@embedded") is \
        any(line.startswith("1 x experts") for line in lines)
    assert lines[-1].startswith("1 x report (gpus 0")


def _copy_demo(target: Path, params: dict) -> None:
    from tests.test_demo_e2e import copy_project

    copy_project(target)
    (target / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=target, check=True)


def launch_ci_params() -> dict:
    """The CI demo grid with one method per family: every stage kind of the pipeline, minutes less."""
    from tests.test_demo_e2e import _ci_params

    data = _ci_params()
    data["grid"].update({"distill_methods": ["lors"], "select_methods": ["random"]})
    data["cluster"] = {"log_dir": "work/launch"}
    return data


@pytest.mark.slow
def test_local_executor_runs_the_demo_grid_and_dvc_ends_clean(tmp_path):
    """Ten stages, two at a time, MLflow live: minutes on a quiet 2-core machine, far more on a busy one."""
    _copy_demo(tmp_path, launch_ci_params())
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(tmp_path),
           "LORS_TRACKING": "1", "LORS_RUN_GROUP": "launch-ci"}
    run = subprocess.run([str(BIN / "lors-bench"), "launch", "--executor", "local", "-j", "2"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=3600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count("done: ") == 10 and "failed" not in run.stdout
    assert "\nLoRS &" in (tmp_path / "reports" / "tables" / "embedded.tex").read_text()
    status = subprocess.run([str(BIN / "dvc"), "status"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout
    lock = yaml.safe_load((tmp_path / "dvc.lock").read_text())["stages"]
    assert len(lock) == 10 and "distill@embedded-10-lors" in lock
    again = subprocess.run([str(BIN / "lors-bench"), "launch", "--executor", "local"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout == "", again.stdout + again.stderr[-2000:]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("lors-bench").experiment_id], max_results=100)
    (parent,) = [r for r in runs if r.data.tags.get("lors_role") == "pipeline"]
    children = [r for r in runs if r is not parent]
    assert parent.data.tags["run_group"] == "launch-ci" and parent.info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert {r.info.status for r in children} == {"FINISHED"}
    assert len({r.data.tags["lors_record_id"] for r in children}) == len(children)
    assert {r.data.tags["dvc_stage"] for r in children} >= {"distill@embedded-10-lors", "experts@embedded-0",
                                                           "evaluate@embedded-10-lors"}
    assert "matching_loss" in next(r for r in children if r.data.tags["stage"] == "distill").data.metrics
