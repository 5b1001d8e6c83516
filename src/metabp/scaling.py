"""``python -m metabp bench --processes N --threads T``: does sharding the meta-batch pay?

Times one meta-gradient of the benchmark's problem (:func:`metabp.bench.make_problem`,
the per-task loop: :func:`metabp.bilevel.meta_gradient` with ``per_task=True``) two
ways on the same machine:

* one process with ``N x T`` threads on the whole meta-batch;
* ``N`` processes (gloo, 127.0.0.1) with ``T`` threads each, every process on its
  share of the tasks (:meth:`metabp.distributed.Group.take`), the weighted gradients
  summed with one ``all_reduce`` (what :class:`metabp.distributed.SummedOptimizer` does).

The same ``N`` worker processes do both, in alternating blocks (rank 0 runs the
one-process reference with ``N x T`` threads while the others wait at a barrier),
so a change of machine load hits both alike. A sharded round starts at a barrier
and lasts until the slowest process holds the summed gradient. Its
*communication* is the ``all_reduce`` time of the process that reached it last
(the transfer itself); the other processes' longer ``all_reduce`` time is
*waiting* for that one (load imbalance), reported apart.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import statistics
import sys
import time
from typing import TYPE_CHECKING, Any

import torch

from . import distributed
from .checks import positive_int

if TYPE_CHECKING:
    from multiprocessing.queues import SimpleQueue

    from .families import Config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _worker(rank: int, world: int, port: int, spec: dict[str, Any], queue: SimpleQueue) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)  # this job's own store at MASTER_PORT, even under torchrun
    from .bench import BenchConfig, make_problem
    from .bilevel import meta_gradient

    group = distributed.init("cpu")
    try:
        config = BenchConfig(
            spec["name"], spec["meta_batch_size"], spec["inner_steps"], spec["first_order"], spec["width"]
        )
        problem = make_problem(config, spec["seed"])
        model, batch, inner = problem.model, problem.batch, problem.inner
        part, weight = group.take(batch)
        names = [n for n, _ in model.named_parameters()]
        threads, repeats, warmup = spec["threads"], spec["repeats"], spec["warmup"]

        def sharded() -> float:
            g = meta_gradient(model, part, inner, per_task=True)
            flat = torch.cat([g[n].reshape(-1) for n in names]) * weight
            began = time.perf_counter()
            group.all_sum_(flat)
            return time.perf_counter() - began

        rows = []
        for _block in range(spec["blocks"]):
            group.barrier()
            reference = []
            if group.main:
                torch.set_num_threads(threads * world)
                for _ in range(warmup):
                    meta_gradient(model, batch, inner, per_task=True)
                for _ in range(repeats):
                    began = time.perf_counter()
                    meta_gradient(model, batch, inner, per_task=True)
                    reference.append(time.perf_counter() - began)
            group.barrier()
            torch.set_num_threads(threads)
            for _ in range(warmup):
                sharded()
            steps, comms = [], []
            for _ in range(repeats):
                group.barrier()
                began = time.perf_counter()
                comm_s = sharded()
                steps.append(time.perf_counter() - began)
                comms.append(comm_s)
            import torch.distributed as dist

            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, (steps, comms))
            if group.main:
                step = [max(s[i] for s, _ in gathered) for i in range(repeats)]
                comm = [min(c[i] for _, c in gathered) for i in range(repeats)]
                wait = [max(c[i] for _, c in gathered) - comm[i] for i in range(repeats)]
                rows.append({"reference": reference, "step": step, "comm": comm, "wait": wait})
        if group.main:
            shares = [distributed.Group(r, world).share(batch.num_tasks) for r in range(world)]
            queue.put({"rows": rows, "shares": [s.stop - s.start for s in shares]})
    finally:
        distributed.shutdown()


def measure(
    name: str = "omniglot",
    processes: int = 2,
    threads: int = 1,
    meta_batch_size: int | None = None,
    inner_steps: int = 1,
    first_order: bool = False,
    width: int | None = None,
    repeats: int = 5,
    warmup: int = 1,
    blocks: int = 3,
    seed: int = 0,
) -> dict:
    """Run the comparison; returns per block the times in seconds (see the module's docstring)."""
    from .bench import BenchConfig

    positive_int("processes", processes)
    positive_int("threads", threads)
    positive_int("repeats", repeats)
    positive_int("blocks", blocks)
    if processes < 2:
        raise ValueError(f"--processes must be at least 2 to compare with one process, got {processes}")
    config = BenchConfig(name, meta_batch_size, inner_steps, first_order, width)
    if config.tasks < processes:
        raise ValueError(f"meta_batch_size must be at least the number of processes ({processes}), got {config.tasks}")
    spec = dict(
        name=name,
        meta_batch_size=meta_batch_size,
        inner_steps=inner_steps,
        first_order=first_order,
        width=width,
        seed=seed,
        threads=threads,
        repeats=repeats,
        warmup=warmup,
        blocks=blocks,
    )
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.SimpleQueue()
    torch.multiprocessing.start_processes(
        _worker, (processes, _free_port(), spec, queue), nprocs=processes, join=True, start_method="spawn"
    )
    result: dict[str, Any] = queue.get()
    result["describe"] = config.describe()
    return result


def format_report(result: dict, processes: int, threads: int) -> str:
    ms = 1000.0
    lines = [
        f"{result['describe']}; per-task loop; tasks per process: {result['shares']}",
        f"reference: 1 process x {processes * threads} threads; sharded: {processes} processes x {threads} thread(s); "
        f"{len(result['rows'])} blocks of {len(result['rows'][0]['step'])} timed rounds each way",
    ]
    ratios = []
    for i, row in enumerate(result["rows"], 1):
        ref, step = statistics.median(row["reference"]), statistics.median(row["step"])
        comm, wait = statistics.median(row["comm"]), statistics.median(row["wait"])
        ratios.append(ref / step)
        lines.append(
            f"block {i}: 1x{processes * threads} median {ref * ms:.1f} ms (min {min(row['reference']) * ms:.1f}); "
            f"{processes}x{threads} median {step * ms:.1f} ms (min {min(row['step']) * ms:.1f}), "
            f"communication {comm * ms:.2f} ms ({100 * comm / step:.2f}%), waiting {wait * ms:.1f} ms; "
            f"ratio {ref / step:.3f}"
        )
    ref_all = [t for row in result["rows"] for t in row["reference"]]
    step_all = [t for row in result["rows"] for t in row["step"]]
    share = [c / s for row in result["rows"] for c, s in zip(row["comm"], row["step"], strict=True)]
    ratio = statistics.median(ref_all) / statistics.median(step_all)
    lines += [
        f"all rounds: 1x{processes * threads} median {statistics.median(ref_all) * ms:.1f} ms "
        f"(range {min(ref_all) * ms:.1f}..{max(ref_all) * ms:.1f}); {processes}x{threads} median "
        f"{statistics.median(step_all) * ms:.1f} ms (range {min(step_all) * ms:.1f}..{max(step_all) * ms:.1f})",
        f"per-block ratios: {', '.join(f'{r:.3f}' for r in ratios)} (spread {min(ratios):.3f}..{max(ratios):.3f})",
        f"communication share per round: median {100 * statistics.median(share):.2f}% "
        f"(range {100 * min(share):.2f}%..{100 * max(share):.2f}%)",
        f"load average at the end: {', '.join(f'{v:.1f}' for v in os.getloadavg())}",
        f"speedup_vs_one_process: {ratio:.3f} communication_share: {100 * statistics.median(share):.2f}%",
    ]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """The ``bench --processes`` command."""
    from .bench import machine_description

    if args.device != "cpu":
        raise ValueError(f"--processes times gloo on the CPU; --device must be cpu, got {args.device!r}")
    threads = args.threads or 1
    names = args.configs or ["omniglot-chapter"]
    print(f"metabp bench --processes {args.processes} --threads {threads} on {machine_description()}", flush=True)
    for name in names:
        result = measure(
            name,
            args.processes,
            threads,
            args.meta_batch_size,
            args.inner_steps,
            args.first_order,
            args.width,
            args.repeats or 5,
            args.warmup,
            3,
            args.seed,
        )
        print(format_report(result, args.processes, threads), flush=True)
    print(file=sys.stderr, end="")
    return 0


def _train_worker(
    rank: int, world: int, port: int, family: str, config_dict: dict[str, Any], queue: SimpleQueue
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)  # this job's own store at MASTER_PORT, even under torchrun
    from .families import CONFIGS, train

    torch.set_num_threads(1)
    group = distributed.init("cpu")
    try:
        model, _ = train(family, CONFIGS[family].from_dict(config_dict), progress=False, group=group)
        buffer = io.BytesIO()  # bytes, not tensors: a tensor's shared memory dies with this process
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, buffer)
        queue.put((rank, buffer.getvalue()))
    finally:
        distributed.shutdown()


def compare_processes(family: str, config: Config, processes: int = 2) -> dict[str, float]:
    """Train ``config`` of ``family`` in one process and in ``processes`` (gloo, 127.0.0.1).

    Returns the largest absolute difference of the final parameters between the
    multi-process run and the one-process run (``'vs_one_process'``) and between
    the ranks of the multi-process run (``'between_ranks'``; 0 when every rank
    applied the same updates).
    """
    from .families import train

    positive_int("processes", processes)
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.SimpleQueue()
    torch.multiprocessing.start_processes(
        _train_worker,
        (processes, _free_port(), family, config.to_dict(), queue),
        nprocs=processes,
        join=True,
        start_method="spawn",
    )
    results = {
        rank: torch.load(io.BytesIO(data), weights_only=True) for rank, data in (queue.get() for _ in range(processes))
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one, _ = train(family, config, progress=False)
    finally:
        torch.set_num_threads(threads)
    reference = one.state_dict()
    between = max((results[r][k] - results[0][k]).abs().max().item() for r in results for k in reference)
    versus = max((results[0][k] - reference[k]).abs().max().item() for k in reference)
    return {"vs_one_process": versus, "between_ranks": between}
