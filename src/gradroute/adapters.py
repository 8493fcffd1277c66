"""What gradroute knows about model structure, in one place.

- Module lookup by name: exact name, glob (``*`` = one dotted component, ``**`` = any number),
  or regex (a ``re.Pattern`` or a string starting with ``re:``), with close-name suggestions.
- Linear layers: ``nn.Linear`` (weight ``(out, in)``) and Hugging Face's ``Conv1D`` used by
  GPT-2 (weight ``(in, out)``), behind one "out units / in units" view.
- MLP blocks: which linears produce the hidden units and which one reads them, for GPT-2
  (``c_fc``/``c_proj``), Llama-style (``gate_proj``, ``up_proj``/``down_proj``) and common others.
- Attention blocks: separate q/k/v/o projections (Llama-style, ours) or GPT-2's fused ``c_attn``.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Iterable, Union

import torch
import torch.nn as nn

Pattern = Union[str, "re.Pattern[str]"]


class UnknownModuleError(ValueError):
    """A module name or pattern matched nothing in the model."""


def unwrap(model: nn.Module) -> nn.Module:
    """The wrapped model of DistributedDataParallel / DataParallel / torch.compile, else the model."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


# ---------------------------------------------------------------------------- sharded (FSDP2) parameters
def is_sharded(t) -> bool:
    """Whether ``t`` is a DTensor (a parameter of a model sharded with FSDP2 or tensor parallelism)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:          # torch built without distributed
        return False
    return isinstance(t, DTensor)


def whole(t):
    """``t`` as one full tensor: a DTensor is gathered (a collective: every rank must call this)."""
    return t.full_tensor() if is_sharded(t) else t


def local_shard(p: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tensor, mask)`` to update in place: ``p`` and ``mask`` as they are, or for a DTensor ``p`` its local
    shard and the matching part of the full ``mask`` (cut locally by ``p``'s mesh and placements, no
    communication; a rank's shard may be empty)."""
    if not is_sharded(p):
        return p, mask
    from torch.distributed.tensor import distribute_tensor

    return p.to_local(), distribute_tensor(mask, p.device_mesh, p.placements, src_data_rank=None).to_local()


def refuse_sharded(model: nn.Module, what: str, instead: str) -> None:
    """``ValueError`` when ``model`` holds sharded (DTensor) parameters: ``what`` changes the model's structure,
    which FSDP2 has already split into shards."""
    if any(is_sharded(p) for p in unwrap(model).parameters()):
        raise ValueError(f"{what} on a model sharded with FSDP2 (its parameters are DTensors) is not supported: "
                         f"it changes the model's structure, which fully_shard has already split into shards. "
                         f"{instead} (see docs/scale.md)")


def _glob_to_regex(glob: str) -> str:
    out = []
    for part in re.split(r"(\*\*|\*|\?)", glob):
        if part == "**":
            out.append(r".*")
        elif part == "*":
            out.append(r"[^.]*")
        elif part == "?":
            out.append(r"[^.]")
        else:
            out.append(re.escape(part))
    return "".join(out)


def match_names(names: Iterable[str], pattern: Pattern) -> list[str]:
    names = list(names)
    if isinstance(pattern, re.Pattern):
        return [n for n in names if pattern.fullmatch(n)]
    if not isinstance(pattern, str):
        raise TypeError(f"module pattern must be a string or re.Pattern, got {type(pattern).__name__}")
    if pattern.startswith("re:"):
        rx = re.compile(pattern[3:])
        return [n for n in names if rx.fullmatch(n)]
    if pattern in names:
        return [pattern]
    if any(c in pattern for c in "*?"):
        rx = re.compile(_glob_to_regex(pattern))
        return [n for n in names if rx.fullmatch(n)]
    return []


def find_modules(model: nn.Module, pattern: Pattern, kind: str = "module") -> list[tuple[str, nn.Module]]:
    """``[(name, module)]`` matching ``pattern`` in ``model`` (DDP/compile wrappers are looked through).

    Raises :class:`UnknownModuleError` listing close names when nothing matches.
    """
    model = unwrap(model)
    modules = dict(model.named_modules())
    modules.pop("", None)
    hits = match_names(modules, pattern)
    if not hits:
        text = pattern.pattern if isinstance(pattern, re.Pattern) else str(pattern)
        probe = re.sub(r"\*+|\?", "0", text.removeprefix("re:"))
        close = difflib.get_close_matches(probe, list(modules), n=5, cutoff=0.4)
        hint = ("; close names: " + ", ".join(close)) if close else ""
        raise UnknownModuleError(f"no {kind} of {type(model).__name__} matches {text!r}{hint}")
    return [(n, modules[n]) for n in hits]


# ---------------------------------------------------------------- linear layers

def is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or _is_conv1d(m)


def _is_conv1d(m: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D: y = x @ W + b, W of shape (in, out)
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and isinstance(getattr(m, "weight", None), nn.Parameter)


def out_axis(m: nn.Module) -> int:
    """The weight axis indexing output units: 0 for nn.Linear, 1 for Conv1D."""
    if not is_linear(m):
        raise TypeError(f"{type(m).__name__} is not a linear layer (nn.Linear or HF Conv1D)")
    return 1 if _is_conv1d(m) else 0


def out_features(m: nn.Module) -> int:
    return m.weight.shape[out_axis(m)]


def in_features(m: nn.Module) -> int:
    return m.weight.shape[1 - out_axis(m)]


def linear_masks(m: nn.Module, out_units: torch.Tensor | None = None, in_units: torch.Tensor | None = None):
    """Bool masks ``(weight_mask, bias_mask)`` in the layer's own weight layout, True on the rows of
    ``out_units`` and on the columns of ``in_units`` (bool vectors). The bias belongs to out units.

    With only one of the two, the weight mask is that vector expanded to the weight's shape (a read-only
    view: memory of one row or column, not of the weight; what keeps the masks of a large model small).
    The shapes are the full ones, also for a sharded (DTensor) weight; the masks are plain tensors."""
    ax = out_axis(m)
    shape, dev = m.weight.shape, m.weight.device
    rows = None if out_units is None else (out_units.view(-1, 1) if ax == 0 else out_units.view(1, -1))
    cols = None if in_units is None else (in_units.view(1, -1) if ax == 0 else in_units.view(-1, 1))
    if rows is None and cols is None:
        w = torch.zeros(shape, dtype=torch.bool, device=dev)
    elif rows is None or cols is None:
        w = (rows if cols is None else cols).to(dev, torch.bool).expand(shape)
    else:
        w = (rows | cols).to(dev, torch.bool).expand(shape).contiguous()
    b = None
    if m.bias is not None:
        b = torch.zeros(m.bias.shape, dtype=torch.bool, device=dev) if out_units is None \
            else out_units.to(dev, torch.bool).clone()
    return w, b


@torch.no_grad()
def resize_linear(m: nn.Module, out_index: torch.Tensor | None = None, in_index: torch.Tensor | None = None,
                  add_out: int = 0, add_in: int = 0, init_std: float | None = None) -> None:
    """In place: keep ``out_index`` / ``in_index`` units (all when None), then append ``add_out``
    output units (random rows, zero bias) and ``add_in`` input units (zero columns, so the layer
    computes the same function on the old inputs)."""
    ax = out_axis(m)
    W = m.weight.data
    if out_index is not None:
        W = W.index_select(ax, out_index.to(W.device))
    if in_index is not None:
        W = W.index_select(1 - ax, in_index.to(W.device))
    std = float(W.std()) if init_std is None else init_std
    if add_out:
        shape = list(W.shape)
        shape[ax] = add_out
        W = torch.cat([W, torch.randn(shape, dtype=W.dtype, device=W.device) * std], dim=ax)
    if add_in:
        shape = list(W.shape)
        shape[1 - ax] = add_in
        W = torch.cat([W, W.new_zeros(shape)], dim=1 - ax)
    m.weight = nn.Parameter(W.contiguous(), requires_grad=m.weight.requires_grad)
    if m.bias is not None:
        b = m.bias.data
        if out_index is not None:
            b = b.index_select(0, out_index.to(b.device))
        if add_out:
            b = torch.cat([b, b.new_zeros(add_out)])
        m.bias = nn.Parameter(b.contiguous(), requires_grad=m.bias.requires_grad)
    if isinstance(m, nn.Linear):
        m.out_features, m.in_features = W.shape
    else:
        m.nf = W.shape[1]


# ---------------------------------------------------------------- MLP and attention blocks

_MLP_LAYOUTS = [  # (hidden-producing linears, hidden-reading linear)
    (("gate_proj", "up_proj"), "down_proj"),  # Llama, Mistral, Qwen
    (("c_fc",), "c_proj"),                    # GPT-2, ours
    (("fc1",), "fc2"),                        # OPT, BERT-likes, ViT
    (("fc_in",), "fc_out"),                   # GPT-J
    (("w1", "w3"), "w2"),                     # Mixtral experts
    (("dense_h_to_4h",), "dense_4h_to_h"),    # GPT-NeoX
]


@dataclass
class MLPParts:
    inputs: list[str]   # child names of the linears producing the hidden units
    output: str         # child name of the linear reading them
    n_units: int


def mlp_parts(mlp: nn.Module, name: str = "module") -> MLPParts:
    children = dict(mlp.named_children())
    for ins, out in _MLP_LAYOUTS:
        if all(c in children and is_linear(children[c]) for c in (*ins, out)):
            return MLPParts(list(ins), out, in_features(children[out]))
    known = ", ".join(f"{'+'.join(i)}->{o}" for i, o in _MLP_LAYOUTS)
    raise TypeError(f"{name} ({type(mlp).__name__}) is not a recognised MLP; expected children {known}")


@dataclass
class AttentionParts:
    q: str | None          # separate projections (None when fused)
    k: str | None
    v: str | None
    qkv: str | None        # GPT-2's fused c_attn
    o: str
    head_dim: int
    n_heads: int
    n_kv_heads: int


def attention_parts(attn: nn.Module, name: str = "module") -> AttentionParts:
    children = dict(attn.named_children())
    head_dim = getattr(attn, "head_dim", None)
    if head_dim is None:
        raise TypeError(f"{name} ({type(attn).__name__}) has no head_dim attribute; cannot find its heads")
    if all(c in children for c in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return AttentionParts("q_proj", "k_proj", "v_proj", None, "o_proj", head_dim,
                              out_features(children["q_proj"]) // head_dim,
                              out_features(children["k_proj"]) // head_dim)
    if "c_attn" in children and "c_proj" in children and hasattr(attn, "split_size"):
        if getattr(attn, "is_cross_attention", False):
            raise TypeError(f"{name}: cross-attention surgery is not supported")
        n = out_features(children["c_attn"]) // 3 // head_dim
        return AttentionParts(None, None, None, "c_attn", "c_proj", head_dim, n, n)
    raise TypeError(f"{name} ({type(attn).__name__}) is not a recognised attention block; expected "
                    "q_proj/k_proj/v_proj/o_proj (Llama-style) or c_attn/c_proj (GPT-2)")
