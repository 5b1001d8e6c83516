"""Chapter 8's seeded comparisons over several training seeds.

Runs three experiments of ``notebooks/08_outlook.ipynb`` once per training seed and appends
one JSON line to ``--out``. (1) "Five meta-learners under one protocol": the same five
learners (``metabp.variants.LEARNERS``), the same protocol (600 meta-steps, meta-batch 10,
Adam 0.003 on a cosine, inner step 0.01; five inner steps for Reptile and implicit MAML,
lambda 10, five conjugate-gradient steps), K = 5 and K = 10, and the same 300 test tasks
per K (generator seeds 105 and 110), so learners and seeds are all scored on the same tasks.
Only the training seed changes: ``--seed S`` builds every network after
``torch.manual_seed(S)`` and draws the task stream with seed ``S + 1``. (2) "How many
meta-training tasks?": MAML and pretraining on pools of 5, 20, 80 and 320 tasks (pool seed
``S + 2``) and on unlimited tasks, scored one step after five shots on the 300 K = 5 test
tasks. (3) The reduced Omniglot comparison (5-way 1-shot, Conv4 with 32 filters, 150
meta-steps of 4 tasks): second and first order with 1 and 3 inner steps, networks after
``torch.manual_seed(S)``, task stream seed ``S``, scored on the same 200 held-out tasks
(generator seed 1; needs METABP_DATA). The chapter itself is ``--seed 0``.

Run it once per seed, then summarise (every number per seed, and the chapter's claims
checked on each seed):

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/learner_seeds.py --seed 1 \
        --out benchmarks/learner_seeds.jsonl
    python benchmarks/learner_seeds.py --summary benchmarks/learner_seeds.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from itertools import combinations
from pathlib import Path
from typing import Any

ITERATIONS, META_BATCH, META_LR, ALPHA, LAM, CG_STEPS, STEPS = 600, 10, 0.003, 0.01, 10.0, 5, 5
SHOTS = (5, 10)
POOL_SIZES = (5, 20, 80, 320)
BASELINE = "no meta-training"


def run(seed: int) -> dict:
    """Train the five learners with training seed ``seed`` and score them (a JSON-ready record)."""
    import torch

    from metabp.bilevel import InnerLoop
    from metabp.evaluation import adaptation_curve, mean_ci
    from metabp.models import SineNet
    from metabp.tasks import SinusoidTasks
    from metabp.variants import LEARNERS, train_learner

    torch.set_num_threads(1)
    protocol: dict[str, Any] = dict(
        inner_lr=ALPHA,
        steps=STEPS,
        lam=LAM,
        cg_steps=CG_STEPS,
        meta_batch_size=META_BATCH,
        meta_lr=META_LR,
        cosine=True,
        seed=seed + 1,
        progress=False,
    )
    record: dict = {"seed": seed, "init_seed": seed, "stream_seed": seed + 1, "learners": list(LEARNERS)}
    tests = {}
    for k in SHOTS:
        test = tests[k] = SinusoidTasks(shots=k, queries=100).sample(300, torch.Generator().manual_seed(100 + k))
        errors, seconds = {}, {}
        for name in LEARNERS:
            torch.manual_seed(seed)
            score, history = train_learner(name, SineNet(), SinusoidTasks(shots=k, queries=k), ITERATIONS, **protocol)
            errors[name] = score(test)
            seconds[name] = round(history.seconds, 2)
        torch.manual_seed(seed)
        errors[BASELINE] = adaptation_curve(SineNet(), test, InnerLoop("mse", ALPHA, 1), [1])[0]
        record[f"k{k}"] = {
            "error": {n: [round(v, 4) for v in mean_ci(e)] for n, e in errors.items()},
            # first minus second, task by task over the same 300 tasks: (mean, 95% half-width)
            "paired": {
                f"{a} - {b}": [round(v, 4) for v in mean_ci(errors[a] - errors[b])]
                for a, b in combinations([BASELINE, *LEARNERS], 2)
            },
            "train_seconds": seconds,
        }
    record["pools"] = pools(seed, tests[5])
    record["omniglot"] = omniglot_orders(seed)
    return record


def pools(seed: int, test: Any) -> dict:
    """Section 8.3: MAML and pretraining on a pool of N tasks, one-step error after five shots."""
    import torch

    from metabp.bilevel import InnerLoop
    from metabp.evaluation import adaptation_curve
    from metabp.models import SineNet
    from metabp.tasks import SinusoidTasks, TaskPool
    from metabp.training import meta_train, pretrain

    one_step = InnerLoop("mse", ALPHA, 1)
    family = SinusoidTasks(shots=5, queries=10)
    out = {}
    for size in [*POOL_SIZES, None]:
        sample = family if size is None else TaskPool(family, size, seed=seed + 2)
        torch.manual_seed(seed)
        maml = SineNet()
        meta_train(
            maml,
            sample,
            one_step,
            ITERATIONS,
            meta_batch_size=META_BATCH,
            meta_lr=META_LR,
            cosine=True,
            seed=seed + 1,
            progress=False,
        )
        torch.manual_seed(seed)
        plain = SineNet()
        pretrain(plain, sample, ITERATIONS, batch_size=META_BATCH, lr=META_LR, seed=seed + 1, progress=False)
        out["unlimited" if size is None else str(size)] = {
            name: round(adaptation_curve(model, test, one_step, [1])[0].mean().item(), 4)
            for name, model in (("MAML", maml), ("pretrained", plain))
        }
    return out


def omniglot_orders(seed: int) -> dict:
    """Section 8.2's reduced Omniglot run: accuracy (%) per setting and the paired difference at k = 3."""
    import torch

    from metabp import omniglot
    from metabp.bilevel import InnerLoop
    from metabp.convnet import Conv4
    from metabp.episodes import EpisodeSampler
    from metabp.evaluation import adaptation_curve, mean_ci
    from metabp.training import meta_train

    background = omniglot.load_split("small1", "train", rotations=True)
    held_out = omniglot.load_split("small1", "test", rotations=False)
    train = EpisodeSampler(background, ways=5, shots=1, queries=5)
    test = EpisodeSampler(held_out, ways=5, shots=1, queries=5).sample(200, torch.Generator().manual_seed(1))
    acc, out = {}, {}
    for kind, k in (("second order", 1), ("first order", 1), ("second order", 3), ("first order", 3)):
        inner = InnerLoop("cross_entropy", 0.4, k, first_order=kind == "first order")
        torch.manual_seed(seed)
        net = Conv4(ways=5, hidden=32)
        meta_train(
            net,
            train,
            inner,
            150,
            meta_batch_size=4,
            meta_lr=3e-3,
            cosine=True,
            seed=seed,
            progress=False,
            vectorize=False,
        )
        acc[kind, k] = 100 * adaptation_curve(net, test, inner, [k], metric="accuracy")[0]
        out[f"{kind}, k={k}"] = [round(v, 2) for v in mean_ci(acc[kind, k])]
    for k in (1, 3):
        out[f"second - first order, k={k}"] = [
            round(v, 2) for v in mean_ci(acc["second order", k] - acc["first order", k])
        ]
    return out


def paired(record: dict, k: int, a: str, b: str) -> tuple[float, float]:
    """``a - b`` at ``k`` shots (mean, 95% half-width), whichever order the record stored."""
    table = record[f"k{k}"]["paired"]
    if f"{a} - {b}" in table:
        mean, half = table[f"{a} - {b}"]
        return mean, half
    mean, half = table[f"{b} - {a}"]
    return -mean, half


def claims(record: dict) -> dict[str, bool]:
    """Chapter 8's comparisons of the five learners, each evaluated on one seed's record."""
    err = {k: {n: v[0] for n, v in record[f"k{k}"]["error"].items()} for k in SHOTS}
    learners = record["learners"]
    out = {}
    for k in SHOTS:
        out[f"every learner below 0.9 x untrained, K={k}"] = all(err[k][n] < 0.9 * err[k][BASELINE] for n in learners)
        out[f"Meta-SGD lowest, K={k}"] = min(learners, key=lambda n: err[k][n]) == "Meta-SGD"
        m, h = paired(record, k, "Meta-SGD", "Reptile")
        out[f"Meta-SGD below Reptile beyond the interval, K={k}"] = m + h < 0
        m, h = paired(record, k, "first-order MAML", "MAML")
        out[f"first-order MAML above MAML beyond the interval, K={k}"] = m - h > 0
        out[f"Reptile below MAML (means), K={k}"] = paired(record, k, "Reptile", "MAML")[0] < 0
    for k in SHOTS:
        m, h = paired(record, k, "Reptile", "MAML")
        out[f"Reptile below MAML beyond the interval, K={k}"] = m + h < 0
    m, h = paired(record, 5, "implicit MAML", "MAML")
    out["implicit MAML above MAML beyond the interval, K=5"] = m - h > 0
    m, h = paired(record, 10, "implicit MAML", "MAML")
    out["implicit MAML - MAML interval covers zero, K=10"] = abs(m) <= h
    out["MAML at K=10 at most 1.05 x K=5"] = err[10]["MAML"] <= 1.05 * err[5]["MAML"]
    pool = record["pools"]
    out["8.3: more tasks help MAML (N=5 above N=80)"] = pool["5"]["MAML"] > pool["80"]["MAML"]
    out["8.3: MAML below pretraining at every N"] = all(v["MAML"] < v["pretrained"] for v in pool.values())
    omni = record["omniglot"]
    so1, fo1, so3, fo3 = (omni[f"{kind}, k={k}"] for k in (1, 3) for kind in ("second order", "first order"))
    out["8.2 Omniglot: second order ahead at k=1 by more than both half-widths"] = so1[0] - fo1[0] > so1[1] + fo1[1]
    m, h = omni["second - first order, k=3"]
    out["8.2 Omniglot: second order ahead at k=3 beyond the paired interval"] = m - h > 0
    out["8.2 Omniglot: the k=3 gap less than half the k=1 gap"] = m < 0.5 * (so1[0] - fo1[0])
    out["8.2 Omniglot: three steps beat one, both orders"] = so3[0] > so1[0] and fo3[0] > fo1[0]
    out["8.2 Omniglot: first order k=3 above second order k=1 by more than both half-widths"] = (
        fo3[0] - so1[0] > so1[1] + fo3[1]
    )
    return out


def load(path: str | Path) -> list[dict]:
    """The records of a result file, one per line."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def summary(path: str) -> int:
    records = load(path)
    print(f"{len(records)} training seeds: {', '.join(str(r['seed']) for r in records)}\n")
    for k in SHOTS:
        names = [BASELINE, *records[0]["learners"]]
        print(f"query MSE after adaptation, K = {k} (mean ± 95% half-width over 300 tasks)")
        print("| learner | " + " | ".join(f"seed {r['seed']}" for r in records) + " |")
        print("|---|" + "---|" * len(records))
        for n in names:
            cells = [f"{r[f'k{k}']['error'][n][0]:.3f} ± {r[f'k{k}']['error'][n][1]:.3f}" for r in records]
            print(f"| {n} | " + " | ".join(cells) + " |")
        print()
    pairs = [("Meta-SGD", "Reptile"), ("first-order MAML", "MAML"), ("Reptile", "MAML"), ("implicit MAML", "MAML")]
    print("paired differences (first minus second, same 300 tasks, mean ± 95% half-width)")
    for k in SHOTS:
        for a, b in pairs:
            cells = [f"{paired(r, k, a, b)[0]:+.3f} ± {paired(r, k, a, b)[1]:.3f}" for r in records]
            print(f"  K={k:<2} {a} - {b}: " + ", ".join(cells))
    print("\nsection 8.3, one-step error after five shots (MAML / pretrained)")
    for size in records[0]["pools"]:
        cells = [f"{r['pools'][size]['MAML']:.3f} / {r['pools'][size]['pretrained']:.3f}" for r in records]
        print(f"  N={size:<9} " + ", ".join(cells))
    print("\nsection 8.2, reduced Omniglot, accuracy (%) and paired differences")
    for key in records[0]["omniglot"]:
        cells = [f"{r['omniglot'][key][0]:.1f} ± {r['omniglot'][key][1]:.1f}" for r in records]
        print(f"  {key}: " + ", ".join(cells))
    print("\nclaims, per seed:")
    table = [claims(r) for r in records]
    for claim in table[0]:
        marks = " ".join("yes" if t[claim] else "NO " for t in table)
        print(f"  {marks}  {claim}")
    held = sum(all(t[c] for t in table) for c in table[0])
    print(f"\n{held} of {len(table[0])} claims hold on every seed")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, help="training seed (0 is the chapter's)")
    parser.add_argument("--out", help="JSON-lines file to append to")
    parser.add_argument("--summary", metavar="FILE", help="print the table and claims of a result file")
    args = parser.parse_args(argv)
    if args.summary:
        return summary(args.summary)
    if args.seed is None or not args.out:
        parser.error("give --seed and --out (or --summary FILE)")
    if args.seed < 0:
        parser.error(f"--seed must be a non-negative integer, got {args.seed}")
    start, cpu = time.perf_counter(), time.process_time()
    record = run(args.seed)
    import torch

    revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    record.update(
        {
            "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY", "(unset: native)"),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "revision": revision,
            "seconds": round(time.perf_counter() - start, 1),
            "cpu_seconds": round(time.process_time() - cpu, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "command": " ".join(["python", *sys.argv]),
        }
    )
    with open(args.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps({k: record[k] for k in ("seed", "seconds", "cpu_seconds")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
