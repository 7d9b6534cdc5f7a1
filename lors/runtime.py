"""Device choice and seeding, shared by every training loop."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from lors.errors import ConfigError


def flush_denormals() -> None:
    """Flush denormal floats to zero in CPU kernels (x86 FTZ/DAZ), as GPUs do by default.

    Training drives some gradients into the denormal range (below 1.2e-38), where x86 arithmetic is
    microcoded and far slower: on a 2-core CPU a test_nfnet step on 50 embedded pairs slows from 47 ms to
    119 ms within 60 steps, and stays at 35-37 ms with this set (benchmarks/bench_denormals.py). Call it
    before the first parallel torch op: OpenMP worker threads copy the flag when they are created, so
    the CLI sets it first thing in every stage."""
    torch.set_flush_denormal(True)


def resolve_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise ConfigError(f"device: '{spec}' is not a torch device") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: '{spec}' requested but no CUDA device is available")
    return device


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU generator for explicit sampling."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


SEEDS_PER_RUN = 1000


def member_seed(seed: int, index: int) -> int:
    """Seed of the index-th independent network of a run (expert i, evaluated network k): seed*1000+i,
    so each member is reproducible alone, whatever the sharding or resumption."""
    return seed * SEEDS_PER_RUN + index


def rng_state(generator: torch.Generator, device: torch.device) -> dict[str, Any]:
    """Every random stream a training loop draws from, for checkpoints that resume bit-identically."""
    state = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator, device: torch.device) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
