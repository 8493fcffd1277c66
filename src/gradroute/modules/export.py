"""Export: a copy of the model without modules and hooks (a stock model of its own class), with chosen
modules merged into the MLPs by width concatenation.

Merging is exact in exact arithmetic (equal up to float summation order) when the MLP is not gated (a gateless
module is not a set of extra units of ``down(act(gate(x)) * up(x))``), computes ``reader(act(input(x)))`` (plus
dropout), the module uses the MLP's activation, and its ``up`` has a bias exactly when the MLP's input linear
does (``down`` has none). Other cases raise ``ValueError``. Keyed modules cannot be merged (a per-token gate is
not a width concatenation): export them with every module off, or keep the set attached."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..adapters import mlp_parts, out_axis
from .aux_mlp import CONTAINER, activation_of
from .deltas import EMBED_CONTAINER

_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


def strip_hooks(copied: nn.Module, original: nn.Module, sites: list) -> None:
    """Remove from ``copied`` (a deep copy of a model shaped as ``original``) the hooks ``sites`` ``[(module, handle)]`` registered
    on ``original``'s modules: the copy's hooks would still call the original's module set."""
    names = {id(m): n for n, m in original.named_modules()}
    for mod, handle in sites:
        target = copied.get_submodule(names[id(mod)])
        for d in _HOOK_DICTS:
            getattr(target, d).pop(handle.id, None)


@torch.no_grad()
def merge(mlp: nn.Module, name: str, modules: list, activation) -> None:
    """Append ``modules`` ``[(AuxMLP, strength)]`` to ``mlp`` as extra hidden units (``down`` times its strength)."""
    parts = mlp_parts(mlp, name)
    if len(parts.inputs) != 1:
        raise ValueError(f"{name}: a gated MLP ({' * '.join(parts.inputs)} -> {parts.output}) cannot absorb a "
                         "gateless module exactly; export with the module off, or keep the ModuleSet attached")
    first, reader = getattr(mlp, parts.inputs[0]), getattr(mlp, parts.output)
    for m, _ in modules:
        if m.act is not activation:
            raise ValueError(f"{name}: the module's activation is not the MLP's own; merging would not be exact")
        if (m.up.bias is None) != (first.bias is None):
            raise ValueError(f"{name}: the module's up bias does not match the MLP's input bias; cannot merge")
    ax_in, ax_out = out_axis(first), out_axis(reader)
    # logical layouts: up rows (width, d_in) ; down columns (d_out, width)
    W_in = first.weight if ax_in == 0 else first.weight.t()
    W_out = reader.weight if ax_out == 0 else reader.weight.t()
    new_in = torch.cat([W_in] + [m.up.weight.to(W_in.dtype) for m, _ in modules], 0)
    new_out = torch.cat([W_out] + [(s * m.down.weight).to(W_out.dtype) for m, s in modules], 1)
    first.weight = nn.Parameter((new_in if ax_in == 0 else new_in.t()).contiguous())
    reader.weight = nn.Parameter((new_out if ax_out == 0 else new_out.t()).contiguous())
    if first.bias is not None:
        first.bias = nn.Parameter(torch.cat([first.bias] + [m.up.bias.to(first.bias.dtype) for m, _ in modules]))
    for lin in (first, reader):
        if isinstance(lin, nn.Linear):
            lin.out_features, lin.in_features = lin.weight.shape
        else:
            lin.nf = lin.weight.shape[1]
    if isinstance(getattr(mlp, "intermediate_size", None), int):
        mlp.intermediate_size = new_in.shape[0]


def update_width_config(model: nn.Module, blocks: list[str]) -> None:
    """Keep the config's MLP width right when every block has the same width after a merge."""
    widths = {mlp_parts(model.get_submodule(n), n).n_units for n in blocks}
    cfg = getattr(model, "config", None)
    if cfg is None or len(widths) != 1:
        return
    w = widths.pop()
    for attr in ("d_mlp", "n_inner", "intermediate_size"):
        if hasattr(cfg, attr):
            setattr(cfg, attr, w)


def export(mods, strengths: torch.Tensor, source: nn.Module) -> nn.Module:
    """A deep copy of ``source`` (``mods.model`` or a wrapper's module) without ``mods``' modules, deltas and
    hooks; the modules with a nonzero strength in ``strengths`` ``(K,)`` merged into the MLPs."""

    kept = [mods.domains[k] for k in range(mods.K) if strengths[k] != 0]
    if kept and mods.keys is not None:
        raise ValueError(f"export(on={kept}): keyed modules cannot be merged into the MLPs (a per-token gate is "
                         "not a width concatenation); export with every module off, or keep the ModuleSet "
                         "attached and switch modules with using()/set()")
    out = copy.deepcopy(source)
    strip_hooks(out, mods.model, mods.hook_sites())
    for name, _ in mods.blocks:
        mlp = out.get_submodule(name)
        aux = mlp._modules.pop(CONTAINER)
        if kept:
            merge(mlp, name, [(aux[d], float(strengths[mods.index(d)])) for d in kept], activation_of(mlp, name))
    if kept:
        update_width_config(out, [n for n, _ in mods.blocks])
    out._modules.pop(EMBED_CONTAINER, None)
    return out
