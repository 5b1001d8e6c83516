"""The one training loop (``metabp.training.fit``): divergence, checkpoints and resume, devices, compile fallback."""

from __future__ import annotations

import warnings

import pytest
import torch

from metabp import checkpoint
from metabp.bilevel import InnerLoop, get_params, init_lrs, meta_gradient_fn
from metabp.checks import DivergenceError
from metabp.models import SineNet
from metabp.tasks import SinusoidTasks, TaskBatch
from metabp.training import History, fit, meta_train

INNER = InnerLoop("mse", 0.01, 1)


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


class PoisonedTasks:
    """Sinusoid tasks whose meta-batch number ``at`` (1-based) has a NaN query target."""

    def __init__(self, at: int) -> None:
        self.tasks, self.at, self.calls = SinusoidTasks(), at, 0

    def __call__(self, n, generator):
        self.calls += 1
        batch = self.tasks(n, generator)
        if self.calls == self.at:
            y = batch.y_qry.clone()
            y[0, 0, 0] = float("nan")
            batch = batch._replace(y_qry=y)
        return batch


# --- divergence -------------------------------------------------------------------------------------


@pytest.mark.parametrize("compile", [False, True])
def test_meta_train_stops_before_the_update_at_a_non_finite_meta_loss(compile, monkeypatch):
    if compile:  # the compiled path's checks, without tens of seconds of compilation
        monkeypatch.setattr(torch, "compile", lambda fn: fn)
    torch.manual_seed(0)
    good = SineNet(hidden=8)
    poisoned = SineNet(hidden=8)
    poisoned.load_state_dict(good.state_dict())
    meta_train(good, SinusoidTasks(), INNER, iterations=2, meta_batch_size=4, meta_lr=0.01, progress=False)
    sampler = PoisonedTasks(at=3)
    with pytest.raises(DivergenceError, match=r"the loss is nan.*inner_lr=0\.01, meta_lr=0\.01") as error:
        meta_train(
            poisoned, sampler, INNER, iterations=5, meta_batch_size=4, meta_lr=0.01, progress=False, compile=compile
        )
    assert sampler.calls == 3
    assert len(str(error.value).splitlines()) == 1
    # the parameters are those of the two good meta-steps: the NaN batch updated nothing
    assert all(torch.equal(a, b) for a, b in zip(params_of(good), params_of(poisoned), strict=True))


def test_fit_stops_at_a_non_finite_gradient_even_where_the_loss_is_finite():
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)

    def step(batch):
        # torch.where's unselected branch: finite value, NaN gradient
        loss = (w * batch).sum() + torch.where(torch.tensor(True), 0.0, (w - 2).sqrt().sum())
        loss.backward()
        return loss

    with pytest.raises(DivergenceError, match="a gradient is not finite.*lr=0.1"):
        fit(step, lambda g: torch.ones(3), 3, opt, torch.Generator(), learning_rates={"lr": 0.1}, progress=False)
    assert torch.equal(w.detach(), torch.ones(3))


def test_a_step_that_updates_itself_is_checked_before_its_update():
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.1)
    calls = []

    def step(batch):
        calls.append(1)
        opt.zero_grad()
        loss = (w * batch).sum()
        loss.backward()
        opt.step()
        return {"loss": loss, "score": 2.0}

    batches = iter([torch.ones(2), torch.tensor([1.0, float("inf")])])
    with pytest.raises(DivergenceError, match="gradient"):
        fit(step, lambda g: next(batches), 5, opt, torch.Generator(), updates_itself=True, progress=False)
    assert len(calls) == 2 and torch.equal(w.detach(), torch.full((2,), 0.9))


def test_the_omniglot_loop_stops_before_updating_or_saving_at_a_non_finite_loss(tmp_path, monkeypatch):
    from metabp import fewshot
    from metabp.omniglot import load_split

    classes = load_split("small1", "train")
    config = fewshot.FewShotConfig(
        hidden=8, meta_batch_size=2, iterations=6, queries=2, ways=3, inner_lr=0.4, meta_lr=1e-3
    )
    calls = {"n": 0}

    class NaNOnTheThird(fewshot.EpisodeSampler):
        def __call__(self, n, generator):
            calls["n"] += 1
            batch = super().__call__(n, generator)
            return batch._replace(x_qry=batch.x_qry * float("nan")) if calls["n"] == 3 else batch

    monkeypatch.setattr(fewshot, "EpisodeSampler", NaNOnTheThird)
    out = tmp_path / "run.pt"
    with pytest.raises(DivergenceError, match=r"inner_lr=0\.4, meta_lr=0\.001"):
        fewshot.train(config, classes, out, checkpoint_every=2, progress=False)
    state = checkpoint.load(out)
    assert calls["n"] == 3 and state["iteration"] == 2
    assert all(bool(torch.isfinite(v).all()) for v in state["model"].values())
    # the checkpoint is the uninterrupted run's after two iterations
    calls["n"] = -100
    model, _ = fewshot.train(config, classes, None, progress=False, stop_after=2)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state["model"].items())


# --- checkpoints and resume ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["maml", "meta-sgd"])
def test_an_interrupted_and_resumed_meta_training_ends_bit_identical(kind, tmp_path):
    def run(stop_after=None, resume=None, out=None):
        torch.manual_seed(0)
        model = SineNet(hidden=8)
        lrs = init_lrs(model, 0.01) if kind == "meta-sgd" else None
        history = meta_train(
            model,
            SinusoidTasks(),
            INNER,
            iterations=7,
            meta_batch_size=4,
            meta_lr=0.01,
            cosine=True,
            seed=3,
            lrs=lrs,
            progress=False,
            stop_after=stop_after,
            resume=resume,
            out=out,
            checkpoint_every=2,
        )
        return model, lrs, history

    full, full_lrs, full_history = run()
    _, _, part = run(stop_after=3)
    assert part.state["iteration"] == 3 and len(part.loss) == 3
    checkpoint.save(tmp_path / "part.pt", part.state)
    resumed, resumed_lrs, history = run(resume=checkpoint.load(tmp_path / "part.pt"))
    assert all(torch.equal(a, b) for a, b in zip(params_of(full), params_of(resumed), strict=True))
    if kind == "meta-sgd":
        assert all(torch.equal(full_lrs[k], resumed_lrs[k]) for k in full_lrs)
    assert history.loss == full_history.loss and len(history.loss) == 7
    # and through the checkpoint file that meta_train writes itself
    run(stop_after=4, out=tmp_path / "run.pt")
    assert checkpoint.load(tmp_path / "run.pt")["iteration"] == 4
    again, _, history = run(resume=checkpoint.load(tmp_path / "run.pt"))
    assert all(torch.equal(a, b) for a, b in zip(params_of(full), params_of(again), strict=True))
    assert history.loss == full_history.loss


def test_resume_refuses_a_state_of_another_run():
    model = SineNet(hidden=8)
    history = meta_train(model, SinusoidTasks(), INNER, iterations=1, meta_batch_size=2, progress=False)
    with pytest.raises(ValueError, match="resume"):
        meta_train(
            SineNet(hidden=16),
            SinusoidTasks(),
            INNER,
            iterations=2,
            meta_batch_size=2,
            progress=False,
            resume=history.state,
        )


def test_meta_train_calls_back_with_the_iteration_and_the_model():
    torch.manual_seed(0)
    model = SineNet(hidden=8)
    seen = []
    meta_train(
        model,
        SinusoidTasks(),
        INNER,
        iterations=3,
        meta_batch_size=2,
        progress=False,
        callback=lambda it, m: seen.append((it, m, params_of(m)[0])),
    )
    assert [it for it, _, _ in seen] == [1, 2, 3] and all(m is model for _, m, _ in seen)
    assert not torch.equal(seen[0][2], seen[2][2])


def test_history_records_named_metrics_as_attributes():
    history = History()
    history.record(torch.tensor(1.5))
    history.record({"loss": 2.0, "before": -3.0, "after": -1.0})
    assert history.loss == [1.5, 2.0] and history.before == [-3.0] and history.after == [-1.0]
    with pytest.raises(AttributeError):
        _ = history.during


# --- devices ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))],
)
def test_meta_train_on_a_device_follows_the_default_run(device):
    runs = []
    for where in (None, device):
        torch.manual_seed(0)
        model = SineNet(hidden=8)
        meta_train(
            model, SinusoidTasks(), INNER, iterations=3, meta_batch_size=4, meta_lr=0.01, progress=False, device=where
        )
        assert all(p.device.type == (where or "cpu") for p in model.parameters())
        runs.append([p.detach().cpu() for p in model.parameters()])
    for a, b in zip(*runs, strict=True):
        assert torch.allclose(a, b, atol=1e-5) if device != "cpu" else torch.equal(a, b)


# --- compilation falls back to the eager path -------------------------------------------------------


class BrokenCompiler:
    """Stands in for ``torch.compile`` on a machine whose C++ toolchain cannot build inductor's code:
    the compiled function works for ``works_for`` calls, then fails (as a recompilation would)."""

    def __init__(self, works_for: int = 0) -> None:
        self.works_for, self.calls = works_for, 0

    def __call__(self, fn):
        def compiled(*args):
            self.calls += 1
            if self.calls > self.works_for:
                raise RuntimeError("CppCompileError: C++ compile error\nerror: 'at::vec' has not been declared")
            return fn(*args)

        return compiled


@pytest.mark.parametrize("works_for", [0, 2])
def test_a_compile_failure_falls_back_to_the_eager_run_with_one_warning(works_for, monkeypatch):
    runs = []
    for compile in (False, True):
        monkeypatch.setattr(torch, "compile", BrokenCompiler(works_for))
        torch.manual_seed(0)
        model = SineNet(hidden=8)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            history = meta_train(
                model,
                SinusoidTasks(),
                INNER,
                iterations=4,
                meta_batch_size=4,
                meta_lr=0.01,
                progress=False,
                compile=compile,
            )
        fallback = [w for w in caught if "torch.compile" in str(w.message)]
        if compile:
            assert len(fallback) == 1 and issubclass(fallback[0].category, RuntimeWarning)
            message = str(fallback[0].message)
            assert "\n" not in message and "CppCompileError" in message and "eagerly" in message
        else:
            assert fallback == []
        runs.append((params_of(model), history.loss))
    (eager, eager_loss), (fallen_back, loss) = runs
    assert len(loss) == 4 and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(eager, fallen_back, strict=True))
    assert loss == pytest.approx(eager_loss, rel=1e-6)


def test_the_compiled_path_raises_the_functions_own_errors(monkeypatch):
    monkeypatch.setattr(torch, "compile", BrokenCompiler())
    model = SineNet(hidden=8)
    fn = meta_gradient_fn(model, INNER, compile=True)
    batch = SinusoidTasks().sample(3)
    bad = TaskBatch(batch.x_spt, batch.y_spt[:2], batch.x_qry, batch.y_qry)
    params = {k: v.detach() for k, v in get_params(model).items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: the eager call fails as well
        with pytest.raises(ValueError):
            fn(params, tuple(bad))
