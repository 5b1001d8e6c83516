"""Domain shift and transfer learning for few-shot classification (chapter 6.2).

Three pieces that the domain-adaptation chapter puts beside MAML and prototypical
networks:

* the target domains live with the data: :func:`metabp.digits.load_digits`
  (scikit-learn's bundled 8x8 handwritten digits, a domain that a learner
  meta-trained on Omniglot characters has never seen) and
  :func:`metabp.episodes.rotate` (the same classes turned by any angle, a shift
  whose size is a knob);
* the transfer-learning baseline: :func:`pretrain_classifier` trains one Conv4 as an
  ordinary classifier over every background class at once, and :func:`with_new_head`
  gives it (or a freshly initialised network, for training from scratch) an
  all-zero head for the few classes of a test task, whose weights are then fitted by
  plain gradient descent on the support set (:func:`linear_probe_accuracy` fits the
  head alone on frozen features, :func:`fine_tune_accuracy` every layer, and from
  scratch when no pretrained network is given).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import checkpoint
from .bilevel import InnerLoop
from .checks import positive_float, positive_int, step_counts
from .convnet import Conv4
from .episodes import ImageClasses, _to_float
from .tasks import TaskBatch
from .training import History, fit, seed_everything


def pretrain_classifier(
    classes: ImageClasses,
    hidden: int = 32,
    iterations: int = 1000,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
    cosine: bool = True,
) -> tuple[Conv4, History]:
    """Transfer learning's starting point: one Conv4 trained to tell *all* ``classes`` apart.

    Ordinary supervised training with Adam on random mini-batches of drawings, labels
    the class indices; no tasks, no inner loop. Batch norm sees each mini-batch's
    statistics, as it does in every other learner of the book. With ``cosine`` the
    learning rate decays to zero along a cosine, as in the few-shot meta-training.

    Returns:
        The network (its head has ``len(classes)`` outputs) and the loss history.
    """
    positive_int("hidden", hidden)
    positive_int("iterations", iterations)
    positive_int("batch_size", batch_size)
    positive_float("lr", lr)
    generator = seed_everything(seed)
    model = Conv4(len(classes), hidden)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iterations) if cosine else None
    c, m = len(classes), classes.drawings

    def draw(gen: torch.Generator) -> tuple[Tensor, Tensor]:
        label = torch.randint(c, (batch_size,), generator=gen)
        drawing = torch.randint(m, (batch_size,), generator=gen)
        return label, drawing

    def step(batch: tuple[Tensor, Tensor]) -> Tensor:
        label, drawing = batch
        loss = F.cross_entropy(model(_to_float(classes.images[label, drawing])), label)
        loss.backward()
        return loss

    history = fit(
        step,
        draw,
        iterations,
        opt,
        generator,
        schedule,
        learning_rates={"lr": lr},
        model=model,
        progress=progress,
        desc="pretraining",
    )
    return model, history


def save_classifier(path: Path | str, model: Conv4, history: History, settings: dict) -> None:
    """Write a pretrained classifier, its loss history and the settings that made it, atomically."""
    checkpoint.save(
        path,
        {
            "kind": "classifier",
            "settings": dict(settings),
            "ways": model.ways,
            "hidden": model.hidden,
            "model": model.state_dict(),
            "loss": list(history.loss),
            "seconds": history.seconds,
        },
    )


def load_classifier(path: Path | str) -> tuple[Conv4, dict]:
    """Read what :func:`save_classifier` wrote: the network and the whole stored state."""
    state = checkpoint.load(path)
    if state.get("kind") != "classifier":
        raise checkpoint.CheckpointError(
            f"{path} is not a pretrained classifier (write one with: python -m metabp pretrain omniglot --out PATH)"
        )
    model = Conv4(state["ways"], state["hidden"])
    model.load_state_dict(state["model"])
    return model, state


def with_new_head(model: Conv4 | None, ways: int, hidden: int = 32, seed: int = 0) -> Conv4:
    """A Conv4 for ``ways`` classes with an all-zero head.

    With a ``model``, its body is copied (fine-tuning a pretrained network); with
    ``None``, the body is freshly initialised from ``seed`` with ``hidden`` filters
    (training from scratch). A zero head predicts every class with the same
    probability, so nothing about the order of a task's labels is assumed.
    """
    positive_int("ways", ways)
    if model is None:
        torch.manual_seed(seed)
        new = Conv4(ways, hidden)
    else:
        if not isinstance(model, Conv4):
            raise ValueError(f"model must be a Conv4 or None, got {type(model).__name__}")
        new = copy.deepcopy(model)
        new.head = nn.Linear(model.hidden, ways).to(model.head.weight)
    with torch.no_grad():
        new.head.weight.zero_()
        new.head.bias.zero_()
    return new


def fine_tune_accuracy(
    model: Conv4 | None,
    batch: TaskBatch,
    lr: float,
    steps: Sequence[int],
    hidden: int = 32,
    seed: int = 0,
    head: str = "zero",
) -> Tensor:
    """Query accuracy ``(len(steps), B)`` after training every parameter on each task's support set.

    Each task starts from :func:`with_new_head` of ``model``: with a pretrained
    network this is fine-tuning the whole of it; with ``None`` it is training a
    freshly initialised Conv4 (``hidden`` filters, the same initialisation for every
    task) from scratch. With ``head="keep"`` the model's own head is kept (narrowed
    or widened by :meth:`~metabp.convnet.Conv4.with_ways`), which makes this MAML's
    test-time adaptation of a meta-learned initialisation: the same numbers as
    :func:`metabp.fewshot.accuracy`. Either way this is the core's evaluation,
    :func:`metabp.evaluation.adaptation_curve` with plain full-batch gradient steps
    of size ``lr`` on the support loss (``steps`` are the step counts reported), on
    its loop path: tasks one after another, which on a CPU is faster than ``vmap``'s
    grouped convolutions.
    """
    from .evaluation import adaptation_curve

    positive_float("lr", lr)
    steps = step_counts("steps", steps)
    ways = int(batch.y_spt.max()) + 1
    if head == "keep":
        if not isinstance(model, Conv4):
            raise ValueError(f"head='keep' needs a Conv4 model, got {type(model).__name__}")
        start = model.with_ways(ways) if ways != model.ways else copy.deepcopy(model)
    elif head == "zero":
        start = with_new_head(model, ways, hidden, seed)
    else:
        raise ValueError(f"head must be 'zero' or 'keep', got {head!r}")
    inner = InnerLoop("cross_entropy", lr, first_order=True)
    return adaptation_curve(start, batch, inner, steps, "accuracy", vectorize=False)


@torch.no_grad()
def embed_tasks(model: Conv4, batch: TaskBatch) -> tuple[Tensor, Tensor]:
    """The body's features of every task's support and query images, ``(B, N*K, hidden)``
    and ``(B, N*Q, hidden)``; batch norm normalises each set with its own statistics,
    as during adaptation."""
    spt = torch.stack([model.embed(x) for x in batch.x_spt])
    qry = torch.stack([model.embed(x) for x in batch.x_qry])
    return spt, qry


def linear_probe_accuracy(model: Conv4, batch: TaskBatch, lr: float, steps: Sequence[int]) -> Tensor:
    """Query accuracy ``(len(steps), B)`` of a new linear head fitted on frozen features.

    The transfer-learning baseline of Chen et al. (2019, "Baseline"): the pretrained
    body is kept fixed, and for each task a softmax classifier, started at zero, is
    fitted to the support set's features by full-batch gradient descent with step
    ``lr``; ``steps`` are the step counts reported. All tasks are fitted at once
    (their heads are independent), which makes this baseline cheap.
    """
    positive_float("lr", lr)
    steps = step_counts("steps", steps)
    z_spt, z_qry = embed_tasks(model, batch)
    ways = int(batch.y_spt.max()) + 1
    b, _, h = z_spt.shape
    weight = torch.zeros(b, ways, h, requires_grad=True)
    bias = torch.zeros(b, ways, requires_grad=True)

    def logits(z: Tensor) -> Tensor:
        return torch.einsum("bnh,bwh->bnw", z, weight) + bias.unsqueeze(1)

    out, done = [], 0
    for k in steps:
        for _ in range(k - done):
            # summed over tasks, so each head receives its own task's gradient
            loss = (
                F.cross_entropy(logits(z_spt).flatten(0, 1), batch.y_spt.flatten(), reduction="sum")
                / batch.y_spt.shape[1]
            )
            gw, gb = torch.autograd.grad(loss, (weight, bias))
            with torch.no_grad():
                weight -= lr * gw
                bias -= lr * gb
        done = k
        with torch.no_grad():
            out.append((logits(z_qry).argmax(-1) == batch.y_qry).float().mean(1))
    return torch.stack(out)
