"""metabp.distributed: two processes (gloo, 127.0.0.1) end with the parameters of one.

The two-process runs are launched from the tests, once per module for the library
(one spawn runs every family and dtype) and through ``torchrun`` for the command line.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import pytest
import torch
from cli_helpers import run_cli

from metabp import distributed, families, fewshot
from metabp.episodes import ImageClasses
from metabp.fewshot import FewShotConfig
from metabp.tasks import TaskBatch

ROOT = Path(__file__).resolve().parents[1]
TINY_SINUSOID = dict(iterations=6, meta_batch_size=5, hidden=8, compile=False, cosine=True)
TINY_NAVIGATION = dict(iterations=3, meta_batch_size=5, num_trajectories=3, hidden=8, horizon=15, outer_epochs=2)
TINY_OMNIGLOT = dict(ways=3, shots=1, queries=1, hidden=4, meta_batch_size=5, iterations=3)
# float32: the two runs differ only in the order of the sums over tasks; after a few Adam
# steps that rounding is of order 1e-7 on parameters of order 1 (measured: below 1e-6).
FLOAT32_TOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_classes(seed: int = 0) -> ImageClasses:
    g = torch.Generator().manual_seed(seed)
    images = ((torch.rand(6, 4, 28, 28, generator=g) < 0.2) * 255).to(torch.uint8)
    return ImageClasses(images, tuple(f"Alphabet{i % 2}/char{i}" for i in range(6)))


def _in_dtype(step, dtype: torch.dtype):
    """``fewshot.train_step`` on episodes cast to ``dtype`` (they come as float32)."""

    def cast(model, optimizer, batch, config):
        return step(model, optimizer, TaskBatch(*(t.to(dtype) if t.is_floating_point() else t for t in batch)), config)

    return cast


def run_all(group: distributed.Group | None) -> dict[str, dict[str, torch.Tensor]]:
    """Every family in float64 and float32 with ``group``; final parameters by name."""
    out = {}
    for dtype in ("float64", "float32"):
        for family, tiny in (("sinusoid", TINY_SINUSOID), ("navigation", TINY_NAVIGATION)):
            config = families.CONFIGS[family](dtype=dtype, **tiny)
            model, history = families.train(family, config, progress=False, group=group)
            out[f"{family}-{dtype}"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            log = {"loss": history.loss, **history.metrics} if history.loss else history.metrics
            out[f"{family}-{dtype}-log"] = {k: torch.tensor(v, dtype=torch.float64) for k, v in log.items()}
        for algorithm in ("maml", "protonet"):
            real, default = fewshot.train_step, torch.get_default_dtype()
            fewshot.train_step = _in_dtype(real, families.DTYPES[dtype])
            torch.set_default_dtype(families.DTYPES[dtype])  # Conv4 is built in it
            try:
                config = FewShotConfig(algorithm=algorithm, **TINY_OMNIGLOT)
                model, history = fewshot.train(config, tiny_classes(), progress=False, group=group)
            finally:
                fewshot.train_step, _ = real, torch.set_default_dtype(default)
            out[f"omniglot-{algorithm}-{dtype}"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            out[f"omniglot-{algorithm}-{dtype}-log"] = {"loss": torch.tensor(history.loss, dtype=torch.float64)}
    return out


def _worker(rank: int, world: int, port: int, folder: str, task: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    result: dict = {}
    try:
        group = distributed.init("cpu", timeout_s=60)
        if task == "all":
            result = run_all(group)
        elif task == "fail":
            real = fewshot.train_step
            calls = {"n": 0}

            def failing(*args):
                calls["n"] += 1
                if rank == 1 and calls["n"] == 2:
                    raise ValueError("rank 1 fails on purpose")
                return real(*args)

            fewshot.train_step = failing
            fewshot.train(FewShotConfig(**TINY_OMNIGLOT), tiny_classes(), progress=False, group=group)
    except BaseException as err:  # reported to the test, not swallowed
        result = {"error": type(err).__name__, "message": str(err), "traceback": traceback.format_exc()}
    finally:
        distributed.shutdown()
    torch.save(result, Path(folder) / f"rank{rank}.pt")


def spawn(world: int, folder: Path, task: str, timeout: float = 300) -> list[dict]:
    """Run ``_worker`` in ``world`` fresh processes; each one's result."""
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, str(folder), task)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, f"{len(alive)} process(es) still running after {timeout} s: a rank hangs"
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def two_and_one(tmp_path_factory):
    folder = tmp_path_factory.mktemp("two")
    two = spawn(2, folder, "all")
    for result in two:
        assert "error" not in result, result.get("traceback")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = run_all(None)
    finally:
        torch.set_num_threads(threads)
    return two, one


KEYS = [
    f"{f}-{d}" for d in ("float64", "float32") for f in ("sinusoid", "navigation", "omniglot-maml", "omniglot-protonet")
]


# Conv4's convolution biases feed batch norm, which subtracts each channel's mean: their exact
# meta-gradient is zero, what reaches them is rounding noise g, and Adam turns it into a step of
# about meta_lr * g / eps (eps = 1e-8), 1e5 times the noise. Their values depend on the order of
# the sums in either run alike, so they are checked to have moved by no more than that noise
# (float64: g below 1e-14, so under 1e-8 in 3 steps; float32: g is of the order of eps, and Adam
# moves a parameter by at most about meta_lr a step, so under 2 * 3 * meta_lr) instead of being
# compared with each other. In one process the same happens with another number of threads.
NOISE_ONLY = {f"features.{i}.bias" for i in (0, 3, 6, 9)}


def omniglot_init(key: str) -> dict[str, torch.Tensor]:
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64 if key.endswith("float64") else torch.float32)
    try:
        fewshot.seed_everything(0)
        return fewshot.build_model(FewShotConfig(**TINY_OMNIGLOT)).state_dict()
    finally:
        torch.set_default_dtype(default)


@pytest.mark.parametrize("key", KEYS)
def test_two_processes_end_with_the_parameters_of_one(two_and_one, key):
    (rank0, rank1), one = two_and_one
    tol = 1e-10 if key.endswith("float64") else FLOAT32_TOL
    init = omniglot_init(key) if key.startswith("omniglot") else {}
    for name, p in one[key].items():
        # every rank applied the same updates: bitwise the same parameters
        assert torch.equal(rank0[key][name], rank1[key][name]), name
        assert rank0[key][name].dtype == p.dtype
        if name in NOISE_ONLY:
            bound = 1e-8 if key.endswith("float64") else 2 * TINY_OMNIGLOT["iterations"] * FewShotConfig().meta_lr
            for run in (rank0[key][name], p):
                assert (run - init[name]).abs().max().item() <= bound, name
            continue
        diff = (rank0[key][name] - p).abs().max().item()
        assert diff <= tol * max(1.0, p.abs().max().item()), (name, diff)
    for name, values in one[key + "-log"].items():  # the logged loss / returns are the full batch's
        assert torch.allclose(rank0[key + "-log"][name], values, rtol=0, atol=1e-9 if "float64" in key else 1e-4)


def test_shares_cover_the_batch_once_in_order():
    for world in (1, 2, 3, 4):
        for total in range(world, 12):
            parts = [distributed.Group(r, world).share(total) for r in range(world)]
            assert parts[0].start == 0 and parts[-1].stop == total
            assert all(a.stop == b.start for a, b in zip(parts, parts[1:], strict=False))
            sizes = [p.stop - p.start for p in parts]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="at least the number of processes"):
        distributed.Group(0, 3).share(2)


def test_one_process_group_is_the_plain_loop():
    # Without torchrun the wrapper is the step itself: the one-process numbers are those of before.
    def step(model, optimizer, batch):
        return 1.0

    assert distributed.shard_step(step, distributed.Group()) is step
    assert distributed.shard_step(step, None) is step
    assert distributed.init("cpu").world == 1 or "WORLD_SIZE" in os.environ


def test_a_failed_rank_ends_the_job_with_a_clear_message(tmp_path):
    rank0, rank1 = spawn(2, tmp_path, "fail", timeout=120)
    assert rank1["error"] == "ValueError" and "on purpose" in rank1["message"]
    assert rank0["error"] == "PeerError", rank0
    assert "rank 0 of 2 lost the other processes" in rank0["message"] and "another rank failed" in rank0["message"]


def _torchrun(args: list[str], cwd: Path, extra_env: dict | None = None, script: list[str] | None = None):
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src") + os.pathsep + str(ROOT / "tests"),
        "OMP_NUM_THREADS": "1",
        **(extra_env or {}),
    }
    # --standalone: c10d rendezvous on a free local port, as on one machine. torchrun's agent keeps its
    # store (MASTER_PORT) across --max-restarts restarts, with the failed attempt's keys in it; the
    # restarted ranks once read the dead ranks' gloo addresses from it and hung or failed
    # (distributed.attempt_store and the tests of it below).
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        *args,
        *(script or ["-m", "metabp"]),
    ]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


TINY_CLI = [
    "train",
    "sinusoid",
    "--iterations",
    "8",
    "--meta-batch-size",
    "5",
    "--hidden",
    "8",
    "--no-compile",
    "--checkpoint-every",
    "3",
    "--no-progress",
]


def test_torchrun_command_matches_one_process_and_resumes_after_a_restart(tmp_path, capsys):
    one = tmp_path / "one.pt"
    assert run_cli([*TINY_CLI[:2], "--out", one, *TINY_CLI[2:]], capsys)[0] == 0
    # 2 processes; the first attempt dies after iteration 5 (the checkpoint holds 3), torchrun
    # restarts both, and the restarted job resumes from the checkpoint by itself.
    done = _torchrun(
        ["--max-restarts", "1"],
        tmp_path,
        {"METABP_TEST_FAIL_AT": "5"},
        script=[str(ROOT / "tests" / "fail_once.py"), *TINY_CLI[:2], "--out", "two.pt", *TINY_CLI[2:]],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "torchrun restart 1: resuming from two.pt" in done.stderr
    assert "resuming two.pt at iteration 3 of 8" in done.stderr
    assert done.stdout.count("trained sinusoid for 8 iterations") == 1  # rank 0 alone reports
    a = torch.load(one, weights_only=True)
    b = torch.load(tmp_path / "two.pt", weights_only=True)
    assert a["iteration"] == b["iteration"] == 8
    for k in a["model"]:
        assert (a["model"][k] - b["model"][k]).abs().max() <= FLOAT32_TOL, k
    # and the checkpoint evaluates like any other
    code, out, _ = run_cli(["evaluate", "sinusoid", "--checkpoint", tmp_path / "two.pt", "--tasks", "20"], capsys)
    assert code == 0 and "10 steps: query MSE" in out


def test_torchrun_with_a_bad_option_fails_fast_with_one_line_per_rank(tmp_path):
    # unbuffered, as under `python -u` or PYTHONUNBUFFERED=1 (CI had it): a line written in two system
    # calls (text, then newline) let the other rank's line in between, joining the two errors
    done = _torchrun(
        [],
        tmp_path,
        {"PYTHONUNBUFFERED": "1"},
        script=["-m", "metabp", "train", "navigation", "--out", "x.pt", "--meta-batch-size", "1", "--iterations", "1"],
    )
    assert done.returncode != 0
    # each rank says it in one line (torchrun then adds its own report of the failed processes)
    for rank in (0, 1):
        line = (
            f"python -m metabp: error: rank {rank} of 2: meta_batch_size must be at least the number of "
            "processes (2), got 1"
        )
        assert line in done.stderr.splitlines() or any(
            f"rank {rank} of 2 lost the other processes" in ln for ln in done.stderr.splitlines()
        ), done.stderr[-3000:]
    assert "navigation:" not in done.stderr  # refused before training, so before rank 0's progress bar
    assert not (tmp_path / "x.pt").exists()


@pytest.fixture
def agent_store(monkeypatch):
    """A store standing in for torchrun's agent store, with a failed attempt's post still in it."""
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(store.port))
    dead = _free_port()  # nothing listens there any more, like the port of a dead rank 0's store
    store.set(distributed._POST_KEY, f"{dead} {'0' * 32}")
    return store


def test_a_restarted_rank_skips_the_failed_attempts_store_and_finds_the_new_one(agent_store):
    # The cause of the hang: a restarted rank read the failed attempt's keys from the agent's store.
    # Rank 1 starts first and sees only the stale post; rank 0's new store appears a second later.
    found: dict = {}
    rank1 = threading.Thread(target=lambda: found.update(one=distributed.attempt_store(1, 2, timeout_s=30)))
    rank1.start()
    time.sleep(1.0)
    own = distributed.attempt_store(0, 2, timeout_s=30)
    rank1.join(40)
    assert not rank1.is_alive()
    assert agent_store.get(distributed._POST_KEY).decode().split()[0] == str(own.port)
    own.set("from rank 0", "hello")
    assert found["one"].get("from rank 0") == b"hello"  # rank 1 holds a client of rank 0's new store


def test_a_rank_whose_rank_0_never_comes_fails_with_a_clear_message(agent_store):
    with pytest.raises(distributed.PeerError, match=r"rank 1 of 2: rank 0's store did not appear .* within 2 s"):
        distributed.attempt_store(1, 2, timeout_s=2)


def test_without_the_agent_store_env_rendezvous_is_left_as_it_is(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    assert distributed.attempt_store(0, 2, timeout_s=1) is None
