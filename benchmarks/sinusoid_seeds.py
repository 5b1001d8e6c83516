"""Chapter 3's sinusoid configuration over several seeds: the spread behind its tolerances.

Meta-trains MAML's 1-40-40-1 network exactly as ``notebooks/03_algorithm.ipynb`` does
(40,000 meta-iterations, meta-batch 25, K = 10, one inner step of 0.01, Adam 0.01 on a
cosine), except that the seed of the initialisation and of the task stream is ``--seed``.
Then it scores the same 1,000 test tasks (seed 2017, K = 5, 100 queries) after 0, 1, 5
and 10 inner steps, as the chapter does, and appends one JSON line to ``--out``.
With ``--pretrain`` it also trains and scores the chapter's pretrained baseline.

Run it once per seed and kernel path (see benchmarks/sinusoid_seeds.txt for the commands
and results), e.g.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/sinusoid_seeds.py --seed 1 \
        --out benchmarks/sinusoid_seeds.jsonl
    ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 PYTHONPATH=src \
        python benchmarks/sinusoid_seeds.py --seed 1 --eager --out benchmarks/sinusoid_seeds.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

import torch

from metabp.bilevel import InnerLoop
from metabp.evaluation import adaptation_curve, mean_ci
from metabp.models import SineNet
from metabp.tasks import SinusoidTasks
from metabp.training import meta_train, pretrain, seed_everything


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--iterations", type=int, default=40000)
    parser.add_argument("--eager", action="store_true", help="meta-train without torch.compile (the chapter compiles)")
    parser.add_argument("--pretrain", action="store_true", help="also the pretrained baseline")
    parser.add_argument("--out", required=True, help="JSON-lines file to append to")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    start = time.perf_counter()
    seed_everything(args.seed)
    train_tasks = SinusoidTasks(shots=10, queries=10)
    inner = InnerLoop("mse", inner_lr=0.01, inner_steps=1)
    torch.manual_seed(args.seed)
    net = SineNet()
    history = meta_train(
        net,
        train_tasks,
        inner,
        iterations=args.iterations,
        meta_batch_size=25,
        meta_lr=0.01,
        cosine=True,
        seed=args.seed,
        vectorize=True,
        compile=not args.eager,
        progress=False,
    )
    test = SinusoidTasks(shots=5, queries=100).sample(1000, torch.Generator().manual_seed(2017))
    steps = [0, 1, 5, 10]
    curve = adaptation_curve(net, test, inner, steps)
    record = {
        "seed": args.seed,
        "iterations": args.iterations,
        "compile": not args.eager,
        "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY", "(unset: native)"),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "final_meta_loss_mean_last_1000": sum(history.loss[-1000:]) / 1000,
        "maml": {str(s): [round(v, 4) for v in mean_ci(curve[i])] for i, s in enumerate(steps)},
        "meta_train_seconds": round(history.seconds, 1),
    }
    if args.pretrain:
        torch.manual_seed(args.seed)
        pre = SineNet()
        pretrain(pre, train_tasks, iterations=20000, batch_size=25, lr=1e-3, seed=args.seed, progress=False)
        pre_curve = adaptation_curve(pre, test, inner, steps)
        record["pretrained"] = {str(s): [round(v, 4) for v in mean_ci(pre_curve[i])] for i, s in enumerate(steps)}
    record["seconds"] = round(time.perf_counter() - start, 1)
    record["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    record["command"] = " ".join(sys.argv)
    with open(args.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
