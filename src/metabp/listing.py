"""The article's code listing (its section 5.1), reconstructed, and its repair.

:func:`article_meta_step` keeps the listing's mechanism exactly, in this
project's own code: for every task a *fresh* model is built and filled with the
meta-learner's weights by ``load_state_dict``, trained on the support set with an
in-place ``torch.optim.SGD`` loop, and scored on the query set; the scores are
averaged, ``meta_loss.backward()`` is called and ``meta_optimizer.step()`` runs.

It runs without an error and still learns nothing. ``load_state_dict`` copies
*values*: the task model's parameters are new leaf tensors with no autograd link
to the meta-learner, and the in-place SGD steps would cut any link anyway. The
backward pass therefore fills the task models' ``.grad`` and leaves every
meta-parameter's ``.grad`` at ``None``; Adam skips parameters without gradients,
so ``meta_optimizer.step()`` changes nothing.

:func:`corrected_meta_step` is the smallest repair that keeps the listing's
shape: no copy, the adapted weights are computed *from* the meta-parameters with
``torch.autograd.grad(..., create_graph=True)``, and the model is evaluated at
them with ``functional_call``. It computes the MAML meta-gradient, the same one
as :func:`metabp.bilevel.meta_loss`.

Neither uses the core's :func:`~metabp.bilevel.inner_step`, deliberately: the
first is the article's code as written, the second its smallest repair, and both
are shown to the reader as such.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

from .bilevel import resolve_loss
from .checks import nonnegative_int, positive_float
from .tasks import TaskBatch, check_task_batch


def article_meta_step(
    meta_learner: nn.Module,
    meta_optimizer: torch.optim.Optimizer,
    batch: TaskBatch,
    make_task_model: Callable[[], nn.Module],
    inner_lr: float,
    inner_steps: int,
    loss: str = "cross_entropy",
) -> float:
    """One meta-step exactly as the article's listing does it (and as it fails).

    Args:
        meta_learner: the model whose weights should be meta-learned.
        meta_optimizer: optimiser over ``meta_learner.parameters()`` (Adam in the article).
        batch: a meta-batch of tasks.
        make_task_model: builds a fresh model of the meta-learner's architecture.
        inner_lr, inner_steps: the inner SGD loop.
        loss: 'cross_entropy' as in the article, or 'mse'.

    Returns:
        The meta-loss that was (uselessly) backpropagated, as a float.
    """
    check_task_batch(batch)
    positive_float("inner_lr", inner_lr)
    nonnegative_int("inner_steps", inner_steps)
    loss_fn = resolve_loss(loss)
    meta_optimizer.zero_grad()
    query_losses = []
    for x_spt, y_spt, x_qry, y_qry in zip(*batch, strict=True):
        task_model = make_task_model()
        task_model.load_state_dict(meta_learner.state_dict())  # copies values, not the graph
        task_optimizer = torch.optim.SGD(task_model.parameters(), lr=inner_lr)
        for _ in range(inner_steps):
            support_loss = loss_fn(task_model(x_spt), y_spt)
            task_optimizer.zero_grad()
            support_loss.backward()
            task_optimizer.step()  # in place, outside any graph
        query_losses.append(loss_fn(task_model(x_qry), y_qry))
    meta_loss = torch.stack(query_losses).mean()
    meta_loss.backward()  # gradients land on the task models only
    meta_optimizer.step()  # every meta-parameter has grad None: nothing moves
    return meta_loss.item()


def corrected_meta_step(
    meta_learner: nn.Module,
    meta_optimizer: torch.optim.Optimizer,
    batch: TaskBatch,
    inner_lr: float,
    inner_steps: int,
    loss: str = "cross_entropy",
    first_order: bool = False,
) -> float:
    """The listing repaired: the same loop, with the adapted weights kept in the graph.

    Returns:
        The meta-loss before the update, as a float.
    """
    check_task_batch(batch)
    positive_float("inner_lr", inner_lr)
    nonnegative_int("inner_steps", inner_steps)
    loss_fn = resolve_loss(loss)
    meta_optimizer.zero_grad()
    theta: dict[str, torch.Tensor] = dict(meta_learner.named_parameters())
    query_losses = []
    for x_spt, y_spt, x_qry, y_qry in zip(*batch, strict=True):
        fast = theta  # no copy: the task's weights start as the meta-parameters themselves
        for _ in range(inner_steps):
            support_loss = loss_fn(functional_call(meta_learner, fast, (x_spt,)), y_spt)
            grads = torch.autograd.grad(support_loss, list(fast.values()), create_graph=not first_order)
            fast = {name: w - inner_lr * g for (name, w), g in zip(fast.items(), grads, strict=True)}
        query_losses.append(loss_fn(functional_call(meta_learner, fast, (x_qry,)), y_qry))
    meta_loss = torch.stack(query_losses).mean()
    meta_loss.backward()  # flows through every inner step back to theta
    meta_optimizer.step()
    return meta_loss.item()
