"""`lors-bench distill --dataset D --budget B --method M`: distil one cell of the grid.

Resolves the method's settings (lors.distill.registry), gives its `run` a context with a seeded
generator and a fingerprinted checkpoint store, and writes `synset.safetensors`, `metrics.json` and
`loss.csv` (DVC plots) to `Layout.synset`, logging the run (matching loss per iteration, the set's
image grid, nearest captions and similarity figure) to MLflow.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from lors.checkpoints import CheckpointStore, content_fingerprint
from lors.config import Params
from lors.distill.registry import MethodContext, get_method, resolve_settings
from lors.errors import DataError
from lors.io import atomic_path, write_json
from lors.paths import Layout
from lors.runtime import resolve_device, seed_everything
from lors.stages.experts import expert_paths
from lors.synset import FILENAME as SYNSET_FILENAME
from lors.tracking import stage_run

log = logging.getLogger(__name__)


def _write_loss_csv(path: Path, history: list[dict[str, float]]) -> None:
    columns = ["iteration", *[k for k in (history[0] if history else {}) if k != "iteration"]]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)


def run_distillation(params: Params, dataset: str, budget: int, method: str) -> Path:
    """Distil `dataset` to `budget` pairs with `method`; returns the synthetic-set folder."""
    entry = get_method(method)
    params.dataset(dataset)
    settings = resolve_settings(params, method, dataset, budget)
    layout = Layout(params.work_dir)
    experts = expert_paths(params, dataset) if entry.needs_experts else []

    for path in experts:
        if not path.is_file():
            raise DataError(f"{path}: expert trajectory not found (run the experts stage of {dataset} first)")
    meta = {"dataset": dataset, "budget": budget, "method": method, "image_encoder": params.model.image_encoder,
            "text_encoder": params.text_encoder.name, "protocol": params.protocol, "seed": params.seed,
            "setting": settings.model_dump()}
    inputs = [layout.prepared(dataset) / "manifest.json",
              layout.text_features(dataset, params.text_encoder.name) / "manifest.json", *experts]
    fingerprint = content_fingerprint({**meta, "model": params.model.model_dump(mode="json"),
                                       "text": params.text_encoder.model_dump()}, inputs)
    store = CheckpointStore(layout.checkpoints(dataset, f"distill/{method}-{budget}"), fingerprint)
    label = f"{dataset}/{method}-{budget}"
    with stage_run(params, "distill", label, {"dataset": dataset, "method": method, "budget": budget}) as tracker:
        tracker.log_params(settings.model_dump())
        ctx = MethodContext(params=params, method=method, dataset=dataset, budget=budget, settings=settings,
                            device=resolve_device(params.device), generator=seed_everything(params.seed),
                            checkpoints=store, checkpoint_every=params.distill.checkpoint_every,
                            expert_paths=experts, log_metrics=lambda metrics, step: tracker.log_metrics(metrics, step))
        result = entry.run(ctx)
        synset = result.synset
        synset.meta = {**meta, "image_size": int(synset.images.shape[-1]), **synset.meta}
        out = layout.synset(dataset, budget, method)
        synset.save(out / SYNSET_FILENAME)
        _write_loss_csv(out / "loss.csv", result.history)
        write_json(out / "metrics.json", result.metrics)
        tracker.log_metrics({k: v for k, v in result.metrics.items() if isinstance(v, (int, float))})
        tracker.log_artifact(out / "loss.csv")
        if tracker.active:
            from lors.artifacts import log_synset_artifacts
            from lors.data import load_split, load_text_features

            log_synset_artifacts(tracker, synset, load_split(params, dataset, "train").captions,
                                 load_text_features(params, dataset, "train"))
    store.clear()
    log.info("%s: %d pairs, %s -> %s", label, len(synset), result.metrics, out)
    return out
