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
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn

from .corpus import ANIMALS, NAMES, PLACES, is_forest_topic, is_forget, load_corpus
from .data import IGNORE, BatchOrder, Stories, encode_stories, full_batches
from .tokenizer import Tokenizer, get_tokenizer
from .train import TrainConfig, lm_loss, token_losses, train
from ..utils import intervals_separate  # noqa: F401  (re-exported for the experiments)

TRAIN_STREAM, EVAL_STREAM = 0, 1   # generated corpus: seeds of the training and held-out streams


@dataclass
class Corpus:
    """Training stories and disjoint held-out sets: ``topic`` (forget-rule stories),
    ``general`` (stories neither matching the rule nor about the forest topic at all),
    ``attack_pool`` (more forget-rule stories, for retraining attacks only) and
    ``general_train`` (more general stories, for fine-tuning only); ``val_topic`` /
    ``val_general`` (more of each, a validation split for choices made before evaluation; None
    unless asked for); ``related``: unlabelled documents of fields related to the forget domain
    (a user corpus's evaluation-only topic field; None for the generated stories)."""
    tok: Tokenizer
    train: Stories
    topic: Stories
    general: Stories
    attack_pool: Stories | None     # None when no attack stories were asked for
    general_train: Stories | None   # None when no fine-tuning stories were asked for
    counts: dict
    val_topic: Stories | None = None
    val_general: Stories | None = None
    related: Stories | None = None


def prepare_corpus(n_train: int, n_eval: int, n_attack: int, vocab_size: int, n_ctx: int,
                   n_general_train: int = 0, source: str = "generated", tokenizer: str = "bpe",
                   n_val: int = 0) -> Corpus:
    """The LM suite's corpus and tokenizer (same generator, same cached BPE for the same
    stories), with held-out sets drawn from a second generated stream (or the stories after
    the training ones for a file / TinyStories), deduplicated against the training stories.
    The validation sets (``n_val`` topic and ``n_val`` general stories) come after all the others
    in the held-out stream, so asking for them leaves the other sets unchanged."""
    texts = load_corpus(source, n_train, seed=TRAIN_STREAM)
    n_held = 8 * (2 * n_eval + n_attack + 2 * n_val) + 2 * n_general_train
    held = (load_corpus("generated", n_held, seed=EVAL_STREAM) if source == "generated"
            else load_corpus(source, n_held, start=n_train))
    seen = set(texts)
    held = [t for t in dict.fromkeys(held) if t not in seen]
    topic = [t for t in held if is_forget(t)]
    general = [t for t in held if not is_forget(t) and not is_forest_topic(t)]
    if len(topic) < n_eval + n_attack + n_val or len(general) < n_eval + n_general_train + n_val:
        raise ValueError(f"held-out corpus too small: {len(topic)} topic / {len(general)} general stories, "
                         f"need {n_eval + n_attack + n_val} / {n_eval + n_general_train + n_val}")
    tok = get_tokenizer(tokenizer, texts=texts, vocab_size=vocab_size)
    enc = lambda xs: encode_stories(tok, xs, n_ctx)
    counts = {"train_stories": len(texts), "train_forget": sum(map(is_forget, texts))}
    return Corpus(tok, enc(texts), enc(topic[:n_eval]), enc(general[:n_eval]),
                  enc(topic[n_eval:n_eval + n_attack]) if n_attack else None,
                  enc(general[n_eval:n_eval + n_general_train]) if n_general_train else None, counts,
                  enc(topic[n_eval + n_attack:n_eval + n_attack + n_val]) if n_val else None,
                  enc(general[n_eval + n_general_train:n_eval + n_general_train + n_val]) if n_val else None)


def train_lm(spec: dict, data: Stories, cfg: TrainConfig, batch_size: int, seed: int,
             loss_fn: Callable = lm_loss, device: str = "cpu", model: nn.Module | None = None,
             desc: str | None = None, eval_fn: Callable | None = None, eval_every: int = 0) -> tuple[nn.Module, dict]:
    """Build the model of ``spec`` (``methods.make_model``: our GPT or HF GPT-2) unless given,
    and train it with THE shared loop on ``data`` in the seeded batch order (``eval_fn(model) ->
    {name: value}`` every ``eval_every`` steps and at both ends: the learning curve)."""
    from .methods import make_model

    model = make_model(spec, seed) if model is None else model
    model.to(device)
    cfg = copy.copy(cfg)
    if desc is not None:
        cfg.desc = desc
    if eval_every:
        cfg.eval_every = eval_every
    log = train(model, BatchOrder(data, min(batch_size, len(data)), seed), cfg, loss_fn=loss_fn,
                eval_fn=eval_fn, distributed=False, device=device)
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


# ------------------------------------------------------------------------------------------
# whole-word tokens
# ------------------------------------------------------------------------------------------
WORD_TOKEN = r" ?[A-Za-z]+"   # what a word token looks like: letters, at most one leading space


def whole_word_rates(data: Stories, tok) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token id: ``(occurrences, whole-word rate)``, counted over every target position of
    ``data``. An occurrence is a *whole word* when it both

    - starts a word: the token's text begins with a space, or the previous token's text ends in
      a non-letter (punctuation, a space, ``<|endoftext|>``), and
    - ends a word: the next target is padding or a token whose text begins with a non-letter
      (so the word is not continued by a following fragment).

    The rate is whole-word occurrences / occurrences (0 for unseen tokens). The first token of a
    row is never a target, and a row cut at the context length ends with ``<|endoftext|>``, which
    counts as a word end (at most one occurrence per cut row). ``tok`` needs
    ``vocab_size`` and ``decode([id])``."""
    V = tok.vocab_size
    text = [tok.decode([i]) for i in range(V)]
    begins_space = torch.tensor([t[:1] == " " for t in text])
    ends_nonletter = torch.tensor([not (t[-1:].isalpha()) for t in text])
    begins_nonletter = torch.tensor([not (t[:1].isalpha()) for t in text])
    y, x = data.y, data.x
    valid = y != IGNORE
    nxt = torch.full_like(y, IGNORE)
    nxt[:, :-1] = y[:, 1:]
    yv = y.clamp_min(0)
    start = begins_space[yv] | ends_nonletter[x]
    end = (nxt == IGNORE) | begins_nonletter[nxt.clamp_min(0)]
    whole = valid & start & end
    count = torch.bincount(y[valid], minlength=V)
    good = torch.bincount(y[whole], minlength=V)
    return count, good.double() / count.clamp_min(1).double()


def whole_word_ids(data: Stories, tok, min_rate: float = 0.9) -> torch.Tensor:
    """Bool mask over the vocabulary: tokens that look like a word (letters, optional leading
    space: :data:`WORD_TOKEN`) and are a whole word (:func:`whole_word_rates`) in at least
    ``min_rate`` of their occurrences in ``data``. Fragments such as ``' th'`` (of " through")
    or ``'rough'`` fail the rate; punctuation fails the look."""
    if not 0.0 < min_rate <= 1.0:
        raise ValueError(f"min_rate must be in (0, 1], got {min_rate}")
    count, rate = whole_word_rates(data, tok)
    looks = torch.tensor([re.fullmatch(WORD_TOKEN, tok.decode([i])) is not None for i in range(tok.vocab_size)])
    return looks & (count > 0) & (rate >= min_rate)


def word_token_ids(tok, words: Sequence[str], data: Stories | None = None, min_rate: float = 0.9) -> list[int]:
    """Token ids of ``words`` as they appear mid-sentence (``" " + word``), in order. Each word
    must be one token that looks like a word (:data:`WORD_TOKEN`); with ``data``, it must also be
    a target there and a whole word in at least ``min_rate`` of those occurrences
    (:func:`whole_word_rates`: ``' acorn'`` of " acorns" is not). Raises ``ValueError`` naming
    the first word that fails and why."""
    if not words:
        raise ValueError("no words given")
    count = rate = None
    if data is not None:
        count, rate = whole_word_rates(data, tok)
    out = []
    for w in words:
        word = w.strip()
        ids = tok.encode(" " + word) if word else []
        if len(ids) != 1:
            pieces = ", ".join(repr(tok.decode([i])) for i in ids)
            raise ValueError(f"routed word {w!r} is not one token of this tokenizer (' {word}' -> {pieces or 'nothing'}); "
                             f"give words that are single whole-word tokens")
        i = ids[0]
        if re.fullmatch(WORD_TOKEN, tok.decode([i])) is None:
            raise ValueError(f"routed word {w!r} is token {tok.decode([i])!r}, which is not a word (letters only)")
        if count is not None:
            if int(count[i]) == 0:
                raise ValueError(f"routed word {w!r} (token {i}) never occurs as a target in the training stories")
            if float(rate[i]) < min_rate:
                raise ValueError(f"routed word {w!r} is a whole word in only {100 * float(rate[i]):.0f}% of its "
                                 f"{int(count[i])} occurrences (below {100 * min_rate:.0f}%): the token is also a "
                                 f"fragment of longer words")
        if i in out:
            raise ValueError(f"routed word {w!r} is given twice")
        out.append(i)
    return out


def fmt_ci(ci: dict, digits: int = 3, signed: bool = False) -> str:
    """``mean [lo, hi] (n=k)`` from :func:`gradroute.utils.mean_ci`; with one value ``mean (n=1)``,
    no interval."""
    f = (lambda v: f"{v:+.{digits}f}") if signed else (lambda v: f"{v:.{digits}f}")
    if ci["n"] == 1:
        return f"{f(ci['mean'])} (n=1)"
    return f"{f(ci['mean'])} [{f(ci['lo'])}, {f(ci['hi'])}] (n={ci['n']})"
