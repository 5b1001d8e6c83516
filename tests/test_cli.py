"""``python -m metabp``: training, resume, evaluation on the runs, and one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import run_cli
from runs_fixture import make_runs

import metabp.fewshot as fewshot
from metabp.cli import PRESETS
from metabp.fewshot import FewShotConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--hidden",
    "4",
    "--ways",
    "3",
    "--queries",
    "1",
    "--meta-batch-size",
    "2",
    "--iterations",
    "5",
    "--checkpoint-every",
    "2",
    "--no-progress",
]


def one_line_error(code, err):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m metabp") and ": error: " in lines[0], err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs")
    make_runs(folder)
    return folder


def test_train_then_resume_after_an_interruption_matches_an_uninterrupted_run(tmp_path, capsys, monkeypatch):
    full = tmp_path / "full.pt"
    assert run_cli(["train", "omniglot", "--out", full, *TINY], capsys)[0] == 0

    part = tmp_path / "part.pt"
    calls = {"n": 0}
    real_step = fewshot.train_step

    def interrupted(*args):
        calls["n"] += 1
        if calls["n"] == 4:  # Ctrl-C during the 4th iteration; the checkpoint holds 2
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(fewshot, "train_step", interrupted)
    code, _, err = run_cli(["train", "omniglot", "--out", part, *TINY], capsys)
    assert code == 1 and "--resume" in err
    assert torch.load(part, weights_only=True)["iteration"] == 2
    monkeypatch.setattr(fewshot, "train_step", real_step)
    code, out, err = run_cli(["train", "omniglot", "--out", part, "--resume", "--no-progress"], capsys)
    assert code == 0 and "resuming" in err and "5 iterations" in out

    a, b = (torch.load(p, weights_only=True) for p in (full, part))
    assert a["iteration"] == b["iteration"] == 5
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert a["loss"] == b["loss"]


def test_evaluate_runs_prints_a_line_per_run_and_the_error_last(tmp_path, runs_dir, capsys):
    ckpt = tmp_path / "proto.pt"
    assert run_cli(["train", "omniglot", "--out", ckpt, "--algorithm", "protonet", *TINY], capsys)[0] == 0
    code, out, _ = run_cli(["evaluate-runs", "--checkpoint", ckpt, "--runs", runs_dir], capsys)
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 21
    assert lines[0].startswith("run01: error ") and lines[19].startswith("run20: error ")
    # every test item is a copy of its training image: nearest prototype is exact
    assert lines[-1] == "error_percent: 0.00"


def test_evaluate_runs_with_a_gradient_learner(tmp_path, runs_dir, capsys):
    ckpt = tmp_path / "maml.pt"
    assert run_cli(["train", "omniglot", "--out", ckpt, *TINY], capsys)[0] == 0
    code, out, _ = run_cli(["evaluate-runs", "--checkpoint", ckpt, "--runs", runs_dir, "--steps", "2"], capsys)
    value = float(out.strip().splitlines()[-1].removeprefix("error_percent: "))
    assert code == 0 and 0.0 <= value <= 100.0


def test_evaluate_on_held_out_alphabets(tmp_path, capsys):
    ckpt = tmp_path / "m.pt"
    assert run_cli(["train", "omniglot", "--out", ckpt, *TINY], capsys)[0] == 0
    code, out, _ = run_cli(["evaluate", "omniglot", "--checkpoint", ckpt, "--tasks", "4", "--ways", "20"], capsys)
    assert code == 0 and "20-way 1-shot accuracy" in out and "Sanskrit" in out


def test_errors_are_one_line(tmp_path, runs_dir, capsys):
    ckpt = tmp_path / "m.pt"
    assert run_cli(["train", "omniglot", "--out", ckpt, *TINY], capsys)[0] == 0
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(ckpt.read_bytes()[:1000])
    cases = [
        (["train", "omniglot"], "--out"),
        (["train", "omniglot", "--out", tmp_path / "x.pt", "--ways", "1"], "ways"),
        (["train", "omniglot", "--out", tmp_path / "x.pt", "--algorithm", "reptile"], "algorithm"),
        (["train", "omniglot", "--out", tmp_path / "x.pt", "--iterations", "many"], "iterations"),
        (["train", "omniglot", "--out", ckpt], "--resume"),
        (["train", "omniglot", "--out", tmp_path / "none.pt", "--resume"], "does not exist"),
        (["train", "omniglot", "--out", ckpt, "--resume", "--seed", "3"], "--seed"),
        (["train", "omniglot", "--out", tmp_path / "no" / "dir.pt"], "does not exist"),
        (["train", "omniglot", "--out", tmp_path / "x.pt", "--device", "tpu"], "device"),
        (["train", "cifar", "--out", tmp_path / "x.pt"], "omniglot"),
        (["evaluate-runs", "--checkpoint", tmp_path / "missing.pt", "--runs", runs_dir], "does not exist"),
        (["evaluate-runs", "--checkpoint", garbage, "--runs", runs_dir], "not a file written by torch.save"),
        (
            ["evaluate-runs", "--checkpoint", truncated, "--runs", runs_dir],
            "not a readable checkpoint: it is truncated",
        ),
        (["evaluate-runs", "--checkpoint", ckpt, "--runs", tmp_path], "run01"),
        (["evaluate-runs", "--checkpoint", ckpt, "--runs", runs_dir, "--steps", "-1"], "steps"),
    ]
    if not torch.cuda.is_available():
        cases.append((["train", "omniglot", "--out", tmp_path / "x.pt", "--device", "cuda"], "no CUDA"))
    for args, needle in cases:
        code, _, err = run_cli(args, capsys)
        assert needle in one_line_error(code, err), (args, err)
    assert not (tmp_path / "x.pt").exists()


def test_presets_are_the_chapter_and_maml_paper_configurations():
    assert PRESETS["chapter"] == FewShotConfig()
    for name, ways, steps, lr, batch in [("maml-paper-5way", 5, 1, 0.4, 32), ("maml-paper-20way", 20, 5, 0.1, 16)]:
        c = PRESETS[name]
        assert (c.ways, c.inner_steps, c.inner_lr, c.meta_batch_size) == (ways, steps, lr, batch)
        assert (c.hidden, c.iterations, c.algorithm, c.background, c.cosine) == (64, 60000, "maml", "full", False)


def test_the_module_runs_as_a_program(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, "-m", "metabp", "evaluate-runs", "--checkpoint", tmp_path / "none.pt", "--runs", tmp_path],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().count("\n") == 0 and "does not exist" in done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "metabp", "train", "omniglot", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0 and "--resume" in done.stdout and "--preset" in done.stdout


def test_pretrain_writes_a_classifier_and_refuses_to_overwrite(tmp_path, capsys):
    from metabp.transfer import load_classifier

    out = tmp_path / "classifier.pt"
    args = [
        "pretrain",
        "omniglot",
        "--out",
        out,
        "--hidden",
        "4",
        "--iterations",
        "3",
        "--batch-size",
        "8",
        "--no-progress",
    ]
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    assert "pretrained a 544-class classifier for 3 iterations" in stdout
    model, state = load_classifier(out)
    assert model.ways == 544 and model.hidden == 4 and len(state["loss"]) == 3
    assert state["settings"]["batch_size"] == 8
    assert "exists" in one_line_error(*run_cli(args, capsys)[::2])
    line = one_line_error(
        *run_cli(["pretrain", "omniglot", "--out", tmp_path / "x.pt", "--background", "tiny"], capsys)[::2]
    )
    assert "--background must be one of small1, small2, full" in line
    # a meta-learning checkpoint is not a classifier
    fewshot_ckpt = tmp_path / "maml.pt"
    assert run_cli(["train", "omniglot", "--out", fewshot_ckpt, *TINY], capsys)[0] == 0
    with pytest.raises(Exception, match="not a pretrained classifier"):
        load_classifier(fewshot_ckpt)


# --- failing loudly and losing nothing (issue 18) ---------------------------------------------------------------


def test_a_diverging_run_stops_with_one_line_naming_the_learning_rates(tmp_path, capsys):
    out = tmp_path / "inner.pt"
    code, _, err = run_cli(["train", "omniglot", "--out", out, *TINY, "--inner-lr", "1e30"], capsys)
    line = one_line_error(code, err)
    assert "diverged" in line and "inner_lr=1e+30" in line and "meta_lr=0.001" in line, line
    assert "no checkpoint was written" in line and not out.exists()
    out = tmp_path / "meta.pt"
    code, _, err = run_cli(
        ["train", "omniglot", "--out", out, *TINY, "--meta-lr", "1e30", "--checkpoint-every", "1"], capsys
    )
    line = one_line_error(code, err)
    assert "diverged" in line and "meta_lr=1e+30" in line, line
    if out.exists():  # whatever was written holds finite parameters only
        state = torch.load(out, weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_divergence_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "m.pt"
    real_step = fewshot.train_step
    calls = {"n": 0}

    def poisoned(model, *args):
        calls["n"] += 1
        if calls["n"] == 4:  # the 4th meta-update meets a NaN; the checkpoint holds 2
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("nan")
        return real_step(model, *args)

    monkeypatch.setattr(fewshot, "train_step", poisoned)
    code, _, err = run_cli(["train", "omniglot", "--out", out, *TINY], capsys)
    line = one_line_error(code, err)
    assert "diverged" in line and "inner_lr=0.4" in line and "meta_lr=0.001" in line, line
    assert f"{out} holds the last good checkpoint (iteration 2)" in line
    state = torch.load(out, weights_only=True)
    assert state["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_pretrain_divergence_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "c.pt"
    code, _, err = run_cli(
        [
            "pretrain",
            "omniglot",
            "--out",
            out,
            "--hidden",
            "4",
            "--iterations",
            "5",
            "--batch-size",
            "8",
            "--lr",
            "1e30",
            "--no-progress",
        ],
        capsys,
    )
    line = one_line_error(code, err)
    assert "diverged" in line and "lr=1e+30" in line and "nothing was written" in line, line
    assert not out.exists()


def _poison(path, to):
    state = torch.load(path, weights_only=True)
    name = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][name] = torch.full_like(state["model"][name], float("nan"))
    torch.save(state, to)


def test_evaluate_refuses_non_finite_parameters(tmp_path, runs_dir, capsys):
    good = tmp_path / "m.pt"
    assert run_cli(["train", "omniglot", "--out", good, *TINY], capsys)[0] == 0
    bad = tmp_path / "nan.pt"
    _poison(good, bad)
    for args in (
        ["evaluate", "omniglot", "--checkpoint", bad, "--tasks", "4"],
        ["evaluate-runs", "--checkpoint", bad, "--runs", runs_dir],
        ["train", "omniglot", "--out", bad, "--resume"],
    ):
        line = one_line_error(*run_cli(args, capsys)[::2])
        assert "not finite" in line and "diverged" in line, (args, line)


def test_ctrl_c_before_the_first_checkpoint_says_nothing_was_written(tmp_path, capsys, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(fewshot, "train_step", interrupted)
    out = tmp_path / "E.pt"
    code, _, err = run_cli(["train", "omniglot", "--out", out, *TINY], capsys)
    assert code == 1 and err.strip().count("\n") == 0, err
    assert "no checkpoint was written" in err and "--resume" not in err and not out.exists()


def _unwritable_folder(tmp_path):
    if os.geteuid() == 0:  # permission bits do not stop root; /proc takes no new files
        return Path("/proc")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


def test_an_unwritable_out_folder_is_found_before_training(tmp_path, capsys, monkeypatch):
    from metabp import transfer

    folder = _unwritable_folder(tmp_path)
    monkeypatch.setattr(fewshot, "train", lambda *a, **k: pytest.fail("trained before checking --out"))
    monkeypatch.setattr(transfer, "pretrain_classifier", lambda *a, **k: pytest.fail("trained before checking --out"))
    for args in (
        ["train", "omniglot", "--out", folder / "m.pt", *TINY],
        ["pretrain", "omniglot", "--out", folder / "c.pt", "--iterations", "3", "--no-progress"],
    ):
        line = one_line_error(*run_cli(args, capsys)[::2])
        assert "cannot be written" in line and str(folder) in line, line
    line = one_line_error(*run_cli(["train", "omniglot", "--out", tmp_path, *TINY], capsys)[::2])
    assert "is a folder" in line


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda s: s.pop("optimizer"), "lacks optimizer"),
        (lambda s: s.pop("iteration"), "lacks iteration"),
        (
            lambda s: s.update(generator=torch.zeros(3, dtype=torch.uint8)),
            "generator is not a random generator's state",
        ),
        (lambda s: s.update(torch_rng=torch.ones(7)), "torch_rng is not a random generator's state"),
        (lambda s: s.update(iteration=99), "iteration must be an integer from 0 to 5"),
        (lambda s: s["optimizer"]["param_groups"][0]["params"].pop(), "optimizer state does not fit"),
    ],
)
def test_resuming_a_damaged_checkpoint_is_one_line(tmp_path, capsys, damage, needle):
    out = tmp_path / "m.pt"
    assert run_cli(["train", "omniglot", "--out", out, *TINY, "--iterations", "2"], capsys)[0] == 0
    state = torch.load(out, weights_only=True)
    state["config"]["iterations"] = 5
    damage(state)
    torch.save(state, out)
    line = one_line_error(*run_cli(["train", "omniglot", "--out", out, "--resume", "--no-progress"], capsys)[::2])
    assert "--resume" in line and needle in line, line


def test_bad_values_are_named(tmp_path, runs_dir, capsys):
    ckpt = tmp_path / "m.pt"
    assert run_cli(["train", "omniglot", "--out", ckpt, *TINY], capsys)[0] == 0
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    bad_shape = tmp_path / "shape.pt"
    state = torch.load(ckpt, weights_only=True)
    state["config"]["ways"] = 5  # the stored head has 3 outputs
    torch.save(state, bad_shape)
    cases = [
        (["evaluate", "omniglot", "--checkpoint", tmp_path], "is a folder, not a checkpoint file"),
        (["evaluate", "omniglot", "--checkpoint", text], "not a file written by torch.save"),
        (["evaluate", "omniglot", "--checkpoint", bad_shape], "size mismatch"),
        (["evaluate-runs", "--checkpoint", ckpt, "--runs", text], "is a file, not a folder"),
        (["evaluate", "omniglot", "--checkpoint", ckpt, "--queries", "0"], "--queries must be >= 1"),
        (["evaluate", "omniglot", "--checkpoint", ckpt, "--shots", "0"], "--shots must be >= 1"),
        (["evaluate", "omniglot", "--checkpoint", ckpt, "--ways", "1"], "--ways must be >= 2"),
        (["evaluate", "omniglot", "--checkpoint", ckpt, "--ways", "5000"], "--ways must be at most"),
        (["evaluate", "omniglot", "--checkpoint", ckpt, "--tasks", "1"], "--tasks must be from 2 to 100000"),
        (["evaluate", "omniglot", "--checkpoint", ckpt, "--tasks", "100001"], "--tasks must be from 2 to 100000"),
        (["evaluate", "omniglot", "--checkpoint", ckpt, "--seed", "99999999999999999999999"], "--seed"),
        (["train", "omniglot", "--out", tmp_path / "x.pt", "--seed", "99999999999999999999999"], "--seed"),
        (["pretrain", "omniglot", "--out", tmp_path / "x.pt", "--seed", "-1"], "--seed"),
        (
            ["train", "omniglot", "--out", tmp_path / "x.pt", "--meta-lr", "-1e-3"],
            "meta_lr must be a finite number > 0",
        ),
        (["bench", "sinusoid", "--repeats", "0"], "--repeats must be >= 1"),
        (["bench", "sinusoid", "--warmup", "-1"], "--warmup must be >= 0"),
    ]
    for args, needle in cases:
        code, out, err = run_cli(args, capsys)
        assert needle in one_line_error(code, err), (args, err)
    assert not (tmp_path / "x.pt").exists()


def test_evaluate_builds_episodes_in_chunks_from_one_stream(tmp_path, capsys, monkeypatch):
    import metabp.cli as cli
    from metabp.episodes import EpisodeSampler

    ckpt = tmp_path / "p.pt"
    assert run_cli(["train", "omniglot", "--out", ckpt, "--algorithm", "protonet", *TINY], capsys)[0] == 0
    args = ["evaluate", "omniglot", "--checkpoint", ckpt, "--tasks", "7", "--ways", "5"]
    code, whole, _ = run_cli(args, capsys)
    assert code == 0
    assert cli.EVAL_CHUNK >= 600  # the default 600 tasks are one batch, the episodes of earlier versions
    sizes = []
    real = EpisodeSampler.sample

    def sample(self, num_tasks, generator=None):
        sizes.append(num_tasks)
        return real(self, num_tasks, generator)

    monkeypatch.setattr(EpisodeSampler, "sample", sample)
    monkeypatch.setattr(cli, "EVAL_CHUNK", 3)
    code, chunked, _ = run_cli(args, capsys)
    assert code == 0 and sizes == [3, 3, 1] and "(7 tasks)" in chunked
