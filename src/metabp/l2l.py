"""The same bilevel loop written with learn2learn (Arnold et al., 2020).

learn2learn wraps the model in ``l2l.algorithms.MAML``; ``clone()`` gives a
task-specific copy that stays in the autograd graph, and ``adapt(loss)`` takes an
inner gradient step on it in place. The code below mirrors
:func:`metabp.bilevel.meta_loss` line for line, so the two can be compared and a
test can prove that they produce the same meta-gradient.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from types import ModuleType

import torch
from torch import Tensor, nn

from .bilevel import resolve_loss
from .checks import nonnegative_int, positive_float
from .tasks import TaskBatch, check_task_batch

_L2L: ModuleType | None = None


def import_learn2learn() -> ModuleType:
    """Import learn2learn without the noise it makes.

    ``import learn2learn`` imports the unmaintained ``gym`` package, which prints a
    long deprecation notice on stderr and raises deprecation warnings; neither is
    useful to a reader of this book, so both are captured here, at the one place the
    project imports learn2learn.
    """
    global _L2L
    if _L2L is None:
        with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import learn2learn

        _L2L = learn2learn
    return _L2L


def wrap(model: nn.Module, inner_lr: float, first_order: bool = False) -> nn.Module:
    """Wrap ``model`` in ``l2l.algorithms.MAML`` with step size ``inner_lr``."""
    l2l = import_learn2learn()
    positive_float("inner_lr", inner_lr)
    return l2l.algorithms.MAML(model, lr=inner_lr, first_order=first_order)


def task_loss(
    maml: nn.Module,
    x_spt: Tensor,
    y_spt: Tensor,
    x_qry: Tensor,
    y_qry: Tensor,
    inner_steps: int = 1,
    loss: str = "mse",
) -> Tensor:
    """Query loss of one task after ``inner_steps`` ``adapt`` calls on a clone."""
    loss_fn = resolve_loss(loss)
    nonnegative_int("inner_steps", inner_steps)
    learner = maml.clone()
    for _ in range(inner_steps):
        learner.adapt(loss_fn(learner(x_spt), y_spt))
    return loss_fn(learner(x_qry), y_qry)


def meta_loss(maml: nn.Module, batch: TaskBatch, inner_steps: int = 1, loss: str = "mse") -> Tensor:
    """Mean post-adaptation query loss over the meta-batch, learn2learn style."""
    check_task_batch(batch)
    losses = [task_loss(maml, *task, inner_steps=inner_steps, loss=loss) for task in zip(*batch)]
    return torch.stack(losses).mean()


def meta_step(
    maml: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: TaskBatch,
    inner_steps: int = 1,
    loss: str = "mse",
) -> float:
    """One outer update with learn2learn; returns the meta-loss before the update."""
    optimizer.zero_grad(set_to_none=True)
    value = meta_loss(maml, batch, inner_steps, loss)
    value.backward()
    optimizer.step()
    return value.item()


def adapt_policy(maml: nn.Module, steps, old_logp: Tensor, estimator: str = "lvc") -> nn.Module:
    """Clone a wrapped Gaussian policy and take one inner policy-gradient step with ``adapt``.

    learn2learn's face of :func:`metabp.metarl.adapt` for one task: ``steps`` is a
    :class:`~metabp.navigation.Steps` of that task alone (no task dimension) and
    ``old_logp`` its detached log-probabilities. ``adapt`` descends the loss, so the
    loss is the negative of the inner surrogate.
    """
    from .metarl import surrogate
    from .navigation import gaussian_log_prob

    learner = maml.clone()
    logp = gaussian_log_prob(*learner(steps.obs), steps.act)
    learner.adapt(-surrogate(logp, old_logp, steps.adv, steps.mask, estimator))
    return learner
