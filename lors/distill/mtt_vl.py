"""MTT-VL (VL-Distill, Wu et al.): full back-propagation through the unrolled student, no similarity
learning (method.md 3.7). Its published numbers come from VL-Distill's own evaluation (4.2), which the
profiles select under `protocol: reference` with `evaluate.methods.mtt_vl: {protocol: vl_distill,
epochs: 50, batch_size: 64}`.

Defaults are VL-Distill's README command (`--syn_steps 8 --expert_epochs 1 --max_start_epoch 2
--lr_img 1000 --lr_txt 1000 --lr_lr 1e-2 --num_queries 100`, Iteration 50,000), not LoRS's rows.
"""

from __future__ import annotations

from functools import partial

import torch
from pydantic import Field

from lors.distill.engine import Match, TrajectorySettings, run_trajectory_method
from lors.distill.mtt import mtt_iteration, mtt_temperature, random_subsets
from lors.distill.registry import DistillMethod, MethodContext, MethodResult, register
from lors.distill.synthetic import LearnableSet
from lors.models import FunctionalDualEncoder
from lors.similarity import IdentitySimilarity


class MttSettings(TrajectorySettings):
    iterations: int = Field(50_000, ge=0)
    mini_batch: int | None = Field(None, ge=1)  # pairs per unrolled step, a fresh subset each; None = all


def mtt_match(s: MttSettings, protocol: str, student: FunctionalDualEncoder, syn: LearnableSet,
              generator: torch.Generator) -> Match:
    """A segment -> gradients of `syn` by the full unroll on a fresh random subset per step."""
    temperature = mtt_temperature(s.temperature, protocol)
    device = syn.images.device

    def match(segment):
        subsets = random_subsets(len(syn), s.mini_batch, s.syn_steps, generator)
        return mtt_iteration(student, syn, segment, [i.to(device) for i in subsets], temperature=temperature)

    return match


def run_mtt_vl(ctx: MethodContext) -> MethodResult:
    return run_trajectory_method(ctx, ctx.budget, IdentitySimilarity,
                                 partial(mtt_match, ctx.settings, ctx.params.protocol))


MTT_VL = register(DistillMethod("mtt_vl", MttSettings, run_mtt_vl))
