"""The command line: ``python -m metabp <command> ...``.

Commands:

* ``train omniglot --out CHECKPOINT``: meta-train a few-shot learner on Omniglot
  (the chapter's configuration by default, the MAML paper's with ``--preset``),
  with a progress bar, atomic checkpoints and ``--resume``.
* ``train sinusoid|navigation --out CHECKPOINT``: chapters 3's and 6.3's runs, in
  the same style (:mod:`metabp.cli_families`). Every ``train`` also runs under
  ``torchrun --nproc_per_node N -m metabp train ...``, each meta-batch shared by
  the processes (:mod:`metabp.distributed`).
* ``pretrain omniglot --out CHECKPOINT``: chapter 6.2's transfer-learning baseline,
  one ordinary classifier over every background class (no tasks, no inner loop).
* ``evaluate omniglot --checkpoint CHECKPOINT``: accuracy and 95% interval on
  the held-out alphabets (``evaluate sinusoid|navigation`` for the others).
* ``evaluate-runs --checkpoint CHECKPOINT [--runs FOLDER]``: error on Lake et
  al.'s 20 official one-shot runs, or on runs in their layout (``make-runs``); the
  last line is ``error_percent: X``. It takes every checkpoint the command line
  writes: MAML, first-order MAML and ANIL adapt by gradient steps, prototypical
  networks compare with prototypes, and a ``pretrain`` classifier is scored by
  nearest prototype on its features (its body's embedding, as a prototypical
  network's; no fine-tuning, so nothing to tune). ``--augment COPIES`` averages
  the features of the latter two over each image and COPIES distorted copies of it.
* ``make-runs [--background small1] [--seed S] [--out FOLDER]``: 20 seeded
  within-alphabet 20-way 1-shot runs built as Lake et al. built theirs, from the
  alphabets the background set holds out, in the official layout
  (:func:`metabp.omniglot_runs.make_lake_runs`); without ``--out`` they go to the
  cache folder and are reused.
* ``bench [sinusoid] [omniglot]``: the same MAML meta-step with this library,
  learn2learn, higher, TorchOpt and the article's listing, checked and timed
  (:mod:`metabp.bench`); one ``CONFIG ratio_vs_learn2learn: X ratio_vs_floor: Y``
  line per configuration; with ``--processes N``, one process against N sharing
  the meta-batch (:mod:`metabp.scaling`).

Every failure the user can fix (bad option, missing file, wrong layout, a run that
diverged) ends with one line on stderr and exit status 2 (1 for an interrupted run,
Ctrl-C), not a traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from .checkpoint import CheckpointError
from .checks import DivergenceError
from .convnet import Conv4
from .data import DataError
from .distributed import PeerError
from .fewshot import ALGORITHMS, FewShotConfig
from .tasks import TaskBatch

#: Named configurations. 'chapter' is what chapter 6.1 trains. The paper presets are
#: MAML's Omniglot settings (Finn et al., 2017, section 5.2 and appendix A.1: 64 filters,
#: one inner step of 0.4 with 32 tasks per update for 5-way, five steps of 0.1 with 16
#: tasks for 20-way, Adam at 1e-3, 60,000 meta-updates), for GPU users, on the full
#: background set (MAML itself drew its 1200 training characters from all 50 alphabets).
PRESETS: dict[str, FewShotConfig] = {
    "chapter": FewShotConfig(),
    "maml-paper-5way": FewShotConfig(
        background="full",
        ways=5,
        shots=1,
        queries=1,
        hidden=64,
        inner_lr=0.4,
        inner_steps=1,
        meta_batch_size=32,
        meta_lr=1e-3,
        iterations=60000,
        cosine=False,
    ),
    "maml-paper-20way": FewShotConfig(
        background="full",
        ways=20,
        shots=1,
        queries=1,
        hidden=64,
        inner_lr=0.1,
        inner_steps=5,
        meta_batch_size=16,
        meta_lr=1e-3,
        iterations=60000,
        cosine=False,
    ),
}


#: ``evaluate --tasks`` at most, and the episodes built at once (the rest follow in chunks
#: of this many, drawn from the same generator: up to EVAL_CHUNK tasks, as one batch).
MAX_TASKS = 100_000
EVAL_CHUNK = 1000


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit status 2), and a negative
    number in scientific notation (``--meta-lr -1e-3``) is a value, not an option."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _seed(text: str) -> int:
    """argparse type of ``--seed``: an integer from 0 to 2**64 - 1 (what torch's generators take)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 2**64 - 1, got {text!r}")
    return value


def _add_config_options(p: argparse.ArgumentParser) -> None:
    """One option per :class:`FewShotConfig` field; unset options keep the preset's value."""
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="chapter",
        help="named configuration to start from (default: chapter)",
    )
    help_text = {
        "algorithm": f"one of {', '.join(ALGORITHMS)}",
        "background": "Omniglot background split: small1, small2 (minimal sets) or full",
        "queries": "query drawings per class in training episodes",
        "hidden": "filters per convolution",
        "iterations": "meta-updates in total",
        "cosine": "decay the meta learning rate along a cosine",
        "same_alphabet": "draw all ways of a training task from one alphabet (Lake et al.'s within-alphabet tasks)",
        "distort": "strength (0 to 2) of small random affine distortions of the training drawings (default 0)",
        "image_size": "side of the drawings in pixels, 8 to 105 (default 28); also what evaluation uses",
        "mirrors": "add each training character's mirror image as a character of its own (default: off)",
        "grid": "features: means of the last feature map over GRID x GRID regions (default 1: the whole map)",
    }
    for f in fields(FewShotConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text.get(f.name))
        elif f.name == "seed":
            p.add_argument(flag, type=_seed, default=None, metavar="SEED", help=help_text.get(f.name))
        else:
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            p.add_argument(flag, type=kind, default=None, metavar=f.name.upper(), help=help_text.get(f.name))


def _config_from(args: argparse.Namespace) -> tuple[FewShotConfig, dict]:
    given = {f.name: getattr(args, f.name) for f in fields(FewShotConfig) if getattr(args, f.name) is not None}
    return replace(PRESETS[args.preset], **given), given


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m metabp", description="metabp: meta-learning by backpropagation")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="meta-train a learner on a task family")
    families = train.add_subparsers(dest="family", required=True, parser_class=_Parser)
    om = families.add_parser("omniglot", help="few-shot classification on Omniglot (chapter 6.1)")
    om.add_argument("--out", required=True, type=Path, help="checkpoint file to write")
    om.add_argument("--resume", action="store_true", help="continue the run stored in --out")
    om.add_argument(
        "--checkpoint-every",
        type=int,
        default=250,
        metavar="N",
        help="write the checkpoint every N iterations (default 250) and at the end",
    )
    _add_common(om)
    _add_config_options(om)
    from .cli_families import add_evaluate_parsers, add_train_parsers

    add_train_parsers(families, _Parser)

    pre = commands.add_parser("pretrain", help="train an ordinary classifier for transfer learning")
    pre_families = pre.add_subparsers(dest="family", required=True, parser_class=_Parser)
    preo = pre_families.add_parser("omniglot", help="one classifier over all background classes (chapter 6.2)")
    preo.add_argument("--out", required=True, type=Path, help="file to write")
    preo.add_argument("--background", default="small1", help="Omniglot background split: small1, small2 or full")
    preo.add_argument("--hidden", type=int, default=32, help="filters per convolution (default 32)")
    preo.add_argument("--iterations", type=int, default=20000, help="updates (default 20000)")
    preo.add_argument("--batch-size", type=int, default=64, help="drawings per update (default 64)")
    preo.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate (default 1e-3, cosine-decayed)")
    preo.add_argument("--seed", type=_seed, default=0)
    preo.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    preo.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

    ev = commands.add_parser("evaluate", help="evaluate a checkpoint on held-out tasks")
    ev_families = ev.add_subparsers(dest="family", required=True, parser_class=_Parser)
    evo = ev_families.add_parser("omniglot", help="N-way K-shot accuracy on the held-out alphabets")
    evo.add_argument("--checkpoint", required=True, type=Path)
    evo.add_argument("--ways", type=int, default=5)
    evo.add_argument("--shots", type=int, default=1)
    evo.add_argument("--queries", type=int, default=5, help="query drawings per class (default 5)")
    evo.add_argument(
        "--tasks",
        type=int,
        default=600,
        help=f"test episodes, 2 to {MAX_TASKS} (default 600; built {EVAL_CHUNK} at a time)",
    )
    evo.add_argument("--seed", type=_seed, default=0)
    _add_adaptation(evo)
    _add_common(evo)
    add_evaluate_parsers(ev_families)

    runs = commands.add_parser(
        "evaluate-runs", help="error on Lake et al.'s 20 official one-shot runs (or runs from make-runs)"
    )
    runs.add_argument(
        "--checkpoint", required=True, type=Path, help="written by train omniglot (any algorithm) or pretrain omniglot"
    )
    runs.add_argument(
        "--runs", type=Path, default=None, help="folder holding run01 .. run20 (default: download all_runs.zip)"
    )
    _add_adaptation(runs)
    runs.add_argument(
        "--augment",
        type=int,
        default=0,
        metavar="COPIES",
        help="test-time augmentation for learners scored by nearest prototype (protonet, pretrain omniglot): "
        "average each image's features over it and COPIES distorted copies (default 0: none)",
    )
    runs.add_argument("--strength", type=float, default=1.0, help="strength (0 to 2) of those distortions (default 1)")
    _add_common(runs)

    make = commands.add_parser(
        "make-runs", help="20 seeded within-alphabet 20-way 1-shot runs in the official runs' layout"
    )
    make.add_argument(
        "--background",
        default="small1",
        help="the background set meta-training used: runs come from the alphabets it holds out "
        "(small1: Japanese (katakana) and Sanskrit of small2; default small1)",
    )
    make.add_argument("--seed", type=_seed, default=0, help="seeds every choice (default 0)")
    make.add_argument(
        "--out", type=Path, default=None, help="new folder to write (default: $METABP_CACHE/omniglot/lake_runs/...)"
    )

    from .bench import CONFIGS, IMPLS

    bench = commands.add_parser("bench", help="time one MAML meta-step across implementations")
    bench.add_argument(
        "configs",
        nargs="*",
        metavar="CONFIG",
        help=f"configurations to run, of {', '.join(CONFIGS)} (default: sinusoid and omniglot; "
        "with --processes: omniglot-chapter, the Conv4 chapter 6.1 trains)",
    )
    bench.add_argument(
        "--meta-batch-size",
        type=int,
        default=None,
        metavar="B",
        help="tasks per meta-step (default: 25 sinusoid, 16 omniglot, 8 omniglot-chapter)",
    )
    bench.add_argument("--inner-steps", type=int, default=1, metavar="K", help="inner steps (default 1)")
    bench.add_argument("--first-order", action="store_true", help="first-order MAML (default: second order)")
    bench.add_argument(
        "--width",
        type=int,
        default=None,
        help="hidden units (sinusoid, default 40) or filters (omniglot 64, omniglot-chapter 32)",
    )
    bench.add_argument(
        "--repeats",
        type=int,
        default=None,
        metavar="N",
        help="timed rounds (default: 30 sinusoid, 5 omniglot and omniglot-chapter)",
    )
    bench.add_argument("--warmup", type=int, default=2, metavar="N", help="untimed calls first (default 2)")
    bench.add_argument(
        "--impls", default=None, metavar="NAMES", help="comma-separated subset of: " + ", ".join(i.name for i in IMPLS)
    )
    bench.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="time torch.compile (auto: sinusoid only; it takes minutes on the Conv4)",
    )
    bench.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory pass")
    bench.add_argument("--seed", type=_seed, default=0)
    bench.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    bench.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    bench.add_argument(
        "--processes",
        type=int,
        default=None,
        metavar="N",
        help="instead: time one sharded meta-step with N processes x --threads threads each (gloo) "
        "against one process with N x threads threads (metabp.scaling)",
    )
    return parser


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _add_adaptation(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--steps", type=int, default=None, help="inner steps at test time (default: 3, or training's if more)"
    )
    p.add_argument("--inner-lr", type=float, default=None, help="inner step size at test time (default: training's)")


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be cpu or cuda[:index], got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:index], got {name!r}")
    return device


def _train(args: argparse.Namespace) -> int:
    from . import distributed
    from .cli_families import job_prelude
    from .fewshot import train
    from .omniglot import load_split

    config, given = _config_from(args)
    device = _device(args.device)
    group = distributed.init(device)
    try:

        def decide(resume: bool) -> dict:
            _check_out_folder(args.out)
            if resume:
                from .fewshot import load_model

                _, stored, state = load_model(args.out)
                clash = {k: v for k, v in given.items() if getattr(stored, k) != v}
                if clash or args.preset != "chapter":
                    raise ValueError(
                        f"--resume continues the run in {args.out} with its own configuration; "
                        f"drop {', '.join('--' + k.replace('_', '-') for k in clash) or '--preset'}"
                    )
                _check_resumable(args.out, state, stored)
                print(f"resuming {args.out} at iteration {state['iteration']} of {stored.iterations}", file=sys.stderr)
                return stored.to_dict()
            _check_new_out(args.out, "pass --resume to continue it, or choose another --out")
            return config.to_dict()

        resume, stored = job_prelude(args, group, decide)
        config = FewShotConfig.from_dict(stored)
        if not group.main:
            group.barrier()  # rank 0 fetches the data first
        classes = load_split(config.background, "train", size=config.image_size)
        if group.main:
            group.barrier()
        try:
            model, history = train(
                config, classes, args.out, resume, args.checkpoint_every, group.device, args.progress, group=group
            )
        except KeyboardInterrupt:
            if group.main:
                print(f"interrupted; {_what_is_kept(args.out)}", file=sys.stderr)
            return 1
        except DivergenceError as err:
            raise ValueError(f"{err}; {_what_is_kept(args.out, 'good ')}") from None
    finally:
        distributed.shutdown()
    if group.main:
        print(
            f"trained {config.algorithm} for {len(history.loss)} iterations in {history.seconds:.0f} s "
            f"(final meta-loss {sum(history.loss[-50:]) / len(history.loss[-50:]):.3f}); checkpoint: {args.out}"
        )
    return 0


def _check_new_out(out: Path, hint: str) -> None:
    if out.exists():
        raise ValueError(f"{out} exists; {hint}")


def _check_out_folder(out: Path) -> None:
    """ValueError unless a file can be written at ``out`` (found before any training)."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give the name of a file")
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: the folder {out.parent} does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".probe", dir=out.parent)
    except OSError as err:
        raise ValueError(f"--out {out}: the folder {out.parent} cannot be written ({err.strerror})") from None
    os.close(fd)
    os.remove(probe)


def _what_is_kept(out: Path, good: str = "") -> str:
    """What a stopped ``train`` leaves in ``out``: the last checkpoint, or nothing."""
    from . import checkpoint

    if not out.exists():
        return f"no checkpoint was written ({out} does not exist)"
    try:
        iteration = checkpoint.load(out)["iteration"]
    except (CheckpointError, KeyError):
        return f"{out} is not a checkpoint that can be resumed"
    return f"{out} holds the last {good}checkpoint (iteration {iteration}); continue with --resume"


def _check_resumable(path: Path, state: dict, config: FewShotConfig) -> None:
    """ValueError unless ``state`` holds everything :func:`metabp.fewshot.train` resumes from."""
    from .bilevel import make_optimizer
    from .fewshot import build_model

    def bad(what: str) -> ValueError:
        return ValueError(f"--resume: {path} cannot be continued: {what}")

    needed = ["iteration", "optimizer", "generator", "torch_rng", "loss", "seconds"] + (
        ["scheduler"] if config.cosine else []
    )
    missing = [k for k in needed if state.get(k) is None]
    if missing:
        raise bad(f"it lacks {', '.join(missing)}")
    it = state["iteration"]
    if isinstance(it, bool) or not isinstance(it, int) or not 0 <= it <= config.iterations:
        raise bad(f"its iteration must be an integer from 0 to {config.iterations}, got {it!r}")
    if not isinstance(state["loss"], list) or len(state["loss"]) != it:
        raise bad(f"its loss history must hold {it} values, one per iteration")
    if isinstance(state["seconds"], bool) or not isinstance(state["seconds"], (int, float)):
        raise bad(f"its seconds must be a number, got {state['seconds']!r}")
    for key in ("generator", "torch_rng"):
        try:
            torch.Generator().set_state(state[key])
        except (RuntimeError, TypeError, ValueError):
            raise bad(f"its {key} is not a random generator's state") from None
    try:
        make_optimizer(build_model(config).parameters(), config.meta_lr).load_state_dict(state["optimizer"])
    except (RuntimeError, TypeError, ValueError, KeyError, IndexError):
        raise bad("its optimizer state does not fit the model") from None
    if config.cosine and not isinstance(state["scheduler"], dict):
        raise bad("its scheduler state is not a learning-rate schedule's")


def _pretrain(args: argparse.Namespace) -> int:
    from .omniglot import BACKGROUNDS, load_split
    from .transfer import pretrain_classifier, save_classifier

    if args.background not in BACKGROUNDS:
        raise ValueError(f"--background must be one of {', '.join(BACKGROUNDS)}, got {args.background!r}")
    _check_new_out(args.out, "choose another --out")
    _check_out_folder(args.out)
    settings = {
        "background": args.background,
        "hidden": args.hidden,
        "iterations": args.iterations,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "cosine": True,
    }
    classes = load_split(args.background, "train")
    try:
        model, history = pretrain_classifier(
            classes, args.hidden, args.iterations, args.batch_size, args.lr, args.seed, args.progress
        )
    except DivergenceError as err:
        raise ValueError(f"{err}; nothing was written to {args.out}") from None
    save_classifier(args.out, model, history, settings)
    print(
        f"pretrained a {model.ways}-class classifier for {args.iterations} iterations in {history.seconds:.0f} s "
        f"(final loss {sum(history.loss[-50:]) / len(history.loss[-50:]):.3f}); written to {args.out}"
    )
    return 0


def _adapted_accuracy(args: argparse.Namespace, model: Conv4, config: FewShotConfig, batch: TaskBatch) -> torch.Tensor:
    from .fewshot import accuracy

    steps = None if args.steps is None else [args.steps]
    if args.steps is not None and args.steps < 0:
        raise ValueError(f"--steps must be >= 0, got {args.steps}")
    return accuracy(model, batch, config, steps=steps, inner_lr=args.inner_lr)[-1]


def _evaluate(args: argparse.Namespace) -> int:
    from .episodes import EpisodeSampler
    from .evaluation import mean_ci
    from .fewshot import load_model
    from .omniglot import load_split

    for flag, value, low, high in [
        ("--ways", args.ways, 2, None),
        ("--shots", args.shots, 1, None),
        ("--queries", args.queries, 1, None),
        ("--tasks", args.tasks, 2, MAX_TASKS),
    ]:
        if value < low or (high is not None and value > high):
            allowed = f"from {low} to {high}" if high is not None else f">= {low}"
            raise ValueError(f"{flag} must be {allowed}, got {value}")
    device = _device(args.device)
    model, config, _ = load_model(args.checkpoint, device)
    classes = load_split(config.background, "test", size=config.image_size).to(device)
    if args.ways > len(classes):
        raise ValueError(f"--ways must be at most the {len(classes)} held-out classes, got {args.ways}")
    if args.shots + args.queries > classes.drawings:
        raise ValueError(
            f"--shots + --queries must be at most the {classes.drawings} drawings per class, "
            f"got {args.shots} + {args.queries}"
        )
    sampler = EpisodeSampler(classes, args.ways, args.shots, args.queries)
    generator = torch.Generator().manual_seed(args.seed)
    acc = []
    for done in range(0, args.tasks, EVAL_CHUNK):  # one chunk of episodes in memory at a time
        batch = sampler.sample(min(EVAL_CHUNK, args.tasks - done), generator)
        acc.append(_adapted_accuracy(args, model, config, batch).cpu())
    mean, half = mean_ci(torch.cat(acc))
    print(
        f"{config.algorithm} on held-out alphabets {', '.join(classes.alphabets)}: "
        f"{args.ways}-way {args.shots}-shot accuracy {100 * mean:.2f} +- {100 * half:.2f} % ({args.tasks} tasks)"
    )
    return 0


def _evaluate_runs(args: argparse.Namespace) -> int:
    from .omniglot_runs import fetch_runs, image_size, load_runs, runs_accuracy

    device = _device(args.device)
    if args.steps is not None and args.steps < 0:
        raise ValueError(f"--steps must be >= 0, got {args.steps}")
    if args.augment < 0:
        raise ValueError(f"--augment must be >= 0 (distorted copies of each image; 0 = none), got {args.augment}")
    if not 0 <= args.strength <= 2:
        raise ValueError(f"--strength must be from 0 to 2, got {args.strength}")
    size = image_size(args.checkpoint)  # a missing or damaged checkpoint is named before any download
    runs = load_runs(fetch_runs() if args.runs is None else args.runs, size)
    try:
        acc = runs_accuracy(args.checkpoint, runs, args.steps, args.inner_lr, device, args.augment, args.strength)
    except ValueError as problem:
        message = str(problem).replace("steps and inner_lr", "--steps and --inner-lr")
        raise ValueError(message.replace("augment applies", "--augment applies")) from None
    errors = [100.0 * (1.0 - a) for a in acc.tolist()]
    for run, err in zip(runs, errors, strict=True):
        print(f"{run.name}: error {err:.1f}%")
    print(f"error_percent: {sum(errors) / len(errors):.2f}")
    return 0


def _make_runs(args: argparse.Namespace) -> int:
    from .omniglot import BACKGROUNDS
    from .omniglot_runs import lake_runs, make_lake_runs, read_manifest

    if args.background not in BACKGROUNDS:
        raise ValueError(f"--background must be one of {', '.join(BACKGROUNDS)}, got {args.background!r}")
    if args.out is None:
        folder = lake_runs(args.background, args.seed)
        manifest = read_manifest(folder)
    else:
        if args.out.exists():
            raise ValueError(f"--out {args.out} exists; runs are never written over, choose a new folder")
        if not args.out.parent.is_dir():
            raise ValueError(f"--out {args.out}: the folder {args.out.parent} does not exist")
        folder, manifest = args.out, make_lake_runs(args.out, args.background, args.seed)
    per = {a: sum(r["alphabet"] == a for r in manifest["runs"]) for a in manifest["alphabets"]}
    left = "".join(f"; {a} left out ({n} characters, fewer than 20)" for a, n in manifest.get("left_out", {}).items())
    print(
        f"20 within-alphabet 20-way 1-shot runs (seed {args.seed}) from the alphabets {args.background} holds out: "
        f"{', '.join(f'{a} ({n} runs)' for a, n in per.items())}{left}"
    )
    print(f"score a checkpoint with: python -m metabp evaluate-runs --checkpoint CHECKPOINT --runs {folder}")
    print(f"runs: {folder}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import BenchConfig, format_report, machine_description, run

    device = _device(args.device)
    if args.repeats is not None and args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    impls = None if args.impls is None else tuple(n.strip() for n in args.impls.split(",") if n.strip())
    compile = {"auto": None, "on": True, "off": False}[args.compile]
    configs = [
        BenchConfig(name, args.meta_batch_size, args.inner_steps, args.first_order, args.width)
        for name in (args.configs or ["sinusoid", "omniglot"])
    ]  # BenchConfig checks the names
    print(f"metabp bench on {machine_description()}", flush=True)
    print(
        f"torch threads: {torch.get_num_threads()}; times per meta-step (meta-gradient of one meta-batch)", flush=True
    )
    summaries = []
    for config in configs:
        repeats = args.repeats if args.repeats is not None else (30 if config.name == "sinusoid" else 5)
        print(flush=True)
        report = run(
            config,
            impls,
            repeats,
            args.warmup,
            device,
            compile,
            args.memory,
            args.seed,
            log=lambda line: print(line, file=sys.stderr, flush=True),
        )
        text = format_report(report)
        print(text, flush=True)
        summaries += [line for line in text.splitlines() if " ratio_vs_learn2learn: " in line]
    print(f"\nload average at the end: {', '.join(f'{v:.1f}' for v in os.getloadavg())}")
    for line in summaries:
        print(line)
    return 0


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    Ctrl-C (or SIGTERM) ends it with one line and exit status 1, after the
    temporary files of what it was doing are removed.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _sigterm) if on_main_thread else None
    try:
        if getattr(args, "threads", None) is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        if args.command in ("train", "evaluate") and args.family != "omniglot":
            from . import cli_families

            return (cli_families.train if args.command == "train" else cli_families.evaluate)(args)
        if args.command == "train":
            return _train(args)
        if args.command == "evaluate":
            return _evaluate(args)
        if args.command == "pretrain":
            return _pretrain(args)
        if args.command == "bench" and args.processes is not None:
            from .scaling import main as scaling_main

            return scaling_main(args)
        if args.command == "bench":
            return _bench(args)
        if args.command == "make-runs":
            return _make_runs(args)
        return _evaluate_runs(args)
    except (ValueError, DataError, CheckpointError, DivergenceError, OSError) as err:
        text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())  # one line
        _error_line(f"{parser.prog}: error: {_rank_prefix()}{text}")
        return 2
    except PeerError as err:
        _error_line(f"{parser.prog}: error: {err}")
        return 1
    except KeyboardInterrupt:
        _error_line(f"{parser.prog}: interrupted")
        return 1
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _error_line(text: str) -> None:
    """Write ``text`` and its newline to stderr in one write.

    Under torchrun every rank shares one stderr. ``print`` writes the text and the newline
    separately, and unbuffered (``PYTHONUNBUFFERED``, ``python -u``) those are two system calls, so
    another rank's line could land between them, joining two errors on one line.
    """
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _rank_prefix() -> str:
    """'rank R of N: ' under torchrun with several processes, else ''."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return f"rank {os.environ.get('RANK', '?')} of {world}: " if world > 1 else ""
