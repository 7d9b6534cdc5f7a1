"""What a launch runs, read from DVC's own stage graph: every stale stage and everything downstream of it.

The graph, the stage names (`distill@embedded-20-lors`) and what is stale all come from DVC, so the
plan follows whatever dvc.yaml holds. Each planned stage waits for the planned stages it reads from;
stages that are up to date need no job and no dependency.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lors.errors import ConfigError


@dataclass(frozen=True)
class StageJob:
    """One DVC stage to run as one job, and the planned stages it must wait for."""

    name: str  # DVC's address: `prepare@embedded`, `distill@embedded-20-lors`, `report@coco`
    upstream: tuple[str, ...]

    @property
    def kind(self) -> str:
        """The dvc.yaml stage this one was generated from (the name before '@'): what picks its resources."""
        return self.name.split("@", 1)[0]


def stale_plan(root: Path, targets: Sequence[str] = ()) -> list[StageJob]:
    """The stages `dvc repro [targets]` may run, upstream first: changed stages and all downstream of them.

    A downstream stage whose inputs turn out unchanged costs one `dvc repro` that skips it. `targets`
    are stage names or glob patterns (`distill`, `distill@embedded-*`); none means the whole pipeline.
    """
    import networkx as nx
    from dvc.repo import Repo

    with contextlib.chdir(root):  # DVC names stages relative to the working directory, as the jobs see them
        repo = Repo()
        try:
            graph = repo.index.graph  # edges point from a stage to the stages it reads from
            names = {stage: stage.addressing for stage in graph.nodes}
            graph = nx.relabel_nodes(graph, names)
            frozen = {names[stage] for stage in names if stage.frozen}
            changed = set(repo.status()) & set(graph.nodes)
        finally:
            repo.close()
    stale = changed | {down for name in changed for down in nx.ancestors(graph, name)}
    if targets:
        chosen = _match(list(graph.nodes), targets)
        stale &= chosen | {up for name in chosen for up in nx.descendants(graph, name)}
    order = [name for name in nx.lexicographical_topological_sort(graph.reverse()) if name in stale - frozen]
    # every path between two planned stages runs through planned stages, so the reduction of the planned
    # subgraph keeps only the waits that are not implied by others
    waits = nx.transitive_reduction(graph.subgraph(order))
    return [StageJob(name, tuple(sorted(waits.successors(name)))) for name in order]


def _match(names: list[str], targets: Sequence[str]) -> set[str]:
    chosen: set[str] = set()
    for target in targets:
        hits = {n for n in names if fnmatch.fnmatchcase(n, target) or fnmatch.fnmatchcase(n.split("@", 1)[0], target)}
        if not hits:
            raise ConfigError(f"launch target '{target}' matches no stage of dvc.yaml")
        chosen |= hits
    return chosen


def job_groups(plan: Sequence[StageJob]) -> list[list[StageJob]]:
    """Stages of one kind that wait for the same stages: one SLURM job array each, in submission order.

    Ordered by each group's first stage, which keeps every group after the groups it waits for.
    """
    groups: dict[tuple[str, tuple[str, ...]], list[StageJob]] = {}
    for job in plan:
        groups.setdefault((job.kind, job.upstream), []).append(job)
    return list(groups.values())
