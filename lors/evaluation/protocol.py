"""The evaluation protocols: train fresh networks on a set, measure test retrieval (method.md 4).

Every number in the tables comes from here. Network k of an evaluation is seeded with
`params.seed * 1000 + k` (recorded), so the same seed gives the same numbers on CPU. A set is trained
on with its `EvalSettings`: the LoRS protocol (4.1) or VL-Distill's (4.2); `evaluate_whole` trains on
the full train split with the expert recipe instead, as the upper bound. Either way retrieval is
measured on the test split (and, under `protocol: clean`, on val to choose the epoch) and each network
reports its "best" / "last" (/ "val") epoch; the summary is mean ± population std over networks.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import replace

import torch
from tqdm import tqdm

from lors.checkpoints import CheckpointStore
from lors.config import EvalSettings, Params
from lors.errors import ConfigError, DataError
from lors.evaluation.arch import EvalArch, parse_arch
from lors.evaluation.selection import select_epochs, summarise
from lors.evaluation.stacked import seeded_members, train_stacked
from lors.evaluation.texts import split_features, training_texts
from lors.evaluation.train import (RetrievalSplit, eval_epochs, partition_epoch, run_network, synset_epoch,
                                   synset_optimizer)
from lors.models import DualEncoder, build_dual_encoder
from lors.models.dual import shared_backbone_seed
from lors.retrieval import encode_images
from lors.runtime import SEEDS_PER_RUN, member_seed, resolve_device, seed_everything
from lors.synset import SyntheticSet

log = logging.getLogger(__name__)

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


def _embed_if_frozen(params: Params, arch: EvalArch, splits: dict[str, RetrievalSplit],
                     device: torch.device) -> dict[str, RetrievalSplit]:
    """A frozen backbone embeds an image the same way in every network and at every epoch, so each
    split's images are embedded once here instead of at every retrieval check."""
    if params.model.image_trainable:
        return splits
    with torch.random.fork_rng(devices=[]):  # the throwaway text head must not move the networks' seeds
        model = _build_model(params, arch, next(iter(splits.values())).features.shape[1], device).eval()
    return {name: replace(split, images=encode_images(model, split.images, device, amp=params.evaluate.amp))
            for name, split in splits.items()}


def _build_model(params: Params, arch: EvalArch, text_dim: int, device: torch.device) -> DualEncoder:
    """Fresh network: ImageNet backbone if `model.pretrained`, random text head (seed torch first)."""
    return build_dual_encoder(arch.image_encoder, text_dim, params.model.pretrained, params.model.temperature,
                              params.model.text_head_dropout,
                              # the authors' evaluation process draws its one backbone apart from the experts'
                              shared_backbone_seed(params.protocol, params.model.pretrained,
                                                   member_seed(params.seed, SEEDS_PER_RUN - 1)),
                              params.model.image_trainable).to(device)


def _evaluate_networks(params: Params, train_one: Callable[[int, torch.Generator], dict], num_eval: int,
                       progress: bool, desc: str, checkpoints: CheckpointStore | None,
                       on_network: NetworkHook | None) -> list[dict]:
    """Run `num_eval` seeded networks (skipping those already in `checkpoints`) and choose their epochs.
    `train_one(k, generator)` trains network k right after seeding everything with its member seed."""
    networks = []
    for k in tqdm(range(num_eval), desc=desc, disable=not progress):
        record = checkpoints.load(f"net{k}") if checkpoints else None
        if record is None:
            seed = member_seed(params.seed, k)
            start = time.perf_counter()
            curve = train_one(k, seed_everything(seed))
            if not all(math.isfinite(loss) for loss in curve["loss"]):
                log.warning("%s net %d: training loss became non-finite; its retrieval counts as misses", desc, k)
            chosen = select_epochs(curve["epochs"], curve["test"], curve.get("val"))
            final = {sel: curve["test"][curve["epochs"].index(epoch)] for sel, epoch in chosen.items()}
            wall = curve.pop("wall_s", time.perf_counter() - start)  # stacked networks bring their share
            record = {"seed": seed, **curve, "chosen": chosen, "final": final, "wall_s": wall}
            if checkpoints:
                checkpoints.save(f"net{k}", record)
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
                    num_eval: int | None = None, progress: bool = True, *, settings: EvalSettings | None = None,
                    checkpoints: CheckpointStore | None = None, on_network: NetworkHook | None = None) -> dict:
    """Train `num_eval` fresh networks on the set with `settings` (default `evaluate.default`, the LoRS
    protocol) and measure test retrieval. Returns summary[selection][metric] = {mean, std} and the
    per-network curves."""
    settings = settings or params.evaluate.default
    device = resolve_device(params.device)
    eval_arch = parse_arch(arch, params)
    splits = _retrieval_splits(params, dataset, eval_arch, device)
    _check_synset(params, synset, dataset, splits, eval_arch)
    splits = _embed_if_frozen(params, eval_arch, splits, device)
    texts = training_texts(params, dataset, synset.texts, eval_arch, splits["test"].features.shape[1], device)
    networks = train_networks_on_set(params, eval_arch, synset, texts.train, splits, settings, num_eval=num_eval,
                                     progress=progress, desc=f"evaluate {dataset}", checkpoints=checkpoints,
                                     on_network=on_network)
    loss = settings.loss if settings.protocol == "lors" else "infonce"
    return _result(params, eval_arch, texts.transfer, networks, n_pairs=len(synset), lr_img=synset.lr_img,
                   lr_txt=synset.lr_txt, loss=loss, epochs=settings.epochs, eval_protocol=settings.protocol,
                   nearest_rows=texts.nearest_rows)


def train_networks_on_set(params: Params, arch: EvalArch, synset: SyntheticSet, train_texts: torch.Tensor,
                          splits: dict[str, RetrievalSplit], settings: EvalSettings, *, num_eval: int | None = None,
                          progress: bool = True, desc: str = "evaluate", checkpoints: CheckpointStore | None = None,
                          on_network: NetworkHook | None = None) -> list[dict]:
    """The protocol itself on data already in memory (the benchmarks call this directly).

    lors (method.md 4.1): SGD with the set's lr_img / lr_txt, x0.1 from epoch epochs//2+1, each of
    ceil(N/b) batches an independent random subset with its S~ block, retrieval every `eval_every`-th
    epoch and the last. vl_distill (4.2): the set's lr_img for both branches, constant (VL-Distill's decay
    comes after the final epoch), shuffled partitions of b pairs, InfoNCE with identity targets,
    retrieval after the last epoch only. Both: momentum and weight decay of `settings`, no augmentation,
    temperature `model.temperature`, epochs 0..`settings.epochs`.
    """
    device = resolve_device(params.device)
    images = synset.images.float().to(device)
    train_texts = train_texts.float().to(device)
    similarity = synset.similarity.float().to(device)
    s = settings
    vl_distill = s.protocol == "vl_distill"
    eval_at = [s.epochs] if vl_distill else eval_epochs(0, s.epochs, s.eval_every)

    num_eval = num_eval or params.evaluate.num_eval
    if params.evaluate.stacked and not vl_distill:
        missing = [k for k in range(num_eval) if not (checkpoints and checkpoints.load(f"net{k}") is not None)]
        members = seeded_members(lambda: _build_model(params, arch, train_texts.shape[1], device),
                                 [member_seed(params.seed, k) for k in missing])
        curves = dict(zip(missing, train_stacked(members, images, train_texts, similarity, lr_img=synset.lr_img,
                                                 lr_txt=synset.lr_txt, settings=s, amp=params.evaluate.amp,
                                                 splits=splits, device=device, progress=progress)))
        for curve in curves.values():
            curve["wall_s"] = curve["train_s"] + curve["eval_s"]
        return _evaluate_networks(params, lambda k, _: curves[k], num_eval, progress, desc, checkpoints, on_network)

    def train_one(k: int, generator: torch.Generator) -> dict:
        model = _build_model(params, arch, train_texts.shape[1], device)
        lr_txt = synset.lr_img if vl_distill else synset.lr_txt
        optimizer, scheduler = synset_optimizer(model, synset.lr_img, lr_txt, s.momentum, s.weight_decay,
                                                None if vl_distill else s.epochs)

        def train_epoch(epoch: int) -> float:
            if vl_distill:
                return partition_epoch(model, optimizer, images, train_texts, batch_size=s.batch_size,
                                       generator=generator)
            loss = synset_epoch(model, optimizer, images, train_texts, similarity, batch_size=s.batch_size,
                                loss=s.loss, generator=generator)
            scheduler.step()
            return loss

        return run_network(model, train_epoch, range(s.epochs + 1), splits, eval_at, device, params.evaluate.amp,
                           progress)

    return _evaluate_networks(params, train_one, num_eval, progress, desc, checkpoints, on_network)


def evaluate_whole(params: Params, dataset: str, arch: str | None = None, num_eval: int | None = None,
                   progress: bool = True, *, checkpoints: CheckpointStore | None = None,
                   on_network: NetworkHook | None = None) -> dict:
    """The "whole dataset" upper bound: `evaluate.whole_epochs` epochs of the expert recipe on the full
    train split (lors.experts), retrieval after every epoch, same selections and summary."""
    from lors.data import load_split
    from lors.data.augment import protocol_translate_px
    from lors.experts import make_expert_optimizer, train_contrastive_epoch

    device = resolve_device(params.device)
    eval_arch = parse_arch(arch, params)
    splits = _embed_if_frozen(params, eval_arch, _retrieval_splits(params, dataset, eval_arch, device), device)
    train = load_split(params, dataset, "train")
    features = split_features(params, dataset, "train", eval_arch, device)
    epochs = range(1, params.evaluate.whole_epochs + 1)
    recipe = params.experts

    def train_one(k: int, generator: torch.Generator) -> dict:
        model = _build_model(params, eval_arch, features.shape[1], device)
        optimizer = make_expert_optimizer(model, recipe.lr_img, recipe.lr_txt)

        def train_epoch(epoch: int) -> float:
            return train_contrastive_epoch(model, optimizer, train.images, features, train.txt2img,
                                           batch_size=recipe.batch_size, generator=generator, device=device,
                                           augment=recipe.augment, amp=recipe.amp, channels_last=recipe.channels_last,
                                           translate_px=protocol_translate_px(params.protocol))

        return run_network(model, train_epoch, epochs, splits, epochs, device, params.evaluate.amp, progress)

    networks = _evaluate_networks(params, train_one, num_eval or params.evaluate.num_eval, progress,
                                  f"evaluate {dataset} whole", checkpoints, on_network)
    return _result(params, eval_arch, "none" if eval_arch.source_text else "real_captions", networks,
                   n_pairs=len(train.txt2img), lr_img=recipe.lr_img, lr_txt=recipe.lr_txt, loss="infonce",
                   epochs=params.evaluate.whole_epochs, eval_protocol="whole")
