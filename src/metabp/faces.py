"""Other libraries' versions of the same meta-step: higher, learn2learn, TorchOpt.

Each function computes the MAML meta-gradient of a meta-batch, the gradient of
the mean post-adaptation query loss with respect to the model's parameters, the
way its library's documentation teaches, and returns it as a dict ``name ->
tensor`` like :func:`metabp.bilevel.meta_gradient` (which is the same step with
PyTorch alone, ``torch.func``). Tasks are processed in a Python loop, as all
three libraries do. Chapter 7 shows them side by side, a test proves that they
agree, and ``python -m metabp bench`` times them.

* higher (Grefenstette et al., 2019): ``innerloop_ctx`` turns the model into a
  functional copy and ``torch.optim.SGD`` into a differentiable optimiser whose
  ``step(loss)`` returns new weights instead of overwriting the old ones.
* learn2learn (Arnold et al., 2020): ``MAML(model).clone()`` and ``adapt(loss)``,
  see :mod:`metabp.l2l`.
* TorchOpt (Ren et al., 2023): ``MetaSGD`` steps the module's parameters out of
  place, and ``extract_state_dict``/``recover_state_dict`` put the meta-parameters
  back before the next task.

First-order MAML (``inner.first_order``) takes the query gradient at the adapted
weights and applies it to the meta-parameters, skipping the second derivatives.
learn2learn has a flag for it; with higher, ``track_higher_grads=False`` detaches
the inner loop, and the gradient is taken with respect to the fast weights.
TorchOpt's ``MetaSGD`` always differentiates through its step (``create_graph=True``),
so its first-order gradient is read off the adapted weights in the same way, but
the second-order graph is still built.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from types import ModuleType

import torch
from torch import nn

from .bilevel import InnerLoop, Params
from .tasks import TaskBatch, check_task_batch

_MODULES: dict[str, ModuleType] = {}


def _import_quietly(name: str) -> ModuleType:
    """Import ``name`` once, with its warnings and stderr output captured (as :func:`metabp.l2l.import_learn2learn`)."""
    if name not in _MODULES:
        with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = __import__(name)
        _MODULES[name] = module
    return _MODULES[name]


def import_higher() -> ModuleType:
    """The ``higher`` package, imported once and quietly."""
    return _import_quietly("higher")


def import_torchopt() -> ModuleType:
    """The ``torchopt`` package, imported once and quietly."""
    return _import_quietly("torchopt")


def _check(model: nn.Module, batch: TaskBatch, inner: InnerLoop) -> None:
    check_task_batch(batch)
    if inner.adapt_only is not None:
        raise ValueError(f"the library faces adapt every parameter; got adapt_only={inner.adapt_only!r} (use metabp.bilevel)")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _named(model: nn.Module, grads) -> Params:
    return {name: g for (name, _), g in zip(model.named_parameters(), grads)}


def higher_meta_gradient(model: nn.Module, batch: TaskBatch, inner: InnerLoop) -> Params:
    """The MAML meta-gradient with higher's ``innerloop_ctx`` and a differentiable SGD.

    ``copy_initial_weights=False`` makes the functional copy start *from* the
    model's parameters (not from a detached copy of them), so the query loss
    depends on them and ``autograd.grad`` reaches them.
    """
    _check(model, batch, inner)
    higher = import_higher()
    loss_fn = inner.loss_fn
    params = list(model.parameters())
    sgd = torch.optim.SGD(params, lr=inner.inner_lr)
    total = [torch.zeros_like(p) for p in params]
    num_tasks = batch.num_tasks
    for x_spt, y_spt, x_qry, y_qry in zip(*batch):
        with higher.innerloop_ctx(model, sgd, copy_initial_weights=False,
                                  track_higher_grads=not inner.first_order) as (fmodel, diffopt):
            for _ in range(inner.inner_steps):
                diffopt.step(loss_fn(fmodel(x_spt), y_spt))
            query_loss = loss_fn(fmodel(x_qry), y_qry) / num_tasks
            wrt = list(fmodel.parameters()) if inner.first_order else params
            grads = torch.autograd.grad(query_loss, wrt)
        total = [t + g for t, g in zip(total, grads)]
    return _named(model, total)


def learn2learn_meta_gradient(model: nn.Module, batch: TaskBatch, inner: InnerLoop) -> Params:
    """The MAML meta-gradient with learn2learn's ``MAML`` wrapper (``clone()``, ``adapt()``).

    The wrapper is built per call; it holds references to ``model``'s parameters,
    not copies. See :mod:`metabp.l2l` for the task loss it evaluates.
    """
    from . import l2l

    _check(model, batch, inner)
    if not isinstance(inner.loss, str):
        raise ValueError("the learn2learn face takes a named loss ('mse' or 'cross_entropy')")
    maml = l2l.wrap(model, inner.inner_lr, first_order=inner.first_order)
    loss = l2l.meta_loss(maml, batch, inner.inner_steps, inner.loss)
    return _named(model, torch.autograd.grad(loss, list(model.parameters())))


def torchopt_meta_gradient(model: nn.Module, batch: TaskBatch, inner: InnerLoop) -> Params:
    """The MAML meta-gradient with TorchOpt's ``MetaSGD`` (its object-oriented API).

    ``MetaSGD.step(loss)`` replaces the module's parameters by differentiable
    functions of the old ones; after each task ``recover_state_dict`` puts the
    meta-parameters back. On return the model holds its original parameters.
    """
    _check(model, batch, inner)
    torchopt = import_torchopt()
    loss_fn = inner.loss_fn
    params = list(model.parameters())
    initial = torchopt.extract_state_dict(model)  # references to the meta-parameters
    total = [torch.zeros_like(p) for p in params]
    num_tasks = batch.num_tasks
    try:
        for x_spt, y_spt, x_qry, y_qry in zip(*batch):
            opt = torchopt.MetaSGD(model, lr=inner.inner_lr)
            for _ in range(inner.inner_steps):
                opt.step(loss_fn(model(x_spt), y_spt))
            query_loss = loss_fn(model(x_qry), y_qry) / num_tasks
            wrt = list(model.parameters()) if inner.first_order else params
            grads = torch.autograd.grad(query_loss, wrt)
            total = [t + g for t, g in zip(total, grads)]
            torchopt.recover_state_dict(model, initial)
    finally:
        torchopt.recover_state_dict(model, initial)
    return _named(model, total)


#: The faces by library name.
FACES = {
    "higher": higher_meta_gradient,
    "learn2learn": learn2learn_meta_gradient,
    "torchopt": torchopt_meta_gradient,
}


def max_abs_difference(a: Params, b: Params) -> float:
    """Largest absolute difference between two gradient dicts with the same names."""
    if set(a) != set(b):
        raise ValueError(f"the gradients name different parameters: {sorted(set(a) ^ set(b))}")
    return max((a[k] - b[k]).abs().max().item() for k in a)
