"""Held-out sets drawn by target counts, from wherever their documents occur in the corpus.

Given each document's status (forget / retain / unlabelled, see :mod:`gradroute.lm.labels`)
and topic flag, :func:`plan_splits` picks, with a seeded shuffle over the whole corpus:

- ``forget``: forget documents to evaluate on; ``attack_pool``: other forget documents for
  the retraining attack; ``forget_val``: forget documents for validation (a baseline's
  hyperparameter choice, e.g. RMU's layer and coefficient; never the evaluation set);
- ``retain``: retain documents to evaluate on; ``retain_val``: retain documents for
  validation (model selection, the coherence fine-tune);
- ``topic``: unlabelled topical documents (evaluation field set, no forget label), to measure
  absorption, when the rule has an evaluation field;
- ``train``: everything else (with the remaining forget documents).

A count given explicitly is a requirement: too few documents is an error saying how many
there are. A count left to ``None`` (the default) is a target scaled down to what the corpus
has: at most a quarter of the forget documents go to each of ``forget`` and ``attack_pool``
and at most an eighth to ``forget_val`` (at least a third stay in training), at most a quarter of the retain candidates to ``retain`` and
an eighth to ``retain_val``, at most half of the topical documents to ``topic``. So a corpus
with 0.5% forget documents works: 1,000 documents of which 5 are forget leave 1 + 1 + 1 held
out and 2 to train on. Fewer than 4 forget documents is an error.

Retain candidates are documents with status retain and no topic flag; when the rule yields no
retain documents at all (a label field with only ``"forget"`` values), unlabelled non-topical
documents are used and the plan says so (``retain_source``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .labels import FORGET, RETAIN, UNLABELLED

SETS = ("forget", "attack_pool", "forget_val", "retain", "retain_val", "topic")
MIN_FORGET = 4


class SplitError(ValueError):
    """The corpus lacks the documents a held-out set needs."""


@dataclass
class SplitTargets:
    """Wanted sizes (``None``: scale to the corpus, see the module docstring) and the targets
    the automatic sizes aim for."""
    forget: int | None = None
    attack_pool: int | None = None
    retain: int | None = None
    retain_val: int | None = None
    forget_val: int | None = None
    topic: int | None = None
    target_eval: int = 128
    target_attack: int = 64
    target_val: int = 32


def _auto(target: int, available: int, share: float) -> int:
    return max(1, min(target, int(available * share)))


def plan_splits(status: np.ndarray, topic: np.ndarray, targets: SplitTargets, seed: int = 0,
                source: str = "the corpus") -> dict:
    """Indices per held-out set and ``train`` (sorted), plus ``sizes`` and ``retain_source``."""
    status = np.asarray(status, dtype=np.int8)
    topic = np.asarray(topic, dtype=bool)
    n = status.size
    if n == 0:
        raise SplitError(f"{source} contains no documents")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)                   # one shuffle: each set takes from it in turn
    forget_pool = perm[status[perm] == FORGET]
    topic_pool = perm[(status[perm] != FORGET) & topic[perm]]
    retain_pool = perm[(status[perm] == RETAIN) & ~topic[perm]]
    retain_source = "retain"
    if retain_pool.size == 0:
        retain_pool = perm[(status[perm] == UNLABELLED) & ~topic[perm]]
        retain_source = "unlabelled"

    F, R, T = forget_pool.size, retain_pool.size, topic_pool.size
    if F == 0:
        raise SplitError(f"{source} has no forget documents under the rule")
    explicit = {k: getattr(targets, k) for k in SETS if getattr(targets, k) is not None}
    for k, v in explicit.items():
        if v < (0 if k == "topic" else 1):
            raise SplitError(f"held-out {k} size must be >= 1, got {v}")
    if not {"forget", "attack_pool", "forget_val"} <= set(explicit):
        if F < MIN_FORGET:
            raise SplitError(f"{source} has {F} forget document(s); at least {MIN_FORGET} are needed "
                             "(1 to evaluate on, 1 for the retraining attack, 1 for validation, "
                             "1 to train on)")
    sizes = {
        "forget": explicit.get("forget", _auto(targets.target_eval, F, 0.25)),
        "attack_pool": explicit.get("attack_pool", _auto(targets.target_attack, F, 0.25)),
        "forget_val": explicit.get("forget_val", _auto(targets.target_val, F, 0.125)),
        "retain": explicit.get("retain", _auto(targets.target_eval, R, 0.25)),
        "retain_val": explicit.get("retain_val", _auto(targets.target_val, R, 0.125)),
        "topic": explicit.get("topic", _auto(targets.target_eval, T, 0.5) if T else 0),
    }
    need_f = sizes["forget"] + sizes["attack_pool"] + sizes["forget_val"]
    if need_f >= F:
        raise SplitError(f"{source} has {F} forget documents; the held-out sets need {sizes['forget']} "
                         f"(evaluation) + {sizes['attack_pool']} (attack) + {sizes['forget_val']} (validation) "
                         "and at least 1 must stay for training; lower --n-eval / --n-attack / --n-val or "
                         "leave them unset (sized to the corpus)")
    need_r = sizes["retain"] + sizes["retain_val"]
    if need_r >= R:
        raise SplitError(f"{source} has {R} {retain_source} documents without a topic flag; the held-out sets "
                         f"need {sizes['retain']} (evaluation) + {sizes['retain_val']} (validation) and at "
                         "least 1 must stay for training; lower --n-eval / --n-val")
    if sizes["topic"] > T:
        raise SplitError(f"{source} has {T} unlabelled topical documents; {sizes['topic']} were asked for")
    n_fa = sizes["forget"] + sizes["attack_pool"]
    out = {"forget": forget_pool[: sizes["forget"]], "attack_pool": forget_pool[sizes["forget"]: n_fa],
           "forget_val": forget_pool[n_fa: need_f],
           "retain": retain_pool[: sizes["retain"]], "retain_val": retain_pool[sizes["retain"]: need_r],
           "topic": topic_pool[: sizes["topic"]]}
    held = np.zeros(n, dtype=bool)
    for v in out.values():
        held[v] = True
    out = {k: np.sort(v) for k, v in out.items()}
    out["train"] = np.flatnonzero(~held)
    return {"index": out, "sizes": sizes, "retain_source": retain_source,
            "available": {"forget": int(F), "retain": int(R), "topic": int(T)}}


def row_order(plan: dict, n_docs: int) -> tuple[np.ndarray, dict]:
    """Where each document goes in a token cache laid out as ``train`` then each held-out set:
    ``rows_of`` (row per document) and ``slices`` (rows of each set)."""
    rows_of = np.full(n_docs, -1, dtype=np.int64)
    slices, at = {}, 0
    for name in ("train", *SETS):
        idx = plan["index"][name]
        rows_of[idx] = np.arange(at, at + idx.size)
        slices[name] = slice(at, at + idx.size)
        at += idx.size
    return rows_of, slices
