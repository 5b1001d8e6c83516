"""Meta-RL on 2D navigation: dynamics, the policy-gradient estimator, the meta-gradient, learn2learn."""

import math

import pytest
import torch
from torch.func import functional_call, vmap

from metabp import faces
from metabp.bilevel import InnerLoop
from metabp.metarl import (
    MetaRL,
    adapt,
    adaptation_returns,
    adapted_without_graph,
    choose_step_sizes,
    meta_train,
    outer_loss,
    support_steps,
    surrogate,
)
from metabp.navigation import (
    GaussianMLPPolicy,
    Navigation2D,
    Steps,
    distribution,
    linear_baseline,
    pack,
    returns_to_go,
    rollout,
    rollout_lockstep,
    rollout_steps,
)


def params_of(policy, dtype=None):
    return {k: (v if dtype is None else v.to(dtype)) for k, v in policy.named_parameters()}


# --- environment ---------------------------------------------------------------------------


def test_step_clips_velocity_and_rewards_negative_distance():
    env = Navigation2D()
    pos, reward, done = env.step(torch.zeros(2), torch.tensor([0.5, -0.03]), torch.tensor([0.3, 0.4]))
    assert torch.allclose(pos, torch.tensor([0.1, -0.03]))
    assert reward.item() == pytest.approx(-math.hypot(0.2, 0.43), abs=1e-6)
    assert not done
    _, squared, _ = Navigation2D(reward="squared").step(
        torch.zeros(2), torch.tensor([0.5, -0.03]), torch.tensor([0.3, 0.4])
    )
    assert squared.item() == pytest.approx(-(0.2**2 + 0.43**2), abs=1e-6)


def test_episode_ends_within_tolerance_of_the_goal():
    env = Navigation2D()
    goal = torch.tensor([0.05, 0.0])
    _, r, done = env.step(torch.zeros(2), torch.tensor([0.045, 0.0]), goal)
    assert done and r.item() == pytest.approx(-0.005, abs=1e-6)
    _, _, done = env.step(torch.zeros(2), torch.tensor([0.035, 0.0]), goal)
    assert not done  # 0.015 away
    # 0.008 away in each coordinate, 0.0113 in distance: inside the released code's box, outside the disc
    diagonal = torch.tensor([0.042, 0.008])
    assert env.step(torch.zeros(2), diagonal, goal)[2]
    assert not Navigation2D(termination="circle").step(torch.zeros(2), diagonal, goal)[2]
    with pytest.raises(ValueError, match="termination"):
        Navigation2D(termination="square")


def test_policy_starts_from_the_released_initialisation_or_pytorchs():
    torch.manual_seed(0)
    glorot = GaussianMLPPolicy()
    for layer in (m for m in glorot.net if isinstance(m, torch.nn.Linear)):
        bound = math.sqrt(6 / (layer.in_features + layer.out_features))
        assert torch.count_nonzero(layer.bias) == 0
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.95 * bound
    assert torch.equal(glorot.log_std, torch.zeros(2))
    hidden = glorot.net[2].weight  # 100 x 100: uniform on +-bound has standard deviation bound / sqrt(3)
    assert hidden.std().item() == pytest.approx(math.sqrt(6 / 200) / math.sqrt(3), rel=0.03)
    default = GaussianMLPPolicy(init="torch")
    assert torch.count_nonzero(default.net[0].bias) > 0 and default.net[2].weight.abs().max() <= 0.1
    with pytest.raises(ValueError, match="init"):
        GaussianMLPPolicy(init="orthogonal")


def test_goals_are_uniform_on_the_square_and_bad_settings_raise():
    goals = Navigation2D().sample_goals(5000, torch.Generator().manual_seed(0))
    assert goals.shape == (5000, 2) and goals.min() >= -0.5 and goals.max() <= 0.5
    assert goals.mean(0).abs().max() < 0.02 and goals.var(0).sub(1 / 12).abs().max() < 0.005
    with pytest.raises(ValueError, match="reward"):
        Navigation2D(reward="cosine")
    with pytest.raises(ValueError, match="horizon"):
        Navigation2D(horizon=0)


class Scripted(torch.nn.Module):
    """A policy whose mean heads for the goal at full speed, with tiny noise."""

    def __init__(self, goal):
        super().__init__()
        self.goal, self.action_scale = goal, 1.0
        self.log_std = torch.nn.Parameter(torch.full((2,), -12.0))

    def forward(self, obs):
        return self.goal - obs, self.log_std.exp().expand(obs.shape)


def test_rollout_starts_at_origin_masks_after_termination_and_freezes_position():
    goal = torch.tensor([[0.25, -0.15]])
    env = Navigation2D(horizon=10)
    traj = rollout(
        env, Scripted(goal[0]), {"log_std": torch.full((2,), -12.0)}, goal, 3, torch.Generator().manual_seed(0)
    )
    assert traj.obs.shape == (1, 3, 10, 2) and torch.equal(traj.obs[:, :, 0], torch.zeros(1, 3, 2))
    # clipped to 0.1 per coordinate: (0.1, -0.1), (0.2, -0.15), (0.25, -0.15): done at step 3
    assert torch.equal(traj.mask[0, 0], torch.tensor([1.0, 1, 1, 0, 0, 0, 0, 0, 0, 0]))
    assert torch.allclose(traj.path()[0, 0, 3:], goal.expand(8, 2), atol=1e-5)
    expected = -(math.hypot(0.15, 0.05) + 0.05 + 0.0)
    assert torch.allclose(traj.returns(), torch.full((1, 3), expected), atol=1e-5)
    # packing keeps exactly the 3 x 3 played steps, in order
    steps = pack(traj, traj.reward)
    assert steps.obs.shape == (1, 9, 2) and bool(steps.mask.all())
    assert torch.equal(steps.adv[0], traj.reward[0, :, :3].reshape(-1))


class Heading(torch.nn.Module):
    """A policy that moves along +x at full speed, with tiny noise, whatever the goal."""

    action_scale = 1.0

    def forward(self, obs):
        return torch.tensor([10.0, 0.0]).expand(obs.shape), torch.full(obs.shape, 1e-6)


def test_rollout_steps_keeps_whole_episodes_until_each_goal_has_its_steps():
    goals = torch.tensor([[0.3, 0.0], [0.5, 0.0]])  # reached after 3 and 5 steps
    env = Navigation2D(horizon=10)
    traj = rollout_steps(env, Heading(), {}, goals, 12, 2, torch.Generator().manual_seed(0))
    lengths = traj.mask.sum(-1)
    # round one: 2 episodes each (6 and 10 steps); round two: the 2 that the shorter goal needs, for both
    assert traj.obs.shape[:2] == (2, 4)
    assert torch.equal(traj.kept(), torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 0]]))
    assert torch.equal(lengths, torch.tensor([[3.0, 3, 3, 3], [5, 5, 5, 0]]))
    # each goal keeps the shortest prefix of its episodes with at least 12 steps
    kept_steps = lengths.sum(1)
    assert bool((kept_steps >= 12).all()) and bool((kept_steps - torch.tensor([3.0, 5.0]) < 12).all())
    single = rollout(env, Heading(), {}, goals, 1).returns()[:, 0]
    assert torch.allclose(traj.mean_return(), single, atol=1e-5)
    assert torch.allclose(traj.returns().sum(1), traj.kept().sum(1) * single, atol=1e-5)
    with pytest.raises(ValueError, match="min_steps"):
        rollout_steps(env, Heading(), {}, goals, 0, 2)


def test_rollout_lockstep_keeps_the_episodes_finished_when_the_batch_is_full():
    goals = torch.tensor([[0.3, 0.0], [0.5, 0.0]])  # reached after 3 and 5 steps
    env = Navigation2D(horizon=10)
    traj = rollout_lockstep(env, Heading(), {}, goals, 12, 2, torch.Generator().manual_seed(0))
    # two slots each: the first goal's 4 episodes have 12 steps after 6 steps side by side; the second
    # goal's first two episodes end after 5 steps (10 < 12), its next two together after 10 (20 steps)
    assert traj.obs.shape[:2] == (2, 4)
    assert torch.equal(traj.kept(), torch.ones(2, 4))
    assert torch.equal(traj.mask.sum(-1), torch.tensor([[3.0, 3, 3, 3], [5, 5, 5, 5]]))
    single = rollout(env, Heading(), {}, goals, 1)
    assert torch.allclose(traj.mean_return(), single.returns()[:, 0], atol=1e-5)
    assert torch.allclose(traj.final, single.final.expand(2, 4, 2), atol=1e-5)
    with pytest.raises(ValueError, match="min_steps"):
        rollout_lockstep(env, Heading(), {}, goals, 0, 2)
    with pytest.raises(ValueError, match="slots"):
        rollout_lockstep(env, Heading(), {}, goals, 12, 0)
    with pytest.raises(ValueError, match="goals"):
        rollout_lockstep(env, Heading(), {}, goals[0], 12, 2)


def lockstep_by_hand(env, policy, params, goals, min_steps, slots, generator, batched):
    """rllab's vectorised sampler, one environment at a time in Python: each goal's kept episodes."""
    b = goals.shape[0]
    pos = torch.zeros(b, slots, 2)
    running = [[[] for _ in range(slots)] for _ in range(b)]
    done_paths = [[] for _ in range(b)]  # (slot, start step, steps) of every finished episode
    start = [[0] * slots for _ in range(b)]
    kept, t = [None] * b, 0
    while any(k is None for k in kept):
        mean, std = distribution(policy, params, pos, batched)
        a = mean + std * torch.randn(mean.shape, generator=generator)
        for i in range(b):
            for s in range(slots):
                new, r, done = env.step(pos[i, s], a[i, s], goals[i])
                running[i][s].append((pos[i, s].clone(), a[i, s].clone(), r.item()))
                pos[i, s] = new
                if bool(done) or len(running[i][s]) == env.horizon:
                    done_paths[i].append((s, start[i][s], running[i][s]))
                    running[i][s], start[i][s], pos[i, s] = [], t + 1, torch.zeros(2)
            if kept[i] is None and sum(len(steps) for _, _, steps in done_paths[i]) >= min_steps:
                kept[i] = sorted(done_paths[i], key=lambda path: path[:2])
        t += 1
    return kept


@pytest.mark.parametrize("batched", [False, True])
def test_rollout_lockstep_is_the_vectorised_sampler_written_out(batched):
    env = Navigation2D(horizon=6, tolerance=0.1)
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(hidden=8)
    goals = torch.tensor([[0.1, 0.0], [0.0, -0.1], [0.08, 0.08]])
    params = params_of(policy)
    if batched:
        params = {k: torch.stack([v, 1.1 * v, 0.9 * v]) for k, v in params.items()}
    traj = rollout_lockstep(env, policy, params, goals, 20, 4, torch.Generator().manual_seed(1), batched)
    expected = lockstep_by_hand(env, policy, params, goals, 20, 4, torch.Generator().manual_seed(1), batched)
    lengths = traj.mask.sum(-1)
    assert len({len(path) for paths in expected for _, _, path in paths}) > 1  # episodes of several lengths
    for i, paths in enumerate(expected):
        assert int(traj.kept()[i].sum()) == len(paths)
        for n, (_, _, steps) in enumerate(paths):
            assert int(lengths[i, n]) == len(steps)
            assert torch.allclose(traj.obs[i, n, : len(steps)], torch.stack([o for o, _, _ in steps]), atol=1e-6)
            assert torch.allclose(traj.act[i, n, : len(steps)], torch.stack([a for _, a, _ in steps]), atol=1e-6)
            assert torch.allclose(traj.reward[i, n, : len(steps)], torch.tensor([r for _, _, r in steps]), atol=1e-6)
        assert bool((traj.mask[i, len(paths) :] == 0).all())


def test_distribution_is_what_the_policy_module_computes():
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(hidden=8)
    with torch.no_grad():
        policy.log_std.copy_(torch.tensor([-0.5, 0.3]))
    params = params_of(policy)
    obs = torch.randn(3, 5, 2)
    mean, std = distribution(policy, params, obs)
    ref_mean, ref_std = functional_call(policy, params, (obs,))
    assert torch.equal(mean, ref_mean) and torch.equal(std, ref_std)
    # per-task parameters: what vmap over the module computes, task by task
    per_task = {k: torch.stack([v + 0.1 * i for i in range(3)]) for k, v in params.items()}
    mean_b, std_b = distribution(policy, per_task, obs, batched=True)
    ref_b = vmap(lambda p, o: functional_call(policy, p, (o,)))(per_task, obs)
    assert torch.allclose(mean_b, ref_b[0], atol=1e-6) and torch.allclose(std_b, ref_b[1], atol=1e-6)


def test_returns_to_go_and_linear_baseline():
    reward = torch.tensor([[[1.0, 2.0, 3.0, 9.0]]])
    mask = torch.tensor([[[1.0, 1.0, 1.0, 0.0]]])
    assert torch.allclose(returns_to_go(reward, mask, 0.5), torch.tensor([[[2.75, 3.5, 3.0, 0.0]]]))
    # a target that is linear in the features is fitted exactly
    g = torch.Generator().manual_seed(0)
    obs = torch.randn(2, 5, 7, 2, generator=g, dtype=torch.float64)
    t = torch.arange(7, dtype=torch.float64) / 100
    target = 3 * obs[..., 0] - obs[..., 1].square() + 2 * t - 1
    ones = torch.ones(2, 5, 7, dtype=torch.float64)
    assert torch.allclose(linear_baseline(obs, target, ones, reg=1e-12), target, atol=1e-6)


# --- the policy-gradient estimator ----------------------------------------------------------


@pytest.mark.parametrize("estimator", ["naive", "lvc"])
def test_estimator_expectation_on_a_gaussian_bandit(estimator):
    """One step, a ~ N(mu, sigma^2), r = -(a - g)^2: J = -((mu-g)^2 + sigma^2).

    Both surrogates give dJ/dmu = -2 (mu - g) in expectation. Only 'lvc' gives the
    curvature d2J/dmu2 = -2; the naive one gives E[-r / sigma^2] = ((mu-g)^2 + sigma^2) / sigma^2.
    """
    mu0, sigma, g, m = 0.3, 0.5, 1.0, 400_000
    mu = torch.tensor(mu0, dtype=torch.float64, requires_grad=True)
    eps = torch.randn(m, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = (mu0 + sigma * eps).detach()
    logp = -0.5 * ((a - mu) / sigma) ** 2
    r = -((a - g) ** 2)
    value = surrogate(logp, logp.detach(), r, torch.ones(m, dtype=torch.float64), estimator)
    (d1,) = torch.autograd.grad(value, mu, create_graph=True)
    (d2,) = torch.autograd.grad(d1, mu)
    assert d1.item() == pytest.approx(-2 * (mu0 - g), abs=0.01)
    want = -2.0 if estimator == "lvc" else ((mu0 - g) ** 2 + sigma**2) / sigma**2
    assert d2.item() == pytest.approx(want, abs=0.03)


# --- the meta-gradient --------------------------------------------------------------------------


def small_problem(dtype=torch.float64, tasks=3, n=4, horizon=12):
    torch.manual_seed(0)
    env = Navigation2D(horizon=horizon)
    # PyTorch's initialisation: its biases are not zero, so no ReLU sits exactly at its kink at the
    # start position (the origin), where finite differences would not measure the derivative
    policy = GaussianMLPPolicy(hidden=16, init="torch").to(dtype)
    g = torch.Generator().manual_seed(1)
    goals = env.sample_goals(tasks, g).to(dtype)
    params = params_of(policy)
    spt = support_steps(policy, params, rollout(env, policy, params, goals, n, g), 0.99, False)
    with torch.no_grad():
        adapted = adapt(policy, params, *spt, 0.1)
    qry = support_steps(policy, adapted, rollout(env, policy, adapted, goals, n, g, batched=True), 0.99, True)
    return policy, params, spt, qry


def test_meta_gradient_flows_through_the_inner_step_and_matches_finite_differences():
    policy, params, spt, qry = small_problem()

    def objective(p):
        return outer_loss(policy, adapt(policy, p, *spt, 0.1), *qry, clip=None)

    grads = torch.autograd.grad(objective(params), list(params.values()))
    assert all(gr.abs().sum() > 0 for gr in grads)
    direction = {
        k: torch.randn(v.shape, generator=torch.Generator().manual_seed(3), dtype=v.dtype) for k, v in params.items()
    }
    h = 1e-5
    with torch.no_grad():
        plus = objective({k: v + h * direction[k] for k, v in params.items()})
        minus = objective({k: v - h * direction[k] for k, v in params.items()})
    numeric = (plus - minus) / (2 * h)
    analytic = sum((gr * direction[k]).sum() for gr, k in zip(grads, params, strict=True))
    assert analytic.item() == pytest.approx(numeric.item(), rel=1e-5, abs=1e-9)
    # a first-order inner step (its gradient treated as a constant) gives a different answer
    with torch.no_grad():
        step = {k: a - params[k] for k, a in adapt(policy, params, *spt, 0.1).items()}
    first_order = torch.autograd.grad(
        outer_loss(policy, {k: v + step[k] for k, v in params.items()}, *qry, clip=None), list(params.values())
    )
    assert not all(torch.allclose(f, gr, rtol=1e-3) for f, gr in zip(first_order, grads, strict=True))


def test_learn2learn_clone_and_adapt_gives_the_same_adapted_policy():
    policy, params, spt, _ = small_problem(dtype=torch.float32)
    adapted = adapt(policy, params, *spt, 0.1)
    maml = faces.l2l_wrap(policy, InnerLoop(inner_lr=0.1))
    steps, old = spt

    def task_steps(b: int) -> Steps:
        return Steps(*(x[b] for x in steps))

    for b in range(steps.obs.shape[0]):
        learner = faces.l2l_adapt_policy(maml, task_steps(b), old[b])
        for name, p in learner.module.named_parameters():
            assert torch.allclose(p, adapted[name][b], atol=1e-6), name
    # and so do the gradients that reach the meta-parameters through the adaptation
    (scratch,) = torch.autograd.grad(adapted["log_std"][0].sum(), [params["net.0.weight"]])
    learner = faces.l2l_adapt_policy(maml, task_steps(0), old[0])
    (theirs,) = torch.autograd.grad(learner.module.log_std.sum(), [params["net.0.weight"]])
    assert scratch.abs().sum() > 0 and torch.allclose(scratch, theirs, atol=1e-6)


# --- training and evaluation, briefly ------------------------------------------------------------


def test_meta_train_runs_and_evaluation_has_one_batch_per_step():
    env = Navigation2D(horizon=10)
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(hidden=8)
    history = meta_train(env, policy, MetaRL(num_trajectories=3, meta_batch_size=2, outer_epochs=2), 2, seed=0)
    assert len(history.before) == len(history.after) == 2
    out = adaptation_returns(env, policy, env.sample_goals(4), [0.1, 0.05], num_trajectories=3)
    assert len(out) == 3 and all(t.returns().shape == (4, 3) for t in out)
    with pytest.raises(ValueError, match="estimator"):
        MetaRL(estimator="dice")


def test_meta_training_can_count_each_goals_batch_in_steps(monkeypatch):
    import metabp.metarl as metarl

    env = Navigation2D(horizon=10)
    seen = []

    def spy(*args, **kwargs):
        out = rollout_steps(*args, **kwargs)
        seen.append(out)
        return out

    monkeypatch.setattr(metarl, "rollout_steps", spy)
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(hidden=8)
    meta_train(env, policy, MetaRL(num_trajectories=3, meta_batch_size=2, outer_epochs=1), 1, seed=0)
    assert seen == []  # by default a batch is num_trajectories episodes
    meta_train(env, policy, MetaRL(num_trajectories=3, meta_batch_size=2, outer_epochs=1, count_steps=True), 1, seed=0)
    assert len(seen) == 2  # before and after adaptation
    assert all(bool((t.mask.sum((1, 2)) >= 3 * 10).all()) for t in seen)


def test_cosine_schedule_decays_the_step_sizes_to_zero(monkeypatch):
    env = Navigation2D(horizon=5)
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(hidden=4)
    seen = []
    original = torch.optim.Adam.step

    def spy(self, *args, **kwargs):
        seen.append([g["lr"] for g in self.param_groups])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    meta_train(
        env,
        policy,
        MetaRL(num_trajectories=2, meta_batch_size=2, outer_epochs=1, cosine=True, meta_lr=1e-3, std_lr=1e-2),
        4,
        seed=0,
    )
    assert seen[0] == [1e-3, 1e-2]  # full step sizes first
    assert seen[-1][0] < seen[1][0] < 1e-3 and seen[-1][1] < 1e-2  # then smaller and smaller


# --- MAML's released test goals and the choice of later step sizes --------------------------------


def test_released_test_goals_are_the_scripts_numpy_draw():
    np = pytest.importorskip("numpy")
    goals = Navigation2D().released_test_goals()
    state = np.random.RandomState(1)
    assert goals.shape == (40, 2)
    assert torch.allclose(goals, torch.tensor(state.uniform(-0.5, 0.5, size=(40, 2)), dtype=torch.float32))
    # standing still on them scores about what the paper reports before adaptation (-40.41)
    assert -100 * goals.norm(dim=1).mean().item() == pytest.approx(-40.08, abs=0.01)
    with pytest.raises(ValueError, match=r"\[-0.5, 0.5\]"):
        Navigation2D(goal_low=-1.0, goal_high=1.0).released_test_goals()


def test_choose_step_sizes_returns_the_best_candidate_on_the_validation_goals():
    env = Navigation2D(horizon=10)
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(hidden=8)
    goals = env.sample_goals(3, torch.Generator().manual_seed(0))
    lrs, table = choose_step_sizes(
        env, policy, goals, 0.1, [1 / 2, 1 / 4], num_trajectories=2, generator=torch.Generator().manual_seed(1)
    )
    assert set(table) == {1 / 2, 1 / 4} and all(len(v) == 4 for v in table.values())
    # the candidates play the same episodes up to the first step they differ in
    assert table[1 / 2][:2] == table[1 / 4][:2]
    # each plays what adaptation_returns plays with its schedule and the seed drawn from the generator
    seed = int(torch.randint(2**31 - 1, (1,), generator=torch.Generator().manual_seed(1)).item())
    for f in (1 / 2, 1 / 4):
        out = adaptation_returns(env, policy, goals, [0.1, 0.1 * f, 0.05 * f], 2, torch.Generator().manual_seed(seed))
        assert table[f] == pytest.approx([t.mean_return().mean().item() for t in out], abs=1e-5)
    # the chosen factor is the one whose returns after steps 2 and 3 are the larger, and the choice matters
    score = {f: table[f][2] + table[f][3] for f in table}
    best, other = sorted(score, key=score.get, reverse=True)
    assert score[best] > score[other] + 1e-6
    assert lrs == [0.1, 0.1 * best, 0.1 * best / 2]
    # the same with batches counted in steps
    lrs, table = choose_step_sizes(
        env,
        policy,
        goals,
        0.1,
        [1 / 2, 1 / 4],
        num_trajectories=2,
        generator=torch.Generator().manual_seed(1),
        min_steps=25,
    )
    for f in (1 / 2, 1 / 4):
        out = adaptation_returns(
            env, policy, goals, [0.1, 0.1 * f, 0.05 * f], 2, torch.Generator().manual_seed(seed), min_steps=25
        )
        assert table[f] == pytest.approx([t.mean_return().mean().item() for t in out], abs=1e-5)
        assert all(bool((t.mask.sum((1, 2)) >= 25).all()) for t in out)
    with pytest.raises(ValueError, match="factors"):
        choose_step_sizes(env, policy, goals, 0.1, [])


def test_adaptation_in_chunks_equals_one_pass_over_all_tasks():
    env = Navigation2D(horizon=12)
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(hidden=8)
    params = {k: v.detach() for k, v in policy.named_parameters()}
    traj = rollout(
        env, policy, params, env.sample_goals(7, torch.Generator().manual_seed(0)), 3, torch.Generator().manual_seed(1)
    )
    whole = adapt(policy, params, *support_steps(policy, params, traj, 0.99, False), 0.1)
    for chunk in (1, 3, 7, 50):
        pieces = adapted_without_graph(policy, params, traj, 0.1, chunk=chunk)
        assert all(torch.allclose(pieces[k], whole[k].detach(), atol=1e-6) for k in whole)
    # per-task parameters (a second step) are split along with the episodes
    again = adapted_without_graph(policy, pieces, traj, 0.05, chunk=2, batched=True)
    ref = adapt(policy, pieces, *support_steps(policy, pieces, traj, 0.99, True), 0.05, batched=True)
    assert all(torch.allclose(again[k], ref[k].detach(), atol=1e-6) for k in ref)
    with pytest.raises(ValueError, match="chunk"):
        adapted_without_graph(policy, params, traj, 0.1, chunk=0)


def test_without_old_log_probs_the_meta_gradient_is_the_same():
    # At the parameters that played the steps, pi_old is pi itself: support_steps can skip its
    # forward pass (log_probs=False) and adapt/outer_loss take the detached log-probabilities.
    policy, params, spt, qry = small_problem()
    spt_none = support_steps(
        policy,
        params,
        rollout(Navigation2D(horizon=12), policy, params, torch.zeros(1, 2, dtype=torch.float64), 2),
        0.99,
        False,
        False,
    )
    assert spt_none[1] is None

    def objective(p, s, q):
        return outer_loss(policy, adapt(policy, p, *s, 0.1), *q, clip=0.2)

    with_old = torch.autograd.grad(objective(params, spt, qry), list(params.values()))
    without = torch.autograd.grad(objective(params, (spt[0], None), (qry[0], None)), list(params.values()))
    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-12) for a, b in zip(with_old, without, strict=True))
    # elsewhere than where the steps were played, pi_old matters: the two differ
    moved = {k: v + 0.05 for k, v in params.items()}
    assert not torch.allclose(objective(moved, spt, qry), objective(moved, (spt[0], None), (qry[0], None)))
