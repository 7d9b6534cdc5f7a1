"""Submitting planned stages through submitit: each job runs `dvc repro --single-item <stage>`.

SLURM schedules: every group of like stages is one job array whose `--dependency=afterok:` lists the
jobs of the stages it reads from, and `kill-on-invalid-dep` drops the jobs below a failure. The local
executor has neither dependencies nor a cap on running jobs (submitit#1718), so `run_local` starts a
stage once its upstream jobs succeeded, at most `jobs` at a time. DVC records: each job's repro
waits for the repository lock (`--wait-for-lock`), which DVC holds only while it checks and commits,
not while the stage's command runs, so stages run side by side and each writes its own `dvc.lock` entry.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lors.config import ClusterConfig
from lors.launch.plan import StageJob, job_groups

log = logging.getLogger(__name__)

ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED",
                 "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT"}


def run_stage(stage: str, root: str, run_group: str) -> str:
    """The job itself: reproduce one stage in the shared repository; its output goes to the job's log.

    Before the job ends it waits for the live MLflow followers its stage started, which SLURM would
    otherwise kill with the job.
    """
    from lors.tracking import JOB_ENV

    os.chdir(root)
    token = f"{stage}-{uuid.uuid4().hex[:8]}"
    bin_dir = str(Path(sys.executable).parent)  # `lors-bench` and `dvc` of the launching environment
    env = {**os.environ, "LORS_RUN_GROUP": run_group, JOB_ENV: token,
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    command = [sys.executable, "-m", "dvc", "--wait-for-lock", "repro", "--single-item", stage]
    print(f"$ {shlex.join(command)}", flush=True)
    code = subprocess.run(command, env=env, check=False).returncode
    _drain_followers(token)
    if code != 0:
        raise RuntimeError(f"stage {stage}: `dvc repro` exited with status {code}")
    return stage


def _drain_followers(token: str) -> None:
    """Wait for the stage's live MLflow followers, where params.yaml says where they write."""
    from lors.config import load_params
    from lors.errors import LorsError
    from lors.tracking import tracking_dir
    from lors.tracking_live import drain_followers

    try:
        folder = tracking_dir(load_params("params.yaml"))
    except LorsError:  # a pipeline without lors params: no followers
        return
    drain_followers(folder, token)


@dataclass
class Outcome:
    """How one stage's job ended, and where its log is."""

    stage: str
    job_id: str
    state: str  # done | failed | skipped (an upstream job failed) | submitted | running
    log: Path | None

    def line(self) -> str:
        where = f" log: {self.log}" if self.log else ""
        return f"{self.state}: {self.stage} (job {self.job_id}){where}"


def slurm_parameters(cluster: ClusterConfig, kind: str, dependency: str | None) -> dict[str, Any]:
    """sbatch settings of one job array: resources of the stage kind, account, partition, dependency."""
    res = cluster.resources(kind)
    params: dict[str, Any] = {
        "job_name": f"lors-{kind}", "time": res.time_min, "cpus_per_task": res.cpus, "mem": f"{int(res.mem_gb * 1024)}MB",
        "partition": res.partition or cluster.partition, "account": cluster.account, "qos": cluster.qos,
        "gpus_per_node": res.gpus or None, "array_parallelism": cluster.array_parallelism,
        "setup": list(cluster.setup) or None, "dependency": dependency, "stderr_to_stdout": True,
        "additional_parameters": {"kill-on-invalid-dep": "yes"} if dependency else None,
    }
    return {key: value for key, value in params.items() if value is not None}


def submit_slurm(plan: Sequence[StageJob], cluster: ClusterConfig, folder: Path, root: Path, run_group: str,
                 active: dict[str, str]) -> dict[str, Any]:
    """Submit every planned stage; `active` maps stages still queued from a former launch to their job ids,
    which are waited for instead of submitted again. Returns stage -> submitit job."""
    import submitit

    jobs: dict[str, Any] = {}
    ids = dict(active)
    for group in job_groups([job for job in plan if job.name not in active]):
        upstream = sorted({ids[name] for name in group[0].upstream})
        executor = submitit.SlurmExecutor(folder=folder)
        executor.update_parameters(**slurm_parameters(cluster, group[0].kind,
                                                      "afterok:" + ":".join(upstream) if upstream else None))
        with executor.batch():
            submitted = [executor.submit(run_stage, job.name, str(root), run_group) for job in group]
        for job, handle in zip(group, submitted):
            jobs[job.name], ids[job.name] = handle, handle.job_id
        log.info("submitted %s as job %s%s", ", ".join(j.name for j in group), submitted[0].job_id.split("_")[0],
                 f" after {', '.join(upstream)}" if upstream else "")
    return jobs


def run_local(plan: Sequence[StageJob], cluster: ClusterConfig, folder: Path, root: Path, run_group: str,
              max_jobs: int, poll_s: float = 1.0) -> list[Outcome]:
    """Run the plan as local submitit jobs, at most `max_jobs` at once, each once its upstream succeeded."""
    import submitit

    waiting, running, outcomes = list(plan), {}, {}
    while waiting or running:
        for name, job in list(running.items()):
            if job.done():
                outcomes[name] = local_outcome(name, running.pop(name))
                log.info(outcomes[name].line())
        for stage in list(waiting):
            states = [outcomes[up].state if up in outcomes else "waiting" for up in stage.upstream]
            if any(state in ("failed", "skipped") for state in states):
                outcomes[stage.name] = Outcome(stage.name, "-", "skipped", None)
                waiting.remove(stage)
            elif len(running) < max_jobs and all(state == "done" for state in states):
                executor = submitit.LocalExecutor(folder=folder)
                res = cluster.resources(stage.kind)
                executor.update_parameters(timeout_min=res.time_min, gpus_per_node=res.gpus, stderr_to_stdout=True)
                running[stage.name] = executor.submit(run_stage, stage.name, str(root), run_group)
                waiting.remove(stage)
        time.sleep(poll_s if running else 0)
    return [outcomes[stage.name] for stage in plan]


def local_outcome(stage: str, job: Any) -> Outcome:
    """A finished job's outcome: done when it returned, failed when it raised or never finished."""
    state = "done" if job.exception() is None else "failed"
    return Outcome(stage, job.job_id, state, job.paths.stdout)


def slurm_job(folder: Path, job_id: str) -> Any:
    import submitit

    return submitit.SlurmJob(folder=folder, job_id=job_id)


def slurm_states(handles: dict[str, Any]) -> dict[str, str]:
    """SLURM's state of each job from one `sacct` call, reason cut: RUNNING, FAILED, CANCELLED, ...;
    UNKNOWN for a job sacct does not (or no longer) know."""
    import submitit

    submitit.SlurmJob.watcher.update()
    return {name: str(job.get_info(mode="cache").get("State") or "UNKNOWN").split()[0]
            for name, job in handles.items()}


def slurm_outcome(stage: str, job: Any, state: str) -> Outcome:
    return Outcome(stage, job.job_id, "done" if state == "COMPLETED" else f"failed ({state})", job.paths.stdout)
