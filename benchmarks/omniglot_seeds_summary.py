"""Summarise benchmarks/omniglot_seeds.jsonl (written by omniglot_seeds.py) over training seeds.

    python benchmarks/omniglot_seeds_summary.py benchmarks/omniglot_seeds.jsonl

Prints one row per number of chapters 6.1 and 6.2 (accuracies and paired differences in
percentage points, each run's mean with its 95% half-width over test tasks), with each seed's
value, the mean over seeds, the spread (largest minus smallest mean) and the largest 95%
half-width over tasks; then each qualitative claim of the two chapters' prose, checked on every
seed, with the numbers it rests on.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

CHANCE = {"5w1s": 20.0, "5w5s": 20.0, "20w1s": 5.0}
PUBLISHED = {"5w1s": 98.7, "5w5s": 99.9, "20w1s": 95.8}  # Finn et al. (2017), Table 1


def label(run: dict) -> str:
    from metabp.evaluation import is_native

    return f"seed {run['seed']}" + ("" if is_native(run) else f" ({run['cpu_capability']})")


def numbers(run: dict) -> dict[str, list[float]]:
    """Every reported number of one run, by name: ``[mean, half]`` pairs or ``[value]``."""
    out: dict[str, list[float]] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else key, sub)
        elif isinstance(value, list) and len(value) == 2 and all(isinstance(v, float) for v in value):
            out[prefix] = value
        elif isinstance(value, list) and all(isinstance(v, (list, float)) for v in value):
            for i, sub in enumerate(value):
                walk(f"{prefix}[{i}]", sub)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix] = [float(value)]

    walk("6.1", run["few_shot"])
    domain = {k: v for k, v in run["domain"].items() if k != "validation"}
    domain["shift"] = {k: v for k, v in domain["shift"].items() if k != "angles"}
    walk("6.2", domain)
    for name, ckpt in run["checkpoints"].items():
        out[f"training seconds.{name}"] = [float(ckpt["seconds"])]
    out["evaluation seconds"] = [float(run["seconds"])]
    out["evaluation CPU seconds"] = [float(run["cpu_seconds"])]
    return out


def table(runs: list[dict]) -> None:
    rows = [numbers(r) for r in runs]
    header = ["number"] + [label(r) for r in runs] + ["mean over runs", "spread (max - min)", "largest half-width"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name in rows[0]:
        values = [row.get(name) for row in rows]
        cells = [("-" if v is None else f"{v[0]:.2f} ± {v[1]:.2f}" if len(v) == 2 else f"{v[0]:g}") for v in values]
        means = [v[0] for v in values if v is not None]
        halves = [v[1] for v in values if v is not None and len(v) == 2]
        print(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {sum(means) / len(means):.4g} | {max(means) - min(means):.3g} | "
            + (f"{max(halves):.2f} |" if halves else "- |")
        )


def paired(run: dict, shots: int, a: str, b: str) -> tuple[float, float]:
    d, h = run["domain"]["paired"][str(shots)][f"{a} minus {b}"]
    return d, h


def digit(run: dict, shots: int, name: str) -> float:
    return run["domain"]["digits"][str(shots)][name][0]


def shift0(run: dict, name: str) -> float:
    return run["domain"]["shift"]["accuracy"][name][0][0]


def lost(run: dict, angle: int, name: str) -> list[float]:
    """Points ``name`` lost between 0 degrees and ``angle`` on the same tasks turned: ``[mean, half]``."""
    return run["domain"]["shift"]["lost"][str(angle)][name]


def inside_or_flat(validation: dict, chosen: float) -> bool:
    """Chapter 6.2's check: a step size on a grid's edge is no better than its neighbour by a point."""
    rows = {float(lr): row for lr, row in validation["rows"].items()}
    lrs = sorted(rows)
    if chosen not in (lrs[0], lrs[-1]):
        return True
    neighbour = lrs[1] if chosen == lrs[0] else lrs[-2]
    return max(rows[chosen]) - max(rows[neighbour]) < 1.0


def few_shot_claims() -> list[tuple[str, Callable[[dict], tuple[bool, str]]]]:
    claims: list[tuple[str, Callable[[dict], tuple[bool, str]]]] = []
    for k in CHANCE:

        def far(run: dict, k: str = k) -> tuple[bool, str]:
            m, h = run["few_shot"][k]
            return m - h > CHANCE[k] + 50, f"{m:.1f} ± {h:.1f}"

        def short(run: dict, k: str = k) -> tuple[bool, str]:
            m, h = run["few_shot"][k]
            return m + h < PUBLISHED[k], f"{m:.1f} + {h:.1f} vs {PUBLISHED[k]}"

        claims.append((f"6.1 {k}: far above chance (by more than 50 points, interval included)", far))
        claims.append((f"6.1 {k}: short of MAML's published {PUBLISHED[k]} by more than the interval", short))

    def order(run: dict) -> tuple[bool, str]:
        r = run["few_shot"]
        return r["5w5s"][0] > r["5w1s"][0] > r["20w1s"][0], "5w5s > 5w1s > 20w1s"

    def chance0(run: dict) -> tuple[bool, str]:
        c = run["few_shot"]["curve_5w1s"]
        return abs(c[0] - 20) < 3, f"0 steps {c[0]:.1f}"

    def one_step(run: dict) -> tuple[bool, str]:
        c = run["few_shot"]["curve_5w1s"]
        return c[1] > 80, f"1 step {c[1]:.1f}"

    def little(run: dict) -> tuple[bool, str]:
        c = run["few_shot"]["curve_5w1s"]
        return all(abs(x - c[1]) < 3 for x in c[2:]), "2..5 steps " + " ".join(f"{x:.1f}" for x in c[2:])

    def samplers(run: dict) -> tuple[bool, str]:
        (a, ha), (b, hb) = run["few_shot"]["samplers"].values()
        allowed = (ha**2 + hb**2) ** 0.5
        return abs(a - b) < allowed, f"gap {abs(a - b):.2f} vs ±{allowed:.2f}"

    claims += [
        ("6.1 ordering: 5-way 5-shot > 5-way 1-shot > 20-way 1-shot", order),
        ("6.1 at chance (within 3 points of 20%) before any inner step", chance0),
        ("6.1 one step takes 5-way 1-shot above 80%", one_step),
        ("6.1 further steps (2 to 5) change little (within 3 points of one step)", little),
        ("6.1 the two samplers agree within the interval of the difference", samplers),
    ]
    return claims


def domain_claims() -> list[tuple[str, Callable[[dict], tuple[bool, str]]]]:
    claims: list[tuple[str, Callable[[dict], tuple[bool, str]]]] = []

    def grids(run: dict) -> tuple[bool, str]:
        s, v = run["domain"]["settings"], run["domain"]["validation"]
        ok = all(
            inside_or_flat(v[name], s[key])
            for name, key in (("new head", "probe_lr"), ("fine-tune", "tune_lr"), ("from scratch", "scratch_lr"))
        )
        return ok, (
            f"MAML {s['maml_steps']} steps; fine-tune {s['tune_lr']} x {s['tune_steps']}; "
            f"new head {s['probe_lr']} x {s['probe_steps']}; scratch {s['scratch_lr']} x {s['scratch_steps']}"
        )

    claims.append(("6.2 chosen step sizes inside their grids, or the grid flat at its edge", grids))
    for other in ("fine-tune", "prototypical", "new head", "from scratch"):

        def ahead(run: dict, other: str = other) -> tuple[bool, str]:
            d, h = paired(run, 1, "MAML", other)
            return d - h > 0, f"{d:+.2f} ± {h:.2f}"

        claims.append((f"6.2 1 shot: MAML ahead of {other} by more than the interval", ahead))
    for k in (5, 10):

        def close(run: dict, k: int = k) -> tuple[bool, str]:
            d, h = paired(run, k, "MAML", "fine-tune")
            verdict = "level within the interval" if abs(d) < h else ("MAML ahead" if d > 0 else "fine-tune ahead")
            return -0.5 < d < 1.5, f"{d:+.2f} ± {h:.2f} ({verdict})"

        claims.append((f"6.2 {k} shots: MAML minus fine-tune 'about a point or less' (-0.5 < d < 1.5)", close))

    def falls(run: dict) -> tuple[bool, str]:
        d1, d10 = paired(run, 1, "MAML", "fine-tune")[0], paired(run, 10, "MAML", "fine-tune")[0]
        return d1 > d10, f"{d1:+.2f} -> {d10:+.2f}"

    claims.append(("6.2 MAML's lead over fine-tune falls from 1 to 10 shots", falls))
    for k in (5, 10):
        for ahead_name in ("MAML", "fine-tune"):

            def behind(run: dict, k: int = k, a: str = ahead_name) -> tuple[bool, str]:
                d, h = paired(run, k, a, "prototypical")
                return d - h > 0, f"{d:+.2f} ± {h:.2f}"

            claims.append((f"6.2 {k} shots: prototypical behind {ahead_name} by more than the interval", behind))

    def proto_behind_probe_10(run: dict) -> tuple[bool, str]:
        d, h = paired(run, 10, "new head", "prototypical")
        return d - h > 0, f"{d:+.2f} ± {h:.2f}"

    def proto_beats_probe_1(run: dict) -> tuple[bool, str]:
        d, h = paired(run, 1, "new head", "prototypical")
        return d + h < 0, f"{d:+.2f} ± {h:.2f}"

    claims.append(
        ("6.2 10 shots: prototypical behind the new head too (by more than the interval)", proto_behind_probe_10)
    )
    claims.append(("6.2 1 shot: prototypical beats the new head by more than the interval", proto_beats_probe_1))
    for k in (5, 10):

        def not_last(run: dict, k: int = k) -> tuple[bool, str]:
            d, h = paired(run, k, "from scratch", "prototypical")
            return abs(d) < 1.5 and d - h < 0.5, f"{d:+.2f} ± {h:.2f}"

        claims.append(
            (f"6.2 {k} shots: from scratch vs prototypical within about a point (not clearly last)", not_last)
        )

    def probe_behind_10(run: dict) -> tuple[bool, str]:
        d, h = paired(run, 10, "MAML", "new head")
        return d - h > 0, f"{d:+.2f} ± {h:.2f}"

    def half_time(run: dict) -> tuple[bool, str]:
        c = run["checkpoints"]
        ratio = c["classifier"]["seconds"] / c["maml"]["seconds"]
        return ratio < 0.6 and c["protonet"]["seconds"] < c["classifier"]["seconds"], (
            f"classifier/MAML {ratio:.2f}; protonet {c['protonet']['seconds']:.0f} s < "
            f"classifier {c['classifier']['seconds']:.0f} s"
        )

    claims.append(("6.2 10 shots: the new head stays behind MAML by more than the interval", probe_behind_10))
    claims.append(("6.2 training time: classifier about half of MAML's (< 0.6), protonet's less (load!)", half_time))
    names = ("MAML", "prototypical", "new head")

    def pays45(run: dict) -> tuple[bool, str]:
        return all(lost(run, 45, n)[0] - lost(run, 45, n)[1] > 0 for n in names), " ".join(
            f"{n} {lost(run, 45, n)[0]:.1f} ± {lost(run, 45, n)[1]:.1f}" for n in names
        )

    def recovers90(run: dict) -> tuple[bool, str]:
        return all(abs(lost(run, 90, n)[0]) < 2 for n in names), " ".join(
            f"{n} {lost(run, 90, n)[0]:+.1f}" for n in names
        )

    claims.append(("6.2 turned 45 degrees: every learner loses accuracy (beyond the interval)", pays45))
    claims.append(("6.2 turned 90 degrees: every learner recovers (within 2 points of 0 degrees)", recovers90))
    for other in ("MAML", "prototypical"):

        def pays_most(run: dict, other: str = other) -> tuple[bool, str]:
            d, h = run["domain"]["shift"]["lost_difference"][f"new head minus {other}"]
            return d > 0, f"{d:+.2f} ± {h:.2f}" + (" (beyond the interval)" if d - h > 0 else " (within it)")

        claims.append((f"6.2 at 45 degrees the new head loses more points than {other} (mean)", pays_most))

    def far_ahead0(run: dict) -> tuple[bool, str]:
        m, p, n = (shift0(run, x) for x in names)
        return min(m, p) > n + 5, f"MAML {m:.1f}, prototypical {p:.1f}, new head {n:.1f}"

    def digits_harder(run: dict) -> tuple[bool, str]:
        return digit(run, 1, "MAML") < shift0(run, "MAML"), f"{digit(run, 1, 'MAML'):.1f} < {shift0(run, 'MAML'):.1f}"

    def maml_loses_more(run: dict) -> tuple[bool, str]:
        m = shift0(run, "MAML") - digit(run, 1, "MAML")
        n = shift0(run, "new head") - digit(run, 1, "new head")
        return m > n, f"MAML loses {m:.1f}, new head {n:.1f}"

    claims.append(("6.2 new characters, 0 degrees: both meta-learners > new head + 5 points", far_ahead0))
    claims.append(("6.2 one-shot digits harder for MAML than new characters", digits_harder))
    claims.append(("6.2 characters -> digits: MAML loses more points than the new head", maml_loses_more))
    return claims


def claims(runs: list[dict]) -> None:
    print()
    print("| claim | " + " | ".join(label(r) for r in runs) + " | holds on every run |")
    print("|" + "---|" * (len(runs) + 2))
    for text, check in few_shot_claims() + domain_claims():
        results = [check(r) for r in runs]
        cells = [("yes" if ok else "**no**") + f": {detail}" for ok, detail in results]
        print(f"| {text} | " + " | ".join(cells) + f" | {'yes' if all(ok for ok, _ in results) else '**no**'} |")


def main(path: str) -> int:
    runs = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    runs.sort(key=lambda r: (r.get("ATEN_CPU_CAPABILITY", ""), r["seed"]))
    table(runs)
    claims(runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
