"""The distillation methods by name: what `lors-bench distill --method M` and `grid.distill_methods` accept.

A method is one module that defines its settings schema and its `run(ctx) -> MethodResult`, and
registers itself where it is defined (as timm registers models):

    LORS = register(DistillMethod("lors", LorsSettings, run_lors))

plus one params block, `distill.<name>`, whose `default` overrides the schema's defaults key by key and
whose `settings.<dataset>.<budget>` entries override `default` key by key (`resolve_settings`). The
`distill` stage gives `run` a `MethodContext` (inputs, seeded generator, fingerprinted checkpoints, a
metrics callback) and writes the returned set, loss history and metrics; tracking, layout and
checkpoint paths stay in the stage (lors.stages.distill).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ValidationError

from lors.checkpoints import CheckpointStore
from lors.config import Params
from lors.errors import ConfigError
from lors.synset import SyntheticSet


@dataclass
class MethodContext:
    """Everything a method's `run` may use; nothing in it touches tracking or the work layout."""

    params: Params
    method: str
    dataset: str
    budget: int
    settings: Any  # the method's resolved settings (its own schema) for (dataset, budget)
    device: torch.device
    generator: torch.Generator  # CPU generator seeded with params.seed: all sampling draws from it
    checkpoints: CheckpointStore  # fingerprinted resumable state of this cell
    checkpoint_every: int
    expert_paths: list[Path] = field(default_factory=list)  # the grid's experts of this dataset, in id order
    log_metrics: Callable[[dict[str, float], int], None] = lambda metrics, step: None  # per-iteration


@dataclass
class MethodResult:
    synset: SyntheticSet
    history: list[dict[str, float]] = field(default_factory=list)  # one row per update: iteration, loss, ...
    metrics: dict[str, Any] = field(default_factory=dict)  # -> metrics.json (DVC metrics)


@dataclass(frozen=True)
class DistillMethod:
    name: str
    settings: type[BaseModel]  # schema of `distill.<name>` entries; its field defaults are the method's
    run: Callable[[MethodContext], MethodResult]
    needs_experts: bool = True  # whether `run` reads expert trajectories (the distill stage's deps)


_METHODS: dict[str, DistillMethod] = {}


def register(method: DistillMethod) -> DistillMethod:
    """Add a method (built-in modules call this at import; outside code may too, before loading params)."""
    if method.name in _METHODS and _METHODS[method.name] is not method:
        raise ValueError(f"distillation method '{method.name}' is registered twice")
    _METHODS[method.name] = method
    return method


def methods() -> dict[str, DistillMethod]:
    """Every registered method; the built-in ones register when their modules are first imported."""
    import lors.distill.edge  # noqa: F401
    import lors.distill.lors  # noqa: F401
    import lors.distill.mtt_vl  # noqa: F401
    import lors.distill.tesla_vl  # noqa: F401

    return dict(_METHODS)


def get_method(name: str) -> DistillMethod:
    known = methods()
    if name not in known:
        raise ConfigError(f"unknown distillation method '{name}' (known: {', '.join(known)})")
    return known[name]


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on `base` key by key, nested blocks (EDGE's finetune, sampling) merged the same way."""
    merged = dict(base)
    for key, value in over.items():
        merged[key] = _deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(
            merged.get(key), dict) else value
    return merged


def _merged(params: Params, method: str, dataset: str, budget: int) -> dict[str, Any]:
    block = params.distill.block(method)
    return _deep_merge(block.default, block.settings.get(dataset, {}).get(budget, {}))


def resolve_settings(params: Params, method: str, dataset: str, budget: int) -> Any:
    """Schema defaults < distill.<method>.default < distill.<method>.settings.<dataset>.<budget>."""
    schema = get_method(method).settings
    try:
        return schema.model_validate(_merged(params, method, dataset, budget))
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(f"distill.{method} for {dataset}-{budget}: {'.'.join(map(str, err['loc']))}: "
                          f"{err['msg']}") from None


def check_params(params: Params) -> list[str]:
    """Every problem of the distillation part of params, each with its dotted key (for load_params)."""
    known = methods()
    problems = [f"grid.distill_methods: unknown method '{m}' (known: {', '.join(known)})"
                for m in params.grid.distill_methods if m not in known]
    problems += [f"grid.cross_methods: '{m}' is not in grid.distill_methods"
                 for m in params.grid.cross_methods if m not in params.grid.distill_methods]
    problems += [f"distill.{m}: no such distillation method (known: {', '.join(known)})"
                 for m in params.distill.methods() if m not in known]
    needed_epochs = 0
    for method in (m for m in params.grid.distill_methods if m in known):
        schema, block = known[method].settings, params.distill.block(method)
        for key in block.default:
            if key not in schema.model_fields:
                problems.append(f"distill.{method}.default.{key}: not a setting of {method}")
        for dataset in params.grid.datasets:
            for budget in params.grid.distill_budgets:
                where = f"distill.{method}.settings.{dataset}.{budget}"
                if budget not in block.settings.get(dataset, {}):
                    problems.append(f"{where}: missing (the grid runs this cell; write `{budget}: {{}}` to take "
                                    f"distill.{method}.default)")
                    continue
                try:
                    setting = schema.model_validate(_merged(params, method, dataset, budget))
                except ValidationError as exc:
                    problems += [f"{where}.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
                    continue
                if known[method].needs_experts:
                    needed_epochs = max(needed_epochs, setting.max_start_epoch - 1 + setting.expert_epochs)
    if needed_epochs > params.experts.epochs:
        problems.append(f"experts.epochs: {params.experts.epochs}, but distillation reads snapshots up to epoch "
                        f"{needed_epochs} (max_start_epoch - 1 + expert_epochs)")
    return problems
