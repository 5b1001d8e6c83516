"""Two meta-updates that do not backpropagate through the inner loop: Reptile and implicit MAML.

Both adapt with the core's inner step (:func:`metabp.bilevel.inner_step`: Reptile
on the support loss, implicit MAML on its proximal objective) and differ from MAML
only in how the outer update is formed.

* **Reptile** (Nichol et al., 2018): adapt each task with ``k`` plain SGD steps
  and move the initialisation towards the adapted weights,
  ``theta <- theta + epsilon * mean_i(theta'_i - theta)``. No second derivative
  and no graph of the inner loop; :func:`reptile_gradient` returns
  ``theta - mean_i theta'_i``, which an optimiser can use as a gradient (plain SGD
  with learning rate ``epsilon`` is exactly Reptile's update; Nichol et al. also
  feed it to Adam).
* **Implicit MAML** (Rajeswaran et al., 2019): the inner problem is
  ``min_phi L_s(phi) + lam/2 |phi - theta|^2``. At its minimiser
  ``d phi* / d theta = (I + H/lam)^{-1}`` with ``H`` the Hessian of the support loss,
  so the task's meta-gradient is the solution ``v`` of ``(I + H/lam) v = grad L_q(phi*)``.
  :func:`implicit_meta_gradient` solves it by conjugate gradients with
  Hessian-vector products, never forming ``H``. The inner loop runs without an
  autograd graph, so memory does not grow with the number of inner steps.

Meta-SGD, the third variant of chapter 8, needs no module of its own: it is MAML
with learned step sizes, :func:`metabp.bilevel.init_lrs`. :func:`train_learner`
meta-trains any of chapter 8's five learners (MAML, first-order MAML, Meta-SGD,
Reptile, implicit MAML) under one protocol and scores each the way it adapts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.func import grad, grad_and_value, vjp, vmap

from .bilevel import VECTORIZE, InnerLoop, Params, adapt, check_adapt_names, forward, get_params, init_lrs
from .checks import one_of, positive_float, positive_int
from .evaluation import adaptation_curve
from .tasks import TaskBatch, check_task_batch
from .training import History, Sampler, meta_train


def _detached(model: nn.Module, params: Params | None) -> Params:
    return {k: v.detach() for k, v in (get_params(model) if params is None else params).items()}


# ---------------------------------------------------------------------------- Reptile


def reptile_gradient(
    model: nn.Module,
    batch: TaskBatch,
    inner: InnerLoop,
    params: Params | None = None,
    use_query: bool = True,
    vectorize: bool = VECTORIZE,
) -> tuple[Params, Tensor]:
    """Reptile's update direction as a gradient: ``theta - mean_i theta'_i``.

    Args:
        model: the network.
        batch: a meta-batch of ``B`` tasks.
        inner: the inner SGD (``inner_lr``, ``inner_steps``; always first order here).
        params: meta-parameters theta (default the model's own).
        use_query: adapt on each task's support *and* query examples (Reptile needs
            no split, so it can use all of a task's data); ``False`` uses the support
            set only.
        vectorize: ``vmap`` over tasks (True) or a Python loop.

    Returns:
        ``(gradient, loss)``: the pseudo-gradient (``name -> tensor``, no graph) and
        the mean loss of the adapted weights on the data they were adapted on.
    """
    check_task_batch(batch)
    theta = _detached(model, params)
    sgd = replace(inner, first_order=True)
    x, y = batch.x_spt, batch.y_spt
    if use_query:
        x, y = torch.cat([x, batch.x_qry], 1), torch.cat([y, batch.y_qry], 1)

    def one_task(x_t: Tensor, y_t: Tensor) -> tuple[Params, Tensor]:
        adapted = adapt(model, theta, x_t, y_t, sgd)
        return adapted, inner.loss_fn(forward(model, adapted, x_t), y_t)

    with torch.no_grad():
        if vectorize:
            adapted, losses = vmap(one_task)(x, y)
            mean = {k: v.mean(0) for k, v in adapted.items()}
        else:
            results = [one_task(x_t, y_t) for x_t, y_t in zip(x, y, strict=True)]
            mean = {k: torch.stack([r[0][k] for r in results]).mean(0) for k in theta}
            losses = torch.stack([r[1] for r in results])
    return {k: theta[k] - mean[k] for k in theta}, losses.mean()


def reptile_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: TaskBatch,
    inner: InnerLoop,
    use_query: bool = True,
    vectorize: bool = VECTORIZE,
) -> float:
    """One Reptile update: put :func:`reptile_gradient` in ``.grad`` and step ``optimizer``.

    With ``torch.optim.SGD(model.parameters(), lr=epsilon)`` this is exactly
    ``theta <- theta + epsilon * mean_i(theta'_i - theta)``. Returns the mean
    post-adaptation loss on the adaptation data, as a float.
    """
    grads, loss = reptile_gradient(model, batch, inner, use_query=use_query, vectorize=vectorize)
    optimizer.zero_grad(set_to_none=True)
    for name, p in model.named_parameters():
        p.grad = grads[name]
    optimizer.step()
    return loss.item()


# ---------------------------------------------------------------------- implicit MAML


def proximal_adapt(
    model: nn.Module,
    params: Params,
    anchor: Params,
    x: Tensor,
    y: Tensor,
    inner: InnerLoop,
    lam: float,
) -> Params:
    """Gradient descent on the proximal inner problem ``L_s(phi) + lam/2 |phi - anchor|^2``.

    ``inner.inner_steps`` calls of the core's :func:`~metabp.bilevel.inner_step` on
    that objective, starting from ``params``: step size ``inner.inner_lr``, only the
    parameters ``inner.adapt_only`` names move, and ``inner.first_order`` detaches
    the steps' gradients. The steps are ordinary differentiable expressions: called
    with ``params`` and ``anchor`` both equal to theta (with autograd tracking), the
    result can be backpropagated to theta, which gives the *unrolled* meta-gradient
    of the proximal problem; :func:`implicit_meta_gradient` calls it on detached tensors.
    """
    positive_float("lam", lam)
    check_adapt_names(list(params), inner)
    loss_fn = inner.loss_fn

    def objective(phi: Params) -> Tensor:
        penalty = sum(((phi[k] - anchor[k]) ** 2).sum() for k in phi)
        return loss_fn(forward(model, phi, x), y) + lam / 2 * penalty

    return adapt(model, dict(params), x, y, inner, objective=objective)


def conjugate_gradient(matvec: Callable[[Params], Params], b: Params, steps: int) -> Params:
    """Approximately solve ``A v = b`` for a symmetric ``A`` given as ``matvec``, by conjugate gradients.

    ``steps`` iterations from ``v = 0`` on dicts of tensors, exact after as many
    steps as there are unknowns when ``A`` is positive definite (in exact arithmetic).
    If a search direction ``p`` with ``p^T A p <= 0`` turns up (``I + H/lam`` is
    indefinite when the support loss curves down more steeply than ``lam``), the
    iteration stops there and returns the last iterate (truncated CG, as in
    Steihaug's method). There is no branch in Python, so it runs inside ``vmap``.
    """
    positive_int("steps", steps)
    tiny = torch.finfo(next(iter(b.values())).dtype).tiny

    def dot(u: Params, w: Params) -> Tensor:
        return cast(Tensor, sum((u[k] * w[k]).sum() for k in u))  # a tensor: u is never empty

    v = {k: torch.zeros_like(t) for k, t in b.items()}
    r = dict(b)
    p = dict(b)
    rr = dot(r, r)
    stopped = torch.zeros_like(rr, dtype=torch.bool)
    for _ in range(steps):
        ap = matvec(p)
        pap = dot(p, ap)
        stopped = stopped | (pap <= 0)
        alpha = torch.where(stopped, torch.zeros_like(rr), rr / (pap.abs() + tiny))
        v = {k: v[k] + alpha * p[k] for k in v}
        r = {k: r[k] - alpha * ap[k] for k in r}
        rr_new = dot(r, r)
        beta = rr_new / (rr + tiny)
        p = {k: r[k] + beta * p[k] for k in p}
        rr = rr_new
    return v


def implicit_task_gradient(
    model: nn.Module,
    theta: Params,
    x_spt: Tensor,
    y_spt: Tensor,
    x_qry: Tensor,
    y_qry: Tensor,
    inner: InnerLoop,
    lam: float,
    cg_steps: int,
) -> tuple[Params, Tensor]:
    """One task's implicit meta-gradient ``(I + H/lam)^{-1} grad L_q(phi)`` and its query loss.

    ``phi`` is the end point of :func:`proximal_adapt` from ``theta``; ``H`` the
    Hessian of the support loss at ``phi``, applied by differentiating the gradient
    map once more (``vjp`` of ``grad``, as in chapter 4). ``theta`` must not require grad.
    """
    loss_fn = inner.loss_fn
    phi = proximal_adapt(model, theta, theta, x_spt, y_spt, inner, lam)

    def support_loss(p: Params) -> Tensor:
        return loss_fn(forward(model, p, x_spt), y_spt)

    def query_loss(p: Params) -> Tensor:
        return loss_fn(forward(model, p, x_qry), y_qry)

    g_q, value = grad_and_value(query_loss)(phi)
    # v -> H^T v = H v, H never formed. torch.func.vjp's annotation promises 3 items, but
    # without has_aux it returns 2.
    _, hessian_vector = vjp(grad(support_loss), phi)  # type: ignore[misc]  # see above

    def matvec(v: Params) -> Params:
        (hv,) = hessian_vector(v)
        return {k: v[k] + hv[k] / lam for k in v}

    return conjugate_gradient(matvec, g_q, cg_steps), value


def implicit_meta_gradient(
    model: nn.Module,
    batch: TaskBatch,
    inner: InnerLoop,
    lam: float = 1.0,
    cg_steps: int = 5,
    params: Params | None = None,
    vectorize: bool = VECTORIZE,
) -> tuple[Params, Tensor]:
    """The implicit MAML meta-gradient of a meta-batch (Rajeswaran et al., 2019).

    Args:
        model: the network.
        batch: a meta-batch of ``B`` tasks.
        inner: ``inner_lr`` and ``inner_steps`` of the gradient descent on the
            proximal inner problem (``first_order`` is irrelevant: nothing is unrolled).
        lam: strength lambda of the proximal term; large values tie the adapted
            weights to theta (the meta-gradient tends to the first-order one),
            small values let them move.
        cg_steps: conjugate-gradient iterations (the paper uses about 5).
        params: meta-parameters (default the model's own); they are detached.
        vectorize: ``vmap`` over tasks (True) or a Python loop.

    Returns:
        ``(gradient, loss)``: the mean over tasks of the implicit meta-gradients
        (``name -> tensor``, no graph) and the mean post-adaptation query loss.
    """
    check_task_batch(batch)
    positive_float("lam", lam)
    positive_int("cg_steps", cg_steps)
    if inner.adapt_only is not None:
        raise ValueError(f"implicit MAML adapts every parameter here; got adapt_only={inner.adapt_only!r}")
    theta = _detached(model, params)

    def one_task(x_spt: Tensor, y_spt: Tensor, x_qry: Tensor, y_qry: Tensor) -> tuple[Params, Tensor]:
        return implicit_task_gradient(model, theta, x_spt, y_spt, x_qry, y_qry, inner, lam, cg_steps)

    with torch.no_grad():
        if vectorize:
            grads, losses = vmap(one_task)(*batch)
            return {k: v.mean(0) for k, v in grads.items()}, losses.mean()
        results = [one_task(*task) for task in zip(*batch, strict=True)]
    grads = {k: torch.stack([r[0][k] for r in results]).mean(0) for k in theta}
    return grads, torch.stack([r[1] for r in results]).mean()


def proximal_query_loss(
    model: nn.Module, batch: TaskBatch, inner: InnerLoop, lam: float, params: Params | None = None
) -> Tensor:
    """Query loss of every task after :func:`proximal_adapt` on its support set, ``(B,)``, no graph.

    How an implicit-MAML learner is evaluated: it adapts at test time with the inner
    loop it was meta-trained for.
    """
    check_task_batch(batch)
    theta = _detached(model, params)

    def one_task(x_spt: Tensor, y_spt: Tensor, x_qry: Tensor, y_qry: Tensor) -> Tensor:
        phi = proximal_adapt(model, theta, theta, x_spt, y_spt, inner, lam)
        return inner.loss_fn(forward(model, phi, x_qry), y_qry)

    with torch.no_grad():
        return vmap(one_task)(*batch)


def implicit_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: TaskBatch,
    inner: InnerLoop,
    lam: float = 1.0,
    cg_steps: int = 5,
    vectorize: bool = VECTORIZE,
) -> float:
    """One implicit MAML update; returns the mean post-adaptation query loss as a float."""
    grads, loss = implicit_meta_gradient(model, batch, inner, lam, cg_steps, vectorize=vectorize)
    optimizer.zero_grad(set_to_none=True)
    for name, p in model.named_parameters():
        p.grad = grads[name]
    optimizer.step()
    return loss.item()


# ------------------------------------------------------------ five learners, one protocol

#: The names :func:`train_learner` knows, in chapter 8's order.
LEARNERS = ("MAML", "first-order MAML", "Meta-SGD", "Reptile", "implicit MAML")


def train_learner(
    name: str,
    model: nn.Module,
    sample: Sampler,
    iterations: int,
    inner_lr: float = 0.01,
    steps: int = 5,
    lam: float = 10.0,
    cg_steps: int = 5,
    loss: str = "mse",
    meta_batch_size: int = 25,
    meta_lr: float = 1e-3,
    cosine: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> tuple[Callable[[TaskBatch], Tensor], History]:
    """Meta-train ``model`` in place as one of the five learners of chapter 8; return how to score it.

    Each learner is one call of :func:`metabp.training.meta_train` with the same outer
    loop (``meta_batch_size``, ``meta_lr``, ``cosine``, ``seed``) and its own inner loop
    or outer update:

    * ``'MAML'`` (Finn et al., 2017) and ``'first-order MAML'``: one inner step of
      ``inner_lr``, the exact or the first-order meta-gradient;
    * ``'Meta-SGD'`` (Li et al., 2017): the same step with a learned step size per
      parameter entry, :func:`~metabp.bilevel.init_lrs` at ``inner_lr``;
    * ``'Reptile'`` (Nichol et al., 2018): ``steps`` inner steps on all of a task's
      examples, then :func:`reptile_step`;
    * ``'implicit MAML'`` (Rajeswaran et al., 2019): ``steps`` steps on the proximal
      problem of ``lam``, then :func:`implicit_step` with ``cg_steps``
      conjugate-gradient steps.

    Args:
        name: one of :data:`LEARNERS`.
        model: the network, meta-trained in place (seed it before building it).
        sample: ``sample(meta_batch_size, generator) -> TaskBatch``, e.g. a
            :class:`~metabp.tasks.SinusoidTasks`.
        iterations: meta-steps.
        inner_lr: the inner step size (Meta-SGD's initial one).
        steps, lam, cg_steps: Reptile's and implicit MAML's inner steps, implicit
            MAML's proximal weight and conjugate-gradient steps.
        loss: the inner and query loss ('mse', 'cross_entropy').
        meta_batch_size, meta_lr, cosine, seed, progress: the outer loop, as in
            :func:`~metabp.training.meta_train`.

    Returns:
        ``score(batch) -> (B,)``: each held-out task's query loss after the learner's
        own test-time adaptation, the one it was trained for (one step for the MAML
        family, with the learned step sizes for Meta-SGD; ``steps`` steps for Reptile;
        ``steps`` proximal steps for implicit MAML), and the training
        :class:`~metabp.training.History`.

    Raises:
        ValueError: ``name`` is not one of :data:`LEARNERS` (the message lists them),
            or another argument is out of range.
    """
    one_of("name", name, LEARNERS)
    positive_int("steps", steps)
    positive_int("cg_steps", cg_steps)
    positive_float("lam", lam)
    common: dict[str, Any] = dict(
        meta_batch_size=meta_batch_size, meta_lr=meta_lr, cosine=cosine, seed=seed, progress=progress
    )
    one_step = InnerLoop(loss, inner_lr, 1)
    many_steps = InnerLoop(loss, inner_lr, steps)
    if name in ("MAML", "first-order MAML"):
        inner = InnerLoop(loss, inner_lr, 1, first_order=name == "first-order MAML")
        history = meta_train(model, sample, inner, iterations, **common)

        def score(test: TaskBatch) -> Tensor:
            return adaptation_curve(model, test, one_step, [1])[0]

    elif name == "Meta-SGD":
        lrs = init_lrs(model, inner_lr)
        history = meta_train(model, sample, one_step, iterations, lrs=lrs, **common)

        def score(test: TaskBatch) -> Tensor:
            return adaptation_curve(model, test, one_step, [1], lrs=lrs)[0]

    elif name == "Reptile":
        step = partial(reptile_step, inner=many_steps)
        history = meta_train(model, sample, many_steps, iterations, step=step, **common)

        def score(test: TaskBatch) -> Tensor:
            return adaptation_curve(model, test, many_steps, [steps])[0]

    else:  # implicit MAML
        step = partial(implicit_step, inner=many_steps, lam=lam, cg_steps=cg_steps)
        history = meta_train(model, sample, many_steps, iterations, step=step, **common)

        def score(test: TaskBatch) -> Tensor:
            return proximal_query_loss(model, test, many_steps, lam)

    return score, history
