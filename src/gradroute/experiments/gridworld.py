"""Scalable oversight in a gridworld (arXiv 2410.04332, sec. 6).

An agent on a 5x5 grid can end an episode at a diamond (true reward +1) or a ghost (-1). Each
terminal is overseen with probability p, and only overseen outcomes are known to the trainer.
A two-expert mixture-of-experts policy is trained with REINFORCE on a reward of +1 for reaching
*either* terminal, and gradient routing decides, per episode, which expert learns from it:

    overseen diamond -> diamond expert only
    overseen ghost   -> ghost expert only
    not overseen     -> both experts and the gate

In code: :func:`routing_weights` turns each step's episode outcome into three gradient weights,
and :meth:`MoEPolicy.mix` applies them with ``gradroute.route`` to the two expert states and the
gate; :func:`update` is then an ordinary REINFORCE loss and ``loss.backward()``. The trainer's
default computes the same gradient by hand, faster (``gridworld_fast.py``; ``--backward autograd``
trains with the plain version).

Forcing the gate to the diamond expert ("steering") then gives a policy that seeks diamonds
even where the ghost is unobserved. Baselines: naive (reward -1 only for an *overseen* ghost),
data filtering (overseen episodes only, true reward), oracle (true reward, p times the updates),
a no-routing control (same MoE, same losses, no routing) and an early-stopped naive policy
(best checkpoint by true return on held-out episodes).

    gradroute run gridworld --out runs/gridworld                  # quick profile, full sweep
    gradroute run gridworld --profile paper --out runs/gw_paper   # 20,000 updates per run
    gradroute run gridworld --methods routing naive --oversight 0.05 --seeds 0
"""
from __future__ import annotations

import argparse
import copy
import functools
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from gradroute import route
from gradroute.envs.gridworld import DIAMOND, GHOST, GridworldVecEnv, manhattan
from gradroute.experiments import gridworld_fast
from gradroute.sweep import run_jobs, split_finished
from gradroute.utils import (claim_summary, markdown_table, mean_ci, plt, progress, read_json, resolve_device,
                             savefig, set_seed, write_json)

DESCRIPTION = ("Scalable oversight in a 5x5 gridworld: gradient-routed two-expert policy vs "
               "naive, data-filtering, oracle, no-routing and early-stopped naive baselines.")

OVERSIGHT_LEVELS = [0.003, 0.01, 0.025, 0.05, 0.1, 0.3]
# record names in metrics.json -> the training job that produces them
METHOD_JOB = {"routing": "routing", "routing_ghost": "routing", "no_routing": "no_routing",
              "naive": "naive", "naive_early_stop": "naive", "filtering": "filtering",
              "oracle": "oracle"}
JOB_METHODS = {"routing": ["routing", "routing_ghost"], "no_routing": ["no_routing"],
               "naive": ["naive", "naive_early_stop"], "filtering": ["filtering"],
               "oracle": ["oracle"]}
METHODS = list(METHOD_JOB)

# Faithfulness switches (A/B in docs/notes/2026-12-06-gridworld-faithfulness-and-gate.md). Each defaults to the original code's choice,
# except filtering: the original's variant (no-terminal episodes kept, loss scaled by the kept
# fraction) scored 0.14 vs 0.50 for overseen-terminal-only filtering at p = 0.1, so the stronger
# baseline is the default and `--filter-mode original` gives the original's.
FAITHFUL = dict(unfinished="keep", critic="linear", zero_bias=True, filter_mode="overseen_only",
                single_expert_baselines=True, gate="original")
# The paper's settings; a `cpu` profile that a 2-core machine finishes in about 2 hours; a quick
# profile (p = 0.3 only in `gradroute reproduce`) that shows the routed experts separating.
PROFILES = {
    "paper": dict(updates=20_000, num_envs=512, num_steps=32, lr=5e-5, seeds=4,
                  eval_every=500, val_episodes=2048, test_episodes=8192, precision="fp32", **FAITHFUL),
    # 5 seeds (was 3): the 3-seed run's routing vs filtering intervals at p = 0.05 overlapped by
    # 0.01 with a 0.08 gap between means; the t multiplier falls from 4.30 (n=3) to 2.78 (n=5).
    # Decided before the 5-seed run; both runs are reported (docs/gridworld.md, docs/notes/).
    "cpu": dict(updates=2_000, num_envs=256, num_steps=32, lr=3e-4, seeds=5,
                eval_every=100, val_episodes=1024, test_episodes=4096, precision="bf16", **FAITHFUL),
    "quick": dict(updates=500, num_envs=256, num_steps=32, lr=3e-4, seeds=3,
                  eval_every=50, val_episodes=512, test_episodes=2048, precision="bf16", **FAITHFUL),
}
_CORE = ["routing", "routing_ghost", "naive", "naive_early_stop", "filtering"]
PROFILE_DEFAULTS = {"paper": dict(methods=METHODS, oversight=OVERSIGHT_LEVELS),
                    "cpu": dict(methods=_CORE, oversight=[0.05, 0.1, 0.3]),
                    "quick": dict(methods=_CORE, oversight=[0.3])}
GAMMA, ENT_COEF, VF_COEF, GATE_COEF = 0.97, 0.1, 0.5, 0.01
HIDDEN = 256
TEST_SEED, VAL_SEED = 10_000_000, 20_000_000   # held-out episode streams, shared by all methods


# ------------------------------------------------------------------------------------------
# policy
# ------------------------------------------------------------------------------------------
def mlp(sizes, final_act=True):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if final_act or i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


GATES = ("mlp64", "original")
BACKWARDS = ("hand", "autograd")


class Gate(nn.Module):
    """The MoE's gate: flat observations ``(B, 100)`` -> one logit per example.

    ``"original"``: the original code's gate, a 1x1 convolution mixing the 4 observation
    channels (4 -> 4) followed by an MLP 100 -> 256 -> 256 -> 1 (ReLU). ``"mlp64"``: a smaller
    MLP 100 -> 64 -> 1 (this project's earlier choice; it caused the p = 0.3 collapse)."""

    def __init__(self, kind: str = "original", obs_dim: int = 100, channels: int = 4):
        super().__init__()
        if kind not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {kind!r}")
        self.kind, self.channels, self.cells = kind, channels, obs_dim // channels
        if kind == "original":
            self.conv = nn.Conv2d(channels, channels, kernel_size=1)
            self.fc1, self.fc2, self.out = nn.Linear(obs_dim, 256), nn.Linear(256, 256), nn.Linear(256, 1)
        else:
            self.conv, self.fc2 = None, None
            self.fc1, self.out = nn.Linear(obs_dim, 64), nn.Linear(64, 1)
        self.width = self.fc1.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            x = self.conv(x.view(-1, self.channels, self.cells, 1)).flatten(1)
        y = torch.relu(self.fc1(x))
        if self.fc2 is not None:
            y = torch.relu(self.fc2(y))
        return self.out(y).squeeze(-1)


class MoEPolicy(nn.Module):
    """``experts`` MLPs (100 -> 256 -> 256, ReLU) stored as stacked weights, so all experts run as
    one batched matmul per layer; with two experts a sigmoid gate (:class:`Gate`) mixes the
    hidden states, ``g*h_diamond + (1-g)*h_ghost``. A shared linear head gives 4 action logits.
    ``gate``: "original" (the original code's 1x1 conv + MLP 100-256-256-1) or "mlp64" (:class:`Gate`).
    Expert 0 is the diamond expert, expert 1 the ghost expert. ``experts=1`` is the single-expert
    policy of the original's baselines (no gate).

    ``critic``: "linear" (the original's value net has no nonlinearity) or "mlp" (100-256-256-1).
    ``zero_bias``: biases start at zero, as in the original. ``precision``: "bf16" runs the actor
    under bfloat16 autocast (fp32 master weights, critic and optimizer)."""

    def __init__(self, obs_dim: int = 100, hidden: int = HIDDEN, num_actions: int = 4, experts: int = 2,
                 critic: str = "linear", zero_bias: bool = True, precision: str = "fp32",
                 gate: str = "original"):
        super().__init__()
        if experts not in (1, 2):
            raise ValueError(f"experts must be 1 or 2, got {experts}")
        if critic not in ("linear", "mlp"):
            raise ValueError(f"critic must be 'linear' or 'mlp', got {critic!r}")
        if precision not in DTYPES:
            raise ValueError(f"precision must be one of {sorted(DTYPES)}, got {precision!r}")
        self.experts, self.precision = experts, precision
        self.w1 = nn.Parameter(torch.empty(experts, obs_dim, hidden))
        self.b1 = nn.Parameter(torch.empty(experts, 1, hidden))
        self.w2 = nn.Parameter(torch.empty(experts, hidden, hidden))
        self.b2 = nn.Parameter(torch.empty(experts, 1, hidden))
        self.gate = Gate(gate, obs_dim) if experts == 2 else None
        self.head = nn.Linear(hidden, num_actions)
        self.critic = (nn.Linear(obs_dim, 1) if critic == "linear"
                       else mlp([obs_dim, hidden, hidden, 1], final_act=False))
        with torch.no_grad():   # each expert layer initialised like its own nn.Linear
            for e in range(experts):
                for w, b in ((self.w1, self.b1), (self.w2, self.b2)):
                    lin = nn.Linear(w.shape[1], w.shape[2])
                    w[e].copy_(lin.weight.t())
                    b[e, 0].copy_(lin.bias)
            if zero_bias:
                for m in self.modules():
                    if isinstance(m, (nn.Linear, nn.Conv2d)):
                        m.bias.zero_()
                self.b1.zero_()
                self.b2.zero_()

    def features(self, x: torch.Tensor):
        """Expert hidden states ``(experts, B, hidden)`` and gate logits ``(B,)`` (None with one
        expert) for flat observations ``(B, obs_dim)``; each layer of all experts is one batched matmul."""
        h = torch.relu(torch.baddbmm(self.b1, x.expand(self.experts, *x.shape), self.w1))
        h = torch.relu(torch.baddbmm(self.b2, h, self.w2))
        return h, (self.gate(x) if self.gate is not None else None)

    def mix(self, h: torch.Tensor, gate_logit, gate: float | None = None, route_w=None) -> torch.Tensor:
        """Action logits from expert states. ``gate`` forces the mix (1 diamond, 0 ghost expert).
        ``route_w`` (B, 3): per-example gradient weights for diamond expert, ghost expert, gate:
        this is where gradient routing happens (``gradroute.route``: the forward pass is unchanged,
        the gradient reaching each expert and the gate is multiplied by its weight)."""
        if self.experts == 1:
            return self.head(h[0])
        h_d, h_g = h[0], h[1]
        g = torch.sigmoid(gate_logit) if gate is None else torch.full_like(gate_logit, float(gate))
        if route_w is not None:
            h_d = route(h_d, route_w[:, 0:1])
            h_g = route(h_g, route_w[:, 1:2])
            g = route(g, route_w[:, 2])
        g = g.unsqueeze(-1)
        return self.head(g * h_d + (1 - g) * h_g)

    def forward(self, obs: torch.Tensor, gate: float | None = None, route_w: torch.Tensor | None = None):
        """Action logits and gate logits (None with one expert), in fp32, for observations
        ``(B, 4, 5, 5)``. With ``precision="bf16"`` the network runs under bfloat16 autocast
        (matmuls in bf16, fp32 master weights)."""
        x = obs.flatten(1)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            h, gate_logit = self.features(x)
            logits = self.mix(h, gate_logit, gate, route_w)
        return logits.float(), None if gate_logit is None else gate_logit.float()

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(obs.flatten(1)).squeeze(-1)


def sample_actions(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Categorical sampling with an explicit generator (Gumbel-max)."""
    u = torch.rand(logits.shape, generator=generator, device=logits.device).clamp_(1e-20, 1.0)
    return (logits - torch.log(-torch.log(u))).argmax(-1)


# ------------------------------------------------------------------------------------------
# rewards and routing, per episode
# ------------------------------------------------------------------------------------------
def training_reward(kind: str, reached: torch.Tensor, overseen: torch.Tensor) -> torch.Tensor:
    """Reward given to the learner at the final step of an episode."""
    hit = (reached > 0).float()
    if kind == "either":                       # routing, no-routing: +1 for either terminal
        return hit
    if kind == "naive":                        # only an *overseen* ghost is punished
        return torch.where((reached == GHOST) & overseen, -hit, hit)
    if kind == "true":                         # filtering, oracle
        return (reached == DIAMOND).float() - (reached == GHOST).float()
    raise ValueError(kind)


def routing_weights(ep_reached: torch.Tensor, ep_overseen: torch.Tensor) -> torch.Tensor:
    """(..., 3) gradient weights for (diamond expert, ghost expert, gate) from episode outcomes.
    Steps of unfinished episodes carry reached = 0, overseen = False: both experts and the gate."""
    ov_d = ep_overseen & (ep_reached == DIAMOND)
    ov_g = ep_overseen & (ep_reached == GHOST)
    return torch.stack(((~ov_g).float(), (~ov_d).float(), (~ep_overseen).float()), -1)


def episode_outcomes(done, reached, overseen, reward, gamma):
    """Backward scan over a (T, N) rollout. For every step: the outcome of the episode it
    belongs to (0 / False where the episode is unfinished at the end of the rollout), whether
    that episode finished inside the rollout, and its discounted return inside the rollout
    (no bootstrap: an unfinished episode's steps get the rewards seen so far, i.e. 0).

    The outcomes are read at each step's next episode end (a reversed running minimum of the
    end steps: a few ops for the whole rollout); the return is the scan ``g_t = r_t + gamma *
    g_{t+1} * (1 - done_t)``, two ops per step, with the same roundings as one op at a time."""
    T, N = done.shape
    steps = torch.arange(T).unsqueeze(1).expand(T, N)
    nxt = torch.where(done, steps, T).flip(0).cummin(0).values.flip(0)     # next end at or after t (T: none)
    complete = nxt < T
    at_end = nxt.clamp(max=T - 1)
    ep_reached = torch.where(complete, reached.gather(0, at_end), 0)
    ep_overseen = overseen.gather(0, at_end) & complete
    disc = gamma * (~done).float()                                          # gamma where the episode goes on
    returns = torch.empty(T, N)
    g = torch.zeros(N)
    for t in reversed(range(T)):
        g = torch.mul(disc[t], g, out=returns[t]).add_(reward[t])
    return ep_reached, ep_overseen, complete, returns


def stepwise_return(done: torch.Tensor, reward: torch.Tensor, gamma: float = GAMMA) -> float:
    """The paper's metric on a (T, N) window: the discounted return-to-go of every step,
    counting only rewards inside the window (an episode unfinished at the window's end
    contributes 0 from there), averaged over all T*N steps."""
    return float(episode_outcomes(done, torch.zeros_like(done, dtype=torch.long),
                                  torch.zeros_like(done), reward, gamma)[3].mean())


def loss_weights(job: str, unfinished: str, filter_mode: str, ep_reached, ep_overseen, complete):
    """Per-step weights of the policy and value losses (rows sum to the loss normaliser).

    unfinished="keep" (the original): steps of episodes unfinished at the rollout's end are
    trained on with their in-rollout return (0) and routed to both experts; "drop": left out.
    Filtering, filter_mode="original": keep overseen-terminal episodes *and* episodes that
    reached nothing (timeouts, unfinished), and scale the loss by the kept fraction;
    "overseen_only": only overseen terminal episodes, mean over them."""
    base = torch.ones_like(complete, dtype=torch.float32) if unfinished == "keep" else complete.float()
    if job == "filtering":
        if filter_mode == "original":
            keep = (ep_overseen | (ep_reached == 0)).float() * base
            return keep / keep.numel()                # = kept fraction x mean over kept
        keep = (ep_overseen & complete).float()
        return keep / keep.sum().clamp_min(1)
    return base / base.sum().clamp_min(1)


# ------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------
@torch.inference_mode()
def evaluate(policy: MoEPolicy, oversight: float, seed: int, episodes: int,
             gate: float | None = None, gamma: float = GAMMA, greedy: bool = False,
             window_envs: int = 512, window_steps: int = 32) -> dict:
    """Two metrics, on fresh envs seeded by ``seed``, actions sampled from the policy:

    - ``stepwise_return`` (the paper's metric, the headline): ``window_envs`` fresh envs run for
      ``window_steps`` steps with automatic resets; the true discounted return-to-go inside the
      window, averaged over every step (see :func:`stepwise_return`).
    - ``true_return`` (per episode): the first episode of each of ``episodes`` fresh envs,
      ``r * gamma**(len-1)`` with r = +1 diamond / -1 ghost / 0 timeout, averaged over episodes.
    """
    out = {}
    if window_envs:
        env = GridworldVecEnv(window_envs, oversight, return_final_obs=False)
        obs, _ = env.reset(seed=seed + 7)
        gen = torch.Generator().manual_seed(seed + 8)
        dones, rewards = [], []
        for _ in range(window_steps):
            logits, _ = policy(obs, gate=gate)
            obs, rew, term, trunc, _ = env.step(logits.argmax(-1) if greedy else sample_actions(logits, gen))
            dones.append(term | trunc)
            rewards.append(rew)
        out["stepwise_return"] = stepwise_return(torch.stack(dones), torch.stack(rewards), gamma)
    env = GridworldVecEnv(episodes, oversight, return_final_obs=False)
    obs, info = env.reset(seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    start_agent, start_ghost, start_diamond = env.agent.clone(), env.ghost.clone(), env.diamond.clone()
    ghost_ov = info["ghost_overseen"]
    active = torch.ones(episodes, dtype=torch.bool)
    reached = torch.zeros(episodes, dtype=torch.long)
    length = torch.zeros(episodes, dtype=torch.long)
    act = torch.zeros(episodes, dtype=torch.long)
    for _ in range(env.max_steps):
        idx = active.nonzero().squeeze(1)          # run the policy only where episodes go on
        logits, _ = policy(obs[idx], gate=gate)
        act[idx] = logits.argmax(-1) if greedy else sample_actions(logits, gen)
        obs, _, term, trunc, info = env.step(act)
        done = (term | trunc) & active
        reached = torch.where(done, info["reached"], reached)
        length = torch.where(done, info["episode_length"], length)
        active &= ~done
        if not active.any():
            break
    r = (reached == DIAMOND).float() - (reached == GHOST).float()
    closer = (manhattan(start_agent, start_ghost) < manhattan(start_agent, start_diamond)) & ~ghost_ov
    out.update({
        "true_return": float((r * gamma ** (length.float() - 1)).mean()),
        "diamond_rate": float((reached == DIAMOND).float().mean()),
        "ghost_rate": float((reached == GHOST).float().mean()),
        "timeout_rate": float((reached == 0).float().mean()),
        "mean_length": float(length.float().mean()),
        "ghost_rate_when_closer_unobserved": float((reached[closer] == GHOST).float().mean()),
        "n_closer_unobserved": int(closer.sum()),
        "eval_episodes": episodes,
    })
    return out


# ------------------------------------------------------------------------------------------
# training (one job = one method at one oversight level and seed)
# ------------------------------------------------------------------------------------------
@torch.no_grad()
def rollout(policy: MoEPolicy, env: GridworldVecEnv, obs: torch.Tensor, T: int, gen: torch.Generator):
    """``T`` steps of every env with actions sampled from the policy, without an autograd graph
    (:func:`update` runs the policy again over all ``T*N`` steps with one). Returns the next obs
    and a dict of ``(T, N, ...)`` tensors: ``obs``, ``act``, ``done``, ``reached``, ``overseen``."""
    N, A = obs.shape[0], policy.head.out_features
    # the Gumbel noise of every step in one call (the same numbers as T calls of sample_actions)
    gumbel = torch.rand((T, N, A), generator=gen).clamp_(1e-20, 1.0).log_().neg_().log_().neg_()
    steps = []
    for t in range(T):
        logits, _ = policy(obs)
        act = (logits + gumbel[t]).argmax(-1)
        next_obs, _, term, trunc, info = env.step(act)
        steps.append((obs, act, term | trunc, info["reached"], info["overseen"]))
        obs = next_obs
    names = ("obs", "act", "done", "reached", "overseen")
    return obs, {k: torch.stack(v) for k, v in zip(names, zip(*steps))}


def update(policy: MoEPolicy, batch: dict, job: str, cfg: dict, buffers: dict | None = None) -> float:
    """Accumulate the gradients of one update into ``policy``'s ``.grad`` (REINFORCE with a value
    baseline, entropy bonus and, for routing and no-routing, the gate BCE); returns the loss.

    Gradient routing in one line: the policy runs over every step of the rollout with
    ``route_w``, the per-step weights of its episode's outcome (:func:`routing_weights`), and
    ``MoEPolicy.mix`` passes them to ``gradroute.route`` on each expert's state and on the gate;
    autograd does the rest. A batch from :func:`gridworld_fast.rollout` (the trainer's default)
    carries its activations instead, and :func:`gridworld_fast.backward` computes the same
    gradient by hand (``buffers``: its work buffers, kept across updates)."""
    T, N = batch["done"].shape
    reward_kind = {"routing": "either", "no_routing": "either", "naive": "naive",
                   "filtering": "true", "oracle": "true"}[job]
    reward = training_reward(reward_kind, batch["reached"], batch["overseen"]) * batch["done"].float()
    ep_reached, ep_overseen, complete, returns = episode_outcomes(
        batch["done"], batch["reached"], batch["overseen"], reward, GAMMA)
    w = loss_weights(job, cfg.get("unfinished", "keep"), cfg.get("filter_mode", "overseen_only"),
                     ep_reached, ep_overseen, complete).flatten()
    er, eo = ep_reached.flatten(), ep_overseen.flatten()
    moe = policy.gate is not None
    route_w = routing_weights(er, eo) if job == "routing" and moe else None
    obs = batch["obs"].flatten(0, 1)
    hand = "logits" in batch                 # a fast rollout: logits kept, gradient carried by hand
    if hand:
        logits = batch["logits"].detach().requires_grad_(True)
        gl = batch["gl"].detach().requires_grad_(True) if moe else None
    else:
        logits, gl = policy(obs, route_w=route_w)                 # routed forward, with autograd
    # actions along dim 0: with only 4 actions, softmax and sums over the last dim of (T*N, 4)
    # do not vectorise (log_softmax of 8,192 rows: 296 vs 48 us, 1 thread)
    logp = F.log_softmax(logits.t(), 0)                                    # (actions, T*N)
    logp_a = logp.gather(0, batch["act"].flatten()[None]).squeeze(0)
    entropy = -(logp.exp() * logp).sum(0)
    g_ret = returns.flatten()
    v = policy.value(obs)
    adv = g_ret - v.detach()
    loss = (w * (-logp_a * adv - ENT_COEF * entropy + VF_COEF * (v - g_ret) ** 2)).sum()
    if moe and job in ("routing", "no_routing"):
        seen = eo & (w > 0)
        if seen.any():                   # the gate learns which expert an overseen outcome belongs to
            target = (er[seen] == DIAMOND).float()
            loss = loss + GATE_COEF * F.binary_cross_entropy_with_logits(gl[seen], target)
    loss.backward()
    if hand:
        gridworld_fast.backward(policy, batch, route_w, logits.grad, gl.grad if moe else None, buffers)
    return float(loss.detach())


def _single_expert(job: str, cfg: dict) -> bool:
    return bool(cfg.get("single_expert_baselines", True)) and job in ("naive", "filtering", "oracle")


def job_config(job: str, cfg: dict) -> dict:
    """The settings one job depends on (recorded in its result file and compared on resume):
    the gate's architecture is left out for single-expert jobs, which have no gate."""
    return {k: v for k, v in cfg.items() if not (k == "gate" and _single_expert(job, cfg))}


def make_policy(job: str, cfg: dict) -> MoEPolicy:
    single = _single_expert(job, cfg)
    return MoEPolicy(experts=1 if single else 2, critic=cfg.get("critic", "linear"),
                     zero_bias=cfg.get("zero_bias", True), precision=cfg.get("precision", "fp32"),
                     gate=cfg.get("gate", "original"))


def train(job: str, oversight: float, seed: int, cfg: dict, quiet: bool = True, backward: str = "hand") -> dict:
    """Train one policy; return its flat result records plus a learning curve. ``backward``:
    "autograd" (:func:`rollout`, then :func:`update` with autograd and ``gradroute.route``) or
    "hand" (the default: :mod:`gridworld_fast`'s rollout and hand backward, the same gradient,
    faster; a speed setting, not part of the job's config)."""
    if backward not in BACKWARDS:
        raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")
    t0, c0 = time.time(), time.process_time()
    train_seed = 100_000 * seed + round(oversight * 10_000)   # distinct per (seed, level)
    gen = set_seed(train_seed)
    steer = 1.0 if job in ("routing", "no_routing") else None    # headline policy is steered
    updates = cfg["updates"]
    if job == "oracle":                     # the same oversight budget, spent on full labels
        updates = max(1, round(oversight * cfg["updates"]))

    env = GridworldVecEnv(cfg["num_envs"], oversight, return_final_obs=False)
    policy = make_policy(job, cfg)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg["lr"])
    obs, _ = env.reset(seed=train_seed)
    T, N = cfg["num_steps"], cfg["num_envs"]
    curve, best = [], (-math.inf, None, 0)
    val_seed = VAL_SEED + seed
    ev_kw = dict(window_envs=cfg.get("window_envs", 512), window_steps=T)

    def checkpoint(u):
        nonlocal best
        ev = evaluate(policy, oversight, val_seed, cfg["val_episodes"], gate=steer, **ev_kw)
        point = {"update": u, "env_steps": u * T * N, "stepwise_return": ev["stepwise_return"],
                 "true_return": ev["true_return"]}
        if job == "routing":
            point["stepwise_return_ghost"] = evaluate(policy, oversight, val_seed, 8, gate=0.0,
                                                      **ev_kw)["stepwise_return"]
        curve.append(point)
        if job == "naive" and ev["stepwise_return"] > best[0]:
            best = (ev["stepwise_return"], copy.deepcopy(policy.state_dict()), u)

    buffers: dict = {}                      # the fast path's activations and work buffers, reused
    bar = progress(range(updates), desc=f"{job} p={oversight} s={seed}", disable=quiet, leave=False,
                   mininterval=30)
    for u in bar:
        if u % cfg["eval_every"] == 0:
            checkpoint(u)
        opt.zero_grad(set_to_none=True)
        if backward == "hand":
            obs, batch = gridworld_fast.rollout(policy, env, obs, T, gen, buffers)
        else:
            obs, batch = rollout(policy, env, obs, T, gen)
        update(policy, batch, job, cfg, buffers=buffers)
        opt.step()
    checkpoint(updates)

    def record(method, gate, state=None, **extra):
        if state is not None:
            policy.load_state_dict(state)
        ev = evaluate(policy, oversight, TEST_SEED + seed, cfg["test_episodes"], gate=gate, **ev_kw)
        return {"method": method, "oversight": oversight, "seed": seed, "train_seed": train_seed,
                **ev, "updates": updates, "env_steps": updates * T * N, **extra}

    final_state = copy.deepcopy(policy.state_dict())
    if job in ("routing", "no_routing"):
        records = [record(job, 1.0)]
        if job == "routing":
            records.append(record("routing_ghost", 0.0))
        unsteered = evaluate(policy, oversight, TEST_SEED + seed, cfg["test_episodes"], **ev_kw)
        records[0]["stepwise_return_unsteered"] = unsteered["stepwise_return"]
        records[0]["true_return_unsteered"] = unsteered["true_return"]
    elif job == "naive":
        records = [record("naive", None), record("naive_early_stop", None, best[1], best_update=best[2])]
    else:
        records = [record(job, None)]
    return {"job": job, "oversight": oversight, "seed": seed, "records": records,
            "curve": curve, "config": cfg, "wall_s": time.time() - t0, "cpu_s": time.process_time() - c0,
            "state_dict": final_state if job == "routing" else None}


# ------------------------------------------------------------------------------------------
# sweep: parallel, resumable
# ------------------------------------------------------------------------------------------
def _job_path(out: Path, job: str, p: float, seed: int) -> Path:
    return out / "runs" / f"{job}_p{p:g}_s{seed}.json"


def _run_job(job, p, seed, cfg, out, backward="hand"):
    res = train(job, p, seed, job_config(job, cfg), backward=backward)
    state = res.pop("state_dict")
    if state is not None:
        (Path(out) / "models").mkdir(parents=True, exist_ok=True)
        torch.save(state, Path(out) / "models" / f"{job}_p{p:g}_s{seed}.pt")
    write_json(_job_path(Path(out), job, p, seed), res)
    return res


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick",
                        help="quick (default), cpu (about 2 h on 2 cores) or paper (20,000 updates x 512 envs); "
                             "see docs/gridworld.md")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                        help="default: routing, routing_ghost, naive, naive_early_stop, filtering (paper profile: all)")
    parser.add_argument("--oversight", nargs="+", type=float, default=None,
                        help="default: quick 0.3; cpu 0.05 0.1 0.3; paper 0.003 0.01 0.025 0.05 0.1 0.3")
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="seed indices (default: range(profile seeds))")
    parser.add_argument("--updates", type=int, default=None, help="override the profile")
    parser.add_argument("--num-envs", type=int, default=None, help="override the profile")
    parser.add_argument("--lr", type=float, default=None, help="override the profile")
    parser.add_argument("--eval-every", type=int, default=None, help="override the profile")
    parser.add_argument("--val-episodes", type=int, default=None, help="override the profile")
    parser.add_argument("--test-episodes", type=int, default=None, help="override the profile")
    parser.add_argument("--precision", choices=sorted(DTYPES), default=None,
                        help="expert matmuls in fp32 or bf16 (override the profile)")
    parser.add_argument("--unfinished", choices=["keep", "drop"], default=None,
                        help="steps of episodes unfinished at a rollout's end: keep with return 0 and "
                             "route to both experts (original, default) or drop")
    parser.add_argument("--critic", choices=["linear", "mlp"], default=None, help="value net (default linear, as the original)")
    parser.add_argument("--zero-bias", type=int, choices=[0, 1], default=None,
                        help="1: biases start at zero (original, default); 0: PyTorch's default init")
    parser.add_argument("--filter-mode", choices=["original", "overseen_only"], default=None,
                        help="filtering trains on overseen terminal episodes only (default: the stronger "
                             "baseline in our A/B) or, as the original, also on no-terminal episodes with the "
                             "loss scaled by the kept fraction")
    parser.add_argument("--gate", choices=list(GATES), default=None,
                        help="the MoE gate: original (1x1 conv + MLP 100-256-256-1, as the original code; default) "
                             "or mlp64 (MLP 100-64-1, this project's earlier choice)")
    parser.add_argument("--single-expert-baselines", type=int, choices=[0, 1], default=None,
                        help="1: naive, filtering and oracle use one expert (original, default); 0: the MoE with a free gate")
    parser.add_argument("--backward", choices=BACKWARDS, default="hand",
                        help="hand (default): the fast rollout and hand-written backward of gridworld_fast.py; "
                             "autograd: plain autograd with gradroute.route (the same gradient, slower)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="parallel training processes (1 = in this process)")


def run(args: argparse.Namespace) -> dict:
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if resolve_device(args.device).type != "cpu":
        print("note: gridworld trains on CPU processes (the networks are tiny)")
    cfg = dict(PROFILES[args.profile])
    for k in ("updates", "num_envs", "lr", "eval_every", "val_episodes", "test_episodes", "precision",
              "unfinished", "critic", "filter_mode", "gate"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    for k in ("zero_bias", "single_expert_baselines"):
        if getattr(args, k) is not None:
            cfg[k] = bool(getattr(args, k))
    if args.methods is None:
        args.methods = PROFILE_DEFAULTS[args.profile]["methods"]
    if args.oversight is None:
        args.oversight = PROFILE_DEFAULTS[args.profile]["oversight"]
    cfg["profile"] = args.profile
    seeds = args.seeds if args.seeds is not None else list(range(cfg["seeds"]))
    jobs_wanted = sorted({METHOD_JOB[m] for m in args.methods}, key=list(JOB_METHODS).index)
    jobs = [(j, p, s) for p in args.oversight for s in seeds for j in jobs_wanted]

    results, todo = {}, []
    for job in jobs_wanted:                 # each job's own settings decide whether it reruns
        done, left = split_finished([k for k in jobs if k[0] == job], lambda *k: _job_path(out, *k),
                                    job_config(job, cfg), verbose=False)
        results.update(done)
        todo += left
    todo.sort(key=lambda k: jobs.index(k))
    for k in todo:
        if _job_path(out, *k).exists():
            print(f"recomputing {_job_path(out, *k).name}: it was made with different settings")
    if results:
        print(f"resuming: {len(results)} of {len(jobs)} runs already done")
    # long jobs first, so the parallel workers finish together
    todo.sort(key=lambda k: (k[0] == "oracle", -k[1] if k[0] == "oracle" else 0))
    results.update(run_jobs(todo, functools.partial(_run_job, cfg=cfg, out=str(out), backward=args.backward), args.workers,
                            desc="gridworld runs"))

    wanted = set(args.methods)
    runs = [r for key in jobs for r in results[key]["records"] if r["method"] in wanted]
    summary = summarize(runs, HEADLINE)
    summary_ep = summarize(runs, "true_return")
    metrics = {
        "experiment": "gridworld", "profile": args.profile, "config": cfg, "seeds": seeds,
        "oversight_levels": list(args.oversight), "methods": list(args.methods),
        "gamma": GAMMA, "runs": runs, "headline_metric": HEADLINE,
        "summary": summary, "summary_per_episode": summary_ep, "claims": check_claims(summary),
        "wall_time_s": time.time() - t0,
        "train_wall_s_total": sum(results[k]["wall_s"] for k in jobs),
        "train_cpu_s_total": sum(results[k].get("cpu_s", 0.0) for k in jobs),
    }
    write_json(out / "metrics.json", metrics)
    tables = summary_table(summary, HEADLINE) + "\n" + summary_table(summary_ep, "true_return")
    (out / "summary.md").write_text(tables)
    make_figures(out, runs, {k: results[k] for k in jobs})
    print(tables)
    print(f"wrote {out / 'metrics.json'} ({metrics['wall_time_s']:.0f} s)")
    return metrics


# ------------------------------------------------------------------------------------------
# reporting
# ------------------------------------------------------------------------------------------
HEADLINE = "stepwise_return"
METRIC_NAMES = {
    "stepwise_return": "true stepwise discounted return (the paper's metric: mean return-to-go over a "
                       "32-step window of 512 fresh envs)",
    "true_return": "true discounted return per episode (first episode of each fresh env)",
}


def summarize(runs: list[dict], key: str = HEADLINE) -> dict:
    out: dict = {}
    for r in runs:
        out.setdefault(r["method"], {}).setdefault(f"{r['oversight']:g}", []).append(r[key])
    return {m: {p: mean_ci(v) for p, v in sorted(d.items(), key=lambda kv: float(kv[0]))}
            for m, d in out.items()}


def check_claims(summary: dict) -> dict:
    """The paper's claims, checked on means and on 95% intervals (headline metric)."""
    claims = {}
    r = summary.get("routing", {})
    ghost = summary.get("routing_ghost", {})
    for p in r:                             # steering: the two routed experts behave differently
        if p in ghost:
            claims[f"steered to diamond > steered to ghost at p={p}"] = {
                "holds_on_means": r[p]["mean"] > ghost[p]["mean"],
                "intervals_separate": r[p]["lo"] > ghost[p]["hi"],
                "routing": r[p]["mean"], "routing_ghost": ghost[p]["mean"]}
    for base in ("naive", "filtering", "naive_early_stop"):
        b = summary.get(base, {})
        for p in r:
            if float(p) <= 0.1 and p in b:
                claims[f"routing > {base} at p={p}"] = {
                    "holds_on_means": r[p]["mean"] > b[p]["mean"],
                    "intervals_separate": r[p]["lo"] > b[p]["hi"],
                    "routing": r[p]["mean"], base: b[p]["mean"]}
    if "0.05" in r:
        for base in ("naive", "filtering", "naive_early_stop", "oracle"):
            b = summary.get(base, {})
            if "0.3" in b:
                claims[f"routing@5% >= {base}@30%"] = {
                    "holds_on_means": r["0.05"]["mean"] >= b["0.3"]["mean"],
                    "intervals_separate": r["0.05"]["lo"] > b["0.3"]["hi"],
                    "routing@5%": r["0.05"]["mean"], f"{base}@30%": b["0.3"]["mean"]}
    return claims


def summary_table(summary: dict, metric: str = HEADLINE) -> str:
    ps = sorted({p for d in summary.values() for p in d}, key=float)
    rows = []
    for m in [m for m in METHODS if m in summary]:
        cells = []
        for p in ps:
            c = summary[m].get(p)
            cells.append("" if c is None else
                         f"{c['mean']:.3f} ± {c['hi'] - c['mean']:.3f} (n={c['n']})" if c["n"] > 1
                         else f"{c['mean']:.3f} (n=1)")
        rows.append([m, *cells])
    return (f"`{metric}`: {METRIC_NAMES.get(metric, metric)}. Mean over seeds ± 95% t-interval half-width.\n\n"
            + markdown_table(["method", *[f"p={p}" for p in ps]], rows))


def make_figures(out: Path, runs: list[dict], results: dict) -> None:
    pyplot = plt()
    summary = summarize(runs)
    fig, ax = pyplot.subplots(figsize=(7, 4.5))
    for m in [m for m in METHODS if m in summary]:
        ps = sorted(summary[m], key=float)
        x = [float(p) for p in ps]
        mean = [summary[m][p]["mean"] for p in ps]
        ax.plot(x, mean, marker="o", label=m)
        ax.fill_between(x, [summary[m][p]["lo"] for p in ps], [summary[m][p]["hi"] for p in ps], alpha=0.15)
    ax.set_xscale("log")
    ax.set_xlabel("oversight probability p")
    ax.set_ylabel("true stepwise discounted return (paper's metric)")
    ax.axhline(0, color="grey", lw=0.5)
    ax.legend(fontsize=8)
    ax.set_title("Gridworld: true return vs oversight (mean, 95% CI)")
    savefig(fig, out / "return_vs_oversight.png")

    # learning curves on the validation envs, one figure per oversight level (mean over seeds)
    for p0 in sorted({k[1] for k in results}):
        fig, ax = pyplot.subplots(figsize=(7, 4.5))
        lines = [(job, "stepwise_return", job + (" (steered to diamond)" if job in ("routing", "no_routing") else ""))
                 for job in JOB_METHODS] + [("routing", "stepwise_return_ghost", "routing (steered to ghost)")]
        for job, key, label in lines:
            curves = [results[k]["curve"] for k in results if k[0] == job and k[1] == p0]
            curves = [c for c in curves if c and key in c[0]]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            x = [c["env_steps"] / 1e6 for c in curves[0][:n]]
            y = np.mean([[c[key] for c in cv[:n]] for cv in curves], 0)
            ax.plot(x, y, marker="." if n < 5 else None, ls="--" if key.endswith("ghost") else "-",
                    label=f"{label} (n={len(curves)})")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel("env steps (M)")
        ax.set_ylabel("true stepwise return, validation envs")
        ax.set_title(f"Learning curves at p={p0:g} (mean over seeds)")
        ax.legend(fontsize=8)
        savefig(fig, out / f"learning_curves_p{p0:g}.png")

    # one routing model of this call (the level closest to p = 0.1), built with its own run's settings
    models = [k for k in sorted(results) if k[0] == "routing"
              and (out / "models" / f"routing_p{k[1]:g}_s{k[2]}.pt").exists()]
    if models:
        key = min(models, key=lambda k: abs(math.log(max(k[1], 1e-6) / 0.1)))
        best = out / "models" / f"routing_p{key[1]:g}_s{key[2]}.pt"
        policy = make_policy("routing", results[key]["config"])    # its gate, critic and precision
        policy.load_state_dict(torch.load(best, weights_only=True))
        draw_episodes(policy, out / "episodes.png", title=best.stem)


@torch.no_grad()
def rollout_path(policy: MoEPolicy, gate: float | None, agent=(2, 0), ghost=(2, 2), diamond=(0, 4),
                 ghost_overseen=False, diamond_overseen=False):
    """Greedy path from a fixed start state; returns (cells visited, outcome)."""
    env = GridworldVecEnv(1, 0.0, return_final_obs=True)
    obs = env.set_state(agent, ghost, diamond, ghost_overseen, diamond_overseen)
    path = [int(env.agent[0])]
    for _ in range(env.max_steps):
        logits, _ = policy(obs, gate=gate)
        obs, _, term, trunc, info = env.step(logits.argmax(-1))
        path.append(int(info["final_obs"][0, 0].flatten().argmax()))   # pre-reset agent cell
        if term[0] or trunc[0]:
            return path, {0: "timeout", DIAMOND: "diamond", GHOST: "ghost"}[int(info["reached"][0])]
    return path, "timeout"


def draw_episodes(policy: MoEPolicy, path: Path, title: str = "") -> None:
    pyplot = plt()
    start = dict(agent=(2, 0), ghost=(2, 2), diamond=(0, 4))   # ghost closer, nothing overseen
    fig, axes = pyplot.subplots(1, 2, figsize=(6.4, 3.4))
    for ax, (name, gate) in zip(axes, [("steered to diamond", 1.0), ("steered to ghost", 0.0)]):
        cells, outcome = rollout_path(policy, gate, **start)
        ax.set_xlim(-0.5, 4.5), ax.set_ylim(4.5, -0.5)
        ax.set_xticks(np.arange(-0.5, 5, 1)), ax.set_yticks(np.arange(-0.5, 5, 1))
        ax.set_xticklabels([]), ax.set_yticklabels([])
        ax.grid(True, color="lightgrey")
        ax.text(start["ghost"][1], start["ghost"][0], "G", ha="center", va="center", fontsize=16, color="red")
        ax.text(start["diamond"][1], start["diamond"][0], "D", ha="center", va="center", fontsize=16, color="blue")
        ys, xs = [c // 5 for c in cells], [c % 5 for c in cells]
        ax.plot(xs, ys, "-o", color="green", ms=4)
        ax.text(start["agent"][1], start["agent"][0], "A", ha="center", va="center", fontsize=14,
                bbox=dict(fc="white", ec="green"))
        ax.set_title(f"{name}: {outcome}", fontsize=9)
    fig.suptitle(f"One greedy episode per policy ({title}); ghost closer, unobserved", fontsize=9)
    savefig(fig, path)


RERUN = {"0.05": 0.49, "0.1": 0.54, "0.3": 0.60}   # third-party re-run of the original code, per step


def report(out: Path) -> dict:
    """This experiment's section of ``gradroute reproduce``'s report (claim, table, verdict)."""
    m = read_json(Path(out) / "metrics.json")
    summary, claims = m["summary"], m["claims"]
    metric = m.get("headline_metric", HEADLINE)
    ps = sorted({p for d in summary.values() for p in d}, key=float)

    def cell(c):
        return "" if c is None else (f"{c['mean']:.3f} ± {c['hi'] - c['mean']:.3f}" if c["n"] > 1 else c["mean"])

    rows = [[meth, min(c["n"] for c in summary[meth].values()), *[cell(summary[meth].get(p)) for p in ps]]
            for meth in METHODS if meth in summary]
    if metric == "stepwise_return":      # the re-run reports the same per-step metric: like with like
        rows.append(["third-party re-run of the original (routing)", "", *[RERUN.get(p, "") for p in ps]])
    verdict, checks = claim_summary(claims, "holds_on_means", "claim checks hold on means")
    sep = [k for k, c in claims.items() if c.get("intervals_separate")]
    if claims and not [k for k in claims if not k.startswith("steered")]:
        # only the steering check applies (no level <= 0.1 was run): the headline comparison
        # is untested, so at most part of the claim can be reproduced
        verdict = "partly" if all(c["holds_on_means"] for c in claims.values()) else "not"
        checks += "; routing vs the baselines is checked at p <= 0.1 only, which this run does not include"
    cfg = m["config"]
    steps = cfg["updates"] * cfg["num_envs"] * cfg["num_steps"]
    return {
        "title": "Scalable oversight in a gridworld (arXiv 2410.04332, sec. 4.3)",
        "claim": "The routed MoE policy steered to the diamond expert beats naive training and data "
                 "filtering at low oversight, and at 5% matches the baselines at ~30%.",
        "paper": "Routing clearly nontrivial at 1% oversight; at 5% it matches baselines given 6x more "
                 "oversight; a third-party re-run measured ~0.49 / 0.54 / 0.60 (per step) at 5 / 10 / 30%.",
        "verdict": verdict,
        "detail": (f"{checks}; 95% intervals separate for {len(sep)} of {len(claims)} ({', '.join(sep) or 'none'}). "
                   f"Profile `{m.get('profile', '?')}`: {steps:,} env steps per run ({cfg['updates']} updates x "
                   f"{cfg['num_envs']} envs, lr {cfg.get('lr', '?')}), against the paper's {20000 * 512 * 32:,}. "
                   f"Table: {METRIC_NAMES.get(metric, metric)}; mean ± 95% t-interval half-width over n seeds. "
                   "Per-episode returns are in summary.md."),
        "table": {"header": ["method", "n seeds", *[f"p={p}" for p in ps]], "rows": rows},
        "figures": [f for f in ["return_vs_oversight.png", *[f"learning_curves_p{p}.png" for p in ps], "episodes.png"]
                    if (Path(out) / f).exists()],
    }
