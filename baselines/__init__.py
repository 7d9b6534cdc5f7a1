"""Coreset baselines: choose real train pairs and write them as a synthetic set (see README.md)."""

from baselines.registry import SELECTORS, Selector, get_selector
from baselines.stage import run_selection

__all__ = ["SELECTORS", "Selector", "get_selector", "run_selection"]
