"""Checkpoint files: written atomically, read back with a clear error.

A checkpoint is a dict saved with ``torch.save``: it holds only tensors, numbers,
strings, lists and dicts, so it loads with ``torch.load(..., weights_only=True)``
and never runs code from the file. It is written to a temporary file in the
target's folder and renamed into place, so a crash mid-write leaves the previous
checkpoint intact and never a half-written one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "metabp-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable or not one of this project's."""


def atomic_save(obj: Any, path: Path | str) -> None:
    """``torch.save(obj)`` to ``path`` through a temporary file and one ``os.replace``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save(path: Path | str, state: dict[str, Any]) -> None:
    """Write a checkpoint: ``state`` plus the format marker, atomically."""
    path = Path(path)
    if not path.parent.is_dir():
        raise CheckpointError(f"cannot write {path}: the folder {path.parent} does not exist")
    atomic_save({"format": FORMAT, "version": VERSION, **state}, path)


def load(path: Path | str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save`.

    Raises:
        CheckpointError: the file is missing, is not a readable torch file, or is
            not a metabp checkpoint of a version this code reads.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(err).__name__}); is it truncated?") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a metabp checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {state.get('version')!r}; this code reads {VERSION}")
    return state
