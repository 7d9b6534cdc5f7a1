"""Named parameter profiles (profiles/<name>.yaml) and switching params.yaml between them.

DVC cannot choose a params file from a parameter (templating is off inside `vars`), so a profile is
a complete params file and switching copies it over params.yaml after validating it; `dvc repro`
then reruns exactly the stages whose parameters differ.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from lors.config import Check, load_params
from lors.errors import ConfigError
from lors.io import atomic_path

PROFILE_DIR = Path("profiles")


def list_profiles(profile_dir: str | Path = PROFILE_DIR) -> list[str]:
    return sorted(p.stem for p in Path(profile_dir).glob("*.yaml"))


def profile_path(name: str, profile_dir: str | Path = PROFILE_DIR) -> Path:
    path = Path(profile_dir) / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(list_profiles(profile_dir)) or "none"
        raise ConfigError(f"unknown profile '{name}': no {path} (profiles: {known})")
    return path


def apply_profile(name: str, target: str | Path = "params.yaml", profile_dir: str | Path = PROFILE_DIR,
                  checks: Sequence[Check] = ()) -> Path:
    """Validate profiles/<name>.yaml (with `checks`, as load_params) and make it the params file; an invalid
    profile changes nothing."""
    source = profile_path(name, profile_dir)
    params = load_params(source, checks)
    if params.profile != name:
        raise ConfigError(f"{source}: profile: says '{params.profile}', expected '{name}'")
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
    return Path(target)
