"""Expert trajectories (method.md 2): the real-data training runs that distillation matches.

Each expert is a dual encoder trained with the reference recipe (symmetric InfoNCE at a fixed
temperature, plain SGD with one learning rate per branch, batch 128, shuffled caption rows, the
train augmentation) for only the epochs distillation reads (`Params.expert_epochs_needed`). Its
flat parameter snapshots after epochs 0..E are stored in one safetensors file per expert, with
per-caption forgetting counts (Toneva et al. 2019) next to it for the forgetting coreset.

Experts are independent: `--shard i/n` trains experts i, i+n, ...; expert i is seeded with
`params.seed * 1000 + i` (model init, shuffling, augmentation and dropout), so any sharding gives
the same files. A finished expert is never retrained; an interrupted one resumes from its last
epoch-end checkpoint and ends bitwise identical (on CPU) to an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import safe_open, save_file
from tqdm import tqdm

from lors.config import Params
from lors.data.augment import protocol_translate_px, train_augment
from lors.data.image_store import gather_images
from lors.data.transforms import normalize, to_unit
from lors.errors import ConfigError, DataError
from lors.io import atomic_path, sha256_file, slug, write_json
from lors.losses import infonce
from lors.models import DualEncoder, FlatParams, build_dual_encoder, check_image_encoder_name
from lors.models.dual import shared_backbone_seed
from lors.paths import Layout
from lors.retrieval import test_retrieval
from lors.runtime import SEEDS_PER_RUN, member_seed, resolve_device, rng_state, seed_everything, set_rng_state

log = logging.getLogger(__name__)

FILE_PATTERN = "expert_[0-9][0-9][0-9].safetensors"


def expert_file(directory: Path, index: int) -> Path:
    return Path(directory) / f"expert_{index:03d}.safetensors"


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n: this process trains experts i, i+n, i+2n, ..."""
    parts = str(text).split("/")
    try:
        index, count = (int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"--shard '{text}': expected i/n with integers, e.g. 0/1 or 2/4") from None
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"--shard '{text}': need n >= 1 and 0 <= i < n")
    return index, count


@dataclass
class PairedSplit:
    """What an expert trains or is tested on: uint8 images, caption features, caption -> image."""

    images: np.ndarray | torch.Tensor  # uint8 (n_images, 3, S, S)
    text_features: torch.Tensor  # (n_captions, d)
    txt2img: np.ndarray  # int64 (n_captions,)


@dataclass
class Trajectory:
    """Flat snapshots after epochs 0..E of one expert, in `FlatParams` order of each branch."""

    image: torch.Tensor  # (E+1, P_img)
    text: torch.Tensor  # (E+1, P_txt)
    meta: dict[str, Any]

    @property
    def epochs(self) -> int:
        return self.image.shape[0] - 1


def make_expert_optimizer(model: DualEncoder, lr_img: float, lr_txt: float) -> torch.optim.SGD:
    """The reference's SGD: one group per branch, no momentum, no weight decay, constant lr."""
    return torch.optim.SGD([{"params": model.image_encoder.parameters(), "lr": lr_img},
                            {"params": model.text_head.parameters(), "lr": lr_txt}],
                           lr=lr_img, momentum=0.0, weight_decay=0.0)


def train_contrastive_epoch(model: DualEncoder, optimizer: torch.optim.Optimizer, images: np.ndarray | torch.Tensor,
                            text_features: torch.Tensor, txt2img: np.ndarray, *, batch_size: int,
                            generator: torch.Generator, device: torch.device, augment: bool = True,
                            amp: bool = False, channels_last: bool = False, translate_px: float | None = None,
                            on_batch: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> float:
    """One epoch of symmetric InfoNCE over caption rows (shuffled with `generator`, last partial
    batch dropped, as the reference loader); returns the mean loss.

    Each sample is caption row j with image txt2img[j], augmented from the uint8 store on `device`.
    `on_batch(rows, logits)` sees every batch's caption rows (CPU) and detached logits.
    """
    n = len(txt2img)
    steps = n // batch_size
    if steps == 0:
        raise ConfigError(f"batch size {batch_size} is larger than the {n} training captions")
    order = torch.randperm(n, generator=generator, device=generator.device).cpu()
    txt2img = torch.as_tensor(np.asarray(txt2img), dtype=torch.long)
    use_amp = amp and device.type == "cuda"
    model.train()
    total = torch.zeros((), device=device)
    for step in range(steps):
        rows = order[step * batch_size:(step + 1) * batch_size]
        pixels = to_unit(gather_images(images, txt2img[rows]).to(device, non_blocking=True))
        if augment:
            pixels = train_augment(pixels, generator, translate_px=translate_px)
        pixels = normalize(pixels)
        if channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        texts = text_features[rows.to(text_features.device)].to(device, torch.float32, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = model(pixels, texts)
        loss = infonce(logits.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()
        if on_batch is not None:
            on_batch(rows, logits.detach())
    return (total / steps).item()


class ForgettingCounter:
    """Per caption row: forgetting events (correct at the previous presentation, wrong now) and
    whether it was ever learned. Correct = the pair's in-batch retrieval hits in both directions:
    the argmax of its logits row (image -> texts) and of its column (text -> images)."""

    def __init__(self, n_rows: int, device: torch.device) -> None:
        self.previous = torch.zeros(n_rows, dtype=torch.bool, device=device)
        self.learned = torch.zeros(n_rows, dtype=torch.bool, device=device)
        self.events = torch.zeros(n_rows, dtype=torch.int32, device=device)

    def update(self, rows: torch.Tensor, logits: torch.Tensor) -> None:
        rows = rows.to(self.events.device)
        diagonal = torch.arange(len(rows), device=logits.device)
        correct = ((logits.argmax(1) == diagonal) & (logits.argmax(0) == diagonal)).to(self.events.device)
        self.events[rows] += (self.previous[rows] & ~correct).int()
        self.previous[rows] = correct
        self.learned[rows] |= correct

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"previous": self.previous.cpu(), "learned": self.learned.cpu(), "events": self.events.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in state.items():
            getattr(self, name).copy_(value)


def _snapshot(model: DualEncoder, layouts: tuple[FlatParams, FlatParams]) -> tuple[torch.Tensor, torch.Tensor]:
    return (layouts[0].flatten(model.image_encoder).float().cpu(), layouts[1].flatten(model.text_head).float().cpu())


@dataclass
class ExpertJob:
    """Everything one expert depends on; `fingerprint` decides whether files and checkpoints fit."""

    index: int
    output: Path
    checkpoint_dir: Path
    fingerprint: dict[str, Any]


class _Checkpoint:
    """The in-progress expert: snapshots written once each, plus the state at the last epoch end."""

    def __init__(self, folder: Path, fingerprint: dict[str, Any]) -> None:
        self.folder = folder
        self.fingerprint = fingerprint

    def snapshot_path(self, epoch: int) -> Path:
        return self.folder / f"snapshot_{epoch:03d}.safetensors"

    def save(self, epoch: int, snapshot: tuple[torch.Tensor, torch.Tensor], state: dict[str, Any]) -> None:
        with atomic_path(self.snapshot_path(epoch)) as tmp:
            save_file({"image": snapshot[0], "text": snapshot[1]}, str(tmp))
        with atomic_path(self.folder / "state.pt") as tmp:
            torch.save({"fingerprint": self.fingerprint, "epoch": epoch, **state}, tmp)

    def load(self) -> tuple[dict[str, Any], list[tuple[torch.Tensor, torch.Tensor]]] | None:
        path = self.folder / "state.pt"
        if not path.is_file():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
            if state.get("fingerprint") != self.fingerprint:
                log.warning("%s: checkpoint from different settings; starting this expert afresh", path)
                return None
            snapshots = []
            for epoch in range(state["epoch"] + 1):
                with safe_open(str(self.snapshot_path(epoch)), "pt") as fh:
                    snapshots.append((fh.get_tensor("image"), fh.get_tensor("text")))
        except Exception as exc:  # unreadable checkpoint: redo the expert rather than fail the stage
            log.warning("%s: unreadable checkpoint (%s); starting this expert afresh", path, exc)
            return None
        return state, snapshots

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def train_expert(params: Params, job: ExpertJob, train: PairedSplit, test: PairedSplit,
                 device: torch.device) -> dict[str, Any]:
    """Train (or resume) one expert and write its trajectory and forgetting files; return its meta."""
    cfg, fp = params.experts, job.fingerprint
    ties = params.evaluate.tie_rule(params.protocol)
    epochs, seed = fp["epochs"], fp["seed"]
    seed_everything(seed)
    model = build_dual_encoder(params.model.image_encoder, train.text_features.shape[1], params.model.pretrained,
                               params.model.temperature, params.model.text_head_dropout,
                               shared_backbone_seed(params.protocol, params.model.pretrained,
                                                    member_seed(params.seed, 0))).to(device)
    if cfg.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_expert_optimizer(model, cfg.lr_img, cfg.lr_txt)
    layouts = (FlatParams(model.image_encoder), FlatParams(model.text_head))
    generator = torch.Generator().manual_seed(seed)
    forgetting = ForgettingCounter(len(train.txt2img), device)
    checkpoint = _Checkpoint(job.checkpoint_dir, fp)
    losses: list[float] = []
    history: list[dict[str, float]] = []

    def training_state() -> dict[str, Any]:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng_state(generator, device),
                "forgetting": forgetting.state_dict(), "losses": losses, "history": history}

    resumed = checkpoint.load()
    if resumed is None:
        checkpoint.clear()
        start, snapshots = 0, [_snapshot(model, layouts)]
        checkpoint.save(0, snapshots[0], training_state())
    else:
        state, snapshots = resumed
        start = state["epoch"]
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        forgetting.load_state_dict(state["forgetting"])
        losses, history = state["losses"], state["history"]
        set_rng_state(state["rng"], generator, device)
        log.info("expert %d: resuming after epoch %d", job.index, start)

    steps = len(train.txt2img) // cfg.batch_size
    with tqdm(total=epochs * steps, initial=start * steps, desc=f"expert {job.index}", unit="step",
              dynamic_ncols=True) as bar:
        def on_batch(rows: torch.Tensor, logits: torch.Tensor) -> None:
            forgetting.update(rows, logits)
            bar.update(1)

        for epoch in range(start + 1, epochs + 1):
            losses.append(train_contrastive_epoch(
                model, optimizer, train.images, train.text_features, train.txt2img, batch_size=cfg.batch_size,
                generator=generator, device=device, augment=cfg.augment, amp=cfg.amp,
                channels_last=cfg.channels_last, translate_px=protocol_translate_px(params.protocol), on_batch=on_batch))
            bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.4f}")
            if cfg.eval_every and epoch % cfg.eval_every == 0 and epoch < epochs:
                history.append({"epoch": epoch, **test_retrieval(model, test.images, test.text_features,
                                                                 test.txt2img, device, amp=cfg.amp, ties=ties)})
                log.info("expert %d epoch %d: r_mean %.2f", job.index, epoch, history[-1]["r_mean"])
            snapshots.append(_snapshot(model, layouts))
            checkpoint.save(epoch, snapshots[-1], training_state())

    metrics = test_retrieval(model, test.images, test.text_features, test.txt2img, device, amp=cfg.amp, ties=ties)
    history.append({"epoch": epochs, **metrics})
    counts = forgetting.state_dict()
    meta = {**fp, "index": job.index, "text_dim": train.text_features.shape[1], "losses": losses,
            "metrics": metrics, "history": history, "forgetting_events": int(counts["events"].sum()),
            "learned_fraction": counts["learned"].float().mean().item()}
    _write_expert(job.output, snapshots, counts, meta)
    checkpoint.clear()
    log.info("expert %d: test retrieval r_mean %.2f (IR@1 %.2f, TR@1 %.2f) after %d epochs", job.index,
             metrics["r_mean"], metrics["ir1"], metrics["tr1"], epochs)
    return meta


def _write_expert(path: Path, snapshots: list[tuple[torch.Tensor, torch.Tensor]], counts: dict[str, torch.Tensor],
                  meta: dict[str, Any]) -> None:
    """Forgetting files first, the trajectory last: its presence marks the expert finished."""
    for suffix, value in ((".forgetting.npy", counts["events"].numpy().astype(np.int32)),
                          (".learned.npy", counts["learned"].numpy().astype(bool))):
        with atomic_path(path.with_suffix(suffix)) as tmp, open(tmp, "wb") as fh:
            np.save(fh, value)
    tensors = {"image": torch.stack([s[0] for s in snapshots]).contiguous(),
               "text": torch.stack([s[1] for s in snapshots]).contiguous()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta, default=str)})


def _read_header(path: Path) -> tuple[dict[str, Any], dict[str, list[int]]]:
    try:
        with safe_open(str(path), "pt") as fh:
            meta = json.loads((fh.metadata() or {})["meta"])
            shapes = {k: list(fh.get_slice(k).get_shape()) for k in ("image", "text")}
    except FileNotFoundError:
        raise DataError(f"{path}: expert trajectory not found (run `lors-bench experts` first)") from None
    except Exception as exc:
        raise DataError(f"{path}: not a readable expert trajectory ({exc.__class__.__name__})") from exc
    if shapes["image"][0] != meta.get("epochs", -1) + 1 or shapes["text"][0] != shapes["image"][0]:
        raise DataError(f"{path}: {shapes['image'][0]} snapshots for {meta.get('epochs')} epochs (corrupt file)")
    return meta, shapes


def read_expert_meta(path: str | Path) -> dict[str, Any]:
    """The header metadata of an expert file, without reading its tensors."""
    return _read_header(Path(path))[0]


def _is_finished(job: ExpertJob) -> bool:
    """A present expert file counts only if it was trained with the same settings and data."""
    if not job.output.is_file():
        return False
    try:
        meta = read_expert_meta(job.output)
    except DataError as exc:
        log.warning("%s; retraining", exc)
        return False
    differs = [k for k, v in job.fingerprint.items() if k != "epochs" and meta.get(k) != v]
    if meta["epochs"] < job.fingerprint["epochs"]:
        differs.append("epochs")
    differs += [s for s in (".forgetting.npy", ".learned.npy") if not job.output.with_suffix(s).is_file()]
    if differs:
        log.warning("%s: differs in %s; retraining", job.output, ", ".join(differs))
    return not differs


def load_trajectory(path: str | Path, max_snapshots: int | None = None) -> Trajectory:
    """Read an expert's snapshots (optionally only the first `max_snapshots`) in one pass."""
    path = Path(path)
    meta = read_expert_meta(path)
    with safe_open(str(path), "pt") as fh:
        if max_snapshots is None:
            image, text = fh.get_tensor("image"), fh.get_tensor("text")
        else:
            image, text = fh.get_slice("image")[:max_snapshots], fh.get_slice("text")[:max_snapshots]
    return Trajectory(image=image, text=text, meta=meta)


def list_experts(directory: str | Path) -> list[Path]:
    """Finished expert files of a folder, in index order (empty if none finished yet)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: no expert folder (run `lors-bench experts` first)")
    return sorted(directory.glob(FILE_PATTERN))


def _manifest_hash(folder: Path) -> str | None:
    manifest = folder / "manifest.json"
    return sha256_file(manifest) if manifest.is_file() else None


def load_expert_data(params: Params, dataset: str) -> tuple[PairedSplit, PairedSplit]:
    """Train and test splits with their cached caption features, through the data layer."""
    from lors.data import load_split, load_text_features

    splits = []
    for name in ("train", "test"):
        split = load_split(params, dataset, name)
        splits.append(PairedSplit(split.images, load_text_features(params, dataset, name), split.txt2img))
    return splits[0], splits[1]


def _fingerprint(params: Params, dataset: str, index: int, epochs: int) -> dict[str, Any]:
    layout = Layout(params.work_dir)
    m, e = params.model, params.experts
    return {"dataset": dataset, "image_encoder": m.image_encoder, "text_encoder": params.text_encoder.name,
            "pretrained": m.pretrained, "temperature": m.temperature, "text_head_dropout": m.text_head_dropout,
            "image_size": params.dataset(dataset).image_size, "epochs": epochs,
            "seed": member_seed(params.seed, index), "lr_img": e.lr_img, "lr_txt": e.lr_txt,
            "batch_size": e.batch_size, "augment": e.augment, "amp": e.amp, "channels_last": e.channels_last,
            "translate_px": protocol_translate_px(params.protocol), "protocol": params.protocol,
            "prepared_manifest_sha256": _manifest_hash(layout.prepared(dataset)),
            "text_features_manifest_sha256": _manifest_hash(layout.text_features(dataset, params.text_encoder.name))}


def write_manifest(params: Params, dataset: str, directory: Path, epochs: int) -> Path:
    """Summarise every finished expert in the folder (all shards), with the inputs they came from."""
    experts = []
    for path in list_experts(directory):
        meta = read_expert_meta(path)
        experts.append({"index": meta["index"], "file": path.name, "seed": meta["seed"], "epochs": meta["epochs"],
                        "metrics": meta["metrics"], "forgetting_events": meta["forgetting_events"],
                        "learned_fraction": meta["learned_fraction"]})
    common = _fingerprint(params, dataset, 0, epochs)
    common.pop("seed")
    manifest = {**common, "seed_rule": f"expert i uses seed {params.seed} * {SEEDS_PER_RUN} + i",
                "num_experts": params.experts.num_experts, "complete": len(experts) >= params.experts.num_experts,
                "experts": experts}
    write_json(directory / "manifest.json", manifest)
    return directory / "manifest.json"


def train_experts(params: Params, dataset: str, shard: tuple[int, int] = (0, 1)) -> Path:
    """The `experts` stage: train this shard's missing experts, then refresh the manifest."""
    from lors.tracking import stage_run

    params.dataset(dataset)
    check_image_encoder_name(params.model.image_encoder)
    index, count = shard
    layout = Layout(params.work_dir)
    directory = layout.experts(dataset, params.model.image_encoder, params.text_encoder.name)
    epochs = params.expert_epochs_needed(dataset)
    device = resolve_device(params.device)
    encoders = f"{slug(params.model.image_encoder)}+{slug(params.text_encoder.name)}"
    jobs = [ExpertJob(i, expert_file(directory, i), layout.checkpoints(dataset, f"experts/{encoders}/{i:03d}"),
                      _fingerprint(params, dataset, i, epochs))
            for i in range(index, params.experts.num_experts, count)]
    pending = [job for job in jobs if not _is_finished(job)]
    log.info("%s: %d of this shard's %d experts to train (%d epochs each) on %s", dataset, len(pending), len(jobs),
             epochs, device)
    if pending:
        train, test = load_expert_data(params, dataset)
        if len(train.txt2img) < params.experts.batch_size:
            raise ConfigError(f"experts.batch_size={params.experts.batch_size} exceeds the {len(train.txt2img)} "
                              f"train captions of dataset '{dataset}'")
        if device.type == "cuda":  # upload once: the loop then never touches host memory
            train = PairedSplit(torch.from_numpy(np.ascontiguousarray(train.images)).to(device),
                                train.text_features.to(device), train.txt2img)
        with stage_run(params, "experts", f"experts {dataset} {index}/{count}",
                       {"dataset": dataset, "shard": f"{index}/{count}"}) as tracker:
            tracker.log_params({"epochs": epochs, "image_encoder": params.model.image_encoder,
                                "text_encoder": params.text_encoder.name, **params.experts.model_dump()})
            for job in pending:
                meta = train_expert(params, job, train, test, device)
                tracker.log_metrics({f"expert_{k}": v for k, v in meta["metrics"].items()}, step=job.index)
    directory.mkdir(parents=True, exist_ok=True)
    write_manifest(params, dataset, directory, epochs)
    return directory
