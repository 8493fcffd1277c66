"""Stories -> token rows with labels, and a seeded batch order that is the same for every method.

One story per row (as in the paper): its tokens, then ``<|endoftext|>``, truncated to
``n_ctx + 1`` tokens and padded; inputs are ``row[:-1]``, targets ``row[1:]`` with padding
set to -100 (ignored). Each row carries the forget rule's flag, the *labelled* flag (the subset
of forget stories the trainer knows about) and a per-target mask of keyword tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

from .corpus import is_forget, keyword_spans
from .tokenizer import Tokenizer

IGNORE = -100


@dataclass
class Stories:
    """Tokenized stories. ``x``, ``y``: ``(N, n_ctx)``; ``keyword``: ``(N, n_ctx)``, True where the
    *target* token overlaps a forget keyword; ``forget``: ``(N,)`` the keyword rule;
    ``labelled``: ``(N,)`` the forget stories the trainer is told about."""
    x: torch.Tensor
    y: torch.Tensor
    keyword: torch.Tensor
    forget: torch.Tensor
    labelled: torch.Tensor

    def __len__(self) -> int:
        return self.x.shape[0]

    def subset(self, idx) -> "Stories":
        if not isinstance(idx, slice):
            idx = torch.as_tensor(idx)
            idx = idx.nonzero().flatten() if idx.dtype == torch.bool else idx.long()
        return Stories(self.x[idx], self.y[idx], self.keyword[idx], self.forget[idx], self.labelled[idx])

    def with_labels(self, labelled: torch.Tensor) -> "Stories":
        labelled = torch.as_tensor(labelled, dtype=torch.bool)
        if labelled.shape != self.forget.shape:
            raise ValueError(f"labelled has shape {tuple(labelled.shape)}, expected {tuple(self.forget.shape)}")
        if (labelled & ~self.forget).any():
            raise ValueError("only forget stories can be labelled")
        return replace(self, labelled=labelled)

    def n_tokens(self) -> int:
        return int((self.y != IGNORE).sum())


def encode_stories(tok: Tokenizer, stories: Sequence[str], n_ctx: int) -> Stories:
    if n_ctx < 2:
        raise ValueError(f"n_ctx must be >= 2, got {n_ctx}")
    stories = list(stories)
    if not stories:
        raise ValueError("encode_stories() got no stories")
    n = len(stories)
    rows = torch.full((n, n_ctx + 1), tok.eot_id, dtype=torch.long)
    valid = torch.zeros(n, n_ctx + 1, dtype=torch.bool)
    kw = torch.zeros(n, n_ctx + 1, dtype=torch.bool)
    for i, (text, enc) in enumerate(zip(stories, tok.encode_batch(stories))):
        ids = enc.ids[: n_ctx] + [tok.eot_id]
        ids = ids[: n_ctx + 1]
        rows[i, : len(ids)] = torch.tensor(ids)
        valid[i, : len(ids)] = True
        for s, e in keyword_spans(text):
            for j, (a, b) in enumerate(enc.offsets[: n_ctx]):
                if a < e and b > s:
                    kw[i, j] = True
    y = rows[:, 1:].clone()
    y[~valid[:, 1:]] = IGNORE
    forget = torch.tensor([is_forget(s) for s in stories], dtype=torch.bool)
    return Stories(rows[:, :-1].contiguous(), y, kw[:, 1:].contiguous(), forget, torch.zeros(n, dtype=torch.bool))


@dataclass
class Batch:
    """A training batch. ``n_tokens`` counts the target tokens of the *whole* batch (all ranks),
    which the training loop divides summed losses by."""
    x: torch.Tensor
    y: torch.Tensor
    keyword: torch.Tensor
    forget: torch.Tensor
    labelled: torch.Tensor
    index: torch.Tensor
    n_tokens: int = 0
    extra: dict = field(default_factory=dict)

    def to(self, device) -> "Batch":
        t = {k: getattr(self, k).to(device) for k in ("x", "y", "keyword", "forget", "labelled", "index")}
        return replace(self, **t)

    def shard(self, rank: int, world: int) -> "Batch":
        """Rows of this rank (contiguous chunks), keeping the global token count."""
        if world == 1:
            return self
        B = self.x.shape[0]
        if B < world:
            raise ValueError(f"batch of {B} rows cannot be split over {world} processes")
        bounds = [B * r // world for r in range(world + 1)]
        sl = slice(bounds[rank], bounds[rank + 1])
        return Batch(self.x[sl], self.y[sl], self.keyword[sl], self.forget[sl], self.labelled[sl],
                     self.index[sl], self.n_tokens, self.extra)


class BatchOrder:
    """The batch at each step, from a seeded stream of epoch permutations of the stories.

    ``allowed`` (bool per story) restricts the stream *without changing the order of the rest*:
    data filtering sees the same sequence as base training minus the dropped stories (paired
    data order across methods). Within a batch, labelled forget rows come first (parameter
    routing is faster on contiguous rows). ``batch_at(step)`` is a pure function of the step,
    which is what makes resuming exact.
    """

    def __init__(self, data: Stories, batch_size: int, seed: int, allowed: torch.Tensor | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.allowed = torch.ones(len(data), dtype=torch.bool) if allowed is None else torch.as_tensor(allowed, dtype=torch.bool)
        if self.allowed.shape != (len(data),):
            raise ValueError(f"allowed has shape {tuple(self.allowed.shape)}, expected ({len(data)},)")
        self.m = int(self.allowed.sum())
        if self.m == 0:
            raise ValueError("no stories left to train on")
        self._perms: dict[int, torch.Tensor] = {}

    def _epoch(self, e: int) -> torch.Tensor:
        if e not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + e)
            perm = torch.randperm(len(self.data), generator=g)
            self._perms = {e: perm[self.allowed[perm]]}  # keep one epoch cached
        return self._perms[e]

    def indices(self, step: int) -> torch.Tensor:
        start = step * self.batch_size
        out, k = [], start
        while k < start + self.batch_size:
            e, off = divmod(k, self.m)
            take = min(self.m - off, start + self.batch_size - k)
            out.append(self._epoch(e)[off:off + take])
            k += take
        idx = torch.cat(out)
        return idx[torch.argsort((~self.data.labelled[idx]).to(torch.int8), stable=True)]

    def batch_at(self, step: int) -> Batch:
        idx = self.indices(step)
        d = self.data
        y = d.y[idx]
        return Batch(d.x[idx], y, d.keyword[idx], d.forget[idx], d.labelled[idx], idx, int((y != IGNORE).sum()))

    __call__ = batch_at


def full_batches(data: Stories, batch_size: int):
    """The stories in order, in batches (for evaluation)."""
    for s in range(0, len(data), batch_size):
        d = data.subset(slice(s, s + batch_size))
        yield Batch(d.x, d.y, d.keyword, d.forget, d.labelled, torch.arange(s, s + len(d)), d.n_tokens())
