"""``python -m metabp``: training, resume, evaluation on the runs, and one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import metabp.fewshot as fewshot
from metabp.cli import PRESETS
from metabp.fewshot import FewShotConfig
from cli_helpers import run_cli
from runs_fixture import make_runs

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--hidden", "4", "--ways", "3", "--queries", "1", "--meta-batch-size", "2", "--iterations", "5",
        "--checkpoint-every", "2", "--no-progress"]




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
        (["evaluate-runs", "--checkpoint", garbage, "--runs", runs_dir], "not a readable checkpoint"),
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
    done = subprocess.run([sys.executable, "-m", "metabp", "evaluate-runs", "--checkpoint", tmp_path / "none.pt",
                           "--runs", tmp_path], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().count("\n") == 0 and "does not exist" in done.stderr
    done = subprocess.run([sys.executable, "-m", "metabp", "train", "omniglot", "--help"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and "--resume" in done.stdout and "--preset" in done.stdout


def test_pretrain_writes_a_classifier_and_refuses_to_overwrite(tmp_path, capsys):
    from metabp.transfer import load_classifier

    out = tmp_path / "classifier.pt"
    args = ["pretrain", "omniglot", "--out", out, "--hidden", "4", "--iterations", "3", "--batch-size", "8",
            "--no-progress"]
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    assert "pretrained a 544-class classifier for 3 iterations" in stdout
    model, state = load_classifier(out)
    assert model.ways == 544 and model.hidden == 4 and len(state["loss"]) == 3
    assert state["settings"]["batch_size"] == 8
    assert "exists" in one_line_error(*run_cli(args, capsys)[::2])
    line = one_line_error(*run_cli(["pretrain", "omniglot", "--out", tmp_path / "x.pt", "--background", "tiny"],
                                   capsys)[::2])
    assert "--background must be one of small1, small2, full" in line
    # a meta-learning checkpoint is not a classifier
    fewshot_ckpt = tmp_path / "maml.pt"
    assert run_cli(["train", "omniglot", "--out", fewshot_ckpt, *TINY], capsys)[0] == 0
    with pytest.raises(Exception, match="not a pretrained classifier"):
        load_classifier(fewshot_ckpt)
