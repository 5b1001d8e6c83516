"""learn2learn computes the same meta-gradient; the article's listing computes none."""

import pytest
import torch

from metabp import faces
from metabp.bilevel import InnerLoop, get_params, meta_gradient, meta_loss
from metabp.listing import article_meta_step, corrected_meta_step
from metabp.models import MetaLearner, SineNet
from metabp.tasks import BlobTasks, SinusoidTasks


@pytest.mark.parametrize("steps", [1, 3])
def test_learn2learn_meta_gradient_equals_scratch(steps):
    torch.manual_seed(0)
    model = MetaLearner(1, 32, 1)
    batch = SinusoidTasks().sample(5, torch.Generator().manual_seed(2))
    scratch = meta_gradient(model, batch, InnerLoop("mse", 0.01, steps), vectorize=False)
    maml = faces.l2l_wrap(model, InnerLoop("mse", 0.01, steps))
    model.zero_grad()
    faces.l2l_meta_loss(maml, batch, InnerLoop("mse", 0.01, steps)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None
        assert torch.allclose(p.grad, scratch[name], atol=1e-6, rtol=0), (name, (p.grad - scratch[name]).abs().max())


@pytest.mark.parametrize("first_order", [False, True])
def test_the_learn2learn_path_takes_the_same_inner_loop_anil_included(first_order):
    torch.manual_seed(0)
    model = SineNet().double()
    batch = SinusoidTasks().sample(4, torch.Generator().manual_seed(3), torch.float64)
    inner = InnerLoop("mse", 0.02, 2, first_order=first_order, adapt_only=("net.4",))
    want = meta_gradient(model, batch, inner, vectorize=False)
    model.zero_grad()
    faces.l2l_meta_loss(faces.l2l_wrap(model, inner), batch, inner).backward()
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, want[name], atol=1e-12, rtol=0), name
    assert want["net.0.weight"].abs().max() > 1e-6  # the body is meta-learned even though it does not adapt
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.net[0].weight.detach().clone()
    faces.l2l_meta_step(faces.l2l_wrap(model, inner), optimizer, batch, inner)
    assert torch.allclose(model.net[0].weight, before - 0.1 * want["net.0.weight"], atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="matches no parameter"):
        faces.l2l_wrap(model, InnerLoop(adapt_only=("head",)))


def test_learn2learn_import_is_quiet(capfd):
    import sys

    for mod in [m for m in sys.modules if m == "learn2learn" or m.startswith(("learn2learn.", "gym"))]:
        del sys.modules[mod]
    faces._MODULES.pop("learn2learn", None)
    faces.import_learn2learn()
    out, err = capfd.readouterr()
    assert "gym" not in (out + err).lower()
    assert err == ""


def blob_setup(seed=0):
    torch.manual_seed(seed)
    tasks = BlobTasks(ways=3, shots=2, queries=4, dim=5)
    batch = tasks.sample(4, torch.Generator().manual_seed(seed))

    def make() -> MetaLearner:
        return MetaLearner(5, 16, 3)

    return make(), make, batch


def test_article_listing_leaves_the_meta_learner_exactly_unchanged():
    meta_learner, make, batch = blob_setup()
    before = {k: v.clone() for k, v in meta_learner.state_dict().items()}
    opt = torch.optim.Adam(meta_learner.parameters(), lr=0.1)
    # what it returns is the true post-adaptation query loss (of a meta-learner that never moves)
    want = meta_loss(
        meta_learner, get_params(meta_learner), batch, InnerLoop("cross_entropy", 0.1, 2), vectorize=False
    ).item()
    for _ in range(3):
        loss = article_meta_step(meta_learner, opt, batch, make, inner_lr=0.1, inner_steps=2)
        assert loss == pytest.approx(want, rel=1e-5, abs=0)
    assert all(p.grad is None for p in meta_learner.parameters())
    for k, v in meta_learner.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_corrected_listing_moves_the_meta_learner_with_the_maml_gradient():
    meta_learner, _, batch = blob_setup()
    want = meta_gradient(meta_learner, batch, InnerLoop("cross_entropy", 0.1, 2), vectorize=False)
    before = {k: v.clone() for k, v in meta_learner.state_dict().items()}
    opt = torch.optim.SGD(meta_learner.parameters(), lr=0.1)
    corrected_meta_step(meta_learner, opt, batch, inner_lr=0.1, inner_steps=2)
    for name, p in meta_learner.named_parameters():
        assert torch.allclose(p.grad, want[name], atol=1e-6), name
    assert any(not torch.equal(v, before[k]) for k, v in meta_learner.state_dict().items())
