"""The gridworld training loop as it was before the speed work (commit 6ce28e7), kept callable so
that ``benchmarks/gridworld_speed.py`` can time it side by side with today's loop.

Only what a training update needs is kept: the two-expert MLP policy (each expert its own pair of
``nn.Linear``), the MLP critic, fp32 throughout, a no-grad rollout followed by a second forward
pass over the kept rows, and steps of episodes unfinished at the end of a rollout dropped.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gradroute import route
from gradroute.envs.gridworld import DIAMOND, GridworldVecEnv
from gradroute.experiments.gridworld import episode_outcomes, routing_weights, training_reward
from gradroute.experiments.gridworld import mlp as _mlp

GAMMA, ENT_COEF, VF_COEF, GATE_COEF = 0.97, 0.1, 0.5, 0.01


class ReferenceMoEPolicy(nn.Module):
    def __init__(self, obs_dim=100, hidden=256, num_actions=4):
        super().__init__()
        self.diamond_expert = _mlp([obs_dim, hidden, hidden])
        self.ghost_expert = _mlp([obs_dim, hidden, hidden])
        self.gate = _mlp([obs_dim, 64, 1], final_act=False)
        self.head = nn.Linear(hidden, num_actions)
        self.critic = _mlp([obs_dim, hidden, hidden, 1], final_act=False)

    def forward(self, obs, route_w=None):
        x = obs.flatten(1)
        h_d, h_g = self.diamond_expert(x), self.ghost_expert(x)
        gate_logit = self.gate(x).squeeze(-1)
        g = torch.sigmoid(gate_logit)
        if route_w is not None:
            h_d, h_g = route(h_d, route_w[:, 0:1]), route(h_g, route_w[:, 1:2])
            g = route(g, route_w[:, 2])
        g = g.unsqueeze(-1)
        return self.head(g * h_d + (1 - g) * h_g), gate_logit

    def value(self, obs):
        return self.critic(obs.flatten(1)).squeeze(-1)


def _sample(logits, gen):
    u = torch.rand(logits.shape, generator=gen).clamp_(1e-20, 1.0)
    return (logits - torch.log(-torch.log(u))).argmax(-1)


def reference_train(num_envs: int, updates: int, oversight: float = 0.1, seed: int = 0,
                    lr: float = 5e-5, num_steps: int = 32) -> ReferenceMoEPolicy:
    """``updates`` routing updates of the old loop (no evaluation)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    env = GridworldVecEnv(num_envs, oversight, return_final_obs=False)
    policy = ReferenceMoEPolicy()
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    obs, _ = env.reset(seed=seed)
    T, N = num_steps, num_envs
    for _ in range(updates):
        b_obs = torch.zeros(T, N, *env.obs_shape)
        b_act = torch.zeros(T, N, dtype=torch.long)
        b_done = torch.zeros(T, N, dtype=torch.bool)
        b_reached = torch.zeros(T, N, dtype=torch.long)
        b_overseen = torch.zeros(T, N, dtype=torch.bool)
        with torch.no_grad():
            for t in range(T):
                logits, _ = policy(obs)
                act = _sample(logits, gen)
                b_obs[t], b_act[t] = obs, act
                obs, _, term, trunc, info = env.step(act)
                b_done[t], b_reached[t], b_overseen[t] = term | trunc, info["reached"], info["overseen"]
        reward = training_reward("either", b_reached, b_overseen) * b_done.float()
        ep_reached, ep_overseen, complete, returns = episode_outcomes(b_done, b_reached, b_overseen, reward, GAMMA)
        mask = complete
        if mask.sum() == 0:
            continue
        o, a, g_ret = b_obs[mask], b_act[mask], returns[mask]
        er, eo = ep_reached[mask], ep_overseen[mask]
        logits, gate_logit = policy(o, route_w=routing_weights(er, eo))
        logp = F.log_softmax(logits, -1)
        logp_a = logp.gather(1, a[:, None]).squeeze(1)
        entropy = -(logp.exp() * logp).sum(-1)
        v = policy.value(o)
        adv = g_ret - v.detach()
        loss = -(logp_a * adv).mean() - ENT_COEF * entropy.mean() + VF_COEF * F.mse_loss(v, g_ret)
        if eo.any():
            target = (er[eo] == DIAMOND).float()
            loss = loss + GATE_COEF * F.binary_cross_entropy_with_logits(gate_logit[eo], target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return policy
