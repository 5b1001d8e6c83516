"""Episode samplers (from scratch and through learn2learn) and the alphabet splits."""

from __future__ import annotations

import hashlib
import random

import pytest
import torch

from metabp.episodes import EpisodeSampler, ImageClasses, L2LEpisodeSampler
from metabp.omniglot import load_split


@pytest.fixture(scope="module")
def small1():
    return {part: load_split("small1", part) for part in ("train", "test")}


def toy_classes(classes: int = 12, drawings: int = 6) -> ImageClasses:
    """Class c, drawing m is a 2x2 image filled with the value 10 * c + m (so both can be read back)."""
    values = (10 * torch.arange(classes).view(-1, 1) + torch.arange(drawings)).to(torch.uint8)
    return ImageClasses(
        values.view(classes, drawings, 1, 1).expand(-1, -1, 2, 2).contiguous(), tuple(f"A/c{c}" for c in range(classes))
    )


def decode_ids(x: torch.Tensor) -> torch.Tensor:
    """(class, drawing) of toy images x (..., 1, 2, 2)."""
    v = torch.round(x[..., 0, 0, 0] * 255).long()
    return torch.stack([v // 10, v % 10], -1)


@pytest.mark.parametrize("sampler_cls", [EpisodeSampler, L2LEpisodeSampler])
def test_episodes_have_the_right_shapes_labels_and_draws(sampler_cls):
    n, k, q = 4, 2, 3
    sampler = sampler_cls(toy_classes(), ways=n, shots=k, queries=q)
    b = sampler.sample(7, torch.Generator().manual_seed(0))
    assert b.x_spt.shape == (7, n * k, 1, 2, 2) and b.x_qry.shape == (7, n * q, 1, 2, 2)
    assert b.y_spt.dtype == torch.int64 and b.x_spt.dtype == torch.float32
    for t in range(7):
        assert sorted(b.y_spt[t].tolist()) == sorted(list(range(n)) * k)
        assert sorted(b.y_qry[t].tolist()) == sorted(list(range(n)) * q)
        ids = decode_ids(torch.cat([b.x_spt[t], b.x_qry[t]]))
        labels = torch.cat([b.y_spt[t], b.y_qry[t]])
        # one class per label, different classes for different labels
        cls_of = {lab: set(ids[labels == lab, 0].tolist()) for lab in range(n)}
        assert all(len(c) == 1 for c in cls_of.values())
        assert len(set().union(*cls_of.values())) == n
        # support and query drawings of a class are all different
        assert len({tuple(i) for i in ids.tolist()}) == n * (k + q)


@pytest.mark.parametrize("sampler_cls", [EpisodeSampler, L2LEpisodeSampler])
def test_episodes_are_seeded(sampler_cls):
    sampler = sampler_cls(toy_classes(), ways=3, shots=1, queries=2)
    a = sampler.sample(5, torch.Generator().manual_seed(3))
    b = sampler.sample(5, torch.Generator().manual_seed(3))
    c = sampler.sample(5, torch.Generator().manual_seed(4))
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(a.x_spt, c.x_spt)


def test_learn2learn_sampler_leaves_global_random_state_alone():
    random.seed(11)
    expected = random.random()
    random.seed(11)
    L2LEpisodeSampler(toy_classes(), ways=3, shots=1, queries=1).sample(4, torch.Generator().manual_seed(0))
    assert random.random() == expected


def test_class_choice_is_uniform_and_labels_are_shuffled():
    sampler = EpisodeSampler(toy_classes(classes=6), ways=3, shots=1, queries=1)
    b = sampler.sample(3000, torch.Generator().manual_seed(0))
    cls = decode_ids(b.x_spt)[..., 0]  # (B, 3): class of label 0, 1, 2
    counts = torch.bincount(cls.flatten(), minlength=6).float() / cls.numel()
    assert torch.allclose(counts, torch.full((6,), 1 / 6), atol=0.02)
    assert torch.allclose(cls[:, 0].float().mean(), torch.tensor(2.5), atol=0.1)  # label 0 is any class


def test_bad_episode_arguments_are_named():
    classes = toy_classes(classes=5, drawings=4)
    for kwargs, name in [
        (dict(ways=6), "ways"),
        (dict(ways=1), "ways"),
        (dict(shots=0), "shots"),
        (dict(shots=3, queries=2), "shots \\+ queries"),
    ]:
        with pytest.raises(ValueError, match=name):
            EpisodeSampler(classes, **kwargs)
    with pytest.raises(ValueError, match="images"):
        ImageClasses(torch.zeros(2, 3, 4), ("a", "b"))


def test_rotations_are_classes_of_their_own(small1):
    base = load_split("small1", "train", rotations=False)
    rot = small1["train"]
    assert len(rot) == 4 * len(base) == 544
    c = 17
    for a in range(4):
        assert torch.equal(rot.images[4 * c + a], torch.rot90(base.images[c], a, dims=(-2, -1)))
    assert rot.names[4 * c + 1] == base.names[c] + "/rot90"


def _hashes(images: torch.Tensor) -> set[str]:
    return {hashlib.sha1(im.numpy().tobytes()).hexdigest() for im in images.flatten(0, 1)}


@pytest.mark.parametrize("background", ["small1", "small2"])
def test_no_character_or_rotation_is_on_both_sides(background):
    train = load_split(background, "train")
    test = load_split(background, "test")
    assert not set(train.alphabets) & set(test.alphabets)
    assert not set(train.characters) & set(test.characters)
    assert {"Greek", "Latin"} <= set(train.alphabets)  # in both small sets: only ever on the training side
    # pixel level: no test drawing, at any rotation, is also a training drawing
    assert not _hashes(train.images) & _hashes(test.images)
    assert len(test) >= 4 * 20


def test_held_out_alphabets_of_small1(small1):
    assert small1["test"].alphabets == ("Japanese_(katakana)", "Sanskrit", "Tagalog")
    assert len(small1["test"]) == 4 * (47 + 42 + 17)  # with rotations
    assert small1["train"].images.shape[1:] == (20, 28, 28)


def test_omniglot_episodes_are_images_in_unit_range(small1):
    b = EpisodeSampler(small1["test"], ways=20, shots=1, queries=5).sample(3, torch.Generator().manual_seed(0))
    assert b.x_spt.shape == (3, 20, 1, 28, 28) and b.x_qry.shape == (3, 100, 1, 28, 28)
    assert 0.0 <= b.x_spt.min() and b.x_spt.max() <= 1.0
