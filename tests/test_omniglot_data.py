"""Omniglot files: integrity, download, atomic extraction, caching, and their errors.

Each test works in its own folders: a downloads folder (``root``, only read) and a
cache folder (``$METABP_CACHE/omniglot``, written), copying the small zips from the
local mirror ($METABP_DATA/omniglot).
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import shutil
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
    """A fresh, empty Omniglot downloads folder; the cache folder is tmp_path/cache/omniglot."""
    monkeypatch.setenv("METABP_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "omniglot"
    root.mkdir()
    return root


@pytest.fixture
def cache(isolated, tmp_path) -> Path:
    return tmp_path / "cache" / "omniglot"


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_md5_table_matches_the_mirror(mirror):
    for name in ("images_background_small1", "images_background_small2"):
        digest = hashlib.md5((mirror / f"{name}.zip").read_bytes()).hexdigest()
        assert digest == ARCHIVES[name]


def test_extracts_atomically_decodes_and_caches(mirror, isolated, cache, monkeypatch):
    shutil.copy(mirror / f"{SMALL1}.zip", isolated)
    classes = load_archive(SMALL1, isolated)
    assert classes.images.shape == (136, 20, 28, 28) and classes.images.dtype == torch.uint8
    assert classes.alphabets == ("Balinese", "Early_Aramaic", "Greek", "Korean", "Latin")
    assert (cache / SMALL1 / "Greek").is_dir() and omniglot.cache_file(SMALL1).is_file()
    assert omniglot.cache_file(SMALL1).parent == cache
    assert leftovers(cache) == []
    assert sorted(p.name for p in isolated.iterdir()) == [f"{SMALL1}.zip"]  # the downloads folder is only read
    # ink is bright on a dark background, and every drawing has some
    assert classes.images.float().mean() < 60 and (classes.images.amax(dim=(-2, -1)) > 100).all()
    # the second load is the cache alone: no image is decoded again
    monkeypatch.setattr(omniglot, "decode", lambda *a, **k: pytest.fail("decoded again"))
    again = load_archive(SMALL1, isolated)
    assert torch.equal(again.images, classes.images) and again.names == classes.names


def test_corrupt_zip_is_a_checksum_error(mirror, isolated, cache):
    data = (mirror / f"{SMALL1}.zip").read_bytes()
    (isolated / f"{SMALL1}.zip").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(DataError, match="corrupt or truncated"):
        load_archive(SMALL1, isolated)
    assert not (cache / SMALL1).exists() and not (isolated / SMALL1).exists() and leftovers(isolated) == []


def test_no_data_and_no_network_says_where_to_get_it(isolated, cache, monkeypatch):
    monkeypatch.setattr(omniglot, "BASE_URL", "http://127.0.0.1:9")  # nothing listens on port 9
    with pytest.raises(DataError) as err:
        load_archive(SMALL1, isolated)
    message = str(err.value)
    assert f"{SMALL1}.zip" in message and str(isolated) in message and "http://127.0.0.1:9" in message
    assert list(isolated.iterdir()) == []  # the downloads folder is only read
    assert list(cache.iterdir()) == []  # no partial download left behind


def test_missing_without_download_names_the_official_address(isolated):
    with pytest.raises(DataError, match="raw.githubusercontent.com/brendenlake/omniglot"):
        fetch_archive(SMALL1, isolated, download=False)


def test_download_verifies_and_moves_into_place(mirror, isolated, cache, monkeypatch):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(mirror))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(omniglot, "BASE_URL", f"http://127.0.0.1:{server.server_address[1]}")
        path = fetch_archive(SMALL1, isolated)
    finally:
        server.shutdown()
    assert path == cache / f"{SMALL1}.zip"  # downloads go to the cache folder
    assert hashlib.md5(path.read_bytes()).hexdigest() == ARCHIVES[SMALL1]
    assert leftovers(cache) == [] and list(isolated.iterdir()) == []


def test_wrong_layout_is_named(isolated, cache):
    bad = cache / SMALL1
    (bad / "Greek").mkdir(parents=True)
    (bad / "Greek" / "alpha.png").write_bytes(b"not in a character folder")
    with pytest.raises(DataError, match="layout"):
        load_archive(SMALL1, isolated)


def test_read_only_mirror_is_not_written(mirror, isolated, cache, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    shutil.copy(mirror / f"{SMALL1}.zip", ro)
    ro.chmod(0o555)
    try:
        load_archive(SMALL1, ro)
        assert sorted(p.name for p in ro.iterdir()) == [f"{SMALL1}.zip"]
        assert omniglot.cache_file(SMALL1) == cache / f"{SMALL1}_28px_{ARCHIVES[SMALL1][:8]}.pt"
        assert omniglot.cache_file(SMALL1).is_file()
    finally:
        ro.chmod(0o755)


def test_a_writable_data_folder_is_not_written_either(mirror, isolated, cache):
    # METABP_DATA is a mirror of downloads, even when it could be written (as root can)
    shutil.copy(mirror / f"{SMALL1}.zip", isolated)
    load_split("small1", "train", root=isolated)
    assert sorted(p.name for p in isolated.iterdir()) == [f"{SMALL1}.zip"]
    assert (cache / SMALL1).is_dir()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="name"):
        fetch_archive("images_background_small3")
    with pytest.raises(ValueError, match="background"):
        load_split("small3")
    with pytest.raises(ValueError, match="part"):
        load_split("small1", "validation")


def _silent_server():
    """A TCP server on 127.0.0.1 that accepts connections and never answers."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    return server


def test_a_server_that_never_answers_times_out_with_a_clear_message(isolated, cache, monkeypatch):
    server = _silent_server()
    monkeypatch.setattr(omniglot, "BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setattr(omniglot, "DOWNLOAD_TIMEOUT", 0.5)
    outcome = []

    def fetch():
        try:
            fetch_archive(SMALL1, isolated)
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            outcome.append(err)

    worker = threading.Thread(target=fetch, daemon=True)
    try:
        worker.start()
        worker.join(timeout=60)  # a hang guard, not a speed check
    finally:
        server.close()
    assert not worker.is_alive(), "the download did not give up"
    assert len(outcome) == 1 and isinstance(outcome[0], DataError), outcome
    assert "no answer from the server within 0.5 s" in str(outcome[0]) and f"{SMALL1}.zip" in str(outcome[0])
    assert list(cache.iterdir()) == [] and list(isolated.iterdir()) == []  # no partial download left


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_ctrl_c_during_a_download_is_one_line_and_leaves_nothing(tmp_path, signal_name):
    import os
    import signal
    import subprocess
    import sys
    import time

    server = _silent_server()
    cache = tmp_path / "cache"
    script = (
        "import sys, metabp.omniglot as o\n"
        f"o.BASE_URL = 'http://127.0.0.1:{server.getsockname()[1]}'\n"
        "from metabp.cli import main\n"
        f"sys.exit(main(['train', 'omniglot', '--out', {str(tmp_path / 'm.pt')!r}, '--no-progress']))\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(omniglot.__file__).resolve().parents[1]),  # the metabp under test
        "METABP_DATA": str(tmp_path / "empty"),
        "METABP_CACHE": str(cache),
    }
    # Ctrl-C as a user presses it in a terminal. A process started in the background by a
    # shell without job control (`cmd &` in a script, as CI runners may start this suite)
    # inherits SIGINT *ignored*, and Python then keeps it ignored; the child restores the
    # default disposition so that the test checks the CLI, not how the suite was launched.
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 120
        while not list((cache / "omniglot").glob(f".{SMALL1}.download-*")) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.1)
        assert list((cache / "omniglot").glob(f".{SMALL1}.download-*")), "the download never started"
        time.sleep(0.5)  # let it block on the silent server
        proc.send_signal(getattr(signal, signal_name))
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        server.close()
    assert proc.returncode == 1, err
    assert err.strip().count("\n") == 0 and "interrupted" in err and "Traceback" not in err, err
    assert list((cache / "omniglot").iterdir()) == []
    assert not (tmp_path / "m.pt").exists()


def test_temporary_folders_of_dead_processes_are_removed(isolated, cache, monkeypatch):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    cache.mkdir(parents=True)
    stale = cache / f".{SMALL1}.download-{pid}-abcd"
    stale.mkdir()
    (stale / f"{SMALL1}.zip").write_bytes(b"half")
    monkeypatch.setattr(omniglot, "BASE_URL", "http://127.0.0.1:9")
    with pytest.raises(DataError):
        fetch_archive(SMALL1, isolated)
    assert list(cache.iterdir()) == []


@pytest.fixture
def extracted(mirror, isolated, cache) -> Path:
    """small1 extracted into the cache folder, its tensor cache removed."""
    shutil.copy(mirror / f"{SMALL1}.zip", isolated)
    load_archive(SMALL1, isolated)
    omniglot.cache_file(SMALL1).unlink()
    return cache / SMALL1


def test_a_partly_deleted_folder_is_refused_naming_what_is_missing(extracted, isolated):
    for alphabet in ("Balinese", "Greek", "Korean"):
        shutil.rmtree(extracted / alphabet)
    with pytest.raises(DataError, match="incomplete") as err:
        load_archive(SMALL1, isolated)
    assert "Balinese, Greek, Korean" in str(err.value) and "Delete the folder" in str(err.value)
    assert not omniglot.cache_file(SMALL1).exists()  # no cache of the remains
    shutil.rmtree(extracted)  # as the message advises: extracted again, complete
    assert len(load_archive(SMALL1, isolated)) == 136


def test_a_missing_character_or_drawing_is_refused(extracted, isolated):
    shutil.rmtree(extracted / "Latin" / "character03")
    with pytest.raises(DataError, match="1 of its 136 characters are missing"):
        load_archive(SMALL1, isolated)


def test_a_folder_without_a_manifest_is_refused(extracted, isolated):
    (extracted / omniglot.MANIFEST).unlink()
    with pytest.raises(DataError, match="no readable manifest"):
        load_archive(SMALL1, isolated)


def test_a_cache_not_built_from_the_whole_archive_is_rebuilt(extracted, isolated):
    full = load_archive(SMALL1, isolated)
    target = omniglot.cache_file(SMALL1)
    blob = torch.load(target, weights_only=True)
    part = {**blob, "images": blob["images"][:48], "names": blob["names"][:48]}
    torch.save(part, target)  # what a partial folder would have left
    again = load_archive(SMALL1, isolated)
    assert len(again) == 136 and torch.equal(again.images, full.images)
    torch.save({**blob, "md5": "0" * 32}, target)  # built from another zip
    shutil.rmtree(extracted)
    (isolated / f"{SMALL1}.zip").unlink()
    with pytest.raises(DataError, match="missing|could not be downloaded"):
        load_archive(SMALL1, isolated, download=False)
