"""Within-alphabet error (Lake et al.'s one-shot task) of checkpoints on seeded Lake-style run sets.

Each seed is one set of 20 runs built by ``python -m metabp make-runs --background small1 --seed S``
(kept in $METABP_CACHE/omniglot/lake_runs), from the alphabets small1 holds out. Every checkpoint is
scored on the same runs, so differences between checkpoints are paired run by run. Writes one JSON
line per (checkpoint, seed) with the 20 per-run errors, then prints a summary:

    OMP_NUM_THREADS=1 METABP_DATA=../shared/data python benchmarks/lake_runs.py \\
        --out benchmarks/lake_runs.jsonl                       # the committed checkpoints, seeds 0-4
    python benchmarks/lake_runs.py --summary benchmarks/lake_runs.jsonl   # the summary again

``--checkpoint NAME=PATH`` (repeatable) scores other checkpoints instead; ``--steps K`` and
``--inner-lr A`` change a gradient learner's adaptation at test time (as evaluate-runs does),
``--prototypes`` scores a gradient learner by nearest prototype on its body's features instead, and
``--augment N [--strength S]`` averages a prototype learner's features over each image and N
distorted copies (test-time augmentation, as evaluate-runs --augment does). ``--ensemble
NAME=PATH1,PATH2,...`` (repeatable) scores prototype learners of one image size voting together
(:func:`metabp.protonet.ensemble_accuracy`: each learner's squared distances in a run, divided by their
mean there, summed), with the same copies for every learner.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = {  # paths relative to the repository's root
    "maml": "notebooks/checkpoints/omniglot_maml.pt",
    "protonet": "notebooks/checkpoints/omniglot_protonet.pt",
    "classifier": "notebooks/checkpoints/omniglot_classifier.pt",
}


def t95(n: int) -> float:
    """Student's t quantile for a two-sided 95% interval of a mean of n values."""
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1))


def mean_half(values: list[float]) -> tuple[float, float]:
    n = len(values)
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    return m, t95(n) * sd / math.sqrt(n)


def summary(rows: list[dict], baselines: list[tuple[str, str]] | None = None) -> str:
    """A table of the errors of ``rows``, then paired differences: each ``(checkpoint, baseline)``
    pair of ``baselines``, in order (all pairs when ``baselines`` is None)."""
    names = list(dict.fromkeys(r["checkpoint"] for r in rows))
    seeds = sorted({r["seed"] for r in rows})
    errors = {(r["checkpoint"], r["seed"]): r["errors"] for r in rows}
    out = ["| checkpoint | " + " | ".join(f"run set {s}" for s in seeds) + " | all runs | spread of set means |"]
    out.append("|---|" + "---|" * (len(seeds) + 2))
    for name in names:
        cells, means, pooled = [], [], []
        for s in seeds:
            m, h = mean_half(errors[name, s])
            cells.append(f"{m:.1f} ± {h:.1f}")
            means.append(m)
            pooled += errors[name, s]
        m, h = mean_half(pooled)
        out.append(
            f"| {name} | " + " | ".join(cells) + f" | {m:.1f} ± {h:.1f} | {min(means):.1f} to {max(means):.1f} |"
        )
    out.append("")
    out.append("Error in percent: mean over the 20 runs of a set ± 95% half-width (Student's t over runs);")
    out.append(f"'all runs' pools the {20 * len(seeds)} runs of the {len(seeds)} sets.")
    pairs = (
        [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
        if baselines is None
        else [(a, b) for a, b in baselines if a in names and b in names]
    )
    if pairs:
        out.append("")
        out.append("Paired differences in error (first minus second, all runs pooled, ± 95% half-width over runs):")
        for a, b in pairs:
            d = [x - y for s in seeds for x, y in zip(errors[a, s], errors[b, s], strict=True)]
            m, h = mean_half(d)
            out.append(f"  {a} - {b}: {m:+.1f} ± {h:.1f} points")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--checkpoint", action="append", default=None, metavar="NAME=PATH")
    parser.add_argument(
        "--ensemble", action="append", default=None, metavar="NAME=PATH1,PATH2,...", help="prototype learners voting"
    )
    parser.add_argument("--steps", type=int, default=None, help="inner steps at test time")
    parser.add_argument("--inner-lr", type=float, default=None, help="inner step size at test time")
    parser.add_argument("--prototypes", action="store_true", help="nearest prototype on the body's features")
    parser.add_argument("--augment", type=int, default=0, help="test-time augmentation: distorted copies per image")
    parser.add_argument("--strength", type=float, default=1.0, help="strength of those distortions (0 to 2)")
    parser.add_argument("--out", type=Path, default=None, help="JSON lines to write (appended)")
    parser.add_argument("--summary", type=Path, default=None, help="only summarise this file")
    parser.add_argument(
        "--against", action="append", default=None, metavar="NAME=BASELINE", help="with --summary: pairs to compare"
    )
    args = parser.parse_args(argv)
    if args.summary is not None:
        rows = [json.loads(line) for line in args.summary.read_text().splitlines() if line.strip()]
        print(summary(rows, None if args.against is None else [tuple(a.split("=", 1)) for a in args.against]))
        return 0

    import torch

    from metabp import protonet
    from metabp.fewshot import load_model
    from metabp.omniglot_runs import image_size, lake_runs, load_runs, runs_accuracy, runs_as_tasks

    torch.set_num_threads(1)
    ensembles = {} if args.ensemble is None else {n: p.split(",") for n, p in (e.split("=", 1) for e in args.ensemble)}
    checkpoints = {} if args.checkpoint is None else dict(c.split("=", 1) for c in args.checkpoint)
    if not checkpoints and not ensembles:
        checkpoints = DEFAULT
    sizes = {name: image_size(ROOT / path) for name, path in checkpoints.items()}  # an absolute path stays as it is
    voters = {}  # ensemble name -> its learners, each read once
    for name, paths in ensembles.items():
        if args.steps is not None or args.inner_lr is not None or args.prototypes:
            raise SystemExit(f"--ensemble {name}: --steps, --inner-lr and --prototypes do not apply to an ensemble")
        learners = {path: load_model(ROOT / path) for path in paths}
        found = {config.image_size for _, config, _ in learners.values()}
        if len(found) != 1:
            raise SystemExit(f"--ensemble {name}: its learners must share one image size, got {sorted(found)}")
        for path, (_, config, _) in learners.items():
            if config.algorithm != "protonet":
                raise SystemExit(f"--ensemble {name}: {path} is not a prototypical network")
        voters[name] = [model for model, _, _ in learners.values()]
        checkpoints[name], sizes[name] = ",".join(paths), found.pop()
    # --prototypes: each learner read once, not once per run set
    bodies = {name: load_model(ROOT / path)[0] for name, path in checkpoints.items()} if args.prototypes else {}
    rows = []
    for seed in args.seeds:
        folder = lake_runs("small1", seed)
        at_size: dict[int, list] = {}  # the runs at each checkpoint's image size, read once
        for name, path in checkpoints.items():
            size = sizes[name]
            if size not in at_size:
                at_size[size] = load_runs(folder, size)
            runs = at_size[size]
            start = time.perf_counter()
            if name in voters:
                acc = protonet.ensemble_accuracy(voters[name], runs_as_tasks(runs), None, args.augment, args.strength)
            elif args.prototypes:
                acc = protonet.accuracy(bodies[name], runs_as_tasks(runs), None, args.augment, args.strength)
            else:
                acc = runs_accuracy(ROOT / path, runs, args.steps, args.inner_lr, "cpu", args.augment, args.strength)
            rows.append(
                {
                    "checkpoint": name,
                    "path": str(path),
                    "seed": seed,
                    "steps": args.steps,
                    "inner_lr": args.inner_lr,
                    "prototypes": args.prototypes,
                    "ensemble": name in voters,
                    "augment": args.augment,
                    "strength": args.strength if args.augment else None,
                    "errors": [round(100.0 * (1.0 - a), 2) for a in acc.tolist()],
                    "seconds": round(time.perf_counter() - start, 2),
                }
            )
            print(f"{name} seed {seed}: {sum(rows[-1]['errors']) / 20:.2f}% ({rows[-1]['seconds']} s)", file=sys.stderr)
    if args.out is not None:
        with args.out.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    print(summary(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
