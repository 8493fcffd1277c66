"""The routing primitive.

``route(x, w)`` is the identity in the forward pass and multiplies the gradient
flowing back through it by ``w``:

    route(x, w) == w * x + (1 - w) * x.detach()      # the paper's formula

but it costs one elementwise multiply in backward and nothing in forward.
"""
from __future__ import annotations

import numbers
from typing import Union

import torch

Weight = Union[float, int, torch.Tensor]


def _check_broadcast(weight: torch.Tensor, x: torch.Tensor) -> None:
    try:
        shape = torch.broadcast_shapes(weight.shape, x.shape)
    except RuntimeError:
        shape = None
    if shape != x.shape:
        raise ValueError(
            f"routing weight of shape {tuple(weight.shape)} does not broadcast to the "
            f"routed tensor of shape {tuple(x.shape)} (PyTorch broadcasting aligns trailing "
            f"dimensions; a per-example weight for a (batch, seq, units) tensor has shape "
            f"(batch, 1, 1))"
        )


class _Route(torch.autograd.Function):
    """Identity forward, ``grad * weight`` backward (differentiable: double backward works)."""

    @staticmethod
    def forward(x, weight):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, weight = inputs
        ctx.save_for_backward(weight)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return (grad * weight).to(grad.dtype), None


class _RouteScalar(torch.autograd.Function):
    @staticmethod
    def forward(x, weight: float):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.weight = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.weight, None


def route(x: torch.Tensor, weight: Weight) -> torch.Tensor:
    """Return a tensor equal to ``x`` whose gradient is ``weight * upstream gradient``.

    ``weight`` is a number or a tensor that broadcasts to ``x`` (per example, per token,
    per unit, or any mix). 1 means "learn here", 0 "do not", fractions learn less and
    negative values learn in reverse. The weight itself receives no gradient.

    Raises ``ValueError`` if a tensor weight does not broadcast to ``x.shape``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"route() expects a tensor to route, got {type(x).__name__}")
    if isinstance(weight, torch.Tensor):
        _check_broadcast(weight, x)
        if not (torch.is_grad_enabled() and x.requires_grad):
            return x
        weight = weight.detach()
        if weight.device != x.device:
            weight = weight.to(x.device)
        if not weight.is_floating_point():
            weight = weight.to(torch.float32)
        return _Route.apply(x, weight)
    if isinstance(weight, numbers.Real):
        if weight == 1 or not (torch.is_grad_enabled() and x.requires_grad):
            return x
        return _RouteScalar.apply(x, float(weight))
    raise TypeError(f"routing weight must be a number or a tensor, got {type(weight).__name__}")


class _RouteFactored(torch.autograd.Function):
    """Gradient scaled by ``default + s * (r - default)``: ``s`` per data point, ``r`` per unit."""

    @staticmethod
    def forward(x, s, r, default: float):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, s, r, default = inputs
        ctx.save_for_backward(s, r)
        ctx.default = default

    @staticmethod
    def backward(ctx, grad):
        s, r = ctx.saved_tensors
        w = ctx.default + s * (r - ctx.default)
        return (grad * w).to(grad.dtype), None, None, None


def route_factored(x: torch.Tensor, select: torch.Tensor, row: torch.Tensor, default: float = 1.0) -> torch.Tensor:
    """``route(x, default + select ⊗ (row - default))`` without materialising the weight.

    ``select`` (bool or float in [0, 1]) has the leading shape of a data point, e.g. ``(B,)`` or
    ``(B, T)``; ``row`` has one weight per unit (``x.shape[-1]``). Only these two small tensors are
    kept for backward, so routing a wide layer costs no activation-sized memory.
    """
    if row.ndim != 1 or row.shape[0] != x.shape[-1]:
        raise ValueError(f"row of shape {tuple(row.shape)} does not match the {x.shape[-1]} units of {tuple(x.shape)}")
    if select.ndim >= x.ndim or tuple(x.shape[: select.ndim]) != tuple(select.shape):
        raise ValueError(f"select of shape {tuple(select.shape)} is not a leading shape of {tuple(x.shape)}")
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x
    s = select.detach().to(device=x.device, dtype=torch.float32)
    s = s.view(*s.shape, *([1] * (x.ndim - s.ndim)))
    return _RouteFactored.apply(x, s, row.detach().to(device=x.device, dtype=torch.float32), float(default))


def route_reference(x: torch.Tensor, weight: Weight) -> torch.Tensor:
    """The paper's formula ``w * x + (1 - w) * stopgrad(x)``; slower, kept as a reference."""
    return weight * x + (1 - weight) * x.detach()
