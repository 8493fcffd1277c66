"""The gridworld env as it was before the env-step speed work (commit f594fc6), kept unchanged so
``benchmarks/gridworld_speed.py`` times the old loop with the old env. Not for training: use
``gradroute.envs.gridworld.GridworldVecEnv``.
"""
from __future__ import annotations

import torch

UP, RIGHT, DOWN, LEFT = 0, 1, 2, 3
NOTHING, DIAMOND, GHOST = 0, 1, 2


class GridworldVecEnv:
    """``num_envs`` independent gridworlds stepped together with tensor ops (no Python loop)."""

    num_actions = 4

    def __init__(self, num_envs: int, oversight: float = 0.1, size: int = 5, max_steps: int = 32,
                 device: str | torch.device = "cpu", return_final_obs: bool = True):
        if not 0.0 <= oversight <= 1.0:
            raise ValueError(f"oversight must be a probability, got {oversight}")
        if size < 2:
            raise ValueError("size must be at least 2 (three distinct cells are needed)")
        self.num_envs = int(num_envs)
        self.oversight = float(oversight)
        self.size = int(size)
        self.max_steps = int(max_steps)
        self.device = torch.device(device)
        self.return_final_obs = return_final_obs
        self.obs_shape = (4, self.size, self.size)
        self.generator = torch.Generator(device=self.device)
        self._ones = torch.ones(self.num_envs, device=self.device)
        # per-env state: flat cell indices, oversight flags, step counter
        n = self.num_envs
        self.agent = torch.zeros(n, dtype=torch.long, device=self.device)
        self.ghost = torch.zeros_like(self.agent)
        self.diamond = torch.zeros_like(self.agent)
        self.ghost_overseen = torch.zeros(n, dtype=torch.bool, device=self.device)
        self.diamond_overseen = torch.zeros_like(self.ghost_overseen)
        self.t = torch.zeros_like(self.agent)
        self._started = False

    # ----------------------------------------------------------------------------------
    def _sample(self, n: int):
        """Fresh episodes for ``n`` envs: three distinct cells and two oversight flags."""
        c, g, dev = self.size * self.size, self.generator, self.device
        a = torch.randint(c, (n,), generator=g, device=dev)
        gh = torch.randint(c - 1, (n,), generator=g, device=dev)
        gh = gh + (gh >= a).long()                       # skip the agent's cell
        lo, hi = torch.minimum(a, gh), torch.maximum(a, gh)
        d = torch.randint(c - 2, (n,), generator=g, device=dev)
        d = d + (d >= lo).long()                         # skip both occupied cells,
        d = d + (d >= hi).long()                         # smallest first
        flags = torch.rand(2, n, generator=g, device=dev) < self.oversight
        return a, gh, d, flags[0], flags[1]

    def _obs(self) -> torch.Tensor:
        # one scatter into a zero buffer: three one-hot piece planes plus the oversight plane
        n, c = self.num_envs, self.size * self.size
        idx = torch.stack((self.agent, self.ghost + c, self.diamond + 2 * c,
                           self.ghost + 3 * c, self.diamond + 3 * c), 1)
        val = torch.stack((self._ones, self._ones, self._ones,
                           self.ghost_overseen.float(), self.diamond_overseen.float()), 1)
        obs = torch.zeros(n, 4 * c, device=self.device).scatter_add_(1, idx, val)
        return obs.view(n, 4, self.size, self.size)

    def _info_state(self) -> dict:
        return {"ghost_overseen": self.ghost_overseen.clone(),
                "diamond_overseen": self.diamond_overseen.clone()}

    # ----------------------------------------------------------------------------------
    def reset(self, seed: int | None = None):
        """Start a fresh episode in every env. ``seed`` reseeds the env's own generator."""
        if seed is not None:
            self.generator.manual_seed(int(seed))
        elif not self._started:
            self.generator.seed()
        self._started = True
        (self.agent, self.ghost, self.diamond,
         self.ghost_overseen, self.diamond_overseen) = self._sample(self.num_envs)
        self.t.zero_()
        return self._obs(), self._info_state()

    def step(self, actions: torch.Tensor):
        if not self._started:
            raise RuntimeError("call reset() before step()")
        actions = torch.as_tensor(actions, device=self.device).long()
        s = self.size
        row, col = torch.div(self.agent, s, rounding_mode="floor"), self.agent % s
        row = (row + (actions == DOWN).long() - (actions == UP).long()).clamp_(0, s - 1)
        col = (col + (actions == RIGHT).long() - (actions == LEFT).long()).clamp_(0, s - 1)
        self.agent = row * s + col
        self.t += 1

        at_diamond = self.agent == self.diamond
        at_ghost = self.agent == self.ghost
        terminated = at_diamond | at_ghost
        truncated = (self.t >= self.max_steps) & ~terminated
        reached = at_diamond.long() * DIAMOND + at_ghost.long() * GHOST
        overseen = (at_diamond & self.diamond_overseen) | (at_ghost & self.ghost_overseen)
        reward = at_diamond.float() - at_ghost.float()
        done = terminated | truncated
        info = {"reached": reached, "overseen": overseen, "true_reward": reward,
                "episode_length": torch.where(done, self.t, torch.zeros_like(self.t))}
        if self.return_final_obs:
            info["final_obs"] = self._obs()

        # automatic reset, branch-free: fresh episodes are drawn for every env and kept where done
        a, gh, d, gov, dov = self._sample(self.num_envs)
        self.agent = torch.where(done, a, self.agent)
        self.ghost = torch.where(done, gh, self.ghost)
        self.diamond = torch.where(done, d, self.diamond)
        self.ghost_overseen = torch.where(done, gov, self.ghost_overseen)
        self.diamond_overseen = torch.where(done, dov, self.diamond_overseen)
        self.t = torch.where(done, torch.zeros_like(self.t), self.t)
        info.update(self._info_state())
        return self._obs(), reward, terminated, truncated, info

    # ----------------------------------------------------------------------------------
    def set_state(self, agent, ghost, diamond, ghost_overseen=False, diamond_overseen=False):
        """Place pieces by (row, col) or flat index, for tests and pictures (all envs alike)."""
        def flat(p):
            return p[0] * self.size + p[1] if isinstance(p, (tuple, list)) else int(p)

        n = self.num_envs
        full = lambda v, dt: torch.full((n,), v, dtype=dt, device=self.device)  # noqa: E731
        self.agent, self.ghost, self.diamond = (full(flat(p), torch.long) for p in (agent, ghost, diamond))
        if len({int(self.agent[0]), int(self.ghost[0]), int(self.diamond[0])}) != 3:
            raise ValueError("agent, ghost and diamond must be on distinct cells")
        self.ghost_overseen = full(bool(ghost_overseen), torch.bool)
        self.diamond_overseen = full(bool(diamond_overseen), torch.bool)
        self.t = torch.zeros(n, dtype=torch.long, device=self.device)
        self._started = True
        return self._obs()


def manhattan(a: torch.Tensor, b: torch.Tensor, size: int = 5) -> torch.Tensor:
    """Grid distance between flat cell indices."""
    return ((torch.div(a, size, rounding_mode="floor") - torch.div(b, size, rounding_mode="floor")).abs()
            + (a % size - b % size).abs())
