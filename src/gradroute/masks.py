"""Build routing weights from what users have: labels, token ids, a labelled fraction, unit regions.

The central helper is :func:`region_weights`: for the selected data points the weight is
``inside`` on a region of units and ``outside`` on the rest; unselected data points get
``default`` (1 = learn everywhere). That one function expresses both

    "route data X to units U, everything else learns everywhere"
        w = region_weights(is_x, units=U, n_units=D)                        # 1 on U, 0 off U

    the ERA pattern "w_target on the region, w_elsewhere off it, for X"
        w = region_weights(is_forget_token, units=new, n_units=D, outside=-0.75)
"""
from __future__ import annotations

from typing import Iterable, Sequence, Union

import torch

Units = Union[slice, range, Sequence[int], torch.Tensor]


def region_mask(units: Units, n_units: int, device=None) -> torch.Tensor:
    """A bool vector of length ``n_units``, True on ``units`` (a slice, range, index list or bool mask)."""
    if n_units <= 0:
        raise ValueError(f"n_units must be positive, got {n_units}")
    mask = torch.zeros(n_units, dtype=torch.bool, device=device)
    if isinstance(units, slice):
        idx = range(n_units)[units]
        if units.stop is not None and units.stop > n_units:
            raise ValueError(f"unit region {units} exceeds the layer's {n_units} units")
        mask[idx.start:idx.stop:idx.step] = True
        return mask
    if isinstance(units, torch.Tensor) and units.dtype == torch.bool:
        if units.shape != (n_units,):
            raise ValueError(f"bool unit mask has shape {tuple(units.shape)}, expected ({n_units},)")
        return units.to(device=device)
    idx = torch.as_tensor(list(units) if not isinstance(units, torch.Tensor) else units, dtype=torch.long)
    if idx.ndim != 1:
        raise ValueError(f"unit indices must be 1-D, got shape {tuple(idx.shape)}")
    if idx.numel() and (int(idx.min()) < -n_units or int(idx.max()) >= n_units):
        raise ValueError(f"unit indices {idx.tolist()[:8]}... out of range for a layer of {n_units} units")
    mask[idx.to(mask.device)] = True
    return mask


def region_weights(
    select: torch.Tensor,
    units: Units,
    n_units: int,
    inside: float = 1.0,
    outside: float | torch.Tensor = 0.0,
    default: float = 1.0,
) -> torch.Tensor:
    """Routing weight of shape ``select.shape + (n_units,)``.

    ``select`` marks the data points to route (bool, per example ``(B,)`` or per token
    ``(B, T)``); a float ``select`` in [0, 1] interpolates between ``default`` and the routed
    weights (soft routing, e.g. by how strongly a token indicates the forget topic).
    For selected points: ``inside`` on ``units``, ``outside`` elsewhere. Others: ``default``.
    ``outside`` may also be a tensor broadcasting to ``select.shape`` (per-token strengths).
    """
    if not isinstance(select, torch.Tensor):
        select = torch.as_tensor(select)
    s = select.to(torch.float32)
    if s.numel() and (s.min() < 0 or s.max() > 1):
        raise ValueError("select must be bool or a float in [0, 1]")
    region = region_mask(units, n_units, device=s.device).to(torch.float32)
    if isinstance(outside, torch.Tensor):
        outside = outside.to(device=s.device, dtype=torch.float32).unsqueeze(-1)
    routed = inside * region + outside * (1 - region)  # (..., n_units)
    s = s.unsqueeze(-1)
    return default + s * (routed - default)


def example_weights(labels: torch.Tensor, weights: dict, default: float = 1.0, ndim: int = 1) -> torch.Tensor:
    """Per-example weight from integer labels: ``weights[label]`` (else ``default``), shaped
    ``(B,) + (1,) * (ndim - 1)`` so it broadcasts over an activation with ``ndim`` dimensions."""
    labels = torch.as_tensor(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D (one per example), got shape {tuple(labels.shape)}")
    w = torch.full(labels.shape, float(default))
    for label, value in weights.items():
        w[labels == label] = float(value)
    return w.view(-1, *([1] * (ndim - 1)))


def token_mask(token_ids: torch.Tensor, targets: Iterable[int] | torch.Tensor) -> torch.Tensor:
    """Bool mask, True where ``token_ids`` is one of ``targets`` (same shape as ``token_ids``)."""
    targets = torch.as_tensor(list(targets) if not isinstance(targets, torch.Tensor) else targets,
                              dtype=torch.long, device=token_ids.device)
    if targets.numel() == 0:
        raise ValueError("token_mask() needs at least one target token id")
    return torch.isin(token_ids, targets)


def label_subset(positive: torch.Tensor, fraction: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep a random ``fraction`` of the True entries of ``positive`` (partial oversight).

    Exactly ``round(fraction * n_positive)`` entries stay True, chosen with ``generator``;
    use it once over a dataset's per-example flags so each example's label is fixed.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    positive = torch.as_tensor(positive, dtype=torch.bool)
    idx = positive.nonzero().flatten()
    k = round(fraction * idx.numel())
    perm = torch.randperm(idx.numel(), generator=generator)[:k]
    out = torch.zeros_like(positive)
    out[idx[perm]] = True
    return out
