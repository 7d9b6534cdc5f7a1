"""LoRS: TESLA-style matching that also learns the pairs' similarity matrix
S~ = diag(w) + (alpha / r) L R^T (method.md 3.3-3.5; LoRS:distill_tesla_lors.py)."""

from __future__ import annotations

from functools import partial
from typing import Literal

from pydantic import Field

from lors.distill.engine import run_trajectory_method
from lors.distill.registry import DistillMethod, MethodContext, MethodResult, register
from lors.distill.tesla_vl import TeslaSettings, tesla_match
from lors.similarity import build_similarity


class LorsSettings(TeslaSettings):
    lr_sim: float = 10.0  # lr of the similarity parameters
    rank: int = Field(10, ge=1)  # r of the low-rank part
    alpha: float = 1.0  # LoRA-style scale of L R^T
    similarity: Literal["lowrank", "full"] = "lowrank"


def n_pairs(budget: int, protocol: str) -> int:
    """Under `reference` LoRS stores budget-1 pairs, charging S~ one pair of storage (method.md 8.5)."""
    return budget - 1 if protocol == "reference" else budget


def run_lors(ctx: MethodContext) -> MethodResult:
    s = ctx.settings
    return run_trajectory_method(ctx, n_pairs(ctx.budget, ctx.params.protocol),
                                 lambda n: build_similarity(s.similarity, n, s.rank, s.alpha),
                                 partial(tesla_match, s), lr_sim=s.lr_sim)


LORS = register(DistillMethod("lors", LorsSettings, run_lors))
