"""The module set: one gateless auxiliary MLP per domain beside every matched MLP, the routed forward hooks,
access profiles, and the glue to the schedule, keys, embedding deltas, isolation and export."""
from __future__ import annotations

import contextlib
from typing import Iterable, Mapping, Sequence, Union

import torch
import torch.nn as nn

from ..adapters import Pattern, find_modules, in_features, is_sharded, mlp_parts, out_features, refuse_sharded, unwrap
from ..params import ParamRouter
from .deltas import EMBED_CONTAINER, EmbedDeltas, input_embedding, tied_embeddings
from .aux_mlp import CONTAINER, AuxMLP, activation_of
from .export import export as _export
from .isolation import Isolation
from .keys import KEY_RULES, KeyGates, token_ids
from .schedule import check_masks, learned_owners, schedule_masks

Strengths = Union[Mapping[str, float], Sequence[str], None]


def _domain_names(domains) -> list[str]:
    if isinstance(domains, int):
        if domains < 1:
            raise ValueError(f"need at least one domain, got {domains}")
        domains = [f"d{i}" for i in range(domains)]
    domains = list(domains)
    for d in domains:
        if not isinstance(d, str) or not d or not d.replace("_", "").isalnum() or d[0].isdigit():
            raise ValueError(f"domain names must be identifiers (letters, digits, _; not starting with a digit), "
                             f"got {d!r}")
    if not domains:
        raise ValueError("need at least one domain")
    if len(set(domains)) != len(domains):
        raise ValueError(f"domain names repeat: {domains}")
    return domains


class ModuleSet:
    """Per-domain modules attached to the MLPs of ``model`` matching ``pattern``; see :func:`add_modules`.

    Attributes: ``domains``, ``K``, ``blocks`` (``[(name, mlp)]``), ``width`` (units per block), ``keys``
    (``{domain: key ids}`` or None), ``mask`` (inference strengths ``[core MLP, module 0, ...]``), ``sync``
    (all-reduce the learned flags before a step; None: when ``torch.distributed`` runs with > 1 process)."""

    def __init__(self, model: nn.Module, pattern: Pattern, domains, width=0.1, keys=None, key_rule="first",
                 embed_delta=None, activation=None):
        root = unwrap(model)
        refuse_sharded(root, "add_modules()", "Add modules before fully_shard, so that FSDP2 shards them with their "
                       "blocks")
        domains = _domain_names(domains)
        if isinstance(width, bool) or not isinstance(width, (int, float)) or width <= 0:
            raise ValueError(f"width must be a positive fraction (float) or unit count (int), got {width!r}")
        if key_rule not in KEY_RULES:
            raise ValueError(f"key_rule must be one of {KEY_RULES}, got {key_rule!r}")
        if embed_delta is not None and keys is None:
            raise ValueError("embed_delta is part of keyed modules: pass keys= too")
        # every option is checked before the model is changed: a refused call leaves it as it was
        vocab = None if keys is None else input_embedding(root).num_embeddings
        key_ids = None if keys is None else token_ids("keys", keys, domains, vocab)
        rows = None if embed_delta is None else token_ids("embed_delta", embed_delta, domains, vocab)
        if rows is not None:
            tied_embeddings(root)
            if hasattr(root, EMBED_CONTAINER):
                raise ValueError(f"the model already has {EMBED_CONTAINER}; remove() the other ModuleSet first")
        self.model, self.domains, self.K, self.sync = root, domains, len(domains), None
        self.blocks: list[tuple[str, nn.Module]] = []
        self._hooks: list = []
        self._build(pattern, width, activation)
        self.width = {name: getattr(mlp, CONTAINER)[domains[0]].up.out_features for name, mlp in self.blocks}
        self.keys, self.key_rule = key_ids, key_rule
        self.keyed = None if keys is None else KeyGates(root, key_ids, domains, vocab, key_rule)
        self.deltas = None if rows is None else EmbedDeltas(self, rows)
        self.embed_delta = rows is not None
        self.mask = torch.ones(1 + self.K)
        self._route: dict | None = None
        self._router = None
        self.isolation = Isolation(self)

    def _build(self, pattern, width, activation) -> None:
        for name, mlp in find_modules(self.model, pattern, kind="MLP"):
            if hasattr(mlp, CONTAINER):
                raise ValueError(f"{name} already has modules; remove() them first")
            parts = mlp_parts(mlp, name)
            first, reader = getattr(mlp, parts.inputs[0]), getattr(mlp, parts.output)
            d_in, d_out, n = in_features(first), out_features(reader), parts.n_units
            w = int(width) if isinstance(width, int) else max(1, round(width * n))
            act = activation if activation is not None else activation_of(mlp, name)
            std = float(first.weight.detach().float().std())
            ref = first.weight
            mlp.add_module(CONTAINER, nn.ModuleDict(
                {d: AuxMLP(d_in, w, d_out, act, first.bias is not None, std, dtype=ref.dtype, device=ref.device)
                 for d in self.domains}))
            self._hooks.append((mlp, mlp.register_forward_hook(self._make_hook(name), with_kwargs=True)))
            self.blocks.append((name, mlp))

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
        """Parameters of one domain's modules (every block, and its embedding delta), or of all (``None``)."""
        names = self.domains if domain is None else [self.domains[self.index(domain)]]
        out = [p for _, mlp in self.blocks for d in names for p in getattr(mlp, CONTAINER)[d].parameters()]
        return out + (self.deltas.weights(names) if self.deltas is not None else [])

    def core_params(self) -> list[nn.Parameter]:
        # the ids as of now: wrapping (FSDP2's fully_shard) replaces the parameter objects
        aux = {id(p) for p in self.module_params()}
        return [p for p in self.model.parameters() if id(p) not in aux]

    def num_params(self, domain: Union[str, int, None] = None) -> int:
        return sum(p.numel() for p in self.module_params(domain))

    # ------------------------------------------------------------------ inference switches
    def strengths(self, on: Strengths = None, off: Iterable[str] = (), core: float = 1.0) -> torch.Tensor:
        """A forward-mask vector ``[core, module 0, ...]``: ``on`` a list of domains (others 0), a
        ``{domain: strength}`` dict (others 0), or None (all 1); then ``off`` set to 0."""
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

    def key_gates(self, idx: torch.Tensor) -> torch.Tensor:
        """Keyed modules: ``(K, *idx.shape)`` bool gates (see :func:`gradroute.modules.keys.key_gates`)."""
        if self.keyed is None:
            raise ValueError("key_gates: these modules have no keys (add_modules(..., keys=...))")
        return self.keyed.gates(idx)

    # ------------------------------------------------------------------ training
    def masks(self, labels: torch.Tensor, p_cr: float = 1.0, p_as: float = 0.0,
              generator: torch.Generator | None = None, spread: str = "one",
              p_other: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """The schedule's ``(forward, learn)`` masks for ``labels`` (:func:`~gradroute.modules.schedule_masks`)."""
        return schedule_masks(labels, self.K, p_cr, p_as, generator, spread, p_other)

    @contextlib.contextmanager
    def route(self, labels: torch.Tensor | None = None, *, p_cr: float = 1.0, p_as: float = 0.0,
              generator: torch.Generator | None = None, forward: torch.Tensor | None = None,
              learn: torch.Tensor | None = None, spread: str = "one", p_other: float = 0.0):
        """Context manager for a routed forward pass (backward may run inside or after it): either ``labels``
        (see :meth:`masks`) or explicit ``forward`` (float ``(B, 1 + K)``: strength of the core MLP and of each
        module per example) and ``learn`` (bool, same shape; a module learns only where it runs)."""
        if labels is not None:
            if forward is not None or learn is not None:
                raise ValueError("pass labels= or forward=/learn=, not both")
            forward, learn = self.masks(labels, p_cr, p_as, generator, spread, p_other)
        elif forward is None or learn is None:
            raise ValueError("route() needs labels= or both forward= and learn=")
        forward, learn = check_masks(forward, learn, self.K)
        if self._route is not None:
            raise RuntimeError("route() contexts cannot be nested")
        if torch.is_grad_enabled():   # a routed forward under no_grad (evaluation) learns nothing
            self.isolation.record(learned_owners(forward, learn))
        frozen = ~learn[:, 0]
        self._route = {"forward": forward, "learn": learn, "cache": {}}
        try:
            if frozen.any():
                if self._router is None:
                    names = {id(p): n for n, p in self.model.named_parameters()}
                    # all-True masks as expanded views (no memory), of the full shape also for sharded parameters
                    self._router = ParamRouter(self.model, {
                        names[id(p)]: torch.ones((), dtype=torch.bool, device=p.device).expand(p.shape)
                        for p in self.module_params()})
                with self._router(forget=frozen):
                    yield self
            else:
                yield self
        finally:
            self._route = None

    def routed_strengths(self, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """In a routed pass: ``(f, m)``, both ``(B, K)``: each module's forward strength per example, and 1 where
        it learns from that example or does not run (0: it runs without learning)."""
        fwd, learn = self._route["forward"], self._route["learn"]
        return fwd[:, 1:].to(device, dtype), (learn[:, 1:] | (fwd[:, 1:] == 0)).to(device, dtype)

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
            taken = []                            # keyed: this forward's gates, taken when first needed

            def gate(k):
                if self.keyed is None:
                    return None
                if not taken:
                    taken.append(self.keyed.on(x))
                return taken[0][k]
            if self._route is not None:
                fwd, lrn = self._masks_on(x)
                y = out if bool((self._route["forward"][:, 0] == 1).all()) else out * fwd[0]
                for k, d in enumerate(self.domains):
                    # every module runs on every example (times 0 when off): DDP needs all parameters
                    y = y + fwd[1 + k] * mods[d](x, lrn[k], gate(k))
                return y
            m = self.mask
            y = out if float(m[0]) == 1.0 else out * float(m[0])
            grad = torch.is_grad_enabled()
            for k, d in enumerate(self.domains):
                s = float(m[1 + k])
                if s == 0.0 and not grad:
                    continue                      # inference: an off module costs nothing
                g = gate(k)
                y = y + (mods[d](x, None, g) if s == 1.0 else s * mods[d](x, None, g))
            return y
        return hook

    # ------------------------------------------------------------------ isolation, export, removal
    def learned_flags(self) -> torch.Tensor | None:
        """Owners ``[core, module 0, ...]`` that learned since the last step (None: no routed forward since
        then, so everything steps as in ordinary training)."""
        p = self.isolation.pending
        return None if p is None else p.clone()

    def release_unlearned(self) -> torch.Tensor:
        """Drop the gradients of every owner that did not learn since the last step (runs automatically
        before ``optimizer.step()``); returns the flags used."""
        return self.isolation.release()

    def hook_sites(self) -> list:
        """``[(module, handle)]``: every forward hook this set registered on the model."""
        return (list(self._hooks) + ([] if self.keyed is None else [(self.model, h) for h in self.keyed.hooks])
                + ([] if self.deltas is None else list(self.deltas.sites)))

    def export(self, on: Strengths = (), model: nn.Module | None = None) -> nn.Module:
        """A copy of the model without modules (stock architecture): the modules in ``on`` (a list of domains,
        or ``{domain: strength}``) merged into the MLPs by width concatenation, the rest dropped. Raises
        ``ValueError`` where merging is not exact (keyed modules, gated MLPs; see :mod:`.export`)."""
        self._refuse_sharded("export()")
        strengths = self.strengths(on)[1:] if on else torch.zeros(self.K)
        return _export(self, strengths, unwrap(model) if model is not None else self.model)

    def remove(self) -> None:
        """Detach: delete the modules and hooks from the model in place (it is a stock model again, equal to
        ``export()``) and stop the optimizer hook."""
        self._refuse_sharded("remove()")
        for (mlp, handle) in self._hooks:
            handle.remove()
            if hasattr(mlp, CONTAINER):
                delattr(mlp, CONTAINER)
        self._hooks = []
        if self.keyed is not None:
            for h in self.keyed.hooks:
                h.remove()
            self.keyed.hooks = []
        if self.deltas is not None:
            self.deltas.remove()
        self.isolation.remove()

    def _refuse_sharded(self, what: str) -> None:
        if any(is_sharded(p) for p in self.model.parameters()):
            raise ValueError(
                f"{what} on a model sharded with FSDP2 (its parameters are DTensors) is not supported: it copies or "
                "changes the model's structure, which FSDP2 has already split into shards. Gather a full state "
                "dict on every rank (torch.distributed.checkpoint.state_dict.get_model_state_dict(model, "
                "options=StateDictOptions(full_state_dict=True))), load it into an unsharded model given the same "
                f"add_modules() call, and call {what} on that model's ModuleSet (see docs/scale.md)")

    def __del__(self):
        try:
            self.isolation.remove()
        except Exception:
            pass

    def __repr__(self) -> str:
        w = sorted(set(self.width.values()))
        return (f"ModuleSet({len(self.blocks)} MLPs x {self.K} domains {self.domains}, width {w}, "
                f"{self.num_params()} module parameters)")


def add_modules(model: nn.Module, pattern: Pattern, domains: Union[int, Sequence[str]],
                width: Union[float, int] = 0.1, keys: Mapping[str, object] | None = None, key_rule: str = "first",
                embed_delta: Mapping[str, object] | None = None, activation=None) -> ModuleSet:
    """Attach one gateless auxiliary MLP per domain, ``down(act(up(x)))`` with ``down`` zero at start, beside
    every MLP of ``model`` matching ``pattern``; the model computes the same function afterwards.

    ``domains``: names (identifiers) or a count ``K`` (names ``d0 .. d{K-1}``). ``width``: a float (fraction of
    each MLP's hidden width, rounded, at least 1) or an int (units per module). ``keys`` (ours; default none):
    ``{domain: token ids}`` for every domain (a 1-d int sequence or a ``(vocab,)`` bool mask): module ``k`` runs
    at a position only from the first of its keys in the sequence on (``key_rule="majority"``: only while no
    other domain has more keys so far); the model must then be called with the token ids of the whole sequence.
    ``embed_delta`` (with ``keys`` only): ``{domain: token ids}``, a token-embedding delta per domain on those
    rows of the tied input/output embedding, gated and trained with its module. ``activation``: the modules'
    activation (default: the MLP's own, needed for merging). A refused option raises before the model changes.
    Add modules before building the optimizer and before wrapping the model in DDP."""
    return ModuleSet(model, pattern, domains, width, keys, key_rule, embed_delta, activation)
