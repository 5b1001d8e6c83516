"""Lake et al.'s (2015) twenty official one-shot classification runs.

Each run is a 20-way one-shot task within one alphabet of Omniglot's evaluation
set: 20 training images (one per character) and 20 test images, each to be
matched to its character. The published layout, as in ``all_runs.zip`` of the
data set's repository (``python/one-shot-classification``), is::

    run01/training/class01.png ... class20.png
    run01/test/item01.png ... item20.png
    run01/class_labels.txt      # lines like "run01/test/item01.png run01/training/class08.png"
    ...
    run20/...

Error rates from the paper on these runs (Lake et al., 2015, trained on the
minimal background sets): a ConvNet 24.0% (small1) and 22.3% (small2), Bayesian
Program Learning 4.3% and 4.0%, people 4.5%.
"""

from __future__ import annotations

import os
import shutil
import urllib.error
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .data import DataError
from .omniglot import BASE_URL, IMAGE_SIZE, decode, download_error, download_file, locations, temp_dir, write_dir
from .tasks import TaskBatch

RUNS_URL = f"{BASE_URL}/one-shot-classification/all_runs.zip"
RUNS = tuple(f"run{i:02d}" for i in range(1, 21))
WAYS = 20
LABELS_FILE = "class_labels.txt"
FOLDER = "all_runs"


@dataclass(frozen=True)
class OneShotRun:
    """One run: ``train`` and ``test`` images ``(20, 1, 28, 28)`` in file order
    (class01.., item01..), and ``answers[i]``, the index in ``train`` of test item i."""

    name: str
    train: Tensor
    test: Tensor
    answers: Tensor


def runs_as_tasks(runs: list[OneShotRun]) -> TaskBatch:
    """All runs as one :class:`~metabp.tasks.TaskBatch` of 20-way 1-shot tasks.

    Training image ``c`` has label ``c``; a test item's label is its answer, so
    query accuracy is the fraction of test items matched correctly.
    """
    x_spt = torch.stack([r.train for r in runs])
    y_spt = torch.arange(WAYS).expand(len(runs), WAYS).clone()
    return TaskBatch(x_spt, y_spt, torch.stack([r.test for r in runs]), torch.stack([r.answers for r in runs]))


def _image(path: Path, size: int) -> Tensor:
    return decode(path, size).unsqueeze(0).float().div_(255.0)


def load_run(folder: Path, size: int = IMAGE_SIZE) -> OneShotRun:
    """Read one run folder (``.../run07``); :class:`~metabp.data.DataError` if its layout is wrong."""
    name = folder.name

    def wrong(what: str) -> DataError:
        return DataError(f"{folder} is not an official one-shot run: {what}")

    train_files = [folder / "training" / f"class{i:02d}.png" for i in range(1, WAYS + 1)]
    test_files = [folder / "test" / f"item{i:02d}.png" for i in range(1, WAYS + 1)]
    for f in train_files + test_files:
        if not f.is_file():
            raise wrong(f"{f.relative_to(folder)} is missing")
    labels = folder / LABELS_FILE
    if not labels.is_file():
        raise wrong(f"{LABELS_FILE} is missing")
    answers: dict[str, str] = {}
    for number, line in enumerate(labels.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise wrong(f"{LABELS_FILE} line {number} should be 'test-image training-image', got {line!r}")
        answers[parts[0]] = parts[1]
    train_keys = [f"{name}/training/{f.name}" for f in train_files]
    test_keys = [f"{name}/test/{f.name}" for f in test_files]
    if sorted(answers) != sorted(test_keys) or not set(answers.values()) <= set(train_keys):
        raise wrong(
            f"{LABELS_FILE} must pair each of {name}/test/item01.png .. item20.png with one of "
            f"{name}/training/class01.png .. class20.png"
        )
    return OneShotRun(
        name,
        torch.stack([_image(f, size) for f in train_files]),
        torch.stack([_image(f, size) for f in test_files]),
        torch.tensor([train_keys.index(answers[k]) for k in test_keys]),
    )


def load_runs(folder: Path | str, size: int = IMAGE_SIZE) -> list[OneShotRun]:
    """The 20 runs in ``folder`` (which holds ``run01`` .. ``run20``).

    Raises:
        DataError: the folder is missing, a run is missing, or a run's layout is wrong.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DataError(
            f"{folder} is a file, not a folder: give the folder that holds run01 .. run20 (all_runs.zip unzipped)"
        )
    if not folder.is_dir():
        raise DataError(f"runs folder {folder} does not exist")
    missing = [r for r in RUNS if not (folder / r).is_dir()]
    if missing:
        raise DataError(
            f"{folder} is not the official runs folder: it lacks {', '.join(missing)} "
            f"(expected run01 .. run20, as in all_runs.zip)"
        )
    return [load_run(folder / r, size) for r in RUNS]


def _find_runs_root(folder: Path) -> Path | None:
    """The folder under ``folder`` (itself or one level down) that holds ``run01``."""
    if (folder / RUNS[0]).is_dir():
        return folder
    subdirs = [p for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
    return next((p for p in subdirs if (p / RUNS[0]).is_dir()), None)


def fetch_runs(root: Path | str | None = None, download: bool = True, cache: Path | str | None = None) -> Path:
    """Folder of the official runs, downloading and extracting ``all_runs.zip`` if needed.

    Looks for ``all_runs/`` (or ``all_runs.zip``) in the Omniglot folders of
    :func:`metabp.omniglot.locations` (``root``, only read, then the cache folder
    ``cache``); what it downloads or extracts goes to the cache folder. The
    repository publishes no checksum for this zip, so a download is checked by its
    layout: it must unzip to the 20 runs, each readable by :func:`load_run`.
    Extraction goes through a temporary folder.
    """
    from torchvision.datasets.utils import extract_archive

    for folder in locations(root, cache):
        if (folder / FOLDER).is_dir():
            return folder / FOLDER
    zip_path = next((f / "all_runs.zip" for f in locations(root, cache) if (f / "all_runs.zip").is_file()), None)
    where = locations(root, cache)[0] / "all_runs.zip"
    if zip_path is None and not download:
        raise DataError(f"{where} is missing: download {RUNS_URL} and put it there")
    dest = write_dir(cache)
    tmp = temp_dir("all_runs.runs", dest)
    try:
        if zip_path is None:
            try:
                download_file(RUNS_URL, tmp / "all_runs.zip")
            except (urllib.error.URLError, OSError) as err:
                raise DataError(
                    f"the one-shot runs could not be downloaded from {RUNS_URL} ({download_error(err, RUNS_URL)}). "
                    f"Download all_runs.zip where there is network access and put it at {where}, "
                    "or unzip it and pass its folder with --runs."
                ) from None
            zip_path = tmp / "all_runs.zip"
        try:
            extract_archive(str(zip_path), str(tmp / "x"))
        except zipfile.BadZipFile:
            raise DataError(
                f"{zip_path} is not a valid zip (corrupt or truncated); delete it and download it again"
            ) from None
        found = _find_runs_root(tmp / "x")
        if found is None:
            raise DataError(f"{zip_path} does not unzip to the folders run01 .. run20")
        load_runs(found)  # layout check before anything is moved into place
        try:
            os.replace(found, dest / FOLDER)
        except OSError:
            if not (dest / FOLDER).is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest / FOLDER
