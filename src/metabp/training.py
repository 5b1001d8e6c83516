"""Meta-training (and the ordinary-training baseline) with seeding and history."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import Tensor, nn
from tqdm import tqdm

from .bilevel import InnerLoop, get_params, make_optimizer, meta_gradient_fn, meta_step
from .checks import positive_float, positive_int
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
    """What a training run leaves behind: the loss per iteration and the wall time."""

    loss: list[float] = field(default_factory=list)
    seconds: float = 0.0

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
) -> History:
    """Meta-train ``model`` in place with MAML-style meta-steps.

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
            overhead for small models, tens of seconds of compilation first.
        step: ``step(model, optimizer, batch) -> loss`` replaces the MAML meta-step,
            for the algorithms of :mod:`metabp.variants` (Reptile, implicit MAML);
            ``inner``, ``vectorize``, ``lrs`` and ``compile`` are then up to ``step``.
        progress: show a tqdm progress bar.

    Returns:
        A :class:`History` with the meta-loss of every iteration.
    """
    positive_int("iterations", iterations)
    positive_int("meta_batch_size", meta_batch_size)
    positive_float("meta_lr", meta_lr)
    generator = seed_everything(seed)
    groups = list(model.parameters()) + ([] if lrs is None else list(lrs.values()))
    opt = make_optimizer(groups, meta_lr, optimizer)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iterations) if cosine else None
    if step is not None and (compile or lrs is not None):
        raise ValueError("step replaces the MAML meta-step; pass compile=False and lrs=None with it")
    if compile and lrs is not None:
        raise ValueError("compile=True does not support lrs (Meta-SGD); pass compile=False")
    grad_fn = meta_gradient_fn(model, inner, vectorize, compile=True) if compile else None
    history = History()
    start = time.perf_counter()
    for _ in tqdm(range(iterations), desc=desc, disable=not progress, mininterval=5.0):
        batch = sample(meta_batch_size, generator)
        if step is not None:
            history.loss.append(step(model, opt, batch))
        elif grad_fn is None:
            history.loss.append(meta_step(model, opt, batch, inner, vectorize, lrs))
        else:
            params = get_params(model)
            grads, loss = grad_fn({k: v.detach() for k, v in params.items()}, tuple(batch))
            for k, p in params.items():
                p.grad = grads[k]
            opt.step()
            history.loss.append(loss.item())
        if sched is not None:
            sched.step()
    history.seconds = time.perf_counter() - start
    return history


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
    history = History()
    start = time.perf_counter()
    for _ in tqdm(range(iterations), desc=desc, disable=not progress, mininterval=5.0):
        b = sample(batch_size, generator)
        x = torch.cat([b.x_spt, b.x_qry], 1).flatten(0, 1)
        y = torch.cat([b.y_spt, b.y_qry], 1).flatten(0, 1)
        opt.zero_grad(set_to_none=True)
        value = loss_fn(model(x), y)
        value.backward()
        opt.step()
        history.loss.append(value.item())
    history.seconds = time.perf_counter() - start
    return history
