"""One training loop (:func:`~metabp.training.fit`), meta-training and the ordinary-training baseline on it.

:func:`fit` is the loop every learner of the library runs: draw a batch, compute the
loss and its gradient, check both, update, schedule, record, call back, checkpoint.
:func:`meta_train` (MAML and its variants), :func:`pretrain`, the baselines of
:mod:`metabp.baselines` and :mod:`metabp.transfer`, few-shot meta-training
(:func:`metabp.fewshot.train`) and meta-RL (:func:`metabp.metarl.meta_train`) are
each a step and a sampler handed to it.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from . import checkpoint
from .bilevel import InnerLoop, get_params, make_optimizer, meta_gradient_fn, meta_loss
from .checks import check_finite, positive_float, positive_int
from .tasks import TaskBatch

Sampler = Callable[[int, torch.Generator], TaskBatch]


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy (if present) and torch; return a fresh ``torch.Generator`` seeded too."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass
    return torch.Generator().manual_seed(seed)


@dataclass
class History:
    """What a training run leaves behind.

    Attributes:
        loss: the loss of every iteration (before that iteration's update).
        seconds: wall time of the run (of all its sessions, when it was resumed).
        metrics: further values a step reports, one list per name, e.g. the mean
            returns ``before`` and ``after`` adaptation of meta-RL; each is also an
            attribute (``history.before``).
        state: after :func:`fit`, everything needed to continue the run (iteration,
            optimiser, schedule, generators, model): save it with
            :func:`metabp.checkpoint.save` and pass it back as ``resume``.
    """

    loss: list[float] = field(default_factory=list)
    seconds: float = 0.0
    metrics: dict[str, list[float]] = field(default_factory=dict)
    state: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    def __getattr__(self, name: str) -> list[float]:
        metrics: dict[str, list[float]] = self.__dict__.get("metrics") or {}
        if name in metrics:
            return metrics[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def record(self, value: Any) -> None:
        """Append one iteration's result: a loss (float or tensor) or a dict ``name -> value``
        (its ``'loss'`` goes to :attr:`loss`, the others to :attr:`metrics`)."""
        values = value if isinstance(value, Mapping) else {"loss": value}
        for name, v in values.items():
            v = v.item() if isinstance(v, Tensor) else float(v)
            (self.loss if name == "loss" else self.metrics.setdefault(name, [])).append(v)

    def smoothed(self, window: int = 100) -> list[float]:
        """Running mean of ``loss`` over ``window`` iterations (for plots)."""
        positive_int("window", window)
        out, total = [], 0.0
        for i, v in enumerate(self.loss):
            total += v
            if i >= window:
                total -= self.loss[i - window]
            out.append(total / min(i + 1, window))
        return out


def _gradients(optimizer: torch.optim.Optimizer) -> list[Tensor | None]:
    return [p.grad for group in optimizer.param_groups for p in group["params"]]


def _all_finite(tensors: list[Tensor | None]) -> bool:
    """Whether every entry of every tensor is finite: one fused check (``check_finite`` names the culprit)."""
    present = [t.detach().reshape(-1) for t in tensors if t is not None]
    if len({t.device for t in present}) > 1:
        return all(bool(torch.isfinite(t).all()) for t in present)
    return not present or bool(torch.isfinite(torch.cat(present)).all())


def _check_gradients(grads: list[Tensor | None], rates: Mapping[str, float]) -> None:
    if not _all_finite(grads):
        check_finite(0.0, grads, **rates)


def _check_values(value: Any, grads: list | None, rates: Mapping[str, float]) -> None:
    values = value.values() if isinstance(value, Mapping) else [value]
    for v in values:
        if isinstance(v, Tensor):
            v = v.detach()
            finite = math.isfinite(v.item()) if v.numel() == 1 else _all_finite([v])
        else:
            finite = math.isfinite(v)
        if not finite:
            check_finite(v, None, **rates)
    if grads is not None:
        _check_gradients(grads, rates)


def training_state(
    iteration: int,
    history: History,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    schedule: Any = None,
    model: nn.Module | None = None,
    tensors: Mapping[str, Tensor] | None = None,
) -> dict[str, Any]:
    """Everything a run depends on after ``iteration`` iterations, as a checkpoint dict.

    The model's ``state_dict`` (if given), further ``tensors`` (e.g. Meta-SGD's
    step sizes), the optimiser's and schedule's state, the task stream's generator
    and torch's global generator, and the history so far. It holds only tensors,
    numbers, lists and dicts: :func:`metabp.checkpoint.save` writes it.
    """
    state: dict[str, Any] = {
        "iteration": iteration,
        "optimizer": optimizer.state_dict(),
        "scheduler": None if schedule is None else schedule.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "loss": list(history.loss),
        "seconds": history.seconds,
    }
    if history.metrics:
        state["metrics"] = {k: list(v) for k, v in history.metrics.items()}
    if model is not None:
        state["model"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if tensors is not None:
        state["tensors"] = {k: v.detach().cpu() for k, v in tensors.items()}
    return state


def restore(
    state: Mapping[str, Any],
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    schedule: Any = None,
    model: nn.Module | None = None,
    tensors: Mapping[str, Tensor] | None = None,
) -> tuple[int, History]:
    """Load a :func:`training_state` into the run's objects; return its iteration and history."""
    try:
        if model is not None:
            model.load_state_dict(state["model"])
        if tensors is not None:
            with torch.no_grad():
                for k, v in tensors.items():
                    v.copy_(state["tensors"][k])
        optimizer.load_state_dict(state["optimizer"])
        if schedule is not None:
            schedule.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history = History(
            list(state["loss"]), float(state["seconds"]), {k: list(v) for k, v in state.get("metrics", {}).items()}
        )
        return int(state["iteration"]), history
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"resume does not hold the state of this run ({type(err).__name__}: {err})") from None


def fit(
    step: Callable[[Any], Any],
    sample: Callable[[torch.Generator], Any],
    iterations: int,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    schedule: Any = None,
    *,
    updates_itself: bool = False,
    learning_rates: Mapping[str, float] | None = None,
    callback: Callable[[int, History], None] | None = None,
    model: nn.Module | None = None,
    tensors: Mapping[str, Tensor] | None = None,
    resume: Mapping[str, Any] | None = None,
    stop_after: int | None = None,
    save: Callable[[dict[str, Any]], None] | None = None,
    save_every: int = 250,
    progress: bool = True,
    desc: str = "training",
    mininterval: float = 5.0,
) -> History:
    """The training loop that every learner of the library runs.

    Each iteration draws a batch with ``sample(generator)``, calls ``step(batch)``,
    checks what it returned and the gradients, updates with ``optimizer.step()``,
    steps the ``schedule``, records the result in the :class:`History` and calls
    ``callback``. At the first non-finite loss or gradient it raises
    :class:`~metabp.checks.DivergenceError` naming ``learning_rates``, before the
    update (and before any checkpoint is written with it).

    Args:
        step: ``step(batch) -> loss`` computes the loss and its gradient (``.backward()``
            or assigning ``.grad``) on the optimiser's parameters, after ``fit`` has set
            their gradients to ``None``; it returns the loss (float or tensor) or a dict
            ``name -> value`` (see :meth:`History.record`).
        sample: ``sample(generator) -> batch``; the only consumer of ``generator``.
        iterations: the run's length (a resumed run continues up to it).
        optimizer: the optimiser over the trained tensors.
        generator: the task stream's generator (its state is part of a checkpoint).
        schedule: a learning-rate scheduler stepped after every update, or ``None``.
        updates_itself: ``step`` calls ``optimizer.step()`` itself (several times per
            batch, or as in :func:`metabp.bilevel.meta_step`); ``fit`` then checks the
            gradients before each of those updates (an optimiser hook) and the
            returned values right after the step.
        learning_rates: named in the divergence message, e.g. ``{"inner_lr": 0.01, "meta_lr": 1e-3}``.
        callback: ``callback(iteration, history)`` after every iteration (1-based);
            it must not draw from ``generator``.
        model, tensors: saved in the run's state (``model.state_dict()`` and the named
            tensors, e.g. Meta-SGD's step sizes) and restored from ``resume``.
        resume: a :func:`training_state` (e.g. :func:`metabp.checkpoint.load` of one
            saved before) to continue from; on a CPU the resumed run ends with exactly
            the numbers of an uninterrupted one.
        stop_after: stop after this many iterations in all, as if interrupted there.
        save: ``save(state)`` is called every ``save_every`` iterations and at the end
            (e.g. ``lambda s: metabp.checkpoint.save(path, s)``).
        progress, desc, mininterval: the tqdm progress bar.

    Returns:
        The :class:`History`, whose ``state`` is the run's final :func:`training_state`.
    """
    positive_int("iterations", iterations)
    positive_int("save_every", save_every)
    if stop_after is not None:
        positive_int("stop_after", stop_after)
    rates = dict(learning_rates or {})
    history, start = History(), 0
    if resume is not None:
        start, history = restore(resume, optimizer, generator, schedule, model, tensors)
    end = iterations if stop_after is None else min(iterations, stop_after)
    hook = None
    if updates_itself:
        hook = optimizer.register_step_pre_hook(lambda opt, args, kwargs: _check_gradients(_gradients(opt), rates))
    began = time.perf_counter() - history.seconds
    bar = tqdm(
        range(start, end), initial=start, total=iterations, desc=desc, disable=not progress, mininterval=mininterval
    )
    try:
        for it in bar:
            batch = sample(generator)
            if updates_itself:
                value = step(batch)
                _check_values(value, None, rates)
            else:
                optimizer.zero_grad(set_to_none=True)
                value = step(batch)
                _check_values(value, _gradients(optimizer), rates)
                optimizer.step()
            if schedule is not None:
                schedule.step()
            history.record(value)
            history.seconds = time.perf_counter() - began
            if callback is not None:
                callback(it + 1, history)
            if save is not None and ((it + 1) % save_every == 0 or it + 1 == end):
                save(training_state(it + 1, history, optimizer, generator, schedule, model, tensors))
    finally:
        bar.close()
        if hook is not None:
            hook.remove()
    history.state = copy.deepcopy(
        training_state(max(start, end), history, optimizer, generator, schedule, model, tensors)
    )
    return history


def meta_train(
    model: nn.Module,
    sample: Sampler,
    inner: InnerLoop,
    iterations: int,
    meta_batch_size: int = 25,
    meta_lr: float = 1e-3,
    seed: int = 0,
    vectorize: bool = True,
    optimizer: str = "adam",
    cosine: bool = False,
    lrs: Mapping[str, Tensor] | None = None,
    compile: bool = False,
    step: Callable[[nn.Module, torch.optim.Optimizer, TaskBatch], float] | None = None,
    progress: bool = True,
    desc: str = "meta-training",
    callback: Callable[[int, nn.Module], None] | None = None,
    device: str | torch.device | None = None,
    resume: Mapping[str, Any] | None = None,
    stop_after: int | None = None,
    out: str | Path | None = None,
    checkpoint_every: int = 250,
) -> History:
    """Meta-train ``model`` in place with MAML-style meta-steps (on :func:`fit`).

    Args:
        model: the network whose initialisation is meta-learned.
        sample: ``sample(meta_batch_size, generator) -> TaskBatch``, e.g. a
            :class:`~metabp.tasks.SinusoidTasks`.
        inner: inner-loop settings.
        iterations: number of meta-steps.
        meta_batch_size: tasks per meta-step.
        meta_lr: outer learning rate (beta).
        seed: seeds the task stream and torch.
        vectorize: batch tasks with ``vmap`` (True) or loop over them (False).
        optimizer: outer optimiser name ('adam' by default).
        cosine: decay the meta learning rate to zero along a cosine.
        lrs: Meta-SGD step sizes to meta-learn alongside (added to the optimiser).
        compile: compute the meta-gradient with a ``torch.compile``-d pure function
            (:func:`~metabp.bilevel.meta_gradient_fn`); same numbers, much less
            overhead for small models, tens of seconds of compilation first. Where
            this machine cannot compile it, the eager path runs instead, with a warning.
        step: ``step(model, optimizer, batch) -> loss`` replaces the MAML meta-step
            and makes the update itself, for the algorithms of :mod:`metabp.variants`
            (Reptile, implicit MAML); ``inner``, ``vectorize``, ``lrs`` and ``compile``
            are then up to ``step``.
        progress: show a tqdm progress bar.
        desc: the progress bar's label.
        callback: ``callback(iteration, model)`` after every meta-step (1-based), e.g.
            to evaluate held-out tasks; it must not draw from the task stream's generator.
        device: where to train ('cpu', 'cuda'): the model (and ``lrs``, which must
            already be there) is moved there and every batch too; the task stream is
            drawn on the CPU, so the tasks are the same everywhere. ``None``: where the
            model is, batches as sampled.
        resume: a run's state (``history.state`` of an earlier, interrupted call, or
            :func:`metabp.checkpoint.load` of a file written with ``out``) to continue
            from, with the same arguments; it ends with exactly the parameters of an
            uninterrupted run (on a CPU).
        stop_after: stop after this many meta-steps in all, as if interrupted.
        out: a checkpoint file (:mod:`metabp.checkpoint`) written every
            ``checkpoint_every`` meta-steps and at the end.

    Returns:
        A :class:`History` with the meta-loss of every iteration, and in ``state``
        what ``resume`` needs.

    Raises:
        DivergenceError: the meta-loss or the meta-gradient turned non-finite
            (raised before the update, naming the learning rates).
    """
    positive_int("iterations", iterations)
    positive_int("meta_batch_size", meta_batch_size)
    positive_float("meta_lr", meta_lr)
    generator = seed_everything(seed)
    if device is not None:
        device = torch.device(device)
        model.to(device)
        if lrs is not None and any(v.device != device for v in lrs.values()):
            raise ValueError(f"lrs must be on device {device} (create them with init_lrs after moving the model)")
    groups = list(model.parameters()) + ([] if lrs is None else list(lrs.values()))
    opt = make_optimizer(groups, meta_lr, optimizer)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iterations) if cosine else None
    if step is not None and (compile or lrs is not None):
        raise ValueError("step replaces the MAML meta-step; pass compile=False and lrs=None with it")
    if compile and lrs is not None:
        raise ValueError("compile=True does not support lrs (Meta-SGD); pass compile=False")
    grad_fn = meta_gradient_fn(model, inner, vectorize, compile=True) if compile else None

    def draw(gen: torch.Generator) -> TaskBatch:
        batch = sample(meta_batch_size, gen)
        return batch if device is None else batch.to(device)

    def meta_step_gradient(batch: TaskBatch) -> Tensor:
        if grad_fn is None:
            loss = meta_loss(model, get_params(model), batch, inner, vectorize, lrs)
            loss.backward()
            return loss
        params = get_params(model)
        grads, loss = grad_fn({k: v.detach() for k, v in params.items()}, tuple(batch))
        for k, p in params.items():
            p.grad = grads[k]
        return loss

    save = None
    if out is not None:
        out = Path(out)
        save = lambda state: checkpoint.save(out, state)  # noqa: E731
    return fit(
        meta_step_gradient if step is None else (lambda batch: step(model, opt, batch)),
        draw,
        iterations,
        opt,
        generator,
        sched,
        updates_itself=step is not None,
        learning_rates={"inner_lr": inner.inner_lr, "meta_lr": meta_lr},
        callback=None if callback is None else (lambda it, _: callback(it, model)),
        model=model,
        tensors=lrs,
        resume=resume,
        stop_after=stop_after,
        save=save,
        save_every=checkpoint_every,
        progress=progress,
        desc=desc,
    )


def pretrain(
    model: nn.Module,
    sample: Sampler,
    iterations: int,
    batch_size: int = 25,
    lr: float = 1e-3,
    loss: str = "mse",
    seed: int = 0,
    progress: bool = True,
    desc: str = "pretraining",
) -> History:
    """The non-meta baseline: ordinary training on the pooled examples of many tasks.

    Each iteration samples ``batch_size`` tasks and fits all their support and query
    examples at once, as if they came from one data set (MAML's "pretrained" baseline).
    """
    from .bilevel import resolve_loss

    positive_int("iterations", iterations)
    positive_int("batch_size", batch_size)
    positive_float("lr", lr)
    loss_fn = resolve_loss(loss)
    generator = seed_everything(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def pooled_loss(b: TaskBatch) -> Tensor:
        x = torch.cat([b.x_spt, b.x_qry], 1).flatten(0, 1)
        y = torch.cat([b.y_spt, b.y_qry], 1).flatten(0, 1)
        value = loss_fn(model(x), y)
        value.backward()
        return value

    return fit(
        pooled_loss,
        lambda gen: sample(batch_size, gen),
        iterations,
        opt,
        generator,
        learning_rates={"lr": lr},
        model=model,
        progress=progress,
        desc=desc,
    )
