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

from collections.abc import Callable
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


def loss(model: Embedder, batch: TaskBatch, embed: Embed | None = None) -> Tensor:
    """Mean query cross-entropy over the tasks of ``batch`` (tasks mapped with ``vmap``).

    Args:
        model: a network with an ``embed`` method (e.g. :class:`~metabp.convnet.Conv4`).
        batch: episodes with labels ``0 .. ways-1``.
        embed: the embedding function, default ``model.embed``.
    """
    check_task_batch(batch)
    embed = model.embed if embed is None else embed
    ways = _ways(batch)

    def one_task(x_spt: Tensor, y_spt: Tensor, x_qry: Tensor, y_qry: Tensor) -> Tensor:
        return F.cross_entropy(logits(embed, x_spt, y_spt, x_qry, ways), y_qry)

    return vmap(one_task)(*batch).mean()


def accuracy(model: Embedder, batch: TaskBatch, chunk_size: int | None = None) -> Tensor:
    """Query accuracy of every task, ``(B,)``, without gradients."""
    check_task_batch(batch)
    ways = _ways(batch)

    def one_task(x_spt: Tensor, y_spt: Tensor, x_qry: Tensor, y_qry: Tensor) -> Tensor:
        return (logits(model.embed, x_spt, y_spt, x_qry, ways).argmax(-1) == y_qry).float().mean()

    with torch.no_grad():
        return vmap(one_task, chunk_size=chunk_size)(*batch)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: TaskBatch) -> float:
    """One episode-batch update of the embedding; returns the loss before the update."""
    optimizer.zero_grad(set_to_none=True)
    value = loss(cast(Embedder, model), batch)  # a network with embed, as Conv4
    value.backward()
    optimizer.step()
    return float(value.item())
