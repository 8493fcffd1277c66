"""Keyed modules (ours; the paper's modules are gateless): module ``k`` runs at a position only once one of
its key tokens has occurred in the sequence. The gate is a fixed 0/1 function of the token ids, with no
parameters. :func:`key_gates` is the pure rule; :class:`KeyGates` takes the token ids of each forward of a
model and hands the gates to the module hooks."""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

KEY_RULES = ("first", "majority")


def token_ids(what: str, given: Mapping, domains: list[str], vocab: int) -> dict:
    """``{domain: sorted unique LongTensor}`` from a ``{domain: token ids}`` mapping covering every domain
    (``ids``: a 1-d int sequence or a ``(vocab,)`` bool mask); ``what`` names the option in errors."""
    if not isinstance(given, Mapping):
        raise TypeError(f"{what} must be a {{domain: token ids}} mapping, got {type(given).__name__}")
    unknown = [d for d in given if d not in domains]
    if unknown:
        raise ValueError(f"{what}: unknown domain(s) {unknown}; domains: {', '.join(domains)}")
    missing = [d for d in domains if d not in given]
    if missing:
        raise ValueError(f"{what}: no token ids for domain(s) {missing} (give every domain its ids)")
    out = {}
    for d in domains:
        ids = torch.as_tensor(given[d])
        if ids.numel() == 0:
            raise ValueError(f"{what}[{d!r}]: no token ids (empty); give at least one")
        if ids.dtype == torch.bool:
            if ids.shape != (vocab,):
                raise ValueError(f"{what}[{d!r}]: a bool mask must have shape ({vocab},), got {tuple(ids.shape)}")
            ids = ids.nonzero().flatten()
        elif ids.dtype.is_floating_point or ids.dtype.is_complex or ids.ndim != 1:
            raise TypeError(f"{what}[{d!r}]: token ids must be a 1-d sequence of ints (or a bool mask), got "
                            f"dtype {ids.dtype}, shape {tuple(ids.shape)}")
        if ids.numel() == 0:
            raise ValueError(f"{what}[{d!r}]: no token ids (an all-False mask); give at least one")
        bad = (ids < 0) | (ids >= vocab)
        if bad.any():
            raise ValueError(f"{what}[{d!r}]: token ids out of range [0, {vocab}): "
                             f"{sorted(set(ids[bad].tolist()))[:10]}")
        out[d] = torch.unique(ids.long().cpu())          # sorted
    return out


def key_gates(keymask: torch.Tensor, idx: torch.Tensor, rule: str = "first") -> torch.Tensor:
    """``(K, *idx.shape)`` bool gates at each position ``t`` (``keymask``: ``(K, vocab)`` bool, domain ``k``'s
    keys; ``idx``: token ids, time last, -1 for no token). ``"first"``: open where one of domain ``k``'s keys
    occurs among tokens ``0..t``; ``"majority"``: open where domain ``k`` has at least one key among them and
    no domain has more."""
    idx = idx.long()
    keymask = keymask.to(idx.device)
    hit = keymask[:, idx.clamp(min=0)] & (idx >= 0)                 # (K, *idx.shape)
    if rule == "first":
        return hit.int().cummax(-1).values.bool()
    counts = hit.int().cumsum(-1)
    return (counts > 0) & (counts == counts.max(0, keepdim=True).values)


def cached_past(kwargs: Mapping) -> bool:
    """Whether a Hugging Face forward continues a sequence from a key/value cache (earlier tokens not given)."""
    pos = kwargs.get("cache_position")
    if isinstance(pos, torch.Tensor) and pos.numel() and int(pos.reshape(-1)[0]) > 0:
        return True
    for name in ("past_key_values", "cache", "past_key_value"):
        past = kwargs.get(name)
        if past is None:
            continue
        length = getattr(past, "get_seq_length", None)
        if callable(length):
            if int(length()) > 0:
                return True
        elif isinstance(past, (tuple, list)) and len(past) and past[0] is not None and len(past[0]) \
                and isinstance(past[0][0], torch.Tensor) and past[0][0].shape[-2] > 0:
            return True
    return False


class KeyGates:
    """The key gates of each forward of ``root``: hooks on the model take its token ids (``idx`` / ``input_ids``,
    first argument or keyword; positions where a given ``attention_mask`` is 0 hold no key) and :meth:`on`
    returns the ``(K, B, T, 1)`` gates, computed once per forward. A forward continuing from a key/value cache
    is refused (the gates depend on every earlier token)."""

    def __init__(self, root: nn.Module, keys: dict, domains: list[str], vocab: int, rule: str = "first"):
        if rule not in KEY_RULES:
            raise ValueError(f"key_rule must be one of {KEY_RULES}, got {rule!r}")
        self.keys, self.rule = keys, rule
        dev = next(root.parameters()).device
        self.keymask = torch.zeros(len(domains), vocab, dtype=torch.bool, device=dev)
        for k, d in enumerate(domains):
            self.keymask[k, keys[d].to(dev)] = True
        self._idx = None                # the token ids of this forward
        self._pad = None                # (B, T) True at padded positions (attention_mask 0) or None
        self._gates = None              # (K, B, T, 1) 0/1 of this forward, computed at the first block
        self._done = False              # this forward has ended (also when it raised)
        # after the forward its gates serve only a recomputation in backward (activation checkpointing):
        # an MLP called on its own later must not reuse them. Plain functions, not bound methods.
        self.hooks = [root.register_forward_pre_hook(lambda m, a, k: self._take(a, k), with_kwargs=True),
                      root.register_forward_hook(lambda m, a, o: self._end(), always_call=True)]

    def gates(self, idx: torch.Tensor) -> torch.Tensor:
        return key_gates(self.keymask, idx, self.rule)

    def _take(self, args, kwargs):
        self._gates = None
        self._idx = None
        self._done = False
        if cached_past(kwargs):
            raise ValueError("keyed modules need the whole sequence in every forward (a module's gate depends on "
                             "every earlier token): call the model without a key/value cache (generate(..., "
                             "use_cache=False))")
        idx = args[0] if args else kwargs.get("idx", kwargs.get("input_ids"))
        mask = kwargs.get("attention_mask")
        if idx is not None and isinstance(mask, torch.Tensor) and mask.shape == idx.shape:
            self._pad = mask == 0            # padded positions: a key there opens no gate
        else:
            self._pad = None
        self._idx = idx

    def _end(self):
        self._done = True

    def on(self, x: torch.Tensor) -> torch.Tensor:
        """The gates of this forward as ``(K, B, T, 1)`` in ``x``'s dtype (``x``: an activation ``(B, T, d)``)."""
        if self._done and torch._C._current_graph_task_id() == -1:
            # not a recomputation in backward: an MLP called outside a model forward
            raise RuntimeError("keyed modules need the token ids: call the model with them (idx / input_ids as the "
                               "first argument or keyword); an MLP called on its own has no token ids")
        if self._gates is None:
            idx = self._idx
            if idx is None:
                raise RuntimeError("keyed modules need the token ids: call the model with them (idx / input_ids "
                                   "as the first argument or keyword), not with embeddings")
            if idx.shape != x.shape[:-1]:
                raise ValueError(f"keyed modules: token ids of shape {tuple(idx.shape)} do not match an MLP input "
                                 f"of shape {tuple(x.shape)}")
            if self._pad is not None:                  # ids at padded positions count as no key
                idx = idx.masked_fill(self._pad.to(idx.device), -1)
            self._gates = self.gates(idx).unsqueeze(-1)
        return self._gates.to(x.device, x.dtype)
