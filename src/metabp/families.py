"""The other task families the command line trains: sinusoid regression (chapter 3)
and 2D navigation (chapter 6.3), resumable and distributable like Omniglot's.

Each family has a frozen configuration whose defaults are its chapter's (the
sinusoid: MAML's 1-40-40-1 network, K = 10, one inner step of 0.01, 25 tasks per
update, Adam at 0.01 decayed along a cosine for 40,000 updates; navigation: MAML's
policy, one inner step of 0.1, 20 goals of 20 episodes per update, one Adam step
on the clipped surrogate per batch, cosine-decayed, 300 updates), a ``train``
function, which hands a sampler and a step to the library's one training loop
(:func:`metabp.training.fit`) and keeps everything the run depends on in an
atomically written checkpoint (model, optimiser, schedule, task-stream generator,
iteration), so a resumed run ends with the parameters of an uninterrupted one, and
an ``evaluate`` function. Both take a :class:`metabp.distributed.Group`: the meta-batch is then
shared between processes (:func:`metabp.distributed.shard_step`,
:func:`metabp.distributed.shard_iteration`) and only rank 0 writes and prints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from . import checkpoint, distributed
from .bilevel import InnerLoop, get_params, make_optimizer, meta_gradient_fn, meta_step
from .checks import nonnegative_int, one_of, positive_float, positive_int
from .training import History, fit

if TYPE_CHECKING:
    from .metarl import MetaRL
    from .navigation import Navigation2D

DTYPES = {"float32": torch.float32, "float64": torch.float64}

C = TypeVar("C", "SinusoidConfig", "NavigationConfig")


def _check_common(config: Any) -> None:
    for name in ("iterations", "meta_batch_size"):
        positive_int(name, getattr(config, name))
    nonnegative_int("seed", config.seed)
    one_of("dtype", config.dtype, tuple(DTYPES))
    if not isinstance(config.cosine, bool):
        raise ValueError(f"cosine must be True or False, got {config.cosine!r}")


def _from_dict(cls: type[C], values: dict[str, Any]) -> C:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"config has unknown fields {unknown}; known are {sorted(known)}")
    return cls(**values)


@dataclass(frozen=True)
class SinusoidConfig:
    """A sinusoid meta-training run (defaults: chapter 3's, MAML section 5.1).

    Args:
        shots, queries: support and query points per task.
        hidden: width of both hidden layers of :class:`~metabp.models.SineNet`.
        inner_lr, inner_steps, first_order: the inner loop.
        meta_batch_size, meta_lr, iterations, cosine: the outer loop (Adam).
        compile: compute the meta-gradient with ``torch.compile`` (the chapter does;
            tens of seconds of compilation, then several times faster).
        seed: seeds the initialisation and the task stream.
        dtype: 'float32' or 'float64'.
    """

    shots: int = 10
    queries: int = 10
    hidden: int = 40
    inner_lr: float = 0.01
    inner_steps: int = 1
    first_order: bool = False
    meta_batch_size: int = 25
    meta_lr: float = 0.01
    iterations: int = 40000
    cosine: bool = True
    compile: bool = True
    seed: int = 0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        _check_common(self)
        for name in ("shots", "queries", "hidden"):
            positive_int(name, getattr(self, name))
        positive_float("inner_lr", self.inner_lr)
        nonnegative_int("inner_steps", self.inner_steps)
        positive_float("meta_lr", self.meta_lr)

    @property
    def inner(self) -> InnerLoop:
        return InnerLoop("mse", self.inner_lr, self.inner_steps, self.first_order)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SinusoidConfig:
        return _from_dict(cls, values)


@dataclass(frozen=True)
class NavigationConfig:
    """A meta-RL run on MAML's 2D navigation (defaults: chapter 6.3's).

    The fields from ``inner_lr`` to ``count_steps`` are those of
    :class:`~metabp.metarl.MetaRL` (``std_lr <= 0`` means: the same as ``meta_lr``);
    ``hidden`` is the policy's width, ``horizon`` the episodes' length.
    """

    inner_lr: float = 0.1
    inner_steps: int = 1
    num_trajectories: int = 20
    meta_batch_size: int = 20
    meta_lr: float = 1e-3
    std_lr: float = 1e-2
    outer_epochs: int = 1
    clip: float = 0.2
    gamma: float = 0.99
    estimator: str = "lvc"
    cosine: bool = True
    count_steps: bool = False
    hidden: int = 100
    horizon: int = 100
    iterations: int = 300
    seed: int = 0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        _check_common(self)
        positive_int("hidden", self.hidden)
        positive_int("horizon", self.horizon)
        _ = self.metarl  # the property validates the rest

    @property
    def metarl(self) -> MetaRL:
        from .metarl import MetaRL

        return MetaRL(
            self.inner_lr,
            self.inner_steps,
            self.num_trajectories,
            self.meta_batch_size,
            self.meta_lr,
            self.std_lr if self.std_lr > 0 else None,
            self.outer_epochs,
            self.clip,
            self.gamma,
            self.estimator,
            self.cosine,
            self.count_steps,
        )

    @property
    def env(self) -> Navigation2D:
        from .navigation import Navigation2D

        return Navigation2D(horizon=self.horizon)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> NavigationConfig:
        return _from_dict(cls, values)


Config = SinusoidConfig | NavigationConfig
CONFIGS: dict[str, type[SinusoidConfig] | type[NavigationConfig]] = {
    "sinusoid": SinusoidConfig,
    "navigation": NavigationConfig,
}


def build_model(family: str, config: Any) -> nn.Module:
    """The seeded network of ``config`` (``torch.manual_seed(config.seed)`` first, as the chapters do)."""
    torch.manual_seed(config.seed)
    model: nn.Module
    if family == "sinusoid":
        from .models import SineNet

        model = SineNet(config.hidden)
    else:
        from .navigation import GaussianMLPPolicy

        model = GaussianMLPPolicy(hidden=config.hidden)
    return model.to(DTYPES[config.dtype])


def load_model(path: Path | str, family: str) -> tuple[nn.Module, Config, dict[str, Any]]:
    """The network, configuration and raw state of a checkpoint written by :func:`train`."""
    state = checkpoint.load(path)
    try:
        if state.get("family") != family:
            raise ValueError(f"it holds family {state.get('family')!r}")
        config = CONFIGS[family].from_dict(state["config"])
        model = build_model(family, config)
        model.load_state_dict(state["model"])
    except (KeyError, ValueError, RuntimeError) as err:
        raise checkpoint.CheckpointError(f"{path} does not hold a {family} model ({err})") from None
    return model, config, state


def _optimizer(family: str, model: nn.Module, config: Any) -> torch.optim.Optimizer:
    if family == "sinusoid":
        return make_optimizer(model.parameters(), config.meta_lr)
    std = [p for n, p in model.named_parameters() if n == "log_std"]
    rest = [p for n, p in model.named_parameters() if n != "log_std"]
    lr = config.std_lr if config.std_lr > 0 else config.meta_lr
    return torch.optim.Adam([{"params": rest}, {"params": std, "lr": lr}], lr=config.meta_lr)


_Sample = Callable[[torch.Generator], Any]
_Step = Callable[[Any], Any]


def _sinusoid_loop(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    config: SinusoidConfig,
    group: distributed.Group | None,
) -> tuple[_Sample, _Step]:
    """``(sample, step)`` for :func:`~metabp.training.fit`: a meta-batch of sinusoids, one meta-update on it."""
    from .tasks import SinusoidTasks, TaskBatch

    family = SinusoidTasks(config.shots, config.queries)
    dtype = DTYPES[config.dtype]
    inner = config.inner
    grad_fn = meta_gradient_fn(model, inner, vectorize=True, compile=True) if config.compile else None

    def one_step(model: nn.Module, optimizer: Any, batch: TaskBatch) -> float:
        if grad_fn is None:
            return meta_step(model, optimizer, batch, inner, vectorize=True)
        optimizer.zero_grad(set_to_none=True)
        params = get_params(model)
        grads, loss = grad_fn({k: v.detach() for k, v in params.items()}, tuple(batch))
        for k, p in params.items():
            p.grad = grads[k]
        optimizer.step()
        return float(loss.item())

    sharded = distributed.shard_step(one_step, group)
    return (
        lambda generator: family.sample(config.meta_batch_size, generator, dtype),
        lambda batch: sharded(model, optimizer, batch),
    )


def _navigation_loop(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    config: NavigationConfig,
    group: distributed.Group | None,
) -> tuple[_Sample, _Step]:
    """``(sample, step)`` for :func:`~metabp.training.fit`: goals, and one meta-RL iteration on them
    (whose episodes draw from ``generator`` too, after the goals)."""
    from .metarl import meta_iteration

    env, cfg = config.env, config.metarl
    dtype = DTYPES[config.dtype]
    iterate = distributed.shard_iteration(meta_iteration, group)

    def step(goals: torch.Tensor) -> dict[str, float]:
        before, after = iterate(env, model, optimizer, goals, cfg, generator)
        return {"before": before, "after": after}

    return lambda generator: env.sample_goals(cfg.meta_batch_size, generator).to(dtype), step


def _learning_rates(config: Config) -> dict[str, float]:
    """The step sizes a :class:`~metabp.checks.DivergenceError` names."""
    rates = {"inner_lr": config.inner_lr, "meta_lr": config.meta_lr}
    if isinstance(config, NavigationConfig):
        rates["std_lr"] = config.std_lr if config.std_lr > 0 else config.meta_lr
    return rates


def train(
    family: str,
    config: Config,
    out: Path | str | None = None,
    resume: bool = False,
    checkpoint_every: int = 1000,
    progress: bool = True,
    group: distributed.Group | None = None,
    stop_after: int | None = None,
) -> tuple[nn.Module, History]:
    """Meta-train ``family`` ('sinusoid' or 'navigation') with ``config``, on :func:`metabp.training.fit`.

    Args:
        family: which family; ``config`` is its ``CONFIGS`` class.
        out: checkpoint file, written (by rank 0) every ``checkpoint_every``
            iterations and at the end: the run's :func:`~metabp.training.training_state`
            with the ``family`` and its ``config``.
        resume: continue from ``out`` (read by rank 0 and broadcast); ``config`` must
            equal the stored one.
        progress: show a progress bar (rank 0).
        group: the processes sharing each meta-batch (default: this one alone).
        stop_after: stop (with a checkpoint) after this many iterations in total, as
            if interrupted; for tests of ``resume``.

    Returns:
        The model and the run's :class:`~metabp.training.History`: the meta-loss of
        every iteration so far (``history.loss``) for the sinusoid; for navigation the
        mean returns before and after adaptation (``history.before``,
        ``history.after``); the wall time of all sessions together (``history.seconds``).

    Raises:
        DivergenceError: a loss, return or gradient turned non-finite (before the
            update, naming the learning rates).
    """
    one_of("family", family, tuple(CONFIGS))
    if not isinstance(config, CONFIGS[family]):
        raise ValueError(f"config must be a {CONFIGS[family].__name__} for family {family!r}, got {config!r}")
    positive_int("checkpoint_every", checkpoint_every)
    main = group is None or group.main
    state = None
    if resume:
        if out is None:
            raise ValueError("resume=True needs out, the checkpoint to continue")
        state = distributed.load_on_main(out, group, checkpoint.load)
        stored = CONFIGS[family].from_dict(state["config"])
        if stored != config:
            raise ValueError(f"config differs from the one stored in {out}: {stored}")
    model = build_model(family, config)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = _optimizer(family, model, config)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.iterations) if config.cosine else None
    if isinstance(config, SinusoidConfig):
        sample, step = _sinusoid_loop(model, optimizer, generator, config, group)
    else:
        sample, step = _navigation_loop(model, optimizer, generator, config, group)
    save = None
    if out is not None and main:
        save = lambda s: checkpoint.save(out, {"family": family, "config": config.to_dict(), **s})  # noqa: E731
    history = fit(
        step,
        sample,
        config.iterations,
        optimizer,
        generator,
        scheduler,
        updates_itself=True,
        learning_rates=_learning_rates(config),
        model=model,
        resume=state,
        stop_after=stop_after,
        save=save,
        save_every=checkpoint_every,
        progress=progress and main,
        desc=family,
        mininterval=1.0,
    )
    return model, history


def evaluate_sinusoid(
    model: nn.Module,
    config: SinusoidConfig,
    shots: int = 5,
    tasks: int = 1000,
    steps: tuple[int, ...] = (0, 1, 10),
    seed: int = 2017,
) -> dict[int, tuple[float, float]]:
    """Query MSE (mean and 95% half-width) after each number of ``steps`` on ``tasks`` fresh sinusoids.

    The defaults are chapter 3's test: 1000 tasks of ``shots = 5`` support points
    and 100 query points, seeded 2017, step size the training one.
    """
    from .evaluation import adaptation_curve, mean_ci
    from .tasks import SinusoidTasks

    positive_int("shots", shots)
    positive_int("tasks", tasks)
    test = SinusoidTasks(shots=shots, queries=100).sample(
        tasks, torch.Generator().manual_seed(seed), DTYPES[config.dtype]
    )
    curve = adaptation_curve(model, test, config.inner, list(steps))
    return {s: mean_ci(curve[i]) for i, s in enumerate(steps)}


def evaluate_navigation(
    model: nn.Module,
    config: NavigationConfig,
    inner_lrs: tuple[float, ...] = (0.1, 0.05, 0.05),
    trajectories: int = 20,
    seed: int = 0,
) -> list[tuple[float, float]]:
    """Mean return (and 95% half-width over goals) after 0..len(inner_lrs) adaptation steps.

    On the 40 test goals of MAML's released evaluation
    (:meth:`~metabp.navigation.Navigation2D.released_test_goals`), ``trajectories``
    episodes per goal and step, step sizes ``inner_lrs`` (default MAML's 0.1 and then
    halved).
    """
    from .evaluation import mean_ci
    from .metarl import adaptation_returns

    for lr in inner_lrs:
        positive_float("inner_lr", lr)
    positive_int("trajectories", trajectories)
    env = config.env
    goals = env.released_test_goals().to(DTYPES[config.dtype])
    returns = adaptation_returns(
        env,
        model,
        goals,
        list(inner_lrs),
        trajectories,
        torch.Generator().manual_seed(seed),
        config.estimator,
        config.gamma,
    )
    return [mean_ci(t.mean_return()) for t in returns]
