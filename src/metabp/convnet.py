"""MAML's convolutional network for Omniglot ("Conv4").

Four blocks of 3x3 convolution, batch normalisation and ReLU, each halving the
image (a stride-2 convolution, as MAML uses on Omniglot instead of max-pooling),
then the mean over the remaining pixels and a linear head (Finn et al., 2017,
section 5.2, after Vinyals et al., 2016). Batch normalisation keeps no running
statistics: it normalises with the statistics of the images it is given (the
support set while adapting, the query set when predicting), which is what MAML
does and what ``torch.func.vmap`` needs.

A caution about ``vmap``: this torch's batching rule for the batch-norm backward
is wrong (pytorch/functorch#534), so a *second-order* meta-gradient of a network
with ``nn.BatchNorm2d`` computed under ``vmap`` is wrong (chapter 7 measures by
how much), while the loop over tasks is exact (first-order meta-gradients are exact either
way). :func:`metabp.bilevel.meta_loss` refuses that combination;
:func:`vmap_safe` swaps in :class:`TaskBatchNorm2d`, the same normalisation
written with plain tensor operations, which ``vmap`` differentiates exactly.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .checks import positive_int


class TaskBatchNorm2d(nn.Module):
    """Batch normalisation without running statistics, from plain tensor operations.

    Computes what ``nn.BatchNorm2d(channels, eps, track_running_stats=False)`` computes
    in training mode, with the same parameter names (``weight``, ``bias``), so state
    dicts move between the two. Unlike the built-in kernel, its second derivatives
    are exact under ``torch.func.vmap``; on a CPU it is somewhat slower.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        positive_int("channels", channels)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"TaskBatchNorm2d expects (n, C, H, W) input, got shape {tuple(x.shape)}")
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        scale = self.weight[:, None, None] * torch.rsqrt(var + self.eps)
        return (x - mean) * scale + self.bias[:, None, None]


def vmap_safe(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``nn.BatchNorm2d`` that keeps no running
    statistics replaced by an equivalent :class:`TaskBatchNorm2d` (same values).

    Use it before a second-order meta-gradient with ``vectorize=True``.
    Batch norms that keep running statistics are refused: under ``vmap`` they would
    update shared buffers in place.
    """
    new = copy.deepcopy(model)
    for parent in new.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                if not isinstance(child, nn.BatchNorm2d) or child.track_running_stats or not child.affine:
                    raise ValueError(
                        f"vmap_safe handles nn.BatchNorm2d(affine=True, track_running_stats=False) only; "
                        f"{name!r} is {child!r}"
                    )
                swap = TaskBatchNorm2d(child.num_features, child.eps).to(child.weight)
                with torch.no_grad():
                    swap.weight.copy_(child.weight)
                    swap.bias.copy_(child.bias)
                setattr(parent, name, swap)
    return new


class Conv4(nn.Module):
    """Four conv blocks and a linear head.

    Args:
        ways: outputs of the head (classes per task).
        hidden: filters per convolution (64 in MAML).
        in_channels: image channels (1 for Omniglot).
        grid: the features are the means of the last feature map over ``grid x grid``
            regions (``torch.nn.functional.adaptive_avg_pool2d``), so
            ``hidden * grid**2`` numbers that keep where on the image a stroke is; 1
            (default) is the mean over the whole map. On 56-pixel drawings the last map
            is 4 x 4, so ``grid=4`` keeps all of it.

    ``forward(x)`` maps images ``(n, in_channels, H, W)`` to logits ``(n, ways)``;
    ``embed(x)`` gives the features ``(n, hidden)`` before the head (what ANIL keeps
    fixed while adapting, and what a prototypical network compares).
    Parameter names: ``features.*`` for the body, ``head.weight``/``head.bias``.
    """

    def __init__(self, ways: int = 5, hidden: int = 64, in_channels: int = 1, grid: int = 1) -> None:
        super().__init__()
        positive_int("ways", ways)
        positive_int("hidden", hidden)
        positive_int("in_channels", in_channels)
        positive_int("grid", grid)
        self.grid = grid
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(4):
            layers += [
                nn.Conv2d(channels, hidden, kernel_size=3, stride=2, padding=1),
                nn.BatchNorm2d(hidden, track_running_stats=False),
                nn.ReLU(),
            ]
            channels = hidden
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(hidden * grid * grid, ways)

    @property
    def ways(self) -> int:
        return self.head.out_features

    @property
    def hidden(self) -> int:
        """Filters per convolution."""
        return self.head.in_features // (self.grid * self.grid)

    def embed(self, x: Tensor) -> Tensor:
        """Features ``(n, hidden * grid**2)`` of images ``(n, C, H, W)``."""
        features: Tensor = self.features(x)
        if self.grid == 1:
            return features.mean(dim=(-2, -1))
        return nn.functional.adaptive_avg_pool2d(features, self.grid).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(self.embed(x))
        return out

    def with_ways(self, ways: int) -> Conv4:
        """A copy that classifies ``ways`` classes, for tasks of another width than training's.

        Labels are assigned to classes at random in every task, so the rows of a
        meta-learned head are interchangeable starting points. For fewer classes the
        copy keeps the first ``ways`` rows; for more, every row starts at the mean of
        the trained rows (and every bias at their mean), and the inner loop tells the
        classes apart. The body is copied unchanged.
        """
        positive_int("ways", ways)
        new = copy.deepcopy(self)
        with torch.no_grad():
            if ways <= self.ways:
                weight, bias = self.head.weight[:ways].clone(), self.head.bias[:ways].clone()
            else:
                weight = self.head.weight.mean(0, keepdim=True).expand(ways, -1).clone()
                bias = self.head.bias.mean().expand(ways).clone()
        new.head = nn.Linear(self.head.in_features, ways).to(weight.device)
        with torch.no_grad():
            new.head.weight.copy_(weight)
            new.head.bias.copy_(bias)
        return new
