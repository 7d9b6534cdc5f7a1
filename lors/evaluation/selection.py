"""Which evaluated epoch a network reports, and the mean ± std over networks (method.md 4.1, 8.1).

- "best": the epoch with the highest TEST r_mean — the reference's choice (selection on the test set).
- "last": the final evaluated epoch — VL-Distill's choice.
- "val": the epoch with the highest VAL r_mean, reported on test (`protocol: clean`).
Ties go to the earliest epoch, as the reference only replaces its best on a strictly higher r_mean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from lors.retrieval import METRICS, TIE_RULES

SELECTIONS = ("best", "last", "val")
Curve = Sequence[Mapping[str, float]]


def _argmax_first(values: Sequence[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def select_epochs(epochs: Sequence[int], test: Curve, val: Curve | None = None, key: str = "r_mean") -> dict[str, int]:
    """Chosen epoch per selection rule from per-epoch metrics (parallel to `epochs`); "val" only with `val`."""
    if not epochs or len(test) != len(epochs) or (val is not None and len(val) != len(epochs)):
        raise ValueError("select_epochs needs one test (and val) entry per evaluated epoch")
    chosen = {"best": epochs[_argmax_first([m[key] for m in test])], "last": epochs[-1]}
    if val is not None:
        chosen["val"] = epochs[_argmax_first([m[key] for m in val])]
    return chosen


def summarise(networks: Sequence[Mapping], selections: Sequence[str]) -> dict[str, dict[str, dict[str, float]]]:
    """summary[selection][metric] = {"mean", "std"} over networks of the test metrics at each chosen
    epoch; std is the population std (np.std), as the reference logs. The other tie rule's metrics
    ("<rule>_<metric>", lors.retrieval) are summarised too, at the same epochs."""
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for selection in selections:
        finals = [net["final"][selection] for net in networks]
        keys = [*METRICS, *(f"{rule}_{m}" for rule in TIE_RULES for m in METRICS if f"{rule}_{m}" in finals[0])]
        summary[selection] = {key: {"mean": float(np.mean([f[key] for f in finals])),
                                    "std": float(np.std([f[key] for f in finals]))} for key in keys}
    return summary
