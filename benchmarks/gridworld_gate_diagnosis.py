"""Why the routed policy collapsed at p = 0.3 with the small gate: one instrumented routing run.

    PYTHONPATH=src python benchmarks/gridworld_gate_diagnosis.py --oversight 0.3 --updates 600 --gate mlp64
    PYTHONPATH=src python benchmarks/gridworld_gate_diagnosis.py --oversight 0.3 --updates 600 --gate original

Trains routing with the `cpu` profile's settings (seed 0, the same train seed as the sweep) and
prints, every ``--every`` updates, statistics of the training rollout: the fraction of finished
episodes that reached a terminal, the mean gate on steps of overseen-diamond / overseen-ghost /
other episodes, the entropy of the mixed policy and of each expert alone (gate forced), and the
mean norm of each expert's hidden state. Every ``4 * every`` updates it scores the policy
steered to the diamond on the *validation* envs (stepwise return, timeout rate). One JSON line
per report; the last line is a JSON summary.

The mechanism it shows (docs/notes/2026-12-06-gridworld-faithfulness-and-gate.md): with the gate at ~0.5 everywhere, the mixed policy
only sees the sum of the experts' logits, while routed (overseen) episodes move one expert
alone, i.e. their difference; nothing then bounds that difference, the experts' hidden states
grow, and the policy steered to one expert drifts away from the mixed policy that is trained.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from gradroute.envs.gridworld import DIAMOND, GHOST, GridworldVecEnv
from gradroute.experiments import gridworld as gw
from gradroute.experiments import gridworld_fast
from gradroute.utils import set_seed


def entropy(logits: torch.Tensor) -> float:
    lp = F.log_softmax(logits, -1)
    return float(-(lp.exp() * lp).sum(-1).mean())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--oversight", type=float, default=0.3)
    ap.add_argument("--updates", type=int, default=600)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gate", choices=list(gw.GATES), default="original")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    cfg = dict(gw.PROFILES["cpu"], gate=args.gate)
    p, T, N = args.oversight, cfg["num_steps"], cfg["num_envs"]
    train_seed = 100_000 * args.seed + round(p * 10_000)        # as gridworld.train
    gen = set_seed(train_seed)
    env = GridworldVecEnv(N, p, return_final_obs=False)
    policy = gw.make_policy("routing", cfg)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg["lr"])
    obs, _ = env.reset(seed=train_seed)
    t0, c0 = time.time(), time.process_time()
    last = {}
    for u in range(args.updates + 1):
        opt.zero_grad(set_to_none=True)
        obs, batch = gridworld_fast.rollout(policy, env, obs, T, gen)   # keeps h, gl, logits
        if u % args.every == 0:
            with torch.no_grad():
                done, reached = batch["done"], batch["reached"]
                er, eo, _, _ = gw.episode_outcomes(done, reached, batch["overseen"], (reached > 0).float(), gw.GAMMA)
                h = batch["h"].float()                                               # (2, T*N, hidden)
                g = torch.sigmoid(batch["gl"].float())
                ov_d, ov_g = (eo & (er == DIAMOND)).flatten(), (eo & (er == GHOST)).flatten()
                row = {"update": u,
                       "reached_terminal": float(((reached > 0) & done).sum() / done.sum().clamp_min(1)),
                       "gate_overseen_diamond": float(g[ov_d].mean()), "gate_overseen_ghost": float(g[ov_g].mean()),
                       "gate_other": float(g[~(ov_d | ov_g)].mean()),
                       "entropy_mixed": entropy(batch["logits"]), "entropy_diamond_expert": entropy(policy.head(h[0])),
                       "entropy_ghost_expert": entropy(policy.head(h[1])),
                       "hidden_norm_diamond": float(h[0].norm(dim=-1).mean()),
                       "hidden_norm_ghost": float(h[1].norm(dim=-1).mean())}
            if u % (4 * args.every) == 0 and u:
                ev = gw.evaluate(policy, p, gw.VAL_SEED + args.seed, 256, gate=1.0)
                row.update(val_stepwise_steered=ev["stepwise_return"], val_timeout_steered=ev["timeout_rate"])
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
            last = row
        if u < args.updates:
            gw.update(policy, batch, "routing", cfg)
            opt.step()
    summary = {"gate": args.gate, "oversight": p, "seed": args.seed, "updates": args.updates, **last,
               "wall_s": round(time.time() - t0, 1), "cpu_s": round(time.process_time() - c0, 1)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
