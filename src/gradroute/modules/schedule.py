"""The mask schedule: per-example labels -> which owners run (forward) and which learn (backward).

A pure function of the labels, the probabilities and a random generator; nothing here touches a model.
Column 0 is the core (every parameter outside the modules), column ``1 + k`` module ``k``.

==================  ===========================  ===========================================
label               forward (runs)               backward (learns)
==================  ===========================  ===========================================
domain ``k``        core + module ``k``          module ``k``; the core too with prob. 1 - p_cr
``GENERAL`` (-2)    core (+ one random module    core (+ that module)
                    with probability ``p_as``)
``UNLABELLED`` (-1) core + every module          everything
==================  ===========================  ===========================================
"""
from __future__ import annotations

import torch

UNLABELLED = -1
GENERAL = -2
SPREADS = ("one", "each")


def _check_labels(labels, K: int) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one int per example, shape (B,), got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integers (domain index, -1 unlabelled, -2 general), got {labels.dtype}")
    bad = (labels >= K) | (labels < GENERAL)
    if bad.any():
        raise ValueError(f"labels must be in [0, {K}) or -1 (unlabelled) or -2 (general); got "
                         f"{sorted(set(labels[bad].tolist()))}")
    return labels.cpu().long()


def schedule_masks(labels, K: int, p_cr: float = 1.0, p_as: float = 0.0, generator: torch.Generator | None = None,
                   spread: str = "one", p_other: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example ``(forward, learn)`` masks of shape ``(B, 1 + K)`` (float strengths, bool) for ``labels``:
    domain index ``k`` in [0, K), :data:`GENERAL` (-2) or :data:`UNLABELLED` (-1).

    ``p_cr``: probability that the core is frozen on a domain example. ``p_as`` and ``spread``: on a general
    example, ``"one"`` random module runs and learns with probability ``p_as`` (the official schedule), or
    ``"each"`` module independently with probability ``p_as`` (ours). ``p_other`` (ours; default 0): on a
    domain-``k`` example each *other* module runs with that probability without learning from it. With
    ``p_other = 0`` no extra random numbers are drawn, so the masks and the generator's state are those of
    the schedule without it."""
    labels = _check_labels(labels, K)
    if spread not in SPREADS:
        raise ValueError(f"spread must be 'one' or 'each', got {spread!r}")
    for n, p in (("p_cr", p_cr), ("p_as", p_as), ("p_other", p_other)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{n} must be in [0, 1], got {p}")
    B = labels.numel()
    fwd = torch.zeros(B, 1 + K)
    learn = torch.zeros(B, 1 + K, dtype=torch.bool)
    fwd[:, 0] = 1.0
    u = torch.rand(B, generator=generator)
    pick = torch.randint(K, (B,), generator=generator)
    rows = torch.arange(B)
    dom = labels >= 0
    fwd[rows[dom], 1 + labels[dom]] = 1.0
    learn[rows[dom], 1 + labels[dom]] = True
    learn[dom, 0] = u[dom] >= p_cr                   # the core is frozen with probability p_cr
    gen = labels == GENERAL
    learn[gen, 0] = True
    if spread == "one":
        on = gen & (u < p_as)
        fwd[rows[on], 1 + pick[on]] = 1.0
        learn[rows[on], 1 + pick[on]] = True
    else:
        on = gen.view(-1, 1) & (torch.rand(B, K, generator=generator) < p_as)
        fwd[:, 1:][on] = 1.0
        learn[:, 1:][on] = True
    unl = labels == UNLABELLED
    fwd[unl] = 1.0
    learn[unl] = True
    if p_other > 0 and bool(dom.any()):
        # drawn last, and only when used, so that p_other = 0 leaves every other draw unchanged
        other = dom.view(-1, 1) & (torch.rand(B, K, generator=generator) < p_other)
        other[rows[dom], labels[dom]] = False        # the example's own module is already on
        fwd[:, 1:][other] = 1.0                       # runs; learn stays False for these
    return fwd, learn


def check_masks(forward, learn, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit masks as ``(float forward, bool learn)``, both ``(B, 1 + K)``."""
    forward = torch.as_tensor(forward, dtype=torch.float32)
    learn = torch.as_tensor(learn).bool()
    if forward.shape != learn.shape or forward.ndim != 2 or forward.shape[1] != 1 + K:
        raise ValueError(f"forward {tuple(forward.shape)} and learn {tuple(learn.shape)} must both have "
                         f"shape (B, {1 + K}) (core, then one column per domain)")
    return forward, learn


def learned_owners(forward: torch.Tensor, learn: torch.Tensor) -> torch.Tensor:
    """Bool ``(1 + K,)``: the owners that learn from some example (a module only where it runs)."""
    return torch.cat([learn[:, :1].any(0), (learn[:, 1:] & (forward[:, 1:] != 0)).any(0)])
