"""Prototypical networks (Snell et al., 2017): few-shot learning without an inner loop.

A class is represented by its prototype, the mean embedding of its support
examples; a query is classified by a softmax over negative squared Euclidean
distances to the prototypes. Only the embedding is learned, by minimising the
query cross-entropy over many episodes, so no gradient flows through any
adaptation: the non-gradient baseline for the MAML family. Any number of ways
works at test time, because the classifier is built from the support set.

Support and query images of a task are embedded in one batch, so the network's
batch normalisation sees the whole episode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

from .tasks import TaskBatch, check_task_batch

Embed = Callable[[Tensor], Tensor]


class Embedder(Protocol):
    """A network with an ``embed`` method, inputs to feature vectors (e.g. :class:`~metabp.convnet.Conv4`)."""

    def embed(self, x: Tensor) -> Tensor: ...


def prototypes(z_spt: Tensor, y_spt: Tensor, ways: int) -> Tensor:
    """Class means ``(ways, d)`` of support embeddings ``z_spt (S, d)`` with labels ``y_spt (S,)``."""
    onehot = F.one_hot(y_spt, ways).to(z_spt.dtype)  # (S, ways)
    return (onehot.T @ z_spt) / onehot.sum(0).unsqueeze(1)


def logits(embed: Embed, x_spt: Tensor, y_spt: Tensor, x_qry: Tensor, ways: int) -> Tensor:
    """Negative squared distances ``(Q, ways)`` from each query to each prototype (one task)."""
    z = embed(torch.cat([x_spt, x_qry]))
    z_spt, z_qry = z[: x_spt.shape[0]], z[x_spt.shape[0] :]
    return -(z_qry.unsqueeze(1) - prototypes(z_spt, y_spt, ways).unsqueeze(0)).pow(2).sum(-1)


def _ways(batch: TaskBatch) -> int:
    return int(batch.y_spt.max()) + 1


def loss(model: Embedder, batch: TaskBatch, embed: Embed | None = None, vectorize: bool = True) -> Tensor:
    """Mean query cross-entropy over the tasks of ``batch``.

    Args:
        model: a network with an ``embed`` method (e.g. :class:`~metabp.convnet.Conv4`).
        batch: episodes with labels ``0 .. ways-1``.
        embed: the embedding function, default ``model.embed``.
        vectorize: map the tasks with ``vmap`` (default) or, with ``False``, loop over
            them in Python. Both compute the same loss (each task's batch normalisation
            sees its own episode); on a CPU the loop is the faster for a Conv4, by
            about 1.3 times on 28-pixel drawings and 2.4 times on 56-pixel ones
            (``benchmarks/protonet_loop.py``).
    """
    check_task_batch(batch)
    embed = model.embed if embed is None else embed
    ways = _ways(batch)

    def one_task(x_spt: Tensor, y_spt: Tensor, x_qry: Tensor, y_qry: Tensor) -> Tensor:
        return F.cross_entropy(logits(embed, x_spt, y_spt, x_qry, ways), y_qry)

    if not vectorize:
        return torch.stack([one_task(*task) for task in zip(*batch, strict=True)]).mean()
    return vmap(one_task)(*batch).mean()


def augmented_logits(
    model: Embedder,
    batch: TaskBatch,
    chunk_size: int | None = None,
    augment: int = 0,
    strength: float = 1.0,
    seed: int = 0,
) -> Tensor:
    """Negative squared distances ``(B, Q, ways)`` of every task's queries to its prototypes, without gradients.

    Args:
        model: a network with an ``embed`` method.
        batch: test episodes.
        chunk_size: tasks per ``vmap`` chunk.
        augment: test-time augmentation: every image is also embedded as ``augment``
            distorted copies (:func:`metabp.episodes.distort_images` at ``strength``), and
            its feature vector is the mean of the ``augment + 1`` embeddings; 0 (default)
            embeds each image once. Each copy of an episode is embedded as one batch, as the
            image itself is, so batch normalisation sees a whole episode every time.
        strength: strength (0 to 2) of the distortions.
        seed: seeds the distortions (drawn for the whole batch, copy by copy, support
            before query), so a result depends on the batch's tasks and their order.
    """
    from .checks import nonnegative_int
    from .episodes import check_strength, distort_images

    check_task_batch(batch)
    nonnegative_int("augment", augment)
    check_strength(strength)
    ways = _ways(batch)
    generator = torch.Generator().manual_seed(seed)
    copies_spt, copies_qry = [batch.x_spt], [batch.x_qry]
    for _ in range(augment):
        copies_spt.append(distort_images(batch.x_spt, strength, generator))
        copies_qry.append(distort_images(batch.x_qry, strength, generator))

    def mean_embed(x: Tensor) -> Tensor:
        # x (n, copies, C, H, W): each copy of the episode as one batch, then the mean over copies
        return torch.stack([model.embed(x[:, k]) for k in range(x.shape[1])]).mean(0)

    def one_task(x_spt: Tensor, y_spt: Tensor, x_qry: Tensor) -> Tensor:
        return logits(mean_embed, x_spt, y_spt, x_qry, ways)

    with torch.no_grad():
        x_spt, x_qry = torch.stack(copies_spt, 2), torch.stack(copies_qry, 2)  # (B, n, copies, C, H, W)
        return vmap(one_task, chunk_size=chunk_size)(x_spt, batch.y_spt, x_qry)


def accuracy(
    model: Embedder,
    batch: TaskBatch,
    chunk_size: int | None = None,
    augment: int = 0,
    strength: float = 1.0,
    seed: int = 0,
) -> Tensor:
    """Query accuracy of every task, ``(B,)``, without gradients: each query takes the label of
    the nearest prototype. Arguments as :func:`augmented_logits`."""
    scores = augmented_logits(model, batch, chunk_size, augment, strength, seed)
    return (scores.argmax(-1) == batch.y_qry).float().mean(-1)


def ensemble_accuracy(
    models: Sequence[Embedder],
    batch: TaskBatch,
    chunk_size: int | None = None,
    augment: int = 0,
    strength: float = 1.0,
    seed: int = 0,
) -> Tensor:
    """Query accuracy ``(B,)`` of several prototype learners voting together.

    Each learner's squared distances in a task (:func:`augmented_logits`, every learner
    with the same distorted copies) are divided by their mean over the task's queries and
    prototypes, so that each learner weighs the same whatever the scale of its features;
    a query takes the label whose distances, summed over the learners, are smallest. With
    one learner this is :func:`accuracy`.
    """
    if isinstance(models, nn.Module) or len(models) == 0:
        raise ValueError("models must be a non-empty sequence of networks with an embed method")
    total = None
    for model in models:
        scores = augmented_logits(model, batch, chunk_size, augment, strength, seed)
        scores = scores / (-scores).mean(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)
        total = scores if total is None else total + scores
    assert total is not None  # models is not empty
    return (total.argmax(-1) == batch.y_qry).float().mean(-1)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: TaskBatch) -> float:
    """One episode-batch update of the embedding; returns the loss before the update."""
    optimizer.zero_grad(set_to_none=True)
    value = loss(cast(Embedder, model), batch)  # a network with embed, as Conv4
    value.backward()
    optimizer.step()
    return float(value.item())
