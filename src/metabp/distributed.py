"""Meta-training across processes and machines with ``torch.distributed``.

A meta-batch is data-parallel over its tasks, so several processes can share one
meta-update: each takes its share of the tasks, computes their meta-gradient, the
shares are summed with ``all_reduce``, and every process applies the same update.
Launched by ``torchrun`` (``torchrun --nproc_per_node N -m metabp train FAMILY ...``,
with ``--nnodes``, ``--rdzv-backend c10d --rdzv-endpoint HOST:PORT`` across
machines), the processes find each other through the environment torchrun sets
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``);
without it, :func:`init` returns the one-process :class:`Group` and nothing here
communicates.

What makes ``N`` processes end with the parameters of one (up to the order in
which floating-point sums are taken):

* **the same tasks**: every process draws the *full* meta-batch with the same
  seeded generator, exactly as one process would, and keeps its contiguous slice
  (:meth:`Group.share`); the generators therefore stay in step on every rank;
* **the same mean**: a step computes the mean loss over its own ``b_r`` tasks, so
  its gradient is weighted by ``b_r / B`` before the sum (shares may be unequal);
* **the same update**: :class:`SummedOptimizer` sums the weighted gradients of
  every process in one ``all_reduce`` before the wrapped optimiser's ``step()``,
  so every rank applies the same update to the same parameters.

The hook into a training loop is one call, :func:`shard_step`, which wraps any
``step(model, optimizer, batch) -> loss`` that draws nothing random itself (the
MAML meta-step, first-order MAML, ANIL, prototypical networks, Reptile...).
Meta-RL, whose "batch" is played inside the step, is sharded by
:func:`shard_iteration` around :func:`metabp.metarl.meta_iteration`.

Only rank 0 writes checkpoints and shows progress (:attr:`Group.main`); a run
resumed under torchrun reads its checkpoint on rank 0 and broadcasts it
(:meth:`Group.broadcast`), so other machines need not see the file.
"""

from __future__ import annotations

import datetime
import functools
import os
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .checks import check_finite, positive_int
from .tasks import TaskBatch

if TYPE_CHECKING:
    from .metarl import MetaRL
    from .navigation import Navigation2D

#: Variables torchrun sets for every worker; :func:`init` needs all of them for a distributed run.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_POST_KEY, _TOKEN_KEY = "metabp/attempt_store", "metabp/token"


class PeerError(RuntimeError):
    """Another process of the job failed (or could not be reached) during a collective call."""


class Group:
    """This process's place in the job: its rank among ``world`` processes, and the collectives.

    ``Group()`` is the one-process job: every method is then a no-op or the identity,
    so a loop written against a :class:`Group` runs unchanged (and bitwise as before)
    without torchrun. Make a distributed one with :func:`init`.

    Attributes:
        rank: this process's index (0 to ``world - 1``).
        world: the number of processes.
        device: where this process computes (``cuda:LOCAL_RANK`` under nccl).
        comm_seconds: wall time spent in collective calls so far (for the benchmark).
    """

    def __init__(self, rank: int = 0, world: int = 1, device: str | torch.device = "cpu") -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, world), got rank={rank!r}, world={world!r}")
        self.rank, self.world, self.device = rank, world, torch.device(device)
        self.comm_seconds = 0.0

    def __repr__(self) -> str:
        return f"Group(rank={self.rank}, world={self.world}, device={self.device})"

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the process that writes files and prints progress."""
        return self.rank == 0

    def share(self, total: int) -> slice:
        """This rank's contiguous slice of ``total`` tasks; the first ``total % world`` ranks take one more.

        Raises ``ValueError`` if ``total < world`` (a rank with no task has no mean loss).
        """
        positive_int("total", total)
        if total < self.world:
            raise ValueError(f"meta_batch_size must be at least the number of processes ({self.world}), got {total}")
        base, extra = divmod(total, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def take(self, batch: TaskBatch) -> tuple[TaskBatch, float]:
        """This rank's tasks of the full ``batch`` and their weight ``b_r / B`` in the mean over tasks."""
        if not self.distributed:
            return batch, 1.0
        total = batch.x_spt.shape[0]
        part = self.share(total)
        return TaskBatch(*(t[part] for t in batch)), (part.stop - part.start) / total

    def _collective(self, fn: Callable[[], Any]) -> Any:
        import torch.distributed as dist

        began = time.perf_counter()
        try:
            return fn()
        except (RuntimeError, dist.DistError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise PeerError(
                f"rank {self.rank} of {self.world} lost the other processes ({first}); "
                "another rank failed: see its error above"
            ) from None
        finally:
            self.comm_seconds += time.perf_counter() - began

    def all_sum_(self, flat: Tensor) -> Tensor:
        """Sum ``flat`` over every process, in place (one ``all_reduce``); returns it."""
        if self.distributed:
            import torch.distributed as dist

            self._collective(lambda: dist.all_reduce(flat, op=dist.ReduceOp.SUM))
        return flat

    def sum(self, value: float | Tensor) -> float:
        """``value`` summed over every process, as a float (a float64 ``all_reduce``)."""
        if not self.distributed:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self._comm_device)
        return float(self.all_sum_(t).item())

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any process."""
        if not self.distributed:
            return bool(flag)
        return self.sum(1.0 if flag else 0.0) > 0

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (any picklable object; tensors come back on the CPU)."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self.main else None]
        self._collective(lambda: dist.broadcast_object_list(box, src=0, device=self._comm_device))
        return box[0]

    def broadcast_parameters(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers into ``module`` on every rank."""
        if not self.distributed:
            return
        import torch.distributed as dist

        for t in list(module.parameters()) + list(module.buffers()):
            self._collective(functools.partial(dist.broadcast, t.data, src=0))

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            self._collective(lambda: dist.barrier())

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def launched_by_torchrun() -> bool:
    """Whether torchrun's variables are set (``WORLD_SIZE`` among them)."""
    return "WORLD_SIZE" in os.environ


def restart_count() -> int:
    """How often torchrun has restarted this job (``TORCHELASTIC_RESTART_COUNT``; 0 without torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def init(device: str | torch.device = "cpu", timeout_s: float = 1800.0, connect_timeout_s: float = 300.0) -> Group:
    """The job this process belongs to, from torchrun's environment.

    Without torchrun's variables (or with ``WORLD_SIZE=1``) this is the one-process
    :class:`Group` and nothing is initialised. Otherwise the default process group is
    created with ``gloo`` on a CPU and ``nccl`` on CUDA, where each process takes
    the GPU ``cuda:LOCAL_RANK`` (pass ``device='cuda'``, not a numbered one).

    Args:
        device: 'cpu' or 'cuda'.
        timeout_s: how long a collective call waits for a silent peer before failing.
        connect_timeout_s: how long a rank waits for rank 0 when the job starts or restarts.

    Raises :class:`PeerError` (one line) if the processes cannot connect. Under
    torchrun the group is initialised on :func:`attempt_store`, so that a job
    restarted by ``--max-restarts`` connects afresh.
    """
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {str(device)!r}")
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return Group(0, 1, device)
    missing = [k for k in TORCHRUN_ENV if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE is set but {', '.join(missing)} are not; launch with torchrun")
    import torch.distributed as dist

    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if device.index is not None:
            raise ValueError(f"under torchrun each process takes cuda:LOCAL_RANK; pass --device cuda, not {device}")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK {local_rank} but this machine has {torch.cuda.device_count()} GPU(s); "
                "start at most that many processes per node"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        timeout = datetime.timedelta(seconds=timeout_s)
        try:
            store = attempt_store(rank, world, connect_timeout_s)
            if store is None:  # MASTER_ADDR:MASTER_PORT is this run's own: rank 0 hosts a new store there
                dist.init_process_group(backend, timeout=timeout)
            else:
                dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
        except PeerError:
            raise
        except (RuntimeError, dist.DistError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise PeerError(f"rank {rank} of {world} could not connect to the other processes ({first})") from None
    return Group(dist.get_rank(), dist.get_world_size(), device)


def attempt_store(rank: int, world: int, timeout_s: float) -> Any:
    """A key-value store that belongs to this attempt of the job alone, or ``None`` where ``env://`` gives one.

    torchrun's agent hosts the store at ``MASTER_ADDR:MASTER_PORT``
    (``TORCHELASTIC_USE_AGENT_STORE=True``) and keeps it across ``--max-restarts``
    restarts, with the keys the failed attempt wrote: the process group's
    rendezvous keys (gloo's addresses of every rank, nccl's unique id) are the same
    names each attempt, so a restarted rank can read a dead rank's address and
    connect to nothing (refused, or a wait of minutes; PyTorch issue #135712).
    The restart count cannot tell the attempts apart on several machines (each
    agent counts its own). So rank 0 starts a new store of its own on a free port,
    holding a random token, and posts ``"port token"`` in the agent's store; every
    other rank reads the post, connects, and takes the store only if it holds the
    token: a stale post names a dead process's port (refused, or another token),
    and the rank reads again until the new one appears, at most ``timeout_s``.

    Returns the store on which to initialise the process group, or ``None``
    without torchrun's agent store (``MASTER_PORT`` is then this run's own).
    Raises :class:`PeerError` if rank 0's store does not appear in time.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    from torch.distributed import DistError, TCPStore

    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    deadline = time.monotonic() + timeout_s
    timeout = datetime.timedelta(seconds=timeout_s)
    agent = TCPStore(addr, port, is_master=False, timeout=timeout)
    if rank == 0:
        own = TCPStore(addr, 0, world, is_master=True, timeout=timeout, wait_for_workers=False)
        token = secrets.token_hex(16)
        own.set(_TOKEN_KEY, token)
        agent.set(_POST_KEY, f"{own.port} {token}")
        return own
    seen = None
    while (left := deadline - time.monotonic()) > 0:
        agent.wait([_POST_KEY], datetime.timedelta(seconds=left))
        seen = agent.get(_POST_KEY).decode()
        own_port, token = seen.split()
        if not _listening(addr, int(own_port), min(2.0, left)):
            time.sleep(0.1)  # a dead attempt's store
            continue
        try:
            own = TCPStore(addr, int(own_port), is_master=False, timeout=datetime.timedelta(seconds=min(2.0, left)))
            if own.check([_TOKEN_KEY]) and own.get(_TOKEN_KEY).decode() == token:
                own.set_timeout(timeout)
                return own
        except (RuntimeError, DistError):
            pass  # a dead attempt's store
        time.sleep(0.1)
    raise PeerError(
        f"rank {rank} of {world}: rank 0's store did not appear at {addr} within {timeout_s:.0f} s "
        f"(last seen: {seen or 'nothing'}); is rank 0 running?"
    )


def _listening(addr: str, port: int, timeout_s: float) -> bool:
    """Whether something accepts connections at ``addr:port`` (a dead process's port refuses at once)."""
    try:
        with socket.create_connection((addr, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def shutdown() -> None:
    """Destroy the default process group if :func:`init` created one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class SummedOptimizer:
    """An optimiser whose ``step()`` first sums every process's weighted gradients.

    All gradients of the wrapped optimiser's parameters are packed into one flat
    buffer, multiplied by ``weight`` (this rank's share of the mean), summed with one
    ``all_reduce`` and unpacked, then checked (:func:`~metabp.checks.check_finite`, so
    that every rank stops together at a non-finite gradient) and the wrapped
    ``step()`` runs. A parameter that has no gradient on any rank keeps ``None``, as
    in one process. Everything else is the wrapped optimiser's.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, group: Group, weight: float = 1.0) -> None:
        self.optimizer, self.group, self.weight = optimizer, group, float(weight)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.optimizer, name)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable | None = None) -> Any:
        if closure is not None:
            raise ValueError("SummedOptimizer.step takes no closure")
        if self.group.distributed:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            sizes = [p.numel() for p in params]
            has = [p.grad is not None for p in params]
            ref = params[0]
            flat = torch.cat(
                [
                    (p.grad if h else torch.zeros_like(p)).reshape(-1) * self.weight
                    for p, h in zip(params, has, strict=True)
                ]
                + [torch.tensor(has, dtype=ref.dtype, device=ref.device)]
            )
            self.group.all_sum_(flat)
            counts = flat[-len(params) :]
            offset = 0
            for p, n, c in zip(params, sizes, counts.tolist(), strict=True):
                p.grad = flat[offset : offset + n].view_as(p).clone() if c > 0 else None
                offset += n
            check_finite(
                0.0, [p.grad for p in params], **{f"lr{i}": g["lr"] for i, g in enumerate(self.optimizer.param_groups)}
            )
        return self.optimizer.step()


Step = Callable[[nn.Module, Any, TaskBatch], float]


def shard_step(step: Step, group: Group | None) -> Step:
    """Wrap ``step(model, optimizer, batch) -> mean loss`` so that it runs on this rank's share of ``batch``.

    The wrapped step takes the *full* meta-batch (drawn identically on every rank),
    keeps this rank's tasks, runs ``step`` on them with a :class:`SummedOptimizer`
    weighted by their share, and returns the mean loss over the full batch. With
    ``group`` ``None`` or one process it is ``step`` itself.
    """
    if group is None or not group.distributed:
        return step

    def sharded(model: nn.Module, optimizer: Any, batch: TaskBatch) -> float:
        part, weight = group.take(batch)
        loss = step(model, SummedOptimizer(optimizer, group, weight), part)
        return group.sum(loss * weight)

    return sharded


class TaskShard:
    """This rank's slice ``[start, stop)`` of ``total`` tasks whose data a step plays itself (meta-RL).

    Random draws are made for all ``total`` tasks and sliced (:meth:`noise`), loops that
    stop when every task is done ask every rank (:meth:`any`), and sums over tasks are
    summed over ranks (:meth:`sum`), so that the slice sees exactly what it would see in
    the full batch.
    """

    def __init__(self, group: Group, total: int) -> None:
        part = group.share(total)
        self.group, self.start, self.stop, self.total = group, part.start, part.stop, total

    def noise(self, shape: Sequence[int], generator: torch.Generator | None, dtype: torch.dtype) -> Tensor:
        """Standard normal noise drawn for all tasks (leading dimension ``total``), this rank's rows."""
        full = torch.randn((self.total,) + tuple(shape[1:]), generator=generator, dtype=dtype)
        return full[self.start : self.stop]

    def any(self, flag: bool) -> bool:
        return self.group.any(flag)

    def sum(self, value: Tensor) -> Tensor:
        """A scalar tensor summed over every rank (same dtype)."""
        t = value.detach().reshape(1).clone()
        return self.group.all_sum_(t)[0]


def shard_iteration(
    iteration: Callable[..., tuple[float, float]], group: Group | None
) -> Callable[..., tuple[float, float]]:
    """Wrap :func:`metabp.metarl.meta_iteration` so that it plays and learns from this rank's goals only.

    Same signature as ``meta_iteration(env, policy, optimizer, goals, cfg, generator)``;
    ``goals`` is the full batch. Episodes are played with noise drawn for every goal
    (:class:`TaskShard`), the outer loss is normalised by the number of steps of all
    ranks, gradients are summed by :class:`SummedOptimizer`, and the returned mean
    returns are those of the full batch. With ``group`` ``None`` or one process it is
    ``iteration`` itself.
    """
    if group is None or not group.distributed:
        return iteration

    def sharded(
        env: Navigation2D,
        policy: nn.Module,
        optimizer: torch.optim.Optimizer,
        goals: Tensor,
        cfg: MetaRL,
        generator: torch.Generator | None = None,
    ) -> tuple[float, float]:
        if cfg.count_steps:
            raise ValueError(
                "count_steps=True is not sharded across processes (a round's length depends on "
                "every goal); train it in one process"
            )
        shard = TaskShard(group, goals.shape[0])
        return iteration(
            env,
            policy,
            SummedOptimizer(optimizer, group, 1.0),
            goals[shard.start : shard.stop],
            cfg,
            generator,
            shard=shard,
        )

    return sharded


def load_on_main(path: Any, group: Group | None, loader: Callable[[Any], Any]) -> Any:
    """``loader(path)`` on rank 0, broadcast to every rank (so only rank 0 needs the file)."""
    if group is None or not group.distributed:
        return loader(path)
    result, error = None, None
    if group.main:
        try:
            result = loader(path)
        except Exception as err:  # let every rank fail with rank 0's message
            error = err
    error_text = group.broadcast(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if error_text is not None:
        raise PeerError(f"rank {group.rank}: rank 0 could not read {path} ({error_text})")
    return group.broadcast(result)
