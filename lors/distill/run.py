"""The distill stage: build the set, loop matching iterations, checkpoint, resume, write outputs.

`Distiller` is one method's update rule (sample an expert segment, compute the gradients, one SGD
momentum step); `distill_loop` drives it with checkpoints, the NaN stop, the evaluation hook and
tracking; `run_distillation` assembles both from params and writes the synthetic set.

Iteration count (quirk 8.16): under `protocol: reference` the loop runs it = 0..iterations, i.e.
iterations + 1 updates, with the evaluation at it = iterations taken before the last update, as
the reference does; under `protocol: clean` it runs `iterations` updates and the evaluation at
it = iterations sees the final set.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lors.config import DistillSetting, Params
from lors.distill.matching import MatchResult, tesla_iteration, walk_batches
from lors.distill.mtt import mtt_iteration, mtt_temperature, random_subsets
from lors.distill.synthetic import (LearnableSet, build_method_similarity, check_pool, n_synthetic_pairs,
                                    noise_init, real_init)
from lors.distill.trajectories import ExpertPool
from lors.errors import ConfigError, LorsError
from lors.io import atomic_path, sha256_json, write_json
from lors.models import FunctionalDualEncoder, build_dual_encoder
from lors.paths import Layout
from lors.runtime import resolve_device, rng_state, seed_everything, set_rng_state
from lors.synset import FILENAME as SYNSET_FILENAME
from lors.synset import SyntheticSet
from lors.tracking import Tracker, stage_run

log = logging.getLogger(__name__)

METHODS = ("lors", "tesla_vl", "mtt_vl")
EvalHook = Callable[[Any, int], dict]  # (SyntheticSet, iteration) -> evaluate_synset-style result


def build_optimizer(syn: LearnableSet, setting: DistillSetting) -> torch.optim.SGD:
    """SGD with momentum over images, texts, the two lrs and (LoRS) S~; no weight decay (3.5 step 8)."""
    groups = [{"params": [syn.images], "lr": setting.lr_img},
              {"params": [syn.texts], "lr": setting.lr_txt},
              {"params": [syn.lr_img, syn.lr_txt], "lr": setting.lr_lr}]
    if syn.learns_similarity:
        groups.append({"params": list(syn.similarity.parameters()), "lr": setting.lr_sim})
    return torch.optim.SGD(groups, lr=setting.lr_img, momentum=setting.momentum, weight_decay=0.0)


class Distiller:
    """One method's update rule; all randomness comes from `generator` (sampling) and torch's
    global RNG (student dropout), both saved in `state_dict` for exact resumption."""

    def __init__(self, method: str, student: FunctionalDualEncoder, syn: LearnableSet, experts: ExpertPool,
                 setting: DistillSetting, protocol: str, generator: torch.Generator) -> None:
        if method not in METHODS:
            raise ConfigError(f"unknown distillation method '{method}' (choose from {', '.join(METHODS)})")
        self.method, self.student, self.syn, self.experts = method, student, syn, experts
        self.setting, self.protocol, self.generator = setting, protocol, generator
        self.device = syn.images.device
        self.optimizer = build_optimizer(syn, setting)

    def match(self) -> MatchResult:
        """Sample an expert segment and set the gradients of the synthetic set (no update yet)."""
        s = self.setting
        _, _, segment = self.experts.sample(self.generator, s.max_start_epoch, s.expert_epochs)
        n = len(self.syn)
        if self.method == "mtt_vl":
            subsets = random_subsets(n, s.mtt_mini_batch, s.syn_steps, self.generator)
            return mtt_iteration(self.student, self.syn, segment, [i.to(self.device) for i in subsets],
                                 temperature=mtt_temperature(s.temperature, self.protocol))
        batches = walk_batches(n, s.mini_batch, s.syn_steps, self.generator)
        return tesla_iteration(self.student, self.syn, segment, [i.to(self.device) for i in batches],
                               loss=s.loss, temperature=s.temperature, merge_branches=s.merge_branches)

    def update(self) -> None:
        self.optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return {"synset": self.syn.state_dict(), "optimizer": self.optimizer.state_dict(),
                "experts": self.experts.state_dict(), "rng": rng_state(self.generator, self.device)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.syn.load_state_dict(state["synset"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.experts.load_state_dict(state["experts"])
        set_rng_state(state["rng"], self.generator, self.device)


class CheckpointStore:
    """Atomic `state-{iteration}.pt` files; only the newest is kept. A checkpoint written under
    another configuration (fingerprint) is ignored rather than resumed."""

    def __init__(self, folder: Path, fingerprint: str) -> None:
        self.folder, self.fingerprint = Path(folder), fingerprint

    def paths(self) -> list[Path]:
        return sorted(self.folder.glob("state-*.pt")) if self.folder.is_dir() else []

    def latest(self) -> dict[str, Any] | None:
        paths = self.paths()
        if not paths:
            return None
        state = torch.load(paths[-1], map_location="cpu", weights_only=False)
        if state.get("fingerprint") != self.fingerprint:
            log.warning("%s was written under another configuration; starting afresh", paths[-1])
            return None
        return state

    def save(self, iteration: int, state: dict[str, Any]) -> Path:
        path = self.folder / f"state-{iteration:07d}.pt"
        with atomic_path(path) as tmp:
            torch.save({**state, "iteration": iteration, "fingerprint": self.fingerprint}, tmp)
        for old in self.paths():
            if old != path:
                old.unlink()
        return path

    def clear(self) -> None:
        for path in self.paths():
            path.unlink()


@dataclass
class LoopResult:
    history: list[dict[str, float]] = field(default_factory=list)  # one row per update
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    seconds_per_iteration: float = float("nan")  # over the updates run by this process


def _eval_metrics(result: dict) -> dict[str, float]:
    """Flatten `summary[selection][metric]["mean"]` for the tracker."""
    return {f"eval_{sel}_{metric}": stats["mean"] for sel, metrics in result.get("summary", {}).items()
            for metric, stats in metrics.items() if isinstance(stats, dict) and "mean" in stats}


def distill_loop(distiller: Distiller, *, iterations: int, protocol: str, store: CheckpointStore,
                 checkpoint_every: int, eval_every: int = 0, eval_hook: EvalHook | None = None,
                 synset_meta: dict[str, Any] | None = None, tracker: Tracker | None = None,
                 label: str = "distill") -> LoopResult:
    """Run (or resume) the iterations; see the module docstring for the count under each protocol."""
    tracker = tracker or Tracker()
    result = LoopResult()
    start = 0
    if (state := store.latest()) is not None:
        distiller.load_state_dict(state["distiller"])
        result.history, result.evaluations, start = state["history"], state["evaluations"], state["iteration"]
        log.info("%s: resuming from the checkpoint at iteration %d", label, start)

    def checkpoint(next_it: int) -> Path:
        return store.save(next_it, {"distiller": distiller.state_dict(), "history": result.history,
                                    "evaluations": result.evaluations})

    device = distiller.device
    seconds, updates = 0.0, 0
    bar = tqdm(range(start, iterations + 1), desc=label, initial=start, total=iterations + 1, dynamic_ncols=True)
    for it in bar:
        if eval_every and eval_hook is not None and it % eval_every == 0:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # eval leaves the RNG be
                evaluation = eval_hook(distiller.syn.to_synset({**(synset_meta or {}), "iterations": it}), it)
            result.evaluations.append({"iteration": it, "summary": evaluation.get("summary", {})})
            tracker.log_metrics(_eval_metrics(evaluation), step=it)
        if it == iterations and protocol == "clean":
            break
        tic = time.perf_counter()
        lr_img, lr_txt = distiller.syn.lr_img.item(), distiller.syn.lr_txt.item()
        match = distiller.match()
        if not math.isfinite(match.loss):
            good = store.paths()
            raise LorsError(f"{label}: matching loss is {match.loss} at iteration {it}; stopped before updating "
                            f"(last good checkpoint: {good[-1] if good else 'none'})")
        distiller.update()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - tic
        updates += 1
        row = {"iteration": it, "matching_loss": match.loss, "loss_img": match.loss_img,
               "loss_txt": match.loss_txt, "lr_img": lr_img, "lr_txt": lr_txt}
        result.history.append(row)
        tracker.log_metrics({k: v for k, v in row.items() if k != "iteration"}, step=it)
        bar.set_postfix(loss=f"{match.loss:.4f}")
        if (it + 1) % checkpoint_every == 0:
            checkpoint(it + 1)
    bar.close()
    if updates:
        result.seconds_per_iteration = seconds / updates
        checkpoint(iterations if protocol == "clean" else iterations + 1)
    return result


def build_student(params: Params, text_dim: int, temperature: float, device: torch.device) -> FunctionalDualEncoder:
    """The one student network of a run, in train mode (text-head dropout active, quirk 8.7); its
    own weights are never used: every unroll starts from an expert snapshot."""
    model = build_dual_encoder(params.model.image_encoder, text_dim, pretrained=False, temperature=temperature,
                               text_head_dropout=params.model.text_head_dropout)
    return FunctionalDualEncoder(model.to(device).train())


def build_learnable_set(params: Params, dataset: str, budget: int, method: str, setting: DistillSetting,
                        generator: torch.Generator) -> tuple[LearnableSet, torch.Tensor | None]:
    """Real (augmented unless `no_aug`) or noise initialisation; returns the set and its caption rows."""
    from lors.data import load_split, load_text_features

    split = load_split(params, dataset, "train")
    features = load_text_features(params, dataset, "train")
    n = n_synthetic_pairs(method, budget, params.protocol)
    check_pool(n, len(features), f"the training split of '{dataset}'")
    if setting.init == "noise":
        images, texts = noise_init(n, split.images.shape[-1], features.shape[1], generator)
        rows = None
    else:
        from lors.data.augment import protocol_translate_px, train_augment

        augment = partial(train_augment, translate_px=protocol_translate_px(params.protocol))
        images, texts, rows = real_init(split.images, split.txt2img, features, n, generator,
                                        None if setting.no_aug else augment)
    return LearnableSet(images, texts, build_method_similarity(method, setting, n), setting.init_lr), rows


def _write_loss_csv(path: Path, history: list[dict[str, float]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["iteration", "matching_loss", "lr_img", "lr_txt"])
        for row in history:
            writer.writerow([row["iteration"], row["matching_loss"], row["lr_img"], row["lr_txt"]])


def _log_artifacts(params: Params, dataset: str, tracker: Tracker, synset: SyntheticSet) -> None:
    """Image grid, nearest real captions and similarity figure of the final set (tracked runs only)."""
    if tracker.active:
        from lors.artifacts import log_synset_artifacts
        from lors.data import load_split, load_text_features

        log_synset_artifacts(tracker, synset, load_split(params, dataset, "train").captions,
                             load_text_features(params, dataset, "train"))


def run_distillation(params: Params, dataset: str, budget: int, method: str,
                     eval_hook: EvalHook | None = None) -> Path:
    """Distil `dataset` to `budget` pairs with `method`; returns the synthetic-set folder.

    `eval_hook(synset, iteration)` defaults to `lors.evaluate.evaluate_synset` on this dataset and
    runs every `setting.eval_every` iterations (0: never).
    """
    if method not in METHODS:
        raise ConfigError(f"unknown distillation method '{method}' (choose from {', '.join(METHODS)})")
    params.dataset(dataset)
    setting = params.distill.setting(dataset, budget)
    layout = Layout(params.work_dir)
    device = resolve_device(params.device)
    generator = seed_everything(params.seed)

    syn, rows = build_learnable_set(params, dataset, budget, method, setting, generator)
    syn = syn.to(device)
    student = build_student(params, syn.texts.shape[1], setting.temperature, device)
    from lors.experts import list_experts

    expert_dir = layout.experts(dataset, params.model.image_encoder, params.text_encoder.name)
    expert_paths = list_experts(expert_dir)
    experts = ExpertPool(expert_paths, setting.max_start_epoch + setting.expert_epochs,
                         (student.image_layout.numel, student.text_layout.numel), device)

    meta = {"dataset": dataset, "budget": budget, "method": method, "n_pairs": len(syn),
            "image_encoder": params.model.image_encoder, "text_encoder": params.text_encoder.name,
            "image_size": int(syn.images.shape[-1]), "protocol": params.protocol, "seed": params.seed,
            "setting": setting.model_dump(), "init_rows": None if rows is None else rows.tolist()}
    fingerprint = sha256_json({**meta, "model": params.model.model_dump(), "text": params.text_encoder.model_dump(),
                               "experts": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in expert_paths]})
    store = CheckpointStore(layout.checkpoints(dataset, f"distill/{method}-{budget}"), fingerprint)
    if eval_hook is None:
        def eval_hook(synset, iteration):  # noqa: ARG001 - the default hook evaluates on this dataset
            from lors.evaluate import evaluate_synset

            return evaluate_synset(params, synset, dataset)

    label = f"{dataset}/{method}-{budget}"
    distiller = Distiller(method, student, syn, experts, setting, params.protocol, generator)
    with stage_run(params, "distill", label, {"dataset": dataset, "method": method, "budget": budget}) as tracker:
        tracker.log_params({"n_pairs": len(syn), **setting.model_dump()})
        loop = distill_loop(distiller, iterations=setting.iterations, protocol=params.protocol, store=store,
                            checkpoint_every=params.distill.checkpoint_every, eval_every=setting.eval_every,
                            eval_hook=eval_hook, synset_meta=meta, tracker=tracker, label=label)
        out = layout.synset(dataset, budget, method)
        updates = len(loop.history)
        synset = syn.to_synset({**meta, "iterations": updates})
        synset.save(out / SYNSET_FILENAME)
        _write_loss_csv(out / "loss.csv", loop.history)
        if loop.evaluations:
            write_json(out / "evaluations.json", loop.evaluations)
        final = loop.history[-1]["matching_loss"] if loop.history else float("nan")
        write_json(out / "metrics.json", {"matching_loss": final, "iterations": updates,
                                          "seconds_per_iteration": None if math.isnan(loop.seconds_per_iteration)
                                          else loop.seconds_per_iteration})
        tracker.log_artifact(out / "loss.csv")
        _log_artifacts(params, dataset, tracker, synset)
    store.clear()
    log.info("%s: %d updates, final matching loss %.4f -> %s", label, updates, final, out)
    return out
