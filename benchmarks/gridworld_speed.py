"""Speed of the vectorized gridworld and of training, against the loop before the speed work.

    PYTHONPATH=src python benchmarks/gridworld_speed.py [--threads 1] [--envs 256 512] [--updates 6]
    PYTHONPATH=src python benchmarks/gridworld_speed.py --breakdown   # ms per update by phase

Training throughput is env steps per second *including* rollout, forward, backward and the
optimizer step (no evaluation), for routing at p = 0.1, measured side by side in this process:

- ``old``: ``benchmarks/gridworld_reference_loop.py``, today's loop before this work (fp32, two
  separate expert MLPs, no-grad rollout then a second forward over the kept steps, MLP critic),
  stepping the env as it was then (``benchmarks/gridworld_reference_env.py``);
- ``new_fp32`` / ``new_bf16``: ``gradroute.experiments.gridworld`` (stacked experts as one
  batched matmul, the rollout's forward reused for the update, linear critic and gate as the
  original: 1x1 conv + MLP 100-256-256-1), with the expert and gate matmuls in fp32 or bfloat16
  (``new_bf16`` is the quick and cpu profiles' setting);
- ``new_bf16_mlp64``: the same with the smaller gate (100-64-1) that the old loop also has, so
  the loops compare like with like;
- ``autograd_bf16``: the experiment's plain training step, the one ``gridworld.py`` shows: a
  rollout without stored activations, then the policy again over all steps with autograd,
  ``gradroute.route`` in the mix and bf16 autocast (``--backward autograd``). The ``new_*`` loops
  are the trainer's default fast path (``gridworld_fast.py``: the rollout keeps its activations and
  the backward is written by hand); ``hand_over_autograd_*`` is ``new_bf16`` over ``autograd_bf16``
  in the same run, the ratio that justifies keeping the hand-written backward (>= 1.3x).

Each loop's speed is its best round of ``--updates`` updates (4), every round starting the loop
afresh (policy, optimizer, env, buffers); rounds interleave the loops. One-off costs therefore
weigh in once per 4 updates, more for the old loop (~50 ms per round at 256 envs, ~100 at 512)
than for the new one (a few ms). The
``steady_*`` keys (``--steady 1``, the default) leave them out, as a run of thousands of updates
does: see :func:`steady`. Besides wall-clock env steps/s,
the JSON has the same ratios from the thread's CPU time (``cpu_time_speedup_*``), which other
processes on a shared machine disturb less (they still share caches and memory bandwidth).

The FLOP reference is a plain fp32 and bf16 matmul (16384 x 256 @ 256 x 256) at the same thread
count. The last line is one JSON object; ``train_speedup_512`` / ``train_speedup_256`` are new
(the cpu profile's setting) over old env steps/s at 512 / 256 envs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gridworld_reference_loop  # noqa: E402
from gridworld_reference_env import GridworldVecEnv as ReferenceGridworldVecEnv  # noqa: E402
from gridworld_reference_loop import reference_train  # noqa: E402

from gradroute.envs.gridworld import GridworldVecEnv  # noqa: E402
from gradroute.experiments import gridworld as gw  # noqa: E402
from gradroute.experiments import gridworld_fast as fast  # noqa: E402
from gradroute.utils import cpu_model  # noqa: E402

HIDDEN, OBS = 256, 100
# the old loop steps the old env (every env draws a fresh episode on every step), so the speedup
# counts the env-step work too
gridworld_reference_loop.GridworldVecEnv = ReferenceGridworldVecEnv


def env_steps_per_s(num_envs: int, steps: int, env_cls=GridworldVecEnv) -> float:
    env = env_cls(num_envs, 0.1, return_final_obs=False)
    env.reset(seed=0)
    acts = torch.randint(4, (steps, num_envs), generator=torch.Generator().manual_seed(0))
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        for a in acts:
            env.step(a)
        best = max(best, num_envs * steps / (time.perf_counter() - t))
    return best


def matmul_gflops(dtype, m=16384, k=256, n=256, reps=10) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t) / 1e9)
    return best


def cpu_bf16_flags() -> list[str]:
    """The CPU's bf16 instruction-set flags (avx512_bf16, amx_bf16, ...): bf16 matmul speed depends on them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(f for f in line.split(":", 1)[1].split() if "bf16" in f)
    except OSError:
        pass
    return []


def autograd_train(num_envs: int, updates: int, precision: str = "bf16") -> None:
    cfg = dict(gw.PROFILES["cpu"], num_envs=num_envs, precision=precision)
    gen = torch.Generator().manual_seed(0)
    env = GridworldVecEnv(num_envs, 0.1, return_final_obs=False)
    policy = gw.make_policy("routing", cfg)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg["lr"])
    obs, _ = env.reset(seed=0)
    for _ in range(updates):
        opt.zero_grad(set_to_none=True)
        obs, batch = gw.rollout(policy, env, obs, 32, gen)
        gw.update(policy, batch, "routing", cfg)
        opt.step()


def new_train(num_envs: int, updates: int, precision: str, gate: str = "original") -> None:
    cfg = dict(gw.PROFILES["cpu"], num_envs=num_envs, precision=precision, gate=gate)
    gen = torch.Generator().manual_seed(0)
    env = GridworldVecEnv(num_envs, 0.1, return_final_obs=False)
    policy = gw.make_policy("routing", cfg)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg["lr"])
    obs, _ = env.reset(seed=0)
    buffers: dict = {}                       # as gw.train: rollout and backward buffers reused across updates
    for _ in range(updates):
        opt.zero_grad(set_to_none=True)
        obs, batch = fast.rollout(policy, env, obs, 32, gen, buffers)
        gw.update(policy, batch, "routing", cfg, buffers=buffers)
        opt.step()


def breakdown(num_envs: int, rounds: int = 7) -> dict:
    """Milliseconds per update of the default loop by phase (best of ``rounds`` updates): the
    rollout split into the policy's forward (everything but the env) and the env's steps; the
    update split into the hand backward (``_expert_backward``) and the rest (losses, critic,
    advantage scan); Adam."""
    cfg = dict(gw.PROFILES["cpu"], num_envs=num_envs)
    gen = torch.Generator().manual_seed(0)
    env = GridworldVecEnv(num_envs, 0.1, return_final_obs=False)
    policy = gw.make_policy("routing", cfg)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg["lr"])
    obs, _ = env.reset(seed=0)
    buffers: dict = {}
    acc = {"env_steps": 0.0, "expert_backward": 0.0}
    env_step, expert_backward = env.step, fast._expert_backward

    def timed_env(a):
        t = time.perf_counter()
        out = env_step(a)
        acc["env_steps"] += time.perf_counter() - t
        return out

    def timed_backward(*a, **k):
        t = time.perf_counter()
        expert_backward(*a, **k)
        acc["expert_backward"] += time.perf_counter() - t

    env.step, fast._expert_backward = timed_env, timed_backward
    best = None
    try:
        for r in range(rounds + 2):                     # two warm-up updates
            acc.update(env_steps=0.0, expert_backward=0.0)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            obs, batch = fast.rollout(policy, env, obs, 32, gen, buffers)
            t1 = time.perf_counter()
            gw.update(policy, batch, "routing", cfg, buffers=buffers)
            t2 = time.perf_counter()
            opt.step()
            t3 = time.perf_counter()
            ms = {"total": t3 - t0, "rollout": t1 - t0, "rollout_env_steps": acc["env_steps"],
                  "rollout_policy_and_rest": t1 - t0 - acc["env_steps"], "update": t2 - t1,
                  "update_expert_backward": acc["expert_backward"],
                  "update_losses_critic_scan": t2 - t1 - acc["expert_backward"], "adam": t3 - t2}
            if r >= 2 and (best is None or ms["total"] < best["total"]):
                best = ms
    finally:
        fast._expert_backward = expert_backward
    return {k: round(v * 1e3, 2) for k, v in best.items()}


def timed(fns: dict, num_envs: int, updates: int, repeats: int):
    """Best env steps/s of each loop over ``repeats`` rounds, by wall clock and by the thread's
    CPU time, and each loop's warm-up time (one update);
    the loops take turns within a round, so load from other processes hits them alike."""
    warm = {}
    for name, fn in fns.items():
        t = time.perf_counter()
        fn(num_envs, 1)                               # warm-up
        warm[name] = time.perf_counter() - t
    best = {k: 0.0 for k in fns}
    best_cpu = {k: 0.0 for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t, c = time.perf_counter(), time.thread_time()
            fn(num_envs, updates)
            steps = num_envs * 32 * updates
            best[name] = max(best[name], steps / (time.perf_counter() - t))
            best_cpu[name] = max(best_cpu[name], steps / (time.thread_time() - c))
    return best, best_cpu, warm


def steady(fns: dict, num_envs: int, updates: int, repeats: int):
    """Env steps/s of each loop once its one-off costs are paid, as a long run sees it: every
    loop starts afresh in each round (building its policy, optimizer, env and buffers, touching
    fresh memory; the old loop's first update also keeps more steps, as the first episodes all
    start with the rollout: ~70% of them vs ~61% later with random actions), so the time of a round of ``3 *
    updates`` minus that of a round of ``updates`` (best of ``repeats`` each, by wall clock and
    by thread CPU time, loops and lengths taking turns) is ``2 * updates`` updates without
    those costs."""
    best = {(k, u): [math.inf, math.inf] for k in fns for u in (updates, 3 * updates)}
    for r in range(repeats):
        for u in (updates, 3 * updates):
            for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                t, c = time.perf_counter(), time.thread_time()
                fns[name](num_envs, u)
                b = best[(name, u)]
                b[0], b[1] = min(b[0], time.perf_counter() - t), min(b[1], time.thread_time() - c)
    steps = num_envs * 32 * 2 * updates
    return ({k: steps / (best[(k, 3 * updates)][0] - best[(k, updates)][0]) for k in fns},
            {k: steps / (best[(k, 3 * updates)][1] - best[(k, updates)][1]) for k in fns})


def flops_per_env_step(kind: str, gate_kind: str = "mlp64") -> float:
    """Matmul FLOPs per env step of one routing update (both experts, gate, head, critic)."""
    expert = 2 * (OBS * HIDDEN + HIDDEN * HIDDEN)            # one expert, one row, forward
    head = 2 * HIDDEN * 4
    if gate_kind == "mlp64":                                 # 100-64-1
        gate, gate_in = 2 * (OBS * 64 + 64), 0
    else:                                                    # original: (conv folded) 100-256-256-1
        gate, gate_in = 2 * (OBS * 256 + 256 * 256 + 256), 2 * 256 * 256   # + input grad past its layer 1
    l2 = 2 * HIDDEN * HIDDEN
    if kind == "old":   # no-grad rollout + forward again + backward (MLP critic); upper bound: all steps kept
        critic = 2 * (OBS * HIDDEN + HIDDEN * HIDDEN + HIDDEN)
        fwd = 2 * expert + gate + head
        return fwd + (fwd + critic) + (fwd + critic) + 2 * l2 + l2 + head   # + input grads past layer 1
    fwd = 2 * expert + gate + 2 * head                       # head runs twice (rollout and loss)
    return fwd + fwd + 2 * l2 + gate_in + head + 3 * 2 * OBS  # weight grads + input grads past layer 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--envs", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--updates", type=int, default=4, help="updates per timing")
    ap.add_argument("--repeats", type=int, default=5, help="timing rounds (best is kept)")
    ap.add_argument("--steady", type=int, choices=[0, 1], default=1,
                    help="1 (default): also measure old and new_bf16 without their one-off costs (steady_* keys)")
    ap.add_argument("--breakdown", action="store_true",
                    help="only print ms per update of the default loop by phase")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["GRADROUTE_QUIET"] = "1"
    if args.breakdown:
        res = {str(n): breakdown(n) for n in args.envs}
        for k, v in res.items():
            print(k, v, flush=True)
        print(json.dumps({"breakdown_ms_per_update": res, "load_avg_1m": os.getloadavg()[0]}))
        return
    t_start, cpu_start = time.time(), time.process_time()
    res = {"threads": args.threads, "cpu_count": os.cpu_count(), "torch": torch.__version__,
           "machine": platform.machine(), "cpu_model": cpu_model(), "cpu_flags_bf16": cpu_bf16_flags(),
           "load_avg_1m_at_start": os.getloadavg()[0]}
    res["matmul_gflops_fp32"] = round(matmul_gflops(torch.float32), 1)
    res["matmul_gflops_bf16"] = round(matmul_gflops(torch.bfloat16), 1)
    print(f"plain matmul 16384x256 @ 256x256: fp32 {res['matmul_gflops_fp32']} GFLOP/s, "
          f"bf16 {res['matmul_gflops_bf16']} GFLOP/s", flush=True)
    res["env_steps_per_s_random_policy"] = {str(n): round(env_steps_per_s(n, 200)) for n in (512, 4096)}
    res["old_env_steps_per_s_random_policy"] = {
        str(n): round(env_steps_per_s(n, 200, ReferenceGridworldVecEnv)) for n in (512, 4096)}
    print(f"env only (random actions): {res['env_steps_per_s_random_policy']}, "
          f"old env {res['old_env_steps_per_s_random_policy']}", flush=True)
    runs = {"old": reference_train,
            "new_fp32": lambda n, u: new_train(n, u, "fp32"),
            "new_bf16": lambda n, u: new_train(n, u, "bf16"),
            "new_bf16_mlp64": lambda n, u: new_train(n, u, "bf16", "mlp64"),
            "autograd_bf16": autograd_train}
    flops = {"old": flops_per_env_step("old"), "new_fp32": flops_per_env_step("new", "original"),
             "new_bf16": flops_per_env_step("new", "original"),
             "new_bf16_mlp64": flops_per_env_step("new", "mlp64"),
             "autograd_bf16": flops_per_env_step("new", "original")}
    res["train_env_steps_per_s"] = {k: {} for k in runs}
    res["flops_per_env_step"] = {k: round(v) for k, v in flops.items()}
    res["achieved_gflops"] = {k: {} for k in runs}
    res["train_env_steps_per_cpu_s"] = {k: {} for k in runs}
    for n in args.envs:
        best, best_cpu, _ = timed(runs, n, args.updates, args.repeats)
        for name, sps in best.items():
            res["train_env_steps_per_s"][name][str(n)] = round(sps)
            res["train_env_steps_per_cpu_s"][name][str(n)] = round(best_cpu[name])
            res["achieved_gflops"][name][str(n)] = round(sps * flops[name] / 1e9, 1)
            print(f"train {name:9s} {n:4d} envs: {sps / 1e3:7.1f} k env steps/s "
                  f"(~{sps * flops[name] / 1e9:5.1f} GFLOP/s of matmul)", flush=True)
        for name in ("new_fp32", "new_bf16", "new_bf16_mlp64", "autograd_bf16"):
            s = res["train_env_steps_per_s"][name][str(n)] / res["train_env_steps_per_s"]["old"][str(n)]
            sc = res["train_env_steps_per_cpu_s"][name][str(n)] / res["train_env_steps_per_cpu_s"]["old"][str(n)]
            res[f"speedup_{name}_{n}"] = round(s, 2)
            res[f"cpu_time_speedup_{name}_{n}"] = round(sc, 2)
            print(f"speedup {name} / old at {n} envs: {s:.2f}x (by CPU time {sc:.2f}x)", flush=True)
        res[f"hand_over_autograd_{n}"] = round(res["train_env_steps_per_s"]["new_bf16"][str(n)]
                                               / res["train_env_steps_per_s"]["autograd_bf16"][str(n)], 2)
        res[f"cpu_time_hand_over_autograd_{n}"] = round(res["train_env_steps_per_cpu_s"]["new_bf16"][str(n)]
                                                        / res["train_env_steps_per_cpu_s"]["autograd_bf16"][str(n)], 2)
        print(f"hand backward / autograd + route + bf16 autocast at {n} envs: {res[f'hand_over_autograd_{n}']:.2f}x "
              f"(by CPU time {res[f'cpu_time_hand_over_autograd_{n}']:.2f}x)", flush=True)
        if args.steady:
            sw, sc = steady({k: runs[k] for k in ("old", "new_bf16")}, n, args.updates, args.repeats)
            for name in sw:
                res.setdefault("steady_env_steps_per_s", {}).setdefault(name, {})[str(n)] = round(sw[name])
                res.setdefault("steady_env_steps_per_cpu_s", {}).setdefault(name, {})[str(n)] = round(sc[name])
            res[f"steady_speedup_{n}"] = round(sw["new_bf16"] / sw["old"], 2)
            res[f"steady_cpu_time_speedup_{n}"] = round(sc["new_bf16"] / sc["old"], 2)
            print(f"steady state (one-off costs left out) at {n} envs: old {sw['old'] / 1e3:.1f}, new_bf16 "
                  f"{sw['new_bf16'] / 1e3:.1f} k env steps/s: {res[f'steady_speedup_{n}']:.2f}x "
                  f"(by CPU time {res[f'steady_cpu_time_speedup_{n}']:.2f}x)", flush=True)
    res["load_avg_1m_at_end"] = os.getloadavg()[0]
    res["wall_s"], res["cpu_s"] = round(time.time() - t_start, 1), round(time.process_time() - cpu_start, 1)
    for n in map(str, args.envs):
        res[f"train_speedup_{n}"] = res[f"speedup_new_bf16_{n}"]
        res[f"train_env_steps_per_s_{n}"] = res["train_env_steps_per_s"]["new_bf16"][n]
    print(json.dumps(res))


if __name__ == "__main__":
    main()
