"""Pieces shared by the feature-localization experiments (``steering``, ``token-routing``):
the corpus split they both use, one call to train a model with the shared loop, per-token
losses, and which category words of the story generator are single tokens.

    corpus = prepare_corpus(n_train=3000, n_eval=128, n_attack=16, vocab_size=1024, n_ctx=96)
    model, log = train_lm(spec, corpus.train, TrainConfig(steps=300), batch_size=24, seed=0,
                          loss_fn=my_routed_loss)
    losses = per_token_losses(model, corpus.topic)       # (N, T), NaN at padding
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn

from .corpus import ANIMALS, NAMES, PLACES, is_forest_topic, is_forget, load_corpus
from .data import IGNORE, BatchOrder, Stories, encode_stories, full_batches
from .tokenizer import Tokenizer, get_tokenizer
from .train import TrainConfig, lm_loss, token_losses, train

TRAIN_STREAM, EVAL_STREAM = 0, 1   # generated corpus: seeds of the training and held-out streams


@dataclass
class Corpus:
    """Training stories and disjoint held-out sets: ``topic`` (forget-rule stories),
    ``general`` (stories neither matching the rule nor about the forest topic at all),
    ``attack_pool`` (more forget-rule stories, for retraining attacks only) and
    ``general_train`` (more general stories, for fine-tuning only)."""
    tok: Tokenizer
    train: Stories
    topic: Stories
    general: Stories
    attack_pool: Stories | None     # None when no attack stories were asked for
    general_train: Stories | None   # None when no fine-tuning stories were asked for
    counts: dict


def prepare_corpus(n_train: int, n_eval: int, n_attack: int, vocab_size: int, n_ctx: int,
                   n_general_train: int = 0, source: str = "generated", tokenizer: str = "bpe") -> Corpus:
    """The LM suite's corpus and tokenizer (same generator, same cached BPE for the same
    stories), with held-out sets drawn from a second generated stream (or the stories after
    the training ones for a file / TinyStories), deduplicated against the training stories."""
    texts = load_corpus(source, n_train, seed=TRAIN_STREAM)
    n_held = 8 * (2 * n_eval + n_attack) + 2 * n_general_train
    held = (load_corpus("generated", n_held, seed=EVAL_STREAM) if source == "generated"
            else load_corpus(source, n_held, start=n_train))
    seen = set(texts)
    held = [t for t in dict.fromkeys(held) if t not in seen]
    topic = [t for t in held if is_forget(t)]
    general = [t for t in held if not is_forget(t) and not is_forest_topic(t)]
    if len(topic) < n_eval + n_attack or len(general) < n_eval + n_general_train:
        raise ValueError(f"held-out corpus too small: {len(topic)} topic / {len(general)} general stories, "
                         f"need {n_eval + n_attack} / {n_eval + n_general_train}")
    tok = get_tokenizer(tokenizer, texts=texts, vocab_size=vocab_size)
    enc = lambda xs: encode_stories(tok, xs, n_ctx)
    counts = {"train_stories": len(texts), "train_forget": sum(map(is_forget, texts))}
    return Corpus(tok, enc(texts), enc(topic[:n_eval]), enc(general[:n_eval]),
                  enc(topic[n_eval:n_eval + n_attack]) if n_attack else None,
                  enc(general[n_eval:n_eval + n_general_train]) if n_general_train else None, counts)


def train_lm(spec: dict, data: Stories, cfg: TrainConfig, batch_size: int, seed: int,
             loss_fn: Callable = lm_loss, device: str = "cpu", model: nn.Module | None = None,
             desc: str | None = None) -> tuple[nn.Module, dict]:
    """Build the model of ``spec`` (``methods.make_model``: our GPT or HF GPT-2) unless given,
    and train it with THE shared loop on ``data`` in the seeded batch order."""
    from .methods import make_model

    model = make_model(spec, seed) if model is None else model
    model.to(device)
    if desc is not None:
        cfg = copy.copy(cfg)
        cfg.desc = desc
    log = train(model, BatchOrder(data, min(batch_size, len(data)), seed), cfg, loss_fn=loss_fn,
                distributed=False, device=device)
    return model, log


@torch.no_grad()
def per_token_losses(model: nn.Module, data: Stories, batch_size: int = 64) -> torch.Tensor:
    """Next-token losses ``(N, T)`` on CPU, NaN where the target is padding."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    out = []
    for b in full_batches(data, batch_size):
        l = token_losses(model, b.x.to(dev), b.y.to(dev)).float().cpu()
        out.append(l.masked_fill(b.y == IGNORE, float("nan")))
    model.train(was)
    return torch.cat(out)


def masked_mean(losses: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean of the non-NaN entries of ``losses`` where ``mask`` (all when None)."""
    keep = ~losses.isnan() if mask is None else (~losses.isnan()) & mask
    if not keep.any():
        return float("nan")
    return float(losses[keep].mean())


# ------------------------------------------------------------------------------------------
# the generator's word categories, as tokens
# ------------------------------------------------------------------------------------------
def category_words(category: str) -> list[str]:
    """The words of one of the story generator's categories: ``names`` (children and pets) or
    ``places`` (the last word of each place, e.g. "the park" -> "park")."""
    if category == "names":
        return list(dict.fromkeys(NAMES + [name for _, name in ANIMALS]))
    if category == "places":
        return list(dict.fromkeys(p.split()[-1] for p in PLACES))
    raise ValueError(f"unknown category {category!r}; use 'names' or 'places'")


def single_token_ids(tok: Tokenizer, words: Sequence[str]) -> dict[str, int]:
    """``{word: id}`` for the words that are one token when preceded by a space (as they
    appear mid-sentence); other words are left out."""
    out = {}
    for w in words:
        ids = tok.encode(" " + w.strip())
        if len(ids) == 1:
            out[w.strip()] = ids[0]
    return out


def token_counts(data: Stories, vocab_size: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """How often each token id is a target in ``data`` (only the rows in the bool mask ``rows``)."""
    y = data.y if rows is None else data.y[rows]
    return torch.bincount(y[y != IGNORE], minlength=vocab_size)
