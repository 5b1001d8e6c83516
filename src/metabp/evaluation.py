"""Evaluation: adapt to held-out tasks and report mean and 95% confidence interval."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.func import vmap

from .bilevel import (
    VECTORIZE,
    InnerLoop,
    Params,
    TaskBatch,
    _input_error,
    check_meta_batch,
    forward,
    get_params,
    has_learned_lrs,
    inner_step,
)
from .checks import step_counts

METRICS = ("loss", "accuracy")
Setting = TypeVar("Setting", bound=Hashable)


def mean_ci(values: Tensor | Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the normal-approximation confidence interval.

    ``half = z * std / sqrt(n)`` with ``z = 1.96`` for 95%. Returns ``(mean, half)``.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    if v.numel() < 2:
        raise ValueError(f"values must hold at least 2 numbers for an interval, got {v.numel()}")
    if not torch.isfinite(v).all():
        bad = v[~torch.isfinite(v)][:3].tolist()
        raise ValueError(
            f"values must all be finite numbers, got {int((~torch.isfinite(v)).sum())} that are not (for example {bad})"
        )
    z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.5 + confidence / 2, dtype=torch.float64))
    return v.mean().item(), (z * v.std(unbiased=True) / math.sqrt(v.numel())).item()


def _score(model: nn.Module, params: Params, x: Tensor, y: Tensor, inner: InnerLoop, metric: str) -> Tensor:
    out = forward(model, params, x)
    if metric == "accuracy":
        return (out.argmax(-1) == y).float().mean()
    return inner.loss_fn(out, y)


def adaptation_curve(
    model: nn.Module,
    batch: TaskBatch,
    inner: InnerLoop,
    steps: Sequence[int],
    metric: str = "loss",
    params: Params | None = None,
    lrs: Mapping[str, Tensor] | None = None,
    chunk_size: int | None = None,
    vectorize: bool = VECTORIZE,
) -> Tensor:
    """Query metric of every task after each number of inner steps in ``steps``.

    MAML-style test-time adaptation: :func:`~metabp.bilevel.inner_step` on each
    task's support set (first order: nothing is differentiated afterwards), scored
    on its query set.

    Args:
        model: the network (evaluated at ``params``, default its own parameters).
        batch: held-out tasks, ``B`` of them.
        inner: inner-loop settings (its ``inner_steps`` is ignored: ``steps`` rules).
        steps: non-decreasing step counts to report, e.g. ``[0, 1, 5, 10]``.
        metric: 'loss' (the inner loss on the query set) or 'accuracy'.
        lrs: Meta-SGD's learned step sizes; required for a model that
            :func:`~metabp.bilevel.init_lrs` made step sizes for (evaluating it with
            the scalar ``inner.inner_lr`` would be a silent mistake).
        chunk_size: tasks per ``vmap`` chunk, to bound memory.
        vectorize: one ``vmap`` over tasks (True) or a Python loop over them (False),
            which runs any model (dropout, for instance) and on a CPU is faster for
            convolutional networks.

    Returns:
        Tensor of shape ``(len(steps), B)``.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    steps = step_counts("steps", steps)
    if lrs is None and has_learned_lrs(model):
        raise ValueError(
            "lrs: this model was meta-trained with learned step sizes (init_lrs, Meta-SGD); "
            "pass them as lrs=..., or evaluate copy.deepcopy(model) to use inner.inner_lr"
        )
    params = {k: v.detach() for k, v in (get_params(model) if params is None else params).items()}
    lrs = None if lrs is None else {k: v.detach() for k, v in lrs.items()}
    eval_inner = InnerLoop(inner.loss, inner.inner_lr, inner.inner_steps, True, inner.adapt_only)
    # the second-order vmap guard does not apply: nothing is differentiated afterwards
    check_meta_batch(model, params, batch, eval_inner, vectorize, lrs)

    def one_task(x_spt: Tensor, y_spt: Tensor, x_qry: Tensor, y_qry: Tensor) -> Tensor:
        p, done, out = params, 0, []
        for s in steps:
            for _ in range(s - done):
                p = inner_step(model, p, x_spt, y_spt, eval_inner, lrs)
            done = s
            out.append(_score(model, p, x_qry, y_qry, inner, metric))
        return torch.stack(out)

    try:
        with torch.no_grad():
            if vectorize:
                return vmap(one_task, chunk_size=chunk_size)(*batch).T.contiguous()
            return torch.stack([one_task(*task) for task in zip(*batch, strict=True)], 1)
    except RuntimeError as error:
        better = _input_error(error, batch)
        if better is None:
            raise
        raise better from error


def evaluate(
    model: nn.Module,
    batch: TaskBatch,
    inner: InnerLoop,
    steps: Sequence[int],
    metric: str = "loss",
    **kwargs: Any,
) -> dict[int, tuple[float, float]]:
    """``{steps: (mean, 95% half-width)}`` of the query metric over the tasks in ``batch``."""
    curve = adaptation_curve(model, batch, inner, steps, metric, **kwargs)
    return {s: mean_ci(curve[i]) for i, s in enumerate(steps)}


def best_setting(
    scores: Mapping[Setting, Tensor], steps: Sequence[int], maximize: bool = True, at: int | None = None
) -> tuple[Setting, int]:
    """Choose a setting (a step size, say) and a number of steps on validation tasks.

    Args:
        scores: ``setting -> (len(steps),)`` mean validation metric after each step
            count in ``steps`` (a row of :func:`adaptation_curve`'s means).
        steps: the step counts of the rows.
        maximize: True for accuracy, False for a loss.
        at: compare the rows after this many steps only (one of ``steps``); ``None``
            compares every entry and also chooses the step count.

    Returns:
        ``(setting, step count)`` with the best score; the first in ``scores``' order
        on a tie. Settings whose row holds a non-finite value (they diverged) are skipped.
    """
    steps = step_counts("steps", steps)
    if at is not None and at not in steps:
        raise ValueError(f"at must be one of steps {steps}, got {at!r}")
    best = None
    for setting, row in scores.items():
        row = torch.as_tensor(row)
        if row.shape != (len(steps),):
            raise ValueError(
                f"scores[{setting!r}] must have one value per step count ({len(steps)}), got shape {tuple(row.shape)}"
            )
        if not torch.isfinite(row).all():
            continue
        signed = row if maximize else -row
        index = steps.index(at) if at is not None else int(signed.argmax())
        value = signed[index].item()
        if best is None or value > best[0]:
            best = (value, setting, steps[index])
    if best is None:
        raise ValueError("scores: every setting diverged (a non-finite score); try smaller step sizes")
    return best[1], best[2]


#: How the benchmark scripts record a run made without ``ATEN_CPU_CAPABILITY`` set.
NATIVE_KERNELS = "(unset: native)"


def is_native(record: Mapping[str, Any]) -> bool:
    """Whether a benchmark record was computed on the machine's native kernel path.

    The seed benchmarks (``benchmarks/*_seeds.py``) store ``ATEN_CPU_CAPABILITY`` in every
    record, ``"(unset: native)"`` when it was not set; a record without the field is native.
    """
    return str(record.get("ATEN_CPU_CAPABILITY", NATIVE_KERNELS)).startswith("(unset")


def seed_records(path: Path | str, native_only: bool = True) -> list[dict[str, Any]]:
    """The JSON lines of a committed seed benchmark's result file, sorted by ``seed``.

    Args:
        path: a ``.jsonl`` file, one JSON object with a ``seed`` per line (blank lines skipped).
        native_only: keep only the records of the native kernel path (:func:`is_native`);
            the files also hold reruns with ``ATEN_CPU_CAPABILITY=default`` that check portability.

    Raises:
        ValueError: a line is not a JSON object with an integer ``seed``, naming the file and line.
    """
    import json

    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as problem:
            raise ValueError(f"{path}, line {number}: not JSON ({problem.msg})") from None
        if (
            not isinstance(record, dict)
            or isinstance(record.get("seed"), bool)
            or not isinstance(record.get("seed"), int)
        ):
            raise ValueError(f"{path}, line {number}: expected a JSON object with an integer 'seed'")
        records.append(record)
    return sorted((r for r in records if is_native(r) or not native_only), key=lambda r: r["seed"])
