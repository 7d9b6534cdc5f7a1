"""`lors-bench`: one subcommand per pipeline stage; dvc.yaml calls exactly these.

Each command loads and validates params.yaml, then hands over to the library function of its
stage. Bad input and OS-level failures (no space, read-only or unwritable work_dir, a path under a
file, a vanished input) end in one line on stderr, `error: <what>: <why> — <what to do>`, and exit
code 2; `--debug` (or LORS_DEBUG=1) shows the traceback instead. SIGTERM unwinds the stage (temp
files removed, its run record closed FAILED), prints one line and exits 143 (128 + 15, as a shell
reports a process ended by SIGTERM); Ctrl-C does the same with exit code 130.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer

from lors.errors import LorsError, Terminated, os_error_line

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params file")]
DatasetOpt = Annotated[str, typer.Option("--dataset", "-d", help="dataset key in params.yaml")]
BudgetOpt = Annotated[int, typer.Option("--budget", "-b", help="number of image-text pairs")]
MethodOpt = Annotated[str, typer.Option("--method", "-m")]


_options = {"debug": False, "finished": False}  # set by the callback and by a stage that ended well


@app.callback()
def main(debug: Annotated[bool, typer.Option("--debug", envvar="LORS_DEBUG",
                                             help="show the traceback of an error instead of one line")] = False) -> None:
    """Options before the command apply to every stage."""
    _options["debug"] = debug


def _terminate(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the unwinding short
    raise Terminated


def _failure(exc: BaseException) -> tuple[str, int]:
    """The line a stopped stage prints, and its exit code."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted; the stage resumes from its last checkpoint when run again", 130
    if isinstance(exc, Terminated):
        return "terminated (SIGTERM); finished work is kept and the stage resumes when run again", 143
    return f"error: {exc if isinstance(exc, LorsError) else os_error_line(exc)}", 2


def _stage(fn: Callable) -> Callable:
    """Run a stage with logging set up, SIGTERM turned into an exception that unwinds it, and bad input
    or an OS-level failure reported as one line (exit code 2)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        from lors.runtime import flush_denormals

        flush_denormals()  # before any torch op starts the CPU thread pool
        previous = signal.signal(signal.SIGTERM, _terminate)
        try:
            result = fn(*args, **kwargs)
            _options["finished"] = True
            return result
        except (LorsError, OSError, KeyboardInterrupt, Terminated) as exc:
            if _options["debug"]:
                raise
            line, code = _failure(exc)
            typer.echo(line, err=True)
            raise typer.Exit(code) from None
        finally:
            signal.signal(signal.SIGTERM, previous)

    return wrapper


def _checks() -> tuple:
    """What load_params cannot know alone: method names and per-method blocks against both registries."""
    from baselines.registry import check_params as check_coresets
    from lors.distill.registry import check_params as check_distillation

    return check_distillation, check_coresets


def _params(path: Path):
    """Load params.yaml, validated completely (every problem listed with its dotted key)."""
    from lors.config import load_params

    return load_params(path, checks=_checks())


@app.command()
@_stage
def prepare(dataset: DatasetOpt, params: ParamsOpt = Path("params.yaml")) -> None:
    """Decode images once into a uint8 store, normalise captions, write splits and a manifest."""
    from lors.stages.prepare import run_prepare

    run_prepare(_params(params), dataset)


@app.command("embed-text")
@_stage
def embed_text(dataset: DatasetOpt, params: ParamsOpt = Path("params.yaml")) -> None:
    """Encode every caption with the frozen text encoder and cache the features."""
    from lors.stages.embed_text import run_embed_text

    run_embed_text(_params(params), dataset)


@app.command()
@_stage
def experts(dataset: DatasetOpt, expert: Annotated[int, typer.Option("--expert", "-e", help="an expert id from grid.experts")],
            params: ParamsOpt = Path("params.yaml")) -> None:
    """Train one expert trajectory, keeping only the snapshots distillation reads."""
    from lors.stages.experts import run_expert

    run_expert(_params(params), dataset, expert)


@app.command()
@_stage
def distill(dataset: DatasetOpt, budget: BudgetOpt, method: MethodOpt, params: ParamsOpt = Path("params.yaml")) -> None:
    """Distil a synthetic set with a registered method (lors, tesla_vl, mtt_vl, ...)."""
    from lors.stages.distill import run_distillation

    run_distillation(_params(params), dataset, budget, method)


@app.command()
@_stage
def select(dataset: DatasetOpt, budget: BudgetOpt, method: MethodOpt, params: ParamsOpt = Path("params.yaml")) -> None:
    """Select a coreset of real pairs (random, herding, kcenter, forgetting, vas, clip_score)."""
    from lors.stages.select import run_selection

    run_selection(_params(params), dataset, budget, method)


@app.command()
@_stage
def evaluate(dataset: DatasetOpt, budget: BudgetOpt, method: MethodOpt, params: ParamsOpt = Path("params.yaml"),
             arch: Annotated[Optional[str], typer.Option(
                 help="IMAGE+TEXT[:cls|:mean] encoders (timm / transformers names; omitted or '-' = the source one)")] = None) -> None:
    """Train fresh networks on a synthetic set (--method whole: on the full train split) and measure test retrieval."""
    from lors.stages.evaluate import run_evaluation

    run_evaluation(_params(params), dataset, budget, method, arch=arch)


@app.command()
@_stage
def report(params: ParamsOpt = Path("params.yaml"),
           out: Annotated[Path, typer.Option(help="output folder")] = Path("reports"),
           dataset: Annotated[Optional[str], typer.Option("--dataset", "-d", help="default: every dataset of the grid")] = None) -> None:
    """Write LaTeX/Markdown tables and figures from every evaluation next to the published numbers."""
    from lors.stages.report import run_report

    run_report(_params(params), out, [dataset] if dataset else None)


@app.command()
@_stage
def track(params: ParamsOpt = Path("params.yaml")) -> None:
    """Write the pending run records of finished stages to MLflow (the report stage does this too)."""
    from lors.tracking import flush_pending

    typer.echo(f"{flush_pending(_params(params))} run(s) written to MLflow")


@app.command()
@_stage
def status(params: ParamsOpt = Path("params.yaml")) -> None:
    """The grid's cells: done, stale (and why), checkpointed mid-run, tracking pending."""
    from lors.status import grid_status, render_status

    typer.echo(render_status(grid_status(_params(params))))


@app.command()
@_stage
def profile(name: Annotated[str, typer.Argument(help="a file stem in profiles/: demo, flickr8k, paper, ...")],
            params: ParamsOpt = Path("params.yaml")) -> None:
    """Switch params.yaml to profiles/NAME.yaml (validated first); then `dvc repro` reruns what changed."""
    from lors.profiles import apply_profile

    typer.echo(f"{apply_profile(name, params, checks=_checks())} <- profiles/{name}.yaml")


@app.command()
@_stage
def launch(targets: Annotated[Optional[list[str]], typer.Argument(
               help="stage names or globs (distill, 'distill@coco-*'); default: the whole pipeline")] = None,
           params: ParamsOpt = Path("params.yaml"),
           executor: Annotated[Optional[str], typer.Option(help="slurm | local (default: cluster.executor)")] = None,
           jobs: Annotated[Optional[int], typer.Option("--jobs", "-j", min=1,
                                                       help="local: most jobs at once (default: cluster.local_jobs)")] = None,
           wait: Annotated[bool, typer.Option(help="slurm: wait for the jobs and report failures")] = False,
           dry_run: Annotated[bool, typer.Option("--dry-run", help="print the job arrays, submit nothing")] = False) -> None:
    """Run the stale DVC stages as submitit jobs (SLURM arrays with dependencies, or local processes)."""
    from lors.errors import ConfigError
    from lors.launch import launch as run_launch

    if executor not in (None, "slurm", "local"):
        raise ConfigError(f"--executor {executor}: use slurm or local")
    outcomes = run_launch(_params(params), Path.cwd(), executor, targets or (), jobs, wait, dry_run)
    for result in outcomes:
        typer.echo(result.line())
    if any(result.state.startswith(("failed", "skipped")) for result in outcomes):
        raise typer.Exit(1)


def leave(code: int) -> None:
    """End the process at once: flush logging and the standard streams, then skip Python's interpreter
    teardown, which with torch, timm and torch._dynamo loaded takes about 1 s, paid by each of a
    `dvc repro`'s stage processes (benchmarks/bench_stage_startup.py measures both exits)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    """The `lors-bench` console script. A stage that ended well has written its outputs atomically and
    closed its run record, so nothing is left for the exit handlers: it leaves at once. Any other
    ending (an error, --help, a library used in-process by tests) exits the usual way."""
    try:
        app(prog_name="lors-bench")
    except SystemExit as exc:
        if exc.code in (0, None) and _options["finished"]:
            leave(0)
        raise


if __name__ == "__main__":  # pragma: no cover
    main()
