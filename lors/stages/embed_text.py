"""`lors-bench embed-text`: cache a dataset's caption features (lors.data.text_features does the work),
logging a run when it encoded something, described by the manifest it wrote."""

from __future__ import annotations

from pathlib import Path

from lors.config import Params
from lors.data.text_features import embed_dataset
from lors.io import read_json
from lors.tracking import stage_run


def run_embed_text(params: Params, dataset: str) -> Path:
    out, encoded = embed_dataset(params, dataset)
    if encoded:
        manifest = read_json(out / "manifest.json")
        with stage_run(params, "embed_text", f"embed_text/{dataset}", {"dataset": dataset}) as tracker:
            tracker.log_params({"dataset": dataset, **params.text_encoder.model_dump()})
            tracker.log_metrics({f"{split}_captions": entry["n"] for split, entry in manifest["splits"].items()})
            tracker.log_artifact(out / "manifest.json")
    return out
