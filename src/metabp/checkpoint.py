"""Checkpoint files: written atomically, read back with a clear error.

A checkpoint is a dict saved with ``torch.save``: it holds only tensors, numbers,
strings, lists and dicts, so it loads with ``torch.load(..., weights_only=True)``
and never runs code from the file. It is written to a temporary file in the
target's folder and renamed into place, so a crash mid-write leaves the previous
checkpoint intact and never a half-written one. Parameters (the ``"model"`` entry)
that are not finite are never written, and a file holding such parameters is
refused when read.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
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


def nonfinite(tensors: Any) -> list[str]:
    """Names of the floating-point tensors in the dict ``tensors`` that hold a NaN or an infinity."""
    if not isinstance(tensors, dict):
        return []
    return [
        str(k)
        for k, v in tensors.items()
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]


def _nonfinite_message(names: list[str]) -> str:
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"its parameters are not finite ({shown}): the run that wrote it diverged"


def save(path: Path | str, state: dict[str, Any]) -> None:
    """Write a checkpoint: ``state`` plus the format marker, atomically.

    Raises:
        CheckpointError: the folder does not exist, or ``state["model"]`` holds a
            tensor that is not finite (nothing is written then).
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise CheckpointError(f"cannot write {path}: the folder {path.parent} does not exist")
    bad = nonfinite(state.get("model"))
    if bad:
        raise CheckpointError(f"not writing {path}: {_nonfinite_message(bad)}")
    atomic_save({"format": FORMAT, "version": VERSION, **state}, path)


def load(path: Path | str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save`.

    Raises:
        CheckpointError: the file is missing (or a folder), is not a readable torch
            file, is not a metabp checkpoint of a version this code reads, or holds
            parameters (``"model"``) that are not finite.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            truncated = f.read(4) == b"PK\x03\x04"  # begins as torch.save's zip does, but its end is missing
        what = (
            "is not a readable checkpoint: it is truncated"
            if truncated
            else "is not a checkpoint: it is not a file written by torch.save"
        )
        raise CheckpointError(f"{path} {what}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(err).__name__}); is it damaged?") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a metabp checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {state.get('version')!r}; this code reads {VERSION}")
    bad = nonfinite(state.get("model"))
    if bad:
        raise CheckpointError(f"{path} cannot be used: {_nonfinite_message(bad)}")
    return state
