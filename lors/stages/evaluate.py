"""`lors-bench evaluate --dataset D --budget B --method M [--arch A]`: score one set (or the whole
train split, `--method whole`) and write `Layout.evaluation(...)` JSON; logs the run to MLflow.

Which protocol trains the networks: `evaluate.default` (the LoRS protocol), overridden key by key by
`evaluate.methods.<method>` under `protocol: reference` (EvaluateConfig.settings). Finished networks are
kept in a fingerprinted checkpoint store, so a killed evaluation resumes at the next network.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lors.checkpoints import CheckpointStore, content_fingerprint
from lors.config import Params
from lors.errors import DataError
from lors.evaluation import parse_arch
from lors.evaluation.protocol import evaluate_synset, evaluate_whole
from lors.io import slug, write_json
from lors.paths import Layout
from lors.retrieval import METRICS
from lors.synset import FILENAME, SyntheticSet
from lors.tracking import Tracker, stage_run

log = logging.getLogger(__name__)

WHOLE = "whole"  # the whole-dataset upper bound


def _log_network(tracker: Tracker, k: int, record: dict) -> None:
    for i, epoch in enumerate(record["epochs"]):
        metrics = {f"net{k}/loss": record["loss"][i]}
        for split in ("test", "val"):
            if split in record:
                metrics.update({f"net{k}/{split}_{m}": record[split][i][m] for m in METRICS})
        tracker.log_metrics(metrics, step=epoch)


def _load_synset(path: Path, dataset: str, method: str, budget: int) -> SyntheticSet:
    if not path.is_file():
        raise DataError(f"{path}: synthetic set not found (run distill or select for {dataset} {method}-{budget} first)")
    try:
        return SyntheticSet.load(path)
    except Exception as exc:  # safetensors or shape errors of a damaged file
        reason = (str(exc).splitlines() or [""])[0]
        raise DataError(f"{path}: cannot read the synthetic set ({exc.__class__.__name__}: {reason})") from exc


def run_evaluation(params: Params, dataset: str, budget: int, method: str, arch: str | None = None) -> Path:
    """Evaluate `Layout.synset(dataset, budget, method)` (or the whole train split for method "whole",
    budget 0 in the file name) and write `Layout.evaluation(...)` JSON."""
    params.dataset(dataset)
    eval_arch = parse_arch(arch, params)
    layout = Layout(params.work_dir)
    budget = 0 if method == WHOLE else budget
    # named after the arch as asked for (what dvc.yaml declares); the source arch when none is given
    out = layout.evaluation(dataset, budget, method, arch or eval_arch.name)
    settings = params.evaluate.settings(method, params.protocol)
    common = {"method": method, "arch": eval_arch.name, "text": eval_arch.text.model_dump(), "seed": params.seed,
              "protocol": params.protocol, "device": params.device, "model": params.model.model_dump(mode="json"),
              "evaluate": {**params.evaluate.model_dump(exclude={"default", "methods"}), **settings.model_dump()}}
    if method == WHOLE:
        synset, inputs = None, [layout.prepared(dataset) / "manifest.json"]
        common["experts"] = params.experts.model_dump()
    else:
        path = layout.synset(dataset, budget, method) / FILENAME
        synset, inputs = _load_synset(path, dataset, method, budget), [path]
    store = CheckpointStore(layout.checkpoints(dataset, f"evaluate/{method}-{budget}/{slug(eval_arch.name)}"),
                            content_fingerprint(common, inputs))
    name = f"{dataset}/{method}-{budget}/{eval_arch.name}"
    tags = {"dataset": dataset, "budget": budget, "method": method, "arch": eval_arch.name,
            "image_encoder": eval_arch.image_encoder, "text_encoder": eval_arch.text.name}
    with stage_run(params, "evaluate", name, tags=tags) as tracker:
        tracker.log_params({"num_eval": params.evaluate.num_eval, **{f"eval_{k}": v for k, v in settings.model_dump().items()},
                            "temperature": params.model.temperature, "pretrained": params.model.pretrained,
                            "text_transfer": params.evaluate.text_transfer, "seed": params.seed})

        def on_network(k: int, record: dict) -> None:
            _log_network(tracker, k, record)

        if synset is None:
            result = evaluate_whole(params, dataset, arch, checkpoints=store, on_network=on_network)
        else:
            result = evaluate_synset(params, synset, dataset, arch, settings=settings, checkpoints=store,
                                     on_network=on_network)
        result = {"dataset": dataset, "budget": budget, "method": method, **result}
        if synset is not None and "pair_scorer" in synset.meta:  # clip_score / vas: a real CLIP or the fallback
            result["pair_scorer"] = synset.meta["pair_scorer"]
        write_json(out, result)
        tracker.set_tags({"text_transfer": result["text_transfer"], "eval_protocol": result["eval_protocol"]})
        tracker.log_params({"n_pairs": result["n_pairs"], "lr_img": result["lr_img"], "lr_txt": result["lr_txt"]})
        tracker.log_metrics({f"{sel}_{metric}_{stat}": value[stat] for sel, per in result["summary"].items()
                             for metric, value in per.items() for stat in ("mean", "std")})
        tracker.log_metrics({"time_per_network_s": result["time_per_network_s"]})
        tracker.log_artifact(out)
    store.clear()
    log.info("%s: best r_mean %.2f ± %.2f -> %s", name, result["summary"]["best"]["r_mean"]["mean"],
             result["summary"]["best"]["r_mean"]["std"], out)
    return out
