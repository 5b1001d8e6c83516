"""Elastic warps on top of the affine distortions: a pilot for Omniglot's within-alphabet runs (issue 20).

The affine distortions of ``--distort`` (:func:`metabp.episodes.distort_images`) move a drawing as a whole.
Another person's drawing of a character also bends locally. This script adds a smooth random warp to
every distorted drawing: a displacement of up to ``E * 1.5`` pixels per 28, in each direction, drawn
uniformly at the 4 x 4 points of a coarse grid and interpolated bicubically over the image, applied after
the affine map (its random numbers are drawn after the affine map's, from the same generator). It is a
pilot, not a library option: it replaces ``distort_images`` for the length of the process.

    # test-time copies with the warp, for the committed learner (rows LEARNER_tta16_elasticE)
    OMP_NUM_THREADS=1 METABP_DATA=../shared/data python benchmarks/elastic_pilot.py tta --elastic 1 \\
        --checkpoint lake96=notebooks/checkpoints/omniglot_lake96.pt --out benchmarks/lake_pilot.jsonl

    # the one-thread 1,500-update pilot of benchmarks/lake_pilot.txt (64 filters, 56 pixels, mirror images,
    # --distort 1) with the warp in training
    OMP_NUM_THREADS=1 METABP_DATA=../shared/data python benchmarks/elastic_pilot.py train --elastic 1 --out PILOT.pt

A checkpoint of ``train`` is an ordinary prototypical-network checkpoint (the warp is not recorded in its
configuration), scored by ``benchmarks/lake_runs.py --checkpoint NAME=PILOT.pt [--augment 16]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

CELLS = 4  # control points per side of the warp's coarse grid
PIXELS = 1.5  # largest displacement at strength 1, in pixels per 28


def with_elastic(affine, elastic: float):
    """``distort_images`` followed by a smooth random warp of strength ``elastic`` (0 to 2)."""

    def distort(x: Tensor, strength: float, generator: torch.Generator | None = None) -> Tensor:
        y = affine(x, strength, generator)
        if elastic == 0 or strength == 0:
            return y
        flat = y.reshape(-1, *y.shape[-3:])
        n, _, h, w = flat.shape
        shift = torch.rand(n, 2, CELLS, CELLS, generator=generator).mul_(2).sub_(1).mul_(elastic * PIXELS * 2 / 28)
        field = F.interpolate(shift, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        identity = F.affine_grid(torch.eye(2, 3).expand(n, 2, 3), list(flat.shape), align_corners=False)
        warped = F.grid_sample(
            flat, identity + field.to(flat), mode="bilinear", padding_mode="zeros", align_corners=False
        )
        return warped.reshape(y.shape)

    return distort


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["train", "tta"])
    parser.add_argument("--elastic", type=float, required=True, help="strength of the warp, 0 to 2")
    parser.add_argument("--out", type=Path, required=True, help="train: checkpoint to write; tta: JSON lines to append")
    parser.add_argument("--checkpoint", default=None, metavar="NAME=PATH", help="tta: the learner to score")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="tta: run sets")
    parser.add_argument("--iterations", type=int, default=1500, help="train: updates (default 1500)")
    args = parser.parse_args(argv)
    if not 0 <= args.elastic <= 2:
        parser.error(f"--elastic must be from 0 to 2, got {args.elastic}")
    if args.mode == "tta" and args.checkpoint is None:
        parser.error("tta needs --checkpoint NAME=PATH")

    import metabp.episodes as episodes

    episodes.distort_images = with_elastic(episodes.distort_images, args.elastic)  # read at call time
    torch.set_num_threads(1)
    if args.mode == "train":
        from metabp.fewshot import FewShotConfig, train
        from metabp.omniglot import load_split

        config = FewShotConfig(
            algorithm="protonet", distort=1.0, hidden=64, image_size=56, mirrors=True, iterations=args.iterations
        )
        start = time.perf_counter()
        _, history = train(config, load_split("small1", "train", size=56), out=args.out, progress=False)
        final = sum(history.loss[-50:]) / len(history.loss[-50:])
        seconds = time.perf_counter() - start
        print(f"elastic {args.elastic:g}: {args.iterations} updates in {seconds:.0f} s, final loss {final:.3f}")
        return 0

    # scored as benchmarks/lake_runs.py scores any learner, with 16 copies that now also bend
    sys.path.insert(0, str(Path(__file__).parent))
    import lake_runs

    name, path = args.checkpoint.split("=", 1)
    seeds = [str(seed) for seed in args.seeds]
    return lake_runs.main(
        ["--checkpoint", f"{name}_tta16_elastic{args.elastic:g}={path}", "--augment", "16", "--seeds", *seeds]
        + ["--out", str(args.out)]
    )


if __name__ == "__main__":
    raise SystemExit(main())
