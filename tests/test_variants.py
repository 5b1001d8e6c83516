"""Reptile, Meta-SGD and implicit MAML against hand computations and the unrolled meta-gradient."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from metabp.bilevel import InnerLoop, forward, get_params, init_lrs, meta_loss
from metabp.closed_form import implicit_meta_gradient as closed_form_implicit
from metabp.closed_form import least_squares_terms, linear_regression_tasks, query_gradient
from metabp.evaluation import adaptation_curve
from metabp.models import SineNet
from metabp.tasks import SinusoidTasks, TaskBatch
from metabp.training import meta_train
from metabp.variants import (
    LEARNERS,
    conjugate_gradient,
    implicit_meta_gradient,
    implicit_step,
    proximal_adapt,
    proximal_query_loss,
    reptile_gradient,
    reptile_step,
    train_learner,
)

F64 = torch.float64


def linear_model(dim: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(dim, 1, bias=False).double()


# ------------------------------------------------------------------------ Reptile


@pytest.mark.parametrize("use_query", [True, False])
def test_reptile_update_equals_hand_computation(use_query):
    dim, alpha, steps, epsilon = 4, 0.05, 3, 0.3
    model = linear_model(dim)
    batch = linear_regression_tasks(
        num_tasks=3, shots=6, queries=5, dim=dim, generator=torch.Generator().manual_seed(1)
    )
    w = model.weight.detach().T.clone()  # (dim, 1)

    adapted = []
    for xs, ys, xq, yq in zip(*batch, strict=True):
        x, y = (torch.cat([xs, xq]), torch.cat([ys, yq])) if use_query else (xs, ys)
        a, b = least_squares_terms(x, y)
        wk = w.clone()
        for _ in range(steps):
            wk = wk - alpha * (a @ wk - b)
        adapted.append(wk)
    expected = w + epsilon * (torch.stack(adapted).mean(0) - w)

    opt = torch.optim.SGD(model.parameters(), lr=epsilon)
    reptile_step(model, opt, batch, InnerLoop("mse", alpha, steps), use_query=use_query)
    assert torch.allclose(model.weight.detach().T, expected, atol=1e-12)


def test_reptile_loop_and_vmap_agree_and_carry_no_graph():
    model = SineNet(hidden=8).double()
    batch = SinusoidTasks(shots=5, queries=5).sample(4, torch.Generator().manual_seed(2), F64)
    inner = InnerLoop("mse", 0.02, 3)
    g_vmap, l_vmap = reptile_gradient(model, batch, inner, vectorize=True)
    g_loop, l_loop = reptile_gradient(model, batch, inner, vectorize=False)
    for k in g_vmap:
        assert g_vmap[k].grad_fn is None
        assert torch.allclose(g_vmap[k], g_loop[k], atol=1e-12), k
    assert torch.isclose(l_vmap, l_loop)
    assert max(g.abs().max() for g in g_vmap.values()) > 1e-4


def test_meta_train_with_reptile_step_moves_parameters():
    torch.manual_seed(0)
    model = SineNet(hidden=8)
    before = [p.detach().clone() for p in model.parameters()]
    inner = InnerLoop("mse", 0.02, 3)
    history = meta_train(
        model,
        SinusoidTasks(),
        inner,
        iterations=3,
        meta_batch_size=4,
        progress=False,
        step=lambda m, opt, b: reptile_step(m, opt, b, inner),
    )
    assert len(history.loss) == 3
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    with pytest.raises(ValueError, match="step replaces"):
        meta_train(
            model, SinusoidTasks(), inner, iterations=1, compile=True, progress=False, step=lambda m, opt, b: 0.0
        )


# ----------------------------------------------------------------------- Meta-SGD


def test_init_lrs_shapes_and_adapt_filter():
    model = SineNet(hidden=8)
    lrs = init_lrs(model, 0.01)
    assert set(lrs) == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        assert lrs[name].shape == p.shape and lrs[name].requires_grad and lrs[name].is_leaf
        assert torch.all(lrs[name] == 0.01)
    head_only = init_lrs(model, 0.1, InnerLoop("mse", 0.1, 1, adapt_only=("net.4",)))
    assert set(head_only) == {"net.4.weight", "net.4.bias"}
    with pytest.raises(ValueError, match="value"):
        init_lrs(model, 0.0)


def test_meta_sgd_gradient_reaches_the_learning_rates():
    # One step theta' = theta - lr * g_s, so d L_q(theta') / d lr = -g_s * grad L_q(theta'), entrywise.
    dim = 3
    model = linear_model(dim, seed=3)
    batch = linear_regression_tasks(
        num_tasks=2, shots=5, queries=4, dim=dim, generator=torch.Generator().manual_seed(4)
    )
    lrs = init_lrs(model, 0.07)
    loss = meta_loss(model, get_params(model), batch, InnerLoop("mse", 0.5, 1), vectorize=False, lrs=lrs)
    loss.backward()

    w = model.weight.detach().T
    expected = torch.zeros_like(w)
    for xs, ys, xq, yq in zip(*batch, strict=True):
        g_s = query_gradient(xs, ys, w)
        expected += -g_s * query_gradient(xq, yq, w - 0.07 * g_s)
    expected /= batch.num_tasks
    assert torch.allclose(lrs["weight"].grad, expected.T, atol=1e-12)
    assert model.weight.grad is not None


def test_meta_train_updates_meta_sgd_learning_rates():
    torch.manual_seed(0)
    model = SineNet(hidden=8)
    lrs = init_lrs(model, 0.01)
    meta_train(
        model,
        SinusoidTasks(),
        InnerLoop("mse", 0.01, 1),
        iterations=3,
        meta_batch_size=4,
        meta_lr=0.01,
        lrs=lrs,
        progress=False,
    )
    assert any(not torch.all(v == 0.01) for v in lrs.values())


# ------------------------------------------------------------------ implicit MAML


def test_conjugate_gradient_solves_a_linear_system():
    torch.manual_seed(0)
    m = torch.randn(6, 6, dtype=F64)
    a = m @ m.T + 6 * torch.eye(6, dtype=F64)
    b = {"x": torch.randn(6, dtype=F64)}
    v = conjugate_gradient(lambda u: {"x": a @ u["x"]}, b, steps=6)
    assert torch.allclose(v["x"], torch.linalg.solve(a, b["x"]), atol=1e-10)


def test_implicit_meta_gradient_matches_closed_form_on_least_squares():
    dim, lam = 4, 2.0
    model = linear_model(dim, seed=5)
    batch = linear_regression_tasks(
        num_tasks=3, shots=8, queries=6, dim=dim, generator=torch.Generator().manual_seed(6)
    )
    # enough inner steps for the proximal problem to converge, one CG step per unknown
    inner = InnerLoop("mse", 0.1, 400)
    got, _ = implicit_meta_gradient(model, batch, inner, lam=lam, cg_steps=dim)
    want = closed_form_implicit(model.weight.detach().T, batch, lam)
    assert torch.allclose(got["weight"], want.T, atol=1e-10)


def unrolled_proximal_meta_gradient(model, batch, inner, lam):
    """Autograd through every step of the proximal inner loop (MAML-style), for comparison."""
    theta = get_params(model)
    losses = []
    for xs, ys, xq, yq in zip(*batch, strict=True):
        phi = proximal_adapt(model, theta, theta, xs, ys, inner, lam)
        losses.append(inner.loss_fn(forward(model, phi, xq), yq))
    loss = torch.stack(losses).mean()
    return dict(zip(theta, torch.autograd.grad(loss, list(theta.values())), strict=True))


def smooth_net() -> nn.Module:
    # tanh, not ReLU: the implicit function theorem needs a smooth support loss, and
    # lam large enough that the proximal inner problem is strongly convex
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(1, 6), nn.Tanh(), nn.Linear(6, 1)).double()


def test_implicit_meta_gradient_equals_converged_unrolled_one():
    # Once the proximal inner problem is solved, backpropagating through the unrolled
    # solver and the implicit formula (I + H/lam)^{-1} grad L_q must give the same vector.
    model = smooth_net()
    n_params = sum(p.numel() for p in model.parameters())
    batch = SinusoidTasks(shots=6, queries=6).sample(2, torch.Generator().manual_seed(8), F64)
    inner, lam = InnerLoop("mse", 0.05, 300), 5.0
    want = unrolled_proximal_meta_gradient(model, batch, inner, lam)
    scale = max(w.abs().max().item() for w in want.values())
    assert scale > 1e-3
    for vectorize in (True, False):
        got, _ = implicit_meta_gradient(model, batch, inner, lam=lam, cg_steps=n_params, vectorize=vectorize)
        for k in want:
            assert got[k].grad_fn is None
            assert torch.allclose(got[k], want[k], atol=1e-9 * scale), (vectorize, k)


def test_implicit_meta_gradient_differs_from_unrolled_before_convergence():
    # The check above is not vacuous: with one inner step the two are different quantities.
    model = smooth_net()
    batch = SinusoidTasks(shots=6, queries=6).sample(3, torch.Generator().manual_seed(8), F64)
    inner, lam = InnerLoop("mse", 0.02, 1), 5.0
    got, _ = implicit_meta_gradient(model, batch, inner, lam=lam, cg_steps=19)
    want = unrolled_proximal_meta_gradient(model, batch, inner, lam)
    assert max((got[k] - want[k]).abs().max().item() for k in want) > 1e-4


def test_implicit_arguments_are_checked():
    model = SineNet(hidden=4)
    batch = SinusoidTasks().sample(2)
    with pytest.raises(ValueError, match="lam"):
        implicit_meta_gradient(model, batch, InnerLoop(), lam=0.0)
    with pytest.raises(ValueError, match="cg_steps"):
        implicit_meta_gradient(model, batch, InnerLoop(), cg_steps=0)
    with pytest.raises(ValueError, match="tasks"):
        implicit_meta_gradient(model, TaskBatch(*batch[:3], batch.y_qry[:1]), InnerLoop())


# ------------------------------------------------------------ train_learner (chapter 8's five learners)


def explicit_learner(name, model, sample, iterations, alpha, steps, lam, cg_steps, **common):
    """The explicit calls that ``train_learner`` replaces (chapter 8's code before it had a library home)."""
    one_step, many = InnerLoop("mse", alpha, 1), InnerLoop("mse", alpha, steps)
    if name in ("MAML", "first-order MAML"):
        inner = InnerLoop("mse", alpha, 1, first_order=name == "first-order MAML")
        history = meta_train(model, sample, inner, iterations, **common)
        return (lambda test: adaptation_curve(model, test, one_step, [1])[0]), history
    if name == "Meta-SGD":
        lrs = init_lrs(model, alpha)
        history = meta_train(model, sample, one_step, iterations, lrs=lrs, **common)
        return (lambda test: adaptation_curve(model, test, one_step, [1], lrs=lrs)[0]), history
    if name == "Reptile":
        step = lambda m, opt, b: reptile_step(m, opt, b, many)  # noqa: E731
        history = meta_train(model, sample, many, iterations, step=step, **common)
        return (lambda test: adaptation_curve(model, test, many, [steps])[0]), history
    step = lambda m, opt, b: implicit_step(m, opt, b, many, lam, cg_steps)  # noqa: E731
    history = meta_train(model, sample, many, iterations, step=step, **common)
    return (lambda test: proximal_query_loss(model, test, many, lam)), history


# settings at which every learner learns in a few dozen meta-steps (chapter 8's alpha = 0.01,
# lam = 10 leave implicit MAML's adaptation too weak to show progress that soon)
LEARNER_ARGS = dict(alpha=0.03, steps=3, lam=0.5, cg_steps=3)
COMMON = dict(meta_batch_size=5, meta_lr=0.02, cosine=True, seed=1, progress=False)


def _helper(name, model, sample, iterations):
    a = LEARNER_ARGS
    return train_learner(
        name, model, sample, iterations, a["alpha"], a["steps"], a["lam"], a["cg_steps"], "mse", **COMMON
    )


@pytest.mark.parametrize("name", LEARNERS)
def test_train_learner_is_the_explicit_calls_it_replaces(name):
    test = SinusoidTasks(shots=5, queries=10).sample(20, torch.Generator().manual_seed(3))
    runs = []
    for train in (_helper, lambda *args: explicit_learner(*args, **LEARNER_ARGS, **COMMON)):
        torch.manual_seed(0)
        model = SineNet(hidden=16)
        score, history = train(name, model, SinusoidTasks(shots=5, queries=5), 4)
        runs.append((model, score(test), history.loss))
    (a, score_a, loss_a), (b, score_b, loss_b) = runs
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert torch.equal(score_a, score_b) and loss_a == loss_b and len(loss_a) == 4


@pytest.mark.parametrize("name", LEARNERS)
def test_every_learner_lowers_its_own_test_error(name):
    test = SinusoidTasks(shots=5, queries=20).sample(100, torch.Generator().manual_seed(7))
    torch.manual_seed(0)
    untrained = SineNet()
    alpha, steps, lam = LEARNER_ARGS["alpha"], LEARNER_ARGS["steps"], LEARNER_ARGS["lam"]
    # each learner's own test-time adaptation of the untrained network (Meta-SGD's step sizes start at alpha)
    before = {
        "Reptile": adaptation_curve(untrained, test, InnerLoop("mse", alpha, steps), [steps])[0],
        "implicit MAML": proximal_query_loss(untrained, test, InnerLoop("mse", alpha, steps), lam),
    }.get(name, adaptation_curve(untrained, test, InnerLoop("mse", alpha, 1), [1])[0])
    model = copy.deepcopy(untrained)
    score, history = _helper(name, model, SinusoidTasks(shots=5, queries=5), 60)
    after = score(test)
    assert after.shape == (100,) and torch.isfinite(after).all() and len(history.loss) == 60
    # measured after / before: 0.83 to 0.87 over the five learners (up to 0.88 with ATEN_CPU_CAPABILITY=default)
    assert after.mean() < 0.95 * before.mean(), (after.mean().item(), before.mean().item())


def test_train_learner_names_the_learners_it_knows():
    with pytest.raises(ValueError, match="name must be one of .*'MAML'.*'implicit MAML'.*got 'ANIL'"):
        train_learner("ANIL", SineNet(), SinusoidTasks(5, 5), 1)
