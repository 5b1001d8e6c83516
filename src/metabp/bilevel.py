"""The bilevel loop from scratch, with ``torch.func``.

Parameters are a dict of tensors, the model is evaluated with
``torch.func.functional_call``, and the inner loop takes gradients with
``torch.func.grad``. Because the inner update is an ordinary differentiable
expression of the meta-parameters, the query loss of the adapted parameters
can be differentiated back to the initialisation: that is the meta-gradient of
MAML (Finn et al., 2017).

Every variant is a small change of one piece:

* first-order MAML: the inner gradient is detached (``InnerLoop.first_order``);
* ANIL (Raghu et al., 2020): only some parameters adapt (``InnerLoop.adapt``);
* Meta-SGD (Li et al., 2017): per-parameter learning rates (``lrs`` argument,
  created by :func:`init_lrs`);
* other task types: any ``loss`` (MSE, cross-entropy, or a callable).

Reptile and implicit MAML, which compute their meta-updates differently, live
in :mod:`metabp.variants` and reuse the inner step defined here.

The loss over a meta-batch is either a Python loop over tasks or one
``torch.func.vmap`` call (``vectorize=True``); both give the same numbers, except
for second-order meta-gradients through built-in batch norm, which ``vmap`` gets
wrong in this torch (see :func:`check_vmap_second_order`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value, vmap

from .checks import nonnegative_int, positive_float
from .tasks import TaskBatch, check_task_batch

Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]

LOSSES: dict[str, LossFn] = {"mse": F.mse_loss, "cross_entropy": F.cross_entropy}


def resolve_loss(loss: str | LossFn) -> LossFn:
    """Return the loss function named by ``loss`` ('mse', 'cross_entropy') or ``loss`` itself."""
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {tuple(LOSSES)} or a callable, got {loss!r}")
    return LOSSES[loss]


@dataclass(frozen=True)
class InnerLoop:
    """How one task adapts: the inner optimisation problem and its differentiation.

    Args:
        loss: 'mse', 'cross_entropy' or a callable ``loss(prediction, target)``.
        inner_lr: step size alpha of the inner gradient descent (ignored where
            learned per-parameter rates ``lrs`` are passed, as in Meta-SGD).
        inner_steps: number of inner gradient steps (0 means no adaptation).
        first_order: if True the inner gradients are treated as constants, so the
            meta-gradient drops the Hessian terms (first-order MAML).
        adapt: names (or name prefixes) of the parameters updated in the inner loop;
            ``None`` adapts all of them (MAML), ``("head",)`` only the head (ANIL).
    """

    loss: str | LossFn = "mse"
    inner_lr: float = 0.01
    inner_steps: int = 1
    first_order: bool = False
    adapt: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        resolve_loss(self.loss)
        positive_float("inner_lr", self.inner_lr)
        nonnegative_int("inner_steps", self.inner_steps)
        if not isinstance(self.first_order, bool):
            raise ValueError(f"first_order must be True or False, got {self.first_order!r}")
        if self.adapt is not None:
            if isinstance(self.adapt, str) or not all(isinstance(a, str) for a in self.adapt):
                raise ValueError(f"adapt must be None or a tuple of parameter names, got {self.adapt!r}")
            if len(self.adapt) == 0:
                raise ValueError("adapt must name at least one parameter (or be None for all)")

    @property
    def loss_fn(self) -> LossFn:
        return resolve_loss(self.loss)

    def adapts(self, name: str) -> bool:
        """Whether the parameter called ``name`` is updated in the inner loop."""
        if self.adapt is None:
            return True
        return any(name == a or name.startswith(a + ".") for a in self.adapt)


def get_params(model: nn.Module) -> Params:
    """The model's parameters as a dict ``name -> tensor`` (the live leaves, not copies)."""
    return dict(model.named_parameters())


def check_adapt_names(model: nn.Module, inner: InnerLoop) -> None:
    """Raise ``ValueError`` if ``inner.adapt`` matches none of ``model``'s parameters."""
    names = [n for n, _ in model.named_parameters()]
    if inner.adapt is not None and not any(inner.adapts(n) for n in names):
        raise ValueError(f"adapt={inner.adapt!r} matches no parameter of the model; names are {names}")


def forward(model: nn.Module, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """Evaluate ``model`` at ``params`` (and its own buffers) on ``x``."""
    buffers = dict(model.named_buffers())
    return functional_call(model, (dict(params), buffers), (x,))


def inner_step(
    model: nn.Module,
    params: Params,
    x: Tensor,
    y: Tensor,
    inner: InnerLoop,
    lrs: Mapping[str, Tensor] | None = None,
) -> Params:
    """One inner gradient step on the support set ``(x, y)``.

    ``theta' = theta - alpha * grad L_support(theta)`` for the adapted parameters,
    the others passed through unchanged. Works inside ``torch.func.vmap``.

    Args:
        model: the network, evaluated functionally.
        params: current parameters, ``name -> tensor``.
        x, y: support inputs ``(K, ...)`` and targets ``(K, ...)`` of one task.
        inner: the inner-loop settings.
        lrs: optional learned step sizes (Meta-SGD), ``name -> tensor`` shaped like
            the parameter (or broadcastable to it); replaces ``inner.inner_lr``.

    Returns:
        The updated parameters (a new dict; the input is not modified).
    """
    loss_fn = inner.loss_fn
    fast = {k: v for k, v in params.items() if inner.adapts(k)}
    frozen = {k: v for k, v in params.items() if not inner.adapts(k)}

    def support_loss(fast_params: Params) -> Tensor:
        return loss_fn(forward(model, {**frozen, **fast_params}, x), y)

    grads = grad(support_loss)(fast)
    new = dict(params)
    for k, g in grads.items():
        if inner.first_order:
            g = g.detach()
        lr = inner.inner_lr if lrs is None else lrs[k]
        new[k] = fast[k] - lr * g
    return new


def init_lrs(model: nn.Module, value: float, inner: InnerLoop | None = None) -> Params:
    """Learnable per-parameter inner step sizes for Meta-SGD (Li et al., 2017).

    One tensor shaped like each adapted parameter, filled with ``value`` and
    requiring grad, to pass as ``lrs`` to :func:`meta_loss`, :func:`meta_step` or
    :func:`metabp.training.meta_train` (which adds them to the outer optimiser).
    The meta-gradient then reaches the step sizes as well as the initialisation.

    Args:
        model: the network.
        value: initial step size of every entry (MAML's ``inner_lr`` is a natural start).
        inner: if given, only the parameters that ``inner`` adapts get a step size.
    """
    positive_float("value", value)
    return {
        name: torch.full_like(p.detach(), value).requires_grad_(True)
        for name, p in model.named_parameters()
        if inner is None or inner.adapts(name)
    }


def adapt(
    model: nn.Module,
    params: Params,
    x: Tensor,
    y: Tensor,
    inner: InnerLoop,
    lrs: Mapping[str, Tensor] | None = None,
    steps: int | None = None,
) -> Params:
    """Run the inner loop: ``steps`` (default ``inner.inner_steps``) gradient steps on ``(x, y)``."""
    steps = inner.inner_steps if steps is None else nonnegative_int("steps", steps)
    for _ in range(steps):
        params = inner_step(model, params, x, y, inner, lrs)
    return params


def task_loss(
    model: nn.Module,
    params: Params,
    x_spt: Tensor,
    y_spt: Tensor,
    x_qry: Tensor,
    y_qry: Tensor,
    inner: InnerLoop,
    lrs: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """Query loss of one task after adapting ``params`` on its support set.

    Shapes are those of one task: ``x_spt (K, ...)``, ``x_qry (Q, ...)``.
    Differentiable with respect to ``params`` (and ``lrs``): its gradient is the
    task's meta-gradient.
    """
    adapted = adapt(model, params, x_spt, y_spt, inner, lrs)
    return inner.loss_fn(forward(model, adapted, x_qry), y_qry)


def check_vmap_second_order(model: nn.Module, inner: InnerLoop) -> None:
    """Refuse a second-order meta-gradient under ``vmap`` through built-in batch norm.

    This torch's batching rule for the batch-norm backward is wrong
    (pytorch/functorch#534): the second-order meta-gradient of a network with
    ``nn.BatchNorm*`` in training mode comes out off by about 1e-3 of its size under
    ``vmap``, silently. The loop over tasks is exact, and so is ``vmap`` through
    :class:`metabp.convnet.TaskBatchNorm2d`.
    """
    if inner.first_order or inner.inner_steps == 0:
        return
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise ValueError(
                f"vectorize=True with a second-order inner loop is not exact through the built-in batch norm "
                f"{name!r} (torch's vmap rule for its backward is wrong, pytorch/functorch#534); use "
                f"vectorize=False, first_order=True, or metabp.convnet.vmap_safe(model)")


def meta_loss(
    model: nn.Module,
    params: Params,
    batch: TaskBatch,
    inner: InnerLoop,
    vectorize: bool = False,
    lrs: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """Mean post-adaptation query loss over a meta-batch: the outer objective.

    Args:
        model: the network.
        params: meta-parameters theta (``name -> tensor``); usually ``get_params(model)``.
        batch: a :class:`~metabp.tasks.TaskBatch` with ``B`` tasks.
        inner: inner-loop settings.
        vectorize: ``False`` loops over tasks in Python; ``True`` maps
            :func:`task_loss` over the task dimension with ``torch.func.vmap``.
        lrs: optional Meta-SGD step sizes.

    Returns:
        A scalar tensor; ``.backward()`` puts the meta-gradient on ``params``.
    """
    check_task_batch(batch)
    if vectorize:
        check_vmap_second_order(model, inner)

        def one_task(x_spt: Tensor, y_spt: Tensor, x_qry: Tensor, y_qry: Tensor) -> Tensor:
            return task_loss(model, params, x_spt, y_spt, x_qry, y_qry, inner, lrs)

        return vmap(one_task)(*batch).mean()
    losses = [task_loss(model, params, *task, inner, lrs) for task in zip(*batch)]
    return torch.stack(losses).mean()


def meta_gradient(
    model: nn.Module,
    batch: TaskBatch,
    inner: InnerLoop,
    vectorize: bool = False,
    params: Params | None = None,
    per_task: bool = False,
) -> Params:
    """The meta-gradient d(meta_loss)/d(theta) as a dict, without touching ``.grad``.

    With ``per_task=True`` (loop only) each task's query loss is backpropagated on
    its own and the gradients are summed, so only one task's graph is alive at a
    time: less memory, and on convolutional networks better use of the CPU's caches.
    """
    params = get_params(model) if params is None else params
    names = list(params)
    if per_task:
        if vectorize:
            raise ValueError("per_task=True backpropagates task by task; it needs vectorize=False")
        check_task_batch(batch)
        total = {n: torch.zeros_like(params[n]) for n in names}
        for task in zip(*batch):
            loss = task_loss(model, params, *task, inner) / batch.num_tasks
            grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
            for n, g in zip(names, grads):
                if g is not None:
                    total[n] += g
        return total
    loss = meta_loss(model, params, batch, inner, vectorize)
    grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    return {n: torch.zeros_like(params[n]) if g is None else g for n, g in zip(names, grads)}


def meta_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: TaskBatch,
    inner: InnerLoop,
    vectorize: bool = True,
    lrs: Mapping[str, Tensor] | None = None,
) -> float:
    """One outer update: zero grads, meta-loss, backward, ``optimizer.step()``.

    The optimiser must hold ``model.parameters()`` (and ``lrs`` values, for Meta-SGD).
    Returns the meta-loss before the update, as a float.
    """
    optimizer.zero_grad(set_to_none=True)
    loss = meta_loss(model, get_params(model), batch, inner, vectorize, lrs)
    loss.backward()
    optimizer.step()
    return loss.item()


def make_optimizer(
    params: Iterable[Tensor] | Iterable[dict], meta_lr: float = 1e-3, name: str = "adam"
) -> torch.optim.Optimizer:
    """The outer optimiser by name ('adam' by default, 'sgd', 'adamw')."""
    positive_float("meta_lr", meta_lr)
    optimizers = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}
    if name not in optimizers:
        raise ValueError(f"optimizer must be one of {tuple(optimizers)}, got {name!r}")
    return optimizers[name](params, lr=meta_lr)


def meta_gradient_fn(
    model: nn.Module, inner: InnerLoop, vectorize: bool = True, compile: bool = False
) -> Callable[[Params, TaskBatch], tuple[Params, Tensor]]:
    """A pure function ``(params, batch) -> (meta-gradient dict, meta-loss)``.

    The whole meta-gradient, outer derivative included, is one ``torch.func``
    transform (``grad_and_value`` of :func:`meta_loss`), so it can be handed to
    ``torch.compile``. Compiling costs tens of seconds once and then removes most of
    the Python and dispatcher overhead that dominates small models such as the
    sinusoid network. ``params`` must not require grad (pass detached tensors).

    Compilation is an optimisation, never a requirement: where ``torch.compile``
    cannot build or run the function (no C++ compiler, generated code that does
    not compile for this CPU), the first failing call says so in one warning and
    this call and every later one run the same function eagerly (the same numbers
    up to rounding). An error that the eager function raises too is raised.
    """

    def loss(params: Params, batch: TaskBatch) -> Tensor:
        return meta_loss(model, params, TaskBatch(*batch), inner, vectorize)

    fn = grad_and_value(loss)
    if compile:
        import logging

        # torch's C++-extension helper logs a harmless "No CUDA runtime is found"
        # warning on CPU-only machines the first time inductor loads it.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        fn = _compiled_or_eager(fn)
    return fn


def _compiled_or_eager(fn: Callable) -> Callable:
    """``torch.compile(fn)``, or ``fn`` itself (with one warning) from the first call that fails compiled."""
    import warnings

    compiled = torch.compile(fn)
    use = [compiled]

    def call(*args):
        if use[0] is fn:
            return fn(*args)
        try:
            return compiled(*args)
        except Exception as error:  # noqa: BLE001 - any failure of the compiler; the eager call below decides
            out = fn(*args)  # an error of the function itself is raised here, by the eager call
            use[0] = fn
            lines = str(error).strip().splitlines() or [""]
            reason = f"{type(error).__name__}: {lines[0]}"[:300]
            warnings.warn(f"torch.compile could not build or run the meta-gradient on this machine ({reason}); "
                          f"running it eagerly instead (same numbers, slower)", RuntimeWarning, stacklevel=2)
            return out

    return call
