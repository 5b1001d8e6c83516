"""Closed-form meta-gradients for least-squares linear regression.

For a linear model ``f(x) = x^T w`` and the mean squared error, the support loss
``L_s(w) = |X w - y|^2 / n`` has gradient ``A w - b`` with ``A = 2 X^T X / n`` and
``b = 2 X^T y / n``, and a constant Hessian ``A``. Both ways of making the
adapted weights depend on the initialisation ``w`` then have exact formulas:

* unrolled (MAML): ``k`` steps ``w_j = w_{j-1} - alpha (A w_{j-1} - b)`` give
  ``d w_k / d w = (I - alpha A)^k``;
* implicit (iMAML, Rajeswaran et al., 2019): the minimiser ``phi*`` of
  ``L_s(phi) + lam/2 |phi - w|^2`` has ``d phi* / d w = (I + A / lam)^{-1}``.

The meta-gradient of the query loss is the transposed Jacobian times the query
gradient at the adapted weights. The tests and chapter 4 check the automatic
differentiation of :mod:`metabp.bilevel` against these formulas. They do not use
the core's :func:`~metabp.bilevel.inner_step` on purpose: a reference computed
by the code it checks would prove nothing.

Weights are column vectors ``(dim, 1)``; a batch is a
:class:`~metabp.tasks.TaskBatch` of float tensors ``x (B, n, dim)``, ``y (B, n, 1)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .checks import nonnegative_int, positive_float, positive_int
from .tasks import TaskBatch, check_task_batch


def least_squares_terms(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``(A, b)`` with ``A = 2 X^T X / n`` and ``b = 2 X^T y / n``: ``grad L(w) = A w - b``."""
    n = x.shape[0]
    return 2 * x.T @ x / n, 2 * x.T @ y / n


def query_gradient(x: Tensor, y: Tensor, w: Tensor) -> Tensor:
    """Gradient of ``|X w - y|^2 / n`` at ``w``."""
    return 2 * x.T @ (x @ w - y) / x.shape[0]


def closed_form_meta_gradient(
    w: Tensor, batch: TaskBatch, alpha: float, steps: int, first_order: bool = False
) -> Tensor:
    """Analytic MAML meta-gradient for least squares, mean over the tasks of ``batch``.

    Starting from ``w_0 = w``, each step is ``w_k = w_{k-1} - alpha (A w_{k-1} - b)``, so after
    ``steps`` steps ``d w_k / d w = (I - alpha A)^k``
    and the meta-gradient is ``((I - alpha A)^k)^T grad L_q(w_k)``; with ``first_order`` the
    Jacobian is replaced by the identity (first-order MAML).
    """
    check_task_batch(batch)
    positive_float("alpha", alpha)
    nonnegative_int("steps", steps)
    dim = w.shape[0]
    total = torch.zeros_like(w)
    for xs, ys, xq, yq in zip(*batch, strict=True):
        a, b = least_squares_terms(xs, ys)
        wk = w.clone()
        for _ in range(steps):
            wk = wk - alpha * (a @ wk - b)
        grad_q = query_gradient(xq, yq, wk)
        jac = torch.linalg.matrix_power(torch.eye(dim, dtype=w.dtype) - alpha * a, steps)
        total += grad_q if first_order else jac.T @ grad_q
    return total / batch.x_spt.shape[0]


def implicit_meta_gradient(w: Tensor, batch: TaskBatch, lam: float) -> Tensor:
    """Analytic implicit (iMAML) meta-gradient for least squares, mean over tasks.

    The inner problem ``min_phi L_s(phi) + lam/2 |phi - w|^2`` has the solution
    ``phi* = (A + lam I)^{-1} (b + lam w)``, whose Jacobian is
    ``d phi*/d w = lam (A + lam I)^{-1} = (I + A/lam)^{-1}``; the meta-gradient is that
    (symmetric) matrix times ``grad L_q(phi*)``.
    """
    check_task_batch(batch)
    positive_float("lam", lam)
    eye = torch.eye(w.shape[0], dtype=w.dtype)
    total = torch.zeros_like(w)
    for xs, ys, xq, yq in zip(*batch, strict=True):
        a, b = least_squares_terms(xs, ys)
        phi = torch.linalg.solve(a + lam * eye, b + lam * w)
        total += lam * torch.linalg.solve(a + lam * eye, query_gradient(xq, yq, phi))
    return total / batch.x_spt.shape[0]


def linear_regression_tasks(
    num_tasks: int = 4,
    shots: int = 10,
    queries: int = 10,
    dim: int = 5,
    noise: float = 0.1,
    generator: torch.Generator | None = None,
) -> TaskBatch:
    """Float64 linear-regression tasks ``y = x^T w_task + noise``, ``w_task ~ N(0, I)``.

    Returns a :class:`~metabp.tasks.TaskBatch` with ``x (B, n, dim)`` and ``y (B, n, 1)``.
    """
    positive_int("num_tasks", num_tasks)
    positive_int("shots", shots)
    positive_int("queries", queries)
    positive_int("dim", dim)
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
        raise ValueError(f"noise must be a number >= 0, got {noise!r}")
    f64 = torch.float64
    w_task = torch.randn(num_tasks, dim, 1, generator=generator, dtype=f64)
    xs = torch.randn(num_tasks, shots, dim, generator=generator, dtype=f64)
    xq = torch.randn(num_tasks, queries, dim, generator=generator, dtype=f64)
    ys = xs @ w_task + noise * torch.randn(num_tasks, shots, 1, generator=generator, dtype=f64)
    yq = xq @ w_task + noise * torch.randn(num_tasks, queries, 1, generator=generator, dtype=f64)
    return TaskBatch(xs, ys, xq, yq)
