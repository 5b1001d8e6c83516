"""Lake-style runs (within one alphabet, two drawers), evaluate-runs on every kind of checkpoint,
and same-alphabet training episodes."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from cli_helpers import run_cli
from runs_fixture import make_runs

from metabp.data import DataError
from metabp.episodes import EpisodeSampler, ImageClasses, alphabet_groups
from metabp.fewshot import FewShotConfig, load_model, train
from metabp.omniglot import load_split
from metabp.omniglot_runs import (
    MANIFEST_FILE,
    RUNS,
    held_out_characters,
    image_size,
    lake_runs,
    load_runs,
    make_lake_runs,
    read_manifest,
    runs_accuracy,
)

TINY = ["--hidden", "4", "--ways", "3", "--queries", "1", "--meta-batch-size", "2", "--iterations", "3"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lake") / "seed3"
    return folder, make_lake_runs(folder, "small1", seed=3)


@pytest.fixture(scope="module")
def test_classes():
    return load_split("small1", "test", rotations=False)


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_runs_are_in_the_official_layout_and_load_as_the_official_runs_do(made):
    folder, manifest = made
    assert sorted(p.name for p in folder.iterdir()) == sorted([*RUNS, MANIFEST_FILE])
    for name in RUNS:
        assert sorted(p.name for p in (folder / name).iterdir()) == ["class_labels.txt", "test", "training"]
        assert sorted(p.name for p in (folder / name / "training").iterdir()) == [
            f"class{i:02d}.png" for i in range(1, 21)
        ]
        assert sorted(p.name for p in (folder / name / "test").iterdir()) == [f"item{i:02d}.png" for i in range(1, 21)]
    runs = load_runs(folder)
    assert [r.name for r in runs] == list(RUNS)
    for run, drawn in zip(runs, manifest["runs"], strict=True):
        assert run.train.shape == run.test.shape == (20, 1, 28, 28)
        assert run.answers.tolist() == drawn["answers"] and sorted(drawn["answers"]) == list(range(20))


def test_each_run_is_one_held_out_alphabet_and_two_drawers(made):
    folder, manifest = made
    _, alphabets = held_out_characters("small1")
    assert manifest["alphabets"] == ["Japanese_(katakana)", "Sanskrit"]  # the alphabets small1 lacks, 20+ characters
    assert manifest["left_out"] == {"Tagalog": 17}
    assert [r["alphabet"] for r in manifest["runs"]] == manifest["alphabets"] * 10  # in turn, ten runs each
    for drawn in manifest["runs"]:
        name, first, second = drawn["name"], drawn["training_drawer"], drawn["test_drawer"]
        assert first != second and len(set(drawn["characters"])) == 20
        files = dict(alphabets[drawn["alphabet"]])  # character -> {drawer: path}
        assert set(drawn["characters"]) <= set(files) and drawn["characters"] == sorted(drawn["characters"])
        for c, character in enumerate(drawn["characters"]):  # training image c: character c by the first drawer
            assert (folder / name / "training" / f"class{c + 1:02d}.png").read_bytes() == files[character][
                first
            ].read_bytes()
        for i, c in enumerate(drawn["answers"]):  # test item i: its character by the second drawer
            source = files[drawn["characters"][c]][second]
            assert (folder / name / "test" / f"item{i + 1:02d}.png").read_bytes() == source.read_bytes()
            assert source.name.endswith(f"_{second:02d}.png")


def test_the_runs_hold_the_same_pixels_as_the_held_out_split(made, test_classes):
    folder, manifest = made
    index = {n: i for i, n in enumerate(test_classes.names)}
    for run, drawn in zip(load_runs(folder), manifest["runs"], strict=True):
        rows = [index[f"{drawn['alphabet']}/{c}"] for c in drawn["characters"]]
        expected_train = test_classes.images[rows, drawn["training_drawer"] - 1].float().div(255).unsqueeze(1)
        assert torch.equal(run.train, expected_train)
        expected_test = test_classes.images[rows, drawn["test_drawer"] - 1].float().div(255).unsqueeze(1)
        assert torch.equal(run.test, expected_test[run.answers])


def test_the_same_seed_writes_the_same_runs_and_another_seed_others(made, tmp_path):
    folder, _ = made
    again = tmp_path / "again"
    other = tmp_path / "other"
    make_lake_runs(again, "small1", seed=3)
    make_lake_runs(other, "small1", seed=4)
    assert _files(again) == _files(folder)
    a, b = read_manifest(folder), read_manifest(other)
    assert a["seed"] == 3 and b["seed"] == 4
    assert [r["characters"] for r in a["runs"]] != [r["characters"] for r in b["runs"]]


def test_bad_requests_are_named(made, tmp_path):
    folder, _ = made
    with pytest.raises(ValueError, match="exists"):
        make_lake_runs(folder, "small1", seed=0)
    with pytest.raises(ValueError, match="does not exist"):
        make_lake_runs(tmp_path / "no" / "runs", "small1", seed=0)
    with pytest.raises(ValueError, match="background"):
        make_lake_runs(tmp_path / "runs", "small3", seed=0)
    with pytest.raises(ValueError, match="seed"):
        make_lake_runs(tmp_path / "runs", "small1", seed=-1)
    assert not (tmp_path / "runs").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(DataError, match="make_lake_runs"):
        read_manifest(tmp_path)


def test_lake_runs_are_kept_in_the_cache_and_reused(tmp_path):
    cache = tmp_path / "cache"
    folder = lake_runs("small1", 5, cache=cache)
    assert folder == cache / "lake_runs" / "small1-seed5" and len(load_runs(folder)) == 20
    stamp = (folder / MANIFEST_FILE).stat().st_mtime_ns
    assert lake_runs("small1", 5, cache=cache) == folder and (folder / MANIFEST_FILE).stat().st_mtime_ns == stamp
    manifest = read_manifest(folder)
    manifest["seed"] = 6
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="delete it"):
        lake_runs("small1", 5, cache=cache)


def test_make_runs_on_the_command_line(tmp_path, capsys):
    out = tmp_path / "runs"
    code, stdout, err = run_cli(["make-runs", "--seed", "3", "--out", out], capsys)
    assert code == 0, err
    assert "Japanese_(katakana) (10 runs), Sanskrit (10 runs); Tagalog left out" in stdout
    assert stdout.strip().splitlines()[-1] == f"runs: {out}"
    assert read_manifest(out)["seed"] == 3
    for args, needle in [
        (["make-runs", "--out", out], "exists"),
        (["make-runs", "--out", tmp_path / "no" / "runs"], "does not exist"),
        (["make-runs", "--background", "small3", "--out", tmp_path / "x"], "--background must be one of"),
        (["make-runs", "--seed", "-2"], "--seed"),
    ]:
        code, _, err = run_cli(args, capsys)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, (args, err)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One tiny checkpoint of every kind the command line writes."""
    folder = tmp_path_factory.mktemp("ckpts")
    paths = {}
    for algorithm in ("maml", "fomaml", "anil", "protonet"):
        paths[algorithm] = folder / f"{algorithm}.pt"
        code = run_cli(
            ["train", "omniglot", "--out", paths[algorithm], "--algorithm", algorithm, *TINY, "--no-progress"],
            _NoCapture(),
        )[0]
        assert code == 0
    paths["classifier"] = folder / "classifier.pt"
    pretrain = ["pretrain", "omniglot", "--out", paths["classifier"], "--hidden", "4", "--iterations", "3"]
    assert run_cli([*pretrain, "--batch-size", "8", "--no-progress"], _NoCapture())[0] == 0
    return paths


class _NoCapture:
    """Stands in for pytest's capsys in a module-scoped fixture."""

    def readouterr(self):
        return "", ""


@pytest.mark.parametrize("kind", ["maml", "fomaml", "anil", "protonet", "classifier"])
def test_evaluate_runs_takes_every_checkpoint_the_command_line_writes(kind, checkpoints, made, tmp_path, capsys):
    folder, _ = made
    code, out, err = run_cli(["evaluate-runs", "--checkpoint", checkpoints[kind], "--runs", folder], capsys)
    lines = out.strip().splitlines()
    assert code == 0, err
    assert len(lines) == 21 and lines[0].startswith("run01: error ")
    value = float(lines[-1].removeprefix("error_percent: "))
    per_run = [float(line.split("error ")[1].rstrip("%")) for line in lines[:20]]
    assert value == pytest.approx(sum(per_run) / 20, abs=0.006)
    assert value == pytest.approx(
        100 * (1 - runs_accuracy(checkpoints[kind], load_runs(folder)).mean().item()), abs=0.006
    )
    # on runs whose test items copy the training images, nearest prototype makes no error
    if kind in ("protonet", "classifier"):
        copies = tmp_path / "copies"
        make_runs(copies)
        code, out, _ = run_cli(["evaluate-runs", "--checkpoint", checkpoints[kind], "--runs", copies], capsys)
        assert code == 0 and out.strip().splitlines()[-1] == "error_percent: 0.00"


COMMITTED = sorted((Path(__file__).resolve().parents[1] / "notebooks" / "checkpoints").glob("*.pt"))


def test_the_lake_learner_is_committed():
    assert "omniglot_lake.pt" in [p.name for p in COMMITTED]


@pytest.mark.parametrize("path", COMMITTED, ids=[p.name for p in COMMITTED])
def test_evaluate_runs_takes_every_committed_checkpoint(path, made, capsys):
    folder, _ = made
    code, out, err = run_cli(["evaluate-runs", "--checkpoint", path, "--runs", folder], capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 21 and 0 <= float(lines[-1].removeprefix("error_percent: ")) <= 100


def test_a_classifier_takes_no_inner_steps(checkpoints, made, capsys):
    folder, _ = made
    code, _, err = run_cli(
        ["evaluate-runs", "--checkpoint", checkpoints["classifier"], "--runs", folder, "--steps", "3"], capsys
    )
    assert code == 2 and "nearest prototype" in err and "--steps" in err


# --- same-alphabet episodes -----------------------------------------------------------------------------------


def lettered(sizes: dict[str, int], drawings: int = 4) -> ImageClasses:
    """Classes named 'Alphabet/cN', ``sizes[alphabet]`` of each; class c's pixels hold c."""
    names = tuple(f"{a}/c{i}" for a, n in sizes.items() for i in range(n))
    values = torch.arange(len(names), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, drawings, 2, 2)
    return ImageClasses(values.contiguous(), names)


def test_same_alphabet_tasks_draw_every_way_from_one_alphabet():
    classes = lettered({"A": 6, "B": 3, "C": 5})
    sampler = EpisodeSampler(classes, ways=4, shots=1, queries=1, same_alphabet=True)
    assert sampler.alphabets == ("A", "C")  # B has fewer than 4 classes
    sampler.sample(300, torch.Generator().manual_seed(0))
    assert sampler.last_classes is not None
    seen = set()
    for row in sampler.last_classes.tolist():
        alphabets = {classes.names[c].split("/")[0] for c in row}
        assert len(alphabets) == 1 and len(set(row)) == 4
        seen |= alphabets
    assert seen == {"A", "C"}
    # without the option, tasks mix alphabets
    mixed = EpisodeSampler(classes, ways=4, shots=1, queries=1)
    mixed.sample(50, torch.Generator().manual_seed(0))
    assert mixed.last_classes is not None
    assert any(len({classes.names[c].split("/")[0] for c in row}) > 1 for row in mixed.last_classes.tolist())


def test_a_rotated_alphabet_is_an_alphabet_of_its_own():
    classes = lettered({"A": 5, "B": 5}).with_rotations()
    groups, index = alphabet_groups(classes.names)
    assert groups == ("A", "A/rot180", "A/rot270", "A/rot90", "B", "B/rot180", "B/rot270", "B/rot90")
    assert index.tolist()[:4] == [0, 3, 1, 2]  # class 0 and its three rotations
    sampler = EpisodeSampler(classes, ways=5, shots=1, queries=1, same_alphabet=True)
    sampler.sample(200, torch.Generator().manual_seed(1))
    assert sampler.last_classes is not None
    keys = {frozenset(groups[index[c]] for c in row) for row in sampler.last_classes.tolist()}
    assert all(len(k) == 1 for k in keys) and len(keys) == 8


def test_same_alphabet_needs_an_alphabet_as_large_as_a_task():
    with pytest.raises(ValueError, match="at least ways=4"):
        EpisodeSampler(lettered({"A": 3, "B": 3}), ways=4, shots=1, queries=1, same_alphabet=True)
    with pytest.raises(ValueError, match="same_alphabet"):
        EpisodeSampler(lettered({"A": 3}), ways=2, shots=1, queries=1, same_alphabet="yes")  # type: ignore[arg-type]


def test_small1_gives_twenty_way_tasks_within_each_alphabet_and_rotation():
    classes = load_split("small1", "train")
    sampler = EpisodeSampler(classes, ways=20, shots=1, queries=1, same_alphabet=True)
    assert len(sampler.alphabets) == 5 * 4  # every alphabet of small1 has 20 characters or more, at each rotation
    batch = sampler.sample(100, torch.Generator().manual_seed(2))
    assert batch.x_spt.shape == (100, 20, 1, 28, 28)
    assert sampler.last_classes is not None
    groups, index = alphabet_groups(classes.names)
    assert all(len({int(index[c]) for c in row}) == 1 for row in sampler.last_classes.tolist())


def test_train_same_alphabet_and_distorted_from_the_library_and_the_command_line(tmp_path, capsys):
    classes = load_split("small1", "train")
    config = FewShotConfig(ways=3, queries=1, hidden=4, meta_batch_size=2, iterations=2, same_alphabet=True)
    _, history = train(config, classes, tmp_path / "lib.pt", progress=False)
    assert len(history.loss) == 2
    assert load_model(tmp_path / "lib.pt")[1].same_alphabet is True
    out = tmp_path / "cli.pt"
    args = ["train", "omniglot", "--out", out, *TINY, "--same-alphabet", "--distort", "0.5", "--no-progress"]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    assert load_model(out)[1].same_alphabet is True and load_model(out)[1].distort == 0.5
    # checkpoints written before the options existed read as without them
    state = torch.load(out, weights_only=True)
    del state["config"]["same_alphabet"], state["config"]["distort"]
    torch.save(state, tmp_path / "old.pt")
    old = load_model(tmp_path / "old.pt")[1]
    assert old.same_alphabet is False and old.distort == 0.0


# --- image size ------------------------------------------------------------------------------------------------


def test_a_learner_trained_at_another_image_size_is_scored_at_that_size(checkpoints, made, tmp_path, capsys):
    folder, _ = made
    out = tmp_path / "px16.pt"
    code, _, err = run_cli(
        ["train", "omniglot", "--out", out, "--algorithm", "protonet", *TINY, "--image-size", "16"], capsys
    )
    assert code == 0, err
    assert load_model(out)[1].image_size == 16 and image_size(out) == 16
    assert image_size(checkpoints["classifier"]) == image_size(checkpoints["maml"]) == 28
    at16 = runs_accuracy(out, load_runs(folder, 16))
    assert torch.equal(runs_accuracy(out, folder), at16)  # a folder is read at the checkpoint's size
    with pytest.raises(ValueError, match=r"trained on 16-pixel drawings but the runs hold 28x28 images.*size=16"):
        runs_accuracy(out, load_runs(folder))
    code, text, err = run_cli(["evaluate-runs", "--checkpoint", out, "--runs", folder], capsys)
    assert code == 0, err
    assert float(text.strip().splitlines()[-1].removeprefix("error_percent: ")) == pytest.approx(
        100 * (1 - at16.mean().item()), abs=0.006
    )
    # checkpoints written before the field existed were trained at 28 pixels
    state = torch.load(out, weights_only=True)
    del state["config"]["image_size"]
    torch.save(state, tmp_path / "old.pt")
    assert image_size(tmp_path / "old.pt") == 28 and load_model(tmp_path / "old.pt")[1].image_size == 28


def test_evaluate_reads_the_held_out_split_at_the_checkpoints_size(tmp_path, capsys, monkeypatch):
    import metabp.omniglot

    out = tmp_path / "px20.pt"
    code, _, err = run_cli(
        ["train", "omniglot", "--out", out, "--algorithm", "protonet", *TINY, "--image-size", "20"], capsys
    )
    assert code == 0, err
    real, sizes = metabp.omniglot.load_split, []

    def recording(*args, **kwargs):
        classes = real(*args, **kwargs)
        sizes.append(tuple(classes.images.shape[-2:]))
        return classes

    monkeypatch.setattr(metabp.omniglot, "load_split", recording)
    code, text, err = run_cli(["evaluate", "omniglot", "--checkpoint", out, "--ways", "5", "--tasks", "4"], capsys)
    assert code == 0, err
    assert sizes == [(20, 20)] and "5-way 1-shot accuracy" in text


def test_training_refuses_drawings_of_another_size_and_bad_sizes_are_named(tmp_path, capsys):
    classes = load_split("small1", "train")  # 28 pixels
    with pytest.raises(ValueError, match=r"config.image_size is 32: load them with load_split\(..., size=32\)"):
        train(FewShotConfig(ways=3, hidden=4, iterations=1, image_size=32), classes, progress=False)
    assert load_split("small1", "train", size=32).images.shape[-2:] == (32, 32)
    with pytest.raises(ValueError, match="size must be an integer from 8 to 105"):
        load_split("small1", "train", size=200)
    code, _, err = run_cli(["train", "omniglot", "--out", tmp_path / "x.pt", "--image-size", "4"], capsys)
    assert code == 2 and "image_size must be an integer from 8 to 105 pixels" in err
    assert not (tmp_path / "x.pt").exists()


# --- small affine distortions of the training drawings ---------------------------------------------------------


def test_distortion_keeps_the_episode_and_moves_the_ink_a_little():
    classes = load_split("small1", "train")
    plain = EpisodeSampler(classes, ways=5, shots=1, queries=2)
    moved = EpisodeSampler(classes, ways=5, shots=1, queries=2, distort=1.0)
    almost = EpisodeSampler(classes, ways=5, shots=1, queries=2, distort=1e-6)
    a, b, c = (s.sample(6, torch.Generator().manual_seed(7)) for s in (plain, moved, almost))
    assert torch.equal(plain.last_classes, moved.last_classes)  # its random numbers come after the episode's
    assert torch.equal(a.y_spt, b.y_spt) and torch.equal(a.y_qry, b.y_qry)
    assert torch.allclose(a.x_spt, c.x_spt, atol=1e-4) and torch.allclose(a.x_qry, c.x_qry, atol=1e-4)  # identity
    assert (a.x_spt - b.x_spt).abs().mean() > 0.02  # visibly moved
    assert b.x_spt.min() >= 0 and b.x_spt.max() <= 1
    ink = a.x_spt.sum((-1, -2, -3))
    assert ((b.x_spt.sum((-1, -2, -3)) - ink).abs() < 0.3 * ink).all()  # scaled by at most 10% per axis
    again = moved.sample(6, torch.Generator().manual_seed(7))
    assert torch.equal(again.x_spt, b.x_spt)


def test_a_shift_moves_the_centre_of_the_ink_by_at_most_two_pixels(monkeypatch):
    import metabp.episodes as episodes

    monkeypatch.setattr(episodes, "DISTORTION", {"degrees": 0.0, "shear": 0.0, "scale": 0.0, "shift": 2.0})
    x = torch.zeros(50, 1, 28, 28)
    x[:, :, 12:16, 10:14] = 1.0
    y = episodes.distort_images(x, 1.0, torch.Generator().manual_seed(0))
    grid = torch.arange(28.0)

    def centre(img):
        mass = img.sum((-1, -2))
        return torch.stack([(img.sum(-1) * grid).sum(-1) / mass, (img.sum(-2) * grid).sum(-1) / mass], -1)

    move = (centre(y) - centre(x)).squeeze(1)
    assert move.abs().max() <= 2.0 + 1e-4 and move.abs().max() > 1.0
    assert torch.allclose(y.sum((-1, -2)), x.sum((-1, -2)), rtol=1e-4)  # a shift keeps all the ink


def test_bad_distortions_are_named():
    classes = lettered({"A": 4})
    for bad in (-0.1, 2.5, True, "1"):
        with pytest.raises(ValueError, match="distort"):
            EpisodeSampler(classes, ways=2, shots=1, queries=1, distort=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="distort"):
            FewShotConfig(distort=bad)  # type: ignore[arg-type]


# --- test-time augmentation -------------------------------------------------------------------------------------


def test_test_time_augmentation_averages_each_images_features_over_its_distorted_copies(checkpoints, made):
    from metabp import protonet
    from metabp.episodes import distort_images
    from metabp.omniglot_runs import runs_as_tasks

    model = load_model(checkpoints["protonet"])[0]
    tasks = runs_as_tasks(load_runs(made[0])[:4])
    got = protonet.accuracy(model, tasks, augment=3, strength=1.5, seed=11)
    # the same by hand: copies drawn for the whole batch, support then query, copy by copy
    g = torch.Generator().manual_seed(11)
    copies = [(tasks.x_spt, tasks.x_qry)]
    for _ in range(3):
        copies.append((distort_images(tasks.x_spt, 1.5, g), distort_images(tasks.x_qry, 1.5, g)))
    want = []
    with torch.no_grad():
        for t in range(4):
            z = sum(model.embed(torch.cat([s[t], q[t]])) for s, q in copies) / 4
            spt, qry = z[:20], z[20:]  # one training image per class, in class order
            want.append((torch.cdist(qry, spt).argmin(-1) == tasks.y_qry[t]).float().mean())
    assert torch.allclose(got, torch.stack(want))
    plain = protonet.accuracy(model, tasks)
    assert not torch.equal(got, plain)  # the copies change the answer somewhere
    assert torch.equal(protonet.accuracy(model, tasks, augment=1, strength=0.0), plain)  # undistorted copies
    assert torch.equal(protonet.accuracy(model, tasks, augment=3, strength=1.5, seed=11), got)  # seeded
    with pytest.raises(ValueError, match="augment"):
        protonet.accuracy(model, tasks, augment=-1)
    with pytest.raises(ValueError, match="strength"):
        protonet.accuracy(model, tasks, augment=2, strength=2.5)


class _Scaled(torch.nn.Module):
    """A learner whose features are another's times a constant."""

    def __init__(self, model, factor):
        super().__init__()
        self.model, self.factor = model, factor

    def embed(self, x):
        return self.factor * self.model.embed(x)


def test_an_ensemble_sums_each_learners_distances_divided_by_their_mean_in_the_task(checkpoints, made):
    from metabp import protonet
    from metabp.omniglot_runs import runs_as_tasks
    from metabp.transfer import load_classifier

    first, second = load_model(checkpoints["protonet"])[0], load_classifier(checkpoints["classifier"])[0]
    tasks = runs_as_tasks(load_runs(made[0])[:6])
    got = protonet.ensemble_accuracy([first, second], tasks)
    want = []
    with torch.no_grad():
        for t in range(6):
            total = 0
            for model in (first, second):
                z = model.embed(torch.cat([tasks.x_spt[t], tasks.x_qry[t]]))
                d = torch.cdist(z[20:], z[:20]).pow(2)  # one training image per class, in class order
                total = total + d / d.mean()
            want.append((total.argmin(-1) == tasks.y_qry[t]).float().mean())
    assert torch.allclose(got, torch.stack(want))
    # one learner alone is that learner; the scale of a learner's features does not change its weight
    for model in (first, second):
        alone = protonet.accuracy(model, tasks, augment=2, seed=3)
        assert torch.equal(protonet.ensemble_accuracy([model], tasks, augment=2, seed=3), alone)
    assert torch.equal(protonet.ensemble_accuracy([first, _Scaled(second, 1000.0)], tasks), got)
    assert torch.equal(protonet.ensemble_accuracy([_Scaled(first, 1e-3), second], tasks), got)
    for bad in ([], first):
        with pytest.raises(ValueError, match="non-empty sequence"):
            protonet.ensemble_accuracy(bad, tasks)


def test_evaluate_runs_augments_the_learners_scored_by_nearest_prototype(checkpoints, made, capsys):
    folder, _ = made
    for kind in ("protonet", "classifier"):
        code, out, err = run_cli(
            ["evaluate-runs", "--checkpoint", checkpoints[kind], "--runs", folder, "--augment", "2"], capsys
        )
        assert code == 0, err
        value = float(out.strip().splitlines()[-1].removeprefix("error_percent: "))
        expected = runs_accuracy(checkpoints[kind], load_runs(folder), augment=2, strength=1.0)
        assert value == pytest.approx(100 * (1 - expected.mean().item()), abs=0.006)


@pytest.mark.parametrize(
    ("kind", "extra", "message"),
    [
        ("maml", ["--augment", "2"], "--augment applies only to learners scored by nearest prototype"),
        ("protonet", ["--augment", "-1"], "--augment must be >= 0"),
        ("protonet", ["--augment", "2", "--strength", "3"], "--strength must be from 0 to 2"),
        ("protonet", ["--steps", "3"], "no inner loop"),
    ],
)
def test_bad_test_time_options_are_named(kind, extra, message, checkpoints, made, capsys):
    code, _, err = run_cli(["evaluate-runs", "--checkpoint", checkpoints[kind], "--runs", made[0], *extra], capsys)
    assert code == 2 and message in err


def test_mirrors_add_each_class_mirrored_as_a_class_of_its_own():
    images = torch.arange(2 * 3 * 3 * 3, dtype=torch.uint8).view(2, 3, 3, 3)
    classes = ImageClasses(images, ("A/c0", "B/c1"))
    both = classes.with_mirrors()
    assert both.names == ("A/c0", "A/c0/mirror", "B/c1", "B/c1/mirror")
    assert torch.equal(both.images[0::2], images)
    assert torch.equal(both.images[1::2], images.flip(-1))
    assert not torch.equal(both.images[1], both.images[0])
    # a mirrored class has its alphabet's mirror image as its group, as rotations do
    groups, _ = alphabet_groups(classes.with_rotations().with_mirrors().names)
    assert "A/rot90/mirror" in groups and "A/mirror" in groups
    with pytest.raises(ValueError, match="mirrored already"):
        both.with_mirrors()


def test_train_with_mirrors_from_the_library_and_the_command_line(tmp_path, capsys, monkeypatch):
    import metabp.fewshot as fewshot

    seen = []
    real = fewshot.EpisodeSampler
    monkeypatch.setattr(fewshot, "EpisodeSampler", lambda classes, *a: seen.append(classes) or real(classes, *a))
    classes = load_split("small1", "train")
    config = FewShotConfig(ways=3, queries=1, hidden=4, meta_batch_size=2, iterations=2, mirrors=True)
    train(config, classes, tmp_path / "lib.pt", progress=False)
    assert load_model(tmp_path / "lib.pt")[1].mirrors is True
    assert len(seen[-1].names) == 2 * len(classes.names)
    assert torch.equal(seen[-1].images[1::2].cpu(), classes.images.flip(-1))
    train(replace(config, mirrors=False), classes, tmp_path / "plain.pt", progress=False)
    assert len(seen[-1].names) == len(classes.names)
    out = tmp_path / "cli.pt"
    code, _, err = run_cli(["train", "omniglot", "--out", out, *TINY, "--mirrors", "--no-progress"], capsys)
    assert code == 0, err
    assert load_model(out)[1].mirrors is True and len(seen[-1].names) == 2 * len(classes.names)
    with pytest.raises(ValueError, match="mirrors must be True or False"):
        FewShotConfig(mirrors="yes")  # type: ignore[arg-type]
    # checkpoints written before the option existed read as without it
    state = torch.load(out, weights_only=True)
    del state["config"]["mirrors"]
    torch.save(state, tmp_path / "old.pt")
    assert load_model(tmp_path / "old.pt")[1].mirrors is False


@pytest.mark.parametrize("algorithm", ["protonet", "maml"])
def test_a_learner_with_grid_features_is_trained_and_scored_by_the_command_line(algorithm, made, tmp_path, capsys):
    folder, _ = made
    out = tmp_path / "grid.pt"
    code, _, err = run_cli(
        ["train", "omniglot", "--out", out, "--algorithm", algorithm, *TINY, "--grid", "2", "--no-progress"], capsys
    )
    assert code == 0, err
    model, config, _ = load_model(out)
    assert config.grid == 2 and model.grid == 2 and model.head.in_features == 4 * 2 * 2
    extra = ["--augment", "2"] if algorithm == "protonet" else []
    code, text, err = run_cli(["evaluate-runs", "--checkpoint", out, "--runs", folder, *extra], capsys)
    assert code == 0, err
    expected = runs_accuracy(out, load_runs(folder), augment=2 if extra else 0)
    assert float(text.strip().splitlines()[-1].removeprefix("error_percent: ")) == pytest.approx(
        100 * (1 - expected.mean().item()), abs=0.006
    )
    # checkpoints written before the option existed read as the whole map's mean
    state = torch.load(out, weights_only=True)
    del state["config"]["grid"]
    assert FewShotConfig.from_dict(state["config"]).grid == 1
    code, _, err = run_cli(["train", "omniglot", "--out", tmp_path / "bad.pt", *TINY, "--grid", "0"], capsys)
    assert code == 2 and "grid must be a positive integer" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad.pt").exists()
