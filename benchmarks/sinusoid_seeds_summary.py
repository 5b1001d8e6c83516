"""Summarise benchmarks/sinusoid_seeds.jsonl (written by sinusoid_seeds.py) as a table.

python benchmarks/sinusoid_seeds_summary.py benchmarks/sinusoid_seeds.jsonl
"""

import json
import sys


def main(path: str) -> int:
    runs = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    runs.sort(key=lambda r: (r["ATEN_CPU_CAPABILITY"], r["seed"]))
    print("| seed | kernels | compiled | 0 steps | 1 step | 5 steps | 10 steps | run time | peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        cells = [f"{m:.3f} ± {h:.3f}" for m, h in (r["maml"][s] for s in ("0", "1", "5", "10"))]
        print(
            f"| {r['seed']} | {r['cpu_capability']} | {r['compile']} | "
            + " | ".join(cells)
            + f" | {r['seconds']:.0f} s | {r['peak_rss_mib']} MiB |"
        )
    print()
    for s in ("1", "5", "10"):
        means = [r["maml"][s][0] for r in runs]
        halves = [r["maml"][s][1] for r in runs]
        centre = sum(means) / len(means)
        print(
            f"{s:>2} step(s): {len(means)} runs, means {min(means):.3f} to {max(means):.3f} "
            f"(mid {centre:.3f}, largest distance from it {max(abs(m - centre) for m in means):.3f}); "
            f"95% half-widths {min(halves):.3f} to {max(halves):.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
