"""Coreset baselines: choose real train pairs (see README.md); the select stage (lors.stages.select)
writes them as a synthetic set."""

from baselines.registry import SELECTORS, Selector, get_selector

__all__ = ["SELECTORS", "Selector", "get_selector"]
