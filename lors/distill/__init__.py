"""Trajectory-matching distillation: LoRS, TESLA-VL and MTT-VL (method.md 3)."""

from lors.distill.run import METHODS, run_distillation

__all__ = ["METHODS", "run_distillation"]
