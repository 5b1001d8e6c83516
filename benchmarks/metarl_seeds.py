"""Chapter 6.3's meta-RL run, repeated for other training seeds.

Trains the chapter's MAML policy (``MetaRL`` as in the chapter, 300 meta-iterations,
``torch.manual_seed(seed)`` before the policy is built, ``meta_train(..., seed=seed)``),
chooses the later step sizes on the chapter's 100 validation goals, and evaluates on
MAML's 40 released test goals, five repetitions each, with 4000-step batches filled as
the released evaluation filled them (``lockstep=True``) and with every episode counted.
Seed 0 is the chapter's own run. For each seed it prints the mean return after 0..3
steps and the paired difference from MAML's released per-goal returns
(``$METABP_DATA/maml_rl/point_results_per_goal.csv``), with a Student-t 95% interval
over the 40 goals, and appends one JSON line to ``--out``.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/metarl_seeds.py --seeds 1 2 3 \
        --out benchmarks/metarl_seeds.jsonl
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path

import torch
from scipy import stats

from metabp.costs import keep_freed_memory
from metabp.data import dataset_dir
from metabp.metarl import MetaRL, adaptation_returns, choose_step_sizes, meta_train
from metabp.navigation import GaussianMLPPolicy, Navigation2D

CONFIG = dict(
    inner_lr=0.1,
    inner_steps=1,
    num_trajectories=20,
    meta_batch_size=20,
    meta_lr=1e-3,
    std_lr=1e-2,
    outer_epochs=1,
    clip=0.2,
    estimator="lvc",
    cosine=True,
)
ITERATIONS, REPEATS, EVAL_STEPS, SLOTS = 300, 5, 4000, 40


def released_per_goal(path: Path) -> list[torch.Tensor]:
    """MAML's released per-goal returns after 0..3 steps, each a (40,) tensor in goal order."""
    rows = {}
    with open(path) as f:
        for r in csv.DictReader(f):
            if r["method"] == "maml":
                rows[(int(r["gradient_steps"]), int(r["goal_index"]))] = float(r["average_return"])
    return [torch.tensor([rows[(k, i)] for i in range(40)], dtype=torch.float64) for k in range(4)]


def paired(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    d = a.double() - b.double()
    return d.mean().item(), stats.t.ppf(0.975, d.numel() - 1) * d.std().item() / math.sqrt(d.numel())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    keep_freed_memory()
    paper = released_per_goal(dataset_dir("maml_rl") / "point_results_per_goal.csv")
    env = Navigation2D()
    cfg = MetaRL(**CONFIG)
    val_goals = env.sample_goals(100, torch.Generator().manual_seed(1))
    goals = env.released_test_goals()
    for seed in args.seeds:
        start = time.perf_counter()
        torch.manual_seed(seed)
        policy = GaussianMLPPolicy()
        history = meta_train(env, policy, cfg, ITERATIONS, seed=seed)
        lrs, _ = choose_step_sizes(
            env,
            policy,
            val_goals,
            0.1,
            [1 / 2, 1 / 3, 1 / 4],
            SLOTS,
            torch.Generator().manual_seed(4),
            min_steps=EVAL_STEPS,
            lockstep=True,
        )
        result = {"seed": seed, "train_seconds": round(history.seconds, 1), "lrs": [round(x, 4) for x in lrs]}
        for name, lockstep in (("released_sampler", True), ("every_episode", False)):
            evals = adaptation_returns(
                env,
                policy,
                goals.repeat(REPEATS, 1),
                lrs,
                SLOTS,
                torch.Generator().manual_seed(3),
                min_steps=EVAL_STEPS,
                lockstep=lockstep,
            )
            ret = [t.mean_return().reshape(REPEATS, -1).mean(0) for t in evals]
            result[name] = [round(r.mean().item(), 3) for r in ret]
            result[name + "_minus_paper"] = [
                [round(x, 3) for x in paired(r, p)] for r, p in zip(ret, paper, strict=True)
            ]
        result["seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps(result), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
