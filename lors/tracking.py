"""MLflow tracking for every stage run, recorded on disk so a stage never waits for MLflow.

Stages call `stage_run(...)` and log through the returned tracker. The tracker only records: params,
tags, metric rows and artifact files go into a run record, a folder
`<work_dir>/tracking/pending/<start>-<uuid>/` (record.json + artifacts/) that appears atomically when
the stage ends. `flush_pending` later replays every record into the MLflow store in one process, so
MLflow is imported once per repro (by the report stage or `lors-bench track`) instead of once per
stage; `tracking.defer: false` flushes a record right after its stage instead. Long stages
(`tracking.live`) also stream what they log, line by line, to a detached follower process
(`lors.tracking_live`) that imports MLflow beside the stage and shows the run live, nested under one
parent run per pipeline run; the follower then completes the run from the record, and if it dies a
later flush does. With tracking disabled (or in unit tests) the tracker is a no-op, so library code
never branches on MLflow; no MLflow failure ever fails a stage or the report.

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
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any
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
PARENT_TAG = "mlflow.parentRunId"
PIPELINE_ROLE = "pipeline"  # tag lors_role of the parent run that groups one pipeline run's stage runs
LIVE_STALE_S = 60  # a follower whose heartbeat is older than this is dead; flushes then replay its record


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
        self.events: Any = None  # the live follower's line-buffered event stream, when there is one

    def emit(self, kind: str, payload: Any) -> None:
        """Pass one logging call on to the live follower (a no-op without one); never raises."""
        if self.events is not None:
            try:
                self.events.write(json.dumps({kind: payload}) + "\n")
            except (OSError, ValueError) as exc:
                log.warning("tracking: live stream stopped (%s); the run is written when the stage ends", exc)
                self.events = None

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
            logged, new = self._record.data["params"], {}
            for key, value in params.items():
                value = str(value)[:MAX_PARAM_LENGTH]
                if key not in logged:
                    logged[key] = new[key] = value
                elif logged[key] != value:  # MLflow params are immutable: the first stays
                    log.warning("param %s logged again with another value (%s, kept %s)", key, value, logged[key])
            if new:
                self._record.emit("params", new)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self._record:
            now = _now_ms()
            rows = [[k, float(v), int(step or 0), now] for k, v in metrics.items()]
            self._record.data["metrics"].extend(rows)
            self._record.emit("metrics", rows)

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
            tags = {k: str(v) for k, v in tags.items()}
            self._record.data["tags"].update(tags)
            self._record.emit("tags", tags)


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


JOB_ENV = "LORS_LIVE_JOB"  # set by `lors-bench launch` jobs, which wait for their followers before ending


def start_follower(root: Path, record: dict[str, Any]) -> IO[str] | None:
    """Start the follower of one run record (`python -m lors.tracking_live`, its own process, so the stage
    never imports MLflow); return the stream to write its events to (None: not live)."""
    folder = root / "live" / record["record_id"]
    try:
        folder.mkdir(parents=True)
        (folder / "heartbeat").touch()  # fresh from the start: flushes leave the record to the follower
        (folder / "run.json").write_text(json.dumps({**record, "stage_pid": os.getpid(), "host": socket.gethostname(),
                                                     "job": os.environ.get(JOB_ENV, "")}))
        events = open(folder / "events.jsonl", "a", buffering=1)  # noqa: SIM115 - closed by stage_run
        with open(folder / "follower.log", "ab") as out:
            subprocess.Popen([sys.executable, "-m", "lors.tracking_live", str(folder)], stdin=subprocess.DEVNULL,
                             stdout=out, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
        return events
    except OSError as exc:
        log.warning("tracking: no live run (%s); the run is written when the stage ends", exc)
        shutil.rmtree(folder, ignore_errors=True)
        return None


@contextlib.contextmanager
def stage_run(params: Params, stage: str, name: str, tags: Mapping[str, Any] | None = None) -> Iterator[Tracker]:
    """A run record for one stage invocation: all params, tags for grouping, then whatever the stage logs.

    The record is FINISHED, or FAILED when the block raises (the error propagates); with
    `tracking.defer: false` it is written to MLflow right away. A stage named in `tracking.live`
    also streams to a follower process that shows the run in MLflow while it runs.
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
        if stage in params.tracking.live:
            record.events = start_follower(tracking_dir(params), record.data)
        tracker = Tracker(record)
        tracker.log_params(flatten(params.model_dump(mode="json")))
        try:
            yield tracker
        except BaseException as exc:  # noqa: BLE001 - recorded as FAILED, re-raised below
            failure = exc
        if record.events is not None:
            record.events.close()
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


def pipeline_run(client: Any, experiment_id: str, uri: str, tags: Mapping[str, str]) -> str:
    """The id of the parent run of the stage runs tagged `tags["run_group"]`, created by the first asker.

    Local writers of one sqlite store take turns on its lock; `lors-bench launch` creates it before
    any job starts, so jobs on other nodes only ever find it.
    """
    from mlflow.entities import ViewType

    group = tags.get("run_group", "")
    query = f"tags.lors_role = '{PIPELINE_ROLE}' and tags.run_group = '{group}'"
    with _setup_lock(uri):
        found = client.search_runs([experiment_id], query, ViewType.ACTIVE_ONLY, max_results=1)
        if found:
            return found[0].info.run_id
        keep = {k: tags[k] for k in ("profile", "protocol", "seed", "git_commit") if k in tags}
        return client.create_run(experiment_id, run_name=f"pipeline {group}",
                                 tags={**keep, "run_group": group, "lors_role": PIPELINE_ROLE}).info.run_id


def settle_pipeline_run(client: Any, experiment_id: str, uri: str, parent_id: str) -> None:
    """Mark the parent run RUNNING while any of its stage runs is, else FINISHED."""
    with _setup_lock(uri):
        running = client.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '{parent_id}' and "
                                     "attributes.status = 'RUNNING'", max_results=1)
        if running:
            client.update_run(parent_id, status="RUNNING")
        else:
            client.set_terminated(parent_id, "FINISHED")


def log_in_batches(client: Any, run_id: str, params: Mapping[str, str] = {},  # noqa: B006 - never mutated
                   metrics: list | tuple = (), tags: Mapping[str, str] = {}) -> None:  # noqa: B006
    """Log params, metric rows [key, value, step, timestamp_ms] and tags within MLflow's batch limits."""
    from mlflow.entities import Metric, Param, RunTag

    batches = [("params", [Param(k, v) for k, v in params.items()], MAX_PARAMS_PER_CALL),
               ("tags", [RunTag(k, v) for k, v in tags.items()], MAX_PARAMS_PER_CALL),
               ("metrics", [Metric(k, v, ts, step) for k, v, step, ts in metrics], MAX_METRICS_PER_CALL)]
    for kind, items, size in batches:
        for start in range(0, len(items), size):
            client.log_batch(run_id, **{kind: items[start:start + size]})


def _replay(client: Any, experiment_id: str, folder: Path, record: dict[str, Any]) -> None:
    """Write one record as a run under its pipeline run; a run it left half-written before (a crashed
    flush, a dead live follower) is deleted and written anew."""
    from mlflow.entities import ViewType

    record_id, uri = record["record_id"], record["tracking_uri"]
    for run in client.search_runs([experiment_id], f"tags.{RECORD_ID_TAG} = '{record_id}'", ViewType.ACTIVE_ONLY):
        if run.info.status != "RUNNING":  # complete: only the record's removal was missed
            return
        client.delete_run(run.info.run_id)
    parent = pipeline_run(client, experiment_id, uri, record["tags"])
    run = client.create_run(experiment_id, start_time=record["start_time"], run_name=record["run_name"],
                            tags={**record["tags"], RECORD_ID_TAG: record_id, PARENT_TAG: parent})
    log_in_batches(client, run.info.run_id, record["params"], record["metrics"])
    if (folder / ARTIFACTS).is_dir():
        client.log_artifacts(run.info.run_id, str(folder / ARTIFACTS))
    client.set_terminated(run.info.run_id, record["status"], end_time=record["end_time"])
    settle_pipeline_run(client, experiment_id, uri, parent)


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


def follower_alive(root: Path, record_id: str) -> bool:
    """Whether a live follower still owns this record (its heartbeat is recent)."""
    try:
        return time.time() - (root / "live" / record_id / "heartbeat").stat().st_mtime < LIVE_STALE_S
    except FileNotFoundError:
        return False


def flush_pending(params: Params) -> int:
    """Write every pending run record to MLflow and remove it; return how many records left the queue.

    Records a live follower is about to complete are left to it. Records that fail stay pending (a later
    flush retries them) and end in one LorsError once the others are written.
    """
    root = tracking_dir(params)
    if not tracking_enabled(params) or not (root / "pending").is_dir():
        return 0
    _release_stale_claims(root)
    names = sorted(p.name for p in (root / "pending").iterdir()
                   if not p.name.startswith(".") and not follower_alive(root, p.name.rsplit("-", 1)[-1]))
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
            shutil.rmtree(root / "live" / name.rsplit("-", 1)[-1], ignore_errors=True)  # a dead follower's
            written += 1
    finally:
        _release_stale_claims(root)  # failed or interrupted records go back to pending
    log.info("tracking: %d run(s) written to MLflow in %.1f s", written, time.monotonic() - began)
    if failed:
        raise LorsError(f"tracking: {len(failed)} run record(s) stay pending in {root / 'pending'} "
                        f"(first: {failed[0]}); rerun `lors-bench track`")
    return written


def flush_pending_or_warn(params: Params) -> int:
    """`flush_pending` for the report stage: an MLflow failure is a warning, never a missing table."""
    try:
        return flush_pending(params)
    except Exception as exc:  # noqa: BLE001 - the records stay on disk; `lors-bench track` retries
        log.warning("%s", exc if isinstance(exc, LorsError) else f"tracking: {exc.__class__.__name__}: {exc}")
        return 0
