"""MAML for reinforcement learning: a differentiable REINFORCE inner step (Finn et al., 2017).

The bilevel loop of :mod:`metabp.bilevel` with trajectories in place of support and
query sets. For each task (a goal of :class:`~metabp.navigation.Navigation2D`):

1. sample ``N`` trajectories with the meta-parameters ``theta`` (the "support" set);
2. take ``inner_steps`` policy-gradient steps ``theta' = theta + alpha * g(theta)``,
   where ``g`` is the gradient of an inner surrogate (:func:`surrogate`), kept in
   the graph so that ``theta'`` is a differentiable function of ``theta``;
3. sample ``N`` new trajectories with ``theta'`` (the "query" set) and score them
   with an outer surrogate whose gradient reaches ``theta`` through step 2.

Parameters are dicts of tensors evaluated with ``torch.func.functional_call``;
per-task gradients come from ``torch.func.grad`` mapped over tasks with ``vmap``.

The outer optimiser is Adam on a clipped surrogate (PPO, Schulman et al., 2017),
a few epochs per batch, in place of the paper's TRPO; ``outer_epochs=1`` with no
clipping is vanilla policy gradient with Adam. ``inner_steps=0`` trains one policy
on all goals without meta-learning (the paper's "pretrained" baseline).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.func import vmap

from .bilevel import InnerLoop, Params, get_params, inner_step
from .checks import nonnegative_int, one_of, positive_float, positive_int
from .navigation import (
    Navigation2D,
    Steps,
    Trajectories,
    advantages,
    log_prob,
    pack,
    rollout,
    rollout_lockstep,
    rollout_steps,
)
from .training import History, fit

if TYPE_CHECKING:
    from .distributed import TaskShard

ESTIMATORS = ("naive", "lvc")


def surrogate(logp: Tensor, old_logp: Tensor | None, adv: Tensor, mask: Tensor, estimator: str = "lvc") -> Tensor:
    """Inner policy-gradient objective (to maximise), mean over the valid steps.

    ``naive``: ``mean(log pi(a|s) * A)``, the REINFORCE surrogate MAML's code
    differentiates. Its gradient is the policy gradient, but its Hessian lacks the
    ``grad log pi grad log pi^T * A`` term that comes from the sampling distribution
    depending on ``theta``.

    ``lvc``: ``mean(pi(a|s) / pi_old(a|s) * A)`` with ``pi_old`` detached, the per-step
    magic box of DiCE (Foerster et al., 2018) as in ProMP's low-variance curvature
    estimator (Rothfuss et al., 2019). Same value and gradient at ``pi = pi_old``,
    and its Hessian carries the score outer product of every step (not the
    cross-step terms, which full DiCE adds at the price of variance).

    ``old_logp=None`` means that ``logp`` is evaluated at the parameters that played the
    steps, so ``pi_old`` is ``logp`` itself, detached (one forward pass fewer).
    """
    one_of("estimator", estimator, ESTIMATORS)
    if estimator == "naive":
        weight = logp
    else:
        weight = (logp - (logp if old_logp is None else old_logp).detach()).exp()
    return (weight * adv * mask).sum() / mask.sum()


@dataclass(frozen=True)
class MetaRL:
    """Settings of meta-RL training (defaults: MAML's 2D navigation, Adam-PPO outer loop).

    Args:
        inner_lr: alpha, step size of the inner policy-gradient step (0.1).
        inner_steps: inner steps during meta-training (1; 0 trains without meta-learning).
        num_trajectories: trajectories per task and per step (20).
        meta_batch_size: tasks per meta-iteration (20).
        meta_lr: Adam's step size for the outer loop.
        std_lr: Adam's step size for the policy's ``log_std`` (``None``: ``meta_lr``). Adam
            moves each parameter by about its step size per step, so the single log-std
            needs a larger one to shrink the exploration noise in time (TRPO's natural
            gradient does this by itself).
        outer_epochs: outer Adam steps per batch of trajectories.
        clip: PPO ratio clipping epsilon (``None``: no clipping).
        gamma: discount of the reward-to-go in the advantages.
        estimator: inner surrogate, 'lvc' or 'naive' (see :func:`surrogate`).
        cosine: decay both Adam step sizes to zero along a cosine over the run
            (:func:`meta_train`'s ``iterations``), which averages out the noise of the
            last updates.
        count_steps: count each goal's batch in environment steps, as MAML's released
            trainer does: whole episodes until the goal has ``num_trajectories x horizon``
            steps (:func:`~metabp.navigation.rollout_steps`), so a batch holds more
            episodes once they end early. ``False``: exactly ``num_trajectories`` episodes.
    """

    inner_lr: float = 0.1
    inner_steps: int = 1
    num_trajectories: int = 20
    meta_batch_size: int = 20
    meta_lr: float = 1e-3
    std_lr: float | None = 1e-2
    outer_epochs: int = 5
    clip: float | None = 0.2
    gamma: float = 0.99
    estimator: str = "lvc"
    cosine: bool = False
    count_steps: bool = False

    def __post_init__(self) -> None:
        positive_float("inner_lr", self.inner_lr)
        nonnegative_int("inner_steps", self.inner_steps)
        positive_int("num_trajectories", self.num_trajectories)
        positive_int("meta_batch_size", self.meta_batch_size)
        positive_float("meta_lr", self.meta_lr)
        if self.std_lr is not None:
            positive_float("std_lr", self.std_lr)
        positive_int("outer_epochs", self.outer_epochs)
        if self.clip is not None:
            positive_float("clip", self.clip)
        positive_float("gamma", self.gamma)
        one_of("estimator", self.estimator, ESTIMATORS)


def support_steps(
    policy: nn.Module,
    params: Params,
    traj: Trajectories,
    gamma: float,
    batched: bool,
    log_probs: bool = True,
) -> tuple[Steps, Tensor | None]:
    """Pack ``traj`` with its advantages, and the log-probabilities under ``params`` (detached).

    ``log_probs=False`` skips the log-probabilities (returns ``None`` for them), for a
    loss that is evaluated at ``params`` themselves (see :func:`surrogate`).
    """
    with torch.no_grad():
        steps = pack(traj, advantages(traj, gamma))
        return steps, (log_prob(policy, params, steps.obs, steps.act, batched) if log_probs else None)


def adapt(
    policy: nn.Module,
    params: Params,
    steps: Steps,
    old_logp: Tensor | None,
    inner_lr: float,
    estimator: str = "lvc",
    batched: bool = False,
) -> Params:
    """One inner step per task: ``theta'_b = theta + inner_lr * grad surrogate_b(theta)``.

    The core's :func:`~metabp.bilevel.inner_step` with the negative surrogate as its
    objective (it descends; the surrogate is to be ascended), mapped over tasks.
    ``steps`` and ``old_logp`` hold ``B`` tasks (``old_logp=None``: ``params`` played
    ``steps``, see :func:`surrogate`); ``params`` are shared (``batched=False``) or per
    task. Returns per-task parameters (leading dim ``B``), differentiable with respect to
    ``params`` unless called under ``torch.no_grad``.
    """
    inner = InnerLoop(inner_lr=inner_lr)

    def one_task(p: Params, obs: Tensor, act: Tensor, adv: Tensor, mask: Tensor, old: Tensor | None) -> Params:
        def objective(q: Params) -> Tensor:
            return -surrogate(log_prob(policy, q, obs, act), old, adv, mask, estimator)

        return inner_step(policy, p, None, None, inner, objective=objective)

    in_dims = (0 if batched else None, 0, 0, 0, 0, None if old_logp is None else 0)
    return vmap(one_task, in_dims=in_dims)(dict(params), *steps, old_logp)


def outer_loss(
    policy: nn.Module,
    params: Params,
    steps: Steps,
    old_logp: Tensor | None,
    clip: float | None,
    count: Tensor | None = None,
) -> Tensor:
    """Negative (clipped) surrogate of query steps under per-task ``params``, mean over steps.

    ``old_logp=None``: the detached ``params`` played ``steps`` (the ratio is then 1).
    ``count``: the number of steps to divide by (default those of ``steps``; a process
    holding a share of the tasks passes the count of all of them).
    """
    logp = log_prob(policy, params, steps.obs, steps.act, batched=True)
    ratio = (logp - (logp.detach() if old_logp is None else old_logp)).exp()
    gain = ratio * steps.adv
    if clip is not None:
        gain = torch.minimum(gain, ratio.clamp(1 - clip, 1 + clip) * steps.adv)
    return -(gain * steps.mask).sum() / (steps.mask.sum() if count is None else count)


def meta_iteration(
    env: Navigation2D,
    policy: nn.Module,
    optimizer: torch.optim.Optimizer,
    goals: Tensor,
    cfg: MetaRL,
    generator: torch.Generator | None = None,
    shard: TaskShard | None = None,
) -> tuple[float, float]:
    """Sample, adapt, sample again, and take ``cfg.outer_epochs`` outer steps.

    The first epoch builds the adapted parameters with their graph and rolls out
    their detached values; later epochs rebuild them from the current ``theta`` on
    the same trajectories (the ``lvc`` ratio keeps the inner gradient valid there).
    With ``inner_steps=0`` the loss is the clipped surrogate of ``theta`` itself.
    Returns the mean return before and after adaptation.

    ``shard`` (a :class:`metabp.distributed.TaskShard`, see
    :func:`metabp.distributed.shard_iteration`): ``goals`` are this process's share of
    the meta-batch; episodes, outer loss and returns are then those of the whole batch.
    """
    params = get_params(policy)
    min_steps = cfg.num_trajectories * env.horizon if cfg.count_steps else None
    traj = _play(env, policy, params, goals, cfg.num_trajectories, min_steps, generator, False, shard=shard)
    first = _mean_return(traj, shard)
    support: list[tuple[Steps, Tensor | None]] = []
    # One epoch differentiates at the parameters that played: no old log-probabilities needed.
    keep_old = cfg.outer_epochs > 1
    for epoch in range(cfg.outer_epochs):
        p, batched = params, False
        for k in range(cfg.inner_steps):
            if epoch == 0:
                support.append(support_steps(policy, p, traj, cfg.gamma, batched, keep_old))
            p, batched = adapt(policy, p, *support[k], cfg.inner_lr, cfg.estimator, batched), True
            if epoch == 0:
                traj = _play(env, policy, p, goals, cfg.num_trajectories, min_steps, generator, True, shard=shard)
        if epoch == 0:
            query = support_steps(policy, p, traj, cfg.gamma, batched, keep_old)
            count = None if shard is None else shard.sum(query[0].mask.sum())
        if not batched:
            p = {k: v.expand((goals.shape[0],) + v.shape) for k, v in p.items()}
        optimizer.zero_grad(set_to_none=True)
        outer_loss(policy, p, *query, cfg.clip, count).backward()
        optimizer.step()
    return first, _mean_return(traj, shard)


def _mean_return(traj: Trajectories, shard: TaskShard | None) -> float:
    """Mean over tasks of each task's mean return (over every process's tasks with ``shard``)."""
    if shard is None:
        return traj.mean_return().mean().item()
    return (shard.sum(traj.mean_return().sum()) / shard.total).item()


def meta_train(
    env: Navigation2D,
    policy: nn.Module,
    cfg: MetaRL,
    iterations: int,
    seed: int = 0,
    callback: Callable[[int, History], None] | None = None,
    progress: bool = False,
    resume: dict | None = None,
    stop_after: int | None = None,
) -> History:
    """Meta-train ``policy`` in place for ``iterations`` meta-iterations (fresh goals each), on
    :func:`metabp.training.fit`.

    Returns a :class:`~metabp.training.History` whose metrics ``before`` and ``after``
    (also ``history.before``, ``history.after``) are the mean returns of every iteration
    before and after adaptation. ``callback(iteration, history)`` runs after every
    iteration (1-based). ``resume`` (a ``history.state``, or a checkpoint of one) and
    ``stop_after`` continue and interrupt a run as in :func:`~metabp.training.fit`.
    A non-finite gradient (checked before every update) or return raises
    :class:`~metabp.checks.DivergenceError`.
    """
    positive_int("iterations", iterations)
    generator = torch.Generator().manual_seed(seed)
    std = [p for n, p in policy.named_parameters() if n == "log_std"]
    rest = [p for n, p in policy.named_parameters() if n != "log_std"]
    groups: list[dict[str, Any]] = [{"params": rest}, {"params": std, "lr": cfg.std_lr or cfg.meta_lr}]
    optimizer = torch.optim.Adam(groups, lr=cfg.meta_lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, iterations) if cfg.cosine else None

    def step(goals: Tensor) -> dict[str, float]:
        before, after = meta_iteration(env, policy, optimizer, goals, cfg, generator)
        return {"before": before, "after": after}

    rates = {"inner_lr": cfg.inner_lr, "meta_lr": cfg.meta_lr, "std_lr": cfg.std_lr or cfg.meta_lr}
    return fit(
        step,
        lambda gen: env.sample_goals(cfg.meta_batch_size, gen),
        iterations,
        optimizer,
        generator,
        schedule,
        updates_itself=True,
        learning_rates=rates,
        callback=callback,
        model=policy,
        resume=resume,
        stop_after=stop_after,
        progress=progress,
        desc="meta-RL",
        mininterval=1.0,
    )


def adapted_without_graph(
    policy: nn.Module,
    params: Params,
    traj: Trajectories,
    inner_lr: float,
    estimator: str = "lvc",
    gamma: float = 0.99,
    batched: bool = False,
    chunk: int = 10,
) -> Params:
    """One inner step per task, as :func:`adapt`, for evaluation: no graph, ``chunk`` tasks at a time.

    ``params`` must be the parameters that played ``traj`` (their log-probabilities are
    then those of the same forward pass, see :func:`surrogate`). Tasks are independent,
    so splitting them changes no value; it bounds the memory of a pass
    (``chunk x N x T x hidden`` floats per activation) however many goals are evaluated.
    """
    positive_float("inner_lr", inner_lr)
    positive_int("chunk", chunk)
    pieces = []
    with torch.no_grad():
        for start in range(0, traj.goal.shape[0], chunk):
            part = Trajectories(*(x[start : start + chunk] for x in traj))
            p = {k: v[start : start + chunk] for k, v in params.items()} if batched else params
            steps, _ = support_steps(policy, p, part, gamma, batched, log_probs=False)
            pieces.append(adapt(policy, p, steps, None, inner_lr, estimator, batched))
    return {k: torch.cat([piece[k] for piece in pieces]) for k in pieces[0]}


def _play(
    env: Navigation2D,
    policy: nn.Module,
    params: Params,
    goals: Tensor,
    num_trajectories: int,
    min_steps: int | None,
    generator: torch.Generator | None,
    batched: bool,
    lockstep: bool = False,
    shard: TaskShard | None = None,
) -> Trajectories:
    """``num_trajectories`` episodes per goal, or (``min_steps`` set) :func:`rollout_steps` in rounds of that many,
    or (``lockstep`` too) :func:`rollout_lockstep` on that many slots."""
    if min_steps is None:
        if lockstep:
            raise ValueError("lockstep=True fills batches counted in steps: it needs min_steps, got None")
        return rollout(env, policy, params, goals, num_trajectories, generator, batched=batched, shard=shard)
    if lockstep:
        return rollout_lockstep(env, policy, params, goals, min_steps, num_trajectories, generator, batched=batched)
    return rollout_steps(env, policy, params, goals, min_steps, num_trajectories, generator, batched=batched)


def _continue_adaptation(
    env: Navigation2D,
    policy: nn.Module,
    params: Params,
    batched: bool,
    last: Trajectories,
    inner_lrs: Sequence[float],
    num_trajectories: int,
    generator: torch.Generator | None,
    estimator: str,
    gamma: float,
    min_steps: int | None = None,
    lockstep: bool = False,
) -> tuple[list[Trajectories], Params]:
    """From ``params`` and the episodes ``last`` they played: one step and one rollout per step size.

    Returns the new episodes and the parameters after the last step.
    """
    out = []
    for lr in inner_lrs:
        params = adapted_without_graph(policy, params, last, lr, estimator, gamma, batched)
        batched = True
        last = _play(env, policy, params, last.goal, num_trajectories, min_steps, generator, True, lockstep)
        out.append(last)
    return out, params


def _adaptation(
    env: Navigation2D,
    policy: nn.Module,
    goals: Tensor,
    inner_lrs: Sequence[float],
    num_trajectories: int,
    generator: torch.Generator | None,
    estimator: str,
    gamma: float,
    min_steps: int | None = None,
    lockstep: bool = False,
) -> tuple[list[Trajectories], Params]:
    """:func:`adaptation_returns`, and the parameters after the last step."""
    p: Params = {k: v.detach() for k, v in get_params(policy).items()}
    first = _play(env, policy, p, goals, num_trajectories, min_steps, generator, False, lockstep)
    rest, p = _continue_adaptation(
        env, policy, p, False, first, inner_lrs, num_trajectories, generator, estimator, gamma, min_steps, lockstep
    )
    return [first] + rest, p


def adaptation_returns(
    env: Navigation2D,
    policy: nn.Module,
    goals: Tensor,
    inner_lrs: Sequence[float],
    num_trajectories: int = 20,
    generator: torch.Generator | None = None,
    estimator: str = "lvc",
    gamma: float = 0.99,
    min_steps: int | None = None,
    lockstep: bool = False,
) -> list[Trajectories]:
    """Trajectories after 0, 1, ..., ``len(inner_lrs)`` adaptation steps on each goal.

    Step ``k`` uses the trajectories of step ``k - 1`` and step size ``inner_lrs[k-1]``
    (MAML evaluates with 0.1, then 0.05). Each step plays ``num_trajectories`` episodes
    per goal or, with ``min_steps``, whole episodes until the goal has played that many
    steps (:func:`~metabp.navigation.rollout_steps`; MAML's released evaluation: 4000).
    ``lockstep=True`` (with ``min_steps``) fills each batch as MAML's released evaluation
    did, on ``num_trajectories`` environments stepped side by side, keeping only the
    episodes finished when ``min_steps`` is reached (:func:`~metabp.navigation.rollout_lockstep`;
    there: 40). ``result[k].mean_return()`` is each goal's mean return ``(B,)``.
    """
    return _adaptation(
        env, policy, goals, inner_lrs, num_trajectories, generator, estimator, gamma, min_steps, lockstep
    )[0]


def choose_step_sizes(
    env: Navigation2D,
    policy: nn.Module,
    goals: Tensor,
    first: float,
    factors: Sequence[float],
    num_trajectories: int = 20,
    generator: torch.Generator | None = None,
    estimator: str = "lvc",
    gamma: float = 0.99,
    min_steps: int | None = None,
    lockstep: bool = False,
) -> tuple[list[float], dict[float, list[float]]]:
    """Pick the step sizes of adaptation steps 2 and 3 on validation goals.

    Each candidate schedule is ``[first, f * first, f * first / 2]`` for ``f`` in
    ``factors`` (MAML halves the step size after the first step; this lets the
    validation goals say by how much). Returns the schedule with the highest mean of the
    returns after steps 2 and 3 on ``goals``, and every candidate's mean returns after
    0..3 steps (episodes per step as in :func:`adaptation_returns`). Steps 0 and 1 are the
    same for every candidate and are played once, with a generator seeded from one draw
    of ``generator``; each candidate then goes on from that generator's state, so all
    candidates also share the random numbers of steps 2 and 3 (:func:`adaptation_returns`
    with that seed gives the same episodes).
    """
    positive_float("first", first)
    if not factors:
        raise ValueError("factors must name at least one candidate, got an empty sequence")
    seed = int(torch.randint(2**31 - 1, (1,), generator=generator).item())
    schedules = {positive_float("factor", f): [first, f * first, f * first / 2] for f in factors}
    shared = torch.Generator().manual_seed(seed)
    start, adapted = _adaptation(
        env, policy, goals, [first], num_trajectories, shared, estimator, gamma, min_steps, lockstep
    )
    state = shared.get_state()
    table: dict[float, list[float]] = {}
    for f, lrs in schedules.items():
        shared.set_state(state)
        rest, _ = _continue_adaptation(
            env,
            policy,
            adapted,
            True,
            start[1],
            lrs[1:],
            num_trajectories,
            shared,
            estimator,
            gamma,
            min_steps,
            lockstep,
        )
        table[f] = [t.mean_return().mean().item() for t in start + rest]
    best = max(table, key=lambda f: table[f][2] + table[f][3])
    return schedules[best], table
