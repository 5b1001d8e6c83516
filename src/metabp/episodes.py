"""N-way K-shot episodes from a labelled image collection, two ways.

:class:`ImageClasses` holds a data set as one ``uint8`` tensor, classes by
drawings, so that drawing an episode is a tensor index and nothing more.
:class:`EpisodeSampler` draws episodes from it from scratch with a
``torch.Generator``; :class:`L2LEpisodeSampler` draws the same kind of episode
with learn2learn's ``TaskDataset`` and its ``NWays``, ``KShots``, ``LoadData`` and
``RemapLabels`` transforms (Arnold et al., 2020). Both return a
:class:`~metabp.tasks.TaskBatch`, so either can feed :func:`metabp.training.meta_train`.

An episode follows Vinyals et al. (2016) and MAML (Finn et al., 2017): ``ways``
classes drawn without replacement and labelled ``0 .. ways-1`` in random order,
``shots`` support and ``queries`` query drawings per class, all different.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .checks import nonnegative_int, positive_int
from .tasks import TaskBatch

ROTATIONS = (0, 90, 180, 270)


@dataclass(frozen=True)
class ImageClasses:
    """Images grouped by class: ``images[c, m]`` is drawing ``m`` of class ``c``.

    Args:
        images: ``uint8`` tensor ``(classes, drawings, height, width)``, ink high
            (0 background, 255 ink).
        names: one name per class, ``"Alphabet/character"`` for Omniglot, with
            ``"/rot90"`` (and so on) appended for rotated copies.
    """

    images: Tensor
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.images, Tensor) or self.images.dim() != 4 or self.images.dtype != torch.uint8:
            shape = tuple(self.images.shape) if isinstance(self.images, Tensor) else type(self.images).__name__
            raise ValueError(f"images must be a uint8 tensor (classes, drawings, height, width), got {shape}")
        if len(self.names) != self.images.shape[0]:
            raise ValueError(f"names must hold one name per class ({self.images.shape[0]}), got {len(self.names)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    def __repr__(self) -> str:
        c, m, h, w = self.images.shape
        return f"ImageClasses({c} classes x {m} drawings of {h}x{w}, {len(self.alphabets)} alphabets)"

    @property
    def drawings(self) -> int:
        """Drawings (examples) per class."""
        return self.images.shape[1]

    @property
    def alphabets(self) -> tuple[str, ...]:
        """The distinct alphabets (first part of the names), sorted."""
        return tuple(sorted({n.split("/")[0] for n in self.names}))

    @property
    def characters(self) -> tuple[str, ...]:
        """The distinct characters (``"Alphabet/character"``, rotations merged), sorted."""
        return tuple(sorted({"/".join(n.split("/")[:2]) for n in self.names}))

    def select(self, keep: Callable[[str], bool]) -> ImageClasses:
        """The classes whose name satisfies ``keep``."""
        idx = [i for i, n in enumerate(self.names) if keep(n)]
        return ImageClasses(self.images[idx], tuple(self.names[i] for i in idx))

    def with_rotations(self, angles: tuple[int, ...] = ROTATIONS) -> ImageClasses:
        """Every class again at each angle (multiples of 90 degrees), each a class of its own.

        This is MAML's augmentation for Omniglot (after Santoro et al., 2016): a
        character turned by 90 degrees is treated as a new character. Rotated
        copies of one class sit next to each other: class ``c`` becomes
        ``c * len(angles) + a``.
        """
        if not angles or any(a not in ROTATIONS for a in angles) or len(set(angles)) != len(angles):
            raise ValueError(f"angles must be distinct values from {ROTATIONS}, got {angles!r}")
        rotated = torch.stack([torch.rot90(self.images, a // 90, dims=(-2, -1)) for a in angles], 1)
        names = tuple(n if a == 0 else f"{n}/rot{a}" for n in self.names for a in angles)
        return ImageClasses(rotated.flatten(0, 1).contiguous(), names)

    def with_mirrors(self) -> ImageClasses:
        """Every class again mirrored left to right, as a class of its own.

        The same idea as :meth:`with_rotations`: a character's mirror image is taken
        to be another character, which doubles the classes a learner can practise on.
        Class ``c`` becomes ``2 * c`` and its mirror image ``2 * c + 1``, named
        ``"<name>/mirror"``. Mirroring twice is refused.
        """
        mirrored = [n for n in self.names if n.endswith("/mirror")]
        if mirrored:
            raise ValueError(f"these classes are mirrored already (e.g. {mirrored[0]!r}); mirror them once")
        both = torch.stack([self.images, torch.flip(self.images, dims=(-1,))], 1)
        names = tuple(n + suffix for n in self.names for suffix in ("", "/mirror"))
        return ImageClasses(both.flatten(0, 1).contiguous(), names)

    def to(self, device: torch.device | str) -> ImageClasses:
        return ImageClasses(self.images.to(device), self.names)


def rotate(classes: ImageClasses, degrees: float) -> ImageClasses:
    """Every drawing turned by ``degrees`` (counter-clockwise, bilinear, about the centre).

    Unlike :meth:`~metabp.episodes.ImageClasses.with_rotations` (multiples of 90
    degrees, each a class of its own), this keeps the classes and moves them away
    from what a learner has seen: the knob of chapter 6.2's controlled shift.
    """
    if isinstance(degrees, bool) or not isinstance(degrees, (int, float)) or not -360 <= degrees <= 360:
        raise ValueError(f"degrees must be a number from -360 to 360, got {degrees!r}")
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2.functional import rotate as tv_rotate

    c, m, h, w = classes.images.shape
    turned = tv_rotate(classes.images.reshape(c * m, 1, h, w), float(degrees), interpolation=InterpolationMode.BILINEAR)
    suffix = f"/turn{degrees:g}"
    return ImageClasses(turned.reshape(c, m, h, w).contiguous(), tuple(n + suffix for n in classes.names))


def alphabet_groups(names: tuple[str, ...]) -> tuple[tuple[str, ...], Tensor]:
    """The groups of :class:`EpisodeSampler`'s ``same_alphabet`` option, and each class's group.

    A class named ``"Alphabet/character"`` belongs to group ``"Alphabet"``; a rotated or
    turned copy (``"Alphabet/character/rot90"``) to ``"Alphabet/rot90"``, so each rotation
    of an alphabet is an alphabet of its own: its characters are told apart from one
    another at one orientation, as in Lake et al.'s within-alphabet runs.

    Returns:
        The sorted group names and an ``int64`` tensor ``(len(names),)`` of group indices.
    """
    keys = ["/".join([n.split("/")[0], *n.split("/")[2:]]) for n in names]
    groups = tuple(sorted(set(keys)))
    index = {g: i for i, g in enumerate(groups)}
    return groups, torch.tensor([index[k] for k in keys], dtype=torch.int64)


#: At ``distort=1``: the largest rotation (degrees), shear, relative change of scale and shift (pixels of 28).
DISTORTION = {"degrees": 10.0, "shear": 0.15, "scale": 0.1, "shift": 2.0}


def check_strength(strength: float) -> float:
    """Return ``strength`` if it is a number from 0 to 2 (a distortion strength), else raise ``ValueError``."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 2:
        raise ValueError(f"strength must be a number from 0 to 2, got {strength!r}")
    return strength


def distort_images(x: Tensor, strength: float, generator: torch.Generator | None = None) -> Tensor:
    """Every image of ``x`` ``(..., 1, H, W)`` through its own small random affine map.

    The map rotates by up to ``strength * 10`` degrees, shears by up to ``strength * 0.15``,
    scales each axis by a factor within ``1 +- strength * 0.1`` and shifts by up to
    ``strength * 2`` pixels per 28 (:data:`DISTORTION`), each drawn uniformly; pixels that
    come from outside the image are background (0). This is the kind of augmentation Koch
    et al. (2015) used on Omniglot: a drawing moved about as another person's hand would
    move it. ``strength=0`` returns ``x`` unchanged.
    """
    import torch.nn.functional as F

    check_strength(strength)
    if strength == 0:
        return x
    flat = x.reshape(-1, *x.shape[-3:])
    u = torch.rand(flat.shape[0], 6, generator=generator).mul_(2).sub_(1).mul_(strength).to(x.device)  # U(-s, s)
    angle = torch.deg2rad(u[:, 0] * DISTORTION["degrees"])
    shear = u[:, 1] * DISTORTION["shear"]
    sx, sy = 1 + u[:, 2] * DISTORTION["scale"], 1 + u[:, 3] * DISTORTION["scale"]
    cos, sin = torch.cos(angle), torch.sin(angle)
    # rotation @ shear @ scale, in affine_grid's coordinates (-1 .. 1 across the image)
    a = torch.stack(
        [torch.stack([cos * sx, (cos * shear - sin) * sy], -1), torch.stack([sin * sx, (sin * shear + cos) * sy], -1)],
        1,
    )
    shift = u[:, 4:] * (2 * DISTORTION["shift"] / 28)
    theta = torch.cat([a, shift.unsqueeze(-1)], -1)
    grid = F.affine_grid(theta, list(flat.shape), align_corners=False)
    return F.grid_sample(flat, grid, mode="bilinear", padding_mode="zeros", align_corners=False).reshape(x.shape)


def _check_episode(classes: ImageClasses, ways: int, shots: int, queries: int) -> None:
    if isinstance(ways, bool) or not isinstance(ways, int) or not 2 <= ways <= len(classes):
        raise ValueError(f"ways must be an integer from 2 to the number of classes ({len(classes)}), got {ways!r}")
    positive_int("shots", shots)
    nonnegative_int("queries", queries)
    if shots + queries > classes.drawings:
        raise ValueError(
            f"shots + queries must be at most the drawings per class ({classes.drawings}), "
            f"got shots={shots}, queries={queries}"
        )


def _to_float(images: Tensor) -> Tensor:
    """``uint8 (..., H, W)`` to ``float32 (..., 1, H, W)`` in [0, 1]."""
    return images.unsqueeze(-3).float().div_(255.0)


class EpisodeSampler:
    """N-way K-shot episodes drawn from scratch with tensor indexing.

    Args:
        classes: the classes to draw from (one split; see :mod:`metabp.omniglot`).
        ways: N, classes per episode.
        shots: K, support drawings per class.
        queries: query drawings per class.
        same_alphabet: draw all N classes of a task from one alphabet, chosen uniformly
            among the alphabets with at least N classes (:func:`alphabet_groups`: each
            rotation of an alphabet counts as an alphabet of its own, so a task's
            characters share an alphabet and an orientation), as in Lake et al.'s
            within-alphabet one-shot runs. Smaller alphabets are left out
            (``alphabets`` lists the ones drawn from).
        distort: strength of a small random affine distortion of every drawing
            (:func:`distort_images`), from 0 (none, the default) to 2. Its random numbers
            are drawn after the episode's, so the classes and drawings do not change.

    ``sample(num_tasks, generator)`` returns a :class:`~metabp.tasks.TaskBatch` with
    ``x_spt (B, N*K, 1, H, W)`` float in [0, 1], ``y_spt (B, N*K)`` int64 (class-major:
    ``0, .., 0, 1, ..``), and likewise ``x_qry (B, N*Q, 1, H, W)``, ``y_qry (B, N*Q)``.
    The episode's classes (indices into ``classes``) of the last call are kept in
    ``last_classes`` ``(B, N)``, for tests and figures.
    """

    def __init__(
        self,
        classes: ImageClasses,
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        same_alphabet: bool = False,
        distort: float = 0.0,
    ) -> None:
        _check_episode(classes, ways, shots, queries)
        if not isinstance(same_alphabet, bool):
            raise ValueError(f"same_alphabet must be True or False, got {same_alphabet!r}")
        if isinstance(distort, bool) or not isinstance(distort, (int, float)) or not 0 <= distort <= 2:
            raise ValueError(f"distort must be a number from 0 to 2, got {distort!r}")
        self.classes, self.ways, self.shots, self.queries = classes, ways, shots, queries
        self.same_alphabet, self.distort = same_alphabet, float(distort)
        self.last_classes: Tensor | None = None
        self.alphabets: tuple[str, ...] = ()
        if same_alphabet:
            groups, self._group = alphabet_groups(classes.names)
            sizes = torch.bincount(self._group, minlength=len(groups))
            self._eligible = torch.nonzero(sizes >= ways).flatten()
            self.alphabets = tuple(groups[i] for i in self._eligible.tolist())
            if not self.alphabets:
                raise ValueError(
                    f"same_alphabet needs an alphabet with at least ways={ways} classes; the largest of "
                    f"{len(groups)} has {int(sizes.max())}"
                )

    def __repr__(self) -> str:
        within = ", one alphabet per task" if self.same_alphabet else ""
        within += f", distorted ({self.distort:g})" if self.distort else ""
        return f"EpisodeSampler({self.ways}-way {self.shots}-shot, {self.queries} queries{within}, {self.classes!r})"

    def sample(self, num_tasks: int, generator: torch.Generator | None = None) -> TaskBatch:
        positive_int("num_tasks", num_tasks)
        n, k, q = self.ways, self.shots, self.queries
        c, m = len(self.classes), self.classes.drawings
        # A random permutation per row is argsort of uniform noise; its first
        # entries are a uniform draw without replacement.
        noise = torch.rand(num_tasks, c, generator=generator)
        if self.same_alphabet:  # classes outside the task's alphabet sort last
            alphabet = self._eligible[torch.randint(len(self._eligible), (num_tasks,), generator=generator)]
            noise += (self._group.unsqueeze(0) != alphabet.unsqueeze(1)).float()
        cls = noise.argsort(1)[:, :n]
        drawing = torch.rand(num_tasks, n, m, generator=generator).argsort(2)[..., : k + q]
        self.last_classes = cls
        device = self.classes.images.device
        x = _to_float(self.classes.images[cls.unsqueeze(-1).to(device), drawing.to(device)])  # (B, N, K+Q, 1, H, W)
        x = distort_images(x, self.distort, generator)
        y = torch.arange(n, device=device).view(1, n, 1).expand(num_tasks, n, k + q)
        return TaskBatch(
            x[:, :, :k].flatten(1, 2), y[:, :, :k].flatten(1, 2), x[:, :, k:].flatten(1, 2), y[:, :, k:].flatten(1, 2)
        )

    def __call__(self, num_tasks: int, generator: torch.Generator | None = None) -> TaskBatch:
        return self.sample(num_tasks, generator)


class _Drawings(torch.utils.data.Dataset):
    """The drawings of :class:`ImageClasses` as a flat map-style data set of ``(image, label)``."""

    def __init__(self, classes: ImageClasses) -> None:
        self.classes = classes

    def __len__(self) -> int:
        return len(self.classes) * self.classes.drawings

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        c, m = divmod(index, self.classes.drawings)
        return _to_float(self.classes.images[c, m]), c


class L2LEpisodeSampler:
    """The same episodes through learn2learn's ``TaskDataset`` (Arnold et al., 2020).

    The task transforms are learn2learn's own: ``NWays`` picks the classes,
    ``KShots`` keeps ``shots + queries`` drawings of each, ``LoadData`` loads them and
    ``RemapLabels`` relabels the classes ``0 .. ways-1`` in random order. The first
    ``shots`` drawings of each class become the support set. learn2learn draws with
    Python's ``random`` module; :meth:`sample` seeds it from ``generator`` and puts
    the global state back afterwards, so the stream is reproducible and leaves other
    code's randomness alone.

    Arguments and return value as :class:`EpisodeSampler`.
    """

    def __init__(self, classes: ImageClasses, ways: int = 5, shots: int = 1, queries: int = 15) -> None:
        from .faces import import_learn2learn

        _check_episode(classes, ways, shots, queries)
        l2l = import_learn2learn()
        self.classes, self.ways, self.shots, self.queries = classes, ways, shots, queries
        m = classes.drawings
        meta = l2l.data.MetaDataset(_Drawings(classes), indices_to_labels={i: i // m for i in range(len(classes) * m)})
        transforms = [
            l2l.data.transforms.NWays(meta, n=ways),
            l2l.data.transforms.KShots(meta, k=shots + queries),
            l2l.data.transforms.LoadData(meta),
            l2l.data.transforms.RemapLabels(meta),
        ]
        with warnings.catch_warnings():
            # learn2learn 0.2 marks TaskDataset deprecated in favour of its alias Taskset;
            # the name used here is the one its documentation teaches.
            warnings.simplefilter("ignore", DeprecationWarning)
            self.taskset = l2l.data.TaskDataset(meta, task_transforms=transforms, num_tasks=-1)

    def __repr__(self) -> str:
        return f"L2LEpisodeSampler({self.ways}-way {self.shots}-shot, {self.queries} queries, {self.classes!r})"

    def _split(self, x: Tensor, y: Tensor) -> tuple[Tensor, ...]:
        n, k = self.ways, self.shots
        order = torch.argsort(y, stable=True)
        x = x[order].view(n, k + self.queries, *x.shape[1:])
        y = y[order].view(n, k + self.queries)
        return x[:, :k].flatten(0, 1), y[:, :k].flatten(), x[:, k:].flatten(0, 1), y[:, k:].flatten()

    def sample(self, num_tasks: int, generator: torch.Generator | None = None) -> TaskBatch:
        positive_int("num_tasks", num_tasks)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        state = random.getstate()
        random.seed(seed)
        try:
            tasks = [self._split(*self.taskset.sample()) for _ in range(num_tasks)]
        finally:
            random.setstate(state)
        return TaskBatch(*(torch.stack(parts) for parts in zip(*tasks, strict=True)))

    def __call__(self, num_tasks: int, generator: torch.Generator | None = None) -> TaskBatch:
        return self.sample(num_tasks, generator)
