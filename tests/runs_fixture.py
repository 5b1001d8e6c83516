"""A stand-in for Lake et al.'s ``all_runs`` in exactly the published layout.

The real runs are not available offline, so tests build 20 runs of random
pen strokes: ``runNN/training/class01..20.png``, ``runNN/test/item01..20.png``
(105x105, black ink on white, like Omniglot) and ``runNN/class_labels.txt`` with
lines ``runNN/test/itemXX.png runNN/training/classYY.png``. Each test item is
its class's training image, so a learner that matches identical images makes no
errors.
"""

from __future__ import annotations

import random
import zipfile
from pathlib import Path

from PIL import Image, ImageDraw


def _strokes(rng: random.Random) -> Image.Image:
    im = Image.new("L", (105, 105), 255)
    draw = ImageDraw.Draw(im)
    for _ in range(rng.randint(2, 4)):
        points = [(rng.randint(10, 95), rng.randint(10, 95)) for _ in range(rng.randint(2, 4))]
        draw.line(points, fill=0, width=4)
    return im.convert("1")


def make_runs(folder: Path, seed: int = 0) -> dict[str, list[int]]:
    """Write the 20 runs under ``folder``; return each run's answers (class index per item, from 0)."""
    rng = random.Random(seed)
    answers = {}
    for r in range(1, 21):
        name = f"run{r:02d}"
        (folder / name / "training").mkdir(parents=True)
        (folder / name / "test").mkdir()
        classes = [_strokes(rng) for _ in range(20)]
        for c, im in enumerate(classes, 1):
            im.save(folder / name / "training" / f"class{c:02d}.png")
        order = list(range(20))
        rng.shuffle(order)
        lines = []
        for i, c in enumerate(order, 1):
            classes[c].save(folder / name / "test" / f"item{i:02d}.png")
            lines.append(f"{name}/test/item{i:02d}.png {name}/training/class{c + 1:02d}.png")
        (folder / name / "class_labels.txt").write_text("\n".join(lines) + "\n")
        answers[name] = order
    return answers


def zip_runs(folder: Path, zip_path: Path) -> None:
    """Zip the runs of ``folder`` as all_runs.zip is laid out: run01/... at the top."""
    with zipfile.ZipFile(zip_path, "w") as zf:
        for path in sorted(folder.rglob("*")):
            zf.write(path, path.relative_to(folder).as_posix())
