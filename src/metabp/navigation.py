"""MAML's 2D navigation task family, vectorised in torch (Finn et al., 2017, section 5.3).

A point agent starts at the origin and must reach a goal drawn uniformly from the
square ``[-0.5, 0.5]^2``. The observation is its position, the action a velocity
clipped to ``[-max_speed, max_speed]`` per coordinate (``0.1``), the reward the
negative distance to the goal, and an episode ends within ``0.01`` of the goal in
each coordinate (as the authors' released environment tests it) or after ``horizon``
(100) steps. The paper's text says "negative squared distance"; the released
environment and the scale of the paper's returns use the plain distance, which is the
default here (``reward="squared"`` gives the other).

Everything is batched over ``tasks x trajectories``: one :func:`rollout` call plays
``B x N`` episodes in ``horizon`` vectorised steps, with per-task policy
parameters where the policy has been adapted; :func:`rollout_steps` plays whole
episodes until every goal has a number of steps, and :func:`rollout_lockstep` fills such a
batch as the sampler of MAML's released evaluation did (episodes side by side, those still
running when the batch is full dropped). No gym.

Also here: the Gaussian MLP policy, returns-to-go, and the linear feature baseline
of Duan et al. (2016) that MAML fits per task.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .checks import one_of, positive_float, positive_int

if TYPE_CHECKING:
    from .distributed import TaskShard

REWARDS = ("distance", "squared")
TERMINATIONS = ("box", "circle")
INITS = ("glorot", "torch")
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@dataclass(frozen=True)
class Navigation2D:
    """The environment's constants (the dynamics are in :meth:`step`).

    Args:
        goal_low, goal_high: goals are uniform on ``[goal_low, goal_high]^2``.
        max_speed: velocity actions are clipped to ``[-max_speed, max_speed]`` per coordinate.
        horizon: the most steps an episode lasts.
        tolerance: an episode ends once the agent is closer than this to the goal.
        reward: 'distance' (``-|p - g|``, the released code) or 'squared' (``-|p - g|^2``).
        termination: how "closer than ``tolerance``" is measured: 'box', in each coordinate
            (``max |p_i - g_i| < tolerance``, the released code), or 'circle', in Euclidean
            distance (``|p - g| < tolerance``, a disc 21% smaller in area).
    """

    goal_low: float = -0.5
    goal_high: float = 0.5
    max_speed: float = 0.1
    horizon: int = 100
    tolerance: float = 0.01
    reward: str = "distance"
    termination: str = "box"

    def __post_init__(self) -> None:
        if not self.goal_low < self.goal_high:
            raise ValueError(f"goal_low must be < goal_high, got {self.goal_low!r} and {self.goal_high!r}")
        positive_float("max_speed", self.max_speed)
        positive_int("horizon", self.horizon)
        positive_float("tolerance", self.tolerance)
        one_of("reward", self.reward, REWARDS)
        one_of("termination", self.termination, TERMINATIONS)

    def sample_goals(self, num_tasks: int, generator: torch.Generator | None = None) -> Tensor:
        """``num_tasks`` goals, shape ``(num_tasks, 2)``, uniform on the square."""
        positive_int("num_tasks", num_tasks)
        u = torch.rand(num_tasks, 2, generator=generator)
        return self.goal_low + (self.goal_high - self.goal_low) * u

    def released_test_goals(self) -> Tensor:
        """The 40 test goals of MAML's released evaluation script for this task, shape ``(40, 2)``.

        The script draws them with NumPy's legacy generator after ``np.random.seed(1)``,
        uniform on ``[-0.5, 0.5]^2`` (``maml_examples/test_maml_point.py`` in
        github.com/cbfinn/maml_rl). Standing still on them scores -40.08 on the distance
        reward, next to the -40.41 the paper reports before adaptation, which is why the
        book sets its returns on these goals beside the paper's table. Only defined for
        the default square.
        """
        import numpy as np

        if (self.goal_low, self.goal_high) != (-0.5, 0.5):
            raise ValueError(
                "released_test_goals is defined for goals on [-0.5, 0.5]^2 only, "
                f"this environment draws them on [{self.goal_low}, {self.goal_high}]^2"
            )
        state = np.random.RandomState(1)
        return torch.from_numpy(state.uniform(-0.5, 0.5, size=(40, 2))).float()

    def step(self, position: Tensor, action: Tensor, goal: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One step for any batch shape ``(..., 2)``: returns ``(position, reward, done)``.

        The velocity is ``action`` clipped per coordinate; reward and termination are
        computed at the new position.
        """
        position = position + action.clamp(-self.max_speed, self.max_speed)
        offset = position - goal
        dist = offset.norm(dim=-1)
        reward = -dist if self.reward == "distance" else -dist.square()
        done = (offset.abs() < self.tolerance).all(-1) if self.termination == "box" else dist < self.tolerance
        return position, reward, done


class GaussianMLPPolicy(nn.Module):
    """MAML's policy: an MLP with two hidden layers of 100 ReLU units and a Gaussian head.

    The network outputs the mean of a Gaussian with a learned, state-independent
    log standard deviation (initially 0). Both live in units of ``action_scale`` (the
    environment's ``max_speed``), so a unit action is full speed; this is the action
    normalisation of the rllab code MAML used, and it sets what ``inner_lr = 0.1`` means.

    Args:
        obs_dim, act_dim: observation and action sizes (2 and 2).
        hidden: width of each hidden layer (100).
        action_scale: velocity of a unit action.
        init: 'glorot', the initialisation of MAML's released policy (Glorot-uniform
            weights, zero biases), or 'torch', PyTorch's default for ``nn.Linear``, whose
            weights are smaller and whose biases are not zero. The two start training from
            differently scaled mean actions (the released one's are larger).
    """

    def __init__(
        self,
        obs_dim: int = 2,
        act_dim: int = 2,
        hidden: int = 100,
        action_scale: float = 0.1,
        init: str = "glorot",
    ) -> None:
        super().__init__()
        for name, v in (("obs_dim", obs_dim), ("act_dim", act_dim), ("hidden", hidden)):
            positive_int(name, v)
        self.action_scale = positive_float("action_scale", action_scale)
        one_of("init", init, INITS)
        self.net = nn.Sequential(
            nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, act_dim)
        )
        if init == "glorot":
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    nn.init.xavier_uniform_(layer.weight)
                    nn.init.zeros_(layer.bias)
        self.log_std = nn.Parameter(torch.zeros(act_dim))

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean, std)`` of the velocity distribution at ``obs`` (shape ``(..., obs_dim)``)."""
        return self.action_scale * self.net(obs), self.action_scale * self.log_std.exp().expand(obs.shape[:-1] + (-1,))


def distribution(
    policy: nn.Module, params: Mapping[str, Tensor], obs: Tensor, batched: bool = False
) -> tuple[Tensor, Tensor]:
    """``(mean, std)`` of ``policy`` at ``params`` on ``obs``: ``functional_call(policy, params, (obs,))``.

    ``batched=False``: one set of parameters for all of ``obs``. ``batched=True``: every
    parameter has a leading task dimension ``B`` matching ``obs`` ``(B, M, obs_dim)``, as
    after per-task adaptation, and the layers are batched matrix products (what ``vmap``
    over the unbatched call computes); this needs a :class:`GaussianMLPPolicy`. For that
    policy the unbatched call also applies the layers of ``policy.net`` directly: a
    rollout evaluates the policy once per step, and ``functional_call``'s swapping of
    parameters in and out of the module costs more than the arithmetic there (a test
    checks that both give the same values). Any other module goes through ``functional_call``.
    """
    if not isinstance(policy, GaussianMLPPolicy):
        if batched:
            raise ValueError(f"policy must be a GaussianMLPPolicy when batched=True, got {type(policy).__name__}")
        out: tuple[Tensor, Tensor] = functional_call(policy, dict(params), (obs,))
        return out
    x = obs
    for name, layer in policy.net.named_children():
        if isinstance(layer, nn.Linear):
            w, b = params[f"net.{name}.weight"], params[f"net.{name}.bias"]
            x = torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2)) if batched else F.linear(x, w, b)
        else:
            x = layer(x)
    std = params["log_std"].exp()
    scale = policy.action_scale
    return scale * x, scale * (std.unsqueeze(1) if batched else std).expand_as(x)


def gaussian_log_prob(mean: Tensor, std: Tensor, act: Tensor) -> Tensor:
    """Log-density of ``act`` under a diagonal Gaussian, summed over the last dimension."""
    return (-0.5 * ((act - mean) / std).square() - std.log() - HALF_LOG_2PI).sum(-1)


def log_prob(
    policy: nn.Module, params: Mapping[str, Tensor], obs: Tensor, act: Tensor, batched: bool = False
) -> Tensor:
    """Log-density of the (unclipped) actions ``act`` under ``policy`` at ``params``."""
    return gaussian_log_prob(*distribution(policy, params, obs, batched), act)


class Trajectories(NamedTuple):
    """A batch of episodes, shapes ``(B tasks, N trajectories, T steps, ...)``.

    ``obs`` is the position before each action, ``act`` the sampled (unclipped)
    action, ``reward`` the reward after it, and ``mask`` is 1 for the steps that were
    played (0 after the episode ended, and 0 throughout for an episode that was not kept,
    see :func:`rollout_steps` and :func:`rollout_lockstep`). ``goal`` is ``(B, 2)``; ``final`` the position after the
    last step, for plots.
    """

    obs: Tensor
    act: Tensor
    reward: Tensor
    mask: Tensor
    goal: Tensor
    final: Tensor

    def returns(self) -> Tensor:
        """Undiscounted return of every episode, ``(B, N)`` (0 for an episode not kept)."""
        return (self.reward * self.mask).sum(-1)

    def kept(self) -> Tensor:
        """1 for the episodes that count, 0 for those dropped or padding, ``(B, N)``.

        Every kept episode has played its first step, every dropped one none.
        """
        return self.mask[..., 0]

    def mean_return(self) -> Tensor:
        """Mean undiscounted return of each task's kept episodes, ``(B,)``."""
        return self.returns().sum(1) / self.kept().sum(1)

    def path(self) -> Tensor:
        """Positions visited, ``(B, N, T + 1, 2)`` (frozen once an episode ended)."""
        final = self.final.unsqueeze(2)
        return torch.cat([torch.where(self.mask.unsqueeze(-1) > 0, self.obs, final), final], 2)


def _check_goals(goals: Tensor) -> None:
    if goals.dim() != 2 or goals.shape[-1] != 2:
        raise ValueError(f"goals must have shape (tasks, 2), got {tuple(goals.shape)}")


@torch.no_grad()
def rollout(
    env: Navigation2D,
    policy: nn.Module,
    params: Mapping[str, Tensor],
    goals: Tensor,
    num_trajectories: int,
    generator: torch.Generator | None = None,
    batched: bool = False,
    shard: TaskShard | None = None,
) -> Trajectories:
    """Play ``num_trajectories`` episodes on each goal in ``goals`` ``(B, 2)``, all at once.

    ``params`` are shared (``batched=False``) or per task (``batched=True``).
    ``shard`` (a :class:`metabp.distributed.TaskShard`): ``goals`` are this process's
    slice of a larger batch; noise is drawn for the whole batch and sliced, and the
    episodes stop when those of every process have ended, so the slice plays exactly
    what it would play in the whole batch.
    """
    positive_int("num_trajectories", num_trajectories)
    _check_goals(goals)
    params = {k: v.detach() for k, v in params.items()}
    b, n, horizon = goals.shape[0], num_trajectories, env.horizon
    pos = goals.new_zeros(b, n, 2)
    alive = torch.ones(b, n, dtype=goals.dtype)
    goal = goals.unsqueeze(1)
    obs, act, rew, mask = [], [], [], []
    for _ in range(horizon):
        if not (alive.any() if shard is None else shard.any(bool(alive.any()))):
            break
        mean, std = distribution(policy, params, pos, batched)
        if shard is None:
            a = mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        else:
            a = mean + std * shard.noise(mean.shape, generator, mean.dtype)
        new_pos, r, done = env.step(pos, a, goal)
        obs.append(pos)
        act.append(a)
        rew.append(r)
        mask.append(alive)
        pos = torch.where(alive.unsqueeze(-1) > 0, new_pos, pos)
        alive = alive * (~done).to(alive.dtype)
    played = len(obs)

    def stack(xs: list[Tensor]) -> Tensor:  # (B, N, T, ...), zero after the last played step
        x = torch.stack(xs, 2)
        return torch.cat([x, x.new_zeros(x.shape[:2] + (horizon - played,) + x.shape[3:])], 2)

    return Trajectories(stack(obs), stack(act), stack(rew), stack(mask), goals, pos)


def rollout_steps(
    env: Navigation2D,
    policy: nn.Module,
    params: Mapping[str, Tensor],
    goals: Tensor,
    min_steps: int,
    round_size: int,
    generator: torch.Generator | None = None,
    batched: bool = False,
) -> Trajectories:
    """Whole episodes on each goal until it has played at least ``min_steps`` steps.

    A batch is counted in environment steps, not episodes, in MAML's released evaluation
    (4000 steps per adaptation step, rllab's sampler, whole episodes): the more often a
    policy reaches the goal early, the more episodes its batch holds. Episodes are played
    ``round_size`` per goal at a time, the later rounds only for the goals that still need
    steps and with as many episodes as their mean length so far says they need. An
    episode is kept if the goal had played fewer than ``min_steps`` steps before it, so
    each goal keeps the shortest prefix of its episodes that reaches ``min_steps``; the
    rest are masked out (:meth:`Trajectories.kept`). Returns ``(B, N_max, T)`` tensors,
    ``N_max`` the most episodes any goal played.
    """
    positive_int("min_steps", min_steps)
    positive_int("round_size", round_size)
    params = {k: v.detach() for k, v in params.items()}
    b = goals.shape[0]
    rounds = [rollout(env, policy, params, goals, round_size, generator, batched)]
    owners = [torch.arange(b)]
    slots = [[0] * b]  # per round, the first free episode slot of each goal it played
    played = rounds[0].mask.sum((1, 2))
    episodes = torch.full((b,), round_size)
    while bool((played < min_steps).any()):
        need = torch.nonzero(played < min_steps).squeeze(1)
        mean_length = played[need] / episodes[need]
        count = int(((min_steps - played[need]) / mean_length).ceil().max().item())
        sub = {k: v[need] for k, v in params.items()} if batched else params
        more = rollout(env, policy, sub, goals[need], count, generator, batched)
        rounds.append(more)
        owners.append(need)
        slots.append(episodes[need].tolist())
        played[need] += more.mask.sum((1, 2))
        episodes[need] += count
    width = int(episodes.max())

    def merge(name: str) -> Tensor:  # each goal's episodes, round after round, zero-padded to width
        parts: list[Tensor] = [getattr(part, name) for part in rounds]
        out = parts[0].new_zeros((b, width) + parts[0].shape[2:])
        for x, who, first in zip(parts, owners, slots, strict=True):
            for i, (task, start) in enumerate(zip(who.tolist(), first, strict=True)):
                out[task, start : start + x.shape[1]] = x[i]
        return out

    obs, act, reward, mask, final = (merge(name) for name in ("obs", "act", "reward", "mask", "final"))
    length = mask.sum(-1)
    keep = ((length.cumsum(1) - length) < min_steps).to(mask.dtype)
    return Trajectories(obs, act, reward, mask * keep.unsqueeze(-1), goals, final)


@torch.no_grad()
def rollout_lockstep(
    env: Navigation2D,
    policy: nn.Module,
    params: Mapping[str, Tensor],
    goals: Tensor,
    min_steps: int,
    slots: int,
    generator: torch.Generator | None = None,
    batched: bool = False,
) -> Trajectories:
    """Episodes on ``slots`` environments per goal stepped side by side, until ``min_steps`` steps have finished.

    This is how rllab's vectorised sampler fills the batches of MAML's released
    evaluation (``batch_size=4000``, ``max_path_length=100``, so ``4000 / 100 = 40``
    environments): all slots take a step together, a slot whose episode ends starts the
    next one at once, and the sampler stops after the first step at which the episodes
    *finished* so far hold at least ``min_steps`` steps. Only finished episodes are kept;
    the episodes still running in the other slots are dropped. A running episode is more
    likely to be a long one, so once episode lengths differ (after adaptation, when some
    reach the goal early and others do not) the kept episodes favour short, successful
    ones, and their mean return is higher than the mean over every episode the policy
    would play (:func:`rollout_steps` keeps every episode up to ``min_steps``).

    Returns ``(B, N_max, T)`` tensors with each goal's kept episodes first, in the order of
    their slot and then of their start; ``N_max`` is the most episodes any goal kept.
    """
    positive_int("min_steps", min_steps)
    positive_int("slots", slots)
    _check_goals(goals)
    params = {k: v.detach() for k, v in params.items()}
    b, horizon = goals.shape[0], env.horizon
    pos = goals.new_zeros(b, slots, 2)
    age = torch.zeros(b, slots, dtype=torch.long)  # steps played in each slot's current episode
    episode = torch.zeros(b, slots, dtype=torch.long)  # how many episodes each slot has finished
    finished = torch.zeros(b, dtype=torch.long)  # steps in the finished episodes of each goal
    stop = torch.full((b,), -1, dtype=torch.long)  # the step at which each goal's batch was full
    goal = goals.unsqueeze(1)
    record = []  # per step: the goals still filling their batch, and their slots' step
    active, sub = torch.arange(b), params
    while active.numel() > 0:
        noise = torch.randn(pos.shape, generator=generator, dtype=pos.dtype)  # drawn for every goal
        here, ages, episodes = pos[active], age[active], episode[active]
        mean, std = distribution(policy, sub, here, batched)
        a = mean + std * noise[active]
        new_pos, r, done = env.step(here, a, goal[active])
        ends = done | (ages + 1 >= horizon)
        record.append((active, here, a, r, new_pos, ages, episodes, ends))
        finished[active] += torch.where(ends, ages + 1, 0).sum(1)
        pos[active] = torch.where(ends.unsqueeze(-1), torch.zeros_like(new_pos), new_pos)
        episode[active] = episodes + ends.long()
        age[active] = torch.where(ends, 0, ages + 1)
        full = finished[active] >= min_steps
        if bool(full.any()):
            stop[active[full]] = len(record) - 1
            active = active[~full]
            sub = {k: v[active] for k, v in params.items()} if batched else params
    # every recorded slot-step, flat: time, goal, slot, step in its episode, episode number, ...
    t_idx = torch.cat([torch.full((x[0].numel() * slots,), t, dtype=torch.long) for t, x in enumerate(record)])
    b_idx = torch.cat([x[0].repeat_interleave(slots) for x in record])
    s_idx = torch.cat([torch.arange(slots).repeat(x[0].numel()) for x in record])
    obs, act, reward, nxt, age, episode, ends = (torch.cat([x[i].flatten(0, 1) for x in record]) for i in range(1, 8))
    per_slot = int(episode.max()) + 1
    # each episode (goal, slot, number) is kept if it ended at or before its goal's batch was full
    ended_at = torch.full((b, slots, per_slot), len(record), dtype=torch.long)  # never: after the last step
    ended_at[b_idx[ends], s_idx[ends], episode[ends]] = t_idx[ends]
    kept_episode = ended_at <= stop.view(b, 1, 1)
    # its column in the output: its rank among the goal's kept episodes, by slot and then by number
    flat = kept_episode.reshape(b, -1)
    column = (flat.cumsum(1) - 1).reshape(b, slots, per_slot)
    width = int(flat.sum(1).max())
    kept = kept_episode[b_idx, s_idx, episode]  # per recorded slot-step: its episode is kept
    bk = b_idx[kept]
    ck = column[bk, s_idx[kept], episode[kept]]
    out_obs, out_act = obs.new_zeros((b, width, horizon, 2)), act.new_zeros((b, width, horizon, 2))
    out_reward, out_mask = reward.new_zeros((b, width, horizon)), reward.new_zeros((b, width, horizon))
    where = (bk, ck, age[kept])
    out_obs[where], out_act[where], out_reward[where], out_mask[where] = obs[kept], act[kept], reward[kept], 1.0
    final = obs.new_zeros((b, width, 2))
    last = ends[kept]
    final[bk[last], ck[last]] = nxt[kept][last]
    return Trajectories(out_obs, out_act, out_reward, out_mask, goals, final)


class Steps(NamedTuple):
    """The played steps of ``B`` tasks, flattened and packed first: shapes ``(B, L, ...)``.

    ``L`` is the largest number of played steps of any task; ``mask`` marks the
    padding. Policy-gradient losses need no time structure once the advantages are
    known, and packing skips the steps after episodes ended.
    """

    obs: Tensor
    act: Tensor
    adv: Tensor
    mask: Tensor


def pack(traj: Trajectories, adv: Tensor) -> Steps:
    """The played steps of ``traj`` with their advantages ``adv`` ``(B, N, T)``, packed."""
    b = traj.mask.shape[0]
    mask = traj.mask.reshape(b, -1)
    length = int(mask.sum(1).max().item())
    order = torch.argsort(mask, dim=1, descending=True, stable=True)[:, :length]

    def take(x: Tensor) -> Tensor:
        flat = x.reshape(b, mask.shape[1], -1)
        return flat.gather(1, order.unsqueeze(-1).expand(-1, -1, flat.shape[-1]))

    return Steps(take(traj.obs), take(traj.act), take(adv).squeeze(-1), take(traj.mask).squeeze(-1))


def returns_to_go(reward: Tensor, mask: Tensor, gamma: float = 0.99) -> Tensor:
    """Discounted reward-to-go ``sum_{t' >= t} gamma^(t'-t) r_t'`` over the last dimension."""
    out = torch.zeros_like(reward)
    running = torch.zeros_like(reward[..., 0])
    for t in range(reward.shape[-1] - 1, -1, -1):
        running = reward[..., t] * mask[..., t] + gamma * running
        out[..., t] = running
    return out


def baseline_features(obs: Tensor, mask: Tensor) -> Tensor:
    """Features of the linear baseline (Duan et al., 2016): ``obs, obs^2, t, t^2, t^3, 1``."""
    t = torch.arange(obs.shape[-2], dtype=obs.dtype).expand(obs.shape[:-1]).unsqueeze(-1) / 100.0
    o = obs.clamp(-10, 10)
    feats = torch.cat([o, o.square(), t, t.square(), t.pow(3), torch.ones_like(t)], -1)
    return feats * mask.unsqueeze(-1)


def linear_baseline(obs: Tensor, target: Tensor, mask: Tensor, reg: float = 1e-5) -> Tensor:
    """Fit the linear feature baseline per task and return its predictions.

    ``obs (B, N, T, d)``, ``target`` and ``mask`` ``(B, N, T)``: one ridge regression
    for each task over its ``N x T`` valid steps, as MAML does for each sampled task.
    """
    b = obs.shape[0]
    x = baseline_features(obs, mask).reshape(b, -1, 2 * obs.shape[-1] + 4)
    y = (target * mask).reshape(b, -1, 1)
    eye = torch.eye(x.shape[-1], dtype=x.dtype)
    w: Tensor = torch.linalg.solve(x.transpose(1, 2) @ x + reg * eye, x.transpose(1, 2) @ y)
    return (x @ w).reshape(target.shape)


def advantages(traj: Trajectories, gamma: float = 0.99, normalize: bool = True) -> Tensor:
    """Reward-to-go minus the per-task linear baseline, standardised per task over valid steps."""
    ret = returns_to_go(traj.reward, traj.mask, gamma)
    adv = (ret - linear_baseline(traj.obs, ret, traj.mask)) * traj.mask
    if normalize:
        count = traj.mask.sum((1, 2), keepdim=True)
        mean = adv.sum((1, 2), keepdim=True) / count
        var = ((adv - mean).square() * traj.mask).sum((1, 2), keepdim=True) / count
        adv = (adv - mean) / (var.sqrt() + 1e-8) * traj.mask
    return adv
