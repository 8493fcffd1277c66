"""Parameter routing (the SGTM-style variant): route data to *parameters* instead of activations.

A region ``theta_forget`` of parameters is designated (rows/columns of linear weights, MLP
units, attention heads). Then, per data point (example or token):

- **forget**: only ``theta_forget`` receives gradient; gradient still flows *through* every
  other parameter to reach ``theta_forget`` in earlier layers, but those parameters are not
  updated by this data point;
- **zero** (confidently retain, optional): the forward pass runs with ``theta_forget`` set to 0,
  so this data point neither uses nor updates it;
- everything else (unlabelled / retain): updates all parameters, as in ordinary training.

Mixed batches are handled without a Python loop over examples: each parameter-owning module
splits its rows into the (at most three) groups. Linear layers (``nn.Linear``, HF ``Conv1D``)
use one fused autograd function whose weight gradient is ``g_n^T x_n + M * g_f^T x_f +
(1 - M) * g_z^T x_z`` (one matmul's worth of work); other modules (embeddings, norms) run once
per group. The result equals "backward each group separately, mask, sum" (tested).

    router = gr.ParamRouter(model, gr.unit_masks(model, new_units))
    with router(forget=is_forget):          # bool (B,) or (B, T)
        model(x, y)[1].backward()
    router.ablate()                          # after training: theta_forget = 0

Sharded models (FSDP2 ``fully_shard``, parameters are DTensors): the masks are kept whole (plain bool tensors
of the parameters' full shapes) because routing acts inside the forward pass, where FSDP2 has gathered each
module's parameters; gradients are masked there, before FSDP reduce-scatters them. Parameters are looked up
on their module at call time (FSDP2 swaps a module's sharded parameters for gathered ones around its
forward), and :meth:`ParamRouter.ablate` zeroes each rank's own shard. See docs/scale.md.
"""
from __future__ import annotations

import contextlib
import math
from typing import Mapping

import torch
import torch.nn as nn

from .adapters import Pattern, find_modules, is_linear, linear_masks, local_shard, out_axis, unwrap, whole
from .core import route
from .masks import region_mask
from .surgery import Units, unit_masks

Region = Mapping[str, torch.Tensor]  # parameter name -> bool mask broadcastable to the parameter


def linear_region(model: nn.Module, pattern: Pattern, out_units=None, in_units=None) -> dict[str, torch.Tensor]:
    """``theta_forget`` masks for the linear layers matching ``pattern``: the rows of ``out_units``
    (with their biases) and/or the columns of ``in_units`` (slice, indices or bool mask)."""
    if out_units is None and in_units is None:
        raise ValueError("linear_region() needs out_units and/or in_units")
    region = {}
    for name, lin in find_modules(model, pattern, kind="linear layer"):
        if not is_linear(lin):
            raise TypeError(f"{name} is a {type(lin).__name__}, not a linear layer")
        ax = out_axis(lin)
        o = None if out_units is None else region_mask(out_units, lin.weight.shape[ax], lin.weight.device)
        i = None if in_units is None else region_mask(in_units, lin.weight.shape[1 - ax], lin.weight.device)
        w, b = linear_masks(lin, o, i)
        region[f"{name}.weight"] = w
        if b is not None:
            region[f"{name}.bias"] = b
    return region


def unknown_parameter(what: str, name: str, named: Mapping) -> ValueError:
    """The error for ``what`` naming a parameter that is not in ``named``, with close names."""
    import difflib

    close = difflib.get_close_matches(str(name), list(named), n=4)
    return ValueError(f"{what} names unknown parameter {name!r}"
                      + (f"; close names: {', '.join(close)}" if close else ""))


def _as_param_region(model: nn.Module, region) -> dict[str, torch.Tensor]:
    if isinstance(region, Units):
        region = unit_masks(model, region)
    out: dict[str, torch.Tensor] = {}
    for key, val in region.items():
        if isinstance(val, tuple):  # {linear name: (weight_mask, bias_mask)} as from unit_masks()
            w, b = val
            out[f"{key}.weight"] = w
            if b is not None:
                out[f"{key}.bias"] = b
        else:
            out[key] = val
    return out


def _take(t: torch.Tensor, rows) -> torch.Tensor:
    """Rows of ``t``: ``rows`` is a slice (a view, no copy) or an index tensor."""
    return t[rows] if isinstance(rows, slice) else t.index_select(0, rows)


def _compact(idx: torch.Tensor, total: int):
    """A slice when ``idx`` is one contiguous run (no gather needed), else ``idx`` itself."""
    k = idx.numel()
    if k == 0:
        return slice(0, 0)
    if k == total:
        return slice(0, total)
    first, last = int(idx[0]), int(idx[-1])
    return slice(first, last + 1) if last - first + 1 == k else idx


def _size(rows) -> int:
    return rows.stop - rows.start if isinstance(rows, slice) else rows.numel()


class _GroupedLinear(torch.autograd.Function):
    """y = x W^T + b per row, with per-row-group weight-gradient masks (see module docstring).

    W is the *logical* (out, in) weight (a transposed view for Conv1D); M, Mb are bool masks of
    theta_forget (or None: empty region); f and z index the forget and zero rows.
    """

    @staticmethod
    def forward(ctx, x, W, b, M, Mb, rows):
        f, z, n = rows
        y = torch.nn.functional.linear(x, W, b)
        if _size(z) and M is not None:
            corr = torch.nn.functional.linear(_take(x, z), W * M, None if b is None or Mb is None else b * Mb)
            if isinstance(z, slice):
                y[z] -= corr
            else:
                y.index_add_(0, z, -corr)
        ctx.save_for_backward(x, W, M, Mb)
        ctx.rows, ctx.has_bias = rows, b is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, W, M, Mb = ctx.saved_tensors
        f, z, n = ctx.rows
        gx = gW = gb = None
        if ctx.needs_input_grad[0]:
            gx = g @ W
            if _size(z) and M is not None:
                corr = _take(g, z) @ (W * M)
                if isinstance(z, slice):
                    gx[z] -= corr
                else:
                    gx.index_add_(0, z, -corr)
        if ctx.needs_input_grad[1]:
            gW = _take(g, n).t() @ _take(x, n) if _size(n) else torch.zeros_like(W)
            if _size(f) and M is not None:
                gW += (_take(g, f).t() @ _take(x, f)) * M
            if _size(z):
                gz = _take(g, z).t() @ _take(x, z)
                gW += gz if M is None else gz * ~M
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = _take(g, n).sum(0)
            if _size(f) and Mb is not None:
                gb += _take(g, f).sum(0) * Mb
            if _size(z):
                gz = _take(g, z).sum(0)
                gb += gz if Mb is None else gz * ~Mb
        return gx, gW, gb, None, None, None


class ParamRouter:
    """Parameter routing for ``model`` with ``theta_forget`` given by ``region``.

    ``region``: a :class:`~gradroute.surgery.Units` (MLP units / heads), ``{parameter name: bool
    mask}`` (mask broadcastable to the parameter; see :func:`linear_region`), or ``{linear module
    name: (weight_mask, bias_mask)}`` as returned by :func:`~gradroute.surgery.unit_masks`.

    Every parameter of the model must live in a leaf module (a module without parameterised
    children); linear layers get the fused path, others (embeddings, norms) run per group.

    ``masks``: ``{parameter name: bool mask of the parameter's full shape}`` (every name of a tied parameter),
    keyed by name so that they survive wrappers that replace parameter objects (FSDP2's ``fully_shard``).
    """

    def __init__(self, model: nn.Module, region):
        self.model = model
        root = unwrap(model)
        named = dict(root.named_parameters(remove_duplicate=False))
        masks = _as_param_region(model, region)
        if not masks:
            raise ValueError("parameter routing needs a non-empty theta_forget region")
        by_param: dict[int, torch.Tensor] = {}    # tied parameters (two names, one tensor) share one mask
        for pname, m in masks.items():
            if pname not in named:
                raise unknown_parameter("region", pname, named)
            p = named[pname]
            m = whole(m)
            m = torch.as_tensor(m, dtype=torch.bool, device=p.device)
            try:
                m = m.expand(p.shape)               # p.shape: the full shape, also for a sharded DTensor
            except RuntimeError:
                raise ValueError(f"mask for {pname} has shape {tuple(m.shape)}, which does not broadcast "
                                 f"to the parameter's shape {tuple(p.shape)}") from None
            by_param[id(p)] = by_param[id(p)] | m if id(p) in by_param else m
        # {parameter name: mask}, every name of a tied parameter included
        self.masks: dict[str, torch.Tensor] = {n: by_param[id(p)] for n, p in named.items() if id(p) in by_param}
        # the modules owning parameters directly, each wrapped while routing is active
        self.owners: list[tuple[str, nn.Module]] = []
        uncovered = []
        for name, mod in root.named_modules():
            own = list(mod.parameters(recurse=False))
            if not own:
                continue
            if any(True for c in mod.children() for _ in c.parameters()):
                uncovered += [f"{name}.{n}" for n, _ in mod.named_parameters(recurse=False)]
                continue
            self.owners.append((name, mod))
        # per owner module: {local parameter name: mask or None}; parameters themselves are read on the module
        # at call time (FSDP2 replaces them: sharded outside forward, gathered inside)
        self._owner_masks = {name: {pn: self.masks.get(f"{name}.{pn}" if name else pn)
                                    for pn, _ in mod.named_parameters(recurse=False)}
                             for name, mod in self.owners}
        if uncovered:
            raise TypeError("parameter routing needs every parameter inside a leaf module; these are owned "
                            f"by modules with parameterised children: {', '.join(uncovered[:8])}")
        self._state: dict | None = None

    # ------------------------------------------------------------------ public API
    def __call__(self, forget: torch.Tensor | None = None, zero: torch.Tensor | None = None):
        """Context manager: inside it, forward passes route per data point.

        ``forget``: bool per example ``(B,)`` or per token ``(B, T)``: these update only
        ``theta_forget``. ``zero``: same shape: these run with ``theta_forget`` zeroed (and so
        never update it). Unmarked data updates everything. Backward may run inside or after.
        """
        return self._activate(forget, zero)

    @torch.no_grad()
    def ablate(self) -> None:
        """Set ``theta_forget`` to zero in place (after training). On a model sharded with FSDP2 every rank
        zeroes its own shard (call it on every rank, outside forward)."""
        for name, mod in self.owners:
            for pn, m in self._owner_masks[name].items():
                if m is not None:
                    p = getattr(mod, pn)
                    local, m = local_shard(p, m)
                    local.masked_fill_(m, 0)

    def num_forget_params(self) -> int:
        seen, total = set(), 0
        for m in self.masks.values():
            if id(m) not in seen:
                seen.add(id(m))
                total += int(m.sum())
        return total

    # ------------------------------------------------------------------ machinery
    @contextlib.contextmanager
    def _activate(self, forget, zero):
        ref = forget if forget is not None else zero
        if ref is None:
            raise ValueError("pass forget= and/or zero= (bool per example or per token)")
        forget = torch.zeros_like(ref, dtype=torch.bool) if forget is None else torch.as_tensor(forget).bool()
        zero = torch.zeros_like(ref, dtype=torch.bool) if zero is None else torch.as_tensor(zero).bool()
        if forget.shape != zero.shape:
            raise ValueError(f"forget mask {tuple(forget.shape)} and zero mask {tuple(zero.shape)} differ in shape")
        if forget.ndim == 0:
            raise ValueError("forget/zero masks need at least a batch dimension")
        self._state = {"forget": forget, "zero": zero & ~forget}
        patched = []
        try:
            for name, mod in self.owners:
                mod.forward = self._make_forward(name, mod)
                patched.append(mod)
            yield self
        finally:
            for mod in patched:
                del mod.forward
            self._state = None

    def _rows(self, name: str, x: torch.Tensor):
        """``x`` and its row groups (f, z, n), flattened over the masks' leading dims.

        An input shared by all data points along size-1 leading dims (position ids of shape
        ``(1, T)``) is expanded, so each data point's use of the parameters is routed.
        """
        lead = tuple(self._state["forget"].shape)
        have = tuple(x.shape[: len(lead)])
        if have != lead:
            if x.ndim < len(lead) or any(a not in (1, b) for a, b in zip(have, lead)):
                raise ValueError(f"parameter routing: {name} received input of shape {tuple(x.shape)}, whose "
                                 f"leading dims do not match the routing masks' shape {lead}")
            x = x.expand(*lead, *x.shape[len(lead):])
        groups = self._state.setdefault("groups", {})  # the same for every module of the pass
        key = str(x.device)
        if key not in groups:
            f = self._state["forget"].to(x.device).reshape(-1)
            z = self._state["zero"].to(x.device).reshape(-1)
            idx = torch.arange(f.numel(), device=x.device)
            groups[key] = (idx[f], idx[z], idx[~(f | z)])
        return (x, *groups[key])

    def _linear_rows(self, f, z, n, reps: int, device):
        """Row groups of a linear layer's flattened input (positions expanded), as slices when
        contiguous; cached for the pass, since every layer sees the same layout."""
        key = (reps, str(device))
        cache = self._state.setdefault("rows", {})
        if key not in cache:
            total = (f.numel() + z.numel() + n.numel()) * reps
            if reps != 1:  # per-example groups cover all positions of the example
                expand = lambda r: (r.view(-1, 1) * reps + torch.arange(reps, device=device)).flatten()
                f, z, n = expand(f), expand(z), expand(n)
            cache[key] = tuple(_compact(r, total) for r in (f, z, n))
        return cache[key]

    def _make_forward(self, name: str, mod: nn.Module):
        original = type(mod).forward.__get__(mod)
        lead_ndim = self._state["forget"].ndim
        pmasks = self._owner_masks[name]
        if is_linear(mod):
            conv = out_axis(mod) == 1
            wm, bm = pmasks.get("weight"), pmasks.get("bias")

            def forward(x, *args, **kwargs):
                x, f, z, n = self._rows(name, x)
                if not f.numel() and not z.numel():
                    return original(x, *args, **kwargs)
                rows = self._linear_rows(f, z, n, math.prod(x.shape[lead_ndim:-1]), x.device)
                W = mod.weight.t() if conv else mod.weight
                M = None if wm is None else (wm.t() if conv else wm)
                y = _GroupedLinear.apply(x.reshape(-1, x.shape[-1]), W, mod.bias, M, bm, rows)
                return y.view(*x.shape[:-1], y.shape[-1])
            return forward

        def forward(x, *args, **kwargs):
            x, f, z, n = self._rows(name, x)
            if not f.numel() and not z.numel():
                return original(x, *args, **kwargs)
            lead = x.shape[:lead_ndim]
            xs = x.reshape(-1, *x.shape[lead_ndim:])
            params = {pn: p for pn, p in mod._parameters.items() if p is not None}   # as of now (FSDP2: gathered)
            parts, order = [], []
            for rows, kind in ((n, "n"), (f, "f"), (z, "z")):
                if not rows.numel():
                    continue
                part = xs.index_select(0, rows)
                if kind == "n":
                    out = original(part, *args, **kwargs)
                else:
                    eff = {}
                    for pn, p in params.items():
                        m = pmasks.get(pn)
                        if kind == "f":
                            eff[pn] = route(p, 0.0) if m is None else route(p, m.to(p.dtype))  # stays in the graph (DDP)
                        else:
                            eff[pn] = p if m is None else p * (~m).to(p.dtype)
                    with _swapped(mod, eff):
                        out = original(part, *args, **kwargs)
                parts.append(out)
                order.append(rows)
            y = torch.cat(parts)
            perm = torch.cat(order)
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(perm.numel(), device=perm.device)
            return y.index_select(0, inv).view(*lead, *y.shape[1:])
        return forward


@contextlib.contextmanager
def _swapped(mod: nn.Module, tensors: dict):
    """``mod``'s parameters replaced by ``tensors`` for the duration, on this module only: its own forward is
    then called directly, so no hook runs twice and no wrapper (FSDP2) sees a re-entered call."""
    saved = {pn: mod._parameters[pn] for pn in tensors}
    try:
        for pn, t in tensors.items():
            mod._parameters[pn] = t
        yield
    finally:
        for pn, p in saved.items():
            mod._parameters[pn] = p
