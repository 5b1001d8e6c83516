"""Chapters 6.1 and 6.2's headline numbers for one training seed's three Omniglot learners.

Chapters 6.1 (``notebooks/06a_few_shot.ipynb``) and 6.2 (``notebooks/06b_domain_adaptation.ipynb``)
evaluate three learners trained once, with seed 0, by the command line and committed as
``notebooks/checkpoints/omniglot_{maml,protonet,classifier}.pt``. This script computes, for the
three checkpoints of one seed, every number those chapters' prose relies on, with the chapters'
own protocol and library calls (the same test tasks and their seeds, the same chunk sizes), and
appends one JSON line to ``--out``. Accuracies and differences are in percentage points, each a
``[mean, 95% half-width]`` pair over tasks (``metabp.evaluation.mean_ci``).

Chapter 6.1 (the MAML checkpoint, three inner steps of 0.4 at test time):

- ``few_shot``: accuracy on 600 held-out 5-way 1-shot, 5-way 5-shot (five queries per class)
  and 20-way 1-shot (one query per class) tasks, seed 40;
- ``curve_5w1s``: mean accuracy after 0..5 inner steps on the first 200 of the 5-way 1-shot tasks;
- ``samplers``: 600 5-way 1-shot tasks (seed 10) drawn from scratch and through learn2learn.

Lake et al.'s 20 official runs are not scored: the chapter reports no result on them (they are
not available offline).

Chapter 6.2 (all three checkpoints, plus the from-scratch baseline, which depends on no
checkpoint and so is the same for every seed):

- ``settings`` and ``validation``: the step sizes and step counts chosen on 40 5-way 5-shot tasks
  of the held-out Omniglot alphabets without rotations (seed 1), from the chapter's grids;
- ``digits``: accuracy of the five learners on 300 5-way digit tasks per number of shots
  K = 1, 5, 10 (10 queries per class, seed 100 + K);
- ``paired``: the chapter's seven paired differences (a minus b over the same tasks) at each K,
  and fine-tune minus prototypical, which its assertions use;
- ``shift``: 5-way 1-shot accuracy of MAML, prototypical networks and the new head on 200
  held-out tasks turned by 0, 30, 45 and 90 degrees (seed 200), the points lost at 45 and at 90
  degrees (``lost``, paired over the same tasks turned) and the paired differences of those
  losses (``lost_difference``).

It also records each checkpoint's md5, its training time (the checkpoint's ``seconds``) and its
update count, the script's own run time (wall clock, and the CPU time of its process, which says
more on a shared machine), torch's version and the platform. The seed of each checkpoint must
equal ``--seed`` and its training must be complete (the script refuses otherwise).

Seed 0 is the chapters' own run; its line reproduces their stored outputs (same machine, one
thread; ``benchmarks/omniglot_seeds_check.py`` compares them). One seed takes about 6.5 minutes
of one CPU thread (23 minutes of wall clock on the 2-core machine that built the book, busy with
other jobs). Run it once per seed, one thread, from the repository's root, e.g.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=src METABP_DATA=/path/to/data \\
        python benchmarks/omniglot_seeds.py --seed 0 \\
        --maml notebooks/checkpoints/omniglot_maml.pt \\
        --protonet notebooks/checkpoints/omniglot_protonet.pt \\
        --classifier notebooks/checkpoints/omniglot_classifier.pt \\
        --out benchmarks/omniglot_seeds.jsonl

where the checkpoints of seed N > 0 come from the chapters' commands with ``--seed N``:

    python -m metabp train omniglot --out omniglot_maml_seedN.pt --threads 1 --seed N
    python -m metabp train omniglot --algorithm protonet --out omniglot_protonet_seedN.pt --threads 1 --seed N
    python -m metabp pretrain omniglot --out omniglot_classifier_seedN.pt --threads 1 --seed N

``benchmarks/omniglot_seeds_summary.py`` summarises the lines over seeds and checks the
chapters' claims on each.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from metabp import transfer
from metabp.digits import load_digits
from metabp.episodes import EpisodeSampler, L2LEpisodeSampler, rotate
from metabp.evaluation import best_setting, mean_ci
from metabp.fewshot import accuracy, load_model
from metabp.omniglot import load_split

# Chapter 6.1
FEW_SHOT_SETTINGS = {"5w1s": (5, 1, 5), "5w5s": (5, 5, 5), "20w1s": (20, 1, 1)}
CURVE_STEPS = [0, 1, 2, 3, 4, 5]
# Chapter 6.2
VAL_TASKS = 40
PROBE_STEP_COUNTS, TRAIN_STEP_COUNTS, MAML_STEP_COUNTS = [25, 50, 100, 200], [5, 10], [1, 3, 5, 10]
PROBE_LRS, TUNE_LRS, SCRATCH_LRS = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0), (0.003, 0.01, 0.03, 0.1), (0.3, 1.0, 3.0)
TASKS, QUERIES, SHOTS = 300, 10, (1, 5, 10)
LEARNERS = ("MAML", "prototypical", "fine-tune", "new head", "from scratch")
PAIRS = [
    ("MAML", "fine-tune"),
    ("MAML", "prototypical"),
    ("MAML", "new head"),
    ("MAML", "from scratch"),
    ("fine-tune", "new head"),
    ("new head", "prototypical"),
    ("from scratch", "prototypical"),
    ("fine-tune", "prototypical"),  # not in the chapter's table, but in its assertions
]
ANGLES, SHIFT_TASKS = [0, 30, 45, 90], 200
SHIFT_LEARNERS = ("MAML", "prototypical", "new head")
DROP_PAIRS = [("new head", "MAML"), ("new head", "prototypical"), ("MAML", "prototypical")]


def points(values: torch.Tensor) -> list[float]:
    """``[mean, 95% half-width]`` of per-task accuracies (fractions), in percentage points."""
    mean, half = mean_ci(values)
    return [100 * mean, 100 * half]


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def few_shot(maml_model, maml_config) -> dict:
    """Chapter 6.1's evaluation of the MAML checkpoint (its cells 31, 36 and 38)."""
    test_classes = load_split("small1", "test")
    result: dict = {}
    for name, (ways, shots, queries) in FEW_SHOT_SETTINGS.items():
        tasks = EpisodeSampler(test_classes, ways, shots, queries).sample(600, torch.Generator().manual_seed(40))
        result[name] = points(accuracy(maml_model, tasks, maml_config, steps=[3], chunk_size=10)[0])
        if name == "5w1s":  # the chapter's prose relies on this curve only
            first = type(tasks)(*(x[:200] for x in tasks))
            curve = accuracy(maml_model, first, maml_config, steps=CURVE_STEPS, chunk_size=10).mean(1)
            result["curve_5w1s"] = [100 * c for c in curve.tolist()]
        del tasks
    samplers = {
        "from scratch": EpisodeSampler(test_classes, ways=5, shots=1, queries=5),
        "learn2learn": L2LEpisodeSampler(test_classes, ways=5, shots=1, queries=5),
    }
    result["samplers"] = {}
    for name, sampler in samplers.items():
        tasks = sampler.sample(600, torch.Generator().manual_seed(10))
        result["samplers"][name] = points(accuracy(maml_model, tasks, maml_config, steps=[3], chunk_size=10)[0])
        del tasks
    return result


def domain_adaptation(maml_model, maml_config, proto_model, proto_config, classifier) -> dict:
    """Chapter 6.2's evaluation of the three checkpoints (its cells 10, 15, 18 to 20 and 25 to 27)."""
    val_classes = load_split("small1", "test", rotations=False)
    digits = load_digits()

    def maml_accuracy(batch, steps):
        return transfer.fine_tune_accuracy(maml_model, batch, maml_config.inner_lr, steps, head="keep")

    val_batch = EpisodeSampler(val_classes, ways=5, shots=5, queries=5).sample(
        VAL_TASKS, torch.Generator().manual_seed(1)
    )
    maml_grid = {maml_config.inner_lr: maml_accuracy(val_batch, MAML_STEP_COUNTS).mean(1)}
    probe_grid = {
        lr: transfer.linear_probe_accuracy(classifier, val_batch, lr, PROBE_STEP_COUNTS).mean(1) for lr in PROBE_LRS
    }
    tune_grid = {
        lr: transfer.fine_tune_accuracy(classifier, val_batch, lr, TRAIN_STEP_COUNTS).mean(1) for lr in TUNE_LRS
    }
    scratch_grid = {
        lr: transfer.fine_tune_accuracy(None, val_batch, lr, TRAIN_STEP_COUNTS).mean(1) for lr in SCRATCH_LRS
    }
    del val_batch
    probe_lr, probe_steps = best_setting(probe_grid, PROBE_STEP_COUNTS)
    tune_lr, tune_steps = best_setting(tune_grid, TRAIN_STEP_COUNTS)
    scratch_lr, scratch_steps = best_setting(scratch_grid, TRAIN_STEP_COUNTS)
    _, maml_steps = best_setting(maml_grid, MAML_STEP_COUNTS)

    def evaluate_all(batch):
        return {
            "MAML": maml_accuracy(batch, [maml_steps])[0],
            "prototypical": accuracy(proto_model, batch, proto_config, chunk_size=10)[0],
            "fine-tune": transfer.fine_tune_accuracy(classifier, batch, tune_lr, [tune_steps])[0],
            "new head": transfer.linear_probe_accuracy(classifier, batch, probe_lr, [probe_steps])[0],
            "from scratch": transfer.fine_tune_accuracy(None, batch, scratch_lr, [scratch_steps])[0],
        }

    digit_acc = {}
    for shots in SHOTS:
        batch = EpisodeSampler(digits, ways=5, shots=shots, queries=QUERIES).sample(
            TASKS, torch.Generator().manual_seed(100 + shots)
        )
        digit_acc[shots] = evaluate_all(batch)
        del batch

    shift_acc: dict[str, list[torch.Tensor]] = {name: [] for name in SHIFT_LEARNERS}
    for angle in ANGLES:
        batch = EpisodeSampler(rotate(val_classes, angle), ways=5, shots=1, queries=5).sample(
            SHIFT_TASKS, torch.Generator().manual_seed(200)
        )
        found = {
            "MAML": maml_accuracy(batch, [maml_steps])[0],
            "prototypical": accuracy(proto_model, batch, proto_config, chunk_size=10)[0],
            "new head": transfer.linear_probe_accuracy(classifier, batch, probe_lr, [probe_steps])[0],
        }
        for name in SHIFT_LEARNERS:
            shift_acc[name].append(found[name])
        del batch

    def lost(name, angle):
        return shift_acc[name][0] - shift_acc[name][ANGLES.index(angle)]

    def grid_rows(grid):
        return {str(lr): [100 * a for a in row.tolist()] for lr, row in grid.items()}

    return {
        "settings": {
            "maml_steps": maml_steps,
            "tune_lr": tune_lr,
            "tune_steps": tune_steps,
            "probe_lr": probe_lr,
            "probe_steps": probe_steps,
            "scratch_lr": scratch_lr,
            "scratch_steps": scratch_steps,
        },
        "validation": {
            "MAML": {"steps": MAML_STEP_COUNTS, "rows": grid_rows(maml_grid)},
            "new head": {"steps": PROBE_STEP_COUNTS, "rows": grid_rows(probe_grid)},
            "fine-tune": {"steps": TRAIN_STEP_COUNTS, "rows": grid_rows(tune_grid)},
            "from scratch": {"steps": TRAIN_STEP_COUNTS, "rows": grid_rows(scratch_grid)},
        },
        "digits": {str(k): {name: points(digit_acc[k][name]) for name in LEARNERS} for k in SHOTS},
        "paired": {
            str(k): {f"{a} minus {b}": points(digit_acc[k][a] - digit_acc[k][b]) for a, b in PAIRS} for k in SHOTS
        },
        "shift": {
            "angles": ANGLES,
            "accuracy": {name: [points(acc) for acc in shift_acc[name]] for name in SHIFT_LEARNERS},
            "lost": {str(angle): {name: points(lost(name, angle)) for name in SHIFT_LEARNERS} for angle in (45, 90)},
            "lost_difference": {
                f"{a} minus {b}": points(lost(a, 45) - lost(b, 45)) for a, b in DROP_PAIRS
            },  # at 45 degrees
        },
    }


def checkpoint_record(path: Path, seconds: float, updates: int, seed: int) -> dict:
    return {"path": str(path), "md5": md5(path), "seed": seed, "seconds": round(seconds, 1), "updates": updates}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, required=True, help="the training seed of the three checkpoints")
    parser.add_argument("--maml", type=Path, required=True, help="python -m metabp train omniglot --seed SEED")
    parser.add_argument("--protonet", type=Path, required=True, help="... train omniglot --algorithm protonet")
    parser.add_argument("--classifier", type=Path, required=True, help="python -m metabp pretrain omniglot")
    parser.add_argument("--out", type=Path, required=True, help="JSON-lines file to append to")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    start, cpu_start = time.perf_counter(), time.process_time()
    maml_model, maml_config, maml_state = load_model(args.maml)
    proto_model, proto_config, proto_state = load_model(args.protonet)
    classifier, classifier_state = transfer.load_classifier(args.classifier)
    if maml_config.algorithm != "maml" or proto_config.algorithm != "protonet":
        parser.error(f"--maml holds {maml_config.algorithm!r}, --protonet holds {proto_config.algorithm!r}")
    found = {
        "maml": maml_config.seed,
        "protonet": proto_config.seed,
        "classifier": classifier_state["settings"]["seed"],
    }
    if any(s != args.seed for s in found.values()):
        parser.error(f"--seed {args.seed}, but the checkpoints were trained with seeds {found}")
    for name, state, total in (
        ("maml", maml_state, maml_config.iterations),
        ("protonet", proto_state, proto_config.iterations),
        ("classifier", classifier_state, classifier_state["settings"]["iterations"]),
    ):
        done = state["iteration"] if "iteration" in state else len(state["loss"])
        if done != total:
            parser.error(f"--{name}: training incomplete ({done} of {total} updates)")

    record = {
        "seed": args.seed,
        "checkpoints": {
            "maml": checkpoint_record(args.maml, maml_state["seconds"], maml_state["iteration"], args.seed),
            "protonet": checkpoint_record(args.protonet, proto_state["seconds"], proto_state["iteration"], args.seed),
            "classifier": checkpoint_record(
                args.classifier, classifier_state["seconds"], len(classifier_state["loss"]), args.seed
            ),
        },
        "few_shot": few_shot(maml_model, maml_config),
    }
    record["domain"] = domain_adaptation(maml_model, maml_config, proto_model, proto_config, classifier)
    record["seconds"] = round(time.perf_counter() - start, 1)
    record["cpu_seconds"] = round(time.process_time() - cpu_start, 1)  # the machine may be shared
    record["torch"] = torch.__version__
    record["platform"] = platform.platform()
    record["machine"] = platform.processor() or platform.machine()
    record["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    record["ATEN_CPU_CAPABILITY"] = os.environ.get("ATEN_CPU_CAPABILITY", "(unset: native)")
    record["threads"] = torch.get_num_threads()
    record["command"] = " ".join(sys.argv)
    with open(args.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
