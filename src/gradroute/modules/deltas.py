"""Per-domain token-embedding deltas of keyed modules (ours): domain ``k`` has a delta ``D_k`` on a few rows of
the vocabulary (its ``rows``), zero at start, added to the token embedding on the input (``E[x] + g_k D_k[x]``)
and to the tied unembedding on the output (``logits + g_k h D_k^T``), times the module's key gate ``g_k`` and
its strength, and learning exactly where module ``k`` learns. The embeddings are found through
``get_input_embeddings()`` / ``get_output_embeddings()`` (Hugging Face models), or as the ``nn.Embedding`` whose
weight an ``nn.Linear`` shares (our GPT); they must be tied."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

EMBED_CONTAINER = "aux_embed"      # attribute of the model holding the embedding deltas


class EmbedDelta(nn.Module):
    """One domain's token-embedding delta, zero at start: ``weight`` ``(len(rows), d_model)`` for the token ids
    in the buffer ``rows`` (sorted, unique; the delta of every other row is zero)."""

    def __init__(self, rows: torch.Tensor, d_model: int, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(rows.numel(), d_model, dtype=dtype, device=device))
        self.register_buffer("rows", rows.to(device=device, dtype=torch.long))


def _tied_pairs(root: nn.Module) -> list:
    lins = [m for m in root.modules() if isinstance(m, nn.Linear)]
    return [(e, h) for e in root.modules() if isinstance(e, nn.Embedding) for h in lins if h.weight is e.weight]


def input_embedding(root: nn.Module) -> nn.Embedding:
    """The token embedding: ``get_input_embeddings()``, else the embedding tied with an output linear, else
    the model's first ``nn.Embedding``."""
    get = getattr(root, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if emb is None:
        pairs = _tied_pairs(root)
        emb = pairs[0][0] if pairs else next((m for m in root.modules() if isinstance(m, nn.Embedding)), None)
    if not isinstance(emb, nn.Embedding):
        raise ValueError(f"keyed modules need a token-embedding model (an nn.Embedding, found through "
                         f"get_input_embeddings() or in the model); got {type(root).__name__}")
    return emb


def tied_embeddings(root: nn.Module) -> tuple[nn.Embedding, nn.Module]:
    """``(input embedding, output linear)`` sharing one weight, or ``ValueError``."""
    emb = input_embedding(root)
    get = getattr(root, "get_output_embeddings", None)
    head = get() if callable(get) else next((h for e, h in _tied_pairs(root) if e is emb), None)
    if head is None or getattr(head, "weight", None) is not emb.weight:
        raise ValueError("embed_delta needs tied input and output embeddings (one weight, e.g. "
                         "GPTConfig(tie_embeddings=True)); this model's output layer has its own weight")
    return emb, head


class EmbedDeltas:
    """The deltas of ``owner`` (a :class:`~gradroute.modules.ModuleSet` with keys) and the hooks that add them.

    Each hook acts on the outermost call of its module only: a re-entered embedding (a wrapper calling it
    again inside its own call) would otherwise add the delta twice. Parameter routing no longer re-enters it
    (it calls the embedding's own forward with swapped parameters), so this is a guard."""

    def __init__(self, owner, rows: dict):
        root = owner.model
        emb, head = tied_embeddings(root)
        if hasattr(root, EMBED_CONTAINER):
            raise ValueError(f"the model already has {EMBED_CONTAINER}; remove() the other ModuleSet first")
        self.owner, self.emb = owner, emb
        w = emb.weight
        root.add_module(EMBED_CONTAINER, nn.ModuleDict(
            {d: EmbedDelta(rows[d], w.shape[1], dtype=w.dtype, device=w.device) for d in owner.domains}))
        self.module = getattr(root, EMBED_CONTAINER)
        self._layouts: dict = {}
        self._layout_rows: list = []            # the rows tensors of the cached layout (keeps their ids)
        self._depth = {"in": 0, "out": 0}
        self._ids = None
        self.sites = [(emb, emb.register_forward_pre_hook(lambda m, a: self._enter("in", a))),
                      (emb, emb.register_forward_hook(lambda m, a, o: self._input(a, o), always_call=True)),
                      (head, head.register_forward_pre_hook(lambda m, a: self._enter("out", a))),
                      (head, head.register_forward_hook(lambda m, a, o: self._output(a, o), always_call=True))]

    def weights(self, domains) -> list[nn.Parameter]:
        return [self.module[d].weight for d in domains]

    def remove(self) -> None:
        for _, h in self.sites:
            h.remove()
        self.sites = []
        if hasattr(self.owner.model, EMBED_CONTAINER):
            delattr(self.owner.model, EMBED_CONTAINER)

    # ------------------------------------------------------------------ layout of the rows
    def _layout(self, device) -> tuple:
        """``(union, inv, pos)`` on ``device``: ``union`` the sorted union ``U`` of all domains' rows, ``inv``
        ``(vocab,)`` the position of each token in ``U`` (``len(U)`` for tokens outside it), ``pos[k]`` the
        positions of domain ``k``'s rows in ``U`` (None: all of ``U``)."""
        rows = [self.module[d].rows for d in self.owner.domains]
        # the version counters change when rows are loaded in place (load_state_dict); the ids tell a buffer
        # replaced by another tensor (load_state_dict(assign=True)), whose counter may equal the old one's;
        # the cache keeps the tensors, so an id is not reused
        key = (str(device), tuple((id(r), r._version) for r in rows))
        if key not in self._layouts:
            self._layouts.clear()
            self._layout_rows = rows
            vocab = self.emb.weight.shape[0]
            rows = [r.to(device) for r in rows]
            union = torch.unique(torch.cat(rows))
            pos = [None if r.numel() == union.numel() else torch.searchsorted(union, r) for r in rows]
            inv = torch.full((vocab,), union.numel(), dtype=torch.long, device=device)
            inv[union] = torch.arange(union.numel(), device=device)
            self._layouts[key] = (union, inv, pos)
        return self._layouts[key]

    def _placed(self, W: torch.Tensor, k: int) -> torch.Tensor:
        """Domain ``k``'s delta weights ``W`` placed at its rows' positions in the union ``U`` of all rows."""
        union, _, pos = self._layout(W.device)
        if pos[k] is None:
            return W
        return W.new_zeros(union.numel(), W.shape[1]).index_add(0, pos[k], W)

    def _terms(self, like: torch.Tensor, make):
        """``(k, term)`` for every module ``k`` that contributes: ``make(W)`` of its delta weights ``W`` placed in
        the rows' union, times its strength. In a routed pass: every module, per example, ``W`` learning only
        from the examples where module ``k`` learns; else its inference strength (an off module is skipped
        without grad). ``like``: a ``(B, ...)`` tensor giving the device, dtype and number of dims."""
        owner = self.owner
        routed = owner._route is not None
        if routed:
            fs, ms = owner.routed_strengths(like.device, like.dtype)
            shape = (fs.shape[0], *([1] * (like.ndim - 1)))
        for k, d in enumerate(owner.domains):
            W = self.module[d].weight
            if routed:
                f, m = fs[:, k].view(shape), ms[:, k].view(shape)
                t = make(self._placed(W, k))
                if not bool(m.all()):
                    t = m * t + (1 - m) * make(self._placed(W.detach(), k))
                yield k, f * t
            else:
                s = float(owner.mask[1 + k])
                if s == 0.0 and not torch.is_grad_enabled():
                    continue                       # inference: an off delta costs nothing
                t = make(self._placed(W, k))
                yield k, t if s == 1.0 else s * t

    # ------------------------------------------------------------------ hooks
    def _enter(self, side: str, args) -> None:
        self._depth[side] += 1
        if side == "in" and self._depth["in"] == 1:
            self._ids = args[0]

    def _input(self, args, out):
        """``E[x] + sum_k s_k g_k D_k[x]`` on the embedding's outermost call."""
        self._depth["in"] -= 1
        if self._depth["in"] or out is None:
            return None
        idx, self._ids = self._ids, None
        _, inv, _ = self._layout(out.device)
        gates = self.owner.keyed.on(out)                                  # (K, B, T, 1)
        j = inv[idx]                   # tokens outside the rows' union U read an appended zero row
        lookup = lambda D: F.embedding(j, torch.cat([D, D.new_zeros(1, D.shape[1])]))   # noqa: E731
        total = torch.zeros_like(out)
        for k, e in self._terms(out, lookup):
            total = total + gates[k] * e
        return out + total

    def _output(self, args, out):
        """``logits + sum_k s_k g_k h D_k^T`` on the output layer's outermost call (only the rows' logits move)."""
        self._depth["out"] -= 1
        if self._depth["out"] or out is None:
            return None
        h = args[0]
        union, _, _ = self._layout(self.module[self.owner.domains[0]].weight.device)
        gates = self.owner.keyed.on(h)
        y = None
        for k, yk in self._terms(h, lambda D: F.linear(h, D)):
            yk = gates[k] * yk
            y = yk if y is None else y + yk
        if y is None:
            return out
        return out.index_add(-1, union, y)
