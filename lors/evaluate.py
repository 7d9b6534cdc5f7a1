"""The evaluation stage: train fresh networks on a set, measure test retrieval (method.md 4).

Every number in the tables comes from here. Network k of an evaluation is seeded with
`params.seed * 1000 + k` (recorded), so the same seed gives the same numbers on CPU. Synthetic sets
are evaluated with the LoRS protocol (method.md 4.1); `method == "whole"` trains on the full train
split with the expert recipe instead, as the upper bound. Either way retrieval is measured on the test
split (and, under `protocol: clean`, on val to choose the epoch) and each network reports its
"best" / "last" (/ "val") epoch; the summary is mean ± population std over networks.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from lors.config import Params
from lors.errors import ConfigError, DataError
from lors.evaluation.arch import EvalArch, parse_arch
from lors.evaluation.resume import NetworkCache
from lors.evaluation.selection import select_epochs, summarise
from lors.evaluation.texts import split_features, training_texts
from lors.evaluation.train import (RetrievalSplit, eval_epochs, run_network, synset_epoch,
                                   synset_optimizer)
from lors.io import sha256_file, sha256_json, slug, write_json
from lors.models import DualEncoder, build_dual_encoder
from lors.models.dual import shared_backbone_seed
from lors.paths import Layout
from lors.retrieval import METRICS
from lors.runtime import SEEDS_PER_RUN, member_seed, resolve_device, seed_everything
from lors.synset import FILENAME, SyntheticSet
from lors.tracking import Tracker, stage_run

log = logging.getLogger(__name__)

WHOLE = "whole"
NetworkHook = Callable[[int, dict], None]


def _retrieval_splits(params: Params, dataset: str, arch: EvalArch, device: torch.device) -> dict[str, RetrievalSplit]:
    """Test (and, under the clean protocol, val) images and caption features, loaded once per call."""
    from lors.data import load_split

    names = ["test", "val"] if params.protocol == "clean" else ["test"]
    splits = {}
    for name in names:
        split = load_split(params, dataset, name)
        features = split_features(params, dataset, name, arch, device)
        splits[name] = RetrievalSplit.upload(split.images, features, split.txt2img, device,
                                             params.evaluate.tie_rule(params.protocol))
    return splits


def _build_model(params: Params, arch: EvalArch, text_dim: int, device: torch.device) -> DualEncoder:
    """Fresh network: ImageNet backbone if `model.pretrained`, random text head (seed torch first)."""
    return build_dual_encoder(arch.image_encoder, text_dim, params.model.pretrained, params.model.temperature,
                              params.model.text_head_dropout,
                              # the authors' evaluation process draws its one backbone apart from the experts'
                              shared_backbone_seed(params.protocol, params.model.pretrained,
                                                   member_seed(params.seed, SEEDS_PER_RUN - 1))).to(device)


def _evaluate_networks(params: Params, train_one: Callable[[torch.Generator], dict], num_eval: int, progress: bool,
                       desc: str, cache: NetworkCache | None, on_network: NetworkHook | None) -> list[dict]:
    """Run `num_eval` seeded networks (skipping those already in `cache`) and choose their epochs."""
    networks = []
    for k in tqdm(range(num_eval), desc=desc, disable=not progress):
        record = cache.load(k) if cache else None
        if record is None:
            seed = member_seed(params.seed, k)
            start = time.perf_counter()
            curve = train_one(seed_everything(seed))
            if not all(math.isfinite(loss) for loss in curve["loss"]):
                log.warning("%s net %d: training loss became non-finite; its retrieval counts as misses", desc, k)
            chosen = select_epochs(curve["epochs"], curve["test"], curve.get("val"))
            final = {sel: curve["test"][curve["epochs"].index(epoch)] for sel, epoch in chosen.items()}
            record = {"seed": seed, **curve, "chosen": chosen, "final": final, "wall_s": time.perf_counter() - start}
            if cache:
                cache.save(k, record)
        log.info("%s net %d (seed %d): best r_mean %.2f at epoch %d, last %.2f, %.1f s", desc, k, record["seed"],
                 record["final"]["best"]["r_mean"], record["chosen"]["best"], record["final"]["last"]["r_mean"],
                 record["wall_s"])
        if on_network:
            on_network(k, record)
        networks.append(record)
    return networks


def _result(params: Params, arch: EvalArch, transfer: str, networks: list[dict], **extra) -> dict:
    selections = list(networks[0]["chosen"])
    return {"arch": arch.name, "image_encoder": arch.image_encoder, "text_encoder": arch.text.name,
            "text_pooling": arch.text.pooling, "text_transfer": transfer, "protocol": params.protocol,
            "ties": params.evaluate.tie_rule(params.protocol),
            "temperature": params.model.temperature, "pretrained": params.model.pretrained, **extra,
            "num_eval": len(networks), "seeds": [net["seed"] for net in networks],
            "summary": summarise(networks, selections), "networks": networks,
            "time_per_network_s": sum(net["wall_s"] for net in networks) / len(networks)}


def _check_synset(params: Params, synset: SyntheticSet, dataset: str, splits: dict[str, RetrievalSplit],
                  arch: EvalArch) -> None:
    if synset.meta.get("dataset") not in (None, dataset):
        raise ConfigError(f"synthetic set was made from dataset '{synset.meta['dataset']}', not '{dataset}'")
    if synset.meta.get("text_encoder") not in (None, params.text_encoder.name):
        raise ConfigError(f"synthetic texts live in the feature space of '{synset.meta['text_encoder']}' but "
                          f"text_encoder.name is '{params.text_encoder.name}'")
    if len(synset) == 0:
        raise DataError("synthetic set is empty")
    test = splits["test"]
    if synset.images.shape[1:] != test.images.shape[1:]:
        raise DataError(f"synthetic images are {tuple(synset.images.shape[1:])} but test images are "
                        f"{tuple(test.images.shape[1:])}: the set was made at another image size")
    if arch.source_text and synset.texts.shape[1] != test.features.shape[1]:
        raise DataError(f"synthetic texts are {synset.texts.shape[1]}-d but the test features of "
                        f"'{arch.text.name}' are {test.features.shape[1]}-d: the set comes from another text encoder")
    for name, lr in (("lr_img", synset.lr_img), ("lr_txt", synset.lr_txt)):
        if not lr >= 0:
            raise DataError(f"synthetic set has {name} = {lr}; evaluation needs a learning rate >= 0")


def evaluate_synset(params: Params, synset: SyntheticSet, dataset: str, arch: str | None = None,
                    num_eval: int | None = None, progress: bool = True, *, cache: NetworkCache | None = None,
                    on_network: NetworkHook | None = None) -> dict:
    """Train `num_eval` fresh networks on the set (method.md 4.1) and measure test retrieval.

    Per network: SGD (momentum, weight decay of `evaluate`) with the set's lr_img / lr_txt, x0.1 at
    epoch epochs//2+1, epochs 0..`evaluate.epochs`, each of ceil(N/b) independent random mini-batches
    against the set's similarity, no augmentation, temperature `model.temperature`; retrieval after
    every `eval_every`-th epoch and the last. Returns summary[selection][metric] = {mean, std} and the
    per-network curves.
    """
    device = resolve_device(params.device)
    eval_arch = parse_arch(arch, params)
    splits = _retrieval_splits(params, dataset, eval_arch, device)
    _check_synset(params, synset, dataset, splits, eval_arch)
    texts = training_texts(params, dataset, synset.texts, eval_arch, splits["test"].features.shape[1], device)
    networks = train_networks_on_set(params, eval_arch, synset, texts.train, splits, num_eval=num_eval,
                                     progress=progress, desc=f"evaluate {dataset}", cache=cache,
                                     on_network=on_network)
    return _result(params, eval_arch, texts.transfer, networks, n_pairs=len(synset), lr_img=synset.lr_img,
                   lr_txt=synset.lr_txt, loss=params.evaluate.loss, epochs=params.evaluate.epochs,
                   nearest_rows=texts.nearest_rows)


def train_networks_on_set(params: Params, arch: EvalArch, synset: SyntheticSet, train_texts: torch.Tensor,
                          splits: dict[str, RetrievalSplit], *, num_eval: int | None = None, progress: bool = True,
                          desc: str = "evaluate", cache: NetworkCache | None = None,
                          on_network: NetworkHook | None = None) -> list[dict]:
    """The protocol itself on data already in memory (the benchmarks call this directly)."""
    cfg = params.evaluate
    device = resolve_device(params.device)
    images = synset.images.float().to(device)
    train_texts = train_texts.float().to(device)
    similarity = synset.similarity.float().to(device)
    eval_at = eval_epochs(0, cfg.epochs, cfg.eval_every)

    def train_one(generator: torch.Generator) -> dict:
        model = _build_model(params, arch, train_texts.shape[1], device)
        optimizer, scheduler = synset_optimizer(model, synset.lr_img, synset.lr_txt, cfg.momentum, cfg.weight_decay,
                                                cfg.epochs)

        def train_epoch(epoch: int) -> float:
            loss = synset_epoch(model, optimizer, images, train_texts, similarity, batch_size=cfg.batch_size,
                                loss=cfg.loss, generator=generator)
            scheduler.step()
            return loss

        return run_network(model, train_epoch, range(cfg.epochs + 1), splits, eval_at, device, cfg.amp, progress)

    return _evaluate_networks(params, train_one, num_eval or cfg.num_eval, progress, desc, cache, on_network)


def evaluate_whole(params: Params, dataset: str, arch: str | None = None, num_eval: int | None = None,
                   progress: bool = True, *, cache: NetworkCache | None = None,
                   on_network: NetworkHook | None = None) -> dict:
    """The "whole dataset" upper bound: `evaluate.whole_epochs` epochs of the expert recipe on the full
    train split (lors.experts), retrieval after every epoch, same selections and summary."""
    from lors.data import load_split
    from lors.data.augment import protocol_translate_px
    from lors.experts import make_expert_optimizer, train_contrastive_epoch

    device = resolve_device(params.device)
    eval_arch = parse_arch(arch, params)
    splits = _retrieval_splits(params, dataset, eval_arch, device)
    train = load_split(params, dataset, "train")
    features = split_features(params, dataset, "train", eval_arch, device)
    epochs = range(1, params.evaluate.whole_epochs + 1)
    recipe = params.experts

    def train_one(generator: torch.Generator) -> dict:
        model = _build_model(params, eval_arch, features.shape[1], device)
        optimizer = make_expert_optimizer(model, recipe.lr_img, recipe.lr_txt)

        def train_epoch(epoch: int) -> float:
            return train_contrastive_epoch(model, optimizer, train.images, features, train.txt2img,
                                           batch_size=recipe.batch_size, generator=generator, device=device,
                                           augment=recipe.augment, amp=recipe.amp, channels_last=recipe.channels_last,
                                           translate_px=protocol_translate_px(params.protocol))

        return run_network(model, train_epoch, epochs, splits, epochs, device, params.evaluate.amp, progress)

    networks = _evaluate_networks(params, train_one, num_eval or params.evaluate.num_eval, progress,
                                  f"evaluate {dataset} whole", cache, on_network)
    return _result(params, eval_arch, "none" if eval_arch.source_text else "real_captions", networks,
                   n_pairs=len(train.txt2img), lr_img=recipe.lr_img, lr_txt=recipe.lr_txt, loss="infonce",
                   epochs=params.evaluate.whole_epochs)


def _log_network(tracker: Tracker, k: int, record: dict) -> None:
    for i, epoch in enumerate(record["epochs"]):
        metrics = {f"net{k}/loss": record["loss"][i]}
        for split in ("test", "val"):
            if split in record:
                metrics.update({f"net{k}/{split}_{m}": record[split][i][m] for m in METRICS})
        tracker.log_metrics(metrics, step=epoch)


def _fingerprint(params: Params, arch: EvalArch, method: str, data: str) -> str:
    return sha256_json({"data": data, "method": method, "arch": arch.name, "text": arch.text.model_dump(),
                        "seed": params.seed, "protocol": params.protocol, "device": params.device,
                        "evaluate": params.evaluate.model_dump(), "model": params.model.model_dump(),
                        "experts": params.experts.model_dump() if method == WHOLE else None})


def run_evaluation(params: Params, dataset: str, budget: int, method: str, arch: str | None = None) -> Path:
    """Evaluate `Layout.synset(dataset, budget, method)` (or the whole train split for method "whole",
    budget 0 in the file name) and write `Layout.evaluation(...)` JSON; logs the run to MLflow."""
    params.dataset(dataset)
    eval_arch = parse_arch(arch, params)
    layout = Layout(params.work_dir)
    budget = 0 if method == WHOLE else budget
    # named after the arch as asked for (what dvc.yaml declares); the source arch when none is given
    out = layout.evaluation(dataset, budget, method, arch or eval_arch.name)
    synset = None
    if method == WHOLE:
        data = "whole"
    else:
        path = layout.synset(dataset, budget, method) / FILENAME
        if not path.is_file():
            raise DataError(f"{path}: synthetic set not found (run distill or select for {dataset} "
                            f"{method}-{budget} first)")
        try:
            synset = SyntheticSet.load(path)
        except Exception as exc:  # safetensors or shape errors of a damaged file
            reason = (str(exc).splitlines() or [""])[0]
            raise DataError(f"{path}: cannot read the synthetic set ({exc.__class__.__name__}: {reason})") from exc
        data = sha256_file(path)
    cache = NetworkCache(layout.checkpoints(dataset, f"evaluate/{method}-{budget}/{slug(eval_arch.name)}"),
                         _fingerprint(params, eval_arch, method, data))
    name = f"{dataset}/{method}-{budget}/{eval_arch.name}"
    tags = {"dataset": dataset, "budget": budget, "method": method, "arch": eval_arch.name,
            "image_encoder": eval_arch.image_encoder, "text_encoder": eval_arch.text.name}
    with stage_run(params, "evaluate", name, tags=tags) as tracker:
        tracker.log_params({"num_eval": params.evaluate.num_eval, "epochs": params.evaluate.epochs,
                            "eval_every": params.evaluate.eval_every, "loss": params.evaluate.loss,
                            "temperature": params.model.temperature, "pretrained": params.model.pretrained,
                            "text_transfer": params.evaluate.text_transfer, "seed": params.seed})

        def on_network(k: int, record: dict) -> None:
            _log_network(tracker, k, record)

        if synset is None:
            result = evaluate_whole(params, dataset, arch, cache=cache, on_network=on_network)
        else:
            result = evaluate_synset(params, synset, dataset, arch, cache=cache, on_network=on_network)
        result = {"dataset": dataset, "budget": budget, "method": method, **result}
        write_json(out, result)
        tracker.set_tags({"text_transfer": result["text_transfer"]})
        tracker.log_params({"n_pairs": result["n_pairs"], "lr_img": result["lr_img"], "lr_txt": result["lr_txt"]})
        tracker.log_metrics({f"{sel}_{metric}_{stat}": value[stat] for sel, per in result["summary"].items()
                             for metric, value in per.items() for stat in ("mean", "std")})
        tracker.log_metrics({"time_per_network_s": result["time_per_network_s"]})
        tracker.log_artifact(out)
    cache.clear()
    log.info("%s: best r_mean %.2f ± %.2f -> %s", name, result["summary"]["best"]["r_mean"]["mean"],
             result["summary"]["best"]["r_mean"]["std"], out)
    return out
