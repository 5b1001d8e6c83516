"""Few-shot image classification: configurations, resumable meta-training, accuracy.

Four learners share one network (:class:`~metabp.convnet.Conv4`) and one task
stream (:class:`~metabp.episodes.EpisodeSampler`):

* ``maml``: second-order MAML (Finn et al., 2017), every parameter adapts;
* ``fomaml``: first-order MAML, the inner gradients are constants;
* ``anil``: ANIL (Raghu et al., 2020), only the head adapts;
* ``protonet``: prototypical networks (Snell et al., 2017), no inner loop.

The first three are :class:`~metabp.bilevel.InnerLoop` settings of the same core
(:func:`~metabp.bilevel.meta_loss`). :func:`train` is the meta-training of the command
line, on the library's loop (:func:`metabp.training.fit`): it keeps everything a run
depends on (model, optimiser, schedule, task-stream generator, iteration) in an
atomically written checkpoint, so that a resumed run ends with exactly the parameters
of an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from . import checkpoint, distributed, protonet
from .bilevel import InnerLoop, get_params, make_optimizer, meta_loss
from .checks import check_finite, nonnegative_int, one_of, positive_float, positive_int
from .convnet import Conv4
from .episodes import EpisodeSampler, ImageClasses
from .evaluation import adaptation_curve
from .tasks import TaskBatch
from .training import History, fit, seed_everything

#: The algorithms :class:`FewShotConfig` accepts.
ALGORITHMS = ("maml", "fomaml", "anil", "protonet")


@dataclass(frozen=True)
class FewShotConfig:
    """Everything that defines a few-shot meta-training run.

    The defaults are chapter 6.1's configuration: second-order MAML on 20-way
    1-shot episodes of the minimal background set small1, one inner step of 0.4 as
    in MAML, a Conv4 of 32 filters (half MAML's 64, to fit a CPU budget), eight
    episodes per meta-update and a cosine-decayed Adam step.

    Args:
        algorithm: one of :data:`~metabp.fewshot.ALGORITHMS`.
        background: Omniglot background split, 'small1', 'small2' or 'full'
            (see :func:`metabp.omniglot.load_split`).
        ways, shots: N and K of the training episodes.
        queries: query drawings per class in training episodes.
        hidden: filters per convolution of the Conv4 network.
        inner_lr, inner_steps: the inner loop (ignored by 'protonet').
        meta_batch_size: episodes per meta-update.
        meta_lr: Adam's learning rate for the outer loop.
        iterations: meta-updates.
        cosine: decay the meta learning rate to zero along a cosine.
        seed: seeds the initialisation and the task stream.
        same_alphabet: draw all ways of a training task from one alphabet (at one
            rotation), as Lake et al.'s within-alphabet runs do (see
            :class:`~metabp.episodes.EpisodeSampler`).
        distort: strength (0 to 2) of a small random affine distortion of every
            training drawing (:func:`~metabp.episodes.distort_images`); 0, none, by default.
        image_size: side of the drawings in pixels (28 by default, up to Omniglot's 105):
            the network sees them at this resolution in training and at test time. Conv4
            averages its last feature map, so it takes any size; the cost of an update
            grows about as the square of the size.
        mirrors: add each training class's mirror image as a class of its own
            (:meth:`~metabp.episodes.ImageClasses.with_mirrors`), as the rotations are;
            :func:`train` adds them to the classes it is given. Off by default.
        grid: the network's features are the means of its last feature map over
            ``grid x grid`` regions (:class:`~metabp.convnet.Conv4`), so they keep the
            layout of a drawing; 1 (default) averages the whole map.
    """

    algorithm: str = "maml"
    background: str = "small1"
    ways: int = 20
    shots: int = 1
    queries: int = 1
    hidden: int = 32
    inner_lr: float = 0.4
    inner_steps: int = 1
    meta_batch_size: int = 8
    meta_lr: float = 1e-3
    iterations: int = 4000
    cosine: bool = True
    seed: int = 0
    same_alphabet: bool = False
    distort: float = 0.0
    image_size: int = 28
    mirrors: bool = False
    grid: int = 1

    def __post_init__(self) -> None:
        from .omniglot import BACKGROUNDS, check_image_size

        one_of("algorithm", self.algorithm, ALGORITHMS)
        check_image_size(self.image_size)
        one_of("background", self.background, tuple(BACKGROUNDS))
        if isinstance(self.ways, bool) or not isinstance(self.ways, int) or self.ways < 2:
            raise ValueError(f"ways must be an integer >= 2, got {self.ways!r}")
        for name in ("shots", "queries", "hidden", "meta_batch_size", "iterations", "grid"):
            positive_int(name, getattr(self, name))
        nonnegative_int("inner_steps", self.inner_steps)
        nonnegative_int("seed", self.seed)
        positive_float("inner_lr", self.inner_lr)
        positive_float("meta_lr", self.meta_lr)
        if isinstance(self.distort, bool) or not isinstance(self.distort, (int, float)) or not 0 <= self.distort <= 2:
            raise ValueError(f"distort must be a number from 0 to 2, got {self.distort!r}")
        for name in ("cosine", "same_alphabet", "mirrors"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @property
    def inner(self) -> InnerLoop | None:
        """The :class:`~metabp.bilevel.InnerLoop` of the algorithm (None for 'protonet')."""
        if self.algorithm == "protonet":
            return None
        adapt = ("head",) if self.algorithm == "anil" else None
        return InnerLoop("cross_entropy", self.inner_lr, self.inner_steps, self.algorithm == "fomaml", adapt)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FewShotConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"config has unknown fields {unknown}; known are {sorted(known)}")
        return cls(**values)


def build_model(config: FewShotConfig) -> Conv4:
    """The Conv4 network of ``config`` (its head has ``config.ways`` outputs)."""
    return Conv4(config.ways, config.hidden, grid=config.grid)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: TaskBatch, config: FewShotConfig) -> float:
    """One meta-update of ``config.algorithm`` on ``batch``; the loss before it.

    Raises :class:`~metabp.checks.DivergenceError`, before updating, if the loss or a
    gradient is not finite.
    """
    optimizer.zero_grad(set_to_none=True)
    # A Python loop over the episodes, for every algorithm. For MAML and its variants it is
    # exact through batch norm (vmap's second derivatives of nn.BatchNorm2d are not, see
    # metabp.convnet); for all of them it is, on a CPU, no slower than vmap for this network
    # (a prototypical network's update is 1.3 to 2.4 times faster, benchmarks/protonet_loop.py).
    if config.algorithm == "protonet":
        loss = protonet.loss(cast(protonet.Embedder, model), batch, vectorize=False)  # Conv4 has embed
    else:
        inner = config.inner
        assert inner is not None  # every algorithm but protonet has an inner loop
        loss = meta_loss(model, get_params(model), batch, inner, vectorize=False)
    loss.backward()
    check_finite(loss.detach(), [p.grad for p in model.parameters()], **_learning_rates(config))
    optimizer.step()
    return loss.item()


def _learning_rates(config: FewShotConfig) -> dict[str, float]:
    if config.algorithm == "protonet":
        return {"meta_lr": config.meta_lr}
    return {"inner_lr": config.inner_lr, "meta_lr": config.meta_lr}


def default_test_steps(config: FewShotConfig) -> int:
    """Inner steps at test time by default: three, and never fewer than training took.

    A few steps more than training's cost little at test time and do not hurt a
    MAML learner (chapter 6.1 plots accuracy against the number of steps).
    """
    return max(3, config.inner_steps)


def accuracy(
    model: Conv4,
    batch: TaskBatch,
    config: FewShotConfig,
    steps: Sequence[int] | None = None,
    inner_lr: float | None = None,
    chunk_size: int | None = 50,
) -> Tensor:
    """Query accuracy of every task in ``batch`` after adaptation, ``(len(steps), B)``.

    Args:
        model: a trained network.
        batch: test episodes of any number of ways: if it differs from the
            model's, a gradient learner's head is rebuilt with :meth:`~metabp.convnet.Conv4.with_ways`.
        config: the run's configuration (algorithm and inner loop).
        steps: inner steps to report (default ``[default_test_steps(config)]``); ignored
            by 'protonet', which returns one row.
        inner_lr: step size at test time (default the training one).
        chunk_size: tasks per ``vmap`` chunk.
    """
    if config.algorithm == "protonet":
        return protonet.accuracy(model, batch, chunk_size).unsqueeze(0)
    ways = int(batch.y_spt.max()) + 1
    if ways != model.ways:
        model = model.with_ways(ways)
    trained = config.inner
    assert trained is not None  # protonet, the one algorithm without an inner loop, returned above
    inner = (
        trained
        if inner_lr is None
        else InnerLoop("cross_entropy", inner_lr, config.inner_steps, True, trained.adapt_only)
    )
    steps = [default_test_steps(config)] if steps is None else list(steps)
    return adaptation_curve(model, batch, inner, steps, metric="accuracy", chunk_size=chunk_size)


def load_model(path: Path | str, device: str | torch.device = "cpu") -> tuple[Conv4, FewShotConfig, dict[str, Any]]:
    """The network, configuration and raw state stored in a checkpoint of :func:`train`."""
    state = checkpoint.load(path)
    try:
        config = FewShotConfig.from_dict(state["config"])
        model = build_model(config)
        model.load_state_dict(state["model"])
    except (KeyError, ValueError, RuntimeError) as err:
        raise checkpoint.CheckpointError(f"{path} does not hold a few-shot model ({err})") from None
    return model.to(device), config, state


def train(
    config: FewShotConfig,
    classes: ImageClasses,
    out: Path | str | None = None,
    resume: bool = False,
    checkpoint_every: int = 250,
    device: str | torch.device = "cpu",
    progress: bool = True,
    callback: Callable[[int, Conv4], None] | None = None,
    stop_after: int | None = None,
    group: distributed.Group | None = None,
) -> tuple[Conv4, History]:
    """Meta-train a Conv4 on episodes from ``classes`` with ``config``.

    Args:
        config: the run (with ``resume``, it must equal the checkpoint's).
        classes: meta-training classes, e.g. ``load_split(config.background, 'train', size=config.image_size)``.
            With ``config.mirrors``, their mirror images are added here.
        out: checkpoint file, written every ``checkpoint_every`` iterations and at the end.
        resume: continue from ``out`` (which must exist) instead of starting afresh.
            On a CPU the resumed run ends with exactly the parameters of an
            uninterrupted one; on a GPU, only up to its kernels' own nondeterminism.
        device: where to train ('cpu', 'cuda').
        progress: show a progress bar.
        callback: ``callback(iteration, model)`` after every iteration (e.g. to track
            held-out accuracy); it must not consume the training randomness.
        stop_after: stop (with a checkpoint) after this many iterations in total, as
            if the run had been interrupted there; for tests of ``resume``.
        group: the processes sharing each meta-batch (:func:`metabp.distributed.init`);
            only its rank 0 reads and writes ``out`` and shows progress.

    Returns:
        The trained model and its :class:`~metabp.training.History` (loss of every
        iteration so far, wall time of all sessions together).
    """
    positive_int("checkpoint_every", checkpoint_every)
    if stop_after is not None:
        positive_int("stop_after", stop_after)
    device = torch.device(device)
    if tuple(classes.images.shape[-2:]) != (config.image_size, config.image_size):
        raise ValueError(
            f"classes hold {tuple(classes.images.shape[-2:])} images but config.image_size is {config.image_size}: "
            f"load them with load_split(..., size={config.image_size})"
        )
    if config.mirrors:
        classes = classes.with_mirrors()
    state = None
    if resume:
        if out is None:
            raise ValueError("resume=True needs out, the checkpoint to continue")
        state = distributed.load_on_main(out, group, checkpoint.load)
        stored = FewShotConfig.from_dict(state["config"])
        if stored != config:
            raise ValueError(f"config differs from the one stored in {out}: {stored}")
    generator = seed_everything(config.seed)
    sampler = EpisodeSampler(
        classes.to(device), config.ways, config.shots, config.queries, config.same_alphabet, config.distort
    )
    model = build_model(config).to(device)
    optimizer = make_optimizer(model.parameters(), config.meta_lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.iterations) if config.cosine else None
    main = group is None or group.main
    save = None if out is None or not main else (lambda s: checkpoint.save(out, {"config": config.to_dict(), **s}))
    step = distributed.shard_step(lambda m, o, b: train_step(m, o, b, config), group)
    history = fit(
        lambda batch: step(model, optimizer, batch),
        lambda gen: sampler(config.meta_batch_size, gen),
        config.iterations,
        optimizer,
        generator,
        scheduler,
        updates_itself=True,
        learning_rates=_learning_rates(config),
        callback=None if callback is None else (lambda it, _: callback(it, model)),
        model=model,
        resume=state,
        stop_after=stop_after,
        save=save,
        save_every=checkpoint_every,
        progress=progress and main,
        desc=config.algorithm,
        mininterval=1.0,
    )
    return model, history
