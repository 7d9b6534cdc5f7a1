"""The errors a stage reports as one line (exit code 2), and the wording of OS-level failures."""

from __future__ import annotations

import errno
from pathlib import Path


class LorsError(Exception):
    """Bad input (file, key, name, budget); the message is the one line the user sees."""


class ConfigError(LorsError, ValueError):
    """A params file or option that cannot be used."""


class DataError(LorsError):
    """A dataset file that is missing, unreadable or malformed."""


class Terminated(BaseException):
    """Raised by the CLI's SIGTERM handler, so `with` blocks unwind (temp files removed, run records
    closed FAILED) before the process exits; a BaseException so no `except Exception` swallows it."""


# The `lors.paths.Layout` folder a work file lives in -> the command that writes it.
_PRODUCERS = {"prepared": "prepare", "text": "embed-text", "experts": "experts", "synsets": "distill (or select)",
              "eval": "evaluate"}

_SPACE = "free space there (or set work_dir in params.yaml to a bigger disk) and rerun: finished work is kept and the stage resumes"
_ADVICE = {
    errno.ENOSPC: _SPACE,
    errno.EDQUOT: _SPACE,
    errno.EROFS: "the filesystem is read-only: set work_dir in params.yaml to a writable folder",
    errno.EACCES: "fix its permissions or set work_dir in params.yaml to a folder you can write",
    errno.EPERM: "fix its permissions or set work_dir in params.yaml to a folder you can write",
    errno.ENOTDIR: "a parent of this path is a file, not a folder: move that file or choose another work_dir",
    errno.EEXIST: "a file stands where a folder must go: move it or choose another work_dir",
    errno.EISDIR: "a folder stands where a file must go: move it away and rerun",
}


def producer_hint(path: str | Path) -> str:
    """What to run to (re)create a work file, read off its Layout folder; a generic hint otherwise."""
    parts = Path(path).parts
    for i in range(len(parts) - 1, 0, -1):
        if parts[i] in _PRODUCERS:
            return f"run `lors-bench {_PRODUCERS[parts[i]]} --dataset {parts[i - 1]}` (again) to write it"
    return "check that it exists and was not moved or deleted while the stage ran, then rerun"


def _file_among_parents(path: str | Path) -> Path | None:
    return next((p for p in Path(path).parents if p.exists() and not p.is_dir()), None)


def os_error_line(exc: OSError) -> str:
    """`<path>: <reason> — <what to do>` for an OS-level failure (no space, read-only, ...)."""
    reason = exc.strerror or str(exc) or exc.__class__.__name__
    if exc.errno == errno.ENOENT and exc.filename:
        advice = producer_hint(exc.filename)
    elif exc.errno == errno.ENOTDIR and exc.filename and (blocker := _file_among_parents(exc.filename)):
        advice = f"{blocker} is a file, not a folder: move it or choose another work_dir"
    else:
        advice = _ADVICE.get(exc.errno, "rerun with --debug (or LORS_DEBUG=1) to see where it happened")
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{reason} — {advice}"
