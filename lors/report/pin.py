"""Pin what a finished run gave as the expected numbers of its profile (the file `report.expected` names).

After a run on a reference machine, `python -m lors.report.pin --source "..."` writes every source-arch
cell of the grid (mean and std over the evaluated networks, all seven metrics) in the columns of
reports/published.csv; committing that file lets a run elsewhere see in its reproduction table whether
it lands within `report.sigma` std of it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lors.config import Params, load_params
from lors.errors import DataError, LorsError
from lors.io import atomic_path
from lors.report.collect import NUMBER_COLUMNS, collect_results, source_arch


def expected_numbers(params: Params, source: str, datasets: Sequence[str] | None = None):
    """The source-architecture results of `datasets` (default: the grid's) as reference rows (value = mean)."""
    import pandas as pd

    frames = [collect_results(params, dataset) for dataset in datasets or params.grid.datasets]
    results = pd.concat(frames, ignore_index=True)
    rows = results[results["arch"] == source_arch(params)].rename(columns={"mean": "value"})
    rows = rows.assign(value=rows["value"].round(4), std=rows["std"].round(4), source=source)
    return rows.sort_values(["dataset", "method", "budget", "metric"])[NUMBER_COLUMNS].reset_index(drop=True)


def pin_expected(params: Params, out: str | Path, source: str, datasets: Sequence[str] | None = None) -> Path:
    rows = expected_numbers(params, source, datasets)
    if rows.empty:
        raise DataError(f"{params.work_dir}: no evaluation results to pin (run the pipeline first)")
    with atomic_path(Path(out)) as tmp:
        rows.to_csv(tmp, index=False)
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", help="default: report.expected of the params")
    parser.add_argument("--dataset", action="append", help="repeatable; default: every dataset of the grid")
    parser.add_argument("--source", required=True,
                        help='e.g. "expected output of the demo profile on a 2-core CPU"')
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        print(pin_expected(params, args.out or params.report.expected, args.source, args.dataset))
    except LorsError as exc:  # the CLI's convention: one line, exit code 2
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
