"""Chapter 6.2's pieces: the digits domain, rotations, and the transfer-learning baselines."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metabp import transfer
from metabp.convnet import Conv4
from metabp.digits import DIGITS_DRAWINGS, load_digits
from metabp.episodes import EpisodeSampler, ImageClasses, rotate
from metabp.tasks import TaskBatch


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_digits_are_ten_classes_in_omniglot_format(digits):
    assert digits.images.shape == (10, DIGITS_DRAWINGS, 28, 28)
    assert digits.images.dtype == torch.uint8
    assert digits.names == tuple(f"digits/{d}" for d in range(10))
    # ink high and centred in a 20-pixel box: the 4-pixel border is empty, the box is not
    assert digits.images[..., :4, :].max() == 0 and digits.images[..., -4:, :].max() == 0
    assert digits.images[..., :, :4].max() == 0 and digits.images[..., :, -4:].max() == 0
    assert digits.images.max() == 255 and digits.images.float().mean() > 20
    # the classes differ: mean images of 0 and 1 are far apart, two halves of one class close
    mean = digits.images.float().mean(1)
    halves = digits.images[0, :87].float().mean(0), digits.images[0, 87:].float().mean(0)
    assert (mean[0] - mean[1]).abs().mean() > 3 * (halves[0] - halves[1]).abs().mean()


def test_digits_arguments_are_checked():
    with pytest.raises(ValueError, match="box must be at most size"):
        load_digits(size=16, box=20)
    with pytest.raises(ValueError, match="drawings must be at most 174"):
        load_digits(drawings=175)


def test_rotate_by_zero_and_by_a_quarter_turn(digits):
    small = ImageClasses(digits.images[:2, :3], digits.names[:2])
    assert torch.equal(rotate(small, 0).images, small.images)
    quarter = rotate(small, 90)
    assert quarter.names == ("digits/0/turn90", "digits/1/turn90")
    assert (quarter.images.int() - torch.rot90(small.images, 1, (-2, -1)).int()).abs().max() <= 1
    turned = rotate(small, 45).images
    assert turned.shape == small.images.shape and not torch.equal(turned, small.images)
    with pytest.raises(ValueError, match="degrees must be a number from -360 to 360"):
        rotate(small, 400)


def test_pretrained_classifier_learns_its_classes(digits):
    model, history = transfer.pretrain_classifier(
        digits, hidden=8, iterations=60, batch_size=32, lr=1e-2, progress=False, cosine=False
    )
    assert model.ways == 10 and len(history.loss) == 60
    assert sum(history.loss[-10:]) / 10 < 0.6 * sum(history.loss[:10]) / 10
    x = digits.images[:, :20].flatten(0, 1).unsqueeze(1).float() / 255
    y = torch.arange(10).repeat_interleave(20)
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() > 0.5


def test_new_head_is_zero_and_the_body_a_copy():
    torch.manual_seed(0)
    model = Conv4(ways=7, hidden=8)
    new = transfer.with_new_head(model, 5)
    assert new.ways == 5 and model.ways == 7
    assert new.head.weight.abs().max() == 0 and new.head.bias.abs().max() == 0
    assert torch.equal(new.features[0].weight, model.features[0].weight)
    assert new.features[0].weight.data_ptr() != model.features[0].weight.data_ptr()
    fresh_a, fresh_b = (
        transfer.with_new_head(None, 5, hidden=8, seed=3),
        transfer.with_new_head(None, 5, hidden=8, seed=3),
    )
    assert torch.equal(fresh_a.features[0].weight, fresh_b.features[0].weight)
    with pytest.raises(ValueError, match="model must be a Conv4 or None"):
        transfer.with_new_head(torch.nn.Linear(2, 2), 5)


@pytest.fixture(scope="module")
def tasks(digits):
    return EpisodeSampler(digits, ways=5, shots=3, queries=4).sample(3, torch.Generator().manual_seed(0))


def test_linear_probe_equals_a_separate_fit_per_task(tasks):
    torch.manual_seed(0)
    model = Conv4(ways=5, hidden=8)
    got = transfer.linear_probe_accuracy(model, tasks, lr=0.5, steps=[0, 25])
    assert torch.allclose(got[0], torch.full((3,), 0.2))  # a zero head predicts class 0 everywhere
    for i in range(3):
        with torch.no_grad():
            z_spt, z_qry = model.embed(tasks.x_spt[i]), model.embed(tasks.x_qry[i])
        head = torch.nn.Linear(8, 5)
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
        opt = torch.optim.SGD(head.parameters(), lr=0.5)
        for _ in range(25):
            opt.zero_grad()
            F.cross_entropy(head(z_spt), tasks.y_spt[i]).backward()
            opt.step()
        want = (head(z_qry).argmax(1) == tasks.y_qry[i]).float().mean()
        assert got[1, i] == want
    with pytest.raises(ValueError, match="non-decreasing"):
        transfer.linear_probe_accuracy(model, tasks, lr=0.5, steps=[5, 1])


def test_training_from_scratch_fits_the_support_set(tasks):
    # queries equal to the support set: training must fit them
    fit = TaskBatch(tasks.x_spt, tasks.y_spt, tasks.x_spt, tasks.y_spt)
    acc = transfer.fine_tune_accuracy(None, fit, lr=0.5, steps=[0, 30], hidden=8)
    assert acc.shape == (2, 3)
    assert torch.allclose(acc[0], torch.full((3,), 0.2))
    assert acc[1].min() > 0.8
    with pytest.raises(ValueError, match="non-decreasing"):
        transfer.fine_tune_accuracy(None, fit, lr=0.5, steps=[3, 2], hidden=8)


def test_fine_tuning_equals_sgd_on_a_copy_and_leaves_the_model_alone(tasks):
    torch.manual_seed(1)
    model = Conv4(ways=9, hidden=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = transfer.fine_tune_accuracy(model, tasks, lr=0.1, steps=[2, 4])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for i in range(3):
        net = transfer.with_new_head(model, 5)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for step in range(4):
            opt.zero_grad()
            F.cross_entropy(net(tasks.x_spt[i]), tasks.y_spt[i]).backward()
            opt.step()
            if step in (1, 3):
                with torch.no_grad():
                    want = (net(tasks.x_qry[i]).argmax(1) == tasks.y_qry[i]).float().mean()
                assert got[(step - 1) // 2, i] == want


def test_keeping_the_head_is_mamls_test_time_adaptation(tasks):
    from metabp.fewshot import FewShotConfig, accuracy, build_model

    config = FewShotConfig(hidden=8, ways=7, inner_lr=0.3)
    torch.manual_seed(2)
    model = build_model(config)
    want = accuracy(model, tasks, config, steps=[0, 1, 3])
    got = transfer.fine_tune_accuracy(model, tasks, config.inner_lr, [0, 1, 3], head="keep")
    assert torch.allclose(got, want, atol=1e-6)
    with pytest.raises(ValueError, match="head must be 'zero' or 'keep'"):
        transfer.fine_tune_accuracy(model, tasks, 0.3, [1], head="new")
    with pytest.raises(ValueError, match="needs a Conv4"):
        transfer.fine_tune_accuracy(None, tasks, 0.3, [1], head="keep")
