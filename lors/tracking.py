"""MLflow tracking for every stage run.

Stages call `stage_run(...)` and log through the returned tracker; with tracking disabled (or in
unit tests) the tracker is a no-op, so library code never branches on MLflow. mlflow is imported
only here and only when tracking is on, so a GPU box with just the ML stack can run every stage.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from lors.config import Params


class Tracker:
    """Logs to an active MLflow run, or nowhere when `mlflow` is None."""

    def __init__(self, mlflow: Any = None) -> None:
        self._mlflow = mlflow

    @property
    def active(self) -> bool:
        return self._mlflow is not None

    def log_params(self, params: Mapping[str, Any]) -> None:
        if self._mlflow:
            self._mlflow.log_params({k: str(v)[:500] for k, v in params.items()})

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self._mlflow:
            self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        if self._mlflow:
            self._mlflow.log_artifact(str(path), artifact_path=folder)

    def log_figure(self, figure: Any, name: str) -> None:
        if self._mlflow:
            self._mlflow.log_figure(figure, name)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self._mlflow:
            self._mlflow.set_tags({k: str(v) for k, v in tags.items()})


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def tracking_uri(params: Params) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or params.tracking.uri


@contextlib.contextmanager
def stage_run(params: Params, stage: str, name: str, tags: Mapping[str, Any] | None = None) -> Iterator[Tracker]:
    """An MLflow run for one stage invocation, tagged so the UI can group and compare runs."""
    if not params.tracking.enabled or os.environ.get("LORS_TRACKING", "1") == "0":
        yield Tracker()
        return
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(params))
    mlflow.set_experiment(params.tracking.experiment)
    all_tags = {"stage": stage, "profile": params.profile, "protocol": params.protocol, "seed": params.seed,
                "git_commit": git_commit(), "dvc_stage": os.environ.get("DVC_STAGE", stage)}
    if group := os.environ.get("LORS_RUN_GROUP"):
        all_tags["run_group"] = group
    all_tags.update(tags or {})
    with mlflow.start_run(run_name=name, tags={k: str(v) for k, v in all_tags.items()}):
        yield Tracker(mlflow)
