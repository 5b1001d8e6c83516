"""Omniglot files: integrity, download, atomic extraction, caching, and their errors.

Each test works in its own folders (the fallback cache folders are redirected
too), copying the small zips from the local mirror ($METABP_DATA/omniglot).
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
import torch

from metabp import omniglot
from metabp.data import DataError, dataset_dir
from metabp.omniglot import ARCHIVES, fetch_archive, load_archive, load_split

SMALL1 = "images_background_small1"


@pytest.fixture
def mirror() -> Path:
    """The folder holding the real zips (CI: ../shared/data/omniglot)."""
    folder = dataset_dir("omniglot")
    if not (folder / f"{SMALL1}.zip").is_file():
        pytest.fail(f"the Omniglot zips are expected in {folder}; set METABP_DATA to the folder above 'omniglot'")
    return folder


@pytest.fixture
def isolated(tmp_path, monkeypatch) -> Path:
    """A fresh, empty Omniglot root; the cache fallbacks point into tmp_path too."""
    monkeypatch.setattr(omniglot, "DEFAULT_ROOT", tmp_path / "home")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    root = tmp_path / "omniglot"
    root.mkdir()
    return root


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_md5_table_matches_the_mirror(mirror):
    for name in ("images_background_small1", "images_background_small2"):
        digest = hashlib.md5((mirror / f"{name}.zip").read_bytes()).hexdigest()
        assert digest == ARCHIVES[name]


def test_extracts_atomically_decodes_and_caches(mirror, isolated, monkeypatch):
    shutil.copy(mirror / f"{SMALL1}.zip", isolated)
    classes = load_archive(SMALL1, isolated)
    assert classes.images.shape == (136, 20, 28, 28) and classes.images.dtype == torch.uint8
    assert classes.alphabets == ("Balinese", "Early_Aramaic", "Greek", "Korean", "Latin")
    assert (isolated / SMALL1 / "Greek").is_dir() and (isolated / f"{SMALL1}_28px.pt").is_file()
    assert leftovers(isolated) == []
    # ink is bright on a dark background, and every drawing has some
    assert classes.images.float().mean() < 60 and (classes.images.amax(dim=(-2, -1)) > 100).all()
    # the second load is the cache alone: no image is decoded again
    monkeypatch.setattr(omniglot, "decode", lambda *a, **k: pytest.fail("decoded again"))
    again = load_archive(SMALL1, isolated)
    assert torch.equal(again.images, classes.images) and again.names == classes.names


def test_corrupt_zip_is_a_checksum_error(mirror, isolated):
    data = (mirror / f"{SMALL1}.zip").read_bytes()
    (isolated / f"{SMALL1}.zip").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(DataError, match="corrupt or truncated"):
        load_archive(SMALL1, isolated)
    assert not (isolated / SMALL1).exists() and leftovers(isolated) == []


def test_no_data_and_no_network_says_where_to_get_it(isolated, monkeypatch):
    monkeypatch.setattr(omniglot, "BASE_URL", "http://127.0.0.1:9")  # nothing listens on port 9
    with pytest.raises(DataError) as err:
        load_archive(SMALL1, isolated)
    message = str(err.value)
    assert f"{SMALL1}.zip" in message and str(isolated) in message and "http://127.0.0.1:9" in message
    assert list(isolated.iterdir()) == []  # no partial download left behind


def test_missing_without_download_names_the_official_address(isolated):
    with pytest.raises(DataError, match="raw.githubusercontent.com/brendenlake/omniglot"):
        fetch_archive(SMALL1, isolated, download=False)


def test_download_verifies_and_moves_into_place(mirror, isolated, monkeypatch):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(mirror))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(omniglot, "BASE_URL", f"http://127.0.0.1:{server.server_address[1]}")
        path = fetch_archive(SMALL1, isolated)
    finally:
        server.shutdown()
    assert path == isolated / f"{SMALL1}.zip"
    assert hashlib.md5(path.read_bytes()).hexdigest() == ARCHIVES[SMALL1]
    assert leftovers(isolated) == []


def test_wrong_layout_is_named(isolated):
    bad = isolated / SMALL1
    (bad / "Greek").mkdir(parents=True)
    (bad / "Greek" / "alpha.png").write_bytes(b"not in a character folder")
    with pytest.raises(DataError, match="layout"):
        load_archive(SMALL1, isolated)


def test_read_only_mirror_is_not_written(mirror, isolated, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    shutil.copy(mirror / f"{SMALL1}.zip", ro)
    ro.chmod(0o555)
    try:
        load_archive(SMALL1, ro)
        assert sorted(p.name for p in ro.iterdir()) == [f"{SMALL1}.zip"]
        assert (tmp_path / "home" / "omniglot" / f"{SMALL1}_28px.pt").is_file()
    finally:
        ro.chmod(0o755)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="name"):
        fetch_archive("images_background_small3")
    with pytest.raises(ValueError, match="background"):
        load_split("small3")
    with pytest.raises(ValueError, match="part"):
        load_split("small1", "validation")
