"""The core as a researcher uses it: bad inputs named, guards that catch what vmap gets wrong,
Meta-SGD step sizes everywhere, inner steps on any objective, and the core copied alone."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from metabp import variants
from metabp.bilevel import (
    InnerLoop,
    TaskBatch,
    _meta_loss,
    adapt,
    get_params,
    init_lrs,
    inner_step,
    max_abs_difference,
    meta_gradient,
    meta_gradient_fn,
    meta_loss,
)
from metabp.convnet import Conv4
from metabp.evaluation import adaptation_curve, evaluate, mean_ci
from metabp.models import SineNet
from metabp.tasks import BlobTasks, SinusoidTasks

SRC = Path(__file__).resolve().parents[1] / "src" / "metabp"


def _sine(num_tasks: int = 4, seed: int = 0, dtype=torch.float32) -> TaskBatch:
    return SinusoidTasks().sample(num_tasks, torch.Generator().manual_seed(seed), dtype)


def _flat_grad(model, batch, inner, vectorize):
    params = get_params(model)
    loss = _meta_loss(model, params, batch, inner, vectorize, None)  # no guard: measure what vmap does
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(params.values()))])


# ------------------------------------------------------------------ bad inputs (issue 18, item 9)


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda b: b.cast(torch.float64), "dtype"),
        (lambda b: TaskBatch(b.x_spt.expand(-1, -1, 3), b.y_spt, b.x_qry.expand(-1, -1, 3), b.y_qry), "x_spt"),
        (lambda b: TaskBatch(*(t[:0] for t in b)), "batch"),
        (lambda b: TaskBatch(b.x_spt[:, :0], b.y_spt[:, :0], b.x_qry, b.y_qry), "x_spt"),
        (lambda b: TaskBatch(b.x_spt, b.y_spt, b.x_qry, b.y_qry.expand(-1, -1, 4)), "MSE target"),
        (lambda b: b.to("meta"), "device"),
    ],
)
@pytest.mark.parametrize("vectorize", [False, True])
def test_a_batch_that_does_not_fit_raises_a_value_error_naming_it(make, name, vectorize):
    model, batch = SineNet(), make(_sine())
    with pytest.raises(ValueError, match=name):
        meta_loss(model, get_params(model), batch, InnerLoop(), vectorize=vectorize)


def test_images_with_the_wrong_channel_count_are_named():
    model = Conv4(ways=3, hidden=8)
    x = torch.rand(2, 3, 3, 28, 28)
    y = torch.zeros(2, 3, dtype=torch.long)
    batch = TaskBatch(x, y, x, y)
    for call in (
        lambda: meta_loss(model, get_params(model), batch, InnerLoop("cross_entropy"), vectorize=False),
        lambda: adaptation_curve(model, batch, InnerLoop("cross_entropy"), [1], "accuracy"),
    ):
        with pytest.raises(ValueError, match="x_spt.*channels"):
            call()


def test_adapt_only_names_that_match_nothing_raise():
    model, batch = SineNet(), _sine()
    with pytest.raises(ValueError, match="'head' matches no parameter"):
        meta_loss(model, get_params(model), batch, InnerLoop(adapt_only=("head",)))
    with pytest.raises(ValueError, match="'nothere' matches no parameter"):
        meta_loss(model, get_params(model), batch, InnerLoop(adapt_only=("net.4", "nothere")))
    assert meta_loss(model, get_params(model), batch, InnerLoop(adapt_only=("net.4",))).isfinite()


def test_mean_ci_refuses_nan():
    with pytest.raises(ValueError, match="finite"):
        mean_ci([1.0, float("nan"), 2.0])


def test_train_refuses_a_negative_stop_after():
    from metabp.episodes import ImageClasses
    from metabp.fewshot import FewShotConfig, train

    classes = ImageClasses(torch.zeros(4, 3, 28, 28, dtype=torch.uint8), [f"c/{i}" for i in range(4)])
    with pytest.raises(ValueError, match="stop_after"):
        train(FewShotConfig(ways=2, shots=1, queries=1, hidden=4, iterations=2), classes, stop_after=-5, progress=False)


# ------------------------------------------------------------------ what vmap gets wrong


def _norm_net(norm: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 40), norm, nn.ReLU(), nn.Linear(40, 1)).double()


@pytest.mark.parametrize(
    "norm", [nn.LayerNorm(40), nn.BatchNorm1d(40, track_running_stats=False)], ids=["layer norm", "batch norm"]
)
def test_second_order_vmap_through_a_norm_layer_is_wrong_and_refused(norm):
    model, batch, inner = _norm_net(norm), _sine(8, 1, torch.float64), InnerLoop("mse", 0.01, 1)
    loop, vmapped = _flat_grad(model, batch, inner, False), _flat_grad(model, batch, inner, True)
    assert ((loop - vmapped).abs().max() / loop.abs().max()).item() > 1e-6  # torch's batching rule is wrong
    with pytest.raises(ValueError, match="pytorch/functorch#534"):
        meta_loss(model, get_params(model), batch, inner, vectorize=True)
    meta_loss(model, get_params(model), batch, InnerLoop("mse", 0.01, 1, first_order=True), vectorize=True)


def test_group_norm_is_exact_under_vmap_and_allowed():
    model, batch, inner = _norm_net(nn.GroupNorm(4, 40)), _sine(8, 1, torch.float64), InnerLoop("mse", 0.01, 1)
    loop = _flat_grad(model, batch, inner, False)
    assert torch.allclose(loop, _flat_grad(model, batch, inner, True), atol=1e-12, rtol=0)
    meta_loss(model, get_params(model), batch, inner, vectorize=True)


def test_dropout_under_vmap_says_what_to_do_and_the_loop_runs_it():
    model, batch = _norm_net(nn.Dropout(0.1)).float(), _sine()
    with pytest.raises(ValueError, match="vectorize=False"):
        meta_loss(model, get_params(model), batch, InnerLoop(), vectorize=True)
    assert meta_loss(model, get_params(model), batch, InnerLoop(), vectorize=False).isfinite()


def test_running_statistics_are_refused_and_the_suggested_remedies_work():
    batch = _sine(4, 0, torch.float64)
    for vectorize in (False, True):
        with pytest.raises(ValueError, match="track_running_stats=False"):
            meta_loss(
                _norm_net(nn.BatchNorm1d(40)),
                get_params(_norm_net(nn.BatchNorm1d(40))),
                batch,
                InnerLoop(),
                vectorize=vectorize,
            )
    fixed = _norm_net(nn.BatchNorm1d(40)).eval()
    per_set = _norm_net(nn.BatchNorm1d(40, track_running_stats=False))
    for model in (fixed, per_set):
        assert meta_loss(model, get_params(model), batch, InnerLoop(), vectorize=False).isfinite()


# ------------------------------------------------------------------ Meta-SGD, evaluation paths


def test_meta_sgd_step_sizes_reach_meta_gradient_the_compiled_path_and_evaluation():
    torch.manual_seed(0)
    model, batch, inner = SineNet().double(), _sine(5, 2, torch.float64), InnerLoop("mse", 0.01, 1)
    lrs = init_lrs(model, 0.3)
    params = get_params(model)
    loss = meta_loss(model, params, batch, inner, vectorize=False, lrs=lrs)
    want = dict(
        zip(
            [*params, *(f"lr.{k}" for k in lrs)],
            torch.autograd.grad(loss, [*params.values(), *lrs.values()]),
            strict=True,
        )
    )
    got = meta_gradient(model, batch, inner, vectorize=False, lrs=lrs)
    assert max_abs_difference(got, {k: want[k] for k in params}) < 1e-12
    assert max_abs_difference(got, meta_gradient(model, batch, inner, vectorize=False)) > 1e-3  # lrs are used
    detached = {k: v.detach() for k, v in params.items()}
    (g_params, g_lrs), value = meta_gradient_fn(model, inner, meta_sgd=True)(
        detached, tuple(batch), {k: v.detach() for k, v in lrs.items()}
    )
    assert torch.isclose(value, loss)
    assert max_abs_difference(g_params, got) < 1e-12
    assert max_abs_difference(g_lrs, {k: want[f"lr.{k}"] for k in lrs}) < 1e-12
    with pytest.raises(ValueError, match="lrs"):
        evaluate(model, batch, inner, [1])
    with_lrs = evaluate(model, batch, inner, [1], lrs=lrs)[1][0]
    plain = evaluate(copy.deepcopy(model), batch, inner, [1])[1][0]
    assert abs(with_lrs - plain) > 1e-3


def test_the_loop_path_of_adaptation_curve_equals_vmap():
    torch.manual_seed(0)
    model = SineNet().double()
    batch, inner = _sine(6, 3, torch.float64), InnerLoop("mse", 0.02, 1)
    loop = adaptation_curve(model, batch, inner, [0, 1, 4], vectorize=False)
    assert loop.shape == (3, 6)
    assert torch.allclose(loop, adaptation_curve(model, batch, inner, [0, 1, 4]), atol=1e-12, rtol=0)
    assert (loop[2] - loop[0]).abs().min() > 1e-6  # the steps were taken


# ------------------------------------------------------------------ the inner step on an objective


def test_inner_step_on_an_objective_descends_it_and_defaults_to_the_support_loss():
    torch.manual_seed(0)
    model, batch = SineNet().double(), _sine(1, 4, torch.float64)
    params, inner = get_params(model), InnerLoop("mse", 0.05, 1, adapt_only=("net.4",))
    x, y = batch.x_spt[0], batch.y_spt[0]
    default = inner_step(model, params, x, y, inner)
    loss = torch.nn.functional.mse_loss(torch.func.functional_call(model, params, (x,)), y)
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
    for k in params:
        want = params[k] - 0.05 * grads[k] if k.startswith("net.4.") else params[k]
        assert torch.allclose(default[k], want, atol=1e-14), k
    target = {k: torch.zeros_like(v) for k, v in params.items()}
    moved = inner_step(
        model,
        params,
        None,
        None,
        InnerLoop("mse", 0.25, 1),
        objective=lambda p: sum(((p[k] - target[k]) ** 2).sum() for k in p),
    )
    for k in params:  # one step of size 1/4 on |p|^2 halves every parameter
        assert torch.allclose(moved[k], params[k] / 2, atol=1e-14)


def test_proximal_adapt_honours_adapt_only_and_first_order():
    torch.manual_seed(0)
    model, batch = SineNet().double(), _sine(1, 5, torch.float64)
    theta = {k: v.detach().clone().requires_grad_() for k, v in get_params(model).items()}
    x, y = batch.x_spt[0], batch.y_spt[0]
    head = variants.proximal_adapt(model, theta, theta, x, y, InnerLoop("mse", 0.05, 3, adapt_only=("net.4",)), 2.0)
    assert {k for k in theta if not torch.equal(head[k], theta[k])} == {"net.4.weight", "net.4.bias"}
    second = variants.proximal_adapt(model, theta, theta, x, y, InnerLoop("mse", 0.05, 3), 2.0)
    first = variants.proximal_adapt(model, theta, theta, x, y, InnerLoop("mse", 0.05, 3, first_order=True), 2.0)
    for k in theta:
        assert torch.allclose(first[k], second[k], atol=1e-14)  # the same steps ...
    g2 = torch.autograd.grad(second["net.4.bias"].sum(), theta["net.0.weight"])[0]
    g1 = torch.autograd.grad(first["net.4.bias"].sum(), theta["net.0.weight"], allow_unused=True)[0]
    assert g2.abs().max() > 1e-6 and (g1 is None or g1.abs().max() == 0)  # ... differentiated differently


def test_adapt_with_adapt_only_on_conv4_moves_the_head_alone():
    model = Conv4(ways=3, hidden=8)
    batch = BlobTasks(ways=3, shots=1, queries=1, dim=4).sample(1)
    x = torch.rand(3, 1, 28, 28)
    adapted = adapt(
        model, get_params(model), x, batch.y_spt[0], InnerLoop("cross_entropy", 0.1, 1, adapt_only=("head",))
    )
    assert {k for k, v in get_params(model).items() if not torch.equal(v, adapted[k])} == {"head.weight", "head.bias"}


# ------------------------------------------------------------------ helpers and devices


def test_cast_keeps_labels_and_samplers_take_a_device():
    batch = BlobTasks().sample(2, torch.Generator().manual_seed(0))
    cast = batch.cast(torch.float64)
    assert cast.x_spt.dtype == torch.float64 and cast.y_spt.dtype == torch.int64
    assert torch.equal(cast.x_spt, batch.x_spt.double())
    same = BlobTasks().sample(2, torch.Generator().manual_seed(0), device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(same, batch, strict=True))
    assert SinusoidTasks().sample(2, device="meta").x_spt.device.type == "meta"


def test_max_abs_difference():
    a = {"w": torch.tensor([1.0, -2.0]), "b": torch.tensor([0.5])}
    b = {"w": torch.tensor([1.5, -2.0]), "b": torch.tensor([0.0])}
    assert max_abs_difference(a, b) == 0.5
    assert max_abs_difference(a, b, relative=True) == 0.5 / 2.0
    with pytest.raises(ValueError, match="different parameters"):
        max_abs_difference(a, {"w": a["w"]})


def test_the_core_imports_alone_from_two_copied_files(tmp_path):
    package = tmp_path / "mycore"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("bilevel.py", "checks.py"):
        shutil.copy(SRC / name, package / name)
    code = (
        "import sys, torch\n"
        "from mycore.bilevel import InnerLoop, TaskBatch, meta_gradient\n"
        "assert not any(m == 'metabp' or m.startswith('metabp.') for m in sys.modules)\n"
        "torch.manual_seed(0)\n"
        "model = torch.nn.Linear(1, 1)\n"
        "x = torch.randn(2, 3, 1)\n"
        "g = meta_gradient(model, TaskBatch(x, 2 * x, x, 2 * x), InnerLoop('mse', 0.1, 1))\n"
        "print(sorted(g))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PATH": "", "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['bias', 'weight']"
    imports = [line for line in (SRC / "bilevel.py").read_text().splitlines() if line.startswith(("import", "from"))]
    assert all(
        (
            "torch" in line
            or "checks" in line
            or line.split()[1] in ("__future__", "weakref", "collections.abc", "dataclasses", "typing")
        )
        for line in imports
    ), imports


def test_best_setting_chooses_on_validation_and_skips_diverged_settings():
    from metabp.evaluation import best_setting

    grid = {0.1: torch.tensor([0.5, 0.7]), 0.3: torch.tensor([0.6, 0.9]), 1.0: torch.tensor([0.9, 0.2])}
    assert best_setting(grid, [5, 10]) == (0.3, 10)
    losses = {"a": torch.tensor([1.0, 0.5]), "b": torch.tensor([0.8, float("inf")]), "c": torch.tensor([0.9, 0.4])}
    assert best_setting(losses, [1, 10], maximize=False, at=1) == ("c", 1)  # b diverged after 10 steps
    assert best_setting(losses, [1, 10], maximize=False) == ("c", 10)
    with pytest.raises(ValueError, match="at"):
        best_setting(losses, [1, 10], at=5)
    with pytest.raises(ValueError, match="diverged"):
        best_setting({"b": losses["b"]}, [1, 10])


def test_seed_records_keep_the_native_kernel_path_by_seed_and_name_a_bad_line(tmp_path):
    import json

    from metabp.evaluation import seed_records

    path = tmp_path / "seeds.jsonl"
    lines = [
        {"seed": 2, "ATEN_CPU_CAPABILITY": "(unset: native)"},
        {"seed": 0, "ATEN_CPU_CAPABILITY": "default"},
        {"seed": 1},
        {"seed": 0, "ATEN_CPU_CAPABILITY": "(unset: native)"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    assert [(r["seed"], r.get("ATEN_CPU_CAPABILITY")) for r in seed_records(path)] == [
        (0, "(unset: native)"),
        (1, None),
        (2, "(unset: native)"),
    ]
    assert [r["seed"] for r in seed_records(path, native_only=False)] == [0, 0, 1, 2]
    path.write_text('{"seed": 0}\n{"seed": "one"}\n')
    with pytest.raises(ValueError, match="line 2: expected a JSON object with an integer 'seed'"):
        seed_records(path)
    path.write_text('{"seed": 0}\nnot json\n')
    with pytest.raises(ValueError, match="line 2: not JSON"):
        seed_records(path)
