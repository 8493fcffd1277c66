"""Surgery: expand MLPs / attention so the model computes the same function, then ablate or
contract a region of units afterwards. Works on ``gradroute.models.GPT`` and on Hugging Face
GPT-2 and Llama-style models (see ``adapters`` for the layouts recognised).

Expand before you build the optimizer: the resized layers get new ``nn.Parameter`` objects.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .adapters import (Pattern, attention_parts, find_modules, linear_masks, local_shard, out_axis, refuse_sharded,
                       mlp_parts, resize_linear, unwrap)
from .core import route_factored
from .hooks import routing
from .masks import region_mask, region_weights


@dataclass
class Units:
    """A region of units: MLP hidden units (``kind="mlp"``) or attention heads (``kind="heads"``)
    per block module name. ``n_units`` is the block's total count when the region was made."""
    kind: str
    index: dict[str, torch.Tensor] = field(default_factory=dict)
    n_units: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in ("mlp", "heads"):
            raise ValueError(f"Units.kind must be 'mlp' or 'heads', got {self.kind!r}")

    def __or__(self, other: "Units") -> "Units":
        if other.kind != self.kind:
            raise ValueError("cannot combine MLP units with attention heads")
        return Units(self.kind, {**self.index, **other.index}, {**self.n_units, **other.n_units})


def _idx(t) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.long)


def select_units(model: nn.Module, pattern: Pattern, units, kind: str = "mlp") -> Units:
    """A :class:`Units` region naming existing ``units`` (slice/indices) in every matched block."""
    out = Units(kind)
    for name, block in find_modules(model, pattern, kind="block"):
        n = mlp_parts(block, name).n_units if kind == "mlp" else attention_parts(block, name).n_heads
        out.index[name] = region_mask(units, n).nonzero().flatten()
        out.n_units[name] = n
    return out


def _set_attr_if_int(obj, attr: str, value: int) -> None:
    if isinstance(getattr(obj, attr, None), int):
        setattr(obj, attr, value)


def expand_mlp(model: nn.Module, pattern: Pattern, k: int, init_std: float | None = None) -> Units:
    """Add ``k`` hidden units to every MLP matching ``pattern``. New units read the input with
    random weights (std of the existing ones unless ``init_std``) and write to the output with
    zero weights, so the expanded model computes the same function. Returns the new units."""
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    refuse_sharded(model, "expand_mlp()", "Expand the model before fully_shard")
    new = Units("mlp")
    for name, mlp in find_modules(model, pattern, kind="MLP"):
        parts = mlp_parts(mlp, name)
        n = parts.n_units
        for child in parts.inputs:
            resize_linear(getattr(mlp, child), add_out=k, init_std=init_std)
        resize_linear(getattr(mlp, parts.output), add_in=k)
        _set_attr_if_int(mlp, "intermediate_size", n + k)
        new.index[name] = torch.arange(n, n + k)
        new.n_units[name] = n + k
    return new


@torch.no_grad()
def _grow_fused_qkv(c_attn: nn.Module, add: int, std: float) -> None:
    ax = out_axis(c_attn)
    W, b = c_attn.weight.data, c_attn.bias.data
    Ws, bs = W.chunk(3, dim=ax), b.chunk(3)
    shape = list(Ws[0].shape)
    shape[ax] = add
    W = torch.cat([t for w in Ws for t in (w, torch.randn(shape, dtype=W.dtype, device=W.device) * std)], dim=ax)
    b = torch.cat([t for x in bs for t in (x, x.new_zeros(add))])
    c_attn.weight, c_attn.bias = nn.Parameter(W.contiguous()), nn.Parameter(b)
    c_attn.nf = W.shape[ax]


def expand_attention(model: nn.Module, pattern: Pattern, h: int, init_std: float | None = None) -> Units:
    """Add ``h`` heads to every attention block matching ``pattern`` (zero output weights, so
    the function is unchanged). With grouped-query attention ``h`` must be a multiple of the
    group size; matching key/value heads are added too. Returns the new heads."""
    refuse_sharded(model, "expand_attention()", "Expand the model before fully_shard")
    if h <= 0:
        raise ValueError(f"h must be positive, got {h}")
    new = Units("heads")
    for name, attn in find_modules(model, pattern, kind="attention block"):
        p = attention_parts(attn, name)
        groups = p.n_heads // p.n_kv_heads
        if h % groups:
            raise ValueError(f"{name}: grouped-query attention with {groups} query heads per key/value head "
                             f"needs h to be a multiple of {groups}, got {h}")
        add = h * p.head_dim
        if p.qkv is not None:
            c_attn = getattr(attn, p.qkv)
            _grow_fused_qkv(c_attn, add, float(c_attn.weight.detach().std()) if init_std is None else init_std)
            attn.split_size += add
        else:
            resize_linear(getattr(attn, p.q), add_out=add, init_std=init_std)
            for c in (p.k, p.v):
                resize_linear(getattr(attn, c), add_out=add // groups, init_std=init_std)
        resize_linear(getattr(attn, p.o), add_in=add)
        _set_attr_if_int(attn, "num_heads", p.n_heads + h)
        new.index[name] = torch.arange(p.n_heads, p.n_heads + h)
        new.n_units[name] = p.n_heads + h
    return new


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads.view(-1, 1) * head_dim + torch.arange(head_dim)).flatten()


def unit_masks(model: nn.Module, units: Units) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """The parameters that make up ``units``: ``{linear module name: (weight_mask, bias_mask)}``.

    MLP units: their rows (and biases) in the hidden-producing linears, their columns in the
    reading linear. Heads: their q/k/v rows (k/v only for key/value heads whose whole query group
    is in the region) and their columns in the output projection.
    """
    root = unwrap(model)
    modules = dict(root.named_modules())
    masks: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def add(lin_name: str, out_sel=None, in_sel=None):
        lin = modules[lin_name]
        dev = lin.weight.device
        w, b = linear_masks(lin, None if out_sel is None else out_sel.to(dev), None if in_sel is None else in_sel.to(dev))
        if lin_name in masks:
            w0, b0 = masks[lin_name]
            w, b = w | w0, (None if b is None else b | b0)
        masks[lin_name] = (w, b)

    for name, idx in units.index.items():
        if name not in modules:
            raise ValueError(f"region names {name!r}, which is not a module of {type(root).__name__}")
        block = modules[name]
        idx = _idx(idx)
        if units.kind == "mlp":
            parts = mlp_parts(block, name)
            sel = region_mask(idx, parts.n_units)
            for c in parts.inputs:
                add(f"{name}.{c}", out_sel=sel)
            add(f"{name}.{parts.output}", in_sel=sel)
            continue
        p = attention_parts(block, name)
        q_sel = region_mask(_head_rows(idx, p.head_dim), p.n_heads * p.head_dim)
        groups = p.n_heads // p.n_kv_heads
        covered = torch.zeros(p.n_heads, dtype=torch.bool)
        covered[idx] = True
        kv_heads = covered.view(p.n_kv_heads, groups).all(dim=1).nonzero().flatten()
        kv_sel = region_mask(_head_rows(kv_heads, p.head_dim), p.n_kv_heads * p.head_dim)
        if p.qkv is not None:
            add(f"{name}.{p.qkv}", out_sel=torch.cat([q_sel, kv_sel, kv_sel]))
        else:
            add(f"{name}.{p.q}", out_sel=q_sel)
            add(f"{name}.{p.k}", out_sel=kv_sel)
            add(f"{name}.{p.v}", out_sel=kv_sel)
        add(f"{name}.{p.o}", in_sel=q_sel)
    return masks


@torch.no_grad()
def ablate(model: nn.Module, units: Units) -> None:
    """Zero every parameter of ``units`` (inputs and outputs, biases included), in place."""
    modules = dict(unwrap(model).named_modules())
    for lin_name, (wm, bm) in unit_masks(model, units).items():
        lin = modules[lin_name]
        for p, m in ((lin.weight, wm), (lin.bias, bm)):
            if m is not None:
                local, m = local_shard(p, m)        # under FSDP2: this rank's shard
                local.masked_fill_(m, 0)


def contract(model: nn.Module, units: Units) -> None:
    """Remove ``units`` from the model, in place (smaller layers). The contracted model computes
    what the ablated one does when the MLP's activation maps 0 to 0 (GELU, ReLU, SiLU...).
    The ``Units`` objects of this model are stale afterwards."""
    refuse_sharded(model, "contract()", "Gather a full state dict, load it into an unsharded model and contract that")
    modules = dict(unwrap(model).named_modules())
    for name, idx in units.index.items():
        block = modules[name]
        idx = _idx(idx)
        if units.kind == "mlp":
            parts = mlp_parts(block, name)
            keep = (~region_mask(idx, parts.n_units)).nonzero().flatten()
            for c in parts.inputs:
                resize_linear(getattr(block, c), out_index=keep)
            resize_linear(getattr(block, parts.output), in_index=keep)
            _set_attr_if_int(block, "intermediate_size", keep.numel())
            continue
        p = attention_parts(block, name)
        if p.n_kv_heads != p.n_heads:
            raise NotImplementedError(f"{name}: contracting grouped-query attention is not supported; use ablate()")
        keep_heads = (~region_mask(idx, p.n_heads)).nonzero().flatten()
        keep = _head_rows(keep_heads, p.head_dim)
        if p.qkv is not None:
            E = p.n_heads * p.head_dim
            resize_linear(getattr(block, p.qkv), out_index=torch.cat([keep, keep + E, keep + 2 * E]))
            block.split_size = keep.numel()
        else:
            for c in (p.q, p.k, p.v):
                resize_linear(getattr(block, c), out_index=keep)
        resize_linear(getattr(block, p.o), in_index=keep)
        _set_attr_if_int(block, "num_heads", keep_heads.numel())


def route_units(model: nn.Module, units: Units, select: torch.Tensor, inside: float = 1.0,
                outside: float | torch.Tensor = 0.0, default: float = 1.0) -> contextlib.AbstractContextManager:
    """Context manager routing the hidden activations of ``units`` (the ERA step).

    For data points where ``select`` (per example ``(B,)`` or per token ``(B, T)``; float in
    [0, 1] for soft routing) the gradient through the region's units is scaled by ``inside`` and
    through the other units by ``outside``; other data gets ``default`` everywhere. MLP units are
    routed at the input of the block's reading linear, heads at the input of the output projection.
    """
    modules = dict(unwrap(model).named_modules())
    spec = {}
    for name, idx in units.index.items():
        block = modules[name]
        if units.kind == "mlp":
            parts = mlp_parts(block, name)
            n, region, reader = parts.n_units, _idx(idx), parts.output
        else:
            p = attention_parts(block, name)
            n, region, reader = p.n_heads * p.head_dim, _head_rows(_idx(idx), p.head_dim), p.o
        if isinstance(outside, torch.Tensor):  # per-data-point strengths: materialise the weight
            w = region_weights(select, region, n, inside=inside, outside=outside, default=default)
            spec[f"{name}.{reader}"] = _broadcast_over_middle(w)
        else:  # memory-light: keep only select and the per-unit row for backward
            row = region_weights(torch.ones(()), region, n, inside=inside, outside=outside, default=default)
            spec[f"{name}.{reader}"] = _Factored(select, row, default)
    return routing(model, spec, on="input")


class _Factored:
    """A routing-spec value applying :func:`~gradroute.core.route_factored` (see ``hooks``)."""

    def __init__(self, select, row, default):
        s = torch.as_tensor(select)
        if s.dtype != torch.bool and s.numel() and (s.min() < 0 or s.max() > 1):
            raise ValueError("select must be bool or a float in [0, 1]")
        self.select, self.row, self.default = s, row, default

    def route(self, hidden: torch.Tensor) -> torch.Tensor:
        return route_factored(hidden, self.select, self.row, self.default)


def _broadcast_over_middle(w: torch.Tensor):
    """Weight ``(*lead, units)`` -> callable reshaping it to ``(*lead, 1, ..., 1, units)`` for the
    routed tensor's rank (a per-example weight then covers every position of a sequence)."""
    def fit(h: torch.Tensor) -> torch.Tensor:
        extra = h.ndim - w.ndim
        return w if extra <= 0 else w.view(*w.shape[:-1], *([1] * extra), w.shape[-1])
    return fit
