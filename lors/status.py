"""`lors-bench status`: the grid's cells on one screen, from DVC's own view of the pipeline.

A cell is (dataset, budget, method, arch); its state comes from the stages that make and score it:
done, stale (with the first changed dep, param or upstream stage that makes it so), running or
killed mid-run (a checkpoint exists under work/checkpoints), and whether its MLflow runs are still
pending (recorded but not yet written by `report` or `lors-bench track`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lors.config import Params
from lors.io import slug
from lors.paths import Layout
from lors.tracking import tracking_dir


@dataclass
class StageState:
    name: str  # DVC stage address, e.g. distill@embedded-20-lors
    state: str  # done | stale | never run
    why: str = ""
    checkpoint: bool = False


def _why(changes: list[Any]) -> str:
    """The first reason DVC gives, as 'param distill.lors.default' or 'dep lors/distill/engine.py'."""
    for change in changes:
        if isinstance(change, str):
            return change
        for kind, entries in change.items():
            for path, what in entries.items():
                if isinstance(what, dict):  # params: {file: {key: status}}
                    key, status = next(iter(what.items()))
                    return f"param {key} {status}"
                return f"{kind.removeprefix('changed ')} {path} {what}"
    return "changed"


def stage_states(params: Params, root: str | Path = ".") -> dict[str, StageState]:
    """Every stage of dvc.yaml with its state; staleness propagates to everything downstream."""
    import networkx as nx
    from dvc.repo import Repo

    import yaml

    lock = Path(root, "dvc.lock")
    locked = set((yaml.safe_load(lock.read_text()) or {}).get("stages", {})) if lock.is_file() else set()
    with Repo(str(root)) as repo:
        status = repo.status()
        graph = repo.index.graph
        states = {}
        for stage in graph.nodes:
            changes = status.get(stage.addressing, [])
            if stage.addressing not in locked:
                states[stage.addressing] = StageState(stage.addressing, "never run")
            else:
                states[stage.addressing] = StageState(stage.addressing, "stale" if changes else "done",
                                                      _why(changes) if changes else "")
        for stage in nx.topological_sort(graph.reverse(copy=False)):  # upstream first
            if states[stage.addressing].state == "done":
                upstream = [s for s in nx.descendants(graph, stage) if states[s.addressing].state != "done"]
                if upstream:
                    states[stage.addressing] = StageState(stage.addressing, "stale",
                                                          f"upstream {sorted(s.addressing for s in upstream)[0]}")
    checkpoints = Layout(params.work_dir).work / "checkpoints"
    for state in states.values():
        state.checkpoint = _checkpoint_dir(params, state.name, checkpoints) is not None
    return states


def _checkpoint_dir(params: Params, stage: str, checkpoints: Path) -> Path | None:
    kind, _, item = stage.partition("@")
    parts = item.split("-")
    encoders = f"{slug(params.model.image_encoder)}+{slug(params.text_encoder.name)}"
    candidates = {
        "experts": lambda: checkpoints / parts[0] / "experts" / encoders / f"{int(parts[-1]):03d}",
        "distill": lambda: checkpoints / parts[0] / "distill" / f"{parts[2]}-{parts[1]}",
    }
    if kind.startswith("evaluate") and len(parts) >= 3:
        arch = "-".join(parts[3:]) or encoders
        candidates[kind] = lambda: checkpoints / parts[0] / "evaluate" / f"{parts[2]}-{parts[1]}" / slug(arch)
    if kind not in candidates or not parts[0]:
        return None
    try:
        path = candidates[kind]()
    except (IndexError, ValueError):
        return None
    return path if path.is_dir() and any(path.iterdir()) else None


def pending_runs(params: Params) -> set[str]:
    """DVC stage names whose MLflow run records are still pending."""
    pending = set()
    for record in (tracking_dir(params) / "pending").glob("*/record.json"):
        try:
            pending.add(json.loads(record.read_text())["tags"].get("dvc_stage", ""))
        except (OSError, ValueError, KeyError):
            continue
    return pending


def grid_status(params: Params, root: str | Path = ".") -> list[dict[str, str]]:
    """One row per stage of the grid: stage, state (+ checkpointed / tracking pending), why."""
    states = stage_states(params, root)
    pending = pending_runs(params)
    rows = []
    for name in sorted(states, key=lambda n: (_ORDER.get(n.split("@")[0], 9), n)):
        state = states[name]
        flags = [f for f, on in (("checkpointed", state.checkpoint), ("tracking pending", name in pending)) if on]
        rows.append({"stage": name, "state": state.state + (f" ({', '.join(flags)})" if flags else ""),
                     "why": state.why})
    return rows


_ORDER = {"prepare": 0, "embed_text": 1, "experts": 2, "distill": 3, "select": 4, "evaluate": 5,
          "evaluate_coreset": 6, "evaluate_cross": 7, "evaluate_whole": 8, "report": 9}


def render_status(rows: list[dict[str, str]]) -> str:
    """A fixed-width table, then a one-line count per state."""
    if not rows:
        return "no stages in dvc.yaml"
    width = max(len(r["stage"]) for r in rows)
    state_width = max(len(r["state"]) for r in rows)
    lines = [f"{'stage':<{width}}  {'state':<{state_width}}  why", "-" * (width + state_width + 8)]
    lines += [f"{r['stage']:<{width}}  {r['state']:<{state_width}}  {r['why']}".rstrip() for r in rows]
    counts: dict[str, int] = {}
    for r in rows:
        key = r["state"].split(" (")[0]
        counts[key] = counts.get(key, 0) + 1
    lines.append(", ".join(f"{n} {state}" for state, n in counts.items()))
    return "\n".join(lines)
