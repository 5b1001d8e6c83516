"""Conv4, the four few-shot learners, learn2learn agreement, and resumable training."""

from __future__ import annotations

import pytest
import torch

from metabp import faces, protonet
from metabp.bilevel import InnerLoop, adapt, get_params, make_optimizer, max_abs_difference, meta_gradient
from metabp.convnet import Conv4, TaskBatchNorm2d, vmap_safe
from metabp.episodes import EpisodeSampler
from metabp.fewshot import ALGORITHMS, FewShotConfig, accuracy, build_model, load_model, train, train_step
from metabp.omniglot import load_split
from metabp.tasks import TaskBatch

TINY = dict(hidden=8, meta_batch_size=2, iterations=6, queries=2, ways=3)


@pytest.fixture(scope="module")
def classes():
    return load_split("small1", "train")


@pytest.fixture(scope="module")
def batch(classes):
    return EpisodeSampler(classes, ways=5, shots=1, queries=2).sample(3, torch.Generator().manual_seed(0))


def test_conv4_shapes_and_parameter_count():
    model = Conv4(ways=5, hidden=64)
    x = torch.rand(7, 1, 28, 28)
    assert model(x).shape == (7, 5) and model.embed(x).shape == (7, 64)
    # MAML's network: 4 x (3x3 conv + BatchNorm scale/shift) and a 64 -> 5 head
    expected = (9 * 64 + 64) + 3 * (9 * 64 * 64 + 64) + 4 * 2 * 64 + 64 * 5 + 5
    assert sum(p.numel() for p in model.parameters()) == expected
    assert not list(model.buffers())  # no running statistics


def test_with_ways_copies_the_body_and_averages_the_head():
    torch.manual_seed(0)
    model = Conv4(ways=5, hidden=8)
    wide = model.with_ways(20)
    assert wide.ways == 20 and model.ways == 5
    assert torch.allclose(wide.head.weight, model.head.weight.mean(0).expand(20, -1))
    assert torch.equal(wide.features[0].weight, model.features[0].weight)
    assert wide.features[0].weight.data_ptr() != model.features[0].weight.data_ptr()


def test_grid_features_keep_the_layout_of_the_last_feature_map():
    torch.manual_seed(0)
    x = torch.rand(6, 1, 56, 56)
    whole, grid = Conv4(ways=5, hidden=8), Conv4(ways=5, hidden=8, grid=4)
    grid.features.load_state_dict(whole.features.state_dict())
    last = whole.features(x)  # (6, 8, 4, 4) on 56-pixel drawings
    assert last.shape[-2:] == (4, 4)
    # grid 4 keeps every cell of the 4 x 4 map, channel by channel; grid 1 is their mean
    assert torch.equal(grid.embed(x), last.flatten(1))
    assert torch.allclose(whole.embed(x), grid.embed(x).view(6, 8, 16).mean(-1), atol=1e-6)
    half = Conv4(ways=5, hidden=8, grid=2)
    half.features.load_state_dict(whole.features.state_dict())
    quadrants = last.view(6, 8, 2, 2, 2, 2).mean(dim=(3, 5)).flatten(1)  # means of the four 2 x 2 quadrants
    assert torch.allclose(half.embed(x), quadrants, atol=1e-6)
    assert grid(x).shape == (6, 5) and grid.hidden == 8 and grid.head.in_features == 8 * 16
    wide = grid.with_ways(20)
    assert wide.ways == 20 and wide.hidden == 8 and wide.grid == 4 and wide(x).shape == (6, 20)


def test_a_grid_checkpoint_loads_with_its_grid(classes, tmp_path):
    config = FewShotConfig(**{**TINY, "algorithm": "protonet", "grid": 2})
    model, _ = train(config, classes, tmp_path / "grid.pt", progress=False)
    loaded, stored, _ = load_model(tmp_path / "grid.pt")
    assert stored.grid == 2 and loaded.grid == 2 and loaded.embed(torch.rand(3, 1, 28, 28)).shape == (3, 8 * 4)
    for a, b in zip(model.parameters(), loaded.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_learner_classifies_a_20_way_task(algorithm, classes):
    config = FewShotConfig(algorithm=algorithm, hidden=8)
    torch.manual_seed(0)
    model = build_model(config)
    tasks = EpisodeSampler(classes, ways=20, shots=1, queries=1).sample(2, torch.Generator().manual_seed(1))
    acc = accuracy(model, tasks, config, chunk_size=1)
    assert acc.shape[-1] == 2 and ((acc >= 0) & (acc <= 1)).all()


def test_anil_adapts_only_the_head(batch):
    config = FewShotConfig(algorithm="anil", hidden=8)
    torch.manual_seed(0)
    model = build_model(config)
    params = get_params(model)
    adapted = adapt(model, params, batch.x_spt[0], batch.y_spt[0], config.inner)
    changed = {k for k in params if not torch.equal(params[k], adapted[k])}
    assert changed == {"head.weight", "head.bias"}


@pytest.mark.parametrize("algorithm", ["maml", "fomaml"])
def test_learn2learn_gives_the_same_meta_gradient_on_omniglot(algorithm, batch):
    config = FewShotConfig(algorithm=algorithm, hidden=8, inner_steps=2)
    torch.manual_seed(0)
    model = build_model(config).double()
    b = type(batch)(batch.x_spt.double(), batch.y_spt, batch.x_qry.double(), batch.y_qry)
    scratch = meta_gradient(model, b, config.inner, vectorize=False)
    maml = faces.l2l_wrap(model, config.inner)
    model.zero_grad()
    faces.l2l_meta_loss(maml, b, config.inner).backward()
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, scratch[name], atol=1e-9, rtol=1e-6), name


def _double(batch):
    return batch.cast(torch.float64)


def _max_rel_diff(got, want):
    return max_abs_difference(got, want, relative=True)


def test_second_order_vmap_through_builtin_batch_norm_is_refused(batch):
    torch.manual_seed(0)
    model = Conv4(ways=5, hidden=8).double()
    batch = _double(batch)
    with pytest.raises(ValueError, match="batch norm 'features.1'.*vectorize=False.*vmap_safe"):
        meta_gradient(model, batch, InnerLoop("cross_entropy", 0.4, 1), vectorize=True)
    # first-order and zero-step meta-gradients are exact under vmap, so they are allowed
    for inner in (InnerLoop("cross_entropy", 0.4, 1, first_order=True), InnerLoop("cross_entropy", 0.4, 0)):
        loop = meta_gradient(model, batch, inner, vectorize=False)
        assert _max_rel_diff(meta_gradient(model, batch, inner, vectorize=True), loop) < 1e-10


def test_task_batch_norm_equals_the_builtin_one():
    torch.manual_seed(0)
    builtin = torch.nn.BatchNorm2d(6, track_running_stats=False)
    with torch.no_grad():
        builtin.weight.uniform_(0.5, 2)
        builtin.bias.normal_()
    ours = vmap_safe(torch.nn.Sequential(builtin))[0]
    assert isinstance(ours, TaskBatchNorm2d)
    assert builtin.weight.data_ptr() != ours.weight.data_ptr()  # a copy, the original is untouched
    x = torch.randn(4, 6, 5, 5)
    assert torch.allclose(ours(x), builtin(x), atol=1e-5)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        vmap_safe(torch.nn.Sequential(torch.nn.BatchNorm2d(3)))


def test_vmap_safe_second_order_vmap_equals_the_loop_through_builtin_batch_norm(batch):
    # The loop through nn.BatchNorm2d is the reference (learn2learn agrees with it,
    # above); vmap through the hand-written batch norm must give the same numbers.
    torch.manual_seed(0)
    model = Conv4(ways=5, hidden=8).double()
    b = _double(batch)
    inner = InnerLoop("cross_entropy", 0.4, 2)
    loop = meta_gradient(model, b, inner, vectorize=False)
    vec = meta_gradient(vmap_safe(model), b, inner, vectorize=True)
    assert _max_rel_diff(vec, loop) < 1e-10


def test_protonet_loss_by_loop_equals_the_vmapped_one(batch):
    """The loop over tasks (what training uses) and vmap give one loss and one gradient.

    The tasks of ``batch`` differ, so a loop that scored one task for another, or
    normalised over the whole meta-batch, would differ too."""
    torch.manual_seed(0)
    model = Conv4(ways=5, hidden=8).double()
    b = _double(batch)
    results = []
    for vectorize in (True, False):
        model.zero_grad(set_to_none=True)
        loss = protonet.loss(model, b, vectorize=vectorize)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.features.parameters()]))  # the head is unused
    (lv, gv), (ll, gl) = results
    assert torch.allclose(lv, ll, rtol=1e-12, atol=0)
    for a, c in zip(gv, gl, strict=True):
        assert torch.allclose(a, c, rtol=1e-9, atol=1e-12)
    one = protonet.loss(model, TaskBatch(*(t[:1] for t in b)), vectorize=False)
    assert not torch.allclose(one, ll)  # the tasks differ: the check above can tell a wrong task apart


def test_prototypes_are_class_means():
    z = torch.tensor([[0.0, 0.0], [2.0, 0.0], [5.0, 5.0]])
    y = torch.tensor([0, 0, 1])
    assert torch.equal(protonet.prototypes(z, y, 2), torch.tensor([[1.0, 0.0], [5.0, 5.0]]))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_meta_updates_fit_a_fixed_meta_batch(algorithm, batch):
    """Repeated meta-updates on one meta-batch must drive its meta-loss down (the step descends)."""
    config = FewShotConfig(algorithm=algorithm, hidden=8, ways=5)
    torch.manual_seed(0)
    model = build_model(config)
    optimizer = make_optimizer(model.parameters(), 1e-2)
    losses = [train_step(model, optimizer, batch, config) for _ in range(15)]
    assert losses[-1] < 0.8 * losses[0], losses


def test_resume_ends_with_the_parameters_of_an_uninterrupted_run(classes, tmp_path):
    config = FewShotConfig(**TINY)
    full, hist_full = train(config, classes, tmp_path / "full.pt", checkpoint_every=2, progress=False)
    part = tmp_path / "part.pt"
    train(config, classes, part, checkpoint_every=2, progress=False, stop_after=3)
    assert torch.load(part, weights_only=True)["iteration"] == 3
    resumed, hist = train(config, classes, part, resume=True, checkpoint_every=2, progress=False)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert hist.loss == hist_full.loss
    model, stored, state = load_model(part)
    assert stored == config and state["iteration"] == 6
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), full.state_dict().values(), strict=True))


def test_resume_refuses_another_configuration(classes, tmp_path):
    config = FewShotConfig(**TINY)
    train(config, classes, tmp_path / "run.pt", progress=False, stop_after=2)
    with pytest.raises(ValueError, match="config differs"):
        train(FewShotConfig(**{**TINY, "seed": 1}), classes, tmp_path / "run.pt", resume=True, progress=False)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(algorithm="reptile"), "algorithm"),
        (dict(background="small3"), "background"),
        (dict(ways=1), "ways"),
        (dict(hidden=0), "hidden"),
        (dict(grid=0), "grid must be a positive integer"),
        (dict(grid=2.0), "grid"),
        (dict(inner_lr=-0.1), "inner_lr"),
        (dict(iterations=0), "iterations"),
        (dict(cosine="yes"), "cosine"),
        (dict(image_size=7), "image_size must be an integer from 8 to 105"),
        (dict(image_size=106), "image_size must be an integer from 8 to 105"),
        (dict(image_size=28.0), "image_size"),
        (dict(image_size=True), "image_size"),
    ],
)
def test_bad_configuration_is_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        FewShotConfig(**kwargs)
