"""Where data sets live: two settings, ``METABP_DATA`` and ``METABP_CACHE``.

* ``METABP_DATA`` names a folder of downloads (the published files, for example
  Omniglot's zips). It is only ever read: it may be a shared, read-only mirror.
* ``METABP_CACHE`` names the folder this library writes to: downloads that were
  missing from ``METABP_DATA``, extracted folders and decoded tensor caches.
  It defaults to ``~/.cache/metabp``.

Each data set has a folder of its own under each (``$METABP_DATA/omniglot/...``,
``$METABP_CACHE/omniglot/...``). Without ``METABP_DATA`` the downloads are looked
up in the cache folder alone.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "METABP_DATA"
CACHE_ENV_VAR = "METABP_CACHE"
DEFAULT_ROOT = Path.home() / ".cache" / "metabp"


def _check_name(name: str) -> str:
    if not name or "/" in name or "\\" in name or name in {".", ".."}:
        raise ValueError(f"name must be a plain folder name such as 'omniglot', got {name!r}")
    return name


def data_root() -> Path:
    """The downloads folder: ``$METABP_DATA`` if set (and not empty), else :func:`cache_root`."""
    value = os.environ.get(ENV_VAR, "").strip()
    return Path(value).expanduser() if value else cache_root()


def cache_root() -> Path:
    """The folder this library writes to: ``$METABP_CACHE`` if set (and not empty), else ``~/.cache/metabp``."""
    value = os.environ.get(CACHE_ENV_VAR, "").strip()
    return Path(value).expanduser() if value else DEFAULT_ROOT


def dataset_dir(name: str) -> Path:
    """The downloads folder of one data set, ``data_root() / name`` (read only, not created here)."""
    return data_root() / _check_name(name)


def cache_dir(name: str) -> Path:
    """The cache folder of one data set, ``cache_root() / name`` (not created here)."""
    return cache_root() / _check_name(name)


class DataError(RuntimeError):
    """A data set is missing, corrupt or laid out wrongly; the message says what to do."""
