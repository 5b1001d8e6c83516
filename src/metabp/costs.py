"""What a meta-step costs: wall time, and the memory its autograd graph keeps.

Time is measured with :func:`time_call` (median of repeated calls after a
warm-up). Memory is measured as the bytes of the tensors that autograd saves
for the backward pass, counted with ``torch.autograd.graph.saved_tensors_hooks``
by :class:`SavedTensorMeter`: unlike process-level memory readings this is
exact, deterministic and independent of the allocator.

``torch.func`` transforms (which :mod:`metabp.bilevel` uses) refuse to run
while saved-tensor hooks are installed, so :func:`meta_loss_autograd` computes
the same meta-loss with plain ``torch.autograd.grad(..., create_graph=True)``;
a test checks that its value and gradient equal :func:`metabp.bilevel.meta_loss`.
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import sys
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .bilevel import InnerLoop, Params, forward
from .checks import nonnegative_int, positive_int
from .tasks import TaskBatch, check_task_batch


def keep_freed_memory() -> bool:
    """Let glibc's ``malloc`` keep freed memory for reuse instead of giving it back to the OS.

    By default glibc returns the freed top of its heap to the operating system (and
    serves blocks above an adaptive size with ``mmap``), so a program that allocates and
    frees tensors of tens of megabytes over and over, as a meta-iteration on thousands of
    steps does, pays a page fault for every page of every new tensor. Raising the trim
    threshold to 1 GiB and fixing the ``mmap`` threshold at its largest value, 32 MiB,
    keeps those pages mapped: the process holds on to its peak memory (it does not
    return it while it runs), and on the book's 2-core test machine a meta-iteration of
    chapter 6.3 ran faster with it (same results). Process-wide, glibc only (Linux);
    elsewhere it does nothing. Returns whether both settings were accepted.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    # The mmap threshold first: setting the trim threshold freezes the adaptive mmap threshold where it is.
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # pragma: no cover - not glibc
        return None


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field_name} in /proc/self/status")


def peak_memory(step: Callable[[], Any], device: torch.device) -> int | None:
    """Peak memory in bytes that one call of ``step`` adds to what was in use before it.

    CPU: growth of the peak resident set size (Linux; None elsewhere). Call
    :func:`prepare_memory_measurement` first, so that freed blocks leave the process.
    CUDA: peak of the caching allocator's allocated bytes above the level before.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    libc = _libc()
    try:
        if libc is not None:
            libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current VmRSS
        before = _status_kib("VmRSS")
        step()
        return (_status_kib("VmHWM") - before) * 1024
    except OSError:
        return None


def prepare_memory_measurement(threshold: int = 64 * 1024) -> None:
    """Make glibc return freed blocks of ``threshold`` bytes or more to the system at once (``mallopt``).

    Without it, memory that one call frees stays in the process and hides the
    next call's peak. It makes allocation slower, so it is set after the timings,
    and it lasts for the rest of the process. Smaller tensors are still served from
    the heap and may reuse freed memory unseen: lower ``threshold`` for small models.
    """
    positive_int("threshold", threshold)
    libc = _libc()
    if libc is not None:
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, threshold)
        libc.mallopt(m_trim_threshold, 2 * threshold)


def time_call(fn: Callable[[], Any], repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in seconds, over ``repeats`` calls after ``warmup`` calls."""
    positive_int("repeats", repeats)
    nonnegative_int("warmup", warmup)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _Saved:
    """A tensor saved for backward, wrapped so that its release can be observed."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor


class SavedTensorMeter:
    """Count the bytes autograd saves for backward while the context is active.

    Every tensor an operation saves for its backward pass goes through a pack
    hook. The meter counts each underlying storage once, however many operations
    save it, and forgets it when the graph that saved it is freed (after
    ``backward()``, or when the graph is dropped). Storages of ``ignore`` tensors
    (typically the model's parameters, which exist anyway) are not counted.

    Attributes (bytes):
        live_bytes: held by the graphs built inside the context that are still alive.
        peak_bytes: the largest ``live_bytes`` seen.
        total_bytes: everything ever saved (a storage counted again if saved again after release).

    Example::

        with SavedTensorMeter(ignore=model.parameters()) as meter:
            loss = model(x).pow(2).mean()
        meter.live_bytes  # what backward() will need
    """

    def __init__(self, ignore: Iterable[Tensor] = ()) -> None:
        self._ignore = {t.untyped_storage().data_ptr() for t in ignore}
        self._count: dict[int, int] = {}
        self._bytes: dict[int, int] = {}
        self.live_bytes = 0
        self.peak_bytes = 0
        self.total_bytes = 0
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None

    def _pack(self, tensor: Tensor) -> Any:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self._ignore or storage.nbytes() == 0:
            return tensor
        self._count[key] = self._count.get(key, 0) + 1
        if self._count[key] == 1:
            self._bytes[key] = storage.nbytes()
            self.live_bytes += storage.nbytes()
            self.total_bytes += storage.nbytes()
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        handle = _Saved(tensor)
        weakref.finalize(handle, self._release, key)
        return handle

    @staticmethod
    def _unpack(packed: Any) -> Tensor:
        return packed.tensor if isinstance(packed, _Saved) else packed

    def _release(self, key: int) -> None:
        self._count[key] -= 1
        if self._count[key] == 0:
            del self._count[key]
            self.live_bytes -= self._bytes.pop(key)

    def __enter__(self) -> SavedTensorMeter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._hooks is not None
        self._hooks.__exit__(*exc)
        self._hooks = None


def graph_bytes(fn: Callable[[], Tensor], ignore: Iterable[Tensor] = ()) -> int:
    """Bytes saved for backward by the graph of ``fn()``'s result, while that result is alive."""
    with SavedTensorMeter(ignore) as meter:
        out = fn()
    live = meter.live_bytes
    del out
    return live


def meta_loss_autograd(model: nn.Module, params: Params, batch: TaskBatch, inner: InnerLoop) -> Tensor:
    """:func:`metabp.bilevel.meta_loss` written with ``torch.autograd.grad`` instead of ``torch.func``.

    Same value and same gradient (tested), but it builds an ordinary autograd graph
    and so runs under :class:`SavedTensorMeter`. Second order: the inner gradients
    are taken with ``create_graph=True``; first order (``inner.first_order``): without,
    so they enter the outer graph as constants. Tasks are processed in a Python loop.
    It does not use the core's :func:`~metabp.bilevel.inner_step` because
    ``torch.func`` transforms refuse to run under saved-tensor hooks.
    """
    check_task_batch(batch)
    loss_fn = inner.loss_fn
    losses = []
    for x_spt, y_spt, x_qry, y_qry in zip(*batch, strict=True):
        p = dict(params)
        for _ in range(inner.inner_steps):
            names = [k for k in p if inner.adapts(k)]
            support = loss_fn(forward(model, p, x_spt), y_spt)
            grads = torch.autograd.grad(support, [p[k] for k in names], create_graph=not inner.first_order)
            p = {**p, **{k: p[k] - inner.inner_lr * g for k, g in zip(names, grads, strict=True)}}
        losses.append(loss_fn(forward(model, p, x_qry), y_qry))
    return torch.stack(losses).mean()
