"""`lors-bench launch`: the stale stages of the DVC pipeline as submitit jobs, on SLURM or locally.

One job per stage (a job array per group of like stages), SLURM dependencies that follow DVC's graph,
resources per stage kind from `cluster` in params.yaml, and logs plus a record of submitted jobs
(`launch.json`) in `cluster.log_dir`. A later launch reports the former launch's failed jobs with their
log, waits for its still-queued jobs instead of submitting them again, and submits only what DVC
still sees as stale, so failed stages are rerun and finished ones are not.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from lors.config import Params
from lors.launch.jobs import ACTIVE_STATES, Outcome, run_local, slurm_job, slurm_outcome, slurm_states, submit_slurm
from lors.launch.plan import StageJob, job_groups, stale_plan

log = logging.getLogger(__name__)

STATE_FILE = "launch.json"
SLURM_POLL_S = 60


def launch(params: Params, root: Path, executor: Literal["slurm", "local"] | None = None, targets: Sequence[str] = (),
           jobs: int | None = None, wait: bool = False, dry_run: bool = False) -> list[Outcome]:
    """Run or submit every stale stage (of `targets`); returns one outcome per stage handled."""
    from lors.tracking import run_group

    cluster = params.cluster
    executor = executor or cluster.executor
    root = root.resolve()
    folder = cluster.log_dir if cluster.log_dir.is_absolute() else root / cluster.log_dir
    active, former = ({}, []) if dry_run or executor == "local" else _former_slurm_jobs(folder)
    plan = stale_plan(root, targets)
    if dry_run:
        for line in describe(plan, params):
            print(line)
        return []
    if not plan:
        log.info("nothing to run: DVC sees every stage of %s as up to date", ", ".join(targets) or "the pipeline")
        return former
    group = run_group(params)
    folder.mkdir(parents=True, exist_ok=True)
    if executor == "local":  # local writers share the sqlite store's lock: the parent run can come later
        opener = threading.Thread(target=_open_pipeline_run, args=(params, group), daemon=True)
        opener.start()
        outcomes = run_local(plan, cluster, folder, root, group, jobs or cluster.local_jobs)
        opener.join()
        return former + outcomes
    _open_pipeline_run(params, group)
    waited = {name: job_id for name, job_id in active.items() if name in {job.name for job in plan}}
    submitted = submit_slurm(plan, cluster, folder, root, group, waited)
    (folder / STATE_FILE).write_text(json.dumps(
        {name: handle.job_id for name, handle in submitted.items()} | waited, indent=1))
    if not wait:
        return former + [Outcome(name, handle.job_id, "submitted", handle.paths.stdout)
                         for name, handle in submitted.items()]
    states = slurm_states(submitted)
    while any(state in ACTIVE_STATES | {"UNKNOWN"} for state in states.values()):  # UNKNOWN: not in sacct yet
        time.sleep(SLURM_POLL_S)
        states = slurm_states(submitted)
    return former + [slurm_outcome(name, handle, states[name]) for name, handle in submitted.items()]


def describe(plan: Sequence[StageJob], params: Params) -> list[str]:
    """One line per job array of the plan: its stages, resources and what it waits for."""
    lines = []
    for group in job_groups(plan):
        res = params.cluster.resources(group[0].kind)
        after = f" after {', '.join(group[0].upstream)}" if group[0].upstream else ""
        lines.append(f"{len(group)} x {group[0].kind} (gpus {res.gpus}, cpus {res.cpus}, {res.mem_gb:g} GB, "
                     f"{res.time_min} min): {', '.join(job.name for job in group)}{after}")
    return lines


def _former_slurm_jobs(folder: Path) -> tuple[dict[str, str], list[Outcome]]:
    """Jobs of the former launch: stage -> job id of those still queued or running, and outcomes of the
    failed ones (with their log) to report."""
    state_file = folder / STATE_FILE
    if not state_file.is_file():
        return {}, []
    jobs = {name: slurm_job(folder, job_id) for name, job_id in json.loads(state_file.read_text()).items()}
    states = slurm_states(jobs)
    active = {name: job.job_id for name, job in jobs.items() if states[name] in ACTIVE_STATES}
    failed = [slurm_outcome(name, job, states[name]) for name, job in jobs.items()
              if states[name] not in ACTIVE_STATES | {"COMPLETED", "UNKNOWN"}]
    return active, failed


def _open_pipeline_run(params: Params, group: str) -> None:
    """Create the MLflow parent run of this pipeline run before any SLURM job starts, so jobs on other
    nodes never race to create it."""
    from lors.tracking import tracking_enabled

    if tracking_enabled(params):
        from lors.tracking_live import open_pipeline_run

        open_pipeline_run(params, group)
