"""`lors-bench`: one subcommand per pipeline stage; dvc.yaml calls exactly these.

Each command loads and validates params.yaml, then hands over to the library function of its
stage. Bad input ends in one line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer

from lors.errors import LorsError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params file")]
DatasetOpt = Annotated[str, typer.Option("--dataset", "-d", help="dataset key in params.yaml")]
BudgetOpt = Annotated[int, typer.Option("--budget", "-b", help="number of image-text pairs")]
MethodOpt = Annotated[str, typer.Option("--method", "-m")]


def _stage(fn: Callable) -> Callable:
    """Run a stage with logging set up and bad input reported as one line."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        try:
            return fn(*args, **kwargs)
        except LorsError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted; the stage resumes from its last checkpoint when run again", err=True)
            raise typer.Exit(130) from None

    return wrapper


def _params(path: Path):
    from lors.config import load_params

    return load_params(path)


@app.command()
@_stage
def prepare(dataset: DatasetOpt, params: ParamsOpt = Path("params.yaml")) -> None:
    """Decode images once into a uint8 store, normalise captions, write splits and a manifest."""
    from lors.data.prepare import prepare_dataset

    prepare_dataset(_params(params), dataset)


@app.command("embed-text")
@_stage
def embed_text(dataset: DatasetOpt, params: ParamsOpt = Path("params.yaml")) -> None:
    """Encode every caption with the frozen text encoder and cache the features."""
    from lors.data.text_features import embed_dataset

    embed_dataset(_params(params), dataset)


@app.command()
@_stage
def experts(dataset: DatasetOpt, params: ParamsOpt = Path("params.yaml"),
            shard: Annotated[str, typer.Option(help="i/n: train every n-th expert starting at i")] = "0/1") -> None:
    """Train expert trajectories, keeping only the snapshots distillation reads."""
    from lors.experts import parse_shard, train_experts

    train_experts(_params(params), dataset, shard=parse_shard(shard))


@app.command()
@_stage
def distill(dataset: DatasetOpt, budget: BudgetOpt, method: MethodOpt, params: ParamsOpt = Path("params.yaml")) -> None:
    """Distil a synthetic set by trajectory matching (lors, tesla_vl, mtt_vl)."""
    from lors.distill import run_distillation

    run_distillation(_params(params), dataset, budget, method)


@app.command()
@_stage
def select(dataset: DatasetOpt, budget: BudgetOpt, method: MethodOpt, params: ParamsOpt = Path("params.yaml")) -> None:
    """Select a coreset of real pairs (random, herding, kcenter, forgetting, vas, clip_score)."""
    from baselines import run_selection

    run_selection(_params(params), dataset, budget, method)


@app.command()
@_stage
def evaluate(dataset: DatasetOpt, budget: BudgetOpt, method: MethodOpt, params: ParamsOpt = Path("params.yaml"),
             arch: Annotated[Optional[str], typer.Option(
                 help="IMAGE+TEXT[:cls|:mean] encoders (timm / transformers names; omitted or '-' = the source one)")] = None) -> None:
    """Train fresh networks on a synthetic set (--method whole: on the full train split) and measure test retrieval."""
    from lors.evaluate import run_evaluation

    run_evaluation(_params(params), dataset, budget, method, arch=arch)


@app.command()
@_stage
def report(params: ParamsOpt = Path("params.yaml"),
           out: Annotated[Path, typer.Option(help="output folder")] = Path("reports"),
           dataset: Annotated[Optional[str], typer.Option("--dataset", "-d", help="default: every dataset of the grid")] = None) -> None:
    """Write LaTeX/Markdown tables and figures from every evaluation next to the published numbers."""
    from lors.report import build_reports

    build_reports(_params(params), out, [dataset] if dataset else None)


@app.command()
@_stage
def track(params: ParamsOpt = Path("params.yaml")) -> None:
    """Write the pending run records of finished stages to MLflow (the report stage does this too)."""
    from lors.tracking import flush_pending

    typer.echo(f"{flush_pending(_params(params))} run(s) written to MLflow")


@app.command()
@_stage
def profile(name: Annotated[str, typer.Argument(help="a file stem in profiles/: demo, flickr8k, paper, ...")],
            params: ParamsOpt = Path("params.yaml")) -> None:
    """Switch params.yaml to profiles/NAME.yaml (validated first); then `dvc repro` reruns what changed."""
    from lors.profiles import apply_profile

    typer.echo(f"{apply_profile(name, params)} <- profiles/{name}.yaml")


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


if __name__ == "__main__":  # pragma: no cover
    app()
