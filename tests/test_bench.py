"""``python -m metabp bench`` at toy sizes: the gradient check, the report and its last lines.

Only behaviour is tested here; speed is what the command itself reports.
"""

from __future__ import annotations

import re
import sys

import pytest
import torch
from cli_helpers import run_cli

from metabp.bench import BenchConfig, format_report, make_problem, run, summary_line
from metabp.costs import peak_memory, prepare_memory_measurement

SUMMARY = re.compile(r"^(sinusoid|omniglot) ratio_vs_learn2learn: (\d+\.\d+) ratio_vs_floor: (\d+\.\d+)$")


def test_every_implementation_is_checked_on_the_sinusoid():
    report = run(BenchConfig("sinusoid", meta_batch_size=3, width=8), repeats=2, warmup=0, compile=False)
    checks = {r.name: r.check for r in report.results}
    assert "metabp vmap+compile" not in checks
    for name in ("metabp vmap", "learn2learn", "higher", "torchopt"):
        assert checks[name].startswith("ok"), (name, checks[name])
    assert checks["article listing"].startswith("none")
    assert all(len(r.times) == 2 and r.median > 0 for r in report.results)
    text = format_report(report)
    assert SUMMARY.match(text.splitlines()[-1]), text
    assert report.fastest_metabp.kind == "metabp"


def test_first_order_and_two_steps_agree_on_the_omniglot_network():
    config = BenchConfig("omniglot", meta_batch_size=2, inner_steps=2, first_order=True, width=4)
    report = run(
        config,
        impls=("metabp vmap", "learn2learn", "higher", "torchopt", "floor (per task)"),
        repeats=1,
        warmup=0,
        memory=False,
    )
    checks = {r.name: r.check for r in report.results}
    assert checks["metabp loop"] == "ok (reference)"  # always run, as the reference
    for name in ("metabp vmap", "learn2learn", "higher", "torchopt"):
        assert checks[name].startswith("ok"), (name, checks[name])
    assert all(r.peak_bytes is None for r in report.results)


def test_second_order_vmap_agrees_on_the_omniglot_network():
    # vmap runs through metabp.convnet.TaskBatchNorm2d (vmap's second derivatives of
    # nn.BatchNorm2d are wrong in this torch) and must match the loop.
    config = BenchConfig("omniglot", meta_batch_size=2, width=4)
    report = run(config, impls=("metabp vmap", "learn2learn", "floor (per task)"), repeats=1, warmup=0, memory=False)
    checks = {r.name: r.check for r in report.results}
    assert checks["metabp vmap"].startswith("ok"), checks
    assert any("TaskBatchNorm2d" in note for note in report.notes), report.notes


def test_check_runs_in_float64_and_flags_a_small_error(monkeypatch):
    # A meta-gradient off by one part in a million would pass a float32 comparison
    # (rounding alone reaches 1e-3 on the Conv4); the float64 check must flag it.
    from metabp import bench
    from metabp.bilevel import meta_gradient

    built_in = []

    def slightly_wrong(problem):
        built_in.append(problem.batch.x_spt.dtype)
        model = bench._fresh(problem)
        return lambda: {
            k: v * (1 + 1e-6) for k, v in meta_gradient(model, problem.batch, problem.inner, vectorize=False).items()
        }

    monkeypatch.setattr(bench, "IMPLS", bench.IMPLS + (bench.Impl("slightly wrong", "metabp", slightly_wrong),))
    report = run(
        BenchConfig("sinusoid", meta_batch_size=2, width=4),
        impls=("slightly wrong", "learn2learn"),
        repeats=1,
        warmup=0,
        memory=False,
        compile=False,
    )
    checks = {r.name: r.check for r in report.results}
    assert checks["slightly wrong"].startswith("DIFFERS"), checks
    assert checks["learn2learn"].startswith("ok"), checks
    assert report.fastest_metabp.name == "metabp loop"  # the flagged one is left out of the summary
    assert built_in == [torch.float64, torch.float32]  # checked in float64, timed in float32


def test_flop_count_of_a_matrix_product_and_of_the_meta_step():
    from metabp.bench import count_flops

    a, b = torch.ones(3, 4), torch.ones(4, 5)
    assert count_flops(lambda: a @ b) == 2 * 3 * 4 * 5
    assert count_flops(lambda: a + 1) is None  # elementwise work is not counted
    report = run(
        BenchConfig("omniglot", meta_batch_size=2, width=4),
        impls=("learn2learn", "floor (per task)"),
        repeats=1,
        warmup=0,
        memory=False,
    )
    loop, floor = report.get("metabp loop"), report.get("floor (per task)")
    # a meta-step does the floor's arithmetic and more (the inner step on the support images)
    assert report.get("learn2learn").flops == loop.flops > floor.flops > 0
    assert "counted FLOPs of" in format_report(report)


def test_problem_in_float64_has_the_same_values():
    config = BenchConfig("omniglot", meta_batch_size=2, width=4)
    single, double = make_problem(config), make_problem(config, dtype=torch.float64)
    assert double.batch.x_qry.dtype == torch.float64 and double.batch.y_qry.dtype == torch.int64
    assert torch.equal(single.batch.x_qry.double(), double.batch.x_qry)
    for (name, a), (_, b) in zip(single.model.state_dict().items(), double.model.state_dict().items(), strict=True):
        assert b.dtype == torch.float64 and torch.allclose(a.double(), b), name
    with pytest.raises(ValueError, match="dtype"):
        make_problem(config, dtype=torch.float16)


def test_omniglot_problem_has_the_episode_shapes():
    problem = make_problem(BenchConfig("omniglot", meta_batch_size=3, width=4))
    b = problem.batch
    assert b.x_spt.shape == (3, 5, 1, 28, 28) and b.x_qry.shape == (3, 75, 1, 28, 28)
    assert b.y_spt[0].tolist() == [0, 1, 2, 3, 4]
    assert b.y_qry[0].tolist() == [c for c in range(5) for _ in range(15)]
    assert problem.model(b.x_spt[0]).shape == (5, 5)


def test_summary_needs_learn2learn_and_a_floor():
    report = run(
        BenchConfig("sinusoid", meta_batch_size=2, width=4),
        impls=("metabp vmap",),
        repeats=1,
        warmup=0,
        compile=False,
        memory=False,
    )
    assert summary_line(report) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_peak_memory_sees_a_large_temporary():

    prepare_memory_measurement()

    def step():
        x = torch.ones(4 * 2**20)  # 16 MiB, written
        return {"x": x.sum()}

    peak = peak_memory(step, torch.device("cpu"))
    assert 15 * 2**20 < peak < 40 * 2**20, peak


def test_config_arguments_are_checked():
    with pytest.raises(ValueError, match="config"):
        BenchConfig("mnist")
    with pytest.raises(ValueError, match="inner_steps"):
        BenchConfig("sinusoid", inner_steps=0)
    with pytest.raises(ValueError, match="unknown implementation"):
        run(BenchConfig("sinusoid"), impls=("jax",))


def test_command_line_ends_with_one_summary_line_per_config(capsys):
    code, out, err = run_cli(
        [
            "bench",
            "sinusoid",
            "--meta-batch-size",
            2,
            "--width",
            4,
            "--repeats",
            1,
            "--warmup",
            0,
            "--compile",
            "off",
            "--no-memory",
            "--threads",
            1,
        ],
        capsys,
    )
    assert code == 0, err
    last = out.strip().splitlines()[-1]
    assert SUMMARY.match(last), out
    assert "torch threads: 1" in out


def test_command_line_errors_are_one_line(capsys):
    code, out, err = run_cli(["bench", "sinusoid", "--impls", "jax"], capsys)
    assert code == 2 and "unknown implementation" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli(["bench", "cifar"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_the_chapter_conv4_is_the_one_chapter_6_1_trains():
    from metabp.bench import CONFIGS, EPISODES
    from metabp.fewshot import FewShotConfig

    chapter, defaults = FewShotConfig(), CONFIGS["omniglot-chapter"]
    assert EPISODES["omniglot-chapter"] == (chapter.ways, chapter.shots, chapter.queries)
    assert (defaults["width"], defaults["meta_batch_size"]) == (chapter.hidden, chapter.meta_batch_size)
    assert defaults["inner_lr"] == chapter.inner_lr and chapter.inner_steps == 1 and chapter.algorithm == "maml"
    problem = make_problem(BenchConfig("omniglot-chapter", meta_batch_size=2, width=4))
    b = problem.batch
    assert b.x_spt.shape == (2, 20, 1, 28, 28) and b.x_qry.shape == (2, 20, 1, 28, 28)
    assert b.y_spt[0].tolist() == b.y_qry[0].tolist() == list(range(20))
    assert problem.model(b.x_spt[0]).shape == (20, 20)


def test_bench_processes_reports_what_chapter_7_reads(capsys):
    # the lines notebooks/07_tools.ipynb parses from benchmarks/scaling_2x1_cpu.txt (toy size: behaviour only)
    args = ["bench", "--processes", "2", "--threads", "1", "--width", "2", "--meta-batch-size", "3"]
    code, out, err = run_cli([*args, "--repeats", "2", "--warmup", "0"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("metabp bench --processes 2 --threads 1 on ") and "load average" in lines[0]
    assert any(ln.startswith("omniglot-chapter: Conv4, 20-way 1-shot, 1 query per class") for ln in lines)
    assert "(width 2), meta-batch 3" in out and "tasks per process: [2, 1]" in out
    assert "1 process x 2 threads; sharded: 2 processes x 1 thread(s); 3 blocks of 2 timed rounds each way" in out
    assert len([ln for ln in lines if re.match(r"block \d: 1x2 median [\d.]+ ms .* ratio [\d.]+$", ln)]) == 3
    assert re.search(r"^per-block ratios: [\d.]+, [\d.]+, [\d.]+ \(spread [\d.]+\.\.[\d.]+\)$", out, re.M)
    assert re.search(r"^communication share per round: median [\d.]+% \(range [\d.]+%\.\.[\d.]+%\)$", out, re.M)
    assert re.search(r"^all rounds: 1x2 median [\d.]+ ms .*; 2x1 median [\d.]+ ms", out, re.M)
    assert re.match(r"^speedup_vs_one_process: [\d.]+ communication_share: [\d.]+%$", lines[-1])
