"""MLflow tracking: store location, grouping tags, concurrent writers, read back through a real server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from lors.config import Params
from lors.tracking import Tracker, flatten, run_group, run_tags, stage_run, tracking_uri
from tests.conftest import tiny_params_dict

ROOT = Path(__file__).resolve().parents[1]
SERVER_START_S = 240  # the server imports slowly on a busy 2-core machine
WORKER = """
import sys
from lors.config import Params
from lors.tracking import stage_run
from tests.conftest import tiny_params_dict
d = tiny_params_dict(sys.argv[1]); d["tracking"] = {"uri": sys.argv[2], "experiment": "concurrent"}
p = Params.model_validate(d)
with stage_run(p, "evaluate", f"worker-{sys.argv[3]}", {"dataset": "embedded", "budget": 20, "method": "lors"}) as t:
    for step in range(5):
        t.log_metrics({"r_mean": float(sys.argv[3]) + step}, step=step)
    t.log_text("hello", "notes/hello.txt")
"""


def _params(tmp_path: Path, **tracking) -> Params:
    data = tiny_params_dict(tmp_path / "work")
    data["tracking"] = {"enabled": True, **tracking}
    return Params.model_validate(data)


def test_relative_sqlite_store_lives_in_the_parent_repo(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "repo"))  # what DVC sets for queued experiments
    assert tracking_uri(_params(tmp_path)) == f"sqlite:///{tmp_path}/repo/mlflow.db?timeout=120"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(_params(tmp_path)) == "http://127.0.0.1:5000"


def test_tags_group_runs_and_name_the_stage(tmp_path, monkeypatch):
    params = _params(tmp_path)
    monkeypatch.delenv("LORS_RUN_GROUP", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    commit_group = run_group(params)
    assert commit_group == run_group(params) and len(commit_group) == 21
    changed = params.model_copy(update={"seed": 1})
    assert run_group(changed) != commit_group  # another params set is another group
    monkeypatch.setenv("LORS_RUN_GROUP", "sweep-1")
    monkeypatch.setenv("DVC_STAGE", "evaluate@embedded-20-lors")
    tags = run_tags(params, "evaluate", {"dataset": "embedded", "budget": 20, "method": "lors"})
    assert tags["run_group"] == "sweep-1" and tags["dvc_stage"] == "evaluate@embedded-20-lors"
    assert tags["architecture"] == "test_nfnet+minilm" and tags["budget"] == "20" and tags["seed"] == "0"
    assert {"git_commit", "protocol", "profile", "stage"} <= set(tags)


def test_flatten_and_disabled_tracking(tmp_path, monkeypatch):
    assert flatten({"a": {"b": 1, "c": {"d": None}}, "e": {}}) == {"a.b": 1, "a.c.d": None, "e": {}}
    monkeypatch.setenv("LORS_TRACKING", "0")
    with stage_run(_params(tmp_path), "prepare", "x") as tracker:
        assert isinstance(tracker, Tracker) and not tracker.active
        tracker.log_metrics({"a": 1.0})  # a no-op, never an error


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_concurrent_writers_then_read_back_through_mlflow_server(tmp_path):
    """Three processes log into one fresh sqlite store at once (as `dvc queue start -j 3` workers do);
    an `mlflow server` on that store then returns all three runs with their tags and metrics."""
    db = tmp_path / "mlflow.db"
    env = {**os.environ, "LORS_TRACKING": "1", "DVC_ROOT": str(tmp_path), "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path / "work"), "sqlite:///mlflow.db", str(i)],
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
               for i in range(3)]
    for worker in workers:
        output, _ = worker.communicate(timeout=240)
        assert worker.returncode == 0, output.decode()[-2000:]
    assert db.is_file()

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{db}", "--workers", "1"],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}/api/2.0/mlflow"
        deadline = time.monotonic() + SERVER_START_S
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    pytest.fail(f"mlflow server did not start within {SERVER_START_S} s")
                time.sleep(1)
        with urllib.request.urlopen(f"{base}/experiments/get-by-name?experiment_name=concurrent", timeout=10) as r:
            experiment_id = json.loads(r.read())["experiment"]["experiment_id"]
        runs = _post(f"{base}/runs/search", {"experiment_ids": [experiment_id], "max_results": 10})["runs"]
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
    assert len(runs) == 3
    for run in runs:
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        worker = int(tags["mlflow.runName"].split("-")[1])
        assert tags["stage"] == "evaluate" and tags["dataset"] == "embedded" and tags["method"] == "lors"
        assert metrics["r_mean"] == worker + 4  # the last logged step
        assert params["model.image_encoder"] == "test_nfnet" and params["distill.default.rank"] == "4"
        assert run["info"]["status"] == "FINISHED"
        assert run["info"]["artifact_uri"].startswith((tmp_path / "mlartifacts").as_uri())
    assert len({t["value"] for r in runs for t in r["data"]["tags"] if t["key"] == "run_group"}) == 1
