"""Building blocks of the evaluation stage (`lors.evaluate`): architectures, text transfer, the
per-network training loop, epoch selection and per-network resume."""

from lors.evaluation.arch import EvalArch, parse_arch
from lors.evaluation.selection import SELECTIONS, select_epochs, summarise

__all__ = ["SELECTIONS", "EvalArch", "parse_arch", "select_epochs", "summarise"]
