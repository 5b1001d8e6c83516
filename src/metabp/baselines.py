"""Non-meta baselines for regression task families: multi-task training.

MAML's own baseline, "pretrained" (one network fitted to the pooled data of
all tasks), is :func:`metabp.training.pretrain`. This module adds the other
classical way to use many tasks: multi-task learning with hard parameter
sharing. A body is shared by all training tasks and every task has a linear
head of its own, all trained jointly on the tasks' examples. The body must
then carry features in which every training task is (nearly) linear; a new
task starts from the body and the average head.

The model is a :class:`~metabp.models.SineNet` body (every layer but the last)
plus a table of heads, one row per task of a :class:`~metabp.tasks.TaskPool`
(a finite set of tasks is what gives every task an identity, and so a head).
:func:`MultiTaskHeads.to_model` turns the trained body and the mean head into
an ordinary ``SineNet`` that the evaluation code adapts like any other.
"""

from __future__ import annotations

import copy
from typing import cast

import torch
from torch import Tensor, nn

from .bilevel import resolve_loss
from .checks import positive_float, positive_int
from .models import SineNet
from .tasks import TaskPool
from .training import History, fit, seed_everything


class MultiTaskHeads(nn.Module):
    """A shared body with one linear head per training task.

    Args:
        model: a network whose last module is ``net[-1]``, an ``nn.Linear`` head
            (a :class:`~metabp.models.SineNet`); its other layers become the shared body.
        num_tasks: how many task heads.

    ``forward(x, task)`` maps inputs ``(B, n, ...)`` of tasks ``task`` ``(B,)`` to
    outputs ``(B, n, out)``. Every head starts as a copy of ``model``'s head.
    """

    def __init__(self, model: nn.Module, num_tasks: int) -> None:
        super().__init__()
        positive_int("num_tasks", num_tasks)
        net = getattr(model, "net", None)
        head = net[-1] if isinstance(net, nn.Sequential) else None
        if not isinstance(net, nn.Sequential) or not isinstance(head, nn.Linear):
            raise ValueError(f"model.net[-1] must be an nn.Linear head, got {type(head).__name__}")
        self.template = copy.deepcopy(model)
        self.body = copy.deepcopy(net[:-1])
        self.weight = nn.Parameter(head.weight.detach().clone().expand(num_tasks, -1, -1).contiguous())
        self.bias = nn.Parameter(head.bias.detach().clone().expand(num_tasks, -1).contiguous())

    @property
    def num_tasks(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: Tensor, task: Tensor) -> Tensor:
        features = self.body(x)  # (B, n, hidden)
        return torch.einsum("bnh,boh->bno", features, self.weight[task]) + self.bias[task].unsqueeze(1)

    def to_model(self) -> nn.Module:
        """The shared body with the mean of the task heads, as a copy of the original model."""
        model = copy.deepcopy(self.template)
        with torch.no_grad():
            net = cast(nn.Sequential, model.net)  # __init__ checked it: a Sequential ending in an nn.Linear
            net[:-1].load_state_dict(self.body.state_dict())
            head = cast(nn.Linear, net[-1])
            head.weight.copy_(self.weight.mean(0))
            head.bias.copy_(self.bias.mean(0))
        return model


def multitask_train(
    pool: TaskPool,
    iterations: int,
    batch_size: int = 25,
    lr: float = 1e-3,
    loss: str = "mse",
    seed: int = 0,
    model: nn.Module | None = None,
    progress: bool = True,
    desc: str = "multi-task training",
) -> tuple[MultiTaskHeads, History]:
    """Train a shared body and per-task heads on the tasks of ``pool``.

    Each iteration draws ``batch_size`` tasks of the pool (as :meth:`~metabp.tasks.TaskPool.sample`
    does, same generator stream) and fits all their examples, each task through its
    own head. Adam on body and heads.

    Args:
        pool: the finite set of training tasks.
        iterations: optimisation steps.
        batch_size: tasks per step.
        lr: Adam's learning rate.
        loss: the per-example loss ('mse').
        seed: seeds the model's initialisation (when ``model`` is None) and the task stream.
        model: the network whose body and head shape to use (default a fresh ``SineNet``).

    Returns:
        The trained :class:`MultiTaskHeads` and a :class:`~metabp.training.History`.
    """
    positive_int("iterations", iterations)
    positive_int("batch_size", batch_size)
    positive_float("lr", lr)
    loss_fn = resolve_loss(loss)
    generator = seed_everything(seed)
    net = MultiTaskHeads(SineNet() if model is None else model, len(pool))
    opt = torch.optim.Adam(net.parameters(), lr=lr)

    def draw(gen: torch.Generator) -> Tensor:
        return torch.randint(len(pool), (batch_size,), generator=gen)

    def step(task: Tensor) -> Tensor:
        value = loss_fn(net(pool.x[task], task), pool.y[task])
        value.backward()
        return value

    history = fit(
        step,
        draw,
        iterations,
        opt,
        generator,
        learning_rates={"lr": lr},
        model=net,
        progress=progress,
        desc=desc,
        mininterval=1.0,
    )
    return net, history


def fit_from_scratch(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    steps: int = 500,
    lr: float = 1e-2,
    loss: str = "mse",
    seed: int = 0,
) -> dict[str, Tensor]:
    """Train a freshly initialised copy of ``model`` on each task's examples alone.

    The ordinary-learning baseline of few-shot learning: no prior experience, just
    the ``K`` examples of one task. All ``B`` tasks are trained at once, each with
    its own copy of the parameters (one initialisation drawn with ``seed`` and
    shared by all tasks), by Adam on the sum of the tasks' losses; Adam works
    element by element, so the tasks do not interact.

    Args:
        model: the architecture (its parameters are not used: a fresh init is drawn).
        x, y: the tasks' examples, ``(B, K, ...)``.
        steps: Adam steps.
        lr: Adam's learning rate.
        loss: 'mse' or 'cross_entropy'.
        seed: seeds the initialisation.

    Returns:
        The trained parameters, ``name -> (B, *shape)``; evaluate them with
        ``torch.func.vmap`` over :func:`metabp.bilevel.forward`.
    """
    from torch.func import vmap

    from .bilevel import forward

    positive_int("steps", steps)
    positive_float("lr", lr)
    loss_fn = resolve_loss(loss)
    fresh = copy.deepcopy(model)
    torch.manual_seed(seed)
    for module in fresh.modules():
        reset = getattr(module, "reset_parameters", None)
        if module is not fresh and reset is not None:
            reset()
    b = x.shape[0]
    params = {
        k: v.detach().unsqueeze(0).repeat(b, *([1] * v.dim())).requires_grad_() for k, v in fresh.named_parameters()
    }
    opt = torch.optim.Adam(params.values(), lr=lr)

    def one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return loss_fn(forward(fresh, p, xi), yi)

    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        vmap(one)(params, x, y).sum().backward()
        opt.step()
    return {k: v.detach() for k, v in params.items()}
