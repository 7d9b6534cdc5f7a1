"""The trajectory-matching engine shared by LoRS, TESLA-VL and MTT-VL (method.md 3.5-3.7).

A method supplies its settings (a `TrajectorySettings`), its similarity module and its `match`
(sample-independent: given an expert segment, set the gradients of the learnable set); the engine
builds the learnable set from real or noise pairs, samples expert segments, steps the optimizer,
checkpoints, stops on a non-finite loss and resumes bit-identically.

Iteration count (quirk 8.16): under `protocol: reference` the loop runs it = 0..iterations, i.e.
iterations + 1 updates, as the reference does; under `protocol: clean` it runs `iterations` updates.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from functools import partial
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm import tqdm

from lors.checkpoints import CheckpointStore
from lors.distill.matching import MatchResult
from lors.distill.registry import MethodContext, MethodResult
from lors.distill.synthetic import LearnableSet, check_pool, noise_init, real_init
from lors.distill.trajectories import ExpertPool, Segment
from lors.errors import LorsError
from lors.models import FunctionalDualEncoder, build_dual_encoder
from lors.runtime import rng_state, set_rng_state

log = logging.getLogger(__name__)

Match = Callable[[Segment], MatchResult]


class TrajectorySettings(BaseModel):
    """What every trajectory-matching method reads (method.md 3.1; defaults: the authors' argparse)."""

    model_config = ConfigDict(extra="forbid")

    lr_img: float = 1000.0  # lr of the synthetic images
    lr_txt: float = 1000.0  # lr of the synthetic text features
    lr_lr: float = 1e-2  # lr of the two learnable inner-loop lrs
    syn_steps: int = Field(8, ge=1)  # unrolled student steps per iteration
    expert_epochs: int = Field(1, ge=1)  # target = start + expert_epochs
    max_start_epoch: int = Field(2, ge=1)  # start epoch ~ U{0..max_start_epoch-1}
    temperature: float = Field(0.07, gt=0)  # inner-loop logit temperature
    iterations: int = Field(3000, ge=0)
    momentum: float = 0.5  # SGD momentum of every group
    init_lr: float = 0.1  # initial learnable inner-loop lrs (= the expert lr)
    init: Literal["real", "noise"] = "real"
    no_aug: bool = False  # real init without the train augmentation (COCO-500)


def build_optimizer(syn: LearnableSet, s: TrajectorySettings, lr_sim: float | None = None) -> torch.optim.SGD:
    """SGD with momentum over images, texts, the two lrs and (LoRS) S~; no weight decay (3.5 step 8)."""
    groups = [{"params": [syn.images], "lr": s.lr_img},
              {"params": [syn.texts], "lr": s.lr_txt},
              {"params": [syn.lr_img, syn.lr_txt], "lr": s.lr_lr}]
    if syn.learns_similarity:
        groups.append({"params": list(syn.similarity.parameters()), "lr": lr_sim})
    return torch.optim.SGD(groups, lr=s.lr_img, momentum=s.momentum, weight_decay=0.0)


class TrajectoryRun:
    """The learnable set, its optimizer and the expert sampler; all randomness comes from `generator`
    (sampling) and torch's global RNG (student dropout), both in `state_dict` for exact resumption."""

    def __init__(self, syn: LearnableSet, experts: ExpertPool, settings: TrajectorySettings,
                 optimizer: torch.optim.Optimizer, generator: torch.Generator) -> None:
        self.syn, self.experts, self.settings = syn, experts, settings
        self.optimizer, self.generator = optimizer, generator
        self.device = syn.images.device

    def segment(self) -> Segment:
        _, _, segment = self.experts.sample(self.generator, self.settings.max_start_epoch, self.settings.expert_epochs)
        return segment

    def state_dict(self) -> dict[str, Any]:
        return {"synset": self.syn.state_dict(), "optimizer": self.optimizer.state_dict(),
                "experts": self.experts.state_dict(), "rng": rng_state(self.generator, self.device)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.syn.load_state_dict(state["synset"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.experts.load_state_dict(state["experts"])
        set_rng_state(state["rng"], self.generator, self.device)


def distill_loop(run: TrajectoryRun, match: Match, *, protocol: str, checkpoints: CheckpointStore,
                 checkpoint_every: int, log_metrics: Callable[[dict[str, float], int], None] | None = None,
                 label: str = "distill") -> tuple[list[dict], float]:
    """Run (or resume from `checkpoints`) the iterations; returns the per-update history and the mean
    seconds per update of this process. The last checkpoint is kept until the stage has written its set."""
    s = run.settings
    history: list[dict[str, float]] = []
    start = 0
    if (state := checkpoints.load("latest")) is not None:
        run.load_state_dict(state["run"])
        history, start = state["history"], state["iteration"]
        log.info("%s: resuming from the checkpoint at iteration %d", label, start)

    def checkpoint(next_it: int) -> None:
        checkpoints.save("latest", {"run": run.state_dict(), "history": history, "iteration": next_it})

    last = s.iterations if protocol == "clean" else s.iterations + 1  # updates it = 0..last-1
    seconds, updates = 0.0, 0
    bar = tqdm(range(start, last), desc=label, initial=start, total=last, dynamic_ncols=True)
    for it in bar:
        tic = time.perf_counter()
        lr_img, lr_txt = run.syn.lr_img.item(), run.syn.lr_txt.item()
        result = match(run.segment())
        if not math.isfinite(result.loss):
            raise LorsError(f"{label}: matching loss is {result.loss} at iteration {it}; stopped before updating "
                            f"(the last good state stays in {checkpoints.folder})")
        run.optimizer.step()
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
        seconds += time.perf_counter() - tic
        updates += 1
        row = {"iteration": it, "matching_loss": result.loss, "loss_img": result.loss_img,
               "loss_txt": result.loss_txt, "lr_img": lr_img, "lr_txt": lr_txt}
        history.append(row)
        if log_metrics is not None:
            log_metrics({k: v for k, v in row.items() if k != "iteration"}, it)
        bar.set_postfix(loss=f"{result.loss:.4f}")
        if (it + 1) % checkpoint_every == 0 or it + 1 == last:
            checkpoint(it + 1)
    bar.close()
    return history, (seconds / updates if updates else float("nan"))


def build_student(ctx: MethodContext, text_dim: int) -> FunctionalDualEncoder:
    """The one student network of a run, in train mode (text-head dropout active, quirk 8.7); its
    trainable weights are never used: every unroll starts from an expert snapshot. A frozen backbone is
    not in the snapshots, so it is loaded with its pretrained weights."""
    m = ctx.params.model
    model = build_dual_encoder(m.image_encoder, text_dim, pretrained=False if m.image_trainable else m.pretrained,
                               temperature=ctx.settings.temperature, text_head_dropout=m.text_head_dropout,
                               image_trainable=m.image_trainable)
    return FunctionalDualEncoder(model.to(ctx.device).train())


def build_learnable_set(ctx: MethodContext, n: int, similarity: Callable[[int], nn.Module]) -> tuple[LearnableSet, list[int] | None]:
    """Real (train-augmented unless `no_aug`) or noise initialisation of n pairs; returns the set (on the
    context's device) and its caption rows (None for noise)."""
    from lors.data import load_split, load_text_features

    s = ctx.settings
    split = load_split(ctx.params, ctx.dataset, "train")
    features = load_text_features(ctx.params, ctx.dataset, "train")
    check_pool(n, len(features), f"the training split of '{ctx.dataset}'")
    if s.init == "noise":
        images, texts = noise_init(n, split.images.shape[-1], features.shape[1], ctx.generator)
        rows = None
    else:
        from lors.data.augment import protocol_translate_px, train_augment

        augment = partial(train_augment, translate_px=protocol_translate_px(ctx.params.protocol))
        images, texts, rows = real_init(split.images, split.txt2img, features, n, ctx.generator,
                                        None if s.no_aug else augment)
        rows = rows.tolist()
    return LearnableSet(images, texts, similarity(n), s.init_lr).to(ctx.device), rows


def run_trajectory_method(ctx: MethodContext, n_pairs: int, similarity: Callable[[int], nn.Module],
                          make_match: Callable[[FunctionalDualEncoder, LearnableSet, torch.Generator], Match],
                          lr_sim: float | None = None) -> MethodResult:
    """Build the set, student and expert sampler of one cell, run the loop, return the distilled set."""
    syn, rows = build_learnable_set(ctx, n_pairs, similarity)
    student = build_student(ctx, syn.texts.shape[1])
    s = ctx.settings
    experts = ExpertPool(ctx.expert_paths, s.max_start_epoch + s.expert_epochs,
                         (student.image_layout.numel, student.text_layout.numel), ctx.device)
    run = TrajectoryRun(syn, experts, s, build_optimizer(syn, s, lr_sim), ctx.generator)
    label = f"{ctx.dataset}/{ctx.method}-{ctx.budget}"
    history, seconds = distill_loop(run, make_match(student, syn, ctx.generator), protocol=ctx.params.protocol,
                                    checkpoints=ctx.checkpoints, checkpoint_every=ctx.checkpoint_every,
                                    log_metrics=ctx.log_metrics, label=label)
    synset = syn.to_synset({"n_pairs": len(syn), "init_rows": rows, "iterations": len(history)})
    final = history[-1]["matching_loss"] if history else float("nan")
    return MethodResult(synset, history, {"matching_loss": final, "iterations": len(history),
                                          "seconds_per_iteration": None if math.isnan(seconds) else seconds})
