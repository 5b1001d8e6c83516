"""Figures the chapters share.

:func:`bilevel_diagram` draws the bilevel view of meta-learning by
backpropagation (the book's figure ``fig-bilevel``, introduced in the
background chapter): the meta-parameters feed one inner loop per task, each
inner loop adapts on its support set, the adapted parameters are scored on the
query set, and the meta-gradient flows back through the inner loops to the
meta-parameters.
"""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure, SubFigure
from matplotlib.patches import FancyBboxPatch

from .checks import positive_int

#: Colours of the diagram (outer level, inner level, data, meta-gradient, edges).
COLORS = {"outer": "#dbe9f6", "inner": "#fde9cf", "data": "#e4f2e1", "grad": "#c0392b", "edge": "#34495e"}


def _box(ax: Axes, x: float, y: float, w: float, h: float, text: str, color: str, fontsize: float = 9.5) -> None:
    ax.add_patch(
        FancyBboxPatch(
            (x - w / 2, y - h / 2),
            w,
            h,
            boxstyle="round,pad=0.02,rounding_size=0.08",
            facecolor=color,
            edgecolor=COLORS["edge"],
            linewidth=1.2,
        )
    )
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize)


def _arrow(ax: Axes, start: tuple[float, float], end: tuple[float, float], **style: Any) -> None:
    props = dict(arrowstyle="-|>", color=COLORS["edge"], lw=1.3, shrinkA=0, shrinkB=0)
    props.update(style)
    ax.annotate("", xy=end, xytext=start, arrowprops=props)


def bilevel_diagram(tasks: int = 2, ax: Axes | None = None) -> Figure | SubFigure:
    """Draw the bilevel loop of MAML-style meta-learning and return the figure.

    Args:
        tasks: how many task rows to draw (a row ``i`` shows support set, inner loop,
            adapted parameters theta'_i and query loss), with a note under the last
            row that every task of the meta-batch has such a row.
        ax: axes to draw on (a new 11 x 5.6 inch figure if ``None``).

    Returns:
        The figure holding the diagram (no axes frame, data coordinates 0..11 by 0..H).
    """
    positive_int("tasks", tasks)
    gap = 1.8
    rows = [-gap * i for i in range(tasks)]
    mid = (rows[0] + rows[-1]) / 2
    title_y = rows[0] + 1.55
    bottom = rows[-1] - 1.35
    fig: Figure | SubFigure
    if ax is None:
        fig, ax = plt.subplots(figsize=(11, 0.62 * (title_y - bottom + 1.2)))
    else:
        fig = ax.figure
    ax.set_xlim(0, 11)
    ax.set_ylim(bottom - 0.65, title_y + 0.35)
    ax.axis("off")

    # Shaded band: the inner level (one per task, run independently).
    ax.add_patch(
        FancyBboxPatch(
            (2.45, rows[-1] - 0.85),
            5.95,
            rows[0] - rows[-1] + 2.0,
            boxstyle="round,pad=0.02,rounding_size=0.15",
            facecolor="#fff8ee",
            edgecolor="#e0a458",
            linewidth=1.0,
            linestyle="--",
        )
    )
    ax.text(
        5.4,
        title_y,
        "inner level: adapt to each task on its support set",
        ha="center",
        va="center",
        fontsize=10.5,
        color="#a0522d",
    )
    ax.text(9.7, title_y, "outer level", ha="center", va="center", fontsize=10.5, color="#1f4e79")
    ax.text(1.0, title_y, "meta-learner", ha="center", va="center", fontsize=10.5, color="#1f4e79")

    _box(ax, 1.0, mid, 1.55, 1.0, "meta-parameters\n$\\theta$", COLORS["outer"], 10)
    _box(ax, 9.7, mid, 2.1, 1.2, "meta-loss\n$\\sum_i \\mathcal{L}_i^{\\mathrm{qry}}(\\theta_i')$", COLORS["outer"], 10)

    for i, y in enumerate(rows, start=1):
        _box(
            ax,
            4.05,
            y,
            2.7,
            0.8,
            f"inner loop: $\\theta_{i}' = \\theta - \\alpha\\nabla_\\theta"
            f"\\mathcal{{L}}_{i}^{{\\mathrm{{spt}}}}(\\theta)$",
            COLORS["inner"],
            9,
        )
        _box(ax, 4.05, y + 0.95, 1.8, 0.45, f"support set $D_{i}^{{\\mathrm{{spt}}}}$", COLORS["data"], 8.5)
        _box(ax, 6.25, y, 0.9, 0.6, f"$\\theta_{i}'$", COLORS["inner"], 10)
        _box(ax, 7.6, y, 1.3, 0.6, f"$\\mathcal{{L}}_{i}^{{\\mathrm{{qry}}}}(\\theta_{i}')$", COLORS["inner"], 9.5)
        _box(ax, 7.6, y + 0.95, 1.45, 0.45, f"query set $D_{i}^{{\\mathrm{{qry}}}}$", COLORS["data"], 8.5)
        _arrow(ax, (1.8, mid), (2.68, y))
        _arrow(ax, (4.05, y + 0.71), (4.05, y + 0.42))
        _arrow(ax, (5.42, y), (5.78, y))
        _arrow(ax, (6.72, y), (6.93, y))
        _arrow(ax, (7.6, y + 0.71), (7.6, y + 0.32))
        _arrow(ax, (8.27, y), (8.63, mid + (y - mid) * 0.3))
    ax.text(
        4.05,
        rows[-1] - 0.62,
        "(one inner loop for every task of the meta-batch)",
        ha="center",
        va="center",
        fontsize=8.5,
        color="#555555",
    )

    # The meta-gradient: back from the meta-loss, through every inner loop, to theta.
    ax.plot([9.7, 9.7], [mid - 0.62, bottom], color=COLORS["grad"], lw=2, ls="--")
    ax.plot([9.7, 1.0], [bottom, bottom], color=COLORS["grad"], lw=2, ls="--")
    _arrow(ax, (1.0, bottom), (1.0, mid - 0.53), color=COLORS["grad"], lw=2)
    ax.text(
        5.35,
        bottom - 0.38,
        "meta-gradient $\\nabla_\\theta \\sum_i \\mathcal{L}_i^{\\mathrm{qry}}(\\theta_i')$: "
        "backpropagation through every inner loop, then an update of $\\theta$",
        ha="center",
        va="center",
        fontsize=9.5,
        color=COLORS["grad"],
    )
    return fig
