"""Cost measurement, the bilevel diagram, the finite task pool and the multi-task baseline."""

import subprocess
import sys

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from metabp.baselines import MultiTaskHeads, multitask_train  # noqa: E402
from metabp.bilevel import InnerLoop, get_params, meta_loss  # noqa: E402
from metabp.costs import SavedTensorMeter, graph_bytes, meta_loss_autograd, time_call  # noqa: E402
from metabp.models import MetaLearner, SineNet  # noqa: E402
from metabp.plotting import bilevel_diagram  # noqa: E402
from metabp.tasks import BlobTasks, SinusoidTasks, TaskPool  # noqa: E402


def test_saved_tensor_meter_counts_exactly_what_autograd_keeps():
    w = torch.randn(3, 5, requires_grad=True)
    x = torch.randn(7, 3)
    with SavedTensorMeter(ignore=[w]) as meter:
        h = x @ w  # saves x (w ignored): 7*3 floats
        out = torch.tanh(h)  # saves its result: 7*5 floats
        loss = out.sum()
    assert meter.live_bytes == meter.peak_bytes == (7 * 3 + 7 * 5) * 4
    loss.backward()
    del loss, out, h
    assert meter.live_bytes == 0 and meter.peak_bytes == (7 * 3 + 7 * 5) * 4
    # a storage saved by several operations is counted once
    v = torch.randn(7, 3, requires_grad=True)
    with SavedTensorMeter() as meter:
        z = v * v  # saves v twice
    assert meter.live_bytes == 7 * 3 * 4
    del z
    # outside the context nothing is counted
    y = (v * v * v).sum()
    assert y.requires_grad and meter.total_bytes == 7 * 3 * 4


def test_graph_bytes_and_time_call(monkeypatch):
    x = torch.randn(10, 4, requires_grad=True)
    assert graph_bytes(lambda: (x.exp() * 2).sum(), ignore=[x]) == 10 * 4 * 4
    assert graph_bytes(lambda: torch.zeros(3).sum()) == 0
    calls = []
    t = time_call(lambda: calls.append(1), repeats=5, warmup=2)
    assert len(calls) == 7 and 0 <= t < 1
    # the median of the timed calls, on a clock that ticks 1, 2, ..., 5 s per call
    import metabp.costs as costs

    ticks = iter([0, 1, 10, 12, 20, 23, 30, 34, 40, 45])
    monkeypatch.setattr(costs.time, "perf_counter", lambda: next(ticks))
    median = time_call(lambda: None, repeats=5, warmup=0)
    monkeypatch.undo()
    assert median == 3
    with pytest.raises(ValueError, match="repeats"):
        time_call(lambda: None, repeats=0)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 2])
def test_autograd_meta_loss_equals_the_torch_func_one(first_order, steps):
    torch.manual_seed(0)
    model = SineNet(hidden=8).double()
    batch = SinusoidTasks(5, 6).sample(3, torch.Generator().manual_seed(1), dtype=torch.float64)
    inner = InnerLoop("mse", 0.05, steps, first_order)
    params = get_params(model)
    a = meta_loss(model, params, batch, inner, vectorize=False)
    b = meta_loss_autograd(model, params, batch, inner)
    ga = torch.autograd.grad(a, list(params.values()))
    gb = torch.autograd.grad(b, list(params.values()))
    assert torch.allclose(a, b, atol=1e-12)
    assert all(torch.allclose(u, v, atol=1e-10) for u, v in zip(ga, gb, strict=True))


def test_second_order_graph_keeps_more_than_first_order_and_plain_training():
    torch.manual_seed(0)
    model = SineNet()
    batch = SinusoidTasks(5, 5).sample(4, torch.Generator().manual_seed(0))
    params = get_params(model)
    ignore = list(model.parameters())
    second = graph_bytes(lambda: meta_loss_autograd(model, params, batch, InnerLoop("mse", 0.01, 1)), ignore)
    first = graph_bytes(lambda: meta_loss_autograd(model, params, batch, InnerLoop("mse", 0.01, 1, True)), ignore)
    x = torch.cat([batch.x_spt, batch.x_qry], 1).flatten(0, 1)
    y = torch.cat([batch.y_spt, batch.y_qry], 1).flatten(0, 1)
    plain = graph_bytes(lambda: torch.nn.functional.mse_loss(model(x), y), ignore)
    assert second > first > 0 and second > plain > 0


def test_bilevel_diagram_draws_every_task_and_the_meta_gradient():
    fig = bilevel_diagram(tasks=3)
    texts = " ".join(t.get_text() for t in fig.axes[0].texts)
    for needle in ("meta-parameters", "meta-loss", "meta-gradient", "inner level", "outer level"):
        assert needle in texts
    assert sum("inner loop:" in t.get_text() for t in fig.axes[0].texts) == 3
    plt.close(fig)
    fig, ax = plt.subplots()
    assert bilevel_diagram(tasks=1, ax=ax) is fig
    plt.close(fig)
    with pytest.raises(ValueError, match="tasks"):
        bilevel_diagram(tasks=0)


def test_task_pool_reuses_its_tasks_and_splits_at_random():
    pool = TaskPool(SinusoidTasks(shots=5, queries=3), size=4, seed=0)
    assert len(pool) == 4 and pool.x.shape == (4, 8, 1) and pool.shots == 5
    again = TaskPool(SinusoidTasks(shots=5, queries=3), size=4, seed=0)
    assert torch.equal(pool.x, again.x) and torch.equal(pool.y, again.y)
    batch = pool.sample(50, torch.Generator().manual_seed(1))
    assert batch.x_spt.shape == (50, 5, 1) and batch.x_qry.shape == (50, 3, 1)
    pairs = {
        (round(x, 6), round(y, 6)) for x, y in zip(pool.x.flatten().tolist(), pool.y.flatten().tolist(), strict=True)
    }
    for xs, ys in ((batch.x_spt, batch.y_spt), (batch.x_qry, batch.y_qry)):
        for x, y in zip(xs.flatten().tolist(), ys.flatten().tolist(), strict=True):
            assert (round(x, 6), round(y, 6)) in pairs  # no new example is ever made
    # every drawn task is one pool task: its support and query together are that task's examples
    for i in range(50):
        drawn = torch.cat([batch.x_spt[i], batch.x_qry[i]]).flatten().sort().values
        assert any(torch.equal(drawn, pool.x[j].flatten().sort().values) for j in range(4))
    # the split changes from draw to draw: a pool of one task gives many different support sets
    single = TaskPool(SinusoidTasks(shots=5, queries=5), size=1).sample(20, torch.Generator().manual_seed(3))
    supports = {tuple(sorted(s.flatten().tolist())) for s in single.x_spt}
    assert len(supports) > 10
    blobs = TaskPool(BlobTasks(ways=3, shots=2, queries=1, dim=4), size=2).sample(5)
    assert blobs.x_spt.shape == (5, 6, 4) and blobs.y_qry.shape == (5, 3) and blobs.y_spt.dtype == torch.int64
    with pytest.raises(ValueError, match="size"):
        TaskPool(SinusoidTasks(), size=0)


def test_multitask_heads_forward_and_mean_head_model():
    torch.manual_seed(0)
    net = MultiTaskHeads(SineNet(hidden=6), num_tasks=3)
    with torch.no_grad():
        net.weight[1] += 1.0
    x = torch.randn(2, 4, 1)
    task = torch.tensor([0, 1])
    out = net(x, task)
    feats = net.body(x)
    assert out.shape == (2, 4, 1)
    assert torch.allclose(out[1], feats[1] @ net.weight[1].T + net.bias[1])
    model = net.to_model()
    assert isinstance(model, SineNet)
    assert torch.allclose(model.net[-1].weight, net.weight.mean(0))
    assert torch.allclose(model(x[0]), feats[0] @ net.weight.mean(0).T + net.bias.mean(0))
    headless = SineNet()
    headless.net = headless.net[:-1]
    for bad in (headless, torch.nn.Linear(1, 1)):
        with pytest.raises(ValueError, match="head"):
            MultiTaskHeads(bad, 2)
    with pytest.raises(ValueError, match="num_tasks"):
        MultiTaskHeads(MetaLearner(1, 3, 1), 0)


def test_multitask_training_fits_the_pool_tasks():
    pool = TaskPool(SinusoidTasks(shots=10, queries=10), size=8, seed=0)
    net, hist = multitask_train(pool, iterations=150, batch_size=8, lr=1e-2, seed=0, progress=False)
    assert len(hist.loss) == 150 and hist.seconds > 0
    assert sum(hist.loss[-20:]) / 20 < 0.25 * sum(hist.loss[:20]) / 20
    # different tasks really have different heads
    assert (net.weight[0] - net.weight[1]).abs().max() > 1e-3


def test_fit_from_scratch_trains_each_task_alone():
    from torch.func import vmap

    from metabp.baselines import fit_from_scratch
    from metabp.bilevel import forward

    batch = SinusoidTasks(shots=5, queries=5).sample(3, torch.Generator().manual_seed(0))
    model = SineNet(hidden=16)
    params = fit_from_scratch(model, batch.x_spt, batch.y_spt, steps=200, lr=1e-2, seed=0)
    assert params["net.0.weight"].shape == (3, 16, 1)
    fits = vmap(lambda p, x, y: torch.nn.functional.mse_loss(forward(model, p, x), y))(params, batch.x_spt, batch.y_spt)
    assert (fits < 0.05 * batch.y_spt.pow(2).mean(dim=(1, 2))).all()  # each task's five points are fitted
    # task 0 trained alone gives the same parameters: the tasks do not interact
    alone = fit_from_scratch(model, batch.x_spt[:1], batch.y_spt[:1], steps=200, lr=1e-2, seed=0)
    assert all(torch.allclose(alone[k][0], params[k][0], atol=1e-5) for k in params)
    # the model's own parameters are left alone, and the seed decides the initialisation
    before = {k: v.clone() for k, v in model.named_parameters()}
    fit_from_scratch(model, batch.x_spt, batch.y_spt, steps=1, seed=1)
    assert all(torch.equal(before[k], v) for k, v in model.named_parameters())
    with pytest.raises(ValueError, match="steps"):
        fit_from_scratch(model, batch.x_spt, batch.y_spt, steps=0)


CHURN = """
import ctypes, sys, torch
from metabp.costs import keep_freed_memory

class MallInfo2(ctypes.Structure):  # glibc >= 2.33
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    assert keep_freed_memory()
before = libc.mallinfo2().hblkhd
first = torch.ones(6_000_000)  # 24 MB
mapped = libc.mallinfo2().hblkhd - before  # bytes it took by mmap rather than from the heap
del first
def churn():  # four tensors of 24 MB, freed together: 96 MB at the top of the heap
    xs = [torch.ones(6_000_000) for _ in range(4)]
    return sum(x.numel() for x in xs)
for _ in range(3):
    churn()
print(mapped, libc.mallinfo2().fordblks)  # and the free bytes that malloc still holds
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_keep_freed_memory_serves_tensors_from_the_heap_and_keeps_them():
    # Page-fault counts and, by default, what malloc holds after frees proved to vary from run to
    # run here (glibc's adaptive thresholds, transparent huge pages). Deterministic in a fresh
    # process: by default the first 24 MB tensor is mapped with mmap (threshold 128 KiB), and
    # with the setting (threshold 32 MiB) it comes from the heap, where 96 MB freed stay held.
    def malloc_state(mode):
        out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True)
        mapped, held = map(int, out.stdout.split()[-2:])
        return mapped, held

    default_mapped, _ = malloc_state("default")
    kept_mapped, kept_held = malloc_state("keep")
    assert default_mapped >= 24_000_000 and kept_mapped == 0
    assert kept_held >= 96_000_000
