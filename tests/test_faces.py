"""higher, learn2learn and TorchOpt compute the same meta-gradient as the torch.func core."""

from __future__ import annotations

import pytest
import torch

from metabp.bilevel import InnerLoop, max_abs_difference, meta_gradient
from metabp.faces import FACES
from metabp.models import MetaLearner, SineNet
from metabp.tasks import BlobTasks, SinusoidTasks

F64 = torch.float64


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 2])
def test_faces_agree_with_the_core_on_regression(first_order, steps):
    torch.manual_seed(0)
    model = SineNet(hidden=8).double()
    batch = SinusoidTasks(shots=5, queries=4).sample(3, torch.Generator().manual_seed(1), F64)
    inner = InnerLoop("mse", 0.05, steps, first_order=first_order)
    want = meta_gradient(model, batch, inner, vectorize=False)
    scale = max(g.abs().max().item() for g in want.values())
    assert scale > 1e-3
    before = [p.detach().clone() for p in model.parameters()]
    for name, face in FACES.items():
        got = face(model, batch, inner)
        assert set(got) == set(want), name
        assert max_abs_difference(got, want) < 1e-12 * scale, name
    # no face leaves the model changed (TorchOpt swaps its parameters while it runs)
    for b, p in zip(before, model.parameters(), strict=True):
        assert torch.equal(b, p) and p.is_leaf


def test_faces_agree_with_the_core_on_classification():
    torch.manual_seed(1)
    model = MetaLearner(4, 8, 3).double()
    batch = BlobTasks(ways=3, shots=2, queries=2, dim=4).sample(3, torch.Generator().manual_seed(2), F64)
    inner = InnerLoop("cross_entropy", 0.3, 2)
    want = meta_gradient(model, batch, inner, vectorize=False)
    for name, face in FACES.items():
        assert max_abs_difference(face(model, batch, inner), want) < 1e-12, name


def test_first_order_differs_from_second_order():
    # the first-order runs above are not the second-order gradient under another name
    torch.manual_seed(0)
    model = SineNet(hidden=8).double()
    batch = SinusoidTasks(shots=5, queries=4).sample(3, torch.Generator().manual_seed(1), F64)
    second = FACES["higher"](model, batch, InnerLoop("mse", 0.05, 2))
    first = FACES["higher"](model, batch, InnerLoop("mse", 0.05, 2, first_order=True))
    assert max_abs_difference(first, second) > 1e-6


def test_faces_refuse_partial_adaptation():
    model = SineNet(hidden=4)
    batch = SinusoidTasks().sample(2)
    for face in FACES.values():
        with pytest.raises(ValueError, match="adapt"):
            face(model, batch, InnerLoop("mse", 0.01, 1, adapt_only=("net.4",)))
    with pytest.raises(ValueError, match="different parameters"):
        max_abs_difference({"a": torch.zeros(1)}, {"b": torch.zeros(1)})
