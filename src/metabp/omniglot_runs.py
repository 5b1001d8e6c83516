"""Lake et al.'s (2015) twenty official one-shot classification runs, and runs built the same way.

Each run is a 20-way one-shot task within one alphabet of Omniglot's evaluation
set: 20 training images (one per character) and 20 test images, each to be
matched to its character. In the official runs every training image of a run is
by one drawer and every test image by another (the files' ``_NN`` suffix), and each
of ten evaluation alphabets gives two runs. The published layout, as in
``all_runs.zip`` of the data set's repository (``python/one-shot-classification``), is::

    run01/training/class01.png ... class20.png
    run01/test/item01.png ... item20.png
    run01/class_labels.txt      # lines like "run01/test/item01.png run01/training/class08.png"
    ...
    run20/...

Published error rates on this task (20-way, one shot, within an alphabet): people
4.5% and a ConvNet trained on the 30 background alphabets 13.5% (Lake et al.,
2015); in the minimal setting (five background alphabets, ``images_background_small1``
or ``small2``) Bayesian Program Learning about 4.2% and prototypical networks 30.1%
(Lake, Salakhutdinov & Tenenbaum, 2019, "The Omniglot challenge: a 3-year progress
report").

The official runs are drawn from the evaluation set. :func:`make_lake_runs` builds
runs the same way from the alphabets that a background set holds out (for
``small1``, the alphabets of ``small2`` that ``small1`` lacks): for each run one
alphabet, 20 of its characters, the training image of each by one drawer and the
test image by another, written in the official layout, so that :func:`load_runs`
(and ``python -m metabp evaluate-runs --runs FOLDER``) reads them exactly as it
reads the official runs. :func:`lake_runs` keeps such a set in the cache folder.
The images are the data set's own files, copied; they are never committed.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checks import nonnegative_int, one_of
from .data import DataError
from .omniglot import (
    BACKGROUNDS,
    BASE_URL,
    IMAGE_SIZE,
    decode,
    download_error,
    download_file,
    extracted_entries,
    load_archive,
    locations,
    temp_dir,
    write_dir,
)
from .tasks import TaskBatch

RUNS_URL = f"{BASE_URL}/one-shot-classification/all_runs.zip"
RUNS = tuple(f"run{i:02d}" for i in range(1, 21))
WAYS = 20
LABELS_FILE = "class_labels.txt"
FOLDER = "all_runs"
#: What :func:`make_lake_runs` writes beside run01 .. run20: how each run was drawn.
MANIFEST_FILE = "runs.json"
#: Version of the way :func:`make_lake_runs` draws runs (part of the manifest).
LAKE_RUNS_VERSION = 1


@dataclass(frozen=True)
class OneShotRun:
    """One run: ``train`` and ``test`` images ``(20, 1, size, size)`` in file order
    (class01.., item01..; 28 pixels unless :func:`load_runs` was asked for another
    size), and ``answers[i]``, the index in ``train`` of test item i."""

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


def image_size(path: Path | str) -> int:
    """Side in pixels of the drawings the checkpoint at ``path`` was trained on.

    A checkpoint of ``train omniglot`` stores it in its configuration
    (:attr:`metabp.fewshot.FewShotConfig.image_size`; files written before that field
    existed were trained at 28); a classifier of ``pretrain omniglot`` is trained at 28.

    Raises:
        CheckpointError: the file is not a checkpoint of either kind.
    """
    from . import checkpoint

    return _stored_image_size(checkpoint.load(path), path)


def _stored_image_size(state: dict[str, Any], path: Path | str) -> int:
    """:func:`image_size` of a checkpoint already loaded as ``state``."""
    from .checkpoint import CheckpointError
    from .fewshot import FewShotConfig

    if state.get("kind") == "classifier":
        return IMAGE_SIZE
    try:
        return FewShotConfig.from_dict(state["config"]).image_size
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path} does not hold a few-shot model ({err})") from None


def runs_accuracy(
    path: Path | str,
    runs: list[OneShotRun] | Path | str,
    steps: int | None = None,
    inner_lr: float | None = None,
    device: str | torch.device = "cpu",
    augment: int = 0,
    strength: float = 1.0,
) -> Tensor:
    """Accuracy ``(len(runs),)`` on each run of the checkpoint at ``path``, whatever wrote it.

    ``runs`` is a list of :class:`OneShotRun` at the checkpoint's image size
    (:func:`image_size`), or the folder of the runs, which is then read at that size.

    A checkpoint of ``train omniglot`` (:func:`metabp.fewshot.load_model`) is scored as
    :func:`metabp.fewshot.accuracy` scores it: MAML, first-order MAML and ANIL adapt on
    the 20 training images (``steps`` inner steps of ``inner_lr``, default
    :func:`~metabp.fewshot.default_test_steps` and the training step), prototypical
    networks compare each test image with the prototypes. A classifier of
    ``pretrain omniglot`` (:func:`metabp.transfer.load_classifier`) is scored by nearest
    prototype on its body's features (:func:`metabp.protonet.accuracy`): the training
    images and the test images of a run are embedded in one batch, and each test image
    takes the label of the nearest training image. It has no head for the run's classes
    and nothing is fine-tuned, so there is no step size to choose.

    ``augment`` and ``strength`` turn on test-time augmentation for the learners scored by
    nearest prototype (prototypical networks and classifiers): each image's features are
    the mean over the image and ``augment`` distorted copies (:func:`metabp.protonet.accuracy`,
    seed 0).

    Raises:
        ValueError: ``steps`` or ``inner_lr`` given for a learner without an inner loop,
            ``augment`` for one with an inner loop, a bad ``augment`` or ``strength``, or runs
            whose images are not of the size the checkpoint was trained on.
        CheckpointError: the file is not a checkpoint of either kind.
    """
    from . import checkpoint, protonet
    from .fewshot import accuracy, load_model
    from .transfer import load_classifier

    nonnegative_int("augment", augment)
    state = checkpoint.load(path)  # read once: its kind and image size decide how the runs are scored
    size = _stored_image_size(state, path)
    if isinstance(runs, (str, Path)):
        runs = load_runs(runs, size)
    found = tuple(runs[0].train.shape[-2:]) if runs else (size, size)
    if found != (size, size):
        raise ValueError(
            f"{path} was trained on {size}-pixel drawings but the runs hold {found[0]}x{found[1]} images: "
            f"load them with load_runs(folder, size={size}), or pass the folder"
        )
    tasks = runs_as_tasks(runs).to(device)
    if state.get("kind") == "classifier":
        if steps is not None or inner_lr is not None:
            raise ValueError(
                f"{path} is a pretrained classifier, scored by nearest prototype on its features: "
                "steps and inner_lr do not apply"
            )
        return protonet.accuracy(load_classifier(path)[0].to(device), tasks, None, augment, strength).cpu()
    model, config, _ = load_model(path, device)
    if config.algorithm == "protonet":
        if steps is not None or inner_lr is not None:
            raise ValueError(
                f"{path} is a prototypical network, which has no inner loop: steps and inner_lr do not apply"
            )
        return protonet.accuracy(model, tasks, 50, augment, strength).cpu()
    if augment:
        raise ValueError(
            f"{path} is a {config.algorithm} checkpoint, which adapts by gradient steps: augment applies "
            "only to learners scored by nearest prototype (protonet, or a classifier of pretrain omniglot)"
        )
    if steps is not None:
        nonnegative_int("steps", steps)
    return accuracy(model, tasks, config, None if steps is None else [steps], inner_lr)[-1].cpu()


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


def _drawer(path: Path) -> int:
    """The drawer number of an Omniglot file, ``0851_07.png`` -> 7."""
    try:
        return int(path.stem.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        raise DataError(f"{path} is not named <character>_<drawer>.png as Omniglot's drawings are") from None


def held_out_characters(
    background: str = "small1", root: Path | str | None = None, download: bool = True, cache: Path | str | None = None
) -> tuple[str, dict[str, list[tuple[str, dict[int, Path]]]]]:
    """The characters that background set ``background`` holds out, grouped by alphabet.

    These are the alphabets of :func:`metabp.omniglot.load_split` ``(background, 'test')``
    (for 'small1', the alphabets of small2 that small1 lacks; for 'full', the 20
    evaluation alphabets), read from the extracted archive so that the drawings'
    files are at hand.

    Returns:
        The archive's name and ``{alphabet: [(character, {drawer: path})]}``, sorted.
    """
    one_of("background", background, tuple(BACKGROUNDS))
    train_name, other_name = BACKGROUNDS[background]
    seen = set(load_archive(train_name, root, download, cache=cache).alphabets)
    alphabets: dict[str, list[tuple[str, dict[int, Path]]]] = {}
    for alphabet, character, paths in extracted_entries(other_name, root, download, cache):
        if alphabet not in seen:
            alphabets.setdefault(alphabet, []).append((character, {_drawer(p): p for p in paths}))
    return other_name, alphabets


def make_lake_runs(
    out: Path | str,
    background: str = "small1",
    seed: int = 0,
    root: Path | str | None = None,
    download: bool = True,
    cache: Path | str | None = None,
) -> dict[str, Any]:
    """Write 20 seeded within-alphabet 20-way 1-shot runs to the new folder ``out``.

    Built as Lake et al. built their official runs, from the alphabets that
    ``background`` holds out (:func:`held_out_characters`; alphabets with fewer than 20
    characters are left out, as Tagalog's 17 are for 'small1'). Run ``r`` takes the
    ``r``-th of those alphabets in turn (so 'small1' gives ten runs each of Japanese
    (katakana) and Sanskrit), 20 of its characters at random, two different drawers at
    random among those who drew all 20, and copies the first drawer's drawing of each
    character to ``training/classNN.png`` (characters in name order) and the second's, in
    random order, to ``test/itemNN.png``, with ``class_labels.txt`` pairing them. Beside
    the runs, :data:`MANIFEST_FILE` records how each was drawn. Everything is written to a
    temporary folder, checked with :func:`load_runs` and renamed into place.

    Args:
        out: the folder to create (its parent must exist; ``out`` must not).
        background: 'small1', 'small2' or 'full': the set meta-training used.
        seed: seeds every choice; the same seed writes the same runs, byte for byte.
        root, download, cache: where the Omniglot zips and the cache folder are
            (see :func:`metabp.omniglot.load_archive`).

    Returns:
        The manifest (also written to ``out / MANIFEST_FILE``).

    Raises:
        ValueError: ``out`` exists or its parent does not, or a bad ``background`` or ``seed``.
        DataError: the data set is missing or no held-out alphabet has 20 characters.
    """
    out = Path(out)
    nonnegative_int("seed", seed)
    if seed >= 2**64:
        raise ValueError(f"seed must be below 2**64, got {seed}")
    if out.exists():
        raise ValueError(f"{out} exists; runs are never written over, choose a new folder")
    if not out.parent.is_dir():
        raise ValueError(f"the folder {out.parent} (where {out.name} would go) does not exist")
    archive, alphabets = held_out_characters(background, root, download, cache)
    eligible = [a for a in sorted(alphabets) if len(alphabets[a]) >= WAYS]
    if not eligible:
        raise DataError(f"no alphabet held out from {background} has {WAYS} characters for a {WAYS}-way run")
    generator = torch.Generator().manual_seed(seed)
    tmp = temp_dir(f"{out.name}.runs", out.parent)
    runs = []
    try:
        for r, name in enumerate(RUNS):
            alphabet = eligible[r % len(eligible)]
            characters = alphabets[alphabet]
            chosen = [characters[i] for i in sorted(torch.randperm(len(characters), generator=generator)[:WAYS])]
            drawers = sorted(set.intersection(*(set(files) for _, files in chosen)))
            if len(drawers) < 2:
                raise DataError(f"the characters of {alphabet} drawn for {name} share fewer than two drawers")
            first, second = (drawers[i] for i in torch.randperm(len(drawers), generator=generator)[:2])
            order = torch.randperm(WAYS, generator=generator).tolist()  # test item i shows character order[i]
            (tmp / name / "training").mkdir(parents=True)
            (tmp / name / "test").mkdir()
            for c, (_, files) in enumerate(chosen):
                shutil.copyfile(files[first], tmp / name / "training" / f"class{c + 1:02d}.png")
            lines = []
            for i, c in enumerate(order):
                shutil.copyfile(chosen[c][1][second], tmp / name / "test" / f"item{i + 1:02d}.png")
                lines.append(f"{name}/test/item{i + 1:02d}.png {name}/training/class{c + 1:02d}.png")
            (tmp / name / LABELS_FILE).write_text("\n".join(lines) + "\n")
            runs.append(
                {
                    "name": name,
                    "alphabet": alphabet,
                    "characters": [character for character, _ in chosen],
                    "training_drawer": first,
                    "test_drawer": second,
                    "answers": order,
                }
            )
        manifest = {
            "version": LAKE_RUNS_VERSION,
            "background": background,
            "seed": seed,
            "archive": archive,
            "alphabets": eligible,
            "left_out": {a: len(alphabets[a]) for a in sorted(alphabets) if a not in eligible},
            "runs": runs,
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
        load_runs(tmp)  # the layout check of the official runs, before anything is moved into place
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def read_manifest(folder: Path | str) -> dict[str, Any]:
    """The manifest :func:`make_lake_runs` wrote into ``folder``; DataError if there is none."""
    path = Path(folder) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict) or len(manifest["runs"]) != len(RUNS):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"{path} is missing or unreadable: {folder} was not written by make_lake_runs") from None
    return manifest


def lake_runs(
    background: str = "small1",
    seed: int = 0,
    root: Path | str | None = None,
    download: bool = True,
    cache: Path | str | None = None,
) -> Path:
    """The folder of the Lake-style runs of ``(background, seed)`` in the cache folder.

    It is ``<cache>/lake_runs/<background>-seed<seed>`` (``cache`` defaults to
    ``$METABP_CACHE/omniglot``), written by :func:`make_lake_runs` the first time and
    reused afterwards if its manifest says it was drawn the same way.

    Raises:
        DataError: the folder exists but holds other runs (delete it to have it written again).
    """
    one_of("background", background, tuple(BACKGROUNDS))
    nonnegative_int("seed", seed)
    folder = write_dir(cache) / "lake_runs" / f"{background}-seed{seed}"
    if not folder.exists():
        folder.parent.mkdir(exist_ok=True)
        try:
            make_lake_runs(folder, background, seed, root, download, cache)
        except OSError:
            if not folder.is_dir():  # not a concurrent call that won the race
                raise
    manifest = read_manifest(folder)
    if (manifest.get("version"), manifest.get("background"), manifest.get("seed")) != (
        LAKE_RUNS_VERSION,
        background,
        seed,
    ):
        raise DataError(f"{folder} holds other runs than {background} seed {seed}; delete it to have it written again")
    return folder
