"""Check seed 0's line of benchmarks/omniglot_seeds.jsonl against chapters 6.1 and 6.2's stored outputs.

    python benchmarks/omniglot_seeds_check.py benchmarks/omniglot_seeds.jsonl

Seed 0's checkpoints are the chapters' own, so on the machine that executed the chapters (one
thread) every number must equal the stored one: the glued values (those glued at full precision
compared to 1e-9, those glued rounded compared after the same rounding) and the chapters'
Markdown tables of 6.1's results, 6.2's validation accuracies and its rotated characters. Prints
one line per comparison and exits with 1 if any differs. On another machine, expect differences
in the last digits (and now and then a rounded value one step off).
"""

from __future__ import annotations

import ast
import json
import math
import sys

KEYS = {
    "MAML": "maml",
    "prototypical": "protonet",
    "fine-tune": "finetune",
    "new head": "probe",
    "from scratch": "scratch",
}
TITLES = {
    "MAML (its own step size)": "MAML",
    "new head on pretrained features": "new head",
    "fine-tune every layer": "fine-tune",
    "from scratch": "from scratch",
}


def stored(path: str) -> tuple[dict, list[str]]:
    """A chapter's glued values by name, and the Markdown tables it printed."""
    nb = json.load(open(path, encoding="utf-8"))
    glued, tables = {}, []
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            name = out.get("metadata", {}).get("scrapbook", {}).get("name")
            if name:
                glued[name] = ast.literal_eval(data["application/papermill.record/text/plain"])
            if "text/markdown" in data:
                tables.append("".join(data["text/markdown"]))
    return glued, tables


def table_rows(tables: list[str], header_start: str) -> list[str]:
    """The body rows of the one printed table whose header starts with ``header_start``."""
    (found,) = [t for t in tables if t.startswith(header_start)]
    return found.splitlines()[2:]


def verdict(d: float, h: float, a: str, b: str) -> str:
    if abs(d) < h:
        return f"{a} and {b} level within the interval"
    return f"{a} ahead by more than the interval" if d > 0 else f"{b} ahead by more than the interval"


def few_shot_rows(run: dict) -> list[tuple]:
    a, tables = stored("notebooks/06a_few_shot.ipynb")
    fs, rows = run["few_shot"], []
    for k in ("5w1s", "5w5s", "20w1s"):
        rows.append((f"6.1 omniglot_{k}_acc", a[f"omniglot_{k}_acc"], round(fs[k][0], 1), "rounded"))
        rows.append((f"6.1 omniglot_{k}_ci", a[f"omniglot_{k}_ci"], round(fs[k][1], 1), "rounded"))
    rows.append(("6.1 zero_step_5w1s", a["zero_step_5w1s"], round(fs["curve_5w1s"][0], 1), "rounded"))
    rows.append(("6.1 one_step_5w1s", a["one_step_5w1s"], round(fs["curve_5w1s"][1], 1), "rounded"))
    (sa, ha), (la, hl) = fs["samplers"]["from scratch"], fs["samplers"]["learn2learn"]
    rows.append(("6.1 acc_scratch", a["acc_scratch"], round(sa, 1), "rounded"))
    rows.append(("6.1 acc_l2l", a["acc_l2l"], round(la, 1), "rounded"))
    rows.append(("6.1 acc_gap", a["acc_gap"], round(abs(sa - la), 1), "rounded"))
    rows.append(("6.1 acc_gap_allowed", a["acc_gap_allowed"], round(math.hypot(ha, hl), 1), "rounded"))
    rows.append(("6.1 ckpt_minutes", a["ckpt_minutes"], round(run["checkpoints"]["maml"]["seconds"] / 60), "rounded"))
    mine = [
        f"| {w}-way {s}-shot | {fs[k][0]:.1f} ± {fs[k][1]:.1f} |"
        for k, w, s in (("5w1s", 5, 1), ("5w5s", 5, 5), ("20w1s", 20, 1))
    ]
    rows.append(("6.1 results table", table_rows(tables, "| held-out tasks"), mine, "table"))
    return rows


def domain_rows(run: dict) -> list[tuple]:
    b, tables = stored("notebooks/06b_domain_adaptation.ipynb")
    d, rows = run["domain"], []
    for key, value in d["settings"].items():
        rows.append((f"6.2 {key}", b[key], value, "exact"))
    for k in ("1", "5", "10"):
        for name, key in KEYS.items():
            m, h = d["digits"][k][name]
            rows.append((f"6.2 digits_5w{k}s_{key}_acc", b[f"digits_5w{k}s_{key}_acc"], round(m, 1), "rounded"))
            rows.append((f"6.2 digits_5w{k}s_{key}_ci", b[f"digits_5w{k}s_{key}_ci"], round(h, 1), "rounded"))
        for pair, (m, h) in d["paired"][k].items():
            x, y = pair.split(" minus ")
            g = f"paired_{KEYS[x]}_{KEYS[y]}_{k}"
            if g in b:  # fine-tune minus prototypical is not glued (the chapter asserts it)
                rows.append((f"6.2 {g}", b[g], m, "full"))
                rows.append((f"6.2 {g}_ci", b[g + "_ci"], h, "full"))
                v = f"verdict_{KEYS[x]}_{KEYS[y]}_{k}"
                rows.append((f"6.2 {v}", b[v], verdict(m, h, x, y), "exact"))
    sh = d["shift"]
    for name in ("MAML", "prototypical", "new head"):
        key, acc, lost = KEYS[name], sh["accuracy"][name], sh["lost"]
        rows.append((f"6.2 shift_{key}_0", b[f"shift_{key}_0"], round(acc[0][0], 1), "rounded"))
        rows.append((f"6.2 shift_{key}_45", b[f"shift_{key}_45"], round(acc[2][0], 1), "rounded"))
        rows.append((f"6.2 shift_{key}_drop45", b[f"shift_{key}_drop45"], round(lost["45"][name][0], 1), "rounded"))
        rows.append((f"6.2 shift_{key}_drop45_ci", b[f"shift_{key}_drop45_ci"], lost["45"][name][1], "full"))
        rows.append((f"6.2 shift_{key}_drop90", b[f"shift_{key}_drop90"], round(lost["90"][name][0], 1), "rounded"))
    for pair, (m, h) in sh["lost_difference"].items():
        x, y = pair.split(" minus ")
        g = f"dropdiff_{KEYS[x]}_{KEYS[y]}"
        rows.append((f"6.2 {g}", b[g], m, "full"))
        rows.append((f"6.2 {g}_ci", b[g + "_ci"], h, "full"))
    for name, key in (("maml", "maml_minutes"), ("protonet", "proto_minutes"), ("classifier", "classifier_minutes")):
        rows.append((f"6.2 {key}", b[key], round(run["checkpoints"][name]["seconds"] / 60, 1), "rounded"))
    mine = []
    for title, name in TITLES.items():
        steps = " / ".join(map(str, d["validation"][name]["steps"]))
        for lr, row in d["validation"][name]["rows"].items():
            mine.append(f"| {title} | {float(lr)} | {steps} | {' / '.join(f'{x:.1f}' for x in row)} |")
    rows.append(("6.2 validation table", table_rows(tables, "| learner | step size"), mine, "table"))
    names = ("MAML", "prototypical", "new head")
    mine = [
        f"| {angle} | " + " | ".join("{:.1f} ± {:.1f}".format(*sh["accuracy"][n][i]) for n in names) + " |"
        for i, angle in enumerate(sh["angles"])
    ]
    rows.append(("6.2 rotation table", table_rows(tables, "| rotation (degrees)"), mine, "table"))
    mine = [
        f"| {name} | " + " | ".join("{:.1f} ± {:.1f}".format(*d["digits"][k][name]) for k in ("1", "5", "10")) + " |"
        for name in KEYS
    ]
    rows.append(("6.2 digits table", table_rows(tables, "| learner | 1-shot"), mine, "table"))
    return rows


def main(path: str) -> int:
    run = next(r for r in (json.loads(line) for line in open(path, encoding="utf-8") if line.strip()) if r["seed"] == 0)
    bad, worst, rows = 0, 0.0, few_shot_rows(run) + domain_rows(run)
    for name, chapter, mine, kind in rows:
        if kind == "full":
            diff = abs(chapter - mine)
            worst = max(worst, diff)
            ok = diff <= 1e-9 * max(1.0, abs(chapter))
            shown = f"{chapter!r} vs {mine!r} (|difference| {diff:.1e})"
        elif kind == "table":
            ok = chapter == mine
            shown = f"{len(mine)} rows " + ("identical" if ok else "differ:\n  " + "\n  ".join(chapter + mine))
        else:
            ok = chapter == mine
            shown = f"{chapter!r} vs {mine!r}"
        bad += not ok
        print(("OK  " if ok else "DIFF") + f" {name}: {shown}")
    print(f"{len(rows)} comparisons, {bad} differ; largest difference of a full-precision value {worst:.1e}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
