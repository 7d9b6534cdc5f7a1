"""Evaluation (method.md 4): train fresh networks on a set and score test retrieval. `protocol` holds the
LoRS and VL-Distill protocols and the whole-dataset bound; the other modules are their pieces
(architectures, text transfer, the per-network loop, epoch selection). The stage is lors.stages.evaluate."""

from lors.evaluation.arch import EvalArch, parse_arch
from lors.evaluation.selection import SELECTIONS, select_epochs, summarise

__all__ = ["SELECTIONS", "EvalArch", "parse_arch", "select_epochs", "summarise"]
