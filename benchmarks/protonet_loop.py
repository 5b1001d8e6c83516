"""A prototypical network's meta-update on a CPU: tasks mapped with vmap, or a Python loop over them.

``metabp.protonet.loss(..., vectorize=False)`` loops over the episodes of a meta-batch; the default
maps them with ``torch.func.vmap``. Both compute the same loss and gradients (printed: the largest
difference). This prints the time of one forward and backward pass of each on a Conv4 (64 filters,
eight 20-way 1-shot episodes with one query per class, the committed within-alphabet learner's
shape) at 28 and 56 pixels, and the ratio vmap / loop (above 1: the loop is faster):

    OMP_NUM_THREADS=2 python benchmarks/protonet_loop.py [--threads 2] [--repeats 20]

Run it alone: other processes on the same cores change the times, not only their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time


def grads(model, batch, vectorize: bool):
    """The loss and the parameters' gradients of one pass."""
    from metabp import protonet

    model.zero_grad(set_to_none=True)
    loss = protonet.loss(model, batch, vectorize=vectorize)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--repeats", type=int, default=20, help="timed passes per variant (default 20)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[28, 56], help="image sizes (default 28 56)")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.repeats < 3:
        parser.error("--threads must be >= 1 and --repeats >= 3")

    import torch

    from metabp.convnet import Conv4
    from metabp.tasks import TaskBatch

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats} passes")
    print("size  vmap ms  loop ms  vmap/loop  max |loss diff|  max |grad diff|")
    for size in args.sizes:
        g = torch.Generator().manual_seed(0)
        model = Conv4(20, 64)
        labels = torch.arange(20).expand(8, 20).contiguous()
        batch = TaskBatch(
            torch.rand(8, 20, 1, size, size, generator=g), labels, torch.rand(8, 20, 1, size, size, generator=g), labels
        )

        times = {}
        for vectorize in (True, False):
            for _ in range(3):  # warm-up
                grads(model, batch, vectorize)
            seconds = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                grads(model, batch, vectorize)
                seconds.append(time.perf_counter() - start)
            times[vectorize] = statistics.median(seconds)
        (lv, gv), (ll, gl) = grads(model, batch, True), grads(model, batch, False)
        grad_diff = max(float((a - b).abs().max()) for a, b in zip(gv, gl, strict=True))
        print(
            f"{size:4d}  {1000 * times[True]:7.0f}  {1000 * times[False]:7.0f}  {times[True] / times[False]:9.2f}"
            f"  {float((lv - ll).abs()):15.2e}  {grad_diff:15.2e}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
