"""`lors-bench experts --dataset D --expert I`: train one expert trajectory (its own DVC stage and job)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lors.checkpoints import CheckpointStore
from lors.config import Params
from lors.data.augment import protocol_translate_px
from lors.errors import ConfigError
from lors.experts import ExpertJob, PairedSplit, expert_file, is_finished, train_expert
from lors.io import sha256_file, sha256_json, slug
from lors.models import check_image_encoder_name
from lors.paths import Layout
from lors.runtime import member_seed, resolve_device
from lors.tracking import stage_run

log = logging.getLogger(__name__)


def expert_paths(params: Params, dataset: str) -> list[Path]:
    """The trajectory files of the grid's experts (`grid.experts`) of a dataset, in id order."""
    layout, m = Layout(params.work_dir), params.model
    return [expert_file(layout.expert(dataset, m.image_encoder, params.text_encoder.name, i), i)
            for i in params.grid.experts]


def load_expert_data(params: Params, dataset: str) -> tuple[PairedSplit, PairedSplit]:
    """Train and test splits with their cached caption features, through the data layer."""
    from lors.data import load_split, load_text_features

    splits = []
    for name in ("train", "test"):
        split = load_split(params, dataset, name)
        splits.append(PairedSplit(split.images, load_text_features(params, dataset, name), split.txt2img))
    return splits[0], splits[1]


def expert_fingerprint(params: Params, dataset: str, index: int) -> dict[str, Any]:
    """Everything an expert's numbers depend on; its inputs by the content of their manifests."""
    layout, m, e = Layout(params.work_dir), params.model, params.experts
    manifests = {"prepared": layout.prepared(dataset) / "manifest.json",
                 "text_features": layout.text_features(dataset, params.text_encoder.name) / "manifest.json"}
    return {"dataset": dataset, "image_encoder": m.image_encoder, "text_encoder": params.text_encoder.name,
            "pretrained": m.pretrained, "temperature": m.temperature, "text_head_dropout": m.text_head_dropout,
            "image_size": params.dataset(dataset).image_size, "epochs": e.epochs,
            "seed": member_seed(params.seed, index), "lr_img": e.lr_img, "lr_txt": e.lr_txt,
            "batch_size": e.batch_size, "augment": e.augment, "amp": e.amp, "channels_last": e.channels_last,
            "translate_px": protocol_translate_px(params.protocol), "protocol": params.protocol,
            "ties": params.evaluate.tie_rule(params.protocol),
            **{f"{name}_manifest_sha256": sha256_file(path) if path.is_file() else None
               for name, path in manifests.items()}}


def run_expert(params: Params, dataset: str, index: int) -> Path:
    """Train expert `index` of `dataset` unless a matching one is finished; returns its trajectory file."""
    params.dataset(dataset)
    if index not in params.grid.experts:
        raise ConfigError(f"--expert {index}: not in grid.experts {params.grid.experts}")
    check_image_encoder_name(params.model.image_encoder)
    layout = Layout(params.work_dir)
    encoders = f"{slug(params.model.image_encoder)}+{slug(params.text_encoder.name)}"
    fingerprint = expert_fingerprint(params, dataset, index)
    output = expert_file(layout.expert(dataset, params.model.image_encoder, params.text_encoder.name, index), index)
    job = ExpertJob(index, output, CheckpointStore(layout.checkpoints(dataset, f"experts/{encoders}/{index:03d}"),
                                                   sha256_json(fingerprint)), fingerprint)
    if is_finished(job):
        log.info("%s: expert %d is finished (%s)", dataset, index, output)
        return output
    device = resolve_device(params.device)
    train, test = load_expert_data(params, dataset)
    if len(train.txt2img) < params.experts.batch_size:
        raise ConfigError(f"experts.batch_size={params.experts.batch_size} exceeds the {len(train.txt2img)} "
                          f"train captions of dataset '{dataset}'")
    if device.type == "cuda":  # upload once: the loop then never touches host memory
        train = PairedSplit(torch.from_numpy(np.ascontiguousarray(train.images)).to(device),
                            train.text_features.to(device), train.txt2img)
    with stage_run(params, "experts", f"experts/{dataset}/{index:03d}", {"dataset": dataset, "expert": index}) as tracker:
        tracker.log_params({"image_encoder": params.model.image_encoder, "text_encoder": params.text_encoder.name,
                            "expert": index, **params.experts.model_dump()})
        meta = train_expert(params, job, train, test, device, log_metrics=tracker.log_metrics)
        tracker.log_metrics({f"test_{k}": v for k, v in meta["metrics"].items()}, step=params.experts.epochs)
    return output
