"""Module routing: per-domain auxiliary MLPs that can be switched off (GRAM, arXiv 2607.08077).

Every MLP matching a pattern gets one small gateless auxiliary MLP per *domain*, parallel to
it (input -> ``up`` -> the MLP's activation -> ``down`` -> added to the MLP's output). ``down``
starts at zero, so adding modules leaves the model's function unchanged (bit for bit). Then,
per example of a mixed batch, a *forward mask* says which modules run and a *backward mask*
which parameters learn:

==================  ===========================  ===========================================
label               forward (runs)               backward (learns)
==================  ===========================  ===========================================
domain ``k``        core + module ``k``          module ``k``; the core too with prob. 1 - p_cr
``GENERAL`` (-2)    core (+ one random module    core (+ that module)
                    with probability ``p_as``)
``UNLABELLED`` (-1) core + every module          everything
==================  ===========================  ===========================================

Option (ours, default off): ``p_other`` lets each *other* module also run on a domain-``k``
example with that probability, without learning from it (:meth:`ModuleSet.masks`).
Option (ours, default off): ``always_learn`` names core parameters that are *not* frozen with
the core: they learn on every routed example, core-frozen domain examples included (e.g. the
token embedding, tied unembedding included: ``always_learn=["transformer.wte.weight"]``). The
official code freezes embeddings with the core; this option tests that choice.
Option (ours, default off): ``gated=True`` multiplies each module's output by a learned per-token gate
``sigmoid(gate(x))`` (``gate`` a ``Linear(d_in, 1)``, zero at start; with embedding deltas also the delta's
logit term, by the module's gate in the last block); a gated module cannot be merged by ``export``.
Option (ours, default off): ``keys={domain: token ids}`` gates each domain's modules by the context's
words: at position ``t`` of a sequence module ``k`` runs only if one of its key tokens occurs among tokens
``0..t`` (a causal 0/1 gate, no parameters; with embedding deltas also the delta's logit term), so on
text without its keys a module that is switched on changes nothing. A keyed module cannot be merged by
``export``; its embedding delta is gated too (input and output: it acts only where the gate is open).
Every forward must see the whole sequence: a Hugging Face forward continuing from a key/value cache is
refused (``generate(..., use_cache=False)``); a token where ``attention_mask`` is 0 (padding) is no key.
Option (ours, default off; our GPT, tied embeddings): ``embed_delta=True`` gives each domain's
module its own token-embedding delta ``D_k`` (``(vocab, d_model)``, zero at start), added to the
tied token embedding on the input (``wte[x] + sum_k D_k[x]``) and on the output (``logits + h
D_k^T``) for exactly the examples on which module ``k`` runs, and learning exactly where module
``k`` learns (the same forward and backward masks and owner as its MLPs). Switching the module
off removes its delta; ``export(on=...)`` adds the kept deltas into ``wte`` (exact up to float
summation order, since the embedding is tied). ``embed_delta={domain: token ids}`` restricts each
domain's delta to those rows of the vocabulary: stored as an ``(n_rows, d_model)`` parameter plus
an index buffer ``rows``; the other rows of that domain's delta are zero and have no parameter.

"Core" is every parameter that is not in a module (embeddings, attention, norms, the MLPs).
At inference any subset of modules is switched on or off (float strengths allowed), so K
modules give 2**K access profiles from one training run.

    mods = gr.add_modules(model, "transformer.h.*.mlp", ["forest", "sea", "space", "dinosaurs"])
    opt = torch.optim.AdamW(model.parameters(), weight_decay=0.1)   # after add_modules
    with mods.route(labels, p_cr=1.0, p_as=0.25, generator=g):      # labels: (B,) ints
        model(x, y)[1].backward()
    opt.step()                                                      # isolation: see below
    with mods.using(off=["forest"]):                                # an access profile
        model(x)
    stock = mods.export(on={"sea": 1.0})   # a plain model: "sea" merged into the MLPs, rest dropped

Isolation under real optimizers. A parameter that did not learn on a step must not move at
all. Zeroed gradients or lr = 0 are not enough: AdamW's moments, its step count and weight
decay still move it. While a :class:`ModuleSet` is attached, a global optimizer step pre-hook
(``torch.optim.optimizer.register_optimizer_step_pre_hook``) runs before every
``optimizer.step()`` of an optimizer holding this model's parameters, after a routed forward:
it sets ``.grad = None`` on every parameter whose owner (the core or a module) had no example
learning it since the previous step, and torch optimizers skip parameters without a gradient
entirely (no moment update, no step count, no weight decay). Under DistributedDataParallel the
per-owner "learned" flags are all-reduced (max) first, so every rank steps the same owners; the
modules run on every example (multiplied by a 0 forward mask when off), so every parameter is
in each rank's graph and DDP's buckets complete. Gradients of an owner that did not learn are
exactly zero before they are dropped, so gradient clipping is unaffected. Flags accumulate over
micro-batches until the next step (gradient accumulation; forwards under ``no_grad`` record
nothing); use ``zero_grad(set_to_none=True)``. The owners are the core (as one) and each module.

Core freezing per example reuses :class:`gradroute.ParamRouter` (core-frozen examples update
only the module parameters, gradient still flows through the core to earlier modules).

Merging ("module on" export) is exact in exact arithmetic, and equal up to float rounding,
when: the MLP is not gated (``c_fc``/``c_proj`` style: a gateless module cannot be written as
extra units of ``down(act(gate(x)) * up(x))``), the MLP computes ``reader(act(input(x)))`` (plus
dropout: equal in eval mode or with dropout 0), and the core forward strength is 1. The module's
``up`` has a bias exactly when the MLP's input linear does and ``down`` has none, so merging is
pure width concatenation (a float strength ``s`` scales the merged ``down`` columns). Other
cases raise ``ValueError``.
"""
from __future__ import annotations

import contextlib
import copy
import weakref
from typing import Iterable, Mapping, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .adapters import Pattern, find_modules, in_features, mlp_parts, out_axis, out_features, unwrap
from .params import ParamRouter, unknown_parameter

UNLABELLED = -1
GENERAL = -2
KEY_RULES = ("first", "majority")
CONTAINER = "aux_modules"          # attribute of each MLP holding its modules (an nn.ModuleDict)
EMBED_CONTAINER = "aux_embed"      # attribute of the model holding the embedding deltas (embed_delta=True)
_ACT_NAMES = ("act", "act_fn", "activation_fn", "activation")

Strengths = Union[Mapping[str, float], Sequence[str], None]


class AuxMLP(nn.Module):
    """One auxiliary MLP: ``down(act(up(x)))``. ``down`` has no bias and starts at 0. With
    ``gated`` (ours; the paper's modules are gateless) also a per-token gate ``sigmoid(gate(x))``
    (``gate``: ``Linear(d_in, 1)``, weight and bias 0 at start, i.e. 0.5 everywhere) multiplying the
    output; the function is still unchanged at start because ``down`` is 0."""

    def __init__(self, d_in: int, width: int, d_out: int, act, bias: bool, init_std: float,
                 dtype=None, device=None, gated: bool = False):
        super().__init__()
        self.up = nn.Linear(d_in, width, bias=bias, dtype=dtype, device=device)
        self.down = nn.Linear(width, d_out, bias=False, dtype=dtype, device=device)
        with torch.no_grad():
            self.up.weight.normal_(0.0, init_std)
            if bias:
                self.up.bias.zero_()
            self.down.weight.zero_()
        self.gate = None
        if gated:
            self.gate = nn.Linear(d_in, 1, dtype=dtype, device=device)
            with torch.no_grad():
                self.gate.weight.zero_()
                self.gate.bias.zero_()
        self.__dict__["act"] = act      # shared with the core MLP, not registered as a child

    def gate_value(self, x: torch.Tensor, learn: torch.Tensor | None = None) -> torch.Tensor:
        """The gate ``sigmoid(gate(x))``, shape ``(..., 1)`` (``learn`` as in :meth:`forward`)."""
        if learn is None:
            return torch.sigmoid(F.linear(x, self.gate.weight, self.gate.bias))
        return torch.sigmoid(_masked_linear(x, self.gate.weight, self.gate.bias, learn))

    def forward(self, x: torch.Tensor, learn: torch.Tensor | None = None,
                g: torch.Tensor | None = None) -> torch.Tensor:
        """``learn``: optional per-example float 0/1 of shape ``(B, 1, ..., 1)``: rows with 0 run
        but do not update this module's parameters (gradient still flows to ``x``). ``g``: the
        gate's value when already computed (gated modules), or a key gate (keyed modules)."""
        if learn is None:
            y = F.linear(self.act(F.linear(x, self.up.weight, self.up.bias)), self.down.weight)
        else:
            h = _masked_linear(x, self.up.weight, self.up.bias, learn)
            y = _masked_linear(self.act(h), self.down.weight, None, learn)
        if g is not None:
            return y * g
        if self.gate is None:
            return y
        return y * self.gate_value(x, learn)


class EmbedDelta(nn.Module):
    """One domain's token-embedding delta, zero at start (a leaf module; the hooks of
    :class:`ModuleSet` read it directly): ``weight`` ``(vocab, d_model)`` for every row
    (``rows=None``), or ``(len(rows), d_model)`` for the token ids in the buffer ``rows`` (sorted,
    unique; the delta of every other row is zero)."""

    def __init__(self, vocab: int, d_model: int, rows: torch.Tensor | None = None, dtype=None, device=None):
        super().__init__()
        n = vocab if rows is None else rows.numel()
        self.weight = nn.Parameter(torch.zeros(n, d_model, dtype=dtype, device=device))
        # None is not in the state dict: a full-vocabulary delta's checkpoint keys are unchanged
        self.register_buffer("rows", None if rows is None else rows.to(device=device, dtype=torch.long))


def _masked_linear(x, W, b, m):
    """``x W^T + b`` whose weight gradient counts only rows with ``m == 1`` (``m`` 0/1 float of
    shape (B, 1, .., 1)); the value and the gradient to ``x`` are those of a plain linear."""
    y = F.linear(x * m, W) + F.linear(x * (1 - m), W.detach())
    if b is not None:
        y = y + (m * b + (1 - m) * b.detach())
    return y


def _activation(mlp: nn.Module, name: str):
    for a in _ACT_NAMES:
        act = getattr(mlp, a, None)
        if act is not None and callable(act):
            return act
    raise TypeError(f"{name} ({type(mlp).__name__}) has no activation attribute ({', '.join(_ACT_NAMES)}); "
                    "pass activation= to add_modules()")


def _check_domain_name(d) -> str:
    if not isinstance(d, str) or not d or not d.replace("_", "").isalnum() or d[0].isdigit():
        raise ValueError(f"domain names must be identifiers (letters, digits, _; not starting with a digit), "
                         f"got {d!r}")
    return d


def _check_embed_delta(root: nn.Module, embed_delta, domains: list[str]) -> dict | None:
    """``embed_delta`` as ``{domain: sorted unique LongTensor of rows}`` (a mapping) or ``None``
    (``True``: every row); raises for models it cannot serve and for bad rows."""
    from .models import GPT

    if not isinstance(root, GPT):
        # the input delta needs the token ids (GPT.forward's idx); other models (e.g. Hugging Face,
        # called with input_ids= or inputs_embeds=) would silently get only the output delta
        raise ValueError(f"embed_delta needs a gradroute.models.GPT (token ids as forward's idx, tied "
                         f"transformer.wte / lm_head); got {type(root).__name__}")
    if root.lm_head.weight is not root.transformer.wte.weight:
        raise ValueError("embed_delta needs tied embeddings (lm_head.weight is transformer.wte.weight; "
                         "GPTConfig(tie_embeddings=True))")
    if hasattr(root, EMBED_CONTAINER):
        raise ValueError(f"the model already has {EMBED_CONTAINER}; remove() the other ModuleSet first")
    if embed_delta is True:
        return None
    if not isinstance(embed_delta, Mapping):
        raise TypeError(f"embed_delta must be True/False or a {{domain: token ids}} mapping, got "
                        f"{type(embed_delta).__name__}")
    return _domain_ids("embed_delta", embed_delta, domains, root.transformer.wte.weight.shape[0])


def _domain_ids(what: str, given: Mapping, domains: list[str], vocab: int) -> dict:
    """``{domain: sorted unique LongTensor}`` from a ``{domain: token ids}`` mapping covering every
    domain (``ids``: a 1-d int sequence or a ``(vocab,)`` bool mask); ``what`` names the option."""
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


def _vocab_size(root: nn.Module) -> int:
    """The number of token ids of ``root``'s input embedding (our GPT or a Hugging Face model)."""
    get = getattr(root, "get_input_embeddings", None)
    emb = get() if callable(get) else getattr(getattr(root, "transformer", None), "wte", None)
    if not isinstance(emb, nn.Embedding):
        raise ValueError(f"keys needs a token-embedding model (a gradroute GPT or a Hugging Face model with "
                         f"get_input_embeddings()); got {type(root).__name__}")
    return emb.num_embeddings


def _cached_past(kwargs: Mapping) -> bool:
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


def _check_always_learn(names: Iterable[str], named: dict) -> list[str]:
    """``always_learn`` as a list of core parameter names of ``named`` (the model before modules)."""
    names = [names] if isinstance(names, str) else list(names)
    for n in names:
        parts = str(n).split(".")
        if CONTAINER in parts or parts[0] == EMBED_CONTAINER:
            raise ValueError(f"always_learn: {n} is a module parameter; name core parameters only")
        if n not in named:
            raise unknown_parameter("always_learn", n, named)
    return names


class ModuleSet:
    """Per-domain modules attached to the MLPs of ``model`` matching ``pattern`` (see module doc).

    ``domains``: names (identifiers) or a count ``K`` (names ``d0 .. d{K-1}``). ``width``: a float
    (fraction of each MLP's hidden width, rounded, at least 1) or an int (units per module).
    ``activation``: the modules' activation (default: the MLP's own, needed for merging).
    ``init_std``: std of ``up`` (default: that of the MLP's input weights). ``sync``: all-reduce
    the learned flags before a step (default: when ``torch.distributed`` runs with > 1 process).
    ``always_learn``: names of core parameters (``model.named_parameters()``; a tied weight under
    any of its names) that learn on every routed example, core-frozen ones included; default
    none (the official schedule: the whole core, embeddings included, is frozen).
    ``embed_delta``: also give each domain a token-embedding delta switched and trained with its
    modules (see the module doc; a :class:`gradroute.models.GPT` with ``transformer.wte`` tied
    with ``lm_head`` only: other models raise ``ValueError``); default off. ``True``: a
    ``(vocab, d_model)`` delta per domain; ``{domain: token ids}`` (every domain; ids a 1-d int
    sequence or a ``(vocab,)`` bool mask): each domain's delta covers only its rows, stored as an
    ``(n_rows, d_model)`` parameter and a ``rows`` buffer. A refused option raises before the model
    is changed.
    ``keys`` (ours; default none): ``{domain: token ids}`` for every domain (ids as for ``embed_delta``):
    module ``k`` (its MLPs in every block, and its delta's logit term) is multiplied at each position by
    a 0/1 gate, open from the first of its keys in the sequence on (:meth:`key_gates`); the model must
    be called with token ids, the whole sequence in each forward (no key/value cache; positions where a
    given ``attention_mask`` is 0 hold no key). ``key_rule="majority"``: open only while no other domain
    has more of its keys so far (a story that mentions another domain's word once keeps its own module).
    Not with ``gated``; with ``embed_delta`` the input delta is gated the same way.

    Add modules before building the optimizer and before wrapping the model in DDP.
    """

    def __init__(self, model: nn.Module, pattern: Pattern, domains: Union[int, Sequence[str]],
                 width: Union[float, int] = 0.1, activation=None, init_std: float | None = None,
                 sync: bool | None = None, always_learn: Iterable[str] = (),
                 embed_delta: Union[bool, Mapping[str, object]] = False, gated: bool = False,
                 keys: Mapping[str, object] | None = None, key_rule: str = "first"):
        root = unwrap(model)
        if key_rule not in KEY_RULES:
            raise ValueError(f"key_rule must be one of {KEY_RULES}, got {key_rule!r}")
        if not isinstance(gated, bool):
            raise TypeError(f"gated must be True or False, got {gated!r}")
        if keys is not None and gated:
            raise ValueError("keys and gated are two kinds of gate: pass one of them")
        if keys is not None and not isinstance(keys, Mapping):
            raise TypeError(f"keys must be a {{domain: token ids}} mapping, got {type(keys).__name__}")
        if isinstance(domains, int):
            if domains < 1:
                raise ValueError(f"need at least one domain, got {domains}")
            domains = [f"d{i}" for i in range(domains)]
        domains = [_check_domain_name(d) for d in domains]
        if not domains:
            raise ValueError("need at least one domain")
        if len(set(domains)) != len(domains):
            raise ValueError(f"domain names repeat: {domains}")
        if isinstance(width, bool) or not isinstance(width, (int, float)) or width <= 0:
            raise ValueError(f"width must be a positive fraction (float) or unit count (int), got {width!r}")
        # the new options are checked before the model is changed: a refused call leaves it as it was
        embed_rows = (False if embed_delta is None or embed_delta is False     # False: no deltas
                      else _check_embed_delta(root, embed_delta, list(domains)))
        V = None if keys is None else _vocab_size(root)
        key_ids = None if keys is None else _domain_ids("keys", keys, list(domains), V)
        named = dict(root.named_parameters(remove_duplicate=False))
        always_learn = _check_always_learn(always_learn, named)
        self.model, self.domains, self.sync = root, list(domains), sync
        self.K = len(domains)
        self.blocks: list[tuple[str, nn.Module]] = []
        self._hooks = []
        for name, mlp in find_modules(root, pattern, kind="MLP"):
            if hasattr(mlp, CONTAINER):
                raise ValueError(f"{name} already has modules; remove() them first")
            parts = mlp_parts(mlp, name)
            first = getattr(mlp, parts.inputs[0])
            reader = getattr(mlp, parts.output)
            d_in, d_out, n = in_features(first), out_features(reader), parts.n_units
            w = int(width) if isinstance(width, int) else max(1, round(width * n))
            act = activation if activation is not None else _activation(mlp, name)
            std = float(first.weight.detach().float().std()) if init_std is None else init_std
            ref = first.weight
            bias = first.bias is not None
            mlp.add_module(CONTAINER, nn.ModuleDict(
                {d: AuxMLP(d_in, w, d_out, act, bias, std, dtype=ref.dtype, device=ref.device, gated=gated)
                 for d in domains}))
            self._hooks.append(mlp.register_forward_hook(self._make_hook(name), with_kwargs=True))
            self.blocks.append((name, mlp))
        self.width = {name: getattr(mlp, CONTAINER)[domains[0]].up.out_features for name, mlp in self.blocks}
        self.embed_delta = embed_rows is not False
        self.gated = gated
        self.keys = key_ids                     # {domain: key token ids} (keyed modules) or None
        self.key_rule = key_rule
        self._gates: dict = {}                  # {k: gate of module k in the last block} of this forward
        self._key_hooks = []
        if key_ids is not None:
            dev = next(root.parameters()).device
            self._keymask = torch.zeros(self.K, V, dtype=torch.bool, device=dev)
            for k, d in enumerate(self.domains):
                self._keymask[k, key_ids[d].to(dev)] = True
            self._key_idx = None                # the token ids of this forward
            self._key_pad = None                # (B, T) True at padded positions (attention_mask 0) or None
            self._key_gates = None              # (K, B, T, 1) 0/1 of this forward, computed at the first block
            self._key_done = False              # this forward has ended (also when it raised)
            # after the forward its gates serve only a recomputation in backward (activation checkpointing):
            # an MLP called on its own later must not reuse them
            self._key_hooks = [root.register_forward_pre_hook(lambda m, a, k: self._take_key_ids(a, k),
                                                              with_kwargs=True),
                               root.register_forward_hook(lambda m, a, o: self._end_key_forward(), always_call=True)]
        self._embed_hooks = []
        self._layouts: dict = {}
        self._layout_rows: list = []            # the rows tensors of the cached layout (keeps their ids)
        if self.embed_delta:
            wte, head, drop = root.transformer.wte, root.lm_head, root.transformer.drop
            w = wte.weight
            root.add_module(EMBED_CONTAINER, nn.ModuleDict(
                {d: EmbedDelta(w.shape[0], w.shape[1], None if embed_rows is None else embed_rows[d],
                               dtype=w.dtype, device=w.device) for d in domains}))
            # the input delta is added to the embedding sum where it enters transformer.drop (the token
            # ids are taken from the model's input), not in a hook on wte: parameter routing re-enters
            # wte through functional_call on core-frozen rows, which would run such a hook twice
            self._idx = None
            self._delta = False                    # False: not computed in this forward
            # plain functions, not bound methods: copy.deepcopy (export) would copy this ModuleSet
            self._embed_hooks = [root.register_forward_pre_hook(lambda m, a, k: self._take_ids(m, a, k),
                                                                with_kwargs=True),
                                 drop.register_forward_pre_hook(lambda m, a: self._embed_in_hook(m, a)),
                                 head.register_forward_hook(lambda m, a, o: self._embed_out_hook(m, a, o))]
        self._aux_ids = {id(p) for p in self.module_params()}
        self._all_ids = {id(p) for p in root.parameters()}
        self.always_learn: list[str] = always_learn
        self._free_ids = {id(named[n]) for n in always_learn}
        self._free_pending = False               # an always-learn parameter learned since the last step
        self.mask = torch.ones(1 + self.K)      # inference strengths: [core MLP, module 0, ...]
        self._route: dict | None = None
        self._pending: torch.Tensor | None = None    # learned flags (1 + K) since the last step
        self._router = None
        ref = weakref.ref(self)

        def pre_step(optimizer, args, kwargs):
            me = ref()
            if me is not None:
                me._before_step(optimizer)
        self._step_hook = register_optimizer_step_pre_hook(pre_step)

    # ------------------------------------------------------------------ parameters
    def index(self, domain: Union[str, int]) -> int:
        if isinstance(domain, int) and not isinstance(domain, bool):
            if not 0 <= domain < self.K:
                raise ValueError(f"domain index {domain} out of range [0, {self.K})")
            return domain
        if domain not in self.domains:
            raise ValueError(f"unknown domain {domain!r}; domains: {', '.join(self.domains)}")
        return self.domains.index(domain)

    def module_params(self, domain: Union[str, int, None] = None) -> list[nn.Parameter]:
        """Parameters of one domain's modules (every block; with ``embed_delta`` its embedding
        delta too), or of all modules (``None``)."""
        names = self.domains if domain is None else [self.domains[self.index(domain)]]
        out = [p for _, mlp in self.blocks for d in names for p in getattr(mlp, CONTAINER)[d].parameters()]
        if self.embed_delta:
            out += [getattr(self.model, EMBED_CONTAINER)[d].weight for d in names]
        return out

    def core_params(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if id(p) not in self._aux_ids]

    def num_params(self, domain: Union[str, int, None] = None) -> int:
        return sum(p.numel() for p in self.module_params(domain))

    # ------------------------------------------------------------------ inference switches
    def strengths(self, on: Strengths = None, off: Iterable[str] = (), core: float = 1.0) -> torch.Tensor:
        """A forward-mask vector ``[core, module 0, ...]``: ``on`` a list of domains (others 0),
        a ``{domain: strength}`` dict (others 0), or None (all 1); then ``off`` set to 0."""
        m = torch.zeros(1 + self.K)
        m[0] = core
        if on is None:
            m[1:] = 1.0
        elif isinstance(on, Mapping):
            for d, v in on.items():
                m[1 + self.index(d)] = float(v)
        else:
            if isinstance(on, str):
                raise TypeError("on= takes a list of domain names or a {name: strength} dict, not a string")
            for d in on:
                m[1 + self.index(d)] = 1.0
        for d in ([off] if isinstance(off, str) else off):
            m[1 + self.index(d)] = 0.0
        return m

    def set(self, on: Strengths = None, off: Iterable[str] = (), core: float = 1.0) -> None:
        """Switch modules on/off for every later forward pass outside :meth:`route`."""
        self.mask = self.strengths(on, off, core)

    @contextlib.contextmanager
    def using(self, on: Strengths = None, off: Iterable[str] = (), core: float = 1.0):
        """Temporarily switch modules (see :meth:`strengths`)."""
        old = self.mask
        self.mask = self.strengths(on, off, core)
        try:
            yield self
        finally:
            self.mask = old

    def configurations(self) -> list[tuple[str, ...]]:
        """All 2**K subsets of domains switched on, in binary order (none first, all last)."""
        return [tuple(d for i, d in enumerate(self.domains) if c >> i & 1) for c in range(2 ** self.K)]

    # ------------------------------------------------------------------ training
    def masks(self, labels: torch.Tensor, p_cr: float = 1.0, p_as: float = 0.0,
              generator: torch.Generator | None = None, spread: str = "one",
              p_other: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example ``(forward, learn)`` masks of shape ``(B, 1 + K)`` (column 0 the core) for
        ``labels``: domain index ``k`` in [0, K), :data:`GENERAL` (-2) or :data:`UNLABELLED` (-1).
        ``spread``: on general examples, ``"one"`` random module runs and learns with probability
        ``p_as`` (the official schedule), or ``"each"`` module independently with probability
        ``p_as`` (so modules also learn to coexist on general text).
        ``p_other`` (ours, not in the official schedule; default 0): on a domain-``k`` example each
        *other* module runs independently with probability ``p_other`` without learning from it
        (forward on, backward off), so module ``k`` and the core learn in its presence. With
        ``p_other = 0`` no extra random numbers are drawn: the masks and the generator's state are
        those of the schedule without it."""
        labels = torch.as_tensor(labels)
        if labels.ndim != 1:
            raise ValueError(f"labels must be one int per example, shape (B,), got {tuple(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"labels must be integers (domain index, -1 unlabelled, -2 general), got {labels.dtype}")
        bad = (labels >= self.K) | (labels < GENERAL)
        if bad.any():
            raise ValueError(f"labels must be in [0, {self.K}) or -1 (unlabelled) or -2 (general); got "
                             f"{sorted(set(labels[bad].tolist()))}")
        if spread not in ("one", "each"):
            raise ValueError(f"spread must be 'one' or 'each', got {spread!r}")
        for n, p in (("p_cr", p_cr), ("p_as", p_as), ("p_other", p_other)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{n} must be in [0, 1], got {p}")
        labels = labels.cpu().long()
        B = labels.numel()
        fwd = torch.zeros(B, 1 + self.K)
        learn = torch.zeros(B, 1 + self.K, dtype=torch.bool)
        fwd[:, 0] = 1.0
        u = torch.rand(B, generator=generator)
        pick = torch.randint(self.K, (B,), generator=generator)
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
            on = gen.view(-1, 1) & (torch.rand(B, self.K, generator=generator) < p_as)
            fwd[:, 1:][on] = 1.0
            learn[:, 1:][on] = True
        unl = labels == UNLABELLED
        fwd[unl] = 1.0
        learn[unl] = True
        if p_other > 0 and bool(dom.any()):
            # drawn last, and only when used, so that p_other = 0 leaves every other draw unchanged
            other = dom.view(-1, 1) & (torch.rand(B, self.K, generator=generator) < p_other)
            other[rows[dom], labels[dom]] = False        # the example's own module is already on
            fwd[:, 1:][other] = 1.0                       # runs; learn stays False for these
        return fwd, learn

    @contextlib.contextmanager
    def route(self, labels: torch.Tensor | None = None, *, p_cr: float = 1.0, p_as: float = 0.0,
              generator: torch.Generator | None = None, forward: torch.Tensor | None = None,
              learn: torch.Tensor | None = None, spread: str = "one", p_other: float = 0.0):
        """Context manager for a routed forward pass (backward may run inside or after it).

        Either ``labels`` (see :meth:`masks`) or explicit ``forward`` (float ``(B, 1 + K)``:
        strength of the core MLP and of each module per example) and ``learn`` (bool, same
        shape: which owners learn from each example; a module learns only where it runs).
        """
        if labels is not None:
            if forward is not None or learn is not None:
                raise ValueError("pass labels= or forward=/learn=, not both")
            forward, learn = self.masks(labels, p_cr, p_as, generator, spread, p_other)
        elif forward is None or learn is None:
            raise ValueError("route() needs labels= or both forward= and learn=")
        forward = torch.as_tensor(forward, dtype=torch.float32)
        learn = torch.as_tensor(learn).bool()
        if forward.shape != learn.shape or forward.ndim != 2 or forward.shape[1] != 1 + self.K:
            raise ValueError(f"forward {tuple(forward.shape)} and learn {tuple(learn.shape)} must both have "
                             f"shape (B, {1 + self.K}) (core, then one column per domain)")
        if self._route is not None:
            raise RuntimeError("route() contexts cannot be nested")
        if torch.is_grad_enabled():   # a routed forward under no_grad (evaluation) learns nothing
            flags = torch.cat([learn[:, :1].any(0), (learn[:, 1:] & (forward[:, 1:] != 0)).any(0)])
            self._pending = flags if self._pending is None else self._pending | flags
            self._free_pending = self._free_pending or (bool(self._free_ids) and forward.shape[0] > 0)
        frozen = ~learn[:, 0]
        self._route = {"forward": forward, "learn": learn, "cache": {}}
        try:
            if frozen.any():
                if self._router is None:
                    region = {}
                    names = {id(p): n for n, p in self.model.named_parameters()}
                    for p in self.module_params():
                        region[names[id(p)]] = torch.ones_like(p, dtype=torch.bool)
                    for n in self.always_learn:      # learns on core-frozen examples too
                        region[n] = torch.ones((), dtype=torch.bool)
                    self._router = ParamRouter(self.model, region)
                with self._router(forget=frozen):
                    yield self
            else:
                yield self
        finally:
            self._route = None

    def _masks_on(self, x: torch.Tensor):
        """(forward strengths, module learn masks) on ``x``'s device, shaped for ``x``."""
        r = self._route
        key = (str(x.device), x.dtype, x.ndim)
        if key not in r["cache"]:
            B = r["forward"].shape[0]
            if x.shape[0] != B:
                raise ValueError(f"routed batch has {B} examples but an MLP received input of shape "
                                 f"{tuple(x.shape)}")
            shape = (B, *([1] * (x.ndim - 1)))
            fwd = [r["forward"][:, i].to(x.device, x.dtype).view(shape) for i in range(1 + self.K)]
            lrn = []
            for k in range(self.K):
                col = r["learn"][:, 1 + k] | (r["forward"][:, 1 + k] == 0)   # where it runs, does it learn?
                lrn.append(None if bool(col.all()) else col.to(x.device, x.dtype).view(shape))
            r["cache"][key] = (fwd, lrn)
        return r["cache"][key]

    def _make_hook(self, name: str):
        def hook(mlp, args, kwargs, out):
            mods = getattr(mlp, CONTAINER, None)
            if mods is None:
                return out
            x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
            if x is None:
                raise TypeError(f"module routing: cannot find the input of {name}")
            if self._route is not None:
                fwd, lrn = self._masks_on(x)
                y = out if bool((self._route["forward"][:, 0] == 1).all()) else out * fwd[0]
                for k, d in enumerate(self.domains):
                    # every module runs on every example (times 0 when off): DDP needs all parameters
                    g = self._gate(name, k, mods[d], x, lrn[k])
                    y = y + fwd[1 + k] * mods[d](x, lrn[k], g)
                return y
            m = self.mask
            y = out if float(m[0]) == 1.0 else out * float(m[0])
            grad = torch.is_grad_enabled()
            for k, d in enumerate(self.domains):
                s = float(m[1 + k])
                if s == 0.0 and not grad:
                    continue                      # inference: an off module costs nothing
                g = self._gate(name, k, mods[d], x, None)
                y = y + (mods[d](x, None, g) if s == 1.0 else s * mods[d](x, None, g))
            return y
        return hook

    def _gate(self, name: str, k: int, mod: AuxMLP, x: torch.Tensor, learn) -> torch.Tensor | None:
        """Gated or keyed modules: module ``k``'s gate on ``x``; in the last block it is kept for the
        embedding delta's logit term of this forward (``_embed_out_hook``)."""
        if self.keys is not None:
            g = self._key_gate(x)[k]
        elif not self.gated:
            return None
        else:
            g = mod.gate_value(x, learn)
        if self.embed_delta and name == self.blocks[-1][0]:
            self._gates[k] = g
        return g

    def _take_key_ids(self, args, kwargs):
        self._key_gates = None
        self._key_idx = None
        self._key_done = False
        if _cached_past(kwargs):
            raise ValueError("keyed modules need the whole sequence in every forward (a module's gate depends on "
                             "every earlier token): call the model without a key/value cache (generate(..., "
                             "use_cache=False))")
        idx = args[0] if args else kwargs.get("idx", kwargs.get("input_ids"))
        mask = kwargs.get("attention_mask")
        if idx is not None and isinstance(mask, torch.Tensor) and mask.shape == idx.shape:
            self._key_pad = mask == 0            # padded positions: a key there opens no gate
        else:
            self._key_pad = None
        self._key_idx = idx

    def _end_key_forward(self):
        self._key_done = True

    def key_gates(self, idx: torch.Tensor) -> torch.Tensor:
        """Keyed modules: ``(K, *idx.shape)`` bool gates at each position ``t`` (``idx``: token ids, time
        last). ``key_rule="first"``: open where one of domain ``k``'s keys occurs among tokens ``0..t``;
        ``"majority"``: open where domain ``k`` has at least one key among them and no domain has more."""
        if self.keys is None:
            raise ValueError("key_gates: these modules have no keys (add_modules(..., keys=...))")
        idx = idx.long()
        keymask = self._keymask.to(idx.device)
        hit = keymask[:, idx.clamp(min=0)] & (idx >= 0)                 # (K, *idx.shape); -1: no token
        if self.key_rule == "first":
            return hit.int().cummax(-1).values.bool()
        counts = hit.int().cumsum(-1)
        return (counts > 0) & (counts == counts.max(0, keepdim=True).values)

    def _key_gate(self, x: torch.Tensor) -> torch.Tensor:
        """The key gates of this forward as ``(K, B, T, 1)`` in ``x``'s dtype (computed once per forward)."""
        if self._key_done and torch._C._current_graph_task_id() == -1:
            # not a recomputation in backward: an MLP called outside a model forward
            raise RuntimeError("keyed modules need the token ids: call the model with them (idx / input_ids as the "
                               "first argument or keyword); an MLP called on its own has no token ids")
        if self._key_gates is None:
            idx = self._key_idx
            if idx is None:
                raise RuntimeError("keyed modules need the token ids: call the model with them (idx / input_ids "
                                   "as the first argument or keyword), not with embeddings")
            if idx.shape != x.shape[:-1]:
                raise ValueError(f"keyed modules: token ids of shape {tuple(idx.shape)} do not match an MLP input "
                                 f"of shape {tuple(x.shape)}")
            pad = self._key_pad
            if pad is not None:                  # ids at padded positions count as no key
                idx = idx.masked_fill(pad.to(idx.device), -1)
            self._key_gates = self.key_gates(idx).unsqueeze(-1)
        return self._key_gates.to(x.device, x.dtype)

    # ------------------------------------------------------------------ embedding deltas (embed_delta=True)
    def _layout(self, device) -> tuple:
        """``(union, inv, pos)`` for the deltas' rows on ``device``: ``union`` the sorted union
        ``U`` of all domains' rows (None: every row, the full vocabulary), ``inv`` ``(vocab,)`` the
        position of each token in ``U`` (``len(U)`` for tokens outside it; None with ``U`` all),
        ``pos[k]`` the positions of domain ``k``'s rows in ``U`` (None: all of ``U``)."""
        E = getattr(self.model, EMBED_CONTAINER)
        rows = [E[d].rows for d in self.domains]
        # the version counters change when rows are loaded in place (load_state_dict); the ids tell
        # a buffer replaced by another tensor (load_state_dict(assign=True), assignment), whose
        # counter may equal the old one's; the cache keeps the tensors, so an id is not reused
        key = (str(device), tuple(None if r is None else (id(r), r._version) for r in rows))
        if key not in self._layouts:
            self._layouts.clear()
            self._layout_rows = rows
            vocab = self.model.transformer.wte.weight.shape[0]
            if all(r is None for r in rows):
                lay = (None, None, [None] * self.K)
            else:
                full = torch.arange(vocab, device=device)
                rows = [full if r is None else r.to(device) for r in rows]
                union = torch.unique(torch.cat(rows))
                pos = [None if r.numel() == union.numel() else torch.searchsorted(union, r) for r in rows]
                if union.numel() == vocab:
                    lay = (None, None, pos)
                else:
                    inv = torch.full((vocab,), union.numel(), dtype=torch.long, device=device)
                    inv[union] = torch.arange(union.numel(), device=device)
                    lay = (union, inv, pos)
            self._layouts[key] = lay
        return self._layouts[key]

    def _placed(self, W: torch.Tensor, k: int) -> torch.Tensor:
        """Domain ``k``'s delta weights ``W`` placed at its rows' positions in the union ``U`` of all
        domains' rows (``W`` itself when the domain has all of ``U``)."""
        union, _, pos = self._layout(W.device)
        if pos[k] is None:
            return W
        u = self.model.transformer.wte.weight.shape[0] if union is None else union.numel()
        return W.new_zeros(u, W.shape[1]).index_add(0, pos[k], W)

    def _routed_strengths(self, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """In a routed pass: ``(f, m)``, both ``(B, K)``: each module's forward strength per example,
        and 1 where it learns from that example or does not run (0: it runs without learning)."""
        fwd, learn = self._route["forward"], self._route["learn"]
        f = fwd[:, 1:].to(device, dtype)
        m = (learn[:, 1:] | (fwd[:, 1:] == 0)).to(device, dtype)
        return f, m

    def _combined_delta(self) -> torch.Tensor | None:
        """The deltas switched on, summed over the union ``U`` of their rows (the full vocabulary
        with ``embed_delta=True``): ``(B, |U|, d)`` per example in a routed pass (each ``D_k`` times
        its forward strength, its gradient kept only on rows where module ``k`` learns), ``(|U|, d)``
        from the inference strengths otherwise; None when none is on."""
        E = getattr(self.model, EMBED_CONTAINER)
        weights = [E[d].weight for d in self.domains]
        if self._route is not None:
            deltas = [self._placed(weights[k], k) for k in range(self.K)]
            D = deltas[0]
            stack = torch.stack(deltas).flatten(1)                      # (K, |U| * d): every delta in the graph
            f, m = self._routed_strengths(D.device, D.dtype)            # (B, K) strengths; where it runs, does it learn?
            # one small matmul instead of B x K broadcasts: the weight gradient of D_k is then
            # sum_b f[b, k] m[b, k] dL/dD(b), also one matmul
            total = (f * m) @ stack
            if not bool(m.all()):
                total = total + (f * (1 - m)) @ stack.detach()
            return total.view(f.shape[0], *D.shape)
        total = None
        grad = torch.is_grad_enabled()
        for k in range(self.K):
            s = float(self.mask[1 + k])
            if s == 0.0 and not grad:
                continue                          # inference: an off delta costs nothing
            D = self._placed(weights[k], k)
            term = D if s == 1.0 else s * D
            total = term if total is None else total + term
        return total

    def _take_ids(self, model, args, kwargs):
        self._idx = args[0] if args else kwargs.get("idx")
        self._gates = {}

    def _embed_in_hook(self, drop, args):
        idx, self._idx = self._idx, None
        if idx is None:
            return None
        if self.keys is not None:                  # per module, gated; the logit term: _gated_logits
            return (args[0] + self._keyed_input_delta(idx, args[0]),)
        D = self._combined_delta()
        self._delta = D                            # reused by the output hook of this forward
        if D is None:
            return None
        x = args[0]
        _, inv, _ = self._layout(D.device)
        if inv is not None:            # tokens outside the rows' union U read an appended zero row
            idx = inv[idx]
            D = torch.cat([D, D.new_zeros(*D.shape[:-2], 1, D.shape[-1])], -2)
        if D.ndim == 2:
            return (x + F.embedding(idx, D),)
        if idx.shape[0] != D.shape[0]:
            raise ValueError(f"routed batch has {D.shape[0]} examples but the model received input "
                             f"of shape {tuple(idx.shape)}")
        rows = torch.arange(D.shape[0], device=idx.device).view(-1, *([1] * (idx.ndim - 1)))
        return (x + D[rows, idx],)

    def _delta_terms(self, like: torch.Tensor, make):
        """``(k, term)`` for every module ``k`` that contributes: ``make(W)`` of its delta weights ``W`` placed
        in the rows' union, times its strength. In a routed pass: every module, per example, ``W`` learning
        only from the examples where module ``k`` learns (the others get ``make`` of the detached weights);
        else its inference strength (an off module is skipped without grad). ``like``: a ``(B, ...)`` tensor
        giving the device, dtype and number of dims of the terms."""
        E = getattr(self.model, EMBED_CONTAINER)
        routed = self._route is not None
        if routed:
            fs, ms = self._routed_strengths(like.device, like.dtype)
            shape = (fs.shape[0], *([1] * (like.ndim - 1)))
        for k, d in enumerate(self.domains):
            W = E[d].weight
            if routed:
                f, m = fs[:, k].view(shape), ms[:, k].view(shape)
                t = make(self._placed(W, k))
                if not bool(m.all()):
                    t = m * t + (1 - m) * make(self._placed(W.detach(), k))
                yield k, f * t
            else:
                s = float(self.mask[1 + k])
                if s == 0.0 and not torch.is_grad_enabled():
                    continue                       # inference: an off delta costs nothing
                t = make(self._placed(W, k))
                yield k, t if s == 1.0 else s * t

    def _keyed_input_delta(self, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Keyed modules: ``sum_k s_k g_k D_k[idx]``, each module's input delta times its key gate at that
        position and its strength (:meth:`_delta_terms`)."""
        _, inv, _ = self._layout(x.device)
        gates = self._key_gate(x)                                       # (K, B, T, 1)
        if inv is None:
            lookup = lambda D: F.embedding(idx, D)                      # noqa: E731
        else:                                      # tokens outside the rows' union U read an appended zero row
            j = inv[idx]
            lookup = lambda D: F.embedding(j, torch.cat([D, D.new_zeros(1, D.shape[1])]))   # noqa: E731
        total = torch.zeros_like(x)
        for k, e in self._delta_terms(x, lookup):
            total = total + gates[k] * e
        return total

    def _embed_out_hook(self, head, args, out):
        gates, self._gates = self._gates, {}      # this forward's gates: not kept after it
        if self.gated or self.keys is not None:   # per module, times its last block's gate
            self._delta = False
            return self._gated_logits(args[0], out, gates)
        D = self._delta if self._delta is not False else self._combined_delta()
        self._delta = False
        if D is None:
            return out
        h = args[0]
        union, _, _ = self._layout(D.device)
        if D.ndim == 2:
            y = F.linear(h, D)
        else:
            B = D.shape[0]
            if h.shape[0] != B:
                raise ValueError(f"routed batch has {B} examples but lm_head received input of shape {tuple(h.shape)}")
            y = torch.bmm(h.reshape(B, -1, h.shape[-1]), D.transpose(1, 2)).view(*out.shape[:-1], D.shape[-2])
        # only the logits of the rows' union U move
        return out + y if union is None else out.index_add(-1, union, y)

    def _gated_logits(self, h: torch.Tensor, out: torch.Tensor, gates: dict) -> torch.Tensor:
        """Gated modules: ``logits + sum_k s_k g_k h D_k^T`` with ``g_k`` module ``k``'s gate in the
        last block at that position and ``s_k`` its strength (:meth:`_delta_terms`)."""
        union, _, _ = self._layout(getattr(self.model, EMBED_CONTAINER)[self.domains[0]].weight.device)
        y = None
        for k, yk in self._delta_terms(h, lambda D: F.linear(h, D)):
            g = gates.get(k)
            if g is None:
                raise RuntimeError(f"gated module {self.domains[k]!r}: no gate from the last block in this forward")
            yk = g * yk
            y = yk if y is None else y + yk
        if y is None:
            return out
        return out + y if union is None else out.index_add(-1, union, y)

    # ------------------------------------------------------------------ isolation
    def learned_flags(self) -> torch.Tensor | None:
        """Owners ``[core, module 0, ...]`` that learned since the last step (None: no routed
        forward since then, so everything steps as in ordinary training)."""
        return None if self._pending is None else self._pending.clone()

    def _before_step(self, optimizer) -> None:
        if self._pending is None:
            return
        if not any(id(p) in self._all_ids for g in optimizer.param_groups for p in g["params"]):
            return
        self.release_unlearned()

    def release_unlearned(self) -> torch.Tensor:
        """Set ``.grad = None`` on the parameters of every owner that did not learn since the
        last step (all-reducing the flags across processes first when syncing), then clear
        the flags; ``always_learn`` parameters keep theirs after any routed forward. Runs
        automatically before ``optimizer.step()``; returns the flags used."""
        flags = self._pending if self._pending is not None else torch.ones(1 + self.K, dtype=torch.bool)
        free = self._free_pending if self._pending is not None else True
        sync = self.sync if self.sync is not None else (dist.is_available() and dist.is_initialized()
                                                        and dist.get_world_size() > 1)
        if sync:
            dev = next(self.model.parameters()).device
            if dist.get_backend() == "nccl":
                dev = torch.device("cuda", torch.cuda.current_device())
            t = torch.cat([flags, torch.tensor([free])]) if self._free_ids else flags
            t = t.to(dev, torch.int32)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            t = t.cpu().bool()
            flags, free = (t[:-1], bool(t[-1])) if self._free_ids else (t, free)
        for p in self.core_params():          # always-learn parameters follow ``free``, the rest the core flag
            if not (free if id(p) in self._free_ids else bool(flags[0])):
                p.grad = None
        for k in range(self.K):
            if not bool(flags[1 + k]):
                for p in self.module_params(k):
                    p.grad = None
        self._pending = None
        self._free_pending = False
        return flags

    # ------------------------------------------------------------------ export
    def export(self, on: Strengths = (), model: nn.Module | None = None) -> nn.Module:
        """A copy of the model without modules (stock architecture): the modules in ``on`` (a
        list of domains, or ``{domain: strength}``) merged into the MLPs by width concatenation,
        the rest dropped; with ``embed_delta`` the kept modules' embedding deltas are added into the
        tied token embedding. Raises ``ValueError`` where merging is not exact (see module doc)."""
        strengths = self.strengths(on)[1:] if on else torch.zeros(self.K)
        if (self.gated or self.keys is not None) and bool(strengths.ne(0).any()):
            kept = [self.domains[k] for k in range(self.K) if strengths[k] != 0]
            raise ValueError(f"export(on={kept}): {'gated' if self.gated else 'keyed'} modules cannot be merged into "
                             "the MLPs (a per-token gate is not a width concatenation); export with every module off, "
                             "or keep the ModuleSet attached and switch modules with using()/set()")
        src = unwrap(model) if model is not None else self.model
        out = copy.deepcopy(src)
        for handle in self._key_hooks:
            for d in (out._forward_pre_hooks_with_kwargs, out._forward_pre_hooks, out._forward_hooks,
                      out._forward_hooks_with_kwargs, out._forward_hooks_always_called):
                d.pop(handle.id, None)
        for (name, _), handle in zip(self.blocks, self._hooks):
            mlp = out.get_submodule(name)
            for d in (mlp._forward_hooks, mlp._forward_hooks_with_kwargs):
                d.pop(handle.id, None)
            mods = mlp._modules.pop(CONTAINER)
            merge = [(self.domains[k], float(s)) for k, s in enumerate(strengths) if s != 0]
            if merge:
                _merge(mlp, name, [(mods[d], s) for d, s in merge])
        if bool(strengths.ne(0).any()):
            _update_width_config(out, [n for n, _ in self.blocks])
        if self.embed_delta:
            deltas = out._modules.pop(EMBED_CONTAINER)
            wte, head = out.get_submodule("transformer.wte"), out.get_submodule("lm_head")
            for mod, handle in zip((out, out.get_submodule("transformer.drop"), head), self._embed_hooks):
                for d in (mod._forward_pre_hooks, mod._forward_pre_hooks_with_kwargs, mod._forward_hooks):
                    d.pop(handle.id, None)
            with torch.no_grad():     # tied: one matrix is both embeddings, so the merge is exact
                for k, s in enumerate(strengths.tolist()):
                    if s != 0:
                        E = deltas[self.domains[k]]
                        D = E.weight if s == 1.0 else s * E.weight
                        if E.rows is None:
                            wte.weight.add_(D)
                        else:                     # only its rows
                            wte.weight.index_add_(0, E.rows.to(wte.weight.device), D)
        return out

    def remove(self) -> None:
        """Detach: delete the modules and hooks from the model in place (it is a stock model
        again, equal to ``export()``) and stop the optimizer hook."""
        for (name, mlp), handle in zip(self.blocks, self._hooks):
            handle.remove()
            if hasattr(mlp, CONTAINER):
                delattr(mlp, CONTAINER)
        self._hooks = []
        for handle in self._embed_hooks + self._key_hooks:
            handle.remove()
        self._embed_hooks = []
        self._key_hooks = []
        if self.embed_delta and hasattr(self.model, EMBED_CONTAINER):
            delattr(self.model, EMBED_CONTAINER)
        self._step_hook.remove()
        self._pending = None
        self._free_pending = False

    def __del__(self):
        try:
            self._step_hook.remove()
        except Exception:
            pass

    def __repr__(self) -> str:
        w = sorted(set(self.width.values()))
        return (f"ModuleSet({len(self.blocks)} MLPs x {self.K} domains {self.domains}, width {w}, "
                f"{self.num_params()} module parameters)")


def add_modules(model: nn.Module, pattern: Pattern, domains: Union[int, Sequence[str]],
                width: Union[float, int] = 0.1, activation=None, init_std: float | None = None,
                sync: bool | None = None, always_learn: Iterable[str] = (),
                embed_delta: Union[bool, Mapping[str, object]] = False, gated: bool = False,
                keys: Mapping[str, object] | None = None, key_rule: str = "first") -> ModuleSet:
    """Attach one auxiliary MLP per domain to every MLP of ``model`` matching ``pattern``; see
    :class:`ModuleSet`. The model computes the same function afterwards."""
    return ModuleSet(model, pattern, domains, width, activation, init_std, sync, always_learn, embed_delta,
                     gated, keys, key_rule)


@torch.no_grad()
def _merge(mlp: nn.Module, name: str, modules: list[tuple[AuxMLP, float]]) -> None:
    parts = mlp_parts(mlp, name)
    if len(parts.inputs) != 1:
        raise ValueError(f"{name}: a gated MLP ({' * '.join(parts.inputs)} -> {parts.output}) cannot absorb a "
                         "gateless module exactly; export with the module off, or keep the ModuleSet attached")
    first, reader = getattr(mlp, parts.inputs[0]), getattr(mlp, parts.output)
    act = _activation(mlp, name)
    for m, _ in modules:
        if m.act is not act:
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


def _update_width_config(model: nn.Module, blocks: list[str]) -> None:
    """Keep the config's MLP width right when every block has the same width after a merge."""
    widths = {mlp_parts(model.get_submodule(n), n).n_units for n in blocks}
    cfg = getattr(model, "config", None)
    if cfg is None or len(widths) != 1:
        return
    w = widths.pop()
    for attr in ("d_mlp", "n_inner", "intermediate_size"):
        if hasattr(cfg, attr):
            setattr(cfg, attr, w)
