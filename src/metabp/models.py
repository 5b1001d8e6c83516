"""Models the chapters meta-learn.

All are plain ``nn.Module`` objects; the bilevel core calls them functionally with
``torch.func.functional_call`` so that adapted parameters stay in the graph.
"""

from __future__ import annotations

import torch
from torch import nn

from .checks import positive_int


class MetaLearner(nn.Module):
    """The article's meta-learner: a two-layer MLP, ``Linear -> ReLU -> Linear``.

    Args:
        input_dim: features per example.
        hidden_dim: hidden units.
        output_dim: outputs (classes for classification, 1 for regression).
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int) -> None:
        super().__init__()
        positive_int("input_dim", input_dim)
        positive_int("hidden_dim", hidden_dim)
        positive_int("output_dim", output_dim)
        self.net = nn.Sequential(nn.Linear(input_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


class SineNet(nn.Module):
    """MAML's sinusoid regressor: 1-40-40-1 with ReLU (Finn et al., 2017, section 5.1).

    Args:
        hidden: width of both hidden layers (40 in the paper).
    """

    def __init__(self, hidden: int = 40) -> None:
        super().__init__()
        positive_int("hidden", hidden)
        self.net = nn.Sequential(
            nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out
