"""`lors-bench report`: write the stage runs recorded so far to MLflow, then the tables and figures.
A tracking failure is a warning (the records stay pending for `lors-bench track`); it never keeps the
tables from being written."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lors.config import Params
from lors.report import build_reports
from lors.tracking import flush_pending_or_warn


def run_report(params: Params, out_dir: str | Path = "reports", datasets: Sequence[str] | None = None) -> Path:
    flush_pending_or_warn(params)
    return build_reports(params, out_dir, datasets)
