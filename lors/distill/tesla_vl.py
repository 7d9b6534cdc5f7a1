"""TESLA-VL: TESLA's constant-memory trajectory matching on image-text pairs, S~ frozen at the identity
(the LoRS paper's "TESLA-VL" row; method.md 3.5 without similarity learning)."""

from __future__ import annotations

from functools import partial
from typing import Literal

from pydantic import Field

import torch

from lors.distill.engine import Match, TrajectorySettings, run_trajectory_method
from lors.distill.matching import tesla_iteration, walk_batches
from lors.distill.registry import DistillMethod, MethodContext, MethodResult, register
from lors.distill.synthetic import LearnableSet
from lors.models import FunctionalDualEncoder
from lors.similarity import IdentitySimilarity


class TeslaSettings(TrajectorySettings):
    mini_batch: int = 20  # pairs per unrolled step, walking a permutation (3.5 step 3)
    loss: Literal["wbce", "bce", "ence"] = "wbce"  # inner soft contrastive loss against S~
    merge_branches: bool = False  # COCO: one denominator for the data gradient (quirk 8.6)
    batched_steps: bool = False  # pass 2 as one vmap over the K steps (same gradient, fewer launches on a GPU)
    step_chunk: int = Field(0, ge=0)  # with batched_steps: steps per vmap, to bound memory (0: all K at once)


def tesla_match(s: TeslaSettings, student: FunctionalDualEncoder, syn: LearnableSet,
                generator: torch.Generator) -> Match:
    """A segment -> gradients of `syn` by the TESLA iteration on walked mini-batches."""
    device = syn.images.device

    def match(segment):
        batches = walk_batches(len(syn), s.mini_batch, s.syn_steps, generator)
        return tesla_iteration(student, syn, segment, [b.to(device) for b in batches], loss=s.loss,
                               temperature=s.temperature, merge_branches=s.merge_branches,
                               batched_steps=s.batched_steps, step_chunk=s.step_chunk)

    return match


def run_tesla_vl(ctx: MethodContext) -> MethodResult:
    return run_trajectory_method(ctx, ctx.budget, IdentitySimilarity, partial(tesla_match, ctx.settings))


TESLA_VL = register(DistillMethod("tesla_vl", TeslaSettings, run_tesla_vl))
