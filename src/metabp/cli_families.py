"""Command line of ``train``/``evaluate`` for the sinusoid and navigation families, and
the distributed prelude every ``train`` command shares (:func:`~metabp.cli_families.job_prelude`).

Kept apart from :mod:`metabp.cli` so that the commands of one file stay short; the
option style is the same as ``train omniglot``: one option per configuration field,
``--out``, ``--resume``, ``--checkpoint-every``, ``--threads``, ``--no-progress``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import Field, fields, replace
from pathlib import Path
from typing import Any

from . import distributed
from .families import CONFIGS

HELP = {
    "sinusoid": "sinusoid regression (chapter 3's configuration by default)",
    "navigation": "meta-RL on MAML's 2D navigation (chapter 6.3's configuration by default)",
}
CHECKPOINT_EVERY = {"sinusoid": 1000, "navigation": 25}


def _field_type(f: Field[Any]) -> type:
    name = f.type if isinstance(f.type, str) else f.type.__name__
    return {"int": int, "float": float, "str": str, "bool": bool}[name]


def add_train_parsers(families: Any, parser_class: type) -> None:
    """``train sinusoid`` and ``train navigation``, with one option per configuration field."""
    for name, cls in CONFIGS.items():
        p = families.add_parser(name, help=HELP[name])
        p.add_argument("--out", required=True, type=Path, help="checkpoint file to write")
        p.add_argument("--resume", action="store_true", help="continue the run stored in --out")
        p.add_argument(
            "--checkpoint-every",
            type=int,
            default=CHECKPOINT_EVERY[name],
            metavar="N",
            help=f"write the checkpoint every N iterations (default {CHECKPOINT_EVERY[name]}) and at the end",
        )
        p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
        p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            kind = _field_type(f)
            if kind is bool:
                p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"default {f.default}")
            else:
                p.add_argument(flag, type=kind, default=None, metavar=f.name.upper(), help=f"default {f.default}")


def add_evaluate_parsers(families: Any) -> None:
    """``evaluate sinusoid`` (chapter 3's test) and ``evaluate navigation`` (MAML's 40 test goals)."""
    s = families.add_parser("sinusoid", help="query MSE after 0, 1, 10 steps on 1000 fresh sinusoids")
    s.add_argument("--checkpoint", required=True, type=Path)
    s.add_argument("--shots", type=int, default=5, help="support points per test task (default 5)")
    s.add_argument("--tasks", type=int, default=1000, help="test tasks (default 1000)")
    s.add_argument("--steps", default="0,1,10", help="comma-separated inner step counts (default 0,1,10)")
    s.add_argument("--seed", type=int, default=2017)
    s.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    n = families.add_parser("navigation", help="mean return after 0..k adaptation steps on MAML's 40 test goals")
    n.add_argument("--checkpoint", required=True, type=Path)
    n.add_argument(
        "--inner-lrs", default="0.1,0.05,0.05", help="step size of each adaptation step (default 0.1,0.05,0.05)"
    )
    n.add_argument("--trajectories", type=int, default=20, help="episodes per goal and step (default 20)")
    n.add_argument("--seed", type=int, default=0)
    n.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")


def job_prelude(args: argparse.Namespace, group: distributed.Group, decide: Callable[[bool], Any]) -> tuple[bool, Any]:
    """Rank 0 decides whether the run resumes and with which configuration; every rank gets its answer.

    ``--resume`` resumes; so does a run that torchrun restarted (``--max-restarts``)
    once a checkpoint exists. ``decide(resume)`` (rank 0 only: only it needs to see
    ``--out``) checks the files and returns the configuration to train, as a dict with a
    ``meta_batch_size``: every rank refuses one too small to share among the processes here, before
    training starts, so its one-line error is not appended to rank 0's progress bar.
    """
    answer = None
    if group.main:
        resume = bool(args.resume)
        if not resume and distributed.restart_count() > 0 and args.out.exists():
            print(f"torchrun restart {distributed.restart_count()}: resuming from {args.out}", file=sys.stderr)
            resume = True
        answer = (resume, decide(resume))
    decided: tuple[bool, Any] = group.broadcast(answer)
    group.share(decided[1]["meta_batch_size"])
    return decided


def _steps(text: str, name: str, kind: type) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name} must be a comma-separated list of {kind.__name__}s, got {text!r}") from None
    if not values:
        raise ValueError(f"{name} must name at least one value, got {text!r}")
    return values


def train(args: argparse.Namespace) -> int:
    """``train sinusoid|navigation`` (under torchrun or not)."""
    from .cli import _check_new_out, _check_out_folder
    from .families import train as train_family

    cls = CONFIGS[args.family]
    given = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name) is not None}
    config = replace(cls(), **given)  # checks the values on every rank
    group = distributed.init("cpu")
    try:

        def decide(resume: bool) -> dict:
            if resume:
                from .families import load_model

                _, stored, state = load_model(args.out, args.family)
                clash = {k: v for k, v in given.items() if getattr(stored, k) != v}
                if clash:
                    raise ValueError(
                        f"--resume continues the run in {args.out} with its own configuration; "
                        f"drop {', '.join('--' + k.replace('_', '-') for k in clash)}"
                    )
                print(f"resuming {args.out} at iteration {state['iteration']} of {stored.iterations}", file=sys.stderr)
                return stored.to_dict()
            _check_new_out(args.out, "pass --resume to continue it, or choose another --out")
            _check_out_folder(args.out)
            return config.to_dict()

        resume, stored = job_prelude(args, group, decide)
        config = cls.from_dict(stored)
        if group.distributed and group.main:
            print(f"{group.world} processes share each meta-batch of {config.meta_batch_size} tasks", file=sys.stderr)
        try:
            _, history = train_family(
                args.family, config, args.out, resume, args.checkpoint_every, args.progress, group
            )
        except KeyboardInterrupt:
            if group.main:
                print(f"interrupted; {args.out} holds the last checkpoint; continue with --resume", file=sys.stderr)
            return 1
    finally:
        distributed.shutdown()
    if group.main:
        if args.family == "sinusoid":
            tail = history.loss[-100:]
            what = f"final meta-loss {sum(tail) / len(tail):.4f}"
        else:
            tail = history.after[-10:]
            what = f"mean return after adaptation over the last {len(tail)} iterations {sum(tail) / len(tail):.2f}"
        print(
            f"trained {args.family} for {config.iterations} iterations in {history.seconds:.0f} s ({what}); "
            f"checkpoint: {args.out}"
        )
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """``evaluate sinusoid|navigation``."""
    from .families import SinusoidConfig, evaluate_navigation, evaluate_sinusoid, load_model

    model, config, _ = load_model(args.checkpoint, args.family)
    if isinstance(config, SinusoidConfig):  # load_model checked that it is args.family's
        steps = _steps(args.steps, "--steps", int)
        if any(s < 0 for s in steps) or steps != sorted(steps):
            raise ValueError(f"--steps must be non-decreasing integers >= 0, got {args.steps!r}")
        results = evaluate_sinusoid(model, config, args.shots, args.tasks, tuple(steps), args.seed)
        for s, (mean, half) in results.items():
            print(f"{s:3d} steps: query MSE {mean:.3f} +- {half:.3f} ({args.tasks} tasks, K = {args.shots})")
        return 0
    lrs = _steps(args.inner_lrs, "--inner-lrs", float)
    returns = evaluate_navigation(model, config, tuple(lrs), args.trajectories, args.seed)
    for k, (mean, half) in enumerate(returns):
        print(f"{k} steps: mean return {mean:.2f} +- {half:.2f} (40 goals, {args.trajectories} episodes each)")
    return 0
