"""MLflow tracking for every stage run, deferred so a stage never pays for importing MLflow.

Stages call `stage_run(...)` and log through the returned tracker. The tracker only records: params,
tags, metric rows and artifact files go into a run record, a folder
`<work_dir>/tracking/pending/<start>-<uuid>/` (record.json + artifacts/) that appears atomically when
the stage ends. `flush_pending` later replays every record into the MLflow store in one process, so
MLflow is imported once per repro (by the report stage or `lors-bench track`) instead of once per
stage; `tracking.defer: false` flushes a record right after its stage instead. With tracking disabled
(or in unit tests) the tracker is a no-op, so library code never branches on MLflow.

Parallel runs (`dvc exp run --queue` + `dvc queue start -j N`) share one record folder and one sqlite
store, both resolved against the parent repository (DVC_ROOT, set by DVC for queued experiments that
run in temporary copies). A flusher claims a record by renaming it into its own `flushing-<pid>/`
folder, so concurrent flushers never replay one record twice; a record leaves the disk only after its
run is complete in the store, and each run carries the record's uuid (tag `lors_record_id`), so a
flush that crashed midway is redone, not duplicated. Store writers wait on a busy timeout, and store
creation is serialised by a file lock so workers starting together do not race the schema migration.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lors.config import Params
from lors.errors import LorsError
from lors.io import atomic_path, read_json, sha256_json

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_S = 120
MAX_PARAMS_PER_CALL = 100  # MLflow's batch limit for params (and tags)
MAX_METRICS_PER_CALL = 1000  # MLflow's batch limit for metrics
MAX_PARAM_LENGTH = 500  # the shortest param value any MLflow store accepts
SETUP_ATTEMPTS = 5
RECORD_FILE = "record.json"
ARTIFACTS = "artifacts"
RECORD_ID_TAG = "lors_record_id"


class RunRecord:
    """Everything one stage run logs, kept in a folder until `flush_pending` writes it to MLflow."""

    def __init__(self, folder: Path, record_id: str, run_name: str, uri: str, experiment: str,
                 tags: Mapping[str, str]) -> None:
        self.folder = folder
        self.data: dict[str, Any] = {
            "record_id": record_id, "run_name": run_name, "tracking_uri": uri, "experiment": experiment,
            "start_time": _now_ms(), "end_time": None, "status": "RUNNING", "tags": dict(tags), "params": {},
            "metrics": [],  # [key, value, step, timestamp_ms]
        }

    def artifact_path(self, name: str) -> Path:
        """Where an artifact named `name` (a path relative to the run's artifact root) is kept."""
        root = (self.folder / ARTIFACTS).resolve()
        path = (root / name).resolve()
        if not path.is_relative_to(root) or path == root:
            raise LorsError(f"artifact name '{name}' leaves the run's artifact folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def close(self, status: str) -> None:
        self.data.update(status=status, end_time=_now_ms())
        (self.folder / RECORD_FILE).write_text(json.dumps(self.data, indent=1))


class Tracker:
    """Records into a run record, or nowhere when `record` is None (tracking disabled)."""

    def __init__(self, record: RunRecord | None = None) -> None:
        self._record = record

    @property
    def active(self) -> bool:
        return self._record is not None

    def log_params(self, params: Mapping[str, Any]) -> None:
        if self._record:
            logged = self._record.data["params"]
            for key, value in params.items():
                value = str(value)[:MAX_PARAM_LENGTH]
                if logged.setdefault(key, value) != value:  # MLflow params are immutable: the first stays
                    log.warning("param %s logged again with another value (%s, kept %s)", key, value, logged[key])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self._record:
            now = _now_ms()
            self._record.data["metrics"].extend([k, float(v), int(step or 0), now] for k, v in metrics.items())

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        """Copy a file or folder now, so a later rerun of the stage cannot change what this run logged."""
        if self._record:
            path = Path(path)
            target = self._record.artifact_path(f"{folder}/{path.name}" if folder else path.name)
            if path.is_dir():
                shutil.copytree(path, target, dirs_exist_ok=True)
            else:
                shutil.copy2(path, target)

    def log_figure(self, figure: Any, name: str) -> None:
        if self._record:
            figure.savefig(self._record.artifact_path(name), format=Path(name).suffix[1:] or "png", dpi=120)

    def log_text(self, text: str, name: str) -> None:
        if self._record:
            self._record.artifact_path(name).write_text(text)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self._record:
            self._record.data["tags"].update({k: str(v) for k, v in tags.items()})


def _now_ms() -> int:
    return int(time.time() * 1000)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def repo_root() -> Path:
    """The repository whose store runs belong to: DVC's parent repo for queued experiments, else cwd."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def tracking_enabled(params: Params) -> bool:
    return params.tracking.enabled and os.environ.get("LORS_TRACKING", "1") != "0"


def tracking_dir(params: Params) -> Path:
    """`<work_dir>/tracking`, a relative work_dir taken against `repo_root()` so queue workers share it."""
    work = Path(params.work_dir)
    return (work if work.is_absolute() else repo_root() / work) / "tracking"


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
def stage_run(params: Params, stage: str, name: str, tags: Mapping[str, Any] | None = None) -> Iterator[Tracker]:
    """A run record for one stage invocation: all params, tags for grouping, then whatever the stage logs.

    The record is FINISHED, or FAILED when the block raises (the error propagates); with
    `tracking.defer: false` it is written to MLflow right away.
    """
    if not tracking_enabled(params):
        yield Tracker()
        return
    record_id = uuid.uuid4().hex
    failure: BaseException | None = None
    with atomic_path(tracking_dir(params) / "pending" / f"{time.strftime('%Y%m%dT%H%M%S')}-{record_id}") as folder:
        folder.mkdir()
        record = RunRecord(folder, record_id, name, tracking_uri(params), params.tracking.experiment,
                           run_tags(params, stage, tags))
        tracker = Tracker(record)
        tracker.log_params(flatten(params.model_dump(mode="json")))
        try:
            yield tracker
        except BaseException as exc:  # noqa: BLE001 - recorded as FAILED, re-raised below
            failure = exc
        record.close("FAILED" if failure else "FINISHED")
    if not params.tracking.defer:
        try:
            flush_pending(params)
        except Exception as exc:  # noqa: BLE001 - the record is safe on disk; the stage's work is not lost
            log.error("tracking: could not write this run to MLflow (%s); `lors-bench track` retries", exc)
    if failure is not None:
        raise failure


# --- replay into MLflow ----------------------------------------------------------------------------


@contextlib.contextmanager
def _setup_lock(uri: str) -> Iterator[None]:
    """Serialise store creation between local processes sharing one sqlite file."""
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


def _open_store_once(uri: str, experiment: str) -> tuple[Any, str]:
    from mlflow.tracking import MlflowClient

    with _setup_lock(uri):
        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            return client, found.experiment_id
        location = (repo_root() / "mlartifacts").as_uri() if sqlite_path(uri) else None
        return client, client.create_experiment(experiment, artifact_location=location)


def _open_store(uri: str, experiment: str) -> tuple[Any, str]:
    """A client on the store and the experiment's id (created if new), retrying transient store errors."""
    for attempt in range(1, SETUP_ATTEMPTS + 1):
        try:
            return _open_store_once(uri, experiment)
        except Exception as exc:  # noqa: BLE001 - the store's error types depend on its backend
            if attempt == SETUP_ATTEMPTS:
                raise
            log.warning("tracking store busy (%s: %s); retry %d", exc.__class__.__name__, exc, attempt)
            time.sleep(0.5 * 2**attempt)


def _replay(client: Any, experiment_id: str, folder: Path, record: dict[str, Any]) -> None:
    """Write one record as a run; a run it left half-written before is deleted and written anew."""
    from mlflow.entities import Metric, Param, ViewType

    record_id = record["record_id"]
    for run in client.search_runs([experiment_id], f"tags.{RECORD_ID_TAG} = '{record_id}'", ViewType.ACTIVE_ONLY):
        if run.info.status != "RUNNING":  # complete: only the record's removal was missed
            return
        client.delete_run(run.info.run_id)
    run = client.create_run(experiment_id, start_time=record["start_time"], run_name=record["run_name"],
                            tags={**record["tags"], RECORD_ID_TAG: record_id})
    run_id = run.info.run_id
    params = [Param(k, v) for k, v in record["params"].items()]
    for start in range(0, len(params), MAX_PARAMS_PER_CALL):
        client.log_batch(run_id, params=params[start:start + MAX_PARAMS_PER_CALL])
    metrics = [Metric(key, value, timestamp, step) for key, value, step, timestamp in record["metrics"]]
    for start in range(0, len(metrics), MAX_METRICS_PER_CALL):
        client.log_batch(run_id, metrics=metrics[start:start + MAX_METRICS_PER_CALL])
    if (folder / ARTIFACTS).is_dir():
        client.log_artifacts(run_id, str(folder / ARTIFACTS))
    client.set_terminated(run_id, record["status"], end_time=record["end_time"])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _release_stale_claims(root: Path) -> None:
    """Put back records claimed by flushers that died (or by an earlier failed flush of this process)."""
    for claimed in root.glob("flushing-*"):
        pid = claimed.name.removeprefix("flushing-")
        if pid.isdigit() and (int(pid) == os.getpid() or not _pid_alive(int(pid))):
            for folder in claimed.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    os.rename(folder, root / "pending" / folder.name)
            with contextlib.suppress(OSError):
                claimed.rmdir()


def flush_pending(params: Params) -> int:
    """Write every pending run record to MLflow and remove it; return how many records left the queue.

    Records that fail stay pending (a later flush retries them) and end in one LorsError once the
    others are written.
    """
    root = tracking_dir(params)
    if not tracking_enabled(params) or not (root / "pending").is_dir():
        return 0
    _release_stale_claims(root)
    names = sorted(p.name for p in (root / "pending").iterdir() if not p.name.startswith("."))
    if not names:
        return 0
    began = time.monotonic()
    mine = root / f"flushing-{os.getpid()}"
    mine.mkdir(exist_ok=True)
    stores: dict[tuple[str, str], tuple[Any, str]] = {}
    written, failed = 0, []
    try:
        for name in names:
            folder = mine / name
            try:
                os.rename(root / "pending" / name, folder)  # the claim: exactly one flusher wins
            except FileNotFoundError:
                continue
            try:
                record = read_json(folder / RECORD_FILE)
                key = (record["tracking_uri"], record["experiment"])
                if key not in stores:
                    stores[key] = _open_store(*key)
                _replay(*stores[key], folder, record)
            except Exception as exc:  # noqa: BLE001 - one bad record must not hold back the others
                failed.append(f"{name}: {exc.__class__.__name__}: {(str(exc).splitlines() or [''])[0]}")
                continue
            shutil.rmtree(folder)
            written += 1
    finally:
        _release_stale_claims(root)  # failed or interrupted records go back to pending
    log.info("tracking: %d run(s) written to MLflow in %.1f s", written, time.monotonic() - began)
    if failed:
        raise LorsError(f"tracking: {len(failed)} run record(s) stay pending in {root / 'pending'} "
                        f"(first: {failed[0]}); rerun `lors-bench track`")
    return written
