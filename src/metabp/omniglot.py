"""Omniglot (Lake, Salakhutdinov & Tenenbaum, 2015): files, integrity, splits.

The data set is 1623 handwritten characters from 50 alphabets, 20 drawings each,
published as zips in its official repository. This module fetches a zip when it
is absent (:func:`download_file`, with a timeout), checks its md5
(``check_integrity``), extracts it atomically (``extract_archive`` into a temporary
folder, then one rename), decodes every drawing once to 28x28 and keeps the result
as a ``uint8`` tensor cache (``<archive>_28px_<md5 prefix>.pt``, written
atomically), so that later loads are one ``torch.load``.

Where files go (:mod:`metabp.data`): zips are looked up in ``$METABP_DATA/omniglot``,
which is only ever read (it may be a shared, read-only mirror), and then in the
cache folder ``$METABP_CACHE/omniglot`` (default ``~/.cache/metabp/omniglot``).
Everything this module writes goes to the cache folder: downloads, extracted
folders (each with a manifest of its characters, checked at every load) and tensor
caches (named after the md5 of the zip they were built from). Downloads give up
after :data:`DOWNLOAD_TIMEOUT` seconds without an answer.

Splits are by alphabet (:func:`load_split`): meta-training and meta-testing never
share a character, nor a rotation of one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import torch
from PIL import Image

from .checkpoint import atomic_save
from .checks import one_of
from .data import DataError, cache_dir, dataset_dir
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
#: (alphabets, characters) of every archive, 20 drawings per character; an extracted
#: folder with fewer is incomplete. The small sets' counts are those of the zips in
#: the project's mirror; the full sets' are the published 964 and 659 characters.
COUNTS: dict[str, tuple[int, int]] = {
    "images_background": (30, 964),
    "images_evaluation": (20, 659),
    "images_background_small1": (5, 136),
    "images_background_small2": (5, 156),
}
DRAWINGS = 20
#: Side of the images in pixels by default (as in MAML and prototypical networks), and the
#: range a caller may ask for: from MIN_IMAGE_SIZE up to the drawings' own 105 pixels.
IMAGE_SIZE = 28
MIN_IMAGE_SIZE = 8
MAX_IMAGE_SIZE = 105
CACHE_VERSION = 2
#: Seconds a download waits for the server (to connect, and for each read) before it gives up.
DOWNLOAD_TIMEOUT = 60.0
#: The file, inside an extracted folder, that lists what extraction put there.
MANIFEST = ".metabp-manifest.json"


def check_image_size(size: object, name: str = "image_size") -> int:
    """``size`` if it is an integer from ``MIN_IMAGE_SIZE`` (8) to ``MAX_IMAGE_SIZE`` (105), else ValueError."""
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise ValueError(
            f"{name} must be an integer from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} pixels "
            f"(Omniglot's drawings are {MAX_IMAGE_SIZE} pixels square), got {size!r}"
        )
    return size


def archive_url(name: str) -> str:
    """The official download address of archive ``name`` (e.g. 'images_background_small1')."""
    one_of("name", name, tuple(ARCHIVES))
    return f"{BASE_URL}/{name}.zip"


def locations(root: Path | str | None = None, cache: Path | str | None = None) -> list[Path]:
    """Folders searched for downloaded files: the downloads folder, then the cache folder.

    ``root`` defaults to ``$METABP_DATA/omniglot`` (read only), ``cache`` to
    ``$METABP_CACHE/omniglot`` (:func:`write_dir`).
    """
    root = dataset_dir("omniglot") if root is None else Path(root)
    cache = cache_dir("omniglot") if cache is None else Path(cache)
    return list(dict.fromkeys(p.expanduser() for p in (root, cache)))


def write_dir(cache: Path | str | None = None) -> Path:
    """The cache folder, the only one written to (default ``$METABP_CACHE/omniglot``), created if missing."""
    folder = (cache_dir("omniglot") if cache is None else Path(cache)).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(
            f"cannot create the cache folder {folder} ({err.strerror}); set METABP_CACHE to a writable folder"
        ) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DataError(f"the cache folder {folder} cannot be written; set METABP_CACHE to a writable folder")
    return folder


_TEMP = re.compile(r"^\..+\.(download|extract|runs)-(\d+)-")


def temp_dir(prefix: str, dest: Path) -> Path:
    """A fresh temporary folder in ``dest`` named ``.<prefix>-<pid>-...``.

    Folders of this form left by a process that no longer runs (killed mid-download,
    say) are removed first, so that nothing half-written stays behind for long.
    """
    for old in dest.glob(".*"):
        found = _TEMP.match(old.name)
        if found is None or int(found.group(2)) == os.getpid():
            continue
        try:
            os.kill(int(found.group(2)), 0)
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except OSError:  # the process exists (owned by someone else)
            pass
    return Path(tempfile.mkdtemp(prefix=f".{prefix}-{os.getpid()}-", dir=dest))


def download_file(url: str, path: Path, timeout: float | None = None) -> None:
    """Stream ``url`` to the file ``path``.

    ``timeout`` (default :data:`DOWNLOAD_TIMEOUT`) bounds the wait to connect and
    each wait for more bytes. Errors are those of ``urllib`` (``URLError``, ``OSError``,
    ``TimeoutError``); :func:`download_error` words them.
    """
    timeout = DOWNLOAD_TIMEOUT if timeout is None else timeout
    request = urllib.request.Request(url, headers={"User-Agent": "metabp"})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(path, "wb") as f:
        shutil.copyfileobj(response, f, 1 << 16)


def download_error(err: BaseException, url: str) -> str:
    """What went wrong in :func:`download_file`, in a few words."""
    reason = getattr(err, "reason", err)
    if isinstance(reason, TimeoutError) or isinstance(err, TimeoutError):
        return f"no answer from the server within {DOWNLOAD_TIMEOUT:g} s"
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    return str(reason) or type(reason).__name__


def fetch_archive(
    name: str, root: Path | str | None = None, download: bool = True, cache: Path | str | None = None
) -> Path:
    """Path of the verified zip ``name``.zip, downloading it if it is absent.

    Looks in ``root`` (default ``$METABP_DATA/omniglot``), then in the cache folder
    ``cache`` (default ``$METABP_CACHE/omniglot``); a download goes to the cache folder.

    Raises:
        DataError: the zip is absent and cannot be downloaded (the message says where
            to get it and where to put it; a server that does not answer within
            :data:`DOWNLOAD_TIMEOUT` seconds counts as absent), or its md5 does not match
            (corrupt or truncated). Nothing half-written is left behind: a download goes
            to a temporary folder and is moved into place only once its md5 matches.
    """
    from torchvision.datasets.utils import check_integrity  # slow import: only when needed

    md5 = ARCHIVES[one_of("name", name, tuple(ARCHIVES))]
    filename = f"{name}.zip"
    for folder in locations(root, cache):
        path = folder / filename
        if path.exists():
            if not check_integrity(str(path), md5):
                raise DataError(
                    f"{path} is corrupt or truncated: its md5 is not {md5}. Delete it and download "
                    f"{archive_url(name)} again."
                )
            return path
    where = locations(root, cache)[0] / filename
    if not download:
        raise DataError(f"{where} is missing: download {archive_url(name)} and put it there")
    dest = write_dir(cache)
    tmp = temp_dir(f"{name}.download", dest)
    url = archive_url(name)
    try:
        download_file(url, tmp / filename)
        if not check_integrity(str(tmp / filename), md5):
            raise DataError(
                f"the file downloaded from {url} is not the published {filename} (its md5 is not "
                f"{md5}); try again, or download it yourself and put it at {where}"
            )
        os.replace(tmp / filename, dest / filename)
    except (urllib.error.URLError, OSError) as err:
        raise DataError(
            f"{filename} is not in {where.parent} and could not be downloaded from {url} "
            f"({download_error(err, url)}). Download it where there is network access and put it at {where} "
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


def _check_counts(
    name: str,
    folder: Path,
    entries: list[tuple[str, str, list[Path]]],
    hint: str = "Delete the folder to have it extracted again from its zip.",
) -> None:
    """DataError unless ``entries`` has the alphabets, characters and drawings of archive ``name``."""
    alphabets, characters = COUNTS[name]
    have = (len({a for a, _, _ in entries}), len(entries), {len(d) for _, _, d in entries})
    if have != (alphabets, characters, {DRAWINGS}):
        raise DataError(
            f"{folder} is incomplete: it holds {have[0]} alphabets and {have[1]} characters, {name}.zip "
            f"{alphabets} and {characters} of {DRAWINGS} drawings each. {hint}"
        )


def extract(name: str, zip_path: Path, dest: Path) -> Path:
    """Extract ``zip_path`` to ``dest/name`` atomically and return that folder.

    The zip is unpacked into a temporary folder next to the target, its layout and
    counts are checked, a manifest of its characters (:data:`MANIFEST`) is written
    into it, and only then is it renamed into place; a failure leaves nothing behind.
    """
    from torchvision.datasets.utils import extract_archive

    one_of("name", name, tuple(ARCHIVES))
    target = dest / name
    tmp = temp_dir(f"{name}.extract", dest)
    try:
        extract_archive(str(zip_path), str(tmp))
        entries = check_layout(tmp / name)
        _check_counts(name, zip_path, entries, "Delete it and download it again.")
        manifest = {"archive": name, "md5": ARCHIVES[name], "characters": {f"{a}/{c}": len(d) for a, c, d in entries}}
        (tmp / name / MANIFEST).write_text(json.dumps(manifest, indent=0, sort_keys=True) + "\n")
        try:
            os.replace(tmp / name, target)
        except OSError:
            if not target.is_dir():  # not a concurrent extraction that won the race
                raise
    except zipfile.BadZipFile:
        raise DataError(
            f"{zip_path} is not a valid zip (corrupt or truncated); delete it and download it again"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def check_extracted(name: str, folder: Path) -> list[tuple[str, str, list[Path]]]:
    """:func:`check_layout` of an extracted folder, checked against its manifest.

    Raises:
        DataError: the folder is not in Omniglot's layout, has no manifest (it was not
            extracted by :func:`extract`), or lacks (or adds) characters or drawings
            that its manifest lists: it names what is missing.
    """
    entries = check_layout(folder)
    redo = "Delete the folder to have it extracted again from its zip."
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        listed = {str(k): int(v) for k, v in manifest["characters"].items()}
        source = (manifest["archive"], manifest["md5"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise DataError(
            f"{folder} has no readable manifest ({MANIFEST}): it was not extracted by this "
            f"library, or not completely. {redo}"
        ) from None
    if source != (name, ARCHIVES[name]):
        raise DataError(f"{folder} was extracted from {source[0]} (md5 {source[1]}), not {name}.zip. {redo}")
    found = {f"{a}/{c}": len(d) for a, c, d in entries}
    if found != listed:
        missing = sorted(set(listed) - set(found))
        gone = sorted({k.split("/")[0] for k in listed} - {k.split("/")[0] for k in found})
        what = [
            f"{len(missing)} of its {len(listed)} characters are missing" if missing else "",
            f"(the alphabets {', '.join(gone)} entirely)" if gone else "",
            f"{len(set(found) - set(listed))} characters are not in its manifest" if set(found) - set(listed) else "",
            "characters hold other numbers of drawings than its manifest lists"
            if not missing and set(found) == set(listed)
            else "",
        ]
        raise DataError(f"{folder} is incomplete: {' '.join(w for w in what if w)}. {redo}")
    _check_counts(name, folder, entries)
    return entries


def extracted_entries(
    name: str, root: Path | str | None = None, download: bool = True, cache: Path | str | None = None
) -> list[tuple[str, str, list[Path]]]:
    """``[(alphabet, character, drawing paths)]`` of archive ``name``, extracted in the cache folder.

    Extracts the zip (fetching it first if it is absent, see :func:`fetch_archive`)
    unless the cache folder holds its extracted folder already, and checks that
    folder against its manifest (:func:`check_extracted`). The drawings' paths are
    sorted, so drawing ``m`` of a character is the file ending in ``_{m + 1:02d}.png``.
    """
    one_of("name", name, tuple(ARCHIVES))
    extracted = (cache_dir("omniglot") if cache is None else Path(cache)).expanduser() / name
    if not extracted.is_dir():
        zip_path = fetch_archive(name, root, download, cache)
        extracted = extract(name, zip_path, write_dir(cache))
    return check_extracted(name, extracted)


def decode(path: Path | str, size: int = IMAGE_SIZE) -> torch.Tensor:
    """One drawing as ``uint8 (size, size)``, ink 255 on background 0.

    Omniglot's PNGs are 105x105 black ink on white; they are resized with a
    Lanczos filter (as MAML's preprocessing does) and inverted.
    """
    with Image.open(path) as im:
        small = im.convert("L").resize((size, size), Image.Resampling.LANCZOS)
        pixels = torch.frombuffer(bytearray(small.tobytes()), dtype=torch.uint8).view(size, size)
    return 255 - pixels


def cache_file(name: str, size: int = IMAGE_SIZE, cache: Path | str | None = None) -> Path:
    """The tensor cache of archive ``name`` at ``size`` pixels, named after the zip's md5."""
    folder = cache_dir("omniglot") if cache is None else Path(cache)
    return folder.expanduser() / f"{name}_{size}px_{ARCHIVES[name][:8]}.pt"


def _read_cache(path: Path, name: str, size: int) -> ImageClasses | None:
    """The classes in a tensor cache if it was built from all of archive ``name``, else None."""
    try:
        blob = torch.load(path, weights_only=True)
        key = (blob.get("version"), blob.get("archive"), blob.get("md5"), blob.get("size"))
        if key != (CACHE_VERSION, name, ARCHIVES[name], size):
            return None
        images, names = blob["images"], tuple(blob["names"])
        alphabets, characters = COUNTS[name]
        if (
            tuple(images.shape) != (characters, DRAWINGS, size, size)
            or len(names) != characters
            or len({n.split("/")[0] for n in names}) != alphabets
        ):
            return None
        return ImageClasses(images, names)
    except Exception:  # an unreadable cache is rebuilt, not an error
        return None


def load_archive(
    name: str,
    root: Path | str | None = None,
    download: bool = True,
    size: int = IMAGE_SIZE,
    cache: Path | str | None = None,
) -> ImageClasses:
    """All characters of one archive as :class:`~metabp.episodes.ImageClasses`.

    Reads the tensor cache if there is one built from the whole archive (same md5,
    every character); otherwise finds the extracted folder in the cache folder (or
    fetches, verifies and extracts the zip), checks it against its manifest, decodes
    every drawing and writes the cache. Names are ``"Alphabet/character01"``.

    ``root`` is where zips are looked up first (default ``$METABP_DATA/omniglot``,
    never written to); ``cache`` is where extracted folders and caches are kept
    (default ``$METABP_CACHE/omniglot``).
    """
    one_of("name", name, tuple(ARCHIVES))
    check_image_size(size, "size")
    target = cache_file(name, size, cache)
    if target.exists() and (found := _read_cache(target, name, size)) is not None:
        return found
    entries = extracted_entries(name, root, download, cache)
    images = torch.stack([torch.stack([decode(p, size) for p in drawings]) for _, _, drawings in entries])
    classes = ImageClasses(images, tuple(f"{a}/{c}" for a, c, _ in entries))
    atomic_save(
        {
            "version": CACHE_VERSION,
            "archive": name,
            "md5": ARCHIVES[name],
            "size": size,
            "images": images,
            "names": list(classes.names),
        },
        target,
    )
    return classes


def load_split(
    background: str = "small1",
    part: str = "train",
    root: Path | str | None = None,
    download: bool = True,
    rotations: bool = True,
    cache: Path | str | None = None,
    size: int = IMAGE_SIZE,
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
        root: the folder of the Omniglot zips (default ``$METABP_DATA/omniglot``), only read.
        download: fetch missing zips from the official location.
        rotations: add the 90/180/270-degree rotations as classes of their own, as
            MAML does on both sides of its split (Finn et al., 2017, after Santoro et
            al., 2016). Without them the held-out tasks are harder: fewer, and more
            similar, characters to tell apart.
        cache: where extracted folders and caches are kept (default ``$METABP_CACHE/omniglot``).
        size: side of the images in pixels, from 8 to 105 (the drawings' own size; 28 by default).

    Returns:
        :class:`~metabp.episodes.ImageClasses` with images ``(C, 20, size, size)``;
        class ``4 c + a`` is character ``c`` turned by ``90 a`` degrees.
    """
    one_of("background", background, tuple(BACKGROUNDS))
    one_of("part", part, ("train", "test"))
    train_name, other_name = BACKGROUNDS[background]
    train = load_archive(train_name, root, download, size, cache)
    if part == "train":
        classes = train
    else:
        seen = set(train.alphabets)
        classes = load_archive(other_name, root, download, size, cache).select(lambda n: n.split("/")[0] not in seen)
    return classes.with_rotations() if rotations else classes
