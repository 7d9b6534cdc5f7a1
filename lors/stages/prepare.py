"""`lors-bench prepare`: decode and store a dataset's splits (lors.data.prepare does the work), logging a
run when it built something, described by the manifest it wrote."""

from __future__ import annotations

from pathlib import Path

from lors.config import Params
from lors.data.prepare import prepare_dataset
from lors.io import read_json
from lors.tracking import stage_run


def run_prepare(params: Params, dataset: str) -> Path:
    out, built = prepare_dataset(params, dataset)
    if built:
        manifest = read_json(out / "manifest.json")
        with stage_run(params, "prepare", f"prepare/{dataset}", {"dataset": dataset}) as tracker:
            tracker.log_params({k: v for k, v in manifest.items() if k not in ("outputs", "splits")})
            tracker.log_metrics({f"{split}_{key}": value for split, summary in manifest["splits"].items()
                                 for key, value in summary.items() if isinstance(value, (int, float))})
            tracker.log_artifact(out / "manifest.json")
    return out
