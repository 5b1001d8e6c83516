"""Task samplers, seeding, training and evaluation helpers."""

import math
from pathlib import Path

import pytest
import torch

from metabp.bilevel import InnerLoop
from metabp.data import data_root, dataset_dir
from metabp.evaluation import adaptation_curve, evaluate, mean_ci
from metabp.models import SineNet
from metabp.tasks import BlobTasks, SinusoidTasks
from metabp.training import meta_train, pretrain


def test_sinusoid_ranges_shapes_and_seeding():
    tasks = SinusoidTasks(shots=5, queries=7)
    b = tasks.sample(200, torch.Generator().manual_seed(0))
    assert b.x_spt.shape == (200, 5, 1) and b.x_qry.shape == (200, 7, 1)
    assert b.x_spt.min() >= -5 and b.x_spt.max() <= 5
    amp, phase = tasks.sample_functions(2000, torch.Generator().manual_seed(1))
    assert 0.1 <= amp.min() and amp.max() <= 5.0 and 0 <= phase.min() and phase.max() <= math.pi
    assert amp.mean().item() == pytest.approx(2.55, abs=0.1)
    # labels really are A sin(x - phase): sample draws the task's amplitude and phase first
    amp, phase = tasks.sample_functions(200, torch.Generator().manual_seed(0))
    assert torch.equal(b.y_spt, amp * torch.sin(b.x_spt - phase))
    assert torch.equal(b.y_qry, amp * torch.sin(b.x_qry - phase))
    again = tasks.sample(200, torch.Generator().manual_seed(0))
    assert all(torch.equal(u, v) for u, v in zip(b, again, strict=True))
    other = tasks.sample(200, torch.Generator().manual_seed(1))
    assert not torch.equal(b.x_spt, other.x_spt)


def test_blob_tasks_labels_and_shapes():
    b = BlobTasks(ways=4, shots=3, queries=2, dim=6).sample(5)
    assert b.x_spt.shape == (5, 12, 6) and b.y_spt.shape == (5, 12)
    assert b.x_qry.shape == (5, 8, 6)
    assert sorted(b.y_spt[0].tolist()) == sorted([0, 1, 2, 3] * 3)
    assert b.y_spt.dtype == torch.int64


def test_mean_ci_matches_the_formula():
    v = torch.tensor([1.0, 2.0, 3.0, 4.0])
    m, h = mean_ci(v)
    assert m == 2.5
    assert abs(h - 1.959964 * v.std().item() / 2) < 1e-5


def test_meta_training_beats_no_training_and_adaptation_helps():
    tasks = SinusoidTasks()
    inner = InnerLoop("mse", 0.01, 1)
    torch.manual_seed(0)
    model = SineNet()
    test = SinusoidTasks(shots=10, queries=50).sample(100, torch.Generator().manual_seed(123))
    untrained = evaluate(model, test, inner, [1])[1][0]
    hist = meta_train(model, tasks, inner, iterations=150, meta_batch_size=5, meta_lr=1e-2, progress=False)
    assert len(hist.loss) == 150 and hist.seconds > 0
    res = evaluate(model, test, inner, [0, 1, 10])
    assert res[1][0] < untrained
    assert res[10][0] < res[0][0]  # adapting lowers the error


def test_meta_training_is_seeded():
    inner = InnerLoop("mse", 0.01, 1)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = SineNet()
        meta_train(model, SinusoidTasks(), inner, iterations=5, meta_batch_size=4, seed=7, progress=False)
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_adaptation_curve_zero_steps_is_plain_loss():
    torch.manual_seed(0)
    model = SineNet()
    b = SinusoidTasks().sample(6)
    curve = adaptation_curve(model, b, InnerLoop(), [0, 2])
    with torch.no_grad():
        plain = ((model(b.x_qry) - b.y_qry) ** 2).mean(dim=(1, 2))
    assert torch.allclose(curve[0], plain, atol=1e-6)
    assert curve.shape == (2, 6)


def test_pretrain_lowers_pooled_loss():
    torch.manual_seed(0)
    model = SineNet()
    hist = pretrain(model, SinusoidTasks(), iterations=200, progress=False)
    assert sum(hist.loss[-20:]) < sum(hist.loss[:20])


def test_data_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("METABP_DATA", str(tmp_path))
    assert data_root() == tmp_path
    assert dataset_dir("omniglot") == tmp_path / "omniglot"
    monkeypatch.delenv("METABP_DATA")
    monkeypatch.delenv("METABP_CACHE", raising=False)
    assert data_root().name == "metabp"


def test_the_cache_folder_follows_its_own_variable(monkeypatch, tmp_path):
    from metabp.data import DEFAULT_ROOT, cache_dir, cache_root

    monkeypatch.setenv("METABP_DATA", str(tmp_path / "mirror"))
    monkeypatch.setenv("METABP_CACHE", str(tmp_path / "cache"))
    assert cache_dir("omniglot") == tmp_path / "cache" / "omniglot"
    assert dataset_dir("omniglot") == tmp_path / "mirror" / "omniglot"
    monkeypatch.delenv("METABP_CACHE")
    assert cache_root() == DEFAULT_ROOT == Path.home() / ".cache" / "metabp"
    monkeypatch.delenv("METABP_DATA")
    assert data_root() == cache_root()  # without a mirror, downloads are looked up in the cache
