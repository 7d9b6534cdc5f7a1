"""`lors-bench report`: paper-style tables (LaTeX + Markdown), a reproduction check and figures.

Per dataset of the grid it writes, under the output folder:
`tables/<ds>.tex` (main results), `tables/<ds>-reproduction.tex`, `tables/<ds>-cross.tex`,
`tables/<ds>.md` (all three), `figures/<ds>/*.png` and `metrics/<ds>.json` (compact, for DVC).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from lors.config import Params
from lors.io import atomic_path, write_json
from lors.report.collect import collect_results, load_published, source_arch
from lors.report.figures import retrieval_vs_budget, synset_figures
from lors.report.render import to_latex, to_markdown
from lors.report.tables import cross_arch_table, reproduction_frame, reproduction_table, results_table
from lors.tracking import flush_pending_or_warn

log = logging.getLogger(__name__)


def build_reports(params: Params, out_dir: str | Path = "reports", datasets: Sequence[str] | None = None) -> Path:
    """Write tables, figures and compact metrics for `datasets` (default: every dataset of the grid).

    First writes the stage runs recorded so far to MLflow, so a repro ends with every run there.
    """
    flush_pending_or_warn(params)
    out_dir = Path(out_dir)
    published = load_published(params.report.published)
    for dataset in datasets or params.grid.datasets:
        params.dataset(dataset)  # unknown name -> one-line ConfigError
        results = collect_results(params, dataset)
        if results.empty:
            log.warning("%s: no evaluation results under %s yet", dataset, params.work_dir)
        main = results_table(results, params, dataset)
        check = reproduction_table(reproduction_frame(results, published, params.report.sigma, source_arch(params)),
                                   params, dataset)
        cross = cross_arch_table(results, params, dataset)
        tables = out_dir / "tables"
        for suffix, table in (("", main), ("-reproduction", check), ("-cross", cross)):
            _write_text(tables / f"{dataset}{suffix}.tex", to_latex(table))
        _write_text(tables / f"{dataset}.md", "\n".join(to_markdown(t) for t in (main, check, cross)))
        figures = out_dir / "figures" / dataset
        retrieval_vs_budget(results, params, dataset, figures / "retrieval-vs-budget.png")
        synset_figures(params, dataset, figures)
        write_json(out_dir / "metrics" / f"{dataset}.json", compact_metrics(results))
        log.info("%s: tables in %s, figures in %s", dataset, tables, figures)
    return out_dir


def compact_metrics(results) -> dict:
    """{"<method>-<budget>": {"<arch>": {metric: mean}}}: what `dvc metrics show` and `dvc exp show` list."""
    metrics: dict = {}
    for r in results.itertuples():
        metrics.setdefault(f"{r.method}-{r.budget}", {}).setdefault(r.arch, {})[r.metric] = round(r.mean, 4)
    return metrics


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
