"""`lors-bench report`: write the stage runs recorded so far to MLflow, then the tables and figures.

A tracking failure is a warning (the records stay pending for `lors-bench track`); it never keeps the
tables from being written.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from lors.config import Params
from lors.report import build_reports
from lors.tracking import flush_pending

log = logging.getLogger(__name__)


def run_report(params: Params, out_dir: str | Path = "reports", datasets: Sequence[str] | None = None) -> Path:
    try:
        flush_pending(params)
    except Exception as exc:  # noqa: BLE001 - tracking never keeps the tables from being written
        log.warning("tracking: %s; the runs stay pending for `lors-bench track`", exc)
    return build_reports(params, out_dir, datasets)
