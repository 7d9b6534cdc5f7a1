"""A results table as data, rendered to LaTeX (booktabs) and Markdown from the same cells."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field

# specials, and | < > which the default OT1 text font would print as an em dash and inverted marks
LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                 "|": r"\ensuremath{|}", "<": r"\ensuremath{<}", ">": r"\ensuremath{>}"}
# pdflatex reads 8-bit input: every non-ASCII character a table uses gets a command of the LaTeX kernel
LATEX_UNICODE = {"±": r"\ensuremath{\pm}", "Δ": r"\ensuremath{\Delta}", "σ": r"\ensuremath{\sigma}",
                 "−": r"\ensuremath{-}", "×": r"\ensuremath{\times}", "≤": r"\ensuremath{\leq}",
                 "≥": r"\ensuremath{\geq}", "–": "--", "—": "---", "’": "'", "‘": "`", "“": "``", "”": "''"}
# natural size, shrunk to the line only when wider (graphicx lets \resizebox's width read the box's \width)
FIT_TO_LINE = r"\resizebox{\ifdim\width>\linewidth\linewidth\else\width\fi}{!}{%"


@dataclass
class Cell:
    text: str
    bold: bool = False


@dataclass
class Table:
    """`columns` name every column (the first labels the rows); `groups` optionally spans them in a top
    header row as (label, span) pairs covering the columns after the first; `sections` are row blocks
    separated by rules."""

    caption: str
    label: str
    columns: list[str]
    sections: list[list[list[Cell]]]
    groups: list[tuple[str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.groups and sum(span for _, span in self.groups) != len(self.columns) - 1:
            raise ValueError(f"header groups span {sum(s for _, s in self.groups)} of {len(self.columns) - 1} columns")
        for row in (r for section in self.sections for r in section):
            if len(row) != len(self.columns):
                raise ValueError(f"row '{row[0].text}' has {len(row)} cells for {len(self.columns)} columns")


def escape_latex(text: str) -> str:
    """Plain text -> LaTeX that pdflatex compiles with no input encoding: specials escaped, known Unicode
    spelled as commands, accents dropped (é -> e) and anything else left as '?'."""
    return "".join(LATEX_SPECIAL.get(c) or LATEX_UNICODE.get(c) or _ascii(c) for c in text)


def _ascii(char: str) -> str:
    if char.isascii():
        return char
    base = unicodedata.normalize("NFKD", char).encode("ascii", "ignore").decode()
    return base or "?"


def to_latex(table: Table) -> str:
    n = len(table.columns)
    lines = [r"% requires \usepackage{booktabs} and \usepackage{graphicx}",
             r"\begin{table}[t]", r"\centering", rf"\caption{{{escape_latex(table.caption)}}}",
             rf"\label{{{table.label}}}", FIT_TO_LINE, rf"\begin{{tabular}}{{l{'c' * (n - 1)}}}",
             r"\toprule"]
    if table.groups:
        cells, rules, start = [""], [], 2
        for name, span in table.groups:
            cells.append(rf"\multicolumn{{{span}}}{{c}}{{{escape_latex(name)}}}")
            rules.append(rf"\cmidrule(lr){{{start}-{start + span - 1}}}")
            start += span
        lines += [" & ".join(cells) + r" \\", " ".join(rules)]
    lines.append(" & ".join(escape_latex(c) for c in table.columns) + r" \\")
    for section in table.sections:
        lines.append(r"\midrule")
        for row in section:
            lines.append(" & ".join(_latex_cell(c) for c in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def to_markdown(table: Table) -> str:
    headers = list(table.columns)
    if table.groups:
        names = [name for name, span in table.groups for _ in range(span)]
        headers = [headers[0]] + [f"{group} {col}" for group, col in zip(names, headers[1:])]
    lines = [f"**{table.caption}**", "", "| " + " | ".join(headers) + " |",
             "|" + "|".join(["---"] + [":-:"] * (len(headers) - 1)) + "|"]
    for section in table.sections:
        for row in section:
            lines.append("| " + " | ".join(f"**{c.text}**" if c.bold and c.text else c.text for c in row) + " |")
    return "\n".join(lines) + "\n"


def _latex_cell(cell: Cell) -> str:
    text = escape_latex(cell.text)
    return rf"\textbf{{{text}}}" if cell.bold and cell.text else text
