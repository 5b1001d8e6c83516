"""Where data sets live: one setting, the ``METABP_DATA`` environment variable.

Each data set has a folder of its own under it (``$METABP_DATA/omniglot/...``).
Without the variable, data goes to ``~/.cache/metabp``.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "METABP_DATA"
DEFAULT_ROOT = Path.home() / ".cache" / "metabp"


def data_root() -> Path:
    """The data folder: ``$METABP_DATA`` if set (and not empty), else ``~/.cache/metabp``."""
    value = os.environ.get(ENV_VAR, "").strip()
    return Path(value).expanduser() if value else DEFAULT_ROOT


def dataset_dir(name: str) -> Path:
    """The folder of one data set, ``data_root() / name`` (not created here)."""
    if not name or "/" in name or "\\" in name or name in {".", ".."}:
        raise ValueError(f"name must be a plain folder name such as 'omniglot', got {name!r}")
    return data_root() / name


class DataError(RuntimeError):
    """A data set is missing, corrupt or laid out wrongly; the message says what to do."""
