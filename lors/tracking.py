"""MLflow tracking for every stage run.

Stages call `stage_run(...)` and log through the returned tracker; with tracking disabled (or in
unit tests) the tracker is a no-op, so library code never branches on MLflow. mlflow is imported
only here and only when tracking is on, so a GPU box with just the ML stack can run every stage.

Parallel runs (`dvc exp run --queue` + `dvc queue start -j N`) share one sqlite store: its path is
resolved against the parent repository (DVC_ROOT, set by DVC for queued experiments that run in
temporary copies), writers wait on a busy timeout instead of failing, and store creation plus run
start are serialised by a file lock so workers starting together do not race the schema migration.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lors.config import Params
from lors.io import sha256_json

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_S = 120
MAX_PARAMS_PER_CALL = 100  # MLflow's batch limit
SETUP_ATTEMPTS = 5


class Tracker:
    """Logs to an active MLflow run, or nowhere when `mlflow` is None."""

    def __init__(self, mlflow: Any = None) -> None:
        self._mlflow = mlflow

    @property
    def active(self) -> bool:
        return self._mlflow is not None

    def log_params(self, params: Mapping[str, Any]) -> None:
        if self._mlflow:
            items = [(k, str(v)[:500]) for k, v in params.items()]
            for start in range(0, len(items), MAX_PARAMS_PER_CALL):
                self._mlflow.log_params(dict(items[start:start + MAX_PARAMS_PER_CALL]))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self._mlflow:
            self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        if self._mlflow:
            self._mlflow.log_artifact(str(path), artifact_path=folder)

    def log_figure(self, figure: Any, name: str) -> None:
        if self._mlflow:
            self._mlflow.log_figure(figure, name)

    def log_text(self, text: str, name: str) -> None:
        if self._mlflow:
            self._mlflow.log_text(text, name)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self._mlflow:
            self._mlflow.set_tags({k: str(v) for k, v in tags.items()})


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def repo_root() -> Path:
    """The repository whose store runs belong to: DVC's parent repo for queued experiments, else cwd."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def tracking_uri(params: Params) -> str:
    """The store URI, with a relative sqlite path made absolute against `repo_root()` and a busy timeout."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params.tracking.uri
    db = sqlite_path(uri)
    if db is None:
        return uri
    query = urlsplit(uri).query
    return f"sqlite:///{db}?{query or f'timeout={SQLITE_BUSY_TIMEOUT_S}'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///relative` or `sqlite:////absolute` URI; None for other stores."""
    if not uri.startswith("sqlite:///"):
        return None
    path = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
    return path if path.is_absolute() else repo_root() / path


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> {"a.b.c": value}, the shape MLflow params and the compare view want."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def run_group(params: Params) -> str:
    """Tag that lines up the runs of one repro: LORS_RUN_GROUP, the DVC experiment name, or commit+params."""
    if group := os.environ.get("LORS_RUN_GROUP") or os.environ.get("DVC_EXP_NAME"):
        return group
    return f"{git_commit()[:10]}-{sha256_json(params.model_dump(mode='json'))[:10]}"


def run_tags(params: Params, stage: str, tags: Mapping[str, Any] | None = None) -> dict[str, str]:
    all_tags: dict[str, Any] = {
        "stage": stage, "profile": params.profile, "protocol": params.protocol, "seed": params.seed,
        "architecture": f"{params.model.image_encoder}+{params.text_encoder.name}",
        "git_commit": git_commit(), "dvc_stage": os.environ.get("DVC_STAGE", stage), "run_group": run_group(params),
    }
    all_tags.update(tags or {})
    return {k: str(v) for k, v in all_tags.items()}


@contextlib.contextmanager
def _setup_lock(uri: str) -> Iterator[None]:
    """Serialise store creation and run start between local processes sharing one sqlite file."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _start_run_once(mlflow: Any, params: Params, uri: str, name: str, tags: dict[str, str]) -> Any:
    with _setup_lock(uri):
        mlflow.set_tracking_uri(uri)
        experiment = mlflow.get_experiment_by_name(params.tracking.experiment)
        if experiment is None:
            location = (repo_root() / "mlartifacts").as_uri() if sqlite_path(uri) else None
            experiment_id = mlflow.create_experiment(params.tracking.experiment, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
        return mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=tags)


def _start_run(mlflow: Any, params: Params, uri: str, name: str, tags: dict[str, str]) -> Any:
    """Select (or create) the experiment and start a run, retrying transient store errors."""
    for attempt in range(1, SETUP_ATTEMPTS + 1):
        try:
            return _start_run_once(mlflow, params, uri, name, tags)
        except Exception as exc:  # noqa: BLE001 - the store's error types depend on its backend
            if attempt == SETUP_ATTEMPTS:
                raise
            log.warning("tracking store busy (%s: %s); retry %d", exc.__class__.__name__, exc, attempt)
            time.sleep(0.5 * 2**attempt)


@contextlib.contextmanager
def stage_run(params: Params, stage: str, name: str, tags: Mapping[str, Any] | None = None) -> Iterator[Tracker]:
    """An MLflow run for one stage invocation: all params, tags for grouping, then whatever the stage logs."""
    if not params.tracking.enabled or os.environ.get("LORS_TRACKING", "1") == "0":
        yield Tracker()
        return
    import mlflow

    uri = tracking_uri(params)
    with _start_run(mlflow, params, uri, name, run_tags(params, stage, tags)):
        tracker = Tracker(mlflow)
        tracker.log_params(flatten(params.model_dump(mode="json")))
        yield tracker
