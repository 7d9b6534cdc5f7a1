"""Live MLflow runs: a detached follower process per long stage run streams what the stage logs.

The stage only appends JSON lines to `<work_dir>/tracking/live/<record_id>/events.jsonl` and starts
`python -m lors.tracking_live <folder>` without waiting for it, so importing MLflow (seconds) happens
beside the stage, never before its first step. The follower creates the run nested under the pipeline's
parent run, sends new params, metric rows and tags every `POLL_S`, and once the stage's run record
appears in `pending/` it claims it like any flush, adds the artifacts and the final status, and
removes it. It touches a heartbeat file from a thread; while the heartbeat is fresh, flushes leave the
record to it, and once it is stale (the follower died or never started) a flush replays the record,
replacing the half-written live run. Every failure here is a warning in the follower's log.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from lors.config import Params
from lors.tracking import (RECORD_FILE, RECORD_ID_TAG, PARENT_TAG, _open_store, _pid_alive, log_in_batches,
                           pipeline_run, run_tags, settle_pipeline_run, tracking_uri)

log = logging.getLogger(__name__)

POLL_S = float(os.environ.get("LORS_LIVE_POLL_S", "2"))
HEARTBEAT_S = 5
DRAIN_S = 300


def open_pipeline_run(params: Params, group: str) -> None:
    """Create the parent run of a pipeline run ahead of its stages (`lors-bench launch`); warns on failure."""
    try:
        uri = tracking_uri(params)
        client, experiment_id = _open_store(uri, params.tracking.experiment)
        pipeline_run(client, experiment_id, uri, run_tags(params, "pipeline") | {"run_group": group})
    except Exception as exc:  # noqa: BLE001 - the store's error types depend on its backend
        log.warning("tracking: no MLflow parent run for %s (%s: %s)", group, exc.__class__.__name__, exc)


def drain_followers(root: Path, job: str, timeout_s: float = DRAIN_S) -> None:
    """Wait until the followers started under `job` on this host are gone, so a SLURM job that ends
    does not kill them halfway through completing their runs."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        live = []
        for info in (root / "live").glob("*/run.json"):
            with contextlib.suppress(OSError, ValueError):
                run = json.loads(info.read_text())
                if run.get("job") == job and run.get("host") == socket.gethostname() and _follower_pid(info.parent):
                    live.append(info.parent)
        if not live:
            return
        time.sleep(1)
    log.warning("tracking: live followers still writing after %.0f s; `lors-bench track` completes their runs",
                timeout_s)


def _follower_pid(folder: Path) -> int | None:
    try:
        pid = int((folder / "follower.pid").read_text())
    except (OSError, ValueError):
        return None
    return pid if _pid_alive(pid) else None


class Follower:
    """Streams one run record's events into an MLflow run, then completes the run from the record."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.root = folder.parent.parent  # <work_dir>/tracking
        self.run = json.loads((folder / "run.json").read_text())
        self.offset = 0
        self.client: Any = None
        self.run_id = ""

    def start(self) -> bool:
        """Open the store and create the live run; False when the run was already written."""
        from mlflow.entities import ViewType

        uri = self.run["tracking_uri"]
        self.client, self.experiment_id = _open_store(uri, self.run["experiment"])
        query = f"tags.{RECORD_ID_TAG} = '{self.run['record_id']}'"
        if self.client.search_runs([self.experiment_id], query, ViewType.ACTIVE_ONLY):
            return False
        self.parent = pipeline_run(self.client, self.experiment_id, uri, self.run["tags"])
        created = self.client.create_run(self.experiment_id, start_time=self.run["start_time"],
                                         run_name=self.run["run_name"], tags={
                                             **self.run["tags"], RECORD_ID_TAG: self.run["record_id"],
                                             PARENT_TAG: self.parent})
        self.run_id = created.info.run_id
        self.client.update_run(self.parent, status="RUNNING")
        return True

    def send_new_events(self) -> None:
        """Log the events appended since the last call (complete lines only), in as few batches as possible."""
        with open(self.folder / "events.jsonl", "rb") as fh:
            fh.seek(self.offset)
            chunk = fh.read()
        end = chunk.rfind(b"\n") + 1
        params: dict[str, str] = {}
        tags: dict[str, str] = {}
        metrics: list = []
        for line in chunk[:end].splitlines():
            event = json.loads(line)
            params.update(event.get("params", {}))
            tags.update(event.get("tags", {}))
            metrics.extend(event.get("metrics", []))
        log_in_batches(self.client, self.run_id, params, metrics, tags)
        self.offset += end

    def claim_record(self) -> Path | None | bool:
        """The stage's finished record, moved out of pending/ so no flush takes it too; None while the
        stage runs, False when a flush took it first (that flush then writes the run)."""
        for record in (self.root / "pending").glob(f"*-{self.run['record_id']}"):
            claimed = self.root / f"flushing-{os.getpid()}" / record.name
            claimed.parent.mkdir(exist_ok=True)
            try:
                os.rename(record, claimed)
                return claimed
            except FileNotFoundError:
                return False
        return None

    def finish(self, record_folder: Path | None) -> None:
        """Complete the run: the rest of the events, the artifacts and the final status."""
        self.send_new_events()
        if record_folder is None:  # the stage died without writing its record (killed, timed out)
            self.client.set_terminated(self.run_id, "KILLED")
        else:
            record = json.loads((record_folder / RECORD_FILE).read_text())
            if (record_folder / "artifacts").is_dir():
                self.client.log_artifacts(self.run_id, str(record_folder / "artifacts"))
            self.client.set_terminated(self.run_id, record["status"], end_time=record["end_time"])
            shutil.rmtree(record_folder)
            with contextlib.suppress(OSError):
                record_folder.parent.rmdir()
        settle_pipeline_run(self.client, self.experiment_id, self.run["tracking_uri"], self.parent)

    def follow(self) -> None:
        if not self.start():
            return
        stage_gone_since = None
        while True:
            self.send_new_events()
            claimed = self.claim_record()
            if claimed is False:
                return
            if claimed:
                self.finish(claimed)
                return
            if not _pid_alive(self.run["stage_pid"]):
                stage_gone_since = stage_gone_since or time.monotonic()
                if time.monotonic() - stage_gone_since > 2 * POLL_S:  # no record after the stage ended
                    self.finish(None)
                    return
            time.sleep(POLL_S)


def _heartbeat(path: Path, stop: threading.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(OSError):
            path.touch()
        stop.wait(HEARTBEAT_S)


def main(folder: Path) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    (folder / "follower.pid").write_text(str(os.getpid()))
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(folder / "heartbeat", stop), daemon=True)
    beat.start()
    try:
        Follower(folder).follow()
    except Exception as exc:  # noqa: BLE001 - the record stays pending; a flush writes it once we are gone
        log.warning("tracking: live run stopped (%s: %s); the next flush writes it", exc.__class__.__name__, exc)
        stop.set()
        beat.join()
        (folder / "heartbeat").unlink(missing_ok=True)  # hand the record to flushes now, not in LIVE_STALE_S
        return 1
    shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
