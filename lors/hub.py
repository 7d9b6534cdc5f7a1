"""Load named pretrained weights offline first: a local folder or the Hugging Face cache, the Hub only
when it is reachable; anything else is one ConfigError line naming the params key and the weights."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from lors.data.text_features import _hub_reachable
from lors.errors import ConfigError

T = TypeVar("T")


def load_pretrained(key: str, name: str, load: Callable[[str, bool], T]) -> T:
    """`load(name, local_files_only)` for the weights that params key `key` names."""
    def attempt(local_only: bool) -> T:
        try:
            return load(name, local_only)
        except (OSError, ValueError, KeyError) as exc:
            reason = (str(exc).strip() or exc.__class__.__name__).splitlines()[0]
            raise ConfigError(f"{key}: cannot load '{name}' ({reason})") from None

    try:
        return attempt(local_only=True)
    except ConfigError:
        if Path(name).is_dir():
            raise
        if not _hub_reachable():
            raise ConfigError(f"{key}: weights '{name}' are neither a local folder nor in the Hugging Face cache, "
                              "and the Hub is unreachable (download them, then name the folder)") from None
        return attempt(local_only=False)
