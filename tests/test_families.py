"""metabp.families and its command line: resumable sinusoid and navigation runs, one-line errors."""

from __future__ import annotations

import pytest
import torch
from cli_helpers import run_cli

from metabp import checkpoint, families
from metabp.checks import DivergenceError

TINY = {
    "sinusoid": dict(iterations=5, meta_batch_size=3, hidden=8, compile=False),
    "navigation": dict(iterations=3, meta_batch_size=2, num_trajectories=2, hidden=8, horizon=10),
}


@pytest.mark.parametrize("family", ["sinusoid", "navigation"])
def test_a_resumed_run_ends_with_the_parameters_of_an_uninterrupted_one(tmp_path, family):
    config = families.CONFIGS[family](**TINY[family])
    full, history = families.train(family, config, tmp_path / "full.pt", checkpoint_every=2, progress=False)
    families.train(family, config, tmp_path / "part.pt", checkpoint_every=2, progress=False, stop_after=2)
    assert torch.load(tmp_path / "part.pt", weights_only=True)["iteration"] == 2
    resumed, history2 = families.train(family, config, tmp_path / "part.pt", resume=True, progress=False)
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert (history.loss, history.metrics) == (history2.loss, history2.metrics)
    assert len(history.loss if family == "sinusoid" else history.after) == config.iterations
    model, stored, _ = families.load_model(tmp_path / "full.pt", family)
    assert stored == config and all(torch.equal(v, model.state_dict()[k]) for k, v in full.state_dict().items())


@pytest.mark.parametrize("family", ["sinusoid", "navigation"])
def test_a_diverging_run_stops_before_the_bad_update_naming_the_learning_rates(tmp_path, family, capsys):
    # a meta learning rate of 1e25: the first update makes the network overflow at the second iteration
    config = families.CONFIGS[family](**{**TINY[family], "meta_lr": 1e25})
    out = tmp_path / "run.pt"
    with pytest.raises(DivergenceError, match=r"not finite with inner_lr=.*meta_lr=1e\+25"):
        families.train(family, config, out, checkpoint_every=1, progress=False)
    state = checkpoint.load(out)  # the last checkpoint is the one before the non-finite step
    assert state["iteration"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())
    args = ["train", family, "--out", tmp_path / "cli.pt", "--meta-lr", "1e25", "--no-progress"]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in TINY[family].items() if k != "compile"]
    code, _, err = run_cli(args + (["--no-compile"] if family == "sinusoid" else []), capsys)
    assert code == 2 and "training diverged" in err and len(err.strip().splitlines()) == 1, err


def test_the_defaults_are_the_chapters_runs():
    sine = families.SinusoidConfig()
    assert (sine.inner_lr, sine.meta_batch_size, sine.meta_lr, sine.iterations, sine.cosine) == (
        0.01,
        25,
        0.01,
        40000,
        True,
    )
    nav = families.NavigationConfig()
    assert (nav.metarl.outer_epochs, nav.metarl.cosine, nav.metarl.std_lr, nav.iterations) == (1, True, 1e-2, 300)


def test_command_line_trains_evaluates_and_refuses_bad_input(tmp_path, capsys):
    out = tmp_path / "nav.pt"
    args = [
        "train",
        "navigation",
        "--out",
        out,
        "--iterations",
        "2",
        "--meta-batch-size",
        "2",
        "--num-trajectories",
        "2",
        "--hidden",
        "8",
        "--horizon",
        "10",
        "--no-progress",
    ]
    code, stdout, err = run_cli(args, capsys)
    assert code == 0 and "trained navigation for 2 iterations" in stdout, err
    code, stdout, _ = run_cli(
        ["evaluate", "navigation", "--checkpoint", out, "--trajectories", "2", "--inner-lrs", "0.1"], capsys
    )
    assert code == 0 and "1 steps: mean return" in stdout
    code, _, err = run_cli(args, capsys)  # exists
    assert code == 2 and "pass --resume" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli([*args[:4], "--resume", "--hidden", "9"], capsys)
    assert code == 2 and "drop --hidden" in err
    code, _, err = run_cli(["train", "sinusoid", "--out", tmp_path / "s.pt", "--meta-lr", "-1"], capsys)
    assert code == 2 and "meta_lr must be a finite number > 0, got -1.0" in err
    code, _, err = run_cli(["evaluate", "sinusoid", "--checkpoint", out], capsys)
    assert code == 2 and "does not hold a sinusoid model" in err
