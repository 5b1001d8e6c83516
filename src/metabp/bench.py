"""``python -m metabp bench``: the same MAML meta-step, timed across implementations.

Every implementation computes the meta-gradient of one fixed meta-batch at one
fixed initialisation (same seed, same data): this library from scratch
(:func:`metabp.bilevel.meta_gradient` with a Python loop over tasks, backpropagated
at once or task by task, or with ``vmap``, and :func:`metabp.bilevel.meta_gradient_fn` under ``torch.compile``),
the library faces of :mod:`metabp.faces` (learn2learn, higher, TorchOpt), and
the article's listing (:func:`metabp.listing.article_meta_step`), which computes
no meta-gradient and is a time reference only. Two plain forward and backward
passes over the same inputs, all at once and one task at a time, give the floor.

The protocol:

1. **check**, in float64: each implementation is built on a float64 copy of the
   problem and its meta-gradient compared with the looped from-scratch one
   (largest absolute difference relative to the largest entry, at most
   :data:`TOLERANCE`). Float64 is what makes the check sharp: in float32 the
   second-order Conv4 meta-gradient is ill-conditioned (at meta-batch 32 every
   float32 implementation here is about 2e-3 of the largest entry away from the
   float64 value, and two correct ones that use different batch-norm kernels
   differ by 4e-4), so a float32 comparison cannot tell rounding from a bug; in
   float64 correct implementations agree to about 1e-14 while the vmap batch-norm
   bug below shows up at 1e-3. An implementation that differs is reported and left
   out of the summary line;
2. **time**, in float32, on fresh builds: a first call (which compiles where
   ``torch.compile`` is used; reported, not timed), then ``warmup`` further calls
   and ``repeats`` rounds, each timing every
   implementation once in turn (so a change of machine load hits all alike);
   median and minimum per implementation;
   The first call also counts the floating-point operations of matrix products and
   convolutions (``torch.utils.flop_counter``): the ratio of a meta-step's count to the
   floor's is the time ratio it would have if both ran their arithmetic equally fast;
3. **memory**: the peak growth of the process's resident memory (``VmHWM``
   after resetting it through ``/proc/self/clear_refs``) during one more call,
   with glibc told to return every freed block of 64 KiB or more to the system,
   so that the figure is the memory the step itself touches; on CUDA, the peak of
   ``torch.cuda.max_memory_allocated`` above what was allocated before.

Ratios are medians divided by learn2learn's median, and by the faster floor's.
The report ends with one line per configuration for the fastest path of this
library: ``CONFIG ratio_vs_learn2learn: X ratio_vs_floor: Y``.
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypedDict

import torch
from torch import nn

from .bilevel import InnerLoop, Params, get_params, max_abs_difference, meta_gradient, meta_gradient_fn
from .checks import nonnegative_int, positive_int
from .convnet import vmap_safe
from .costs import peak_memory, prepare_memory_measurement
from .tasks import SinusoidTasks, TaskBatch

Step = Callable[[], "Params | None"]


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark problem.

    Args:
        name: 'sinusoid' (MAML's 1-40-40-1 regressor, K = 10 support and 10 query
            points, meta-batch 25, inner step 0.01), 'omniglot' (MAML's Conv4,
            5-way 1-shot with 15 queries per class, meta-batch 16, inner step 0.4) or
            'omniglot-chapter' (the Conv4 chapter 6.1 trains, :class:`metabp.fewshot.FewShotConfig`'s
            defaults: 32 filters, 20-way 1-shot with 1 query per class, meta-batch 8,
            inner step 0.4); the Conv4s on random 28x28 binary images: the arithmetic
            does not depend on the pixels.
        meta_batch_size: tasks per meta-step (default: the configuration's).
        inner_steps: inner gradient steps.
        first_order: first-order MAML instead of second order.
        width: hidden units per layer (sinusoid, default 40) or filters per
            convolution (omniglot 64, omniglot-chapter 32).
    """

    name: str
    meta_batch_size: int | None = None
    inner_steps: int = 1
    first_order: bool = False
    width: int | None = None

    def __post_init__(self) -> None:
        if self.name not in CONFIGS:
            raise ValueError(f"config must be one of {tuple(CONFIGS)}, got {self.name!r}")
        if self.meta_batch_size is not None:
            positive_int("meta_batch_size", self.meta_batch_size)
        positive_int("inner_steps", self.inner_steps)
        if self.width is not None:
            positive_int("width", self.width)

    @property
    def tasks(self) -> int:
        return self.meta_batch_size or CONFIGS[self.name]["meta_batch_size"]

    def describe(self) -> str:
        order = "first order" if self.first_order else "second order"
        d = CONFIGS[self.name]
        return (
            f"{self.name}: {d['what']} (width {self.width or d['width']}), meta-batch {self.tasks}, "
            f"{self.inner_steps} inner step(s) of {d['inner_lr']}, {order}"
        )


class _Defaults(TypedDict):
    what: str
    meta_batch_size: int
    width: int
    inner_lr: float


CONFIGS: dict[str, _Defaults] = {
    "sinusoid": _Defaults(what="MLP 1-W-W-1, K = 10, 10 queries", meta_batch_size=25, width=40, inner_lr=0.01),
    "omniglot": _Defaults(what="Conv4, 5-way 1-shot, 15 queries per class", meta_batch_size=16, width=64, inner_lr=0.4),
    "omniglot-chapter": _Defaults(
        what="Conv4, 20-way 1-shot, 1 query per class (chapter 6.1)", meta_batch_size=8, width=32, inner_lr=0.4
    ),
}
#: (ways, shots, queries per class) of the Conv4 configurations' episodes.
EPISODES: dict[str, tuple[int, int, int]] = {"omniglot": (5, 1, 15), "omniglot-chapter": (20, 1, 1)}


@dataclass
class Problem:
    """A model, its meta-batch, the inner loop and a factory for fresh copies of the model."""

    model: nn.Module
    batch: TaskBatch
    inner: InnerLoop
    make_model: Callable[[], nn.Module]


def make_problem(
    config: BenchConfig, seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Problem:
    """The seeded model and meta-batch of ``config`` on ``device``, in ``dtype``
    (the same values in float32 and float64, up to rounding)."""
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    from .convnet import Conv4
    from .models import SineNet

    d = CONFIGS[config.name]
    width = config.width or d["width"]
    generator = torch.Generator().manual_seed(seed)
    inner = InnerLoop(
        "mse" if config.name == "sinusoid" else "cross_entropy", d["inner_lr"], config.inner_steps, config.first_order
    )
    if config.name == "sinusoid":
        batch = SinusoidTasks(shots=10, queries=10).sample(config.tasks, generator)

        def make_model() -> nn.Module:
            return SineNet(width).to(device, dtype)
    else:
        (ways, shots, queries), b = EPISODES[config.name], config.tasks
        images = (torch.rand(b, ways * (shots + queries), 1, 28, 28, generator=generator) < 0.2).float()
        labels = torch.arange(ways).repeat_interleave(shots + queries).expand(b, -1)
        # support first, then queries, class-major within each (as metabp.episodes)
        spt = torch.arange(ways) * (shots + queries)
        qry = torch.tensor([c * (shots + queries) + shots + q for c in range(ways) for q in range(queries)])
        batch = TaskBatch(images[:, spt], labels[:, spt], images[:, qry], labels[:, qry])

        def make_model() -> nn.Module:
            return Conv4(ways, width).to(device, dtype)

    torch.manual_seed(seed)
    model = make_model()
    batch = TaskBatch(*(t.to(device, dtype) if t.is_floating_point() else t.to(device) for t in batch))
    return Problem(model, batch, inner, make_model)


# ----------------------------------------------------------------- implementations


def _fresh(problem: Problem) -> nn.Module:
    return copy.deepcopy(problem.model)


def _metabp_loop(problem: Problem) -> Step:
    model = _fresh(problem)
    return lambda: meta_gradient(model, problem.batch, problem.inner, vectorize=False)


def _metabp_per_task(problem: Problem) -> Step:
    model = _fresh(problem)
    return lambda: meta_gradient(model, problem.batch, problem.inner, per_task=True)


def _vmap_model(problem: Problem) -> nn.Module:
    """The model for the vmap paths: built-in batch norms swapped for
    :class:`~metabp.convnet.TaskBatchNorm2d` (same values), because vmap's second
    derivatives of ``nn.BatchNorm2d`` are wrong in this torch (pytorch/functorch#534)."""
    model = _fresh(problem)
    return vmap_safe(model) if _has_batch_norm(model) else model


def _metabp_vmap(problem: Problem) -> Step:
    model = _vmap_model(problem)
    return lambda: meta_gradient(model, problem.batch, problem.inner, vectorize=True)


def _metabp_compiled(problem: Problem) -> Step:
    model = _vmap_model(problem)
    fn = meta_gradient_fn(model, problem.inner, vectorize=True, compile=True)
    params = {k: v.detach() for k, v in get_params(model).items()}
    batch = tuple(problem.batch)
    return lambda: fn(params, batch)[0]


def _face(name: str) -> Callable[[Problem], Step]:
    def build(problem: Problem) -> Step:
        from .faces import FACES

        model = _fresh(problem)
        return lambda: FACES[name](model, problem.batch, problem.inner)

    return build


def _listing(problem: Problem) -> Step:
    from .listing import article_meta_step

    model = _fresh(problem)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    inner = problem.inner
    loss = inner.loss
    assert isinstance(loss, str)  # make_problem names the loss

    def step() -> Params | None:
        article_meta_step(model, optimizer, problem.batch, problem.make_model, inner.inner_lr, inner.inner_steps, loss)
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        return grads or None

    return step


def _floor(per_task: bool) -> Callable[[Problem], Step]:
    """A plain forward and backward pass over every support and query input of the meta-batch."""

    def build(problem: Problem) -> Step:
        model = _fresh(problem)
        params = list(model.parameters())
        loss_fn = problem.inner.loss_fn
        b = problem.batch
        x, y = torch.cat([b.x_spt, b.x_qry], 1), torch.cat([b.y_spt, b.y_qry], 1)

        def all_at_once() -> None:
            torch.autograd.grad(loss_fn(model(x.flatten(0, 1)), y.flatten(0, 1)), params)

        def one_task_at_a_time() -> None:
            for x_t, y_t in zip(x, y, strict=True):
                torch.autograd.grad(loss_fn(model(x_t), y_t) / b.num_tasks, params)

        return one_task_at_a_time if per_task else all_at_once

    return build


@dataclass(frozen=True)
class Impl:
    name: str
    kind: str  # 'metabp', 'library', 'listing' or 'floor'
    build: Callable[[Problem], Step]


#: The implementations :func:`run` can time.
IMPLS = (
    Impl("metabp loop", "metabp", _metabp_loop),
    Impl("metabp per-task loop", "metabp", _metabp_per_task),
    Impl("metabp vmap", "metabp", _metabp_vmap),
    Impl("metabp vmap+compile", "metabp", _metabp_compiled),
    Impl("learn2learn", "library", _face("learn2learn")),
    Impl("higher", "library", _face("higher")),
    Impl("torchopt", "library", _face("torchopt")),
    Impl("article listing", "listing", _listing),
    Impl("floor (one batch)", "floor", _floor(per_task=False)),
    Impl("floor (per task)", "floor", _floor(per_task=True)),
)
REFERENCE = "metabp loop"
#: Relative difference below which two float64 meta-gradients count as the same.
TOLERANCE = 1e-9


# ----------------------------------------------------------------------- measuring


@dataclass
class Result:
    """What the benchmark found for one implementation."""

    name: str
    kind: str
    check: str = ""
    rel_diff: float | None = None
    first_call_s: float | None = None
    flops: int | None = None
    times: list[float] = field(default_factory=list)
    peak_bytes: int | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)


@dataclass
class Report:
    config: BenchConfig
    device: str
    threads: int
    results: list[Result]
    notes: list[str] = field(default_factory=list)

    def get(self, name: str) -> Result | None:
        return next((r for r in self.results if r.name == name and r.times), None)

    @property
    def floor(self) -> Result | None:
        floors = [r for r in self.results if r.kind == "floor" and r.times]
        return min(floors, key=lambda r: r.median) if floors else None

    @property
    def fastest_metabp(self) -> Result | None:
        ours = [r for r in self.results if r.kind == "metabp" and r.times and r.check.startswith("ok")]
        return min(ours, key=lambda r: r.median) if ours else None

    def ratio(self, result: Result, to: Result | None) -> float | None:
        return None if to is None else result.median / to.median


def count_flops(step: Step) -> int | None:
    """Floating-point operations of one call of ``step`` in matrix products and convolutions,
    as :class:`torch.utils.flop_counter.FlopCounterMode` counts them (elementwise work is not
    counted); ``None`` where nothing is counted (a compiled step runs outside the counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() or None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _rel_diff(got: Params, want: Params) -> float:
    return max_abs_difference(got, want, relative=True)


def run(
    config: BenchConfig,
    impls: tuple[str, ...] | None = None,
    repeats: int = 10,
    warmup: int = 2,
    device: str | torch.device = "cpu",
    compile: bool | None = None,
    memory: bool = True,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> Report:
    """Check, time and measure the implementations on ``config``; see the module docstring.

    Args:
        config: the problem.
        impls: names from :data:`~metabp.bench.IMPLS` to run (default all; the reference
            'metabp loop' is always run, for the gradient check).
        repeats: timed rounds; warmup: untimed calls before them.
        device: 'cpu' or 'cuda'.
        compile: run 'metabp vmap+compile' (default: on the sinusoid only, where
            compiling takes seconds and pays; on the Conv4 it takes minutes).
        memory: measure peak memory (after the timings).
        seed: seeds the model and the data.
        log: called with a line of progress now and then (e.g. ``print``).
    """
    positive_int("repeats", repeats)
    nonnegative_int("warmup", warmup)
    device = torch.device(device)
    names = [i.name for i in IMPLS]
    chosen = list(names) if impls is None else list(impls)
    unknown = [n for n in chosen if n not in names]
    if unknown:
        raise ValueError(f"unknown implementation(s) {unknown}; choose from {names}")
    if REFERENCE not in chosen:
        chosen.insert(0, REFERENCE)
    notes = []
    if compile is None:
        compile = config.name == "sinusoid"
        if not compile and "metabp vmap+compile" in chosen:
            notes.append(
                "metabp vmap+compile: skipped (compiling the vmapped second-order Conv4 step takes "
                "minutes on a CPU and did not run faster than eager vmap here; --compile on runs it)"
            )
    if not compile and "metabp vmap+compile" in chosen:
        chosen.remove("metabp vmap+compile")
    say = log or (lambda _: None)
    results, builds = [], {}
    check_problem = make_problem(config, seed, device, torch.float64)
    for impl in (i for i in IMPLS if i.name in chosen):
        result = Result(impl.name, impl.kind)
        try:
            builds[impl.name] = impl.build(check_problem)
        except ImportError as err:
            result.check = f"skipped: {err}"
        results.append(result)

    # 1. check, in float64
    reference = None
    for result in results:
        if result.name not in builds:
            continue
        say(f"  checking {result.name} (float64)")
        grads = builds[result.name]()
        if result.kind == "floor":
            result.check = "(floor: no meta-gradient)"
        elif result.name == REFERENCE:
            reference = grads
            result.check = "ok (reference)"
        elif grads is None:
            result.check = "none: every .grad is None"
        else:
            assert reference is not None, f"{REFERENCE!r} is checked first"
            result.rel_diff = _rel_diff(grads, reference)
            result.check = ("ok" if result.rel_diff < TOLERANCE else "DIFFERS") + f" ({result.rel_diff:.0e})"
            if "vmap" in result.name and _has_batch_norm(check_problem.model):
                notes.append(
                    f"{result.name}: runs with metabp.convnet.TaskBatchNorm2d in place of nn.BatchNorm2d "
                    "(same values), because vmap's second derivatives of the built-in batch norm are wrong "
                    "in this torch (pytorch/functorch#534)"
                )

    timed = [r for r in results if r.name in builds]
    del builds, check_problem, reference, grads

    # 2. time, in float32: a first call (compiles where torch.compile is used), warm-up, rounds
    problem = make_problem(config, seed, device)
    builders = {i.name: i.build for i in IMPLS}
    steps = {r.name: builders[r.name](problem) for r in timed}
    for r in timed:
        start = time.perf_counter()
        steps[r.name]()
        _sync(device)
        r.first_call_s = time.perf_counter() - start
        r.flops = count_flops(steps[r.name])
    for _ in range(warmup):
        for r in timed:
            steps[r.name]()
    _sync(device)
    say(f"  timing {len(timed)} implementations, {repeats} rounds")
    for _ in range(repeats):
        for r in timed:
            start = time.perf_counter()
            steps[r.name]()
            _sync(device)
            r.times.append(time.perf_counter() - start)

    # 3. memory
    if memory:
        prepare_memory_measurement()
        for r in timed:
            r.peak_bytes = peak_memory(steps[r.name], device)
    return Report(config, str(device), torch.get_num_threads(), results, notes)


# ------------------------------------------------------------------------ reporting


def _fmt(value: float | None, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def format_report(report: Report) -> str:
    """The report as a text table, with the summary line last."""
    l2l, floor = report.get("learn2learn"), report.floor
    lines = [report.config.describe(), f"device {report.device}, {report.threads} thread(s)"]
    header = (
        f"{'implementation':23s} {'meta-gradient (float64)':26s} {'median ms':>10s} {'min ms':>9s} "
        f"{'tasks/s':>9s} {'peak MiB':>9s} {'GFLOP':>7s} {'vs l2l':>7s} {'vs floor':>8s}"
    )
    lines += [header, "-" * len(header)]
    for r in report.results:
        if not r.times:
            lines.append(f"{r.name:23s} {r.check}")
            continue
        tasks = None if r.kind == "floor" else report.config.tasks / r.median
        mib = None if r.peak_bytes is None else r.peak_bytes / 2**20
        gflop = None if r.flops is None else r.flops / 1e9
        lines.append(
            f"{r.name:23s} {r.check:26s} {1e3 * r.median:10.2f} {1e3 * r.min:9.2f} {_fmt(tasks, '9.1f'):>9s} "
            f"{_fmt(mib, '9.1f'):>9s} {_fmt(gflop, '7.3f'):>7s} {_fmt(report.ratio(r, l2l), '7.3f'):>7s} "
            f"{_fmt(report.ratio(r, floor), '8.2f'):>8s}"
        )
    compiled = report.get("metabp vmap+compile")
    if compiled is not None and compiled.first_call_s is not None:
        lines.append(f"metabp vmap+compile: first call (compilation) {compiled.first_call_s:.1f} s, not in the timings")
    lines += report.notes
    best = report.fastest_metabp
    if best is not None and floor is not None and best.flops and floor.flops:
        lines.append(
            f"counted FLOPs of {best.name} against the floor: {best.flops / floor.flops:.3f} "
            "(the ratio its time would have at the floor's arithmetic speed)"
        )
    line = summary_line(report)
    if line:
        lines.append(line)
    return "\n".join(lines)


def summary_line(report: Report) -> str | None:
    """``CONFIG ratio_vs_learn2learn: X ratio_vs_floor: Y`` for the fastest metabp path."""
    best, l2l, floor = report.fastest_metabp, report.get("learn2learn"), report.floor
    if best is None or l2l is None or floor is None:
        return None
    return (
        f"{report.config.name} ratio_vs_learn2learn: {report.ratio(best, l2l):.3f} "
        f"ratio_vs_floor: {report.ratio(best, floor):.2f}"
    )


def machine_description() -> str:
    """CPU model, core count, torch version and load average, for the report's header."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, load average {load}"
