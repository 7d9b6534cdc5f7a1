"""MLflow tracking: run records written without MLflow, replayed into a store once, crash-safe and
concurrency-safe flushing, store location, grouping tags, one parent run per pipeline run, live runs
streamed by a follower process (and replayed once when it dies), MLflow failures as warnings, and runs
read back through a real server."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from lors.config import Params
from lors.errors import LorsError
from lors.tracking import (PARENT_TAG, RECORD_ID_TAG, Tracker, flatten, flush_pending, flush_pending_or_warn,
                           run_group, run_tags, stage_run, tracking_dir, tracking_uri)
from tests.conftest import tiny_params_dict

ROOT = Path(__file__).resolve().parents[1]
SERVER_START_S = 240  # the server imports slowly on a busy 2-core machine
WORKER = """
import sys
from lors.config import Params
from lors.tracking import flush_pending, stage_run
from tests.conftest import tiny_params_dict
d = tiny_params_dict(sys.argv[1]); d["tracking"] = {"uri": sys.argv[2], "experiment": "concurrent", "live": []}
p = Params.model_validate(d)
with stage_run(p, "evaluate", f"worker-{sys.argv[3]}", {"dataset": "embedded", "budget": 20, "method": "lors"}) as t:
    for step in range(5):
        t.log_metrics({"r_mean": float(sys.argv[3]) + step}, step=step)
    t.log_text("hello", "notes/hello.txt")
flush_pending(p)  # what each queue worker's report stage does
"""
FLUSHER = """
import pathlib, sys, time
import mlflow  # imported before the start signal, so the flushes overlap
from lors.config import Params
from lors.tracking import flush_pending
pathlib.Path(sys.argv[2] + ".ready").touch()
while not pathlib.Path(sys.argv[3]).exists():
    time.sleep(0.05)
print(flush_pending(Params.model_validate_json(sys.argv[1])))
"""


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    """One sqlite store for the in-process tests (each uses its own experiment): created once, as it is slow."""
    return tmp_path_factory.mktemp("store")


@pytest.fixture
def tracked(monkeypatch, store_dir):
    """Tracking on, artifacts under `store_dir`, no grouping from the environment."""
    monkeypatch.setenv("LORS_TRACKING", "1")
    monkeypatch.setenv("DVC_ROOT", str(store_dir))
    for name in ("MLFLOW_TRACKING_URI", "LORS_RUN_GROUP", "DVC_EXP_NAME", "DVC_STAGE"):
        monkeypatch.delenv(name, raising=False)
    return store_dir


def _params(tmp_path: Path, **tracking) -> Params:
    data = tiny_params_dict(tmp_path / "work")
    data["tracking"] = {"enabled": True, "live": [], **tracking}
    return Params.model_validate(data)


def _store_params(tmp_path: Path, store_dir: Path, experiment: str, **tracking) -> Params:
    return _params(tmp_path, uri=f"sqlite:///{store_dir / 'mlflow.db'}", experiment=experiment, **tracking)


def _all_runs(params: Params) -> list:
    """The active runs of the params' experiment, read straight from the store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(params))
    experiment = client.get_experiment_by_name(params.tracking.experiment)
    return [] if experiment is None else client.search_runs([experiment.experiment_id], max_results=1000)


def _runs(params: Params) -> list:
    """The stage runs (not the pipeline parent runs)."""
    return [run for run in _all_runs(params) if run.data.tags.get("lors_role") != "pipeline"]


def _parents(params: Params) -> list:
    return [run for run in _all_runs(params) if run.data.tags.get("lors_role") == "pipeline"]


def _pending(params: Params) -> list[Path]:
    folder = tracking_dir(params) / "pending"
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


def _record(params: Params, index: int) -> None:
    with stage_run(params, "evaluate", f"run-{index}", {"index": index}) as tracker:
        tracker.log_metrics({"loss": 1.0 / (index + 1)}, step=index)
        tracker.log_text(f"record {index}", "notes/index.txt")


def test_relative_sqlite_store_lives_in_the_parent_repo(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "repo"))  # what DVC sets for queued experiments
    assert tracking_uri(_params(tmp_path)) == f"sqlite:///{tmp_path}/repo/mlflow.db?timeout=120"
    relative = _params(tmp_path).model_copy(update={"work_dir": Path("work")})
    assert tracking_dir(relative) == tmp_path / "repo" / "work" / "tracking"  # records outlive the temp copy
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
    params = _params(tmp_path)
    with stage_run(params, "prepare", "x") as tracker:
        assert isinstance(tracker, Tracker) and not tracker.active
        tracker.log_metrics({"a": 1.0})  # a no-op, never an error
    assert not tracking_dir(params).exists() and flush_pending(params) == 0  # no record at all


def test_records_are_written_without_mlflow_then_replayed(tmp_path, tracked, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = _store_params(tmp_path, tracked, "replay")
    monkeypatch.setenv("LORS_RUN_GROUP", "repro-7")
    monkeypatch.setitem(sys.modules, "mlflow", None)  # any `import mlflow` while recording fails
    source = tmp_path / "result.json"
    source.write_text('{"r_mean": 1}')
    figure, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    with stage_run(params, "evaluate", "embedded/lors-20", {"dataset": "embedded", "budget": 20}) as tracker:
        assert tracker.active
        tracker.log_params({"num_eval": 2, **{f"sweep.{i}": i for i in range(150)}})  # more than one batch
        for step in range(3):
            tracker.log_metrics({"r_mean": 10.0 + step, "loss": 1.0 / (step + 1)}, step=step)
        tracker.set_tags({"text_transfer": "reference"})
        tracker.log_artifact(source)
        tracker.log_artifact(source, "copies")
        tracker.log_text("some notes", "notes/readme.txt")
        tracker.log_figure(figure, "plots/curve.png")
    plt.close(figure)
    source.write_text('{"r_mean": 2}')  # a later rerun of the stage must not change the logged artifact
    with pytest.raises(ValueError, match="diverged"):
        with stage_run(params, "distill", "embedded/mtt_vl-20", {"dataset": "embedded"}) as tracker:
            tracker.log_metrics({"matching_loss": 0.5}, step=4)
            raise ValueError("diverged")
    records = _pending(params)
    assert len(records) == 2 and all((r / "record.json").is_file() for r in records)
    assert {json.loads((r / "record.json").read_text())["status"] for r in records} == {"FINISHED", "FAILED"}

    monkeypatch.delitem(sys.modules, "mlflow")
    assert flush_pending(params) == 2
    assert _pending(params) == [] and flush_pending(params) == 0
    runs = {run.info.run_name: run for run in _runs(params)}
    assert set(runs) == {"embedded/lors-20", "embedded/mtt_vl-20"}
    good, failed = runs["embedded/lors-20"], runs["embedded/mtt_vl-20"]
    assert good.info.status == "FINISHED" and failed.info.status == "FAILED"
    assert good.info.start_time <= good.info.end_time
    tags = good.data.tags
    assert tags["run_group"] == "repro-7" == failed.data.tags["run_group"]
    assert tags["stage"] == "evaluate" and tags["budget"] == "20" and tags["text_transfer"] == "reference"
    assert tags[RECORD_ID_TAG] != failed.data.tags[RECORD_ID_TAG]
    (parent,) = _parents(params)  # both runs nested under the one run of their pipeline run
    assert parent.info.run_name == "pipeline repro-7" and parent.data.tags["run_group"] == "repro-7"
    assert tags[PARENT_TAG] == parent.info.run_id == failed.data.tags[PARENT_TAG]
    assert parent.info.status == "FINISHED"
    assert good.data.params["num_eval"] == "2" and good.data.params["model.image_encoder"] == "test_nfnet"
    assert good.data.params["distill.lors.default.rank"] == "4" and good.data.params["sweep.149"] == "149"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(params))
    history = client.get_metric_history(good.info.run_id, "r_mean")
    assert sorted((m.step, m.value) for m in history) == [(0, 10.0), (1, 11.0), (2, 12.0)]
    assert [(m.step, m.value) for m in client.get_metric_history(failed.info.run_id, "matching_loss")] == [(4, 0.5)]
    local = Path(client.download_artifacts(good.info.run_id, "", str(tmp_path / "download")))
    assert (local / "result.json").read_text() == '{"r_mean": 1}' == (local / "copies/result.json").read_text()
    assert (local / "notes/readme.txt").read_text() == "some notes"
    assert (local / "plots/curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert good.info.artifact_uri.startswith((tracked / "mlartifacts").as_uri())


def test_crashed_flush_is_redone_without_duplicates(tmp_path, tracked, monkeypatch):
    from mlflow.tracking import MlflowClient

    params = _store_params(tmp_path, tracked, "crash")
    for index in range(3):
        _record(params, index)

    def lose_the_disk(*args, **kwargs):
        raise OSError("disk gone")

    with monkeypatch.context() as patch:  # dies after the run was created and half written
        patch.setattr(MlflowClient, "log_artifacts", lose_the_disk)
        with pytest.raises(LorsError, match="3 run record"):
            flush_pending(params)
    assert len(_pending(params)) == 3 and {r.info.status for r in _runs(params)} == {"RUNNING"}

    terminate = MlflowClient.set_terminated

    def terminate_then_die(self, *args, **kwargs):
        terminate(self, *args, **kwargs)
        raise KeyboardInterrupt  # killed after the run was complete, before its record was removed

    with monkeypatch.context() as patch:
        patch.setattr(MlflowClient, "set_terminated", terminate_then_die)
        with pytest.raises(KeyboardInterrupt):
            flush_pending(params)
    assert len(_pending(params)) == 3

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    claimed = tracking_dir(params) / f"flushing-{int(dead.stdout)}"  # a flusher that was killed mid-claim
    claimed.mkdir()
    _pending(params)[-1].rename(claimed / _pending(params)[-1].name)

    assert flush_pending(params) == 3
    runs = _runs(params)
    assert sorted(r.info.run_name for r in runs) == ["run-0", "run-1", "run-2"]
    assert {r.info.status for r in runs} == {"FINISHED"} and len({r.data.tags[RECORD_ID_TAG] for r in runs}) == 3
    assert not claimed.exists() and _pending(params) == []
    assert MlflowClient(tracking_uri(params)).list_artifacts(runs[0].info.run_id, "notes")[0].path == "notes/index.txt"


def test_concurrent_flushers_write_each_run_once(tmp_path, tracked):
    """Queue workers finishing together all flush the shared records (the slow test below does this on a
    fresh store)."""
    params = _store_params(tmp_path, tracked, "flushers")
    for index in range(12):
        _record(params, index)
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    flushers = [subprocess.Popen([sys.executable, "-c", FLUSHER, params.model_dump_json(), str(tmp_path / str(i)),
                                  str(go)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                for i in range(3)]
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"{i}.ready").exists() for i in range(3)):
            assert time.monotonic() < deadline and all(f.poll() is None for f in flushers), "a flusher did not start"
            time.sleep(0.1)
        go.touch()
        outputs = [f.communicate(timeout=240) for f in flushers]
    finally:
        for flusher in flushers:
            flusher.kill()
    for flusher, (out, err) in zip(flushers, outputs):
        assert flusher.returncode == 0, err.decode()[-2000:]
    assert sum(int(out.decode().split()[-1]) for out, _ in outputs) == 12
    runs = _runs(params)
    assert sorted(r.info.run_name for r in runs) == sorted(f"run-{i}" for i in range(12))
    assert len({r.data.tags[RECORD_ID_TAG] for r in runs}) == 12 and {r.info.status for r in runs} == {"FINISHED"}
    assert _pending(params) == [] and not list(tracking_dir(params).glob("flushing-*"))
    (parent,) = _parents(params)  # flushers racing to create it made one
    assert {r.data.tags[PARENT_TAG] for r in runs} == {parent.info.run_id}


def test_defer_false_logs_right_away(tmp_path, tracked):
    params = _store_params(tmp_path, tracked, "immediate", defer=False)
    with stage_run(params, "distill", "manual", {"dataset": "embedded"}) as tracker:
        tracker.log_metrics({"matching_loss": 0.25}, step=1)
    assert _pending(params) == []
    (run,) = _runs(params)
    assert run.info.run_name == "manual" and run.data.metrics == {"matching_loss": 0.25}
    assert run.info.status == "FINISHED"


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
    names = sorted(next(t["value"] for t in r["data"]["tags"] if t["key"] == "mlflow.runName") for r in runs)
    assert len(runs) == 4 and names[0].startswith("pipeline "), names  # one parent run per pipeline run
    runs = [r for r in runs if not any(t["key"] == "mlflow.runName" and t["value"].startswith("pipeline ")
                                       for t in r["data"]["tags"])]
    assert len(runs) == 3
    for run in runs:
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        worker = int(tags["mlflow.runName"].split("-")[1])
        assert tags["stage"] == "evaluate" and tags["dataset"] == "embedded" and tags["method"] == "lors"
        assert metrics["r_mean"] == worker + 4  # the last logged step
        assert params["model.image_encoder"] == "test_nfnet" and params["distill.lors.default.rank"] == "4"
        assert run["info"]["status"] == "FINISHED"
        assert run["info"]["artifact_uri"].startswith((tmp_path / "mlartifacts").as_uri())
    assert len({t["value"] for r in runs for t in r["data"]["tags"] if t["key"] == "run_group"}) == 1


def _wait_for(condition, what: str, timeout_s: float = 120):
    """Poll until `condition()` returns something truthy (the follower imports MLflow in seconds)."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


def _history(params: Params, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(tracking_uri(params)).get_metric_history(run_id, key))


def _live_run(params: Params, steps: int):
    """The stage's live run once it shows `steps` steps of matching_loss, while the stage still runs."""
    def ready():
        runs = _runs(params)
        return runs[0] if runs and len(_history(params, runs[0].info.run_id, "matching_loss")) == steps else None
    return _wait_for(ready, f"{steps} live step(s)")


@pytest.mark.slow
def test_live_run_shows_metrics_while_the_stage_runs(tmp_path, tracked, monkeypatch):
    """A distillation's losses appear in MLflow during the stage, under the pipeline's parent run; the
    follower then completes the same run (no second run, no duplicated step) and cleans up."""
    monkeypatch.setenv("LORS_LIVE_POLL_S", "0.3")
    monkeypatch.setenv("LORS_RUN_GROUP", "live-1")
    params = _store_params(tmp_path, tracked, "live", live=["distill"])
    monkeypatch.setitem(sys.modules, "mlflow", None)  # the stage itself never imports MLflow
    with stage_run(params, "distill", "embedded/lors-20", {"dataset": "embedded"}) as tracker:
        for step in range(2):
            tracker.log_metrics({"matching_loss": 1.0 / (step + 1)}, step=step)
        monkeypatch.delitem(sys.modules, "mlflow")
        live = _live_run(params, 2)
        assert live.info.status == "RUNNING" and live.data.params["distill.lors.default.rank"] == "4"
        (parent,) = _parents(params)
        assert live.data.tags[PARENT_TAG] == parent.info.run_id and parent.info.status == "RUNNING"
        tracker.log_metrics({"matching_loss": 0.25}, step=2)
        tracker.log_text("done", "notes/end.txt")
    done = _wait_for(lambda: [r for r in _runs(params) if r.info.status == "FINISHED"], "the finished run")
    assert [r.info.run_id for r in _runs(params)] == [live.info.run_id] == [done[0].info.run_id]
    assert _history(params, live.info.run_id, "matching_loss") == [(0, 1.0), (1, 0.5), (2, 0.25)]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(params))
    assert [a.path for a in client.list_artifacts(live.info.run_id, "notes")] == ["notes/end.txt"]
    _wait_for(lambda: not (tracking_dir(params) / "live").exists() or not any((tracking_dir(params) / "live").iterdir()),
              "the follower to clean up", 30)
    assert _pending(params) == [] and flush_pending(params) == 0
    assert _parents(params)[0].info.status == "FINISHED"


@pytest.mark.slow
def test_dead_follower_run_is_replayed_once(tmp_path, tracked, monkeypatch):
    """A follower killed mid-run leaves a RUNNING run; once its heartbeat is stale a flush replaces it by
    the complete run: one active run per stage run, nothing lost."""
    monkeypatch.setenv("LORS_LIVE_POLL_S", "0.3")
    params = _store_params(tmp_path, tracked, "dead", live=["evaluate"])
    with stage_run(params, "evaluate", "embedded/lors-20", {"dataset": "embedded"}) as tracker:
        tracker.log_metrics({"matching_loss": 2.0}, step=0)
        _live_run(params, 1)
        (folder,) = (tracking_dir(params) / "live").iterdir()
        os.kill(int((folder / "follower.pid").read_text()), signal.SIGKILL)
        tracker.log_metrics({"matching_loss": 1.0}, step=1)
    assert len(_pending(params)) == 1 and flush_pending(params) == 0  # the heartbeat is still fresh: left alone
    monkeypatch.setattr("lors.tracking.LIVE_STALE_S", 0)
    assert flush_pending(params) == 1
    (run,) = _runs(params)
    assert run.info.status == "FINISHED" and _history(params, run.info.run_id, "matching_loss") == [(0, 2.0), (1, 1.0)]
    assert run.data.tags[PARENT_TAG] == _parents(params)[0].info.run_id
    assert not (tracking_dir(params) / "live" / folder.name).exists()


def test_mlflow_failures_warn_and_never_fail_a_stage(tmp_path, tracked, monkeypatch, caplog):
    params = _store_params(tmp_path, tracked, "failing", live=["distill"])

    def fail(*args, **kwargs):
        raise OSError("fork failed")

    with caplog.at_level(logging.WARNING, logger="lors"), monkeypatch.context() as patch:
        patch.setattr("lors.tracking.subprocess.Popen", fail)  # no live follower
        with stage_run(params, "distill", "no-follower") as tracker:
            tracker.log_metrics({"matching_loss": 1.0}, step=0)
        assert "no live run (fork failed)" in caplog.text
        assert len(_pending(params)) == 1 and not any((tracking_dir(params) / "live").iterdir())
        patch.setattr("lors.tracking._open_store", fail)
        assert flush_pending_or_warn(params) == 0  # what the report stage calls: a warning, then the tables
        assert "1 run record(s) stay pending" in caplog.text and "fork failed" in caplog.text
    assert flush_pending(params) == 1 and [r.info.run_name for r in _runs(params)] == ["no-follower"]
