"""Evaluation results of the current grid as one long table (one row per cell of a results table).

Reads the JSON files the evaluate stage writes (`Layout.evaluation`); files left over from an older
grid (another budget, method or architecture) are ignored, so tables show exactly what params.yaml
asks for.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from lors.config import Params
from lors.errors import DataError
from lors.paths import Layout

METRICS = ("ir1", "ir5", "ir10", "tr1", "tr5", "tr10", "r_mean")
RECALLS = METRICS[:6]
WHOLE = "whole"  # the whole-dataset upper bound (evaluate --method whole)


def source_arch(params: Params) -> str:
    return f"{params.model.image_encoder}+{params.text_encoder.name}"


def selection_for(params: Params, available: set[str], eval_protocol: str = "lors") -> str:
    """Which epoch a table reports: under `reference` the paper's best-on-test, except for sets evaluated
    with VL-Distill's protocol, which reports the last epoch (method.md 4.2); else val (or last)."""
    choice = params.report.selection
    if choice == "auto":
        if params.protocol == "reference":
            choice = "last" if eval_protocol == "vl_distill" else "best"
        else:
            choice = "val" if "val" in available else "last"
    return choice


def expected_cells(params: Params, dataset: str) -> set[tuple[str, int, str]]:
    """(method, budget, arch) cells of the grid for one dataset."""
    grid, source = params.grid, source_arch(params)
    cells = {(m, b, source) for m in grid.distill_methods for b in grid.distill_budgets}
    cells |= {(m, b, source) for m in grid.select_methods for b in grid.select_budgets}
    cells |= {(m, b, a) for m in grid.cross_methods for b in grid.distill_budgets for a in grid.archs}
    return cells


def read_evaluation(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable evaluation file ({exc.__class__.__name__})") from exc
    for key in ("dataset", "budget", "method", "arch", "summary"):
        if key not in data:
            raise DataError(f"{path}: evaluation file has no '{key}' key")
    return data


def collect_results(params: Params, dataset: str):
    """Long pandas table: dataset, budget, method, arch, selection, metric, mean, std, path."""
    import pandas as pd

    cells = expected_cells(params, dataset)
    rows = []
    for path in sorted((Layout(params.work_dir).work / dataset / "eval").glob("*/*.json")):
        data = read_evaluation(path)
        method, budget, arch = str(data["method"]), int(data["budget"]), str(data["arch"])
        if (method, budget, arch) not in cells and method != WHOLE:
            continue
        eval_protocol = data.get("eval_protocol", "lors")
        selection = selection_for(params, set(data["summary"]), eval_protocol)
        if selection not in data["summary"]:
            raise DataError(f"{path}: summary has no '{selection}' selection (has {', '.join(data['summary'])})")
        summary = data["summary"][selection]
        for metric in METRICS:
            if metric not in summary:
                raise DataError(f"{path}: summary.{selection} has no '{metric}'")
            rows.append({"dataset": dataset, "budget": budget, "method": method, "arch": arch,
                         "selection": selection, "metric": metric, "mean": float(summary[metric]["mean"]),
                         "std": float(summary[metric]["std"]), "protocol": data.get("protocol", params.protocol),
                         "eval_protocol": eval_protocol, "pair_scorer": data.get("pair_scorer", ""),
                         "path": str(path)})
    return pd.DataFrame(rows, columns=["dataset", "budget", "method", "arch", "selection", "metric", "mean",
                                       "std", "protocol", "eval_protocol", "pair_scorer", "path"])


KEY = ["dataset", "budget", "method", "metric"]
NUMBER_COLUMNS = [*KEY, "value", "std", "source"]


def load_numbers(path: str | Path, setting: str):
    """A table of reference numbers (columns `NUMBER_COLUMNS`, std empty where not given) with a `file`
    column; any problem is one DataError line naming the file (and line) and `setting`, the params key."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: reference numbers not found ({setting} in params.yaml)")
    with path.open(newline="") as f:
        header, *body = list(csv.reader(f)) or [[]]
    missing = set(NUMBER_COLUMNS) - set(header)
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
    for line, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise DataError(f"{path}:{line}: {len(row)} fields for {len(header)} columns (quote text with commas)")
    table = pd.DataFrame(body, columns=header)
    for column in ("budget", "value", "std"):
        numbers = pd.to_numeric(table[column], errors="coerce")
        bad = numbers.isna() & ((table[column] != "") if column == "std" else True)
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            raise DataError(f"{path}:{row + 2}: {column} '{table[column].iloc[row]}' is not a number")
        table[column] = numbers
    table["budget"] = table["budget"].astype(int)
    table["file"] = str(path)
    return table[[*NUMBER_COLUMNS, "file"]]


def load_reference(published: str | Path, expected: str | Path):
    """The paper's numbers (report.published) and the pinned expected output of a profile
    (report.expected) as one table; a cell given in both files is an error rather than a silent choice."""
    import pandas as pd

    both = pd.concat([load_numbers(published, "report.published"), load_numbers(expected, "report.expected")],
                     ignore_index=True)
    again = both[both.duplicated(KEY)]
    if len(again):
        r = again.iloc[0]
        first = both.loc[(both[KEY] == r[KEY]).all(axis=1), "file"].iloc[0]
        raise DataError(f"{r.file}: {r.dataset} {r.method}-{r.budget} {r.metric} is given again (also in {first})")
    return both
