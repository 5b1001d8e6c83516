"""The bilevel loop from scratch, with ``torch.func``.

Parameters are a dict of tensors, the model is evaluated with
``torch.func.functional_call``, and the inner loop takes gradients with
``torch.func.grad``. Because the inner update is an ordinary differentiable
expression of the meta-parameters, the query loss of the adapted parameters
can be differentiated back to the initialisation: that is the meta-gradient of
MAML (Finn et al., 2017).

Every variant is a small change of one piece:

* first-order MAML: the inner gradient is detached (``InnerLoop.first_order``);
* ANIL (Raghu et al., 2020): only some parameters adapt (``InnerLoop.adapt_only``);
* Meta-SGD (Li et al., 2017): per-parameter learning rates (``lrs`` argument,
  created by :func:`init_lrs`);
* other task types: any ``loss`` (MSE, cross-entropy, or a callable);
* other inner problems: any ``objective`` of the parameters in place of the
  support loss (:func:`inner_step`), as meta-RL's policy-gradient surrogate
  (:func:`metabp.metarl.adapt`) and implicit MAML's proximal problem
  (:func:`metabp.variants.proximal_adapt`) do.

Reptile and implicit MAML, which form their meta-updates differently, live in
:mod:`metabp.variants`; Reptile adapts with :func:`adapt`, implicit MAML with
:func:`inner_step` on its proximal objective.

A model with further inputs (a task embedding, a mask, a context) is meta-learned
by closing over them: wrap it in a module whose ``forward(x)`` takes one tensor,
for example by packing the extra inputs into ``x`` as extra features, or build the
``objective`` of :func:`inner_step` yourself with
``torch.func.functional_call(model, params, (x, extra))``.

This file imports only ``torch`` and the small :mod:`metabp.checks`, so the core
can be copied into another project as these two files.

The loss over a meta-batch is either a Python loop over tasks or one
``torch.func.vmap`` call (``vectorize=True``, the library's one default,
:data:`VECTORIZE`); both give the same numbers up to rounding, except for
second-order meta-gradients through normalisation layers, which ``vmap`` gets
wrong in this torch, and random layers, which it refuses (both are refused with a
remedy, see :func:`check_vmap`).

Devices: the core runs wherever the model's parameters and the batch are; move
both (``model.to("cuda")``, ``batch.to("cuda")``; the task samplers take
``device``), and :func:`meta_loss` refuses a batch on another device.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value, vmap

from .checks import nonnegative_int, positive_float

# Parameters (or gradients, or step sizes) by name (no #: doc: viewcode would link it to builtins).
Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
Objective = Callable[[Params], Tensor]

#: Default of ``vectorize`` everywhere in the library: one ``vmap`` over tasks,
#: faster than the Python loop on small models (``vectorize=False`` is the loop;
#: :func:`check_vmap` lists the layers ``vmap`` gets wrong).
VECTORIZE = True


class TaskBatch(NamedTuple):
    """A meta-batch of tasks: support and query sets with a leading task dimension.

    ``x_spt (B, K, ...)``, ``y_spt (B, K, ...)``, ``x_qry (B, Q, ...)``, ``y_qry (B, Q, ...)``.
    """

    x_spt: Tensor
    y_spt: Tensor
    x_qry: Tensor
    y_qry: Tensor

    @property
    def num_tasks(self) -> int:
        return self.x_spt.shape[0]

    def task(self, i: int) -> TaskBatch:
        """Task ``i`` alone, still with a task dimension of size 1."""
        return TaskBatch(*(t[i : i + 1] for t in self))

    def to(self, *args: Any, **kwargs: Any) -> TaskBatch:
        """Every tensor through ``Tensor.to(*args, **kwargs)``, labels included.

        Use it to move a batch to a device (``batch.to("cuda")``, with the model moved
        there too: ``model.to("cuda")``). To change the precision, use :meth:`cast`,
        which leaves integer class labels as they are.
        """
        return TaskBatch(*(t.to(*args, **kwargs) for t in self))

    def cast(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> TaskBatch:
        """The floating-point tensors cast to ``dtype`` and every tensor moved to ``device``
        (``None``: unchanged); integer labels keep their dtype."""
        return TaskBatch(*(t.to(device=device, dtype=dtype if t.is_floating_point() else None) for t in self))


def check_task_batch(batch: TaskBatch) -> TaskBatch:
    """Validate the shapes of a :class:`TaskBatch`; raise ``ValueError`` naming the bad tensor."""
    if len(batch) != 4:
        raise ValueError(f"batch must hold 4 tensors (x_spt, y_spt, x_qry, y_qry), got {len(batch)}")
    names = ("x_spt", "y_spt", "x_qry", "y_qry")
    for name, t in zip(names, batch, strict=True):
        if not isinstance(t, Tensor) or t.dim() < 2:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a tensor of shape (tasks, examples, ...), got {shape}")
    b = batch.x_spt.shape[0]
    if b == 0:
        raise ValueError(
            f"batch must hold at least one task, got an empty meta-batch: x_spt {tuple(batch.x_spt.shape)}"
        )
    for name, t in zip(names, batch, strict=True):
        if t.shape[0] != b:
            raise ValueError(f"{name} has {t.shape[0]} tasks but x_spt has {b}; all four must agree")
    for name in ("x_spt", "x_qry"):
        if getattr(batch, name).shape[1] == 0:
            raise ValueError(
                f"{name} must hold at least one example per task, got shape {tuple(getattr(batch, name).shape)}"
            )
    if batch.x_spt.shape[1] != batch.y_spt.shape[1]:
        raise ValueError(f"x_spt has {batch.x_spt.shape[1]} examples per task but y_spt has {batch.y_spt.shape[1]}")
    if batch.x_qry.shape[1] != batch.y_qry.shape[1]:
        raise ValueError(f"x_qry has {batch.x_qry.shape[1]} examples per task but y_qry has {batch.y_qry.shape[1]}")
    if batch.x_spt.shape[2:] != batch.x_qry.shape[2:]:
        raise ValueError(
            f"x_spt examples have shape {tuple(batch.x_spt.shape[2:])} but x_qry examples have "
            f"{tuple(batch.x_qry.shape[2:])}; they must match"
        )
    return batch


def mse_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """``F.mse_loss`` that refuses targets of another shape than the prediction
    (which it would broadcast into a wrong loss)."""
    if prediction.shape != target.shape:
        raise ValueError(
            f"the MSE target has shape {tuple(target.shape)} but the prediction has "
            f"{tuple(prediction.shape)}; y_spt and y_qry must match the model's output"
        )
    return F.mse_loss(prediction, target)


LOSSES: dict[str, LossFn] = {"mse": mse_loss, "cross_entropy": F.cross_entropy}


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
        adapt_only: names (or name prefixes) of the parameters updated in the inner
            loop; ``None`` adapts all of them (MAML). ANIL adapts the head alone:
            ``("head",)`` for :class:`~metabp.convnet.Conv4`, ``("net.4",)`` for
            :class:`~metabp.models.SineNet`. A name that matches no parameter of the
            model raises ``ValueError`` (:func:`check_adapt_names`).
    """

    loss: str | LossFn = "mse"
    inner_lr: float = 0.01
    inner_steps: int = 1
    first_order: bool = False
    adapt_only: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        resolve_loss(self.loss)
        positive_float("inner_lr", self.inner_lr)
        nonnegative_int("inner_steps", self.inner_steps)
        if not isinstance(self.first_order, bool):
            raise ValueError(f"first_order must be True or False, got {self.first_order!r}")
        if self.adapt_only is not None:
            if isinstance(self.adapt_only, str) or not all(isinstance(a, str) for a in self.adapt_only):
                raise ValueError(f"adapt_only must be None or a tuple of parameter names, got {self.adapt_only!r}")
            if len(self.adapt_only) == 0:
                raise ValueError("adapt_only must name at least one parameter (or be None for all)")

    @property
    def loss_fn(self) -> LossFn:
        return resolve_loss(self.loss)

    def adapts(self, name: str) -> bool:
        """Whether the parameter called ``name`` is updated in the inner loop."""
        if self.adapt_only is None:
            return True
        return any(name == a or name.startswith(a + ".") for a in self.adapt_only)


def get_params(model: nn.Module) -> Params:
    """The model's parameters as a dict ``name -> tensor`` (the live leaves, not copies)."""
    return dict(model.named_parameters())


def check_adapt_names(names: nn.Module | Iterable[str], inner: InnerLoop) -> None:
    """Raise ``ValueError`` if an entry of ``inner.adapt_only`` matches none of the parameter
    ``names`` (a model, or the names themselves). Called by :func:`meta_loss`."""
    if inner.adapt_only is None:
        return
    names = [n for n, _ in names.named_parameters()] if isinstance(names, nn.Module) else list(names)
    for a in inner.adapt_only:
        if not any(n == a or n.startswith(a + ".") for n in names):
            raise ValueError(
                f"adapt_only={inner.adapt_only!r}: {a!r} matches no parameter of the model; names are {names}"
            )


def check_inputs(params: Mapping[str, Tensor], batch: TaskBatch) -> None:
    """Raise ``ValueError`` if the batch's floating-point tensors do not have the parameters'
    dtype, or any tensor of the batch lies on another device than the parameters."""
    p = next(iter(params.values()), None)
    if p is None:
        raise ValueError("params must hold at least one tensor")
    for name, t in zip(TaskBatch._fields, batch, strict=True):
        if t.device != p.device:
            raise ValueError(
                f"batch.{name} is on {t.device} but the parameters are on {p.device}; "
                f"move one of them (batch.to(device), model.to(device))"
            )
        if t.is_floating_point() and t.dtype != p.dtype:
            raise ValueError(
                f"batch.{name} has dtype {t.dtype} but the parameters have {p.dtype}; "
                f"cast the batch with batch.cast({p.dtype}) or the model with model.to({t.dtype})"
            )


def check_lrs(lrs: Mapping[str, Tensor] | None, params: Mapping[str, Tensor], inner: InnerLoop) -> None:
    """Raise ``ValueError`` unless ``lrs`` (Meta-SGD's step sizes) has one entry per adapted parameter."""
    if lrs is None:
        return
    missing = [k for k in params if inner.adapts(k) and k not in lrs]
    if missing:
        raise ValueError(
            f"lrs has no step size for the adapted parameters {missing}; make it with init_lrs(model, value, inner)"
        )


#: Phrases of torch's errors for an input of the wrong size for a layer.
_SHAPE_ERRORS = ("cannot be multiplied", "expected input", "channels", "size mismatch", "must match the size")


def _input_error(error: RuntimeError, batch: TaskBatch) -> ValueError | None:
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if any(phrase in message for phrase in _SHAPE_ERRORS):
        return ValueError(
            f"batch.x_spt examples of shape {tuple(batch.x_spt.shape[2:])} do not fit the model "
            f"(wrong feature size or channel count?): {message}"
        )
    return None


def forward(model: nn.Module, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """Evaluate ``model`` at ``params`` (and its own buffers) on ``x``.

    A model that needs further inputs (a task embedding, a mask) can close over them
    in a small wrapper module whose ``forward(x)`` takes one tensor, or be called
    with ``torch.func.functional_call(model, params, (x, extra))`` inside an
    ``objective`` for :func:`inner_step`.
    """
    buffers = dict(model.named_buffers())
    out: Tensor = functional_call(model, (dict(params), buffers), (x,))
    return out


def inner_step(
    model: nn.Module,
    params: Params,
    x: Tensor | None,
    y: Tensor | None,
    inner: InnerLoop,
    lrs: Mapping[str, Tensor] | None = None,
    objective: Objective | None = None,
) -> Params:
    """One inner gradient step on an objective of the parameters.

    ``theta' = theta - alpha * grad objective(theta)`` for the adapted parameters
    (``inner.adapts``), the others passed through unchanged; with
    ``inner.first_order`` the gradient is detached. The objective is by default the
    support loss ``inner.loss(forward(model, theta, x), y)``. Works inside
    ``torch.func.vmap``.

    Args:
        model: the network, evaluated functionally.
        params: current parameters, ``name -> tensor``.
        x, y: support inputs ``(K, ...)`` and targets ``(K, ...)`` of one task
            (unused, may be ``None``, when ``objective`` is given).
        inner: the inner-loop settings.
        lrs: optional learned step sizes (Meta-SGD), ``name -> tensor`` shaped like
            the parameter (or broadcastable to it); replaces ``inner.inner_lr``.
        objective: a scalar function of the full parameter dict to descend instead
            of the support loss (to ascend a reward, pass its negative).

    Returns:
        The updated parameters (a new dict; the input is not modified).
    """
    if objective is None:
        if x is None or y is None:
            raise ValueError("inner_step needs the support set x and y, or an objective")
        loss_fn, x_spt, y_spt = inner.loss_fn, x, y

        def objective(p: Params) -> Tensor:
            return loss_fn(forward(model, p, x_spt), y_spt)

    fast = {k: v for k, v in params.items() if inner.adapts(k)}
    frozen = {k: v for k, v in params.items() if not inner.adapts(k)}

    def fast_objective(fast_params: Params) -> Tensor:
        return objective({**frozen, **fast_params})

    grads = grad(fast_objective)(fast)
    new = dict(params)
    for k, g in grads.items():
        if inner.first_order:
            g = g.detach()
        lr = inner.inner_lr if lrs is None else lrs[k]
        new[k] = fast[k] - lr * g
    return new


# Models whose step sizes init_lrs made (Meta-SGD), so that evaluation does not
# silently fall back to the scalar inner_lr for them.
_LEARNED_LRS: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def init_lrs(model: nn.Module, value: float, inner: InnerLoop | None = None) -> Params:
    """Learnable per-parameter inner step sizes for Meta-SGD (Li et al., 2017).

    One tensor shaped like each adapted parameter, filled with ``value`` and
    requiring grad, to pass as ``lrs`` to :func:`meta_loss`, :func:`meta_step`,
    :func:`meta_gradient` or :func:`metabp.training.meta_train` (which adds them to
    the outer optimiser). The meta-gradient then reaches the step sizes as well as
    the initialisation. The model is marked as having learned step sizes:
    :func:`metabp.evaluation.adaptation_curve` then refuses to evaluate it without
    ``lrs``.

    Args:
        model: the network.
        value: initial step size of every entry (MAML's ``inner_lr`` is a natural start).
        inner: if given, only the parameters that ``inner`` adapts get a step size.
    """
    positive_float("value", value)
    if inner is not None:
        check_adapt_names(model, inner)
    _LEARNED_LRS[model] = True
    return {
        name: torch.full_like(p.detach(), value).requires_grad_(True)
        for name, p in model.named_parameters()
        if inner is None or inner.adapts(name)
    }


def has_learned_lrs(model: nn.Module) -> bool:
    """Whether :func:`init_lrs` made step sizes for ``model`` (it is a Meta-SGD learner)."""
    return model in _LEARNED_LRS


def adapt(
    model: nn.Module,
    params: Params,
    x: Tensor | None,
    y: Tensor | None,
    inner: InnerLoop,
    lrs: Mapping[str, Tensor] | None = None,
    steps: int | None = None,
    objective: Objective | None = None,
) -> Params:
    """Run the inner loop: ``steps`` (default ``inner.inner_steps``) :func:`inner_step` calls
    on ``(x, y)`` (or on ``objective``)."""
    steps = inner.inner_steps if steps is None else nonnegative_int("steps", steps)
    for _ in range(steps):
        params = inner_step(model, params, x, y, inner, lrs, objective)
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


#: Layers whose second derivatives torch's ``vmap`` batching rules get wrong, silently:
#: pytorch/functorch#534 names batch norm and layer norm; instance norm, which runs
#: on batch norm's kernel, is wrong too (group norm was found exact, and is allowed).
VMAP_WRONG_SECOND_ORDER = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def check_vmap(model: nn.Module, inner: InnerLoop) -> None:
    """Refuse what ``vmap`` over tasks would get wrong or cannot do, with a remedy that works.

    * a second-order meta-gradient through a layer in :data:`VMAP_WRONG_SECOND_ORDER`
      in training mode: this torch's batching rules for their backward are wrong
      (pytorch/functorch#534), so the meta-gradient comes out wrong, silently
      (``tests/test_core.py`` measures it). The loop over tasks is exact, and so is ``vmap``
      through :class:`metabp.convnet.TaskBatchNorm2d` (:func:`metabp.convnet.vmap_safe`);
    * dropout (or any random layer) in training mode: ``vmap`` refuses random
      operations; the loop over tasks draws them as usual;
    * batch norm that keeps running statistics in training mode: its in-place
      update of the shared buffers cannot run per task (in neither path).
    """
    for name, module in model.named_modules():
        if not module.training:
            continue
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            raise ValueError(
                f"the batch norm {name!r} keeps running statistics, which the inner loop cannot update "
                f"per task; build it with track_running_stats=False (normalise with each set's own "
                f"statistics, as MAML does) or call model.eval() to use fixed statistics"
            )
        if isinstance(module, nn.modules.dropout._DropoutNd):
            raise ValueError(
                f"vectorize=True cannot run the dropout layer {name!r}: vmap refuses random operations "
                f"in this torch; use vectorize=False (the loop over tasks) or call model.eval()"
            )
        if not inner.first_order and inner.inner_steps > 0 and isinstance(module, VMAP_WRONG_SECOND_ORDER):
            remedy = (
                "vectorize=False, first_order=True, or metabp.convnet.vmap_safe(model)"
                if isinstance(module, nn.BatchNorm2d) and module.affine
                else "vectorize=False or first_order=True"
            )
            kind = (
                "layer norm"
                if isinstance(module, nn.LayerNorm)
                else "batch norm"
                if isinstance(module, nn.modules.batchnorm._BatchNorm)
                else "instance norm"
            )
            raise ValueError(
                f"vectorize=True with a second-order inner loop is not exact through the built-in {kind} {name!r} "
                f"(torch's vmap rule for its backward is wrong, pytorch/functorch#534); use {remedy}"
            )


def check_running_stats(model: nn.Module) -> None:
    """Refuse batch norm that keeps running statistics in training mode (see :func:`check_vmap`)."""
    for name, module in model.named_modules():
        if module.training and isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            raise ValueError(
                f"the batch norm {name!r} keeps running statistics, which the inner loop cannot update "
                f"per task; build it with track_running_stats=False (normalise with each set's own "
                f"statistics, as MAML does) or call model.eval() to use fixed statistics"
            )


def check_meta_batch(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batch: TaskBatch,
    inner: InnerLoop,
    vectorize: bool,
    lrs: Mapping[str, Tensor] | None = None,
) -> None:
    """Every check :func:`meta_loss` makes before computing: the batch's shapes, dtype and
    device, the adapted names, Meta-SGD's step sizes, and what each path can run."""
    check_task_batch(batch)
    check_inputs(params, batch)
    check_adapt_names(list(params), inner)
    check_lrs(lrs, params, inner)
    if vectorize:
        check_vmap(model, inner)
    else:
        check_running_stats(model)


def _meta_loss(
    model: nn.Module,
    params: Params,
    batch: TaskBatch,
    inner: InnerLoop,
    vectorize: bool,
    lrs: Mapping[str, Tensor] | None,
) -> Tensor:
    if vectorize:

        def one_task(x_spt: Tensor, y_spt: Tensor, x_qry: Tensor, y_qry: Tensor) -> Tensor:
            return task_loss(model, params, x_spt, y_spt, x_qry, y_qry, inner, lrs)

        return vmap(one_task)(*batch).mean()
    losses = [task_loss(model, params, *task, inner, lrs) for task in zip(*batch, strict=True)]
    return torch.stack(losses).mean()


def meta_loss(
    model: nn.Module,
    params: Params,
    batch: TaskBatch,
    inner: InnerLoop,
    vectorize: bool = VECTORIZE,
    lrs: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """Mean post-adaptation query loss over a meta-batch: the outer objective.

    Args:
        model: the network.
        params: meta-parameters theta (``name -> tensor``); usually ``get_params(model)``.
        batch: a :class:`TaskBatch` with ``B`` tasks, on the parameters' device and
            (floating-point tensors) in their dtype.
        inner: inner-loop settings.
        vectorize: ``False`` loops over tasks in Python; ``True`` maps
            :func:`task_loss` over the task dimension with ``torch.func.vmap``
            (refused where it would be wrong, :func:`check_vmap`).
        lrs: optional Meta-SGD step sizes.

    Returns:
        A scalar tensor; ``.backward()`` puts the meta-gradient on ``params``.

    Raises:
        ValueError: for a batch that does not fit (shapes, dtype, device, an empty
            support set), ``adapt_only`` names that match nothing, incomplete ``lrs``.
    """
    check_meta_batch(model, params, batch, inner, vectorize, lrs)
    try:
        return _meta_loss(model, params, batch, inner, vectorize, lrs)
    except RuntimeError as error:
        better = _input_error(error, batch)
        if better is None:
            raise
        raise better from error


def meta_gradient(
    model: nn.Module,
    batch: TaskBatch,
    inner: InnerLoop,
    vectorize: bool | None = None,
    params: Params | None = None,
    per_task: bool = False,
    lrs: Mapping[str, Tensor] | None = None,
) -> Params:
    """The meta-gradient d(meta_loss)/d(theta) as a dict, without touching ``.grad``.

    ``lrs`` are Meta-SGD's step sizes, used as in :func:`meta_loss` (the gradient
    returned is the one of ``params``; ``meta_loss(...).backward()`` reaches ``lrs`` too).
    With ``per_task=True`` (loop only) each task's query loss is backpropagated on
    its own and the gradients are summed, so only one task's graph is alive at a
    time: less memory, and on convolutional networks better use of the CPU's caches.
    ``vectorize=None`` means :data:`VECTORIZE`, or the loop when ``per_task=True``.
    """
    if vectorize is None:
        vectorize = VECTORIZE and not per_task
    params = get_params(model) if params is None else params
    names = list(params)
    if per_task:
        if vectorize:
            raise ValueError("per_task=True backpropagates task by task; it needs vectorize=False")
        check_meta_batch(model, params, batch, inner, False, lrs)
        total = {n: torch.zeros_like(params[n]) for n in names}
        for task in zip(*batch, strict=True):
            loss = task_loss(model, params, *task, inner, lrs) / batch.num_tasks
            grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
            for n, g in zip(names, grads, strict=True):
                if g is not None:
                    total[n] += g
        return total
    loss = meta_loss(model, params, batch, inner, vectorize, lrs)
    grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    return {n: torch.zeros_like(params[n]) if g is None else g for n, g in zip(names, grads, strict=True)}


def meta_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: TaskBatch,
    inner: InnerLoop,
    vectorize: bool = VECTORIZE,
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
    optimizer: torch.optim.Optimizer = optimizers[name](params, lr=meta_lr)
    return optimizer


def meta_gradient_fn(
    model: nn.Module,
    inner: InnerLoop,
    vectorize: bool = VECTORIZE,
    compile: bool = False,
    meta_sgd: bool = False,
) -> Callable[..., tuple[Params, Tensor]]:
    """A pure function ``(params, batch) -> (meta-gradient dict, meta-loss)``.

    The whole meta-gradient, outer derivative included, is one ``torch.func``
    transform (``grad_and_value`` of the meta-loss), so it can be handed to
    ``torch.compile``, which costs a compilation once and then removes much of the
    Python and dispatcher overhead that dominates small models such as the
    sinusoid network. ``params`` must not require grad (pass detached tensors).

    Compilation is an optimisation, never a requirement: where ``torch.compile``
    cannot build or run the function (no C++ compiler, generated code that does
    not compile for this CPU), the first failing call says so in one warning and
    this call and every later one run the same function eagerly (the same numbers
    up to rounding). An error that the eager function raises too is raised.
    The batch is checked (as by :func:`meta_loss`) before the transform runs.

    With ``meta_sgd=True`` (Meta-SGD) the function is
    ``(params, batch, lrs) -> ((params' gradient, lrs' gradient), meta-loss)``.
    """
    check_adapt_names(model, inner)

    def loss(params: Params, batch: TaskBatch, lrs: Params | None = None) -> Tensor:
        return _meta_loss(model, params, TaskBatch(*batch), inner, vectorize, lrs)

    fn = grad_and_value(loss, argnums=(0, 2) if meta_sgd else 0)
    if compile:
        import logging

        # torch's C++-extension helper logs a harmless "No CUDA runtime is found"
        # warning on CPU-only machines the first time inductor loads it.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        fn = _compiled_or_eager(fn)

    def checked(params: Params, batch: TaskBatch, *lrs: Params) -> tuple[Params, Tensor]:
        if len(lrs) != int(meta_sgd):
            raise ValueError("lrs: pass Meta-SGD's step sizes exactly when meta_gradient_fn(meta_sgd=True)")
        check_meta_batch(model, params, TaskBatch(*batch), inner, vectorize, lrs[0] if lrs else None)
        out: tuple[Params, Tensor] = fn(params, batch, *lrs)
        return out

    return checked


def max_abs_difference(a: Mapping[str, Tensor], b: Mapping[str, Tensor], relative: bool = False) -> float:
    """Largest absolute difference between two gradient dicts with the same names;
    ``relative=True`` divides it by the largest magnitude in ``b``."""
    if set(a) != set(b):
        raise ValueError(f"the gradients name different parameters: {sorted(set(a) ^ set(b))}")
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    return diff / max(v.abs().max().item() for v in b.values()) if relative else diff


def _compiled_or_eager(fn: Callable) -> Callable:
    """``torch.compile(fn)``, or ``fn`` itself (with one warning) from the first call that fails compiled."""
    import warnings

    compiled = torch.compile(fn)
    use = [compiled]

    def call(*args: Any) -> Any:
        if use[0] is fn:
            return fn(*args)
        try:
            return compiled(*args)
        except Exception as error:  # noqa: BLE001 - any failure of the compiler; the eager call below decides
            out = fn(*args)  # an error of the function itself is raised here, by the eager call
            use[0] = fn
            lines = str(error).strip().splitlines() or [""]
            reason = f"{type(error).__name__}: {lines[0]}"[:300]
            warnings.warn(
                f"torch.compile could not build or run the meta-gradient on this machine ({reason}); "
                f"running it eagerly instead (same numbers, slower)",
                RuntimeWarning,
                stacklevel=2,
            )
            return out

    return call
