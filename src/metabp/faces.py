"""Other libraries' versions of the same meta-step: learn2learn, higher, TorchOpt.

One module for everything that is not written with ``torch.func``:

* the learn2learn path (Arnold et al., 2020): ``l2l.algorithms.MAML`` wraps the
  model; ``clone()`` gives a task-specific copy that stays in the autograd graph,
  and ``adapt(loss)`` takes an inner gradient step on it in place.
  :func:`l2l_wrap`, :func:`l2l_task_loss`, :func:`l2l_meta_loss` and
  :func:`l2l_meta_step` take the same :class:`~metabp.bilevel.InnerLoop` as the
  core (first order and ``adapt_only`` included), so switching between the two
  paths is a one-line change, and a test proves that they give the same
  meta-gradient;
* the faces: each ``*_meta_gradient`` function computes the MAML meta-gradient of
  a meta-batch, the gradient of the mean post-adaptation query loss with respect
  to the model's parameters, the way its library's documentation teaches, and
  returns it as a dict ``name -> tensor`` like :func:`metabp.bilevel.meta_gradient`
  (which is the same step with PyTorch alone). Tasks are processed in a Python
  loop, as all three libraries do. Chapter 7 shows them side by side, a test
  proves that they agree, and ``python -m metabp bench`` times them;
* one quiet importer per library (:func:`import_learn2learn`, :func:`import_higher`,
  :func:`import_torchopt`): learn2learn imports the unmaintained ``gym``, which
  prints a long notice on stderr.

These functions deliberately do not call the core's :func:`~metabp.bilevel.inner_step`:
their point is to show each library's own way of writing the inner loop, so that
agreeing with the core is evidence rather than a tautology.

* higher (Grefenstette et al., 2019): ``innerloop_ctx`` turns the model into a
  functional copy and ``torch.optim.SGD`` into a differentiable optimiser whose
  ``step(loss)`` returns new weights instead of overwriting the old ones.
* learn2learn: ``MAML(model).clone()`` and ``adapt(loss)`` (:func:`l2l_task_loss`).
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
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from torch import Tensor, nn

from .bilevel import InnerLoop, Params, TaskBatch, check_adapt_names, check_task_batch, max_abs_difference  # noqa: F401

if TYPE_CHECKING:
    from .navigation import Steps

_MODULES: dict[str, ModuleType] = {}


def _import_quietly(name: str) -> ModuleType:
    """Import ``name`` once, with its warnings and stderr output captured."""
    if name not in _MODULES:
        with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = __import__(name)
        _MODULES[name] = module
    return _MODULES[name]


def import_learn2learn() -> ModuleType:
    """The ``learn2learn`` package, imported once and quietly: its import of the
    unmaintained ``gym`` prints a long deprecation notice on stderr and raises
    deprecation warnings, neither useful to a reader of this book. The one place
    the project imports learn2learn."""
    return _import_quietly("learn2learn")


def import_higher() -> ModuleType:
    """The ``higher`` package, imported once and quietly."""
    return _import_quietly("higher")


def import_torchopt() -> ModuleType:
    """The ``torchopt`` package, imported once and quietly."""
    return _import_quietly("torchopt")


# ---------------------------------------------------------------- the learn2learn path


def l2l_wrap(model: nn.Module, inner: InnerLoop) -> nn.Module:
    """Wrap ``model`` in ``l2l.algorithms.MAML`` with ``inner``'s step size and first-order flag."""
    l2l = import_learn2learn()
    if not isinstance(inner, InnerLoop):
        raise ValueError(f"inner must be an InnerLoop (as for metabp.bilevel), got {inner!r}")
    check_adapt_names(model, inner)
    maml: nn.Module = l2l.algorithms.MAML(model, lr=inner.inner_lr, first_order=inner.first_order)
    return maml


class _L2LClone(Protocol):
    """What metabp uses of a clone of learn2learn's ``MAML`` wrapper."""

    module: nn.Module

    def adapt(self, loss: Tensor) -> None: ...

    def __call__(self, *args: Tensor) -> Any: ...


class _L2LMAML(Protocol):
    """What metabp uses of learn2learn's ``MAML`` wrapper (learn2learn ships no types)."""

    def clone(self) -> Any: ...


def l2l_adapt(learner: nn.Module, loss: Tensor, inner: InnerLoop) -> None:
    """One inner step on a clone, in place: learn2learn's ``adapt(loss)``, or, when
    ``inner.adapt_only`` names some parameters (ANIL), learn2learn's ``maml_update``
    with gradients for those parameters only."""
    clone = cast(_L2LClone, learner)  # learn2learn ships no types
    if inner.adapt_only is None:
        clone.adapt(loss)
        return
    from learn2learn.algorithms.maml import maml_update

    named = list(clone.module.named_parameters())
    chosen = [p for n, p in named if inner.adapts(n)]
    grads = iter(torch.autograd.grad(loss, chosen, create_graph=not inner.first_order))
    maml_update(clone.module, inner.inner_lr, [next(grads) if inner.adapts(n) else None for n, _ in named])


def l2l_task_loss(
    maml: _L2LMAML | nn.Module, x_spt: Tensor, y_spt: Tensor, x_qry: Tensor, y_qry: Tensor, inner: InnerLoop
) -> Tensor:
    """Query loss of one task after ``inner.inner_steps`` ``adapt`` calls on a clone."""
    loss_fn = inner.loss_fn
    learner: nn.Module = cast(_L2LMAML, maml).clone()
    for _ in range(inner.inner_steps):
        l2l_adapt(learner, loss_fn(learner(x_spt), y_spt), inner)
    return loss_fn(learner(x_qry), y_qry)


def l2l_meta_loss(maml: nn.Module, batch: TaskBatch, inner: InnerLoop) -> Tensor:
    """Mean post-adaptation query loss over the meta-batch, learn2learn style."""
    check_task_batch(batch)
    losses = [l2l_task_loss(maml, *task, inner) for task in zip(*batch, strict=True)]
    return torch.stack(losses).mean()


def l2l_meta_step(maml: nn.Module, optimizer: torch.optim.Optimizer, batch: TaskBatch, inner: InnerLoop) -> float:
    """One outer update with learn2learn; returns the meta-loss before the update."""
    optimizer.zero_grad(set_to_none=True)
    value = l2l_meta_loss(maml, batch, inner)
    value.backward()
    optimizer.step()
    return value.item()


def l2l_adapt_policy(maml: _L2LMAML | nn.Module, steps: Steps, old_logp: Tensor, estimator: str = "lvc") -> nn.Module:
    """Clone a wrapped Gaussian policy and take one inner policy-gradient step with ``adapt``.

    learn2learn's face of :func:`metabp.metarl.adapt` for one task: ``steps`` is a
    :class:`~metabp.navigation.Steps` of that task alone (no task dimension) and
    ``old_logp`` its detached log-probabilities. ``adapt`` descends the loss, so the
    loss is the negative of the inner surrogate.
    """
    from .metarl import surrogate
    from .navigation import gaussian_log_prob

    learner: _L2LClone = cast(_L2LMAML, maml).clone()
    mean, std = learner(steps.obs)
    logp = gaussian_log_prob(mean, std, steps.act)
    learner.adapt(-surrogate(logp, old_logp, steps.adv, steps.mask, estimator))
    return cast(nn.Module, learner)


# ---------------------------------------------------------------- the faces


def _check(model: nn.Module, batch: TaskBatch, inner: InnerLoop) -> None:
    check_task_batch(batch)
    if inner.adapt_only is not None:
        raise ValueError(
            f"the library faces adapt every parameter; got adapt_only={inner.adapt_only!r} (use metabp.bilevel)"
        )
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _named(model: nn.Module, grads: Sequence[Tensor]) -> Params:
    return {name: g for (name, _), g in zip(model.named_parameters(), grads, strict=True)}


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
    for x_spt, y_spt, x_qry, y_qry in zip(*batch, strict=True):
        with higher.innerloop_ctx(model, sgd, copy_initial_weights=False, track_higher_grads=not inner.first_order) as (
            fmodel,
            diffopt,
        ):
            for _ in range(inner.inner_steps):
                diffopt.step(loss_fn(fmodel(x_spt), y_spt))
            query_loss = loss_fn(fmodel(x_qry), y_qry) / num_tasks
            wrt = list(fmodel.parameters()) if inner.first_order else params
            grads = torch.autograd.grad(query_loss, wrt)
        total = [t + g for t, g in zip(total, grads, strict=True)]
    return _named(model, total)


def learn2learn_meta_gradient(model: nn.Module, batch: TaskBatch, inner: InnerLoop) -> Params:
    """The MAML meta-gradient with learn2learn's ``MAML`` wrapper (``clone()``, ``adapt()``).

    The wrapper is built per call; it holds references to ``model``'s parameters,
    not copies. :func:`l2l_task_loss` is the task loss it evaluates.
    """
    _check(model, batch, inner)
    maml = l2l_wrap(model, inner)
    loss = l2l_meta_loss(maml, batch, inner)
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
        for x_spt, y_spt, x_qry, y_qry in zip(*batch, strict=True):
            opt = torchopt.MetaSGD(model, lr=inner.inner_lr)
            for _ in range(inner.inner_steps):
                opt.step(loss_fn(model(x_spt), y_spt))
            query_loss = loss_fn(model(x_qry), y_qry) / num_tasks
            wrt = list(model.parameters()) if inner.first_order else params
            grads = torch.autograd.grad(query_loss, wrt)
            total = [t + g for t, g in zip(total, grads, strict=True)]
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
