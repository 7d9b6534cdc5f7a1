"""Report generation from a fixture of evaluation files with known published numbers."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from lors.config import Params
from lors.errors import DataError
from lors.paths import Layout
from lors.report import build_reports
from lors.report.collect import collect_results, load_published
from lors.report.tables import reproduction_frame
from lors.synset import FILENAME, SyntheticSet

SOURCE = "nfnet_l0+bert-base-uncased"
CROSS = "nf_resnet50+bert-base-uncased"
PUBLISHED = """dataset,budget,method,metric,value,std,source
flickr30k,100,lors,ir1,8.3,0.2,paper
flickr30k,100,lors,tr1,11.8,0.2,paper
flickr30k,100,random,ir1,1.0,,paper
flickr30k,100,random,tr1,1.3,,paper
coco,100,lors,ir1,1.8,0.1,paper
"""


def _params(tmp_path: Path) -> Params:
    (tmp_path / "published.csv").write_text(PUBLISHED)
    return Params.model_validate({
        "profile": "fixture", "protocol": "reference", "work_dir": str(tmp_path / "work"),
        "grid": {"datasets": ["flickr30k"], "distill_methods": ["mtt_vl", "lors"], "distill_budgets": [100, 200],
                 "select_methods": ["random"], "select_budgets": [100], "archs": [CROSS], "cross_methods": ["lors"]},
        "datasets": {"flickr30k": {"kind": "flickr30k"}},
        "model": {"image_encoder": "nfnet_l0"}, "text_encoder": {"name": "bert-base-uncased"},
        "evaluate": {"num_eval": 5}, "tracking": {"enabled": False},
        "report": {"published": str(tmp_path / "published.csv"), "sigma": 2.0},
    })


def _summary(base: float, std: float, overrides: dict | None = None) -> dict:
    values = {m: base + i for i, m in enumerate(("ir1", "ir5", "ir10", "tr1", "tr5", "tr10"))}
    values.update(overrides or {})
    metrics = {m: {"mean": v, "std": std} for m, v in values.items()}
    metrics["r_mean"] = {"mean": sum(values.values()) / 6, "std": std}
    return metrics


def _write_eval(params: Params, method: str, budget: int, arch: str, best: dict, last: dict | None = None) -> None:
    path = Layout(params.work_dir).evaluation("flickr30k", budget, method, arch)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"dataset": "flickr30k", "budget": budget, "method": method, "arch": arch,
                                "protocol": "reference", "summary": {"best": best, "last": last or best}}))


@pytest.fixture
def fixture_params(tmp_path):
    params = _params(tmp_path)
    _write_eval(params, "lors", 100, SOURCE, _summary(8.0, 0.5, {"ir1": 8.6, "tr1": 11.0}), last=_summary(1.0, 0.1))
    _write_eval(params, "mtt_vl", 100, SOURCE, _summary(4.0, 0.3))
    _write_eval(params, "lors", 200, SOURCE, _summary(9.0, 0.4))
    _write_eval(params, "random", 100, SOURCE, _summary(1.5, 0.2, {"ir1": 1.5, "tr1": 1.5}))
    _write_eval(params, "lors", 100, CROSS, _summary(3.0, 0.6))
    _write_eval(params, "lors", 300, SOURCE, _summary(99.0, 0.1))  # stale: budget not in the grid
    _write_eval(params, "whole", 0, SOURCE, _summary(30.0, 1.0))
    synset_dir = Layout(params.work_dir).synset("flickr30k", 100, "lors")
    similarity = torch.eye(4) + 0.1 * torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    SyntheticSet(torch.randn(4, 3, 8, 8), torch.randn(4, 6), similarity, 0.1, 0.1,
                 meta={"dataset": "flickr30k", "method": "lors", "budget": 100}).save(synset_dir / FILENAME)
    return params


def test_delta_and_two_sigma_flags(fixture_params):
    results = collect_results(fixture_params, "flickr30k")
    frame = reproduction_frame(results, load_published(fixture_params.report.published), 2.0, SOURCE)
    got = {(r.method, r.metric): (round(r.delta, 6), r.sigma_used, bool(r.flagged)) for r in frame.itertuples()}
    assert got == {
        ("lors", "ir1"): (0.3, 0.2, False),     # |0.3| <= 2 * published 0.2
        ("lors", "tr1"): (-0.8, 0.2, True),     # |-0.8| > 0.4 although the reproduced std (0.5) would pass it
        ("random", "ir1"): (0.5, 0.2, True),    # no published std: reproduced 0.2 -> 0.5 > 0.4
        ("random", "tr1"): (0.2, 0.2, False),
    }


def test_results_follow_the_grid_and_the_protocol_selection(fixture_params):
    results = collect_results(fixture_params, "flickr30k")
    assert 300 not in set(results["budget"])
    assert set(results["selection"]) == {"best"}
    clean = fixture_params.model_copy(update={"protocol": "clean"})
    lors = collect_results(clean, "flickr30k").query("method == 'lors' and budget == 100 and arch == @SOURCE")
    assert set(lors["selection"]) == {"last"} and lors.query("metric == 'ir1'")["mean"].item() == 1.0


def test_build_reports_writes_tables_figures_and_metrics(fixture_params, tmp_path):
    out = build_reports(fixture_params, tmp_path / "reports")
    tables = out / "tables"
    main = (tables / "flickr30k.tex").read_text()
    assert "protocol reference, profile fixture" in main
    rows = _latex_rows(main)
    header = next(r for r in rows if r[0] == "Method")
    assert len(header) == 1 + 2 * 7  # budgets 100 and 200 x IR@1/5/10, TR@1/5/10, mean
    assert all(len(r) == len(header) for r in rows if not r[0].startswith(r"\multicolumn") and r[0] != "")
    lors_row = next(r for r in rows if r[0] == "LoRS")
    assert lors_row[1] == r"\textbf{8.6 $\pm$ 0.5}"  # best IR@1 at 100 pairs
    assert rows.index(next(r for r in rows if r[0] == "Random")) < rows.index(lors_row)  # coresets first
    assert any(r[0] == "Whole dataset" for r in rows)
    check = (tables / "flickr30k-reproduction.tex").read_text()
    flagged = [r for r in _latex_rows(check) if r[-1].startswith(r"\textbf{outside")]
    assert {(r[0], r[2]) for r in flagged} == {("LoRS", "TR@1"), ("Random", "IR@1")}
    cross = _latex_rows((tables / "flickr30k-cross.tex").read_text())
    assert cross[0][1:] == [SOURCE.replace("_", r"\_"), CROSS.replace("_", r"\_")]
    markdown = (tables / "flickr30k.md").read_text()
    assert "| LoRS | **8.6 ± 0.5** |" in markdown and markdown.count("**Retrieval on flickr30k") == 1
    for path in (tables / "flickr30k.tex", tables / "flickr30k-reproduction.tex", tables / "flickr30k-cross.tex"):
        _check_latex(path)
    figures = out / "figures" / "flickr30k"
    assert {p.name for p in figures.iterdir()} == {"retrieval-vs-budget.png", "samples-lors-100.png",
                                                  "similarity-lors-100.png"}
    metrics = json.loads((out / "metrics" / "flickr30k.json").read_text())
    assert metrics["lors-100"][SOURCE]["ir1"] == 8.6 and metrics["lors-100"][CROSS]["r_mean"] == 5.5


def test_malformed_evaluation_and_missing_published_are_one_line(fixture_params, tmp_path):
    bad = Layout(fixture_params.work_dir).evaluation("flickr30k", 100, "mtt_vl", SOURCE)
    bad.write_text("{not json")
    with pytest.raises(DataError, match="unreadable evaluation file"):
        collect_results(fixture_params, "flickr30k")
    with pytest.raises(DataError, match="published-results file not found"):
        load_published(tmp_path / "nope.csv")


def _latex_rows(tex: str) -> list[list[str]]:
    body = tex[tex.index(r"\toprule"):tex.index(r"\bottomrule")]
    rows = []
    for line in body.splitlines():
        line = line.strip()
        if line.endswith(r"\\"):
            rows.append([c.strip() for c in re.split(r"(?<!\\)&", line[:-2])])
    return rows


def _check_latex(path: Path) -> None:
    """Compile with pdflatex when present; otherwise check the structure a compiler would reject."""
    tex = path.read_text()
    if shutil.which("pdflatex"):
        doc = path.with_suffix(".doc.tex")
        doc.write_text("\\documentclass{article}\\usepackage{booktabs}\\usepackage{graphicx}\\begin{document}\n"
                       f"{tex}\\end{{document}}\n")
        subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=doc.parent,
                       check=True, capture_output=True, timeout=60)
        return
    unescaped = re.sub(r"\\[{}]", "", tex)
    depth = 0
    for char in unescaped:
        depth += {"{": 1, "}": -1}.get(char, 0)
        assert depth >= 0, path
    assert depth == 0, path
    assert re.findall(r"\\begin\{(\w+)\}", tex) == list(reversed(re.findall(r"\\end\{(\w+)\}", tex)))
    spec = re.search(r"\\begin\{tabular\}\{([lc]+)\}", tex).group(1)
    for row in _latex_rows(tex):
        spans = [int(m.group(1)) for cell in row if (m := re.match(r"\\multicolumn\{(\d+)\}", cell))]
        cells = len(row) - len(spans) + sum(spans)
        assert cells == len(spec), (path, row)
    assert not re.search(r"(?<!\\)[_%#]", "".join(c for r in _latex_rows(tex) for c in r))  # escaped
