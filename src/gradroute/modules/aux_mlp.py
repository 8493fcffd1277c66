"""One auxiliary MLP (a domain's module beside a core MLP) and where it lives: the pieces that the module set
and export share."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

CONTAINER = "aux_modules"          # attribute of each MLP holding its modules (an nn.ModuleDict)
_ACT_NAMES = ("act", "act_fn", "activation_fn", "activation")

class AuxMLP(nn.Module):
    """One auxiliary MLP: ``down(act(up(x)))``. ``down`` has no bias and starts at 0."""

    def __init__(self, d_in: int, width: int, d_out: int, act, bias: bool, init_std: float, dtype=None, device=None):
        super().__init__()
        self.up = nn.Linear(d_in, width, bias=bias, dtype=dtype, device=device)
        self.down = nn.Linear(width, d_out, bias=False, dtype=dtype, device=device)
        with torch.no_grad():
            self.up.weight.normal_(0.0, init_std)
            if bias:
                self.up.bias.zero_()
            self.down.weight.zero_()
        self.__dict__["act"] = act      # shared with the core MLP, not registered as a child

    def forward(self, x: torch.Tensor, learn: torch.Tensor | None = None,
                g: torch.Tensor | None = None) -> torch.Tensor:
        """``learn``: optional per-example float 0/1 of shape ``(B, 1, ..., 1)``: rows with 0 run but do not
        update this module's parameters (gradient still flows to ``x``). ``g``: a key gate multiplying the output."""
        if learn is None:
            y = F.linear(self.act(F.linear(x, self.up.weight, self.up.bias)), self.down.weight)
        else:
            h = _masked_linear(x, self.up.weight, self.up.bias, learn)
            y = _masked_linear(self.act(h), self.down.weight, None, learn)
        return y if g is None else y * g


def _masked_linear(x, W, b, m):
    """``x W^T + b`` whose weight gradient counts only rows with ``m == 1`` (``m`` 0/1 float of shape
    (B, 1, .., 1)); the value and the gradient to ``x`` are those of a plain linear."""
    y = F.linear(x * m, W) + F.linear(x * (1 - m), W.detach())
    if b is not None:
        y = y + (m * b + (1 - m) * b.detach())
    return y


def activation_of(mlp: nn.Module, name: str):
    for a in _ACT_NAMES:
        act = getattr(mlp, a, None)
        if act is not None and callable(act):
            return act
    raise TypeError(f"{name} ({type(mlp).__name__}) has no activation attribute ({', '.join(_ACT_NAMES)}); "
                    "pass activation= to add_modules()")
