"""Gridworld env, routing and sweep plumbing (fast: tiny sizes, no timing assertions)."""
import pytest
import torch

from gradroute.cli import main
from gradroute.envs.gridworld import DIAMOND, DOWN, GHOST, LEFT, NOTHING, RIGHT, UP, GridworldVecEnv
from gradroute.experiments import gridworld as gw
from gradroute.utils import read_json

TINY = dict(updates=3, num_envs=8, num_steps=32, lr=3e-3, seeds=1, eval_every=2,
            val_episodes=16, test_episodes=32)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny matmuls: a second OpenMP thread only spins, and badly so on a shared machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def agent_cell(obs, i=0):
    return divmod(int(obs[i, 0].flatten().argmax()), 5)


# ---------------------------------------------------------------------------- env dynamics
def test_moves_and_borders():
    env = GridworldVecEnv(4, 0.0)
    env.set_state((2, 2), (4, 4), (0, 4))
    obs, *_ = env.step(torch.tensor([UP, RIGHT, DOWN, LEFT]))
    assert [agent_cell(obs, i) for i in range(4)] == [(1, 2), (2, 3), (3, 2), (2, 1)]
    env.set_state((0, 0), (4, 4), (3, 4))
    obs, *_ = env.step(torch.tensor([UP, LEFT, UP, LEFT]))
    assert all(agent_cell(obs, i) == (0, 0) for i in range(4))
    env.set_state((4, 4), (0, 0), (0, 1))
    obs, *_ = env.step(torch.tensor([DOWN, RIGHT, DOWN, RIGHT]))
    assert all(agent_cell(obs, i) == (4, 4) for i in range(4))


def test_observation_layout():
    env = GridworldVecEnv(1, 0.0)
    obs = env.set_state((1, 2), (3, 4), (0, 0), ghost_overseen=True, diamond_overseen=False)
    assert obs.shape == (1, 4, 5, 5) and obs.dtype == torch.float32
    assert obs[0, 0, 1, 2] == 1 and obs[0, 1, 3, 4] == 1 and obs[0, 2, 0, 0] == 1
    assert obs[0, 3, 3, 4] == 1 and obs[0, 3].sum() == 1          # only the ghost is overseen
    assert obs[0, :3].sum() == 3


def test_termination_rewards_and_oversight_flags():
    env = GridworldVecEnv(2, 0.0)
    env.set_state((2, 2), (2, 1), (2, 3), ghost_overseen=True, diamond_overseen=False)
    _, reward, term, trunc, info = env.step(torch.tensor([RIGHT, LEFT]))
    assert term.tolist() == [True, True] and trunc.tolist() == [False, False]
    assert reward.tolist() == [1.0, -1.0]
    assert info["reached"].tolist() == [DIAMOND, GHOST]
    assert info["overseen"].tolist() == [False, True]
    assert info["episode_length"].tolist() == [1, 1]


def test_truncation_after_max_steps():
    env = GridworldVecEnv(1, 0.0, max_steps=32)
    env.set_state((0, 0), (4, 4), (4, 3))
    for t in range(1, 33):
        _, reward, term, trunc, info = env.step(torch.tensor([UP]))   # bump into the wall
        assert not term[0] and reward[0] == 0
        assert bool(trunc[0]) == (t == 32)
    assert info["reached"][0] == NOTHING and info["episode_length"][0] == 32
    assert env.t[0] == 0                                                # auto-reset happened


def test_reset_cells_distinct_and_oversight_rate():
    env = GridworldVecEnv(20_000, 0.3)
    obs, info = env.reset(seed=1)
    assert ((env.agent != env.ghost) & (env.agent != env.diamond) & (env.ghost != env.diamond)).all()
    assert obs[:, :3].sum((2, 3)).eq(1).all()
    for flag in (info["ghost_overseen"], info["diamond_overseen"]):
        assert abs(flag.float().mean().item() - 0.3) < 0.015
    assert torch.equal(obs[:, 3].sum((1, 2)), (info["ghost_overseen"].float() + info["diamond_overseen"].float()))
    # every cell is used for every piece (a sampler bug would leave holes)
    for pos in (env.agent, env.ghost, env.diamond):
        assert torch.bincount(pos, minlength=25).min() > 500
    assert GridworldVecEnv(10_000, 0.0).reset(seed=0)[1]["ghost_overseen"].sum() == 0


def test_auto_reset_returns_new_episode_observation():
    env = GridworldVecEnv(3, 0.5, return_final_obs=True)
    env.reset(seed=0)
    env.set_state((0, 0), (4, 4), (0, 1))
    obs, _, term, _, info = env.step(torch.tensor([RIGHT, RIGHT, RIGHT]))
    assert term.all()
    # the final observation shows the agent on the diamond; the returned one is a fresh episode
    assert (info["final_obs"][:, 0, 0, 1] == 1).all() and (info["final_obs"][:, 2, 0, 1] == 1).all()
    assert torch.equal(obs, env._obs())
    assert (env.t == 0).all()
    for i in range(3):
        assert agent_cell(obs, i) == divmod(int(env.agent[i]), 5)


def test_env_determinism_by_seed():
    a, b = GridworldVecEnv(64, 0.2), GridworldVecEnv(64, 0.2)
    oa, ob = a.reset(seed=7)[0], b.reset(seed=7)[0]
    assert torch.equal(oa, ob)
    acts = torch.randint(4, (40, 64), generator=torch.Generator().manual_seed(0))
    for act in acts:
        ra, rb = a.step(act), b.step(act)
        assert torch.equal(ra[0], rb[0]) and torch.equal(ra[1], rb[1])
    assert not torch.equal(GridworldVecEnv(64, 0.2).reset(seed=8)[0], oa)



def _check_episodes(env, obs, info, rows, p):
    """Episodes in ``rows``: three distinct cells, obs planes matching the state, oversight ~ p."""
    a, g, d = env.agent[rows], env.ghost[rows], env.diamond[rows]
    assert ((a != g) & (a != d) & (g != d)).all()
    o = obs[rows]
    for plane, pos in enumerate((a, g, d)):
        assert torch.equal(o[:, plane].flatten(1).argmax(1), pos) and o[:, plane].sum((1, 2)).eq(1).all()
    gov, dov = info["ghost_overseen"][rows], info["diamond_overseen"][rows]
    assert torch.equal(o[:, 3].flatten(1).gather(1, g[:, None]).squeeze(1).bool(), gov)
    assert torch.equal(o[:, 3].flatten(1).gather(1, d[:, None]).squeeze(1).bool(), dov)
    assert torch.equal(o[:, 3].sum((1, 2)), gov.float() + dov.float())
    for flag in (gov, dov):
        assert abs(flag.float().mean().item() - p) < 4 * (p * (1 - p) / len(flag)) ** 0.5 + 1e-9
    return a, g, d


def test_auto_reset_episodes_follow_the_reset_distribution():
    env = GridworldVecEnv(4000, 0.3, max_steps=4, return_final_obs=False)
    env.reset(seed=5)
    acts = torch.randint(4, (12, 4000), generator=torch.Generator().manual_seed(1))
    fresh = [[], [], []]
    for act in acts:
        obs, _, term, trunc, info = env.step(act)
        done = term | trunc
        if done.any():
            for store, pos in zip(fresh, _check_episodes(env, obs, info, done, 0.3)):
                store.append(pos)
    assert all(t == 0 for t in env.t[done].tolist())
    # new episodes use every cell for every piece, roughly uniformly
    for pos in (torch.cat(f) for f in fresh):
        assert len(pos) > 10_000
        counts = torch.bincount(pos, minlength=25).float()
        assert counts.min() > 0.6 * counts.mean() and counts.max() < 1.4 * counts.mean()


def test_only_finished_envs_get_new_episodes():
    env = GridworldVecEnv(3, 0.5, max_steps=5)
    env.reset(seed=0)
    env.set_state((2, 2), (2, 1), (2, 3), ghost_overseen=True, diamond_overseen=False)
    env.t[2] = 4                                      # env 2 times out on this step
    obs, _, term, trunc, info = env.step(torch.tensor([RIGHT, UP, DOWN]))
    assert term.tolist() == [True, False, False] and trunc.tolist() == [False, False, True]
    # env 1 keeps its episode: moved agent, same ghost, diamond, flags; counter advanced
    assert (env.agent[1], env.ghost[1], env.diamond[1]) == (7, 11, 13) and env.t.tolist()[1] == 1
    assert bool(info["ghost_overseen"][1]) and not bool(info["diamond_overseen"][1])
    assert env.t[0] == 0 and env.t[2] == 0
    for i in (0, 2):                                  # the finished ones start over, consistently
        assert len({int(env.agent[i]), int(env.ghost[i]), int(env.diamond[i])}) == 3
        assert agent_cell(obs, i) == divmod(int(env.agent[i]), 5)
    assert info["episode_length"].tolist() == [1, 0, 5]


def test_big_grid_sampler_and_bad_actions():
    env = GridworldVecEnv(5000, 0.2, size=11, max_steps=2)      # 11**6 > 1e6: no triple table
    assert env._triples is None
    obs, info = env.reset(seed=0)
    _check_episodes(env, obs, info, torch.ones(5000, dtype=torch.bool), 0.2)
    assert torch.bincount(env.diamond, minlength=121).min() > 0
    for _ in range(2):
        obs, _, term, trunc, info = env.step(torch.zeros(5000, dtype=torch.long))
    _check_episodes(env, obs, info, term | trunc, 0.2)
    with pytest.raises(ValueError, match="actions must be in 0..3"):
        env.step(torch.full((5000,), 4))

def test_step_matches_the_reference_env():
    """Same state and actions: the same outcomes as the env before the speed work (whose fresh
    episodes come from another random stream, so its state is synced after every step)."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gridworld_reference_env.py"
    spec = importlib.util.spec_from_file_location("gridworld_reference_env", path)
    ref_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref_mod)
    new, old = GridworldVecEnv(256, 0.4, max_steps=6), ref_mod.GridworldVecEnv(256, 0.4, max_steps=6)
    obs, info = new.reset(seed=3)
    old.reset(seed=0)

    def sync():
        for k in ("agent", "ghost", "diamond", "ghost_overseen", "diamond_overseen", "t"):
            setattr(old, k, getattr(new, k).clone())

    sync()
    assert torch.equal(old._obs(), obs)
    for act in torch.randint(4, (20, 256), generator=torch.Generator().manual_seed(2)):
        r_new, r_old = new.step(act), old.step(act)
        for x, y in zip(r_new[1:4], r_old[1:4]):              # reward, terminated, truncated
            assert torch.equal(x, y)
        for k in ("reached", "overseen", "true_reward", "episode_length", "final_obs"):
            assert torch.equal(r_new[4][k], r_old[4][k]), k
        done = r_new[2] | r_new[3]
        assert torch.equal(r_new[0][~done], r_old[0][~done])  # unfinished: same next observation
        assert done.any() and (~done).any()
        sync()
        assert torch.equal(old._obs(), r_new[0])

# ---------------------------------------------------------------------------- policy, routing
def _expert_grad(policy, e):
    return sum(float(p.grad[e].abs().sum()) for p in (policy.w1, policy.b1, policy.w2, policy.b2))


def _grads_after(route_w):
    torch.manual_seed(0)
    policy = gw.MoEPolicy(zero_bias=False)
    obs = GridworldVecEnv(1, 0.5).reset(seed=3)[0]
    logits, _ = policy(obs, route_w=route_w)
    logits.logsumexp(-1).sum().backward()
    norm = lambda m: sum(p.grad.abs().sum().item() for p in m.parameters() if p.grad is not None)  # noqa: E731
    return _expert_grad(policy, 0), _expert_grad(policy, 1), norm(policy.gate), norm(policy.head)


def test_routing_overseen_diamond_only_updates_diamond_expert():
    w = gw.routing_weights(torch.tensor([DIAMOND]), torch.tensor([True]))
    assert w.tolist() == [[1.0, 0.0, 0.0]]
    d, g, gate, head = _grads_after(w)
    assert g == 0.0 and gate == 0.0
    assert d > 0 and head > 0


def test_routing_overseen_ghost_only_updates_ghost_expert():
    w = gw.routing_weights(torch.tensor([GHOST]), torch.tensor([True]))
    d, g, gate, _ = _grads_after(w)
    assert d == 0.0 and gate == 0.0 and g > 0


def test_routing_unobserved_updates_both_experts_and_gate():
    for reached in (DIAMOND, GHOST, NOTHING):
        w = gw.routing_weights(torch.tensor([reached]), torch.tensor([False]))
        assert w.tolist() == [[1.0, 1.0, 1.0]]
        d, g, gate, _ = _grads_after(w)
        assert d > 0 and g > 0 and gate > 0


def test_gate_forcing_selects_one_expert():
    torch.manual_seed(0)
    policy = gw.MoEPolicy()
    obs = GridworldVecEnv(16, 0.5).reset(seed=0)[0]
    x = obs.flatten(1)
    with torch.no_grad():
        to_diamond, _ = policy(obs, gate=1.0)
        to_ghost, _ = policy(obs, gate=0.0)
        for e, out in ((0, to_diamond), (1, to_ghost)):
            h = torch.relu(torch.relu(x @ policy.w1[e] + policy.b1[e]) @ policy.w2[e] + policy.b2[e])
            torch.testing.assert_close(out, policy.head(h))
        for p in (policy.w1, policy.b1, policy.w2, policy.b2):   # the ghost expert cannot reach a
            p[1].add_(torch.randn_like(p[1]))                     # diamond-steered policy
        torch.testing.assert_close(policy(obs, gate=1.0)[0], to_diamond)


def test_episode_outcomes_and_rewards():
    # env 0: ghost (overseen) at t=1, then a diamond at t=3; env 1: nothing finishes
    done = torch.tensor([[0, 0], [1, 0], [0, 0], [1, 0]], dtype=torch.bool)
    reached = torch.tensor([[0, 0], [GHOST, 0], [0, 0], [DIAMOND, 0]])
    overseen = torch.tensor([[0, 0], [1, 0], [0, 0], [0, 0]], dtype=torch.bool)
    naive = gw.training_reward("naive", reached, overseen) * done
    assert naive[:, 0].tolist() == [0, -1, 0, 1]
    assert gw.training_reward("either", reached, overseen)[:, 0].tolist() == [0, 1, 0, 1]
    assert gw.training_reward("true", reached, overseen)[:, 0].tolist() == [0, -1, 0, 1]
    assert gw.training_reward("naive", torch.tensor([GHOST]), torch.tensor([False])).tolist() == [1.0]
    er, eo, complete, ret = gw.episode_outcomes(done, reached, overseen, naive, 0.5)
    assert er[:, 0].tolist() == [GHOST, GHOST, DIAMOND, DIAMOND]
    assert eo[:, 0].tolist() == [True, True, False, False]
    assert complete[:, 0].all() and not complete[:, 1].any()
    assert ret[:, 0].tolist() == [-0.5, -1.0, 0.5, 1.0]


def _scan_episode_outcomes(done, reached, overseen, reward, gamma):
    """The step-by-step backward scan that episode_outcomes replaced (kept as the reference)."""
    T, N = done.shape
    out = [torch.zeros(T, N, dtype=torch.long), torch.zeros(T, N, dtype=torch.bool),
           torch.zeros(T, N, dtype=torch.bool), torch.zeros(T, N)]
    r_c, o_c = torch.zeros(N, dtype=torch.long), torch.zeros(N, dtype=torch.bool)
    c_c, g_c = torch.zeros(N, dtype=torch.bool), torch.zeros(N)
    for t in reversed(range(T)):
        d = done[t]
        r_c, o_c, c_c = torch.where(d, reached[t], r_c), torch.where(d, overseen[t], o_c), d | c_c
        g_c = reward[t] + gamma * g_c * (~d).float()
        out[0][t], out[1][t], out[2][t], out[3][t] = r_c, o_c, c_c, g_c
    return out


def test_episode_outcomes_equals_the_step_by_step_scan():
    # the vectorised outcomes and the two-op return scan give the scan's values bit for bit
    # (the returns feed the paper's metric)
    g = torch.Generator().manual_seed(0)
    for T, N, p_done in ((32, 64, 0.1), (7, 5, 0.5), (1, 3, 1.0), (9, 4, 0.0)):
        done = torch.rand(T, N, generator=g) < p_done
        reached = torch.randint(0, 3, (T, N), generator=g) * done
        overseen = (torch.rand(T, N, generator=g) < 0.5) & done
        reward = torch.randn(T, N, generator=g) * done
        for got, want in zip(gw.episode_outcomes(done, reached, overseen, reward, gw.GAMMA),
                             _scan_episode_outcomes(done, reached, overseen, reward, gw.GAMMA)):
            assert got.dtype == want.dtype and torch.equal(got, want)


def test_evaluate_random_policy_in_range():
    torch.manual_seed(0)
    ev = gw.evaluate(gw.MoEPolicy(), 0.1, seed=0, episodes=256)
    assert -1 <= ev["true_return"] <= 1
    assert abs(ev["diamond_rate"] + ev["ghost_rate"] + ev["timeout_rate"] - 1) < 1e-6
    assert 0 <= ev["ghost_rate_when_closer_unobserved"] <= 1 and ev["n_closer_unobserved"] > 0


@pytest.mark.slow
def test_training_is_deterministic_by_seed():
    a = gw.train("routing", 0.1, 0, TINY)
    b = gw.train("routing", 0.1, 0, TINY)
    assert a["records"] == b["records"] and a["curve"] == b["curve"]
    c = gw.train("routing", 0.1, 1, TINY)
    assert c["records"][0]["train_seed"] != a["records"][0]["train_seed"]
    assert c["records"] != a["records"]


@pytest.mark.slow
def test_training_with_plain_autograd_follows_the_fast_path():
    # fp32: the plain update (autograd + route) and the fast path train to the same weights, up to
    # float summation order, from the same seed
    cfg = dict(TINY, precision="fp32")
    hand = gw.train("routing", 0.3, 0, cfg)
    plain = gw.train("routing", 0.3, 0, cfg, backward="autograd")
    assert hand["state_dict"].keys() == plain["state_dict"].keys()
    for k, v in hand["state_dict"].items():
        torch.testing.assert_close(plain["state_dict"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    with pytest.raises(ValueError, match="backward must be one of"):
        gw.train("routing", 0.3, 0, cfg, backward="compiled")


def test_stepwise_return_on_hand_built_window():
    # 2 envs x 4 steps, gamma 0.5. env 0: an episode ends at t=1 with +1, the next at t=3 with -1.
    # env 1: nothing ends inside the window, so every step scores 0 (no bootstrap).
    done = torch.tensor([[0, 0], [1, 0], [0, 0], [1, 0]], dtype=torch.bool)
    reward = torch.tensor([[0.0, 0], [1, 0], [0, 0], [-1, 0]])
    # env 0 returns-to-go: t0 0.5, t1 1, t2 -0.5, t3 -1; env 1: 0 everywhere -> mean 0
    assert gw.stepwise_return(done, reward, 0.5) == pytest.approx(0.0)
    reward[3, 0] = 0.0                                       # second episode ends with 0
    assert gw.stepwise_return(done, reward, 0.5) == pytest.approx((0.5 + 1.0) / 8)
    # an episode unfinished at the window's end contributes 0 even if it would succeed later
    done2 = torch.tensor([[0], [0]], dtype=torch.bool)
    assert gw.stepwise_return(done2, torch.zeros(2, 1), 0.97) == 0.0


def test_unfinished_episode_handling():
    # env 0: overseen diamond at t=1, then an episode still running at t=2..3; env 1: unfinished throughout
    done = torch.tensor([[0, 0], [1, 0], [0, 0], [0, 0]], dtype=torch.bool)
    reached = torch.tensor([[0, 0], [DIAMOND, 0], [0, 0], [0, 0]])
    overseen = torch.tensor([[0, 0], [1, 0], [0, 0], [0, 0]], dtype=torch.bool)
    reward = gw.training_reward("either", reached, overseen) * done
    er, eo, complete, ret = gw.episode_outcomes(done, reached, overseen, reward, 0.5)
    assert complete[:, 0].tolist() == [True, True, False, False] and not complete[:, 1].any()
    assert ret[:, 0].tolist() == [0.5, 1.0, 0.0, 0.0] and (ret[:, 1] == 0).all()   # return 0, no bootstrap
    rw = gw.routing_weights(er, eo)
    assert rw[0, 0].tolist() == [1.0, 0.0, 0.0]                       # overseen diamond: diamond expert
    assert (rw[2:].reshape(-1, 3) == 1).all() and (rw[:, 1] == 1).all()  # unfinished: both experts + gate
    keep = gw.loss_weights("routing", "keep", "original", er, eo, complete)
    assert torch.allclose(keep, torch.full((4, 2), 1 / 8))
    drop = gw.loss_weights("routing", "drop", "original", er, eo, complete)
    assert drop[:, 0].tolist() == [0.5, 0.5, 0.0, 0.0] and (drop[:, 1] == 0).all()
    # filtering as the original: overseen terminal episodes and no-terminal (incl. unfinished) ones,
    # loss scaled by the kept fraction (= weights over all steps)
    er2 = torch.tensor([[DIAMOND, GHOST], [0, 0]])
    eo2 = torch.tensor([[True, False], [False, False]])
    c2 = torch.tensor([[True, True], [False, False]])
    f = gw.loss_weights("filtering", "keep", "original", er2, eo2, c2)
    assert f.tolist() == [[0.25, 0.0], [0.25, 0.25]]
    f = gw.loss_weights("filtering", "keep", "overseen_only", er2, eo2, c2)
    assert f.tolist() == [[1.0, 0.0], [0.0, 0.0]]


def _reference_grads(policy, batch, job, cfg):
    """Plain autograd: a fresh forward over every step with route() in MoEPolicy.mix."""
    policy.zero_grad(set_to_none=True)
    T, N = batch["done"].shape
    kind = {"routing": "either", "no_routing": "either", "naive": "naive", "filtering": "true"}[job]
    reward = gw.training_reward(kind, batch["reached"], batch["overseen"]) * batch["done"].float()
    er, eo, complete, ret = gw.episode_outcomes(batch["done"], batch["reached"], batch["overseen"], reward, gw.GAMMA)
    w = gw.loss_weights(job, cfg["unfinished"], cfg["filter_mode"], er, eo, complete).flatten()
    er, eo, ret = er.flatten(), eo.flatten(), ret.flatten()
    obs = batch["obs"].flatten(0, 1)
    logits, gl = policy(obs, route_w=gw.routing_weights(er, eo) if job == "routing" else None)
    logp = torch.log_softmax(logits, -1)
    logp_a = logp.gather(1, batch["act"].flatten()[:, None]).squeeze(1)
    ent = -(logp.exp() * logp).sum(-1)
    v = policy.value(obs)
    loss = (w * (-logp_a * (ret - v.detach()) - gw.ENT_COEF * ent + gw.VF_COEF * (v - ret) ** 2)).sum()
    if job in ("routing", "no_routing") and eo.any():
        loss = loss + gw.GATE_COEF * torch.nn.functional.binary_cross_entropy_with_logits(
            gl[eo], (er[eo] == DIAMOND).float())
    loss.backward()
    return {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("job,unfinished,gate", [("routing", "keep", "original"), ("routing", "drop", "original"),
                                                 ("routing", "keep", "mlp64"), ("no_routing", "keep", "original"),
                                                 ("naive", "keep", "original"), ("filtering", "keep", "original")])
def test_update_equals_an_independently_written_loss(job, unfinished, gate):
    # update() (autograd through route() in MoEPolicy.mix) against the loss written out again here
    torch.manual_seed(0)
    cfg = dict(unfinished=unfinished, filter_mode="original", critic="linear", zero_bias=False,
               precision="fp32", single_expert_baselines=True, gate=gate)
    policy = gw.make_policy(job, cfg)
    env = GridworldVecEnv(16, 0.5, return_final_obs=False)
    obs, _ = env.reset(seed=0)
    _, batch = gw.rollout(policy, env, obs, 32, torch.Generator().manual_seed(1))
    assert batch["overseen"].any() and (~batch["done"][-1]).any()   # routed rows and unfinished rows present
    policy.zero_grad(set_to_none=True)
    gw.update(policy, batch, job, cfg)
    got = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    ref = _reference_grads(policy, batch, job, cfg)
    assert got.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-6, msg=n)


def test_routing_weights_reach_the_experts_through_update():
    # one batch, routed vs not: routing changes the experts' gradients and the gate's, and an
    # episode routed away from an expert leaves no gradient there
    torch.manual_seed(0)
    cfg = dict(unfinished="keep", filter_mode="overseen_only", critic="linear", zero_bias=False,
               precision="fp32", single_expert_baselines=True, gate="original")
    policy = gw.make_policy("routing", cfg)
    env = GridworldVecEnv(16, 1.0, return_final_obs=False)     # everything overseen
    _, batch = gw.rollout(policy, env, env.reset(seed=0)[0], 32, torch.Generator().manual_seed(1))
    grads = {}
    for job in ("routing", "no_routing"):
        policy.zero_grad(set_to_none=True)
        gw.update(policy, batch, job, cfg)
        grads[job] = {n: p.grad.clone() for n, p in policy.named_parameters()}
    assert not torch.allclose(grads["routing"]["w2"], grads["no_routing"]["w2"])
    assert torch.equal(grads["routing"]["critic.weight"], grads["no_routing"]["critic.weight"])   # the critic is not routed


def test_original_gate_equals_conv_then_mlp():
    # The original code's gate is Conv2d(4, 4, 1) -> flatten -> MLP 100-256-256-1; ours takes flat
    # observations: outputs and the gradients of every gate parameter must equal the plain stack's.
    torch.manual_seed(0)
    gate = gw.Gate("original")
    with torch.no_grad():
        gate.conv.bias.normal_()                       # a non-zero conv bias exercises the folding
    ref = torch.nn.Sequential(gate.conv, torch.nn.Flatten(), gate.fc1, torch.nn.ReLU(), gate.fc2,
                              torch.nn.ReLU(), gate.out)
    obs = GridworldVecEnv(32, 0.5).reset(seed=3)[0]
    out = gate(obs.flatten(1))
    torch.testing.assert_close(out, ref(obs).squeeze(-1))
    out.square().sum().backward()
    fast = {n: p.grad.clone() for n, p in gate.named_parameters()}
    gate.zero_grad()
    ref(obs).square().sum().backward()
    for n, p in gate.named_parameters():
        torch.testing.assert_close(fast[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    assert all(g.abs().sum() > 0 for g in fast.values())
    with pytest.raises(ValueError, match="gate must be one of"):
        gw.Gate("conv")


def test_single_expert_jobs_do_not_depend_on_the_gate_setting():
    # A finished naive or filtering run stays valid when only the MoE gate changes (it has no
    # gate); a routing run does not.
    cfg = dict(gw.PROFILES["cpu"], profile="cpu")
    for job in ("naive", "filtering", "oracle"):
        assert gw.job_config(job, dict(cfg, gate="mlp64")) == gw.job_config(job, dict(cfg, gate="original"))
        assert gw.make_policy(job, cfg).gate is None
    assert gw.job_config("routing", dict(cfg, gate="mlp64")) != gw.job_config("routing", dict(cfg, gate="original"))
    assert gw.job_config("naive", dict(cfg, single_expert_baselines=False))["gate"] == "original"


def test_batched_experts_equal_separate_experts():
    # The stacked (2, in, out) expert weights in one batched matmul give the same outputs and
    # gradients as two separate per-expert MLPs holding copies of the same weights.
    torch.manual_seed(0)
    policy = gw.MoEPolicy(zero_bias=False)
    obs = GridworldVecEnv(32, 0.5).reset(seed=2)[0]
    x = obs.flatten(1)
    rw = gw.routing_weights(torch.randint(0, 3, (32,)), torch.rand(32) < 0.5)
    logits, _ = policy(obs, route_w=rw)
    (logits.logsumexp(-1).sum() + logits[:, 1].sum()).backward()
    experts = []
    for e in range(2):
        l1, l2 = torch.nn.Linear(100, 256), torch.nn.Linear(256, 256)
        with torch.no_grad():
            l1.weight.copy_(policy.w1[e].t()), l1.bias.copy_(policy.b1[e, 0])
            l2.weight.copy_(policy.w2[e].t()), l2.bias.copy_(policy.b2[e, 0])
        experts.append((l1, l2))
    hd, hg = (torch.relu(l2(torch.relu(l1(x)))) for l1, l2 in experts)
    g = torch.sigmoid(policy.gate(x).squeeze(-1))
    from gradroute import route
    hd, hg, g = route(hd, rw[:, 0:1]), route(hg, rw[:, 1:2]), route(g, rw[:, 2])
    ref = policy.head(g[:, None] * hd + (1 - g[:, None]) * hg)
    torch.testing.assert_close(ref, logits)
    policy.zero_grad()
    (ref.logsumexp(-1).sum() + ref[:, 1].sum()).backward()
    for e, (l1, l2) in enumerate(experts):
        torch.testing.assert_close(l1.weight.grad.t(), _stacked_grad(policy, obs, rw, "w1")[e], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(l2.weight.grad.t(), _stacked_grad(policy, obs, rw, "w2")[e], rtol=1e-4, atol=1e-6)


def _stacked_grad(policy, obs, rw, name):
    policy.zero_grad(set_to_none=True)
    logits, _ = policy(obs, route_w=rw)
    (logits.logsumexp(-1).sum() + logits[:, 1].sum()).backward()
    return getattr(policy, name).grad


def test_bf16_update_is_close_to_fp32():
    torch.manual_seed(0)
    cfg = dict(unfinished="keep", filter_mode="original", critic="linear", zero_bias=False,
               precision="fp32", single_expert_baselines=True)
    grads = {}
    for prec in ("fp32", "bf16"):
        torch.manual_seed(0)
        policy = gw.make_policy("routing", dict(cfg, precision=prec))
        env = GridworldVecEnv(16, 0.5, return_final_obs=False)
        obs, _ = env.reset(seed=0)
        _, batch = gw.rollout(policy, env, obs, 8, torch.Generator().manual_seed(1))
        gw.update(policy, batch, "routing", cfg)
        grads[prec] = policy.w2.grad
    cos = torch.nn.functional.cosine_similarity(grads["fp32"].flatten(), grads["bf16"].flatten(), 0)
    assert cos > 0.98


# ---------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_cli_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "gw"
    flags = ["run", "gridworld", "--out", str(out), "--oversight", "0.1", "--seeds", "0",
             "--updates", "2", "--num-envs", "8", "--val-episodes", "16", "--test-episodes", "32",
             "--eval-every", "1", "--workers", "1", "--methods", *gw.METHODS]
    assert main(flags) == 0
    m = read_json(out / "metrics.json")
    methods = {r["method"] for r in m["runs"]}
    assert methods == set(gw.METHODS)
    for r in m["runs"]:
        for k in ("method", "oversight", "seed", "true_return", "stepwise_return",
                  "ghost_rate_when_closer_unobserved", "train_seed"):
            assert k in r
        assert r["oversight"] == 0.1 and r["seed"] == 0
    assert m["headline_metric"] == "stepwise_return" and "summary_per_episode" in m
    for f in ("return_vs_oversight.png", "learning_curves_p0.1.png", "episodes.png", "summary.md"):
        assert (out / f).exists()
    before = {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()}
    capsys.readouterr()
    assert main(flags) == 0                                      # resumes: nothing retrained
    assert "resuming: 5 of 5" in capsys.readouterr().out
    assert before == {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()}
    assert read_json(out / "metrics.json")["runs"] == m["runs"]
    # another gate: the MoE jobs rerun, the single-expert ones (no gate) are reused, and the
    # episode figure is drawn from a routing model of this call with its own gate
    capsys.readouterr()
    assert main(flags + ["--gate", "mlp64"]) == 0
    printed = capsys.readouterr().out
    assert "resuming: 3 of 5" in printed and "recomputing routing_p0.1_s0.json" in printed
    after = {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()}
    assert sorted(n for n in after if after[n] != before[n]) == ["no_routing_p0.1_s0.json", "routing_p0.1_s0.json"]
    assert read_json(out / "runs" / "routing_p0.1_s0.json")["config"]["gate"] == "mlp64"
    assert "gate" not in read_json(out / "runs" / "naive_p0.1_s0.json")["config"]


def test_report_section_from_metrics(tmp_path):
    from gradroute.experiments import gridworld as gw
    from gradroute.utils import write_json

    summary = {m: {"0.05": {"mean": v, "lo": v, "hi": v, "n": 1}, "0.3": {"mean": v + 0.1, "lo": v, "hi": v, "n": 1}}
               for m, v in (("routing", 0.5), ("naive", 0.1), ("filtering", 0.0))}
    write_json(tmp_path / "metrics.json", {"summary": summary, "claims": gw.check_claims(summary),
                                           "config": {"updates": 10, "num_envs": 4, "num_steps": 32}})
    sec = gw.report(tmp_path)
    assert sec["verdict"] == "reproduced"  # 0.5 beats both at 5%, and 0.5 >= 0.2 / 0.1 at 30%
    assert sec["table"]["header"][:3] == ["method", "n seeds", "p=0.05"]
    assert sec["table"]["rows"][0][:3] == ["routing", 1, 0.5]
    # the re-run's per-step numbers sit only next to our per-step (headline) metric
    assert sec["table"]["rows"][-1][0].startswith("third-party") and sec["table"]["rows"][-1][2] == 0.49
    assert "stepwise" in sec["detail"]
    steer = gw.check_claims({"routing": {"0.3": {"mean": 0.2, "lo": 0.1, "hi": 0.3, "n": 2}},
                             "routing_ghost": {"0.3": {"mean": -0.2, "lo": -0.4, "hi": 0.15, "n": 2}}})
    c = steer["steered to diamond > steered to ghost at p=0.3"]
    assert c["holds_on_means"] and not c["intervals_separate"]
    write_json(tmp_path / "metrics.json", {"summary": {"routing": {"0.3": {"mean": 0.2, "lo": 0.1, "hi": 0.3, "n": 2}}},
                                           "claims": steer, "config": {"updates": 10, "num_envs": 4, "num_steps": 32}})
    assert gw.report(tmp_path)["verdict"] == "partly"      # steering alone never makes "reproduced"
    summary["routing"]["0.05"]["mean"] = -1.0
    write_json(tmp_path / "metrics.json", {"summary": summary, "claims": gw.check_claims(summary),
                                           "config": {"updates": 10, "num_envs": 4, "num_steps": 32}})
    assert gw.report(tmp_path)["verdict"] == "not"


def test_rollout_samples_like_sample_actions():
    # The rollout draws the Gumbel noise of all steps in one call; the actions must be exactly
    # those of sample_actions called once per step on the same generator.
    torch.manual_seed(0)
    policy = gw.make_policy("routing", dict(critic="linear", zero_bias=False, precision="bf16", gate="original"))
    env = GridworldVecEnv(8, 0.5, return_final_obs=False)
    _, batch = gw.rollout(policy, env, env.reset(seed=0)[0], 6, torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)
    acts = torch.stack([gw.sample_actions(policy(o)[0], gen) for o in batch["obs"]])
    assert torch.equal(acts, batch["act"])
    assert batch["obs"].shape == (6, 8, 4, 5, 5) and batch["done"].dtype == torch.bool


