"""Report figures: retrieval vs budget per method, learned similarity (paper Figure 3), synthetic samples."""

from __future__ import annotations

from pathlib import Path

import torch

from lors.artifacts import image_grid, save_figure, save_png, similarity_figure
from lors.config import Params
from lors.paths import Layout
from lors.report.collect import WHOLE, source_arch
from lors.report.tables import method_name
from lors.synset import FILENAME, SyntheticSet


def retrieval_vs_budget(results, params: Params, dataset: str, path: str | Path) -> Path:
    """Mean of the six recalls against the number of pairs, one line per method (source architecture)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results[(results["dataset"] == dataset) & (results["arch"] == source_arch(params))
                   & (results["metric"] == "r_mean")].sort_values("budget")
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for method in [*params.grid.select_methods, *params.grid.distill_methods]:
        line = rows[rows["method"] == method]
        if len(line):
            style = "-o" if method in params.grid.distill_methods else "--s"
            ax.errorbar(line["budget"], line["mean"], yerr=line["std"], fmt=style, capsize=3, label=method_name(method))
    whole = rows[rows["method"] == WHOLE]
    if len(whole):
        ax.axhline(whole["mean"].iloc[0], color="k", linestyle=":", label=method_name(WHOLE))
    ax.set_xscale("log")
    ax.set_xlabel("image-text pairs")
    ax.set_ylabel("mean recall (IR/TR @1/5/10, %)")
    ax.set_title(f"{dataset}: retrieval vs budget ({params.protocol} protocol, {params.profile})")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return save_figure(fig, path)


def synset_figures(params: Params, dataset: str, out_dir: str | Path) -> list[Path]:
    """Sample grids of every distilled set, and the learned-similarity figure where S~ is not the identity."""
    layout, written = Layout(params.work_dir), []
    for method in params.grid.distill_methods:
        for budget in params.grid.distill_budgets:
            path = layout.synset(dataset, budget, method) / FILENAME
            if not path.is_file():
                continue
            synset = SyntheticSet.load(path)
            written.append(save_png(image_grid(synset.images), Path(out_dir) / f"samples-{method}-{budget}.png"))
            if not torch.equal(synset.similarity, torch.eye(len(synset))):
                figure = similarity_figure(synset.similarity, title=f"{dataset} {method_name(method)} {budget} pairs")
                written.append(save_figure(figure, Path(out_dir) / f"similarity-{method}-{budget}.png"))
    return written
