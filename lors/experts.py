"""Expert trajectories (method.md 2): the real-data training runs that distillation matches.

Each expert is a dual encoder trained with the reference recipe (symmetric InfoNCE at a fixed
temperature, plain SGD with one learning rate per branch, batch 128, shuffled caption rows, the
train augmentation) for `experts.epochs` epochs, only as many as distillation reads. Its flat
parameter snapshots after epochs 0..E are stored in one safetensors file per expert, with per-caption
forgetting counts (Toneva et al. 2019) next to it for the forgetting coreset.

Experts are independent (one DVC stage, one cluster job each: lors.stages.experts); expert i is
seeded with `params.seed * 1000 + i` (model init, shuffling, augmentation and dropout). A finished
expert is never retrained; an interrupted one resumes from its last epoch-end checkpoint and ends
bitwise identical (on CPU) to an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import safe_open
from tqdm import tqdm

from lors.config import Params
from lors.data.augment import protocol_translate_px, train_augment
from lors.data.image_store import gather_images
from lors.data.transforms import normalize, to_unit
from lors.checkpoints import CheckpointStore
from lors.errors import ConfigError, DataError
from lors.io import atomic_path, save_safetensors
from lors.losses import infonce
from lors.models import DualEncoder, FlatParams, build_dual_encoder
from lors.models.dual import shared_backbone_seed
from lors.retrieval import test_retrieval
from lors.runtime import member_seed, rng_state, seed_everything, set_rng_state

log = logging.getLogger(__name__)

def expert_file(folder: Path, index: int) -> Path:
    """The trajectory file in an expert's own folder (`Layout.expert`); forgetting files sit beside it."""
    return Path(folder) / f"expert_{index}.safetensors"


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
    """Everything one expert depends on; `fingerprint` decides whether its file and checkpoint fit."""

    index: int
    output: Path
    checkpoints: CheckpointStore
    fingerprint: dict[str, Any]


def _save_epoch(store: CheckpointStore, epoch: int, snapshot: tuple[torch.Tensor, torch.Tensor],
                state: dict[str, Any]) -> None:
    """Each snapshot is written once (a file beside the state); the state is the one of the last epoch end."""
    save_safetensors(store.path(f"snapshot_{epoch:03d}.safetensors"), {"image": snapshot[0], "text": snapshot[1]}, {})
    store.save("state", {"epoch": epoch, **state})


def _load_epochs(store: CheckpointStore) -> tuple[dict[str, Any], list[tuple[torch.Tensor, torch.Tensor]]] | None:
    state = store.load("state")
    if state is None:
        return None
    snapshots = []
    for epoch in range(state["epoch"] + 1):
        path = store.path(f"snapshot_{epoch:03d}.safetensors")
        try:
            with safe_open(str(path), "pt") as fh:
                snapshots.append((fh.get_tensor("image"), fh.get_tensor("text")))
        except Exception as exc:  # noqa: BLE001 - a damaged snapshot: redo the expert rather than fail
            log.warning("%s: unreadable snapshot (%s); starting this expert afresh", path, exc.__class__.__name__)
            return None
    return state, snapshots


def train_expert(params: Params, job: ExpertJob, train: PairedSplit, test: PairedSplit, device: torch.device,
                 log_metrics: Callable[[dict[str, float], int], None] | None = None) -> dict[str, Any]:
    """Train (or resume) one expert and write its trajectory and forgetting files; return its meta.
    `log_metrics(metrics, epoch)` sees each epoch's loss (and retrieval when measured)."""
    cfg, fp = params.experts, job.fingerprint
    ties = params.evaluate.tie_rule(params.protocol)
    epochs, seed = fp["epochs"], fp["seed"]
    seed_everything(seed)
    model = build_dual_encoder(params.model.image_encoder, train.text_features.shape[1], params.model.pretrained,
                               params.model.temperature, params.model.text_head_dropout,
                               shared_backbone_seed(params.protocol, params.model.pretrained,
                                                    member_seed(params.seed, 0)),
                               params.model.image_trainable).to(device)
    if cfg.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_expert_optimizer(model, cfg.lr_img, cfg.lr_txt)
    layouts = (FlatParams(model.image_encoder), FlatParams(model.text_head))
    generator = torch.Generator().manual_seed(seed)
    forgetting = ForgettingCounter(len(train.txt2img), device)
    losses: list[float] = []
    history: list[dict[str, float]] = []

    def training_state() -> dict[str, Any]:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng_state(generator, device),
                "forgetting": forgetting.state_dict(), "losses": losses, "history": history}

    resumed = _load_epochs(job.checkpoints)
    if resumed is None:
        job.checkpoints.clear()
        start, snapshots = 0, [_snapshot(model, layouts)]
        _save_epoch(job.checkpoints, 0, snapshots[0], training_state())
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
            epoch_metrics = {"loss": losses[-1]}
            if cfg.eval_every and epoch % cfg.eval_every == 0 and epoch < epochs:
                history.append({"epoch": epoch, **test_retrieval(model, test.images, test.text_features,
                                                                 test.txt2img, device, amp=cfg.amp, ties=ties)})
                log.info("expert %d epoch %d: r_mean %.2f", job.index, epoch, history[-1]["r_mean"])
                epoch_metrics.update({f"test_{k}": v for k, v in history[-1].items() if k != "epoch"})
            if log_metrics is not None:
                log_metrics(epoch_metrics, epoch)
            snapshots.append(_snapshot(model, layouts))
            _save_epoch(job.checkpoints, epoch, snapshots[-1], training_state())

    metrics = test_retrieval(model, test.images, test.text_features, test.txt2img, device, amp=cfg.amp, ties=ties)
    history.append({"epoch": epochs, **metrics})
    counts = forgetting.state_dict()
    meta = {**fp, "index": job.index, "text_dim": train.text_features.shape[1], "losses": losses,
            "metrics": metrics, "history": history, "forgetting_events": int(counts["events"].sum()),
            "learned_fraction": counts["learned"].float().mean().item()}
    _write_expert(job.output, snapshots, counts, meta)
    job.checkpoints.clear()
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
    save_safetensors(path, tensors, {"meta": json.dumps(meta, default=str, sort_keys=True)})


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


def is_finished(job: ExpertJob) -> bool:
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
