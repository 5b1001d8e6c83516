"""Test-wide setting: what the library writes goes to a temporary cache folder.

``METABP_DATA`` (the downloads, only read) is left as it is; ``METABP_CACHE`` (the
folder the library writes to) is pointed at a fresh temporary folder for the
session unless the caller set it (``.ci/run`` does, to a temporary folder of its own).
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _temporary_cache(tmp_path_factory):
    if os.environ.get("METABP_CACHE", "").strip():
        yield
        return
    os.environ["METABP_CACHE"] = str(tmp_path_factory.mktemp("metabp-cache"))
    try:
        yield
    finally:
        os.environ.pop("METABP_CACHE", None)
