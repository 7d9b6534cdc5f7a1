"""dvc.yaml tells the truth: every stage depends on the code its command can import, and on exactly
the params its outputs depend on.

The import closure is computed from the code (imports anywhere in a module, lazy ones included,
transitively, `__init__` files of every package on the way), starting from the stage's CLI command;
pure logging/CLI plumbing (tracking, errors, the CLI module) is exempt. So the test follows the code as
it moves: a new import that dvc.yaml misses fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lors", "baselines")
PLUMBING = {"lors/tracking.py", "lors/errors.py", "lors/cli.py"}


def _module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rsplit(".", 1)[0]
    else:
        package = package.removesuffix(".__init__")
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return {n for n in names if n.split(".")[0] in PACKAGES}


def import_closure(start: set[str]) -> set[str]:
    """Repository-relative files of every project module reachable from `start` (module names)."""
    seen: set[Path] = set()
    todo = list(start)
    while todo:
        name = todo.pop()
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a.b.c runs a/__init__, a/b/__init__
        path = _module_file(name)
        if path is None or path in seen:
            continue
        seen.add(path)
        todo += sorted(_imports(path))
    return {str(p.relative_to(ROOT)) for p in seen}


def command_imports() -> dict[str, set[str]]:
    """`lors-bench` subcommand -> the project modules its function imports, plus those the `_stage`
    wrapper around every command imports (lors.runtime: denormals flushed, which reaches every float)."""
    def imported(node: ast.AST) -> set[str]:
        return {n for sub in ast.walk(node) if isinstance(sub, ast.ImportFrom)
                for n in [sub.module] if n and n.split(".")[0] in PACKAGES}

    body = [n for n in ast.parse((ROOT / "lors" / "cli.py").read_text()).body if isinstance(n, ast.FunctionDef)]
    wrapper = imported(next(n for n in body if n.name == "_stage"))
    commands = {}
    for node in body:
        for decorator in node.decorator_list:
            if isinstance(decorator, ast.Call) and getattr(decorator.func, "attr", "") == "command":
                name = decorator.args[0].value if decorator.args else node.name.replace("_", "-")
                commands[name] = imported(node) | wrapper
    return commands


def _computes_nothing(path: str) -> bool:
    """Docstrings, imports and `__all__` only (a re-exporting `__init__`): no output depends on it."""
    body = ast.parse((ROOT / path).read_text()).body
    return all(isinstance(n, (ast.Import, ast.ImportFrom)) or (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))
               or (isinstance(n, ast.Assign) and [getattr(t, "id", "") for t in n.targets] == ["__all__"])
               for n in body)


def stage_needs(command: str) -> set[str]:
    return {f for f in import_closure(command_imports()[command]) - PLUMBING if not _computes_nothing(f)}


def _stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _code_deps(stage: dict) -> list[str]:
    body = stage.get("do", stage)
    return [d for d in body.get("deps", []) if "${" not in d]


@pytest.mark.parametrize("name", sorted(_stages()))
def test_every_stage_depends_on_the_code_it_imports(name):
    stage = _stages()[name]
    body = stage.get("do", stage)
    command = body["cmd"].split()[1]
    deps = [Path(d) for d in _code_deps(stage)]
    missing = sorted(f for f in stage_needs(command) if not any(Path(f) == d or d in Path(f).parents for d in deps))
    assert not missing, f"dvc.yaml stage {name} misses code deps: {missing}"


def test_the_closure_follows_lazy_imports(tmp_path):
    """A lazy import inside a function body counts (the distill stage imports the method modules lazily)."""
    needs = stage_needs("distill")
    assert {"lors/distill/lors.py", "lors/distill/mtt_vl.py", "lors/distill/tesla_vl.py"} <= needs
    assert "lors/data/augment.py" in needs and "lors/experts.py" in needs
    assert not any(f.startswith("lors/report") for f in needs)


@pytest.mark.parametrize("name", sorted(_stages()))
def test_no_stage_depends_on_code_it_does_not_import(name):
    """The other half of exactness: a code dep nothing imports would rerun the stage for nothing."""
    stage = _stages()[name]
    body = stage.get("do", stage)
    needs = stage_needs(body["cmd"].split()[1])
    extra = [d for d in _code_deps(stage) if (d.startswith(("lors", "baselines")))
             and not any(Path(f) == Path(d) or Path(d) in Path(f).parents for f in needs)]
    assert not extra, f"dvc.yaml stage {name} depends on code it never imports: {extra}"
