"""The bilevel core against closed forms, finite differences and itself."""

import pytest
import torch
from torch import nn

from metabp.bilevel import InnerLoop, get_params, make_optimizer, meta_gradient, meta_loss, meta_step
from metabp.closed_form import closed_form_meta_gradient
from metabp.models import MetaLearner, SineNet
from metabp.tasks import SinusoidTasks, TaskBatch


def linear_tasks(num_tasks=3, shots=6, queries=7, dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(num_tasks, dim, 1, generator=g, dtype=torch.float64)
    xs = torch.randn(num_tasks, shots, dim, generator=g, dtype=torch.float64)
    xq = torch.randn(num_tasks, queries, dim, generator=g, dtype=torch.float64)

    def noise(n: int) -> torch.Tensor:
        return 0.1 * torch.randn(num_tasks, n, 1, generator=g, dtype=torch.float64)

    return TaskBatch(xs, xs @ w_true + noise(shots), xq, xq @ w_true + noise(queries))


def linear_model(dim=4, seed=1):
    torch.manual_seed(seed)
    return nn.Linear(dim, 1, bias=False).double()


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("vectorize", [False, True])
def test_meta_gradient_matches_closed_form(steps, vectorize):
    batch, model, alpha = linear_tasks(), linear_model(), 0.05
    inner = InnerLoop("mse", inner_lr=alpha, inner_steps=steps)
    got = meta_gradient(model, batch, inner, vectorize=vectorize)["weight"].T
    want = closed_form_meta_gradient(model.weight.detach().T, batch, alpha, steps)
    assert torch.allclose(got, want, atol=1e-10, rtol=0), (got - want).abs().max()
    # and the derivative is not trivially the first-order one
    fo = closed_form_meta_gradient(model.weight.detach().T, batch, alpha, steps, first_order=True)
    assert (fo - want).abs().max() > 1e-4


def test_first_order_drops_exactly_the_hessian_term():
    batch, model, alpha = linear_tasks(), linear_model(), 0.05
    for steps in (1, 2, 3):
        inner = InnerLoop("mse", inner_lr=alpha, inner_steps=steps, first_order=True)
        got = meta_gradient(model, batch, inner, vectorize=False)["weight"].T
        want = closed_form_meta_gradient(model.weight.detach().T, batch, alpha, steps, first_order=True)
        assert torch.allclose(got, want, atol=1e-10, rtol=0)


def test_first_and_second_order_differ_on_a_nonlinear_model():
    torch.manual_seed(0)
    model = SineNet().double()
    batch = SinusoidTasks(shots=10, queries=10).sample(4, torch.Generator().manual_seed(0), torch.float64)
    so = meta_gradient(model, batch, InnerLoop("mse", 0.01, 1), vectorize=False)
    fo = meta_gradient(model, batch, InnerLoop("mse", 0.01, 1, first_order=True), vectorize=False)
    diff = max((so[k] - fo[k]).abs().max().item() for k in so)
    scale = max(so[k].abs().max().item() for k in so)
    assert diff > 1e-3 * scale


def test_meta_loss_passes_gradcheck():
    torch.manual_seed(0)
    model = MetaLearner(1, 6, 1).double()
    batch = SinusoidTasks(shots=5, queries=5).sample(2, torch.Generator().manual_seed(3), torch.float64)
    inner = InnerLoop("mse", inner_lr=0.05, inner_steps=2)
    names = [n for n, _ in model.named_parameters()]
    start = [p.detach().clone().requires_grad_(True) for p in model.parameters()]

    def f(*tensors):
        return meta_loss(model, dict(zip(names, tensors, strict=True)), batch, inner, vectorize=False)

    assert torch.autograd.gradcheck(f, start, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("first_order", [False, True])
def test_vmap_equals_loop(first_order):
    torch.manual_seed(0)
    model = SineNet()
    batch = SinusoidTasks().sample(8, torch.Generator().manual_seed(1))
    inner = InnerLoop("mse", 0.01, 3, first_order=first_order)
    loop = meta_gradient(model, batch, inner, vectorize=False)
    vec = meta_gradient(model, batch, inner, vectorize=True)
    for k in loop:
        assert torch.allclose(loop[k], vec[k], atol=1e-6, rtol=1e-5), k


def test_anil_adapts_only_the_head_and_still_trains_the_body():
    torch.manual_seed(0)
    model = SineNet().double()
    batch = SinusoidTasks().sample(4, torch.Generator().manual_seed(1), torch.float64)
    anil = InnerLoop("mse", 0.01, 1, adapt_only=("net.4",))
    from metabp.bilevel import adapt

    params = get_params(model)
    new = adapt(model, params, batch.x_spt[0], batch.y_spt[0], anil)
    assert all(new[k] is params[k] for k in params if not k.startswith("net.4"))
    assert not torch.equal(new["net.4.weight"], params["net.4.weight"])
    g = meta_gradient(model, batch, anil, vectorize=False)
    assert g["net.0.weight"].abs().max() > 0  # the body gets a meta-gradient through the query loss


def test_meta_step_moves_parameters_and_lowers_loss():
    torch.manual_seed(0)
    model = SineNet()
    gen = torch.Generator().manual_seed(0)
    batch = SinusoidTasks().sample(25, gen)
    inner = InnerLoop("mse", 0.01, 1)
    opt = make_optimizer(model.parameters(), 1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    losses = [meta_step(model, opt, batch, inner) for _ in range(30)]
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    assert losses[-1] < losses[0]


def test_functional_meta_gradient_equals_autograd_one():
    from metabp.bilevel import meta_gradient_fn

    torch.manual_seed(0)
    model = SineNet().double()
    batch = SinusoidTasks().sample(6, torch.Generator().manual_seed(4), torch.float64)
    inner = InnerLoop("mse", 0.01, 2)
    want = meta_gradient(model, batch, inner, vectorize=False)
    params = {k: v.detach() for k, v in get_params(model).items()}
    got, loss = meta_gradient_fn(model, inner)(params, tuple(batch))
    assert torch.isclose(loss, meta_loss(model, get_params(model), batch, inner, vectorize=False))
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-12), k


def test_compiled_meta_training_follows_the_eager_run():
    import warnings

    from metabp.training import meta_train

    runs, fallbacks = [], []
    for compile in (False, True):
        torch.manual_seed(0)
        model = SineNet(hidden=8)
        start = [p.detach().clone() for p in model.parameters()]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            meta_train(
                model,
                SinusoidTasks(),
                InnerLoop("mse", 0.01, 1),
                iterations=3,
                meta_batch_size=4,
                meta_lr=0.01,
                compile=compile,
                progress=False,
            )
        fallbacks.append([str(w.message) for w in caught if "torch.compile" in str(w.message)])
        runs.append([p.detach().clone() for p in model.parameters()])
        assert not all(torch.equal(a, b) for a, b in zip(start, runs[-1], strict=True))  # it trained
    # Where this machine cannot compile, the compiled run fell back to the eager path and said so once,
    # in one line; either way it must end where the eager run ends.
    assert fallbacks[0] == [] and len(fallbacks[1]) <= 1
    assert all("\n" not in m and "eagerly" in m for m in fallbacks[1])
    for a, b in zip(*runs, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_per_task_backward_gives_the_same_meta_gradient():
    torch.manual_seed(0)
    model = SineNet(hidden=8).double()
    batch = SinusoidTasks().sample(4, torch.Generator().manual_seed(5), torch.float64)
    inner = InnerLoop("mse", 0.01, 2)
    want = meta_gradient(model, batch, inner, vectorize=False)
    got = meta_gradient(model, batch, inner, vectorize=False, per_task=True)
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-14), k
    with pytest.raises(ValueError, match="per_task"):
        meta_gradient(model, batch, inner, vectorize=True, per_task=True)
