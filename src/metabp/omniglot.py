"""Omniglot (Lake, Salakhutdinov & Tenenbaum, 2015): files, integrity, splits.

The data set is 1623 handwritten characters from 50 alphabets, 20 drawings each,
published as zips in its official repository. This module fetches a zip when it
is absent (torchvision's ``download_url``), checks its md5 (``check_integrity``),
extracts it atomically (``extract_archive`` into a temporary folder, then one
rename), decodes every drawing once to 28x28 and keeps the result as a ``uint8``
tensor cache (``<archive>_28px.pt``, written atomically), so that later loads are
one ``torch.load``.

Where files go: zips, extracted folders and caches live in
``$METABP_DATA/omniglot`` (:func:`metabp.data.dataset_dir`). If that folder is a
read-only mirror (its permission bits forbid writing, as for the project's shared
copy), what this module writes goes to a cache folder instead
(``~/.cache/metabp/omniglot``, or the system's temporary folder).

Splits are by alphabet (:func:`load_split`): meta-training and meta-testing never
share a character, nor a rotation of one.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import urllib.error
import zipfile
from pathlib import Path

import torch
from PIL import Image

from .checkpoint import atomic_save
from .checks import one_of
from .data import DEFAULT_ROOT, DataError, dataset_dir
from .episodes import ImageClasses

BASE_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
#: md5 of every archive this module can fetch (the full sets' as in torchvision).
ARCHIVES: dict[str, str] = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
    "images_background_small1": "e704a628b5459e08445c13499850abc4",
    "images_background_small2": "b75a71a51d3b13f821f212756fe481fd",
}
#: background name -> (meta-training archive, archive whose other alphabets are held out).
BACKGROUNDS: dict[str, tuple[str, str]] = {
    "small1": ("images_background_small1", "images_background_small2"),
    "small2": ("images_background_small2", "images_background_small1"),
    "full": ("images_background", "images_evaluation"),
}
IMAGE_SIZE = 28
CACHE_VERSION = 1


def archive_url(name: str) -> str:
    """The official download address of archive ``name`` (e.g. 'images_background_small1')."""
    one_of("name", name, tuple(ARCHIVES))
    return f"{BASE_URL}/{name}.zip"


def _writable(folder: Path) -> bool:
    """Whether ``folder`` (or, if missing, its nearest existing parent) may be written.

    A folder whose permission bits grant nobody write access is a read-only
    mirror, and is left alone even by a user (root) whom the bits do not stop.
    """
    p = folder
    while not p.exists():
        if p.parent == p:
            return False
        p = p.parent
    mode = p.stat().st_mode
    return os.access(p, os.W_OK) and bool(mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def locations(root: Path | str | None = None) -> list[Path]:
    """Folders searched for Omniglot files, the first writable one last written to.

    ``root`` (default ``$METABP_DATA/omniglot``) first, then the cache folders.
    """
    root = dataset_dir("omniglot") if root is None else Path(root)
    out = [root, DEFAULT_ROOT / "omniglot", Path(tempfile.gettempdir()) / f"metabp-{os.getuid()}" / "omniglot"]
    return list(dict.fromkeys(p.expanduser() for p in out))


def write_dir(root: Path | str | None = None) -> Path:
    """The first writable folder of :func:`locations` (created if missing)."""
    for p in locations(root):
        if _writable(p):
            p.mkdir(parents=True, exist_ok=True)
            return p
    raise DataError(f"none of {[str(p) for p in locations(root)]} can be written; set METABP_DATA to a writable folder")


def fetch_archive(name: str, root: Path | str | None = None, download: bool = True) -> Path:
    """Path of the verified zip ``name``.zip, downloading it if it is absent.

    Raises:
        DataError: the zip is absent and cannot be downloaded (the message says where
            to get it and where to put it), or its md5 does not match (corrupt or
            truncated). Nothing half-written is left behind: a download goes to a
            temporary folder and is moved into place only once its md5 matches.
    """
    from torchvision.datasets.utils import check_integrity, download_url  # slow import: only when needed

    md5 = ARCHIVES[one_of("name", name, tuple(ARCHIVES))]
    filename = f"{name}.zip"
    for folder in locations(root):
        path = folder / filename
        if path.exists():
            if not check_integrity(str(path), md5):
                raise DataError(
                    f"{path} is corrupt or truncated: its md5 is not {md5}. Delete it and download "
                    f"{archive_url(name)} again."
                )
            return path
    where = locations(root)[0] / filename
    if not download:
        raise DataError(f"{where} is missing: download {archive_url(name)} and put it there")
    dest = write_dir(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.download-", dir=dest))
    try:
        download_url(archive_url(name), str(tmp), filename, md5)
        os.replace(tmp / filename, dest / filename)
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        reason = getattr(err, "reason", err)
        raise DataError(
            f"{filename} is not in {where.parent} and could not be downloaded from {archive_url(name)} "
            f"({reason}). Download it where there is network access and put it at {where} "
            f"(or set METABP_DATA to the folder above an 'omniglot' folder that holds it)."
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest / filename


def check_layout(folder: Path) -> list[tuple[str, str, list[Path]]]:
    """``[(alphabet, character, drawing paths)]`` of an extracted Omniglot folder.

    The layout is ``folder/<alphabet>/<character>/<drawing>.png``, as in the zips.

    Raises:
        DataError: the folder is missing or not in that layout, naming what is wrong.
    """
    def wrong(what: str) -> DataError:
        return DataError(
            f"{folder} is not in Omniglot's layout <alphabet>/<character>/<drawing>.png: {what}. "
            "Delete the folder to have it extracted again from its zip."
        )

    if not folder.is_dir():
        raise wrong("the folder does not exist")
    out = []
    alphabets = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    if not alphabets:
        raise wrong("it is empty")
    for alphabet in alphabets:
        if not alphabet.is_dir():
            raise wrong(f"{alphabet.name} is a file where an alphabet folder should be")
        characters = sorted(p for p in alphabet.iterdir() if not p.name.startswith("."))
        if not characters or not all(c.is_dir() for c in characters):
            raise wrong(f"{alphabet.name} must hold character folders only")
        for character in characters:
            drawings = sorted(character.glob("*.png"))
            if not drawings:
                raise wrong(f"{alphabet.name}/{character.name} holds no .png drawings")
            out.append((alphabet.name, character.name, drawings))
    counts = {len(d) for _, _, d in out}
    if len(counts) != 1:
        raise wrong(f"characters hold different numbers of drawings ({sorted(counts)})")
    return out


def extract(name: str, zip_path: Path, dest: Path) -> Path:
    """Extract ``zip_path`` to ``dest/name`` atomically and return that folder.

    The zip is unpacked into a temporary folder next to the target, its layout is
    checked, and only then is it renamed into place; a failure leaves nothing behind.
    """
    from torchvision.datasets.utils import extract_archive

    target = dest / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.extract-", dir=dest))
    try:
        extract_archive(str(zip_path), str(tmp))
        check_layout(tmp / name)
        try:
            os.replace(tmp / name, target)
        except OSError:
            if not target.is_dir():  # not a concurrent extraction that won the race
                raise
    except zipfile.BadZipFile:
        raise DataError(f"{zip_path} is not a valid zip (corrupt or truncated); delete it and download it again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def decode(path: Path | str, size: int = IMAGE_SIZE) -> torch.Tensor:
    """One drawing as ``uint8 (size, size)``, ink 255 on background 0.

    Omniglot's PNGs are 105x105 black ink on white; they are resized with a
    Lanczos filter (as MAML's preprocessing does) and inverted.
    """
    with Image.open(path) as im:
        im = im.convert("L").resize((size, size), Image.Resampling.LANCZOS)
        pixels = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size)
    return 255 - pixels


def _read_cache(path: Path, size: int) -> ImageClasses | None:
    try:
        blob = torch.load(path, weights_only=True)
        if blob.get("version") != CACHE_VERSION or blob["images"].shape[-1] != size:
            return None
        return ImageClasses(blob["images"], tuple(blob["names"]))
    except Exception:  # an unreadable cache is rebuilt, not an error
        return None


def load_archive(name: str, root: Path | str | None = None, download: bool = True, size: int = IMAGE_SIZE) -> ImageClasses:
    """All characters of one archive as :class:`~metabp.episodes.ImageClasses`.

    Reads the tensor cache if there is one; otherwise finds the extracted folder
    (or fetches, verifies and extracts the zip), decodes every drawing and writes
    the cache. Names are ``"Alphabet/character01"``.
    """
    one_of("name", name, tuple(ARCHIVES))
    cache_name = f"{name}_{size}px.pt"
    for folder in locations(root):
        if (folder / cache_name).exists() and (found := _read_cache(folder / cache_name, size)) is not None:
            return found
    extracted = next((f / name for f in locations(root) if (f / name).is_dir()), None)
    if extracted is None:
        zip_path = fetch_archive(name, root, download)
        extracted = extract(name, zip_path, write_dir(root))
    entries = check_layout(extracted)
    images = torch.stack([torch.stack([decode(p, size) for p in drawings]) for _, _, drawings in entries])
    classes = ImageClasses(images, tuple(f"{a}/{c}" for a, c, _ in entries))
    cache_dir = extracted.parent if _writable(extracted.parent) else write_dir(root)
    atomic_save({"version": CACHE_VERSION, "images": images, "names": list(classes.names)}, cache_dir / cache_name)
    return classes


def load_split(
    background: str = "small1",
    part: str = "train",
    root: Path | str | None = None,
    download: bool = True,
    rotations: bool = True,
) -> ImageClasses:
    """The meta-training or meta-testing classes of a background split, by alphabet.

    Args:
        background: 'small1' or 'small2' (Lake et al.'s minimal background sets, five
            alphabets each) or 'full' (the 30 background alphabets).
        part: 'train' gives the background archive's characters. 'test' gives the
            held-out alphabets: for 'small1' the alphabets of small2 that small1 lacks
            (Japanese (katakana), Sanskrit, Tagalog), for 'small2' those of small1 that
            small2 lacks (Balinese, Early Aramaic, Korean), for 'full' the 20
            evaluation alphabets. Greek and Latin, in both small sets, are never held out.
        root: the Omniglot folder (default ``$METABP_DATA/omniglot``).
        download: fetch missing zips from the official location.
        rotations: add the 90/180/270-degree rotations as classes of their own, as
            MAML does on both sides of its split (Finn et al., 2017, after Santoro et
            al., 2016). Without them the held-out tasks are harder: fewer, and more
            similar, characters to tell apart.

    Returns:
        :class:`~metabp.episodes.ImageClasses` with images ``(C, 20, 28, 28)``;
        class ``4 c + a`` is character ``c`` turned by ``90 a`` degrees.
    """
    one_of("background", background, tuple(BACKGROUNDS))
    one_of("part", part, ("train", "test"))
    train_name, other_name = BACKGROUNDS[background]
    train = load_archive(train_name, root, download)
    if part == "train":
        classes = train
    else:
        seen = set(train.alphabets)
        classes = load_archive(other_name, root, download).select(lambda n: n.split("/")[0] not in seen)
    return classes.with_rotations() if rotations else classes
