"""The loader of the official one-shot runs, on a fixture in their published layout."""

from __future__ import annotations

import shutil

import pytest
import torch
from runs_fixture import make_runs, zip_runs

from metabp.data import DataError
from metabp.omniglot_runs import fetch_runs, load_runs, runs_as_tasks


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("all_runs")
    return folder, make_runs(folder)


def test_loads_twenty_runs_with_their_answers(runs_dir):
    folder, answers = runs_dir
    runs = load_runs(folder)
    assert [r.name for r in runs] == [f"run{i:02d}" for i in range(1, 21)]
    for run in runs:
        assert run.train.shape == (20, 1, 28, 28) and run.test.shape == (20, 1, 28, 28)
        assert run.answers.tolist() == answers[run.name]
        # item i is a copy of its class's training image
        assert torch.equal(run.test, run.train[run.answers])
    batch = runs_as_tasks(runs)
    assert batch.x_spt.shape == (20, 20, 1, 28, 28)
    assert batch.y_spt[0].tolist() == list(range(20)) and batch.y_qry[3].tolist() == answers["run04"]


def test_a_missing_run_is_named(tmp_path, runs_dir):
    folder = shutil.copytree(runs_dir[0], tmp_path / "runs")
    shutil.rmtree(folder / "run07")
    with pytest.raises(DataError, match="run07"):
        load_runs(folder)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda run: (run / "test" / "item05.png").unlink(), "item05.png is missing"),
        (lambda run: (run / "class_labels.txt").unlink(), "class_labels.txt is missing"),
        (lambda run: (run / "class_labels.txt").write_text("run03/test/item01.png\n"), "line 1"),
        (
            lambda run: (run / "class_labels.txt").write_text(
                (run / "class_labels.txt").read_text().replace("run03/test/item02.png", "run03/test/item01.png")
            ),
            "pair each",
        ),
    ],
)
def test_a_damaged_run_is_a_layout_error(tmp_path, runs_dir, damage, message):
    folder = shutil.copytree(runs_dir[0], tmp_path / "runs")
    damage(folder / "run03")
    with pytest.raises(DataError, match=message):
        load_runs(folder)


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """A downloads folder (only read); the cache folder is tmp_path/cache/omniglot."""
    monkeypatch.setenv("METABP_CACHE", str(tmp_path / "cache"))
    (tmp_path / "omniglot").mkdir()
    return tmp_path / "omniglot"


def test_fetch_extracts_a_local_zip(runs_dir, isolated, tmp_path):
    zip_runs(runs_dir[0], isolated / "all_runs.zip")
    folder = fetch_runs(isolated, download=False)
    assert folder == tmp_path / "cache" / "omniglot" / "all_runs"  # extracted into the cache folder
    assert len(load_runs(folder)) == 20
    assert sorted(p.name for p in isolated.iterdir()) == ["all_runs.zip"]  # the downloads folder is only read
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]


def test_a_file_given_as_the_runs_folder_is_named(tmp_path):
    path = tmp_path / "runs.txt"
    path.write_text("run01\n")
    with pytest.raises(DataError, match="is a file, not a folder"):
        load_runs(path)


def test_fetch_rejects_a_corrupt_zip(runs_dir, isolated):
    zip_runs(runs_dir[0], isolated / "all_runs.zip")
    data = (isolated / "all_runs.zip").read_bytes()
    (isolated / "all_runs.zip").write_bytes(data[: len(data) // 3])
    with pytest.raises(DataError, match="corrupt or truncated"):
        fetch_runs(isolated, download=False)
    assert not (isolated / "all_runs").exists()


def test_fetch_without_network_says_where_to_put_the_zip(isolated, tmp_path, monkeypatch):
    import metabp.omniglot_runs as runs_module

    monkeypatch.setattr(runs_module, "RUNS_URL", "http://127.0.0.1:9/all_runs.zip")
    with pytest.raises(DataError, match="all_runs.zip") as err:
        fetch_runs(isolated)
    assert str(isolated / "all_runs.zip") in str(err.value)
    assert list(isolated.iterdir()) == [] and list((tmp_path / "cache" / "omniglot").iterdir()) == []
