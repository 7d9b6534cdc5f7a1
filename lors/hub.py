"""Load named pretrained weights offline first: a local folder or the Hugging Face cache, the Hub only
when it is reachable; anything else is one ConfigError line naming the params key and the weights."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

from lors.errors import ConfigError

T = TypeVar("T")


def hub_reachable(timeout: float = 5.0) -> bool:
    """A quick TCP probe, so an unknown name offline fails at once instead of after minutes of retries."""
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def load_pretrained(key: str, name: str, load: Callable[[str, bool], T], shown: str | None = None,
                    known: str = "") -> T:
    """`load(name, local_files_only)` for the weights that params key `key` names (`shown` in messages,
    default `name`; `known`: other accepted names, for the message)."""
    shown = shown or name

    def attempt(local_only: bool) -> T:
        try:
            return load(name, local_only)
        except (OSError, ValueError, KeyError) as exc:
            reason = (str(exc).strip() or exc.__class__.__name__).splitlines()[0]
            raise ConfigError(f"{key}: cannot load '{shown}' ({reason})") from None

    try:
        return attempt(local_only=True)
    except ConfigError:
        if Path(name).is_dir():
            raise
        if not hub_reachable():
            raise ConfigError(f"{key}: '{shown}' is not a local folder{', ' + known if known else ''} or a cached "
                              "Hugging Face model, and the Hub is unreachable to download it") from None
        return attempt(local_only=False)
