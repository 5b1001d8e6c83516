"""Argument validation shared by the library: every bad value raises a
``ValueError`` that names the argument, its value and what is allowed."""

from __future__ import annotations

import math
from typing import Any


def positive_int(name: str, value: Any) -> int:
    """Return ``value`` if it is an integer >= 1, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer (>= 1), got {value!r}")
    return value


def nonnegative_int(name: str, value: Any) -> int:
    """Return ``value`` if it is an integer >= 0, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer (>= 0), got {value!r}")
    return value


def positive_float(name: str, value: Any) -> float:
    """Return ``float(value)`` if it is a finite number > 0, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def one_of(name: str, value: Any, allowed: tuple) -> Any:
    """Return ``value`` if it is one of ``allowed``, else raise ``ValueError``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def step_counts(name: str, value: Any) -> list[int]:
    """Return ``list(value)`` if it is a non-empty, non-decreasing list of integers >= 0
    (step counts at which to report a metric), else raise ``ValueError``."""
    steps = list(value)
    if not steps or any(not isinstance(s, int) or s < 0 for s in steps) or steps != sorted(steps):
        raise ValueError(f"{name} must be a non-empty, non-decreasing list of integers >= 0, got {steps!r}")
    return steps


class DivergenceError(FloatingPointError):
    """Training met a non-finite loss or gradient.

    Raised by the training loop at the first non-finite value, before the
    parameters are updated with it; the message names the learning rates in use
    so that the reader knows what to lower. The command line turns it into a
    one-line error (exit status 2) and keeps the last good checkpoint.
    """


def check_finite(loss: Any, grads: Any = None, **learning_rates: Any) -> None:
    """Raise :class:`DivergenceError` if ``loss`` or any tensor in ``grads`` is not finite.

    ``loss`` is a float or a tensor; ``grads`` an iterable of tensors (or a dict of
    them, or ``None``). ``learning_rates`` (for example ``inner_lr=0.4, meta_lr=1e-3``)
    are named in the message, since a step size that is too large is the usual cause.
    """
    import torch

    def finite(t: Any) -> bool:
        return bool(torch.isfinite(torch.as_tensor(t)).all())

    values = grads.values() if isinstance(grads, dict) else (grads or ())
    what = None
    if not finite(loss):
        what = f"the loss is {float(torch.as_tensor(loss).detach().reshape(-1)[0])}"
    elif not all(finite(g) for g in values if g is not None):
        what = "a gradient is not finite"
    if what is not None:
        rates = ", ".join(f"{k}={v:g}" for k, v in learning_rates.items())
        hint = f" with {rates}" if rates else ""
        raise DivergenceError(f"training diverged: {what}{hint}; lower the learning rate(s) and try again")
