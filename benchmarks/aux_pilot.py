"""An auxiliary classification loss: a pilot for Omniglot's within-alphabet runs (issue 20).

A prototypical network's training task compares 20 characters drawn at random from the 1,088 training
classes (136 characters of small1, each at four rotations and mirrored), so two characters of one alphabet
rarely meet in a task, and the test runs ask for exactly that distinction. This pilot adds to every update
a cross-entropy over *all* 1,088 classes at once: a linear layer on the network's features, trained with it,
classifies every drawing of the update's tasks (support and query) among every training class, with weight
``--weight`` beside the prototypical loss. The layer is dropped from the checkpoint at the end, so the
checkpoint is an ordinary prototypical network, scored by
``benchmarks/lake_runs.py --checkpoint NAME=PILOT.pt [--augment 16]``. It is a pilot, not a library option:
it replaces the model builder, the task sampler and the update step of :func:`metabp.fewshot.train` for the
length of the process.

    # the one-thread 1,500-update pilot of benchmarks/lake_pilot.txt (64 filters, 56 pixels, mirror images,
    # --distort 1) with the auxiliary loss at weight 1
    OMP_NUM_THREADS=1 METABP_DATA=../shared/data python benchmarks/aux_pilot.py --weight 1 --out PILOT.pt
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weight", type=float, required=True, help="weight of the auxiliary loss (> 0)")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint to write")
    parser.add_argument("--iterations", type=int, default=1500, help="updates (default 1500)")
    args = parser.parse_args(argv)
    if not args.weight > 0:
        parser.error(f"--weight must be a number above 0, got {args.weight}")

    import metabp.fewshot as fewshot
    from metabp import checkpoint, protonet
    from metabp.fewshot import FewShotConfig, train
    from metabp.omniglot import load_split

    torch.set_num_threads(1)
    classes = load_split("small1", "train", size=56)
    config = FewShotConfig(
        algorithm="protonet", distort=1.0, hidden=64, image_size=56, mirrors=True, iterations=args.iterations
    )
    n_classes = 2 * len(classes)  # train adds the mirror images
    drawn: dict[str, Tensor] = {}  # the classes of the last tasks drawn, (tasks, ways) indices into the classes

    class Recording(fewshot.EpisodeSampler):
        def sample(self, num_tasks: int, generator: torch.Generator | None = None):
            batch = super().sample(num_tasks, generator)
            assert self.last_classes is not None
            drawn["classes"] = self.last_classes
            return batch

    build = fewshot.build_model

    def build_with_classifier(config: FewShotConfig):
        model = build(config)
        model.aux = nn.Linear(config.hidden, n_classes)  # a parameter of the model, so Adam updates it
        return model

    def step(model, optimizer, batch, config: FewShotConfig) -> float:
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros(())
        for task, (x_spt, y_spt, x_qry, y_qry) in enumerate(zip(*batch, strict=True)):
            z = model.embed(torch.cat([x_spt, x_qry]))  # one batch per task, as protonet.loss embeds it
            z_spt, z_qry = z[: len(x_spt)], z[len(x_spt) :]
            distances = (z_qry.unsqueeze(1) - protonet.prototypes(z_spt, y_spt, config.ways).unsqueeze(0)).pow(2)
            labels = drawn["classes"][task][torch.cat([y_spt, y_qry])]  # each drawing's training class
            total = total + (
                F.cross_entropy(-distances.sum(-1), y_qry) + args.weight * F.cross_entropy(model.aux(z), labels)
            )
        loss = total / len(batch.x_spt)
        loss.backward()
        optimizer.step()
        return loss.item()

    fewshot.EpisodeSampler, fewshot.build_model, fewshot.train_step = Recording, build_with_classifier, step
    start = time.perf_counter()
    _, history = train(config, classes, out=args.out, progress=False)
    seconds = time.perf_counter() - start
    final = sum(history.loss[-50:]) / len(history.loss[-50:])
    state = checkpoint.load(args.out)
    state["model"] = {k: v for k, v in state["model"].items() if not k.startswith("aux.")}
    checkpoint.save(args.out, state)
    print(f"weight {args.weight:g}: {args.iterations} updates in {seconds:.0f} s, final loss {final:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
