"""Task families: each samples a meta-batch of tasks as support and query sets.

A meta-batch is a :class:`TaskBatch` of four tensors with a leading task
dimension ``B``: ``x_spt`` ``(B, K, ...)``, ``y_spt`` ``(B, K, ...)``,
``x_qry`` ``(B, Q, ...)``, ``y_qry`` ``(B, Q, ...)``.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor

from .bilevel import TaskBatch, check_task_batch  # noqa: F401  (defined with the core)
from .checks import positive_int


class TaskFamily(Protocol):
    """What samples meta-batches: ``sample(num_tasks, generator)`` gives a :class:`TaskBatch`."""

    def sample(self, num_tasks: int, generator: torch.Generator | None = None) -> TaskBatch: ...


class SinusoidTasks:
    """The sinusoid regression family of MAML (Finn et al., 2017, section 5.1).

    A task is ``y = A sin(x - phase)`` with amplitude ``A ~ U[0.1, 5.0]``,
    phase ``~ U[0, pi]`` and inputs ``x ~ U[-5, 5]``. Ranges can be moved to make
    out-of-distribution tasks (the domain-shift experiments of later chapters).

    Args:
        shots: K, support points per task.
        queries: query points per task.
        amplitude: ``(low, high)`` of the uniform amplitude distribution.
        phase: ``(low, high)`` of the uniform phase distribution.
        x_range: ``(low, high)`` of the uniform input distribution.
    """

    def __init__(
        self,
        shots: int = 10,
        queries: int = 10,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
    ) -> None:
        self.shots = positive_int("shots", shots)
        self.queries = positive_int("queries", queries)
        for name, (lo, hi) in (("amplitude", amplitude), ("phase", phase), ("x_range", x_range)):
            if not lo <= hi:
                raise ValueError(f"{name} must be a (low, high) pair with low <= high, got {(lo, hi)}")
        self.amplitude = amplitude
        self.phase = phase
        self.x_range = x_range

    def __repr__(self) -> str:
        return (
            f"SinusoidTasks(shots={self.shots}, queries={self.queries}, amplitude={self.amplitude}, "
            f"phase={self.phase}, x_range={self.x_range})"
        )

    @staticmethod
    def _uniform(
        shape: tuple[int, ...], bounds: tuple[float, float], generator: torch.Generator | None, dtype: torch.dtype
    ) -> Tensor:
        lo, hi = bounds
        return torch.rand(shape, generator=generator, dtype=dtype) * (hi - lo) + lo

    def sample_functions(
        self, num_tasks: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
    ) -> tuple[Tensor, Tensor]:
        """Draw ``num_tasks`` amplitudes and phases, each of shape ``(num_tasks, 1, 1)``."""
        positive_int("num_tasks", num_tasks)
        amp = self._uniform((num_tasks, 1, 1), self.amplitude, generator, dtype)
        phase = self._uniform((num_tasks, 1, 1), self.phase, generator, dtype)
        return amp, phase

    def sample(
        self,
        num_tasks: int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> TaskBatch:
        """Sample a meta-batch (drawn on the CPU with ``generator``, then moved to ``device``).

        Returns:
            :class:`TaskBatch` with ``x_spt, y_spt`` of shape ``(num_tasks, shots, 1)`` and
            ``x_qry, y_qry`` of shape ``(num_tasks, queries, 1)``.
        """
        amp, phase = self.sample_functions(num_tasks, generator, dtype)
        x = self._uniform((num_tasks, self.shots + self.queries, 1), self.x_range, generator, dtype)
        y = amp * torch.sin(x - phase)
        batch = TaskBatch(x[:, : self.shots], y[:, : self.shots], x[:, self.shots :], y[:, self.shots :])
        return batch if device is None else batch.to(device)

    def __call__(self, num_tasks: int, generator: torch.Generator | None = None) -> TaskBatch:
        return self.sample(num_tasks, generator)


class BlobTasks:
    """Synthetic N-way K-shot classification: Gaussian blobs around random class centres.

    A task draws ``ways`` centres from ``N(0, spread^2 I)`` in ``dim`` dimensions and
    labels ``0 .. ways-1`` (the centres are random, so a label says nothing across tasks);
    each example is its class centre plus ``N(0, noise^2 I)``. Small and fast: the right size to run the article's
    classification listing (a two-layer MLP with cross-entropy) on a laptop.

    Args:
        ways: N, classes per task (>= 2).
        shots: K, support examples per class.
        queries: query examples per class.
        dim: input dimension.
        spread: standard deviation of the class centres.
        noise: standard deviation of the examples around their centre.
    """

    def __init__(
        self,
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        dim: int = 16,
        spread: float = 1.0,
        noise: float = 0.5,
    ) -> None:
        if isinstance(ways, bool) or not isinstance(ways, int) or ways < 2:
            raise ValueError(f"ways must be an integer >= 2 (a task needs two classes), got {ways!r}")
        self.ways = ways
        self.shots = positive_int("shots", shots)
        self.queries = positive_int("queries", queries)
        self.dim = positive_int("dim", dim)
        if not spread > 0 or not noise > 0:
            raise ValueError(f"spread and noise must be > 0, got spread={spread!r}, noise={noise!r}")
        self.spread, self.noise = float(spread), float(noise)

    def sample(
        self,
        num_tasks: int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> TaskBatch:
        """``x_spt (B, ways*shots, dim)``, ``y_spt (B, ways*shots)`` int64, likewise for queries
        (drawn on the CPU with ``generator``, then moved to ``device``)."""
        positive_int("num_tasks", num_tasks)
        n, k, q = self.ways, self.shots, self.queries
        centres = self.spread * torch.randn(num_tasks, n, 1, self.dim, generator=generator, dtype=dtype)
        points = centres + self.noise * torch.randn(num_tasks, n, k + q, self.dim, generator=generator, dtype=dtype)
        labels = torch.arange(n).view(1, n, 1).expand(num_tasks, n, k + q)
        x_spt, x_qry = points[:, :, :k].flatten(1, 2), points[:, :, k:].flatten(1, 2)
        y_spt, y_qry = labels[:, :, :k].flatten(1, 2), labels[:, :, k:].flatten(1, 2)
        batch = TaskBatch(x_spt, y_spt, x_qry, y_qry)
        return batch if device is None else batch.to(device)

    def __call__(self, num_tasks: int, generator: torch.Generator | None = None) -> TaskBatch:
        return self.sample(num_tasks, generator)


class TaskPool:
    """A finite meta-training set: a fixed pool of tasks drawn once from a family.

    Task families such as :class:`SinusoidTasks` produce a new task at every call,
    as if meta-training tasks were free. A pool fixes the budget instead: ``size``
    tasks, each with the ``shots + queries`` examples the family gave it, drawn once
    (seeded). :meth:`sample` then draws a meta-batch from the pool, tasks with
    replacement, and splits each task's examples at random into a support set of
    ``shots`` and a query set of the rest, so no new task and no new example is ever
    created. The number of meta-training tasks is the knob of data efficiency.

    Args:
        family: anything with ``sample(num_tasks, generator) -> TaskBatch``.
        size: number of tasks in the pool.
        seed: seeds the one draw of the pool.

    Attributes:
        x: the pool's inputs, ``(size, shots + queries, ...)``.
        y: the pool's targets, ``(size, shots + queries, ...)``.
        shots: support examples per task (as the family's support sets).
    """

    def __init__(self, family: TaskFamily, size: int, seed: int = 0) -> None:
        self.size = positive_int("size", size)
        batch = check_task_batch(family.sample(size, torch.Generator().manual_seed(seed)))
        self.shots = batch.x_spt.shape[1]
        self.x = torch.cat([batch.x_spt, batch.x_qry], 1)
        self.y = torch.cat([batch.y_spt, batch.y_qry], 1)

    def __repr__(self) -> str:
        return f"TaskPool({self.size} tasks x {self.x.shape[1]} examples, {self.shots} shots)"

    def __len__(self) -> int:
        return self.size

    def sample(
        self, num_tasks: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> TaskBatch:
        """A meta-batch of ``num_tasks`` pool tasks, each with a random support/query split
        (moved to ``device`` if given)."""
        positive_int("num_tasks", num_tasks)
        idx = torch.randint(self.size, (num_tasks,), generator=generator)
        order = torch.rand(num_tasks, self.x.shape[1], generator=generator).argsort(1)
        rows = idx.unsqueeze(1)
        x, y = self.x[rows, order], self.y[rows, order]
        k = self.shots
        batch = TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:])
        return batch if device is None else batch.to(device)

    def __call__(self, num_tasks: int, generator: torch.Generator | None = None) -> TaskBatch:
        return self.sample(num_tasks, generator)
