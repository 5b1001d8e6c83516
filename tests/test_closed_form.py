"""The closed forms of metabp.closed_form against autograd."""

import pytest
import torch
import torch.nn.functional as F

from metabp.bilevel import InnerLoop, meta_gradient
from metabp.closed_form import (
    closed_form_meta_gradient,
    implicit_meta_gradient,
    least_squares_terms,
    linear_regression_tasks,
)


def test_linear_regression_tasks_shapes_and_seeding():
    batch = linear_regression_tasks(3, 6, 7, 4, generator=torch.Generator().manual_seed(0))
    assert batch.x_spt.shape == (3, 6, 4) and batch.y_spt.shape == (3, 6, 1)
    assert batch.x_qry.shape == (3, 7, 4) and batch.y_qry.shape == (3, 7, 1)
    assert batch.x_spt.dtype == torch.float64
    again = linear_regression_tasks(3, 6, 7, 4, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(batch, again, strict=True))
    with pytest.raises(ValueError, match="noise"):
        linear_regression_tasks(noise=-1.0)


def test_least_squares_terms_give_the_gradient():
    batch = linear_regression_tasks(1, 8, 3, 3, generator=torch.Generator().manual_seed(1))
    x, y = batch.x_spt[0], batch.y_spt[0]
    w = torch.randn(3, 1, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(((x @ w - y) ** 2).mean(), w)
    a, b = least_squares_terms(x, y)
    assert torch.allclose(g, a @ w.detach() - b, atol=1e-12)


@pytest.mark.parametrize("steps", [1, 5])
def test_closed_form_matches_bilevel(steps):
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1, bias=False).double()
    batch = linear_regression_tasks(generator=torch.Generator().manual_seed(2))
    got = meta_gradient(model, batch, InnerLoop("mse", 0.05, steps), vectorize=False)["weight"].T
    want = closed_form_meta_gradient(model.weight.detach().T, batch, 0.05, steps)
    assert torch.allclose(got, want, atol=1e-12, rtol=0)


def test_implicit_equals_the_limit_of_the_unrolled_proximal_loop():
    batch = linear_regression_tasks(generator=torch.Generator().manual_seed(3))
    w = torch.randn(5, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    lam, eta = 1.0, 0.2  # contraction |1 - eta (lam + mu)| < 0.8 for every eigenvalue mu of A
    theta = w.clone().requires_grad_(True)
    total = 0.0
    for xs, ys, xq, yq in zip(*batch, strict=True):
        phi = theta
        for _ in range(300):
            inner = F.mse_loss(xs @ phi, ys) + lam / 2 * ((phi - theta) ** 2).sum()
            (g,) = torch.autograd.grad(inner, phi, create_graph=True)
            phi = phi - eta * g
        total = total + F.mse_loss(xq @ phi, yq)
    (unrolled,) = torch.autograd.grad(total / batch.num_tasks, theta)
    assert torch.allclose(unrolled, implicit_meta_gradient(w, batch, lam), atol=1e-10, rtol=0)


def test_implicit_tends_to_the_first_order_gradient_for_large_lambda():
    # lam -> infinity pins phi* to w, so the Jacobian tends to the identity.
    batch = linear_regression_tasks(generator=torch.Generator().manual_seed(5))
    w = torch.zeros(5, 1, dtype=torch.float64)
    got = implicit_meta_gradient(w, batch, 1e8)
    want = closed_form_meta_gradient(w, batch, 1.0, 0)  # zero steps: the query gradient at w
    assert torch.allclose(got, want, atol=1e-6)
