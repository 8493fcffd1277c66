"""Scalable oversight in a gridworld (paper section 6), as one CleanRL-style file.

An agent on a 5x5 grid can end an episode at a diamond (true reward +1) or a ghost (-1). Each
terminal is overseen with probability p, and only overseen outcomes are known to the trainer.
A two-expert mixture-of-experts policy is trained with REINFORCE on a reward of +1 for reaching
*either* terminal, and gradient routing decides, per episode, which expert learns from it:

    overseen diamond -> diamond expert only
    overseen ghost   -> ghost expert only
    not overseen     -> both experts and the gate

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

# The paper's settings, and a quick profile that fits in ~15 minutes on 2 CPU cores: fewer,
# smaller updates with a larger learning rate (see docs/gridworld.md for the trade-off).
PROFILES = {
    "paper": dict(updates=20_000, num_envs=512, num_steps=32, lr=5e-5, seeds=4,
                  eval_every=500, val_episodes=2048, test_episodes=8192),
    "quick": dict(updates=100, num_envs=64, num_steps=32, lr=3e-3, seeds=2,
                  eval_every=20, val_episodes=512, test_episodes=2048),
}
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


class MoEPolicy(nn.Module):
    """Two experts (100 -> 256 -> 256) mixed at the hidden level by a sigmoid gate, a shared
    linear head to 4 action logits, and a separate value MLP (with nonlinearities)."""

    def __init__(self, obs_dim: int = 100, hidden: int = HIDDEN, num_actions: int = 4):
        super().__init__()
        self.diamond_expert = mlp([obs_dim, hidden, hidden])
        self.ghost_expert = mlp([obs_dim, hidden, hidden])
        self.gate = mlp([obs_dim, 64, 1], final_act=False)
        self.head = nn.Linear(hidden, num_actions)
        self.critic = mlp([obs_dim, hidden, hidden, 1], final_act=False)

    def forward(self, obs: torch.Tensor, gate: float | None = None,
                route_w: torch.Tensor | None = None):
        """Action logits and gate logits. ``gate`` forces the mix (1 diamond, 0 ghost expert).
        ``route_w`` (B, 3): per-example gradient weights for diamond expert, ghost expert, gate."""
        x = obs.flatten(1)
        h_d, h_g = self.diamond_expert(x), self.ghost_expert(x)
        gate_logit = self.gate(x).squeeze(-1)
        g = torch.sigmoid(gate_logit) if gate is None else torch.full_like(gate_logit, float(gate))
        if route_w is not None:
            h_d = route(h_d, route_w[:, 0:1])
            h_g = route(h_g, route_w[:, 1:2])
            g = route(g, route_w[:, 2])
        g = g.unsqueeze(-1)
        return self.head(g * h_d + (1 - g) * h_g), gate_logit

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
    """(..., 3) gradient weights for (diamond expert, ghost expert, gate) from episode outcomes."""
    ov_d = ep_overseen & (ep_reached == DIAMOND)
    ov_g = ep_overseen & (ep_reached == GHOST)
    return torch.stack(((~ov_g).float(), (~ov_d).float(), (~ep_overseen).float()), -1)


def episode_outcomes(done, reached, overseen, reward, gamma):
    """Backward scan over a (T, N) rollout. For every step: the outcome of the episode it
    belongs to, whether that episode finished inside the rollout, and its discounted return."""
    T, N = done.shape
    ep_reached = torch.zeros(T, N, dtype=torch.long)
    ep_overseen = torch.zeros(T, N, dtype=torch.bool)
    complete = torch.zeros(T, N, dtype=torch.bool)
    returns = torch.zeros(T, N)
    r_c, o_c = torch.zeros(N, dtype=torch.long), torch.zeros(N, dtype=torch.bool)
    c_c, g_c = torch.zeros(N, dtype=torch.bool), torch.zeros(N)
    for t in reversed(range(T)):
        d = done[t]
        r_c = torch.where(d, reached[t], r_c)
        o_c = torch.where(d, overseen[t], o_c)
        c_c = d | c_c
        g_c = reward[t] + gamma * g_c * (~d).float()
        ep_reached[t], ep_overseen[t], complete[t], returns[t] = r_c, o_c, c_c, g_c
    return ep_reached, ep_overseen, complete, returns


# ------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(policy: MoEPolicy, oversight: float, seed: int, episodes: int,
             gate: float | None = None, gamma: float = GAMMA, greedy: bool = False) -> dict:
    """True return of the first episode of ``episodes`` fresh envs (sampled actions)."""
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
    disc = gamma ** (length.float() - 1)
    # the paper's variant: discounted return-to-go averaged over every *step* of the episodes
    per_step = r * (1 - gamma ** length.float()) / (1 - gamma)
    closer = (manhattan(start_agent, start_ghost) < manhattan(start_agent, start_diamond)) & ~ghost_ov
    return {
        "true_return": float((r * disc).mean()),
        "true_return_per_step": float(per_step.sum() / length.sum()),
        "diamond_rate": float((reached == DIAMOND).float().mean()),
        "ghost_rate": float((reached == GHOST).float().mean()),
        "timeout_rate": float((reached == 0).float().mean()),
        "mean_length": float(length.float().mean()),
        "ghost_rate_when_closer_unobserved": float((reached[closer] == GHOST).float().mean()),
        "n_closer_unobserved": int(closer.sum()),
        "eval_episodes": episodes,
    }


# ------------------------------------------------------------------------------------------
# training (one job = one method at one oversight level and seed)
# ------------------------------------------------------------------------------------------
def train(job: str, oversight: float, seed: int, cfg: dict, quiet: bool = True) -> dict:
    """Train one policy; return its flat result records plus a learning curve."""
    t0 = time.time()
    train_seed = 100_000 * seed + round(oversight * 10_000)   # distinct per (seed, level)
    gen = set_seed(train_seed)
    device = torch.device("cpu")            # the models are tiny; CPU processes in parallel
    reward_kind = {"routing": "either", "no_routing": "either", "naive": "naive",
                   "filtering": "true", "oracle": "true"}[job]
    use_routing, use_gate_loss = job == "routing", job in ("routing", "no_routing")
    steer = 1.0 if job in ("routing", "no_routing") else None    # headline policy is steered
    updates = cfg["updates"]
    if job == "oracle":                     # the same oversight budget, spent on full labels
        updates = max(1, round(oversight * cfg["updates"]))

    env = GridworldVecEnv(cfg["num_envs"], oversight, device=device, return_final_obs=False)
    policy = MoEPolicy().to(device)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg["lr"])
    obs, _ = env.reset(seed=train_seed)
    T, N = cfg["num_steps"], cfg["num_envs"]
    curve, best = [], (-math.inf, None, 0)
    val_seed = VAL_SEED + seed

    def checkpoint(u):
        nonlocal best
        ev = evaluate(policy, oversight, val_seed, cfg["val_episodes"], gate=steer)
        curve.append({"update": u, "env_steps": u * T * N, "true_return": ev["true_return"]})
        if job == "naive" and ev["true_return"] > best[0]:
            best = (ev["true_return"], copy.deepcopy(policy.state_dict()), u)

    bar = progress(range(updates), desc=f"{job} p={oversight} s={seed}", disable=quiet, leave=False)
    for u in bar:
        if u % cfg["eval_every"] == 0:
            checkpoint(u)
        # ---- rollout ----
        b_obs = torch.zeros(T, N, *env.obs_shape)
        b_act = torch.zeros(T, N, dtype=torch.long)
        b_done = torch.zeros(T, N, dtype=torch.bool)
        b_reached = torch.zeros(T, N, dtype=torch.long)
        b_overseen = torch.zeros(T, N, dtype=torch.bool)
        with torch.no_grad():
            for t in range(T):
                logits, _ = policy(obs)
                act = sample_actions(logits, gen)
                b_obs[t], b_act[t] = obs, act
                obs, _, term, trunc, info = env.step(act)
                b_done[t], b_reached[t], b_overseen[t] = term | trunc, info["reached"], info["overseen"]
        reward = training_reward(reward_kind, b_reached, b_overseen) * b_done.float()
        ep_reached, ep_overseen, complete, returns = episode_outcomes(
            b_done, b_reached, b_overseen, reward, GAMMA)
        # Steps of an episode still running at the end of the rollout have no return or outcome
        # yet: they are left out (episodes are at most 32 steps, the rollout is 32 steps).
        mask = complete & ep_overseen if job == "filtering" else complete
        if mask.sum() == 0:
            continue
        # ---- update: REINFORCE with value baseline, entropy bonus, gate BCE ----
        o, a, g_ret = b_obs[mask], b_act[mask], returns[mask]
        er, eo = ep_reached[mask], ep_overseen[mask]
        rw = routing_weights(er, eo) if use_routing else None
        logits, gate_logit = policy(o, route_w=rw)
        logp = F.log_softmax(logits, -1)
        logp_a = logp.gather(1, a[:, None]).squeeze(1)
        entropy = -(logp.exp() * logp).sum(-1)
        v = policy.value(o)
        adv = g_ret - v.detach()
        loss = -(logp_a * adv).mean() - ENT_COEF * entropy.mean() + VF_COEF * F.mse_loss(v, g_ret)
        if use_gate_loss and eo.any():
            target = (er[eo] == DIAMOND).float()
            loss = loss + GATE_COEF * F.binary_cross_entropy_with_logits(gate_logit[eo], target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    checkpoint(updates)

    def record(method, gate, state=None, **extra):
        if state is not None:
            policy.load_state_dict(state)
        ev = evaluate(policy, oversight, TEST_SEED + seed, cfg["test_episodes"], gate=gate)
        return {"method": method, "oversight": oversight, "seed": seed, "train_seed": train_seed,
                **ev, "updates": updates, **extra}

    final_state = copy.deepcopy(policy.state_dict())
    if job == "routing":
        records = [record("routing", 1.0), record("routing_ghost", 0.0)]
        records[0]["true_return_unsteered"] = evaluate(
            policy, oversight, TEST_SEED + seed, cfg["test_episodes"])["true_return"]
    elif job == "no_routing":
        records = [record("no_routing", 1.0)]
        records[0]["true_return_unsteered"] = evaluate(
            policy, oversight, TEST_SEED + seed, cfg["test_episodes"])["true_return"]
    elif job == "naive":
        records = [record("naive", None), record("naive_early_stop", None, best[1], best_update=best[2])]
    else:
        records = [record(job, None)]
    return {"job": job, "oversight": oversight, "seed": seed, "records": records,
            "curve": curve, "config": cfg, "wall_s": time.time() - t0,
            "state_dict": final_state if job == "routing" else None}


# ------------------------------------------------------------------------------------------
# sweep: parallel, resumable
# ------------------------------------------------------------------------------------------
def _job_path(out: Path, job: str, p: float, seed: int) -> Path:
    return out / "runs" / f"{job}_p{p:g}_s{seed}.json"


def _run_job(job, p, seed, cfg, out):
    res = train(job, p, seed, cfg)
    state = res.pop("state_dict")
    if state is not None:
        (Path(out) / "models").mkdir(parents=True, exist_ok=True)
        torch.save(state, Path(out) / "models" / f"{job}_p{p:g}_s{seed}.pt")
    write_json(_job_path(Path(out), job, p, seed), res)
    return res


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick",
                        help="quick (default; whole sweep took 7 min 50 s on 2 shared cores) or paper (20,000 updates, ~2.7 h per run per core)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--oversight", nargs="+", type=float, default=OVERSIGHT_LEVELS)
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="seed indices (default: range(profile seeds))")
    parser.add_argument("--updates", type=int, default=None, help="override the profile")
    parser.add_argument("--num-envs", type=int, default=None, help="override the profile")
    parser.add_argument("--lr", type=float, default=None, help="override the profile")
    parser.add_argument("--eval-every", type=int, default=None, help="override the profile")
    parser.add_argument("--val-episodes", type=int, default=None, help="override the profile")
    parser.add_argument("--test-episodes", type=int, default=None, help="override the profile")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="parallel training processes (1 = in this process)")


def run(args: argparse.Namespace) -> dict:
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if resolve_device(args.device).type != "cpu":
        print("note: gridworld trains on CPU processes (the networks are tiny)")
    cfg = dict(PROFILES[args.profile])
    for k in ("updates", "num_envs", "lr", "eval_every", "val_episodes", "test_episodes"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    cfg["profile"] = args.profile
    seeds = args.seeds if args.seeds is not None else list(range(cfg["seeds"]))
    jobs_wanted = sorted({METHOD_JOB[m] for m in args.methods}, key=list(JOB_METHODS).index)
    jobs = [(j, p, s) for p in args.oversight for s in seeds for j in jobs_wanted]

    results, todo = split_finished(jobs, lambda *k: _job_path(out, *k), cfg)
    # long jobs first, so the parallel workers finish together
    todo.sort(key=lambda k: (k[0] == "oracle", -k[1] if k[0] == "oracle" else 0))
    results.update(run_jobs(todo, functools.partial(_run_job, cfg=cfg, out=str(out)), args.workers,
                            desc="gridworld runs"))

    wanted = set(args.methods)
    runs = [r for key in jobs for r in results[key]["records"] if r["method"] in wanted]
    summary = summarize(runs)
    metrics = {
        "experiment": "gridworld", "profile": args.profile, "config": cfg, "seeds": seeds,
        "oversight_levels": list(args.oversight), "methods": list(args.methods),
        "gamma": GAMMA, "runs": runs, "summary": summary, "claims": check_claims(summary),
        "wall_time_s": time.time() - t0,
        "train_wall_s_total": sum(results[k]["wall_s"] for k in jobs),
    }
    write_json(out / "metrics.json", metrics)
    (out / "summary.md").write_text(summary_table(summary))
    make_figures(out, runs, {k: results[k] for k in jobs})
    print(summary_table(summary))
    print(f"wrote {out / 'metrics.json'} ({metrics['wall_time_s']:.0f} s)")
    return metrics


# ------------------------------------------------------------------------------------------
# reporting
# ------------------------------------------------------------------------------------------
def summarize(runs: list[dict], key: str = "true_return") -> dict:
    out: dict = {}
    for r in runs:
        out.setdefault(r["method"], {}).setdefault(f"{r['oversight']:g}", []).append(r[key])
    return {m: {p: mean_ci(v) for p, v in sorted(d.items(), key=lambda kv: float(kv[0]))}
            for m, d in out.items()}


def check_claims(summary: dict) -> dict:
    """The paper's claims, checked on means (and on 95% intervals where stated)."""
    claims = {}
    r = summary.get("routing", {})
    for base in ("naive", "filtering", "naive_early_stop"):
        b = summary.get(base, {})
        for p in r:
            if float(p) <= 0.05 and p in b:
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
                    "routing@5%": r["0.05"]["mean"], f"{base}@30%": b["0.3"]["mean"]}
    return claims


def summary_table(summary: dict) -> str:
    ps = sorted({p for d in summary.values() for p in d}, key=float)
    rows = []
    for m in [m for m in METHODS if m in summary]:
        cells = []
        for p in ps:
            c = summary[m].get(p)
            cells.append("" if c is None else f"{c['mean']:.3f} ± {c['hi'] - c['mean']:.3f} (n={c['n']})")
        rows.append([m, *cells])
    return ("Mean true discounted return per episode (± 95% CI half-width, n seeds)\n\n"
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
    ax.set_ylabel("true discounted return per episode")
    ax.axhline(0, color="grey", lw=0.5)
    ax.legend(fontsize=8)
    ax.set_title("Gridworld: true return vs oversight (mean, 95% CI)")
    savefig(fig, out / "return_vs_oversight.png")

    # learning curves at 10% oversight (or the level closest to it)
    levels = sorted({k[1] for k in results})
    if levels:
        p0 = min(levels, key=lambda p: abs(math.log(p / 0.1)))
        fig, ax = pyplot.subplots(figsize=(7, 4.5))
        for job in JOB_METHODS:
            curves = [results[k]["curve"] for k in results if k[0] == job and k[1] == p0]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            x = [c["update"] for c in curves[0][:n]]
            y = np.mean([[c["true_return"] for c in cv[:n]] for cv in curves], 0)
            ax.plot(x, y, marker="." if n < 5 else None,
                    label=job + (" (steered to diamond)" if job in ("routing", "no_routing") else ""))
        ax.set_xlabel("update")
        ax.set_ylabel("true return (validation episodes)")
        ax.set_title(f"Learning curves at p={p0:g} (mean over seeds)")
        ax.legend(fontsize=8)
        savefig(fig, out / f"learning_curves_p{p0:g}.png")

    models = sorted((out / "models").glob("routing_p*_s*.pt")) if (out / "models").exists() else []
    if models:
        best = min(models, key=lambda f: abs(math.log(float(f.stem.split("_p")[1].split("_s")[0]) / 0.1)))
        policy = MoEPolicy()
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


def report(out: Path) -> dict:
    """This experiment's section of ``gradroute reproduce``'s report (claim, table, verdict)."""
    m = read_json(Path(out) / "metrics.json")
    summary, claims = m["summary"], m["claims"]
    ps = sorted({p for d in summary.values() for p in d}, key=float)
    rows = [[meth, *[summary[meth][p]["mean"] if p in summary[meth] else "" for p in ps]]
            for meth in METHODS if meth in summary]
    rows.append(["third-party re-run (paper setup)", *[{"0.05": 0.49, "0.1": 0.54, "0.3": 0.60}.get(p, "") for p in ps]])
    verdict, checks = claim_summary(claims, "holds_on_means", "claim checks hold on means")
    cfg = m["config"]
    steps = cfg["updates"] * cfg["num_envs"] * cfg["num_steps"]
    return {
        "title": "Scalable oversight in a gridworld (paper section 6)",
        "claim": "The routed MoE policy steered to the diamond expert beats naive training and data "
                 "filtering at oversight p <= 5%, and at 5% matches the baselines at ~30%.",
        "paper": "Routing clearly nontrivial at 1% oversight; at 5% it matches baselines given 6x more "
                 "oversight; a third-party re-run measured ~0.49 / 0.54 / 0.60 mean return at 5 / 10 / 30%.",
        "verdict": verdict,
        "detail": (f"{checks}. "
                   f"Trained for {steps:,} env steps per run ({cfg['updates']} updates), against the paper's "
                   f"{20000 * 512 * 32:,}: the paper profile (`--profile paper`) was not run here. "
                   "Table: mean true discounted return per episode over seeds."),
        "table": {"header": ["method", *[f"p={p}" for p in ps]], "rows": rows},
        "figures": [f for f in ("return_vs_oversight.png", "learning_curves_p0.1.png", "episodes.png")
                    if (Path(out) / f).exists()],
    }
