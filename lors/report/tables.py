"""The paper's tables from the long results table: main results, reproduction check, cross-architecture."""

from __future__ import annotations

import math

from lors.config import Params
from lors.report.collect import METRICS, WHOLE, source_arch
from lors.report.render import Cell, Table

METRIC_NAMES = {"ir1": "IR@1", "ir5": "IR@5", "ir10": "IR@10", "tr1": "TR@1", "tr5": "TR@5", "tr10": "TR@10",
                "r_mean": "Mean"}
METHOD_NAMES = {"random": "Random", "herding": "Herding", "kcenter": "K-Center", "forgetting": "Forgetting",
                "vas": "VAS", "clip_score": "CLIP-Score", "mtt_vl": "MTT-VL", "tesla_vl": "TESLA-VL",
                "lors": "LoRS", "edge": "EDGE", WHOLE: "Whole dataset"}


def method_name(method: str, pair_scorer: str = "") -> str:
    """The table name; coresets scored by the expert stand-in for CLIP say so."""
    name = METHOD_NAMES.get(method, method)
    return f"{name} (expert cosine)" if pair_scorer == "expert_cosine" else name


EVAL_PROTOCOLS = {"lors": "LoRS", "vl_distill": "VL-Distill", "whole": "expert-recipe"}


def evaluated_with(rows, empty: str = "no evaluations yet") -> str:
    """Which evaluation protocol (and epoch) produced which rows, e.g. 'evaluated with the LoRS protocol
    (best epoch); MTT-VL with the VL-Distill protocol (last epoch)'; `empty` when there are none."""
    if not len(rows):
        return empty
    groups: dict[tuple[str, str], list[str]] = {}
    for r in rows.drop_duplicates(["method", "eval_protocol", "selection"]).itertuples():
        groups.setdefault((r.eval_protocol, r.selection), []).append(method_name(r.method))
    majority = max(groups, key=lambda g: len(groups[g]))
    parts = [f"evaluated with the {EVAL_PROTOCOLS.get(majority[0], majority[0])} protocol ({majority[1]} epoch)"]
    parts += [f"{', '.join(methods)} with the {EVAL_PROTOCOLS.get(p, p)} protocol ({s} epoch)"
              for (p, s), methods in groups.items() if (p, s) != majority]
    return "; ".join(parts)


def provenance(params: Params, rows, empty: str = "no evaluations yet") -> str:
    return (f"protocol {params.protocol}, profile {params.profile}, seed {params.seed}; {evaluated_with(rows, empty)}; "
            f"mean ± std over {params.evaluate.num_eval} networks")


def _value(mean: float, std: float) -> str:
    return f"{mean:.1f} ± {std:.1f}"


def results_table(results, params: Params, dataset: str) -> Table:
    """Rows: coresets, then distillation methods, then the whole-dataset bound; columns: budget x metrics.
    The best mean of each column among coresets and distillation is bold."""
    arch = source_arch(params)
    rows = results[(results["dataset"] == dataset) & (results["arch"] == arch)]
    cells = {(r.method, r.budget, r.metric): (r.mean, r.std) for r in rows.itertuples()}
    scorers = {r.method: r.pair_scorer for r in rows.itertuples()}
    budgets = sorted({b for m, b, _ in cells if m != WHOLE})
    whole = {metric: v for (m, _, metric), v in cells.items() if m == WHOLE}
    blocks = [[m for m in params.grid.select_methods if any(k[0] == m for k in cells)],
              [m for m in params.grid.distill_methods if any(k[0] == m for k in cells)]]
    best = {}
    for budget in budgets:
        for metric in METRICS:
            means = [cells[(m, budget, metric)][0] for block in blocks for m in block if (m, budget, metric) in cells]
            best[(budget, metric)] = max(means) if means else None
    sections = []
    for block in blocks:
        section = []
        for method in block:
            row = [Cell(method_name(method, scorers.get(method, "")))]
            for budget in budgets:
                for metric in METRICS:
                    value = cells.get((method, budget, metric))
                    row.append(Cell(_value(*value), bold=value[0] == best[(budget, metric)]) if value else Cell("–"))
            section.append(row)
        if section:
            sections.append(section)
    if whole:
        sections.append([[Cell(method_name(WHOLE))] + [Cell(_value(*whole[m])) for _ in budgets for m in METRICS]])
    columns = ["Method"] + [METRIC_NAMES[m] for _ in budgets for m in METRICS]
    caption = (f"Retrieval on {dataset} (test split) with {arch}, by number of image-text pairs; "
               f"{provenance(params, rows)}.")
    return Table(caption=caption, label=f"tab:{dataset}", columns=columns, sections=sections,
                 groups=[(f"{b} pairs", len(METRICS)) for b in budgets])


PRINTED_ZERO = 0.05  # tables print one decimal: a smaller |Δ| shows as ±0.0


def reproduction_frame(results, reference, sigma: float, arch: str):
    """Reproduced vs reference (published or expected) per (dataset, budget, method, metric):
    Δ = reproduced − reference, flagged when |Δ| > sigma·σ with σ the reference std where given, else the
    reproduced std, and |Δ| would not print as ±0.0 (a std of 0, e.g. a seed-for-seed rerun, must not
    flag float noise). `source` and `file` say where each reference number comes from."""
    ours = results[results["arch"] == arch][["dataset", "budget", "method", "metric", "mean", "std", "selection",
                                             "eval_protocol"]]
    merged = ours.merge(reference[["dataset", "budget", "method", "metric", "value", "std", "source", "file"]],
                        on=["dataset", "budget", "method", "metric"], suffixes=("", "_reference"))
    merged = merged.rename(columns={"mean": "reproduced", "std": "reproduced_std", "value": "reference"})
    merged["delta"] = merged["reproduced"] - merged["reference"]
    merged["sigma_used"] = merged["std_reference"].where(merged["std_reference"].notna(), merged["reproduced_std"])
    merged["flagged"] = (merged["delta"].abs() > sigma * merged["sigma_used"]) & (merged["delta"].abs() >= PRINTED_ZERO)
    return merged.reset_index(drop=True)


def reproduction_table(frame, params: Params, dataset: str) -> Table:
    """One row per compared cell; the caption names every file and source the reference numbers come from."""
    order = {m: i for i, m in enumerate([*params.grid.select_methods, *params.grid.distill_methods])}
    rows = frame[frame["dataset"] == dataset].copy()
    rows["method_order"] = rows["method"].map(lambda m: order.get(m, len(order)))
    rows["metric_order"] = rows["metric"].map(METRICS.index)
    rows = rows.sort_values(["method_order", "budget", "metric_order"])
    body = []
    for r in rows.itertuples():
        reference = f"{r.reference:.1f}" + ("" if math.isnan(r.std_reference) else f" ± {r.std_reference:.1f}")
        body.append([Cell(method_name(r.method)), Cell(str(r.budget)), Cell(METRIC_NAMES[r.metric]),
                     Cell(_value(r.reproduced, r.reproduced_std)), Cell(reference), Cell(f"{r.delta:+.1f}".replace("-", "−")),
                     Cell(f"outside {params.report.sigma:g}σ" if r.flagged else "", bold=bool(r.flagged))])
    origins = "; ".join(f"{source} ({file})" for file, source in dict.fromkeys(zip(rows["file"], rows["source"])))
    compared = (f"reproduced vs reference numbers: {origins}" if origins else
                f"no reference numbers for its grid in report.published ({params.report.published}) or "
                f"report.expected ({params.report.expected})")
    caption = (f"Reproduction check on {dataset}, {compared}. Δ = reproduced − reference, flagged "
               f"when |Δ| > {params.report.sigma:g}σ (reference std where given, else reproduced); "
               f"{provenance(params, rows, empty='no cell to compare')}.")
    return Table(caption=caption, label=f"tab:{dataset}-reproduction",
                 columns=["Method", "Pairs", "Metric", "Reproduced", "Reference", "Δ", "Flag"],
                 sections=[body] if body else [])


def cross_arch_table(results, params: Params, dataset: str) -> Table:
    """Mean of the six recalls per (method, pairs) row, one column per evaluation architecture."""
    source = source_arch(params)
    archs = [source, *[a for a in params.grid.archs if a != source]]
    rows = results[(results["dataset"] == dataset) & (results["metric"] == "r_mean")
                   & results["method"].isin(params.grid.cross_methods)]
    cells = {(r.method, r.budget, r.arch): (r.mean, r.std) for r in rows.itertuples()}
    body = []
    for method in params.grid.cross_methods:
        for budget in sorted({b for m, b, _ in cells if m == method}):
            body.append([Cell(f"{method_name(method)} {budget}")]
                        + [Cell(_value(*cells[(method, budget, a)])) if (method, budget, a) in cells else Cell("–")
                           for a in archs])
    caption = (f"Cross-architecture retrieval on {dataset} (mean of IR@1/5/10 and TR@1/5/10): sets distilled "
               f"with {source} (first column), evaluated with other image+text encoders; "
               f"{provenance(params, rows)}.")
    return Table(caption=caption, label=f"tab:{dataset}-cross", columns=["Method, pairs", *archs],
                 sections=[body] if body else [])
