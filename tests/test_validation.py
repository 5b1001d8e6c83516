"""Bad input raises ValueError naming the argument."""

import pytest

from metabp.bilevel import InnerLoop, make_optimizer, meta_loss
from metabp.data import dataset_dir
from metabp.evaluation import adaptation_curve, mean_ci
from metabp.models import MetaLearner, SineNet
from metabp.tasks import BlobTasks, SinusoidTasks, TaskBatch
from metabp.training import meta_train


@pytest.mark.parametrize(
    "factory, name",
    [
        (lambda: BlobTasks(ways=1), "ways"),
        (lambda: BlobTasks(ways=2.5), "ways"),
        (lambda: BlobTasks(shots=0), "shots"),
        (lambda: SinusoidTasks(shots=-1), "shots"),
        (lambda: SinusoidTasks(queries=0), "queries"),
        (lambda: SinusoidTasks(amplitude=(5.0, 0.1)), "amplitude"),
        (lambda: InnerLoop(inner_steps=-1), "inner_steps"),
        (lambda: InnerLoop(inner_steps=1.5), "inner_steps"),
        (lambda: InnerLoop(inner_lr=0.0), "inner_lr"),
        (lambda: InnerLoop(inner_lr=float("nan")), "inner_lr"),
        (lambda: InnerLoop(loss="hinge"), "loss"),
        (lambda: InnerLoop(adapt_only="head"), "adapt_only"),
        (lambda: make_optimizer(SineNet().parameters(), meta_lr=-1.0), "meta_lr"),
        (lambda: make_optimizer(SineNet().parameters(), name="lbfgs"), "optimizer"),
        (lambda: MetaLearner(0, 4, 1), "input_dim"),
        (lambda: mean_ci([1.0]), "values"),
        (lambda: dataset_dir("../etc"), "name"),
        (lambda: meta_train(SineNet(), SinusoidTasks(), InnerLoop(), iterations=0), "iterations"),
        (
            lambda: meta_train(SineNet(), SinusoidTasks(), InnerLoop(), iterations=1, meta_batch_size=0),
            "meta_batch_size",
        ),
    ],
)
def test_bad_arguments_name_themselves(factory, name):
    with pytest.raises(ValueError, match=name):
        factory()


def test_bad_shapes_are_named():
    b = SinusoidTasks().sample(3)
    model, inner = SineNet(), InnerLoop()
    from metabp.bilevel import get_params

    with pytest.raises(ValueError, match="y_qry"):
        meta_loss(model, get_params(model), TaskBatch(b.x_spt, b.y_spt, b.x_qry, b.y_qry[:2]), inner)
    with pytest.raises(ValueError, match="y_spt"):
        meta_loss(model, get_params(model), TaskBatch(b.x_spt, b.y_spt[:, :3], b.x_qry, b.y_qry), inner)
    with pytest.raises(ValueError, match="x_spt"):
        meta_loss(model, get_params(model), TaskBatch(b.x_spt[0], b.y_spt, b.x_qry, b.y_qry), inner)
    with pytest.raises(ValueError, match="steps"):
        adaptation_curve(model, b, inner, steps=[5, 1])
    with pytest.raises(ValueError, match="metric"):
        adaptation_curve(model, b, inner, steps=[1], metric="f1")
