"""Module routing on multi-topic stories (GRAM, arXiv 2607.08077; docs/modules.md).

The generated story corpus gets four topics (forest, sea, space, dinosaurs; each with its own
places, scenes, events and dialogue) as domains; the other stories are general. Trained per
seed on the same data and batch order:

- ``base``: every story, no modules; its validation curve defines the compute ratio;
- ``modular``: one auxiliary MLP per topic in every block (width ``module_width`` of the MLP),
  labelled topic stories run core + their module and train only the module (core frozen with
  probability ``p_cr``), general stories train the core (one random module on with probability
  ``p_as``; or each module independently: ``spread``); optionally (ours) the other modules also
  run, without learning, on a labelled topic story with probability ``p_other``; isolation under
  AdamW as in :mod:`gradroute.modules`. The schedule is chosen first among :data:`SELECT` candidates
  on the validation split of separate selection seeds (:func:`run_selection`, rule :data:`SELECT_RULE`)
  unless given explicitly: the official gateless schedules (``p_cr``, ``p_as``, ``spread``, ``p_other``)
  and keyed modules (ours: a module runs from its topic's first own word on) on the ordered schedule;
- ``filter_<topic>`` and ``filter_all``: drop that topic's (all topics') stories, from scratch;
- ``modular_partial`` / ``filter_partial``: half of all stories unlabelled (a seeded subset):
  unlabelled stories run and train everything; filtering drops only the *labelled* topic stories;
- ``demix``: one full-width expert per topic that *replaces* the MLP on its topic's stories
  (attention shared); an access profile routes a topic's stories to its expert when on, to the
  general MLP when off (oracle routing);
- ``ascent``: post-hoc unlearning of the attacked topic from the base model (gradient ascent on
  its labelled stories plus descent on general ones; checkpoint chosen on validation).

Evaluation: per-topic and general held-out loss (nats/token) for every on/off configuration of
the modular models (2**4 = 16) and of DEMix; the compute ratio CR (fit ``L(s) = c + a s^-b`` to
the base model's validation loss of that set against training step, invert it at a model's
loss, divide by the run's steps; per seed); an elicitation attack on the attacked topic (full-
batch AdamW on held-out topic stories at lr/4, constant, up to ``rounds`` steps, patience, keep
the weights with the best validation loss; report the test loss there) against: the modular
model released without the topic (gateless: ``export`` merges the other modules into a stock checkpoint;
keyed: the attached model with the topic's module zeroed and off),
the topic-filtered model, gradient ascent, and base.

    gradroute run modules --out runs/modules                 # quick profile
    gradroute run modules --seeds 0 --steps 60 --out /tmp/m  # a smoke run
    gradroute run modules --topic-vocab shared --out runs/modules_shared  # topics sharing the general vocabulary
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

import gradroute as gr
from gradroute.lm.corpus import TOPIC_NAMES, TOPIC_VOCABS, generate_topic_stories
from gradroute.lm.data import IGNORE, BatchOrder, Stories, encode_stories
from gradroute.lm.evaluate import mean_loss
from gradroute.lm.methods import make_model
from gradroute.lm.tokenizer import get_tokenizer
from gradroute.lm.train import TrainConfig, token_losses, train
from gradroute.modules import GENERAL, UNLABELLED
from gradroute.sweep import run_jobs, split_finished
from gradroute.utils import (claim_summary, format_ci, intervals_separate, markdown_table, mean_ci, plt,
                             read_json, resolve_device, savefig, set_seed, write_json)

DESCRIPTION = ("Module routing (GRAM): one auxiliary MLP per story topic, 16 access profiles from one run, vs "
               "base, per-profile data filtering, DEMix and gradient ascent; partial labels; elicitation attack; "
               "compute ratio.")

MLP_PATTERN = "transformer.h.*.mlp"
# The module schedule is chosen per profile among these few candidates, before the headline runs,
# on the validation split (``<set>_val``; never the evaluation split) of selection seeds that are
# not evaluation seeds. Candidates (our p_cr = probability the core is frozen on a labelled topic
# story = 1 - the official ``aux_route_prc``; our p_as = probability a general story runs and
# trains core + one module = the official ``robust_prc``): the official SimpleStories GRAM values
# (aux_route_prc 0.3, robust_prc 0.5), the official partial-label setting's core freeze
# (aux_route_prc 0), each with the official "one module" spread and our "each module" spread.
# Rule (SELECT_RULE, select_schedule): a candidate qualifies when, for every topic, removal is
# within 10% of filtering (val loss with only that module off >= 0.9 x the topic-filtered model's)
# and the module is useful (val loss with only that module on <= 1.1 x the base model's: the
# paper's retain-side compute ratio near 1); among qualifying candidates the smallest interference
# (largest |change| of another topic's or general val loss when one module is switched off,
# against all on); if none qualifies, the smallest worst shortfall of the two requirements. (The
# usefulness requirement was added after a rule on removal alone chose modules that had not
# learned their topic; docs/notes/2026-12-06-modules-research.md.)
# Candidates 4-7 (ours) add p_other, other modules running without learning on a labelled topic
# story, to the official values: a schedule change aimed at the measured cause of interference
# (docs/notes/2026-12-06-modules-research.md, rounds 3 and 6); the rule is unchanged.
SELECT = dict(seeds=[100], removal=0.9, useful=1.1, candidates=[
    dict(p_cr=0.7, p_as=0.5, spread="one", p_other=0.0),
    dict(p_cr=0.7, p_as=0.5, spread="each", p_other=0.0),
    dict(p_cr=1.0, p_as=0.5, spread="one", p_other=0.0),
    dict(p_cr=1.0, p_as=0.5, spread="each", p_other=0.0),
    dict(p_cr=0.7, p_as=0.5, spread="one", p_other=0.5),
    dict(p_cr=0.7, p_as=0.5, spread="each", p_other=0.5),
    dict(p_cr=0.7, p_as=0.5, spread="one", p_other=1.0),
    dict(p_cr=0.7, p_as=0.5, spread="each", p_other=1.0),
    # 8-10 (ours; research round 21, adopted by the rule fixed before its runs): keyed
    # modules (a module runs only from the first word of its topic alone on), topic-row deltas, the ordered
    # schedule with the core also learning the topic stories' openings; widths 0.5, 0.5 without the openings, 0.1
    dict(schedule="ordered", p_cr=1.0, p_as=0.0, p_other=0.0, width=0.5, module_embed="topic_rows",
         keys="exclusive_rows", core_prefix=True),
    dict(schedule="ordered", p_cr=1.0, p_as=0.0, p_other=0.0, width=0.5, module_embed="topic_rows",
         keys="exclusive_rows"),
    dict(schedule="ordered", p_cr=1.0, p_as=0.0, p_other=0.0, module_embed="topic_rows", keys="exclusive_rows",
         core_prefix=True),
])
# The 50%-unlabelled runs use the official partial-label GRAM schedule (src/run/experiment/partial/run.py:
# aux_route_prc 0 -> p_cr 1, robust_prc 0.2 -> p_as 0.2, one module), not the selected one.
PARTIAL = dict(p_cr=1.0, p_as=0.2, spread="one", p_other=0.0)
PROFILES = {
    # the whole sweep (3 seeds) in about 15 min on 2 CPU cores
    "quick": dict(
        corpus=dict(n_train=4000, topic_fraction=0.08, n_eval=64, n_val=32, n_attack=64, n_general_eval=128,
                    topic_vocab="own"),
        vocab_size=1024,
        model=dict(n_ctx=96, n_layer=2, n_head=4, d_model=64, d_mlp=256),
        train=dict(steps=200, lr=3e-3, warmup=10), batch_size=24, curve_points=16,
        modules=dict(width=0.1, p_cr=0.7, p_as=0.5, spread="one", p_other=0.0, select=SELECT, partial=PARTIAL), unlabelled_fraction=0.5,
        attack=dict(topic="forest", rounds=40, patience=5, lr_factor=0.25),
        ascent=dict(steps=30, lr_factor=0.1, eval_every=3, max_general_increase=0.05),
        seeds=3),
    # closer to the paper's stories setting (meant for a GPU): wider model, longer training
    "paper": dict(
        corpus=dict(n_train=100_000, topic_fraction=0.08, n_eval=512, n_val=256, n_attack=512, n_general_eval=1024,
                    topic_vocab="own"),
        vocab_size=4096,
        model=dict(n_ctx=256, n_layer=8, n_head=8, d_model=512, d_mlp=2048),
        train=dict(steps=5000, lr=5e-4, warmup=100), batch_size=64, curve_points=30,
        modules=dict(width=0.1, p_cr=0.7, p_as=0.5, spread="one", p_other=0.0, select=SELECT, partial=PARTIAL), unlabelled_fraction=0.5,
        attack=dict(topic="forest", rounds=200, patience=10, lr_factor=0.25),
        ascent=dict(steps=300, lr_factor=0.1, eval_every=10, max_general_increase=0.05),
        seeds=3),
}
TRAIN_STREAM, EVAL_STREAM = 0, 1
SETS = (*TOPIC_NAMES, "general")


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def _prepare(cfg_key: str):
    cfg = json.loads(cfg_key)
    c = cfg["corpus"]
    vocab = c.get("topic_vocab", "own")       # "own" topic vocabularies or "shared" (lm/corpus.py)
    texts, labels = generate_topic_stories(c["n_train"], seed=TRAIN_STREAM, topic_fraction=c["topic_fraction"],
                                           topic_vocab=vocab)
    per_topic = c["n_eval"] + c["n_val"] + c["n_attack"]
    need = max(c["n_general_eval"] + c["n_val"], per_topic)
    n_held = int(need / c["topic_fraction"] * 1.4) + 200
    held, held_labels = generate_topic_stories(n_held, seed=EVAL_STREAM, topic_fraction=c["topic_fraction"],
                                               topic_vocab=vocab)
    tok = get_tokenizer("bpe", texts=texts, vocab_size=cfg["vocab_size"])
    n_ctx = cfg["model"]["n_ctx"]
    data = encode_stories(tok, texts, n_ctx)
    seen = set(texts)
    keep = [i for i, t in enumerate(held) if t not in seen]
    held = [held[i] for i in keep]
    held_labels = [held_labels[i] for i in keep]
    h = encode_stories(tok, held, n_ctx)
    hl = torch.tensor(held_labels)
    sets = {}
    for k, name in enumerate((*TOPIC_NAMES, "general")):
        idx = (hl == (k if name != "general" else -1)).nonzero().flatten()
        n_eval = c["n_general_eval"] if name == "general" else c["n_eval"]
        n_attack = 0 if name == "general" else c["n_attack"]
        if len(idx) < n_eval + c["n_val"] + n_attack:
            raise ValueError(f"held-out corpus too small for {name}: {len(idx)} stories")
        sets[name] = h.subset(idx[:n_eval])
        sets[f"{name}_val"] = h.subset(idx[n_eval:n_eval + c["n_val"]])
        if n_attack:
            sets[f"{name}_attack"] = h.subset(idx[n_eval + c["n_val"]:n_eval + c["n_val"] + n_attack])
    counts = {name: int((torch.tensor(labels) == (k if name != "general" else -1)).sum())
              for k, name in enumerate((*TOPIC_NAMES, "general"))}
    return tok, data, torch.tensor(labels), sets, counts


def train_config(cfg: dict) -> dict:
    """The part of the config that training runs depend on (attack and ascent settings are
    not): changing the attack reruns only the attacks."""
    return {k: v for k, v in cfg.items() if k not in ("attack", "ascent")}


def _cfg_key(cfg: dict) -> str:
    return json.dumps({k: cfg[k] for k in ("corpus", "vocab_size", "model")}, sort_keys=True)


def unlabelled_subset(n: int, fraction: float, seed: int) -> torch.Tensor:
    """A seeded subset of ``fraction`` of all ``n`` training stories whose labels are hidden."""
    g = torch.Generator().manual_seed(seed * 7 + 12345)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=g)[: round(fraction * n)]] = True
    return mask


# ------------------------------------------------------------------------------------------
# methods
# ------------------------------------------------------------------------------------------
METHODS = ("base", "modular", *[f"filter_{t}" for t in TOPIC_NAMES], "filter_all", "modular_partial",
           "filter_partial", "demix")


def _spec(cfg: dict, vocab_size: int) -> dict:
    return dict(cfg["model"], vocab_size=vocab_size, arch="gpt")


# ``modules.keys`` (ours; default off, the key is then absent from the config; a departure from the paper's
# gateless modules; docs/modules.md, "The API"): each topic's modules run at a position only once one of its
# *key* tokens has occurred in the story (``add_modules(..., keys=...)``): ``"topic_rows"`` the ids of
# ``topic_only_token_ids`` (in the topic's labelled training stories, in no labelled general story),
# ``"exclusive_rows"`` those of ``exclusive=True`` (also in no other topic's). Architecture, like ``width``: the
# partial-label model keeps it (keys from its own labelled stories).
# ``modules.module_embed = "topic_rows"`` (with keys only; absent = no deltas): each topic's module also has a
# token-embedding delta on the rows of its topic's own tokens (``embed_delta={topic: topic_only_token_ids(...)}``),
# gated by its keys and trained with the module.
KEY_ROWS = ("topic_rows", "exclusive_rows")
# the keys of the ordered schedule: dropped together for the single-phase partial-label model
ORDERED_KEYS = ("schedule", "core_prefix")


def _keys(value):
    if value in (None, False):
        return False
    if value in KEY_ROWS:
        return value
    raise ValueError(f"modules.keys must be 'topic_rows' or 'exclusive_rows', got {value!r}")


def _union_keys(key_ids: dict, vocab_size: int) -> torch.Tensor:
    """``(vocab,)`` bool: the keys of any topic."""
    m = torch.zeros(vocab_size, dtype=torch.bool)
    for ids in key_ids.values():
        m[ids] = True
    return m


def keys_for(keys, data: Stories, route_labels: torch.Tensor, vocab_size: int) -> dict | None:
    """The key ids of a ``modules.keys`` setting (``{topic: ids}``), or ``None`` without keys."""
    keys = _keys(keys)
    if not keys:
        return None
    return topic_only_token_ids(data, route_labels, vocab_size, exclusive=keys == "exclusive_rows", what="keys")


def _module_embed(mc: dict):
    """``"topic_rows"`` or False; checks that it comes with keys."""
    value = mc.get("module_embed")
    if value in (None, False):
        return False
    if value != "topic_rows":
        raise ValueError(f"modules.module_embed must be 'topic_rows', got {value!r}")
    if not _keys(mc.get("keys")):
        raise ValueError("modules.module_embed 'topic_rows' gives keyed modules their embedding deltas: it needs "
                         "modules.keys")
    return value


def story_token_ids(data: Stories, mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Bool ``(vocab,)``: token ids occurring (as input or target) in the stories where ``mask``."""
    x, y = data.x[mask], data.y[mask]
    seen = torch.zeros(vocab_size, dtype=torch.bool)
    seen[y[y >= 0]] = True
    seen[x[:, :1].flatten()] = True              # the first token (inputs are the targets shifted by one)
    return seen


def topic_only_token_ids(data: Stories, route_labels: torch.Tensor, vocab_size: int,
                         exclusive: bool = False, what: str = "module_embed") -> dict:
    """``{topic: sorted LongTensor}``: token ids that occur in that topic's *labelled* training
    stories (``route_labels == k``) and in no labelled general story (``GENERAL``); with
    ``exclusive`` also in no other topic's labelled story (so no two topics share a row). Stories
    whose label is hidden (``UNLABELLED``) count for no side. Training split only."""
    general = story_token_ids(data, route_labels == GENERAL, vocab_size)
    seen = [story_token_ids(data, route_labels == k, vocab_size) for k in range(len(TOPIC_NAMES))]
    out = {}
    for k, t in enumerate(TOPIC_NAMES):
        keep = seen[k] & ~general
        if exclusive:
            for j, other in enumerate(seen):
                if j != k:
                    keep &= ~other
        ids = keep.nonzero().flatten()
        if ids.numel() == 0:
            rows = "exclusive_rows" if exclusive else "topic_rows"
            raise ValueError(f"{what} {rows}: topic {t} has no token outside the general stories"
                             + (" and the other topics' stories" if exclusive else ""))
        out[t] = ids
    return out


def embed_rows_for(module_embed, data: Stories, route_labels: torch.Tensor, vocab_size: int) -> dict | None:
    """The delta rows of a ``modules.module_embed`` setting: ``{topic: ids}``, or ``None`` without deltas."""
    if module_embed != "topic_rows":
        return None
    return topic_only_token_ids(data, route_labels, vocab_size)


def attach_modules(model, cfg: dict, method: str, embed_rows: dict | None = None, keys: dict | None = None):
    """``keys``: ``{topic: key ids}`` (:func:`keys_for`) or None; ``embed_rows``: ``{topic: token ids}``
    (:func:`embed_rows_for`, keyed modules only) or None."""
    width = 1.0 if method == "demix" else cfg["modules"]["width"]
    return gr.add_modules(model, MLP_PATTERN, list(TOPIC_NAMES), width=width, keys=keys, embed_delta=embed_rows)


def _step_generator(seed: int, idx: torch.Tensor) -> torch.Generator:
    """The random draws (p_cr, p_as) of a batch: a pure function of the seed and the rows."""
    return torch.Generator().manual_seed(seed * 1_000_003 + int(idx.sum()) * 31 + int(idx[0]))


def routing_labels(labels: torch.Tensor, unlabelled: torch.Tensor | None) -> torch.Tensor:
    """Topic stories -> topic index, general -> GENERAL, hidden ones -> UNLABELLED."""
    out = torch.where(labels >= 0, labels, torch.full_like(labels, GENERAL))
    if unlabelled is not None:
        out[unlabelled] = UNLABELLED
    return out


def modular_loss(mods, route_labels: torch.Tensor, p_cr: float, p_as: float, seed: int, spread: str = "one",
                 p_other: float = 0.0):
    def loss_fn(net, b):
        with mods.route(route_labels[b.index], p_cr=p_cr, p_as=p_as, generator=_step_generator(seed, b.index),
                        spread=spread, p_other=p_other):
            return token_losses(net, b.x, b.y).sum()
    return loss_fn


def demix_loss(mods, labels: torch.Tensor):
    """A topic story runs only its expert in place of the MLP; a general story only the MLP.
    Everything that runs learns (attention and embeddings are shared)."""
    K = mods.K

    def loss_fn(net, b):
        lab = labels[b.index]
        fwd = torch.zeros(len(lab), 1 + K)
        topic = lab >= 0
        fwd[~topic, 0] = 1.0
        fwd[topic.nonzero().flatten(), 1 + lab[topic]] = 1.0
        learn = fwd.bool()
        learn[:, 0] = True                       # the shared (non-MLP) core learns from every story
        with mods.route(forward=fwd, learn=learn):
            return token_losses(net, b.x, b.y).sum()
    return loss_fn


# ``modules.schedule = "ordered"`` (ours, after the official ``do_routed_ordered``; default absent = the
# single-phase schedule): the same stories as the single-phase model in the same order, split by phase. Phase 1
# trains the core alone (modules do not run) on the general (and unlabelled) rows of every step's batch, for the
# profile's steps; phase 2 trains the modules alone (the core frozen: out of the optimizer and core-frozen by the
# router) on the labelled topic rows of every step's batch that has any (one optimizer step per such batch): a
# topic story runs core + its module (+ each other module with probability ``p_other``, not learning). Each
# phase has its own AdamW and its own warmup + cosine cycle (the official code: one lr cycle per phase), through
# the one training loop (``lm.train.train``, called once per phase). p_cr is 1 and p_as 0 by construction.
#
# ``modules.core_prefix`` (ordered with ``keys`` only; absent = false = the core learns on general rows only;
# ours): phase 1 also trains the core on the labelled topic rows of each step, but only on their *openings*:
# target positions before the first key of any topic in the story (no key among the inputs up to that
# position, and the target itself not a key; :func:`opening_targets`). Everything from a story's first key on
# stays with its module.
SCHEDULES = ("single", "ordered")


def _core_prefix(mc: dict) -> bool:
    v = mc.get("core_prefix", False)
    if not isinstance(v, bool):
        raise ValueError(f"modules.core_prefix must be true or false, got {v!r}")
    if v and (mc.get("schedule", "single") != "ordered" or not _keys(mc.get("keys"))):
        raise ValueError("modules.core_prefix trains the core in phase 1 of the ordered schedule on the topic stories' "
                         "targets before any topic's key: it needs modules.schedule 'ordered' and modules.keys, got "
                         f"schedule {mc.get('schedule', 'single')!r} and keys {mc.get('keys')!r}")
    return v


def opening_targets(x: torch.Tensor, y: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Bool like ``y``: target positions before a story's first key (``keys``: a ``(vocab,)`` bool mask): no
    key among the inputs ``x[..., :t+1]`` and the target ``y[..., t]`` not a key (ignored targets: False)."""
    valid = y != IGNORE
    hit = keys[x] | (keys[y.clamp(min=0)] & valid)
    return valid & ~hit.int().cummax(-1).values.bool()


def _schedule(mc: dict) -> str:
    s = mc.get("schedule", "single")
    if s not in SCHEDULES:
        raise ValueError(f"modules.schedule must be one of {SCHEDULES}, got {s!r}")
    _core_prefix(mc)
    if s == "ordered" and (mc.get("p_cr", 1.0) != 1.0 or mc.get("p_as", 0.0) != 0.0):
        raise ValueError("modules.schedule 'ordered' freezes the core on every topic story and runs no module on "
                         f"general text: it needs p_cr 1.0 and p_as 0.0, got p_cr {mc.get('p_cr')} and p_as {mc.get('p_as')}")
    return s


def ordered_phases(order: BatchOrder, route_labels: torch.Tensor, steps: int,
                   core_prefix: bool = False) -> tuple[list, list]:
    """The two phases' batches (row indices) of the ordered schedule: per step of the single-phase order, its
    general/unlabelled rows (phase 1; every step) and its labelled topic rows (phase 2; steps without any are
    skipped). Together exactly the single-phase model's stories. With ``core_prefix`` phase 1 has every row of
    each step (the topic rows' targets are then limited to their openings by :func:`train_ordered`)."""
    one, two = [], []
    for s in range(steps):
        idx = order.indices(s)
        topic = route_labels[idx] >= 0
        if core_prefix:
            one.append(idx)
        elif (~topic).any():
            one.append(idx[~topic])
        if topic.any():
            two.append(idx[topic])
    return one, two


def _rows_batch(data: Stories, batches: list, y_all: torch.Tensor | None = None):
    """Batches of the rows ``batches[step]``; ``y_all``: targets to use instead of ``data.y``."""
    from gradroute.lm.data import Batch

    def batch_at(step):
        idx = batches[step]
        y = (data.y if y_all is None else y_all)[idx]
        return Batch(data.x[idx], y, data.keyword[idx], data.forget[idx], data.labelled[idx], idx,
                     int((y != IGNORE).sum()))
    return batch_at


def train_ordered(model, mods, data: Stories, order: BatchOrder, route_labels: torch.Tensor, tc: dict, seed: int,
                  p_other: float = 0.0, desc: str = "modular", device: str = "cpu",
                  prefix_keys: torch.Tensor | None = None) -> dict:
    """Train ``model`` (with ``mods`` attached) by the ordered schedule (see :data:`SCHEDULES`);
    returns ``{"phases": [log of phase 1, log of phase 2], "steps": [n1, n2], "phase2_rows": {...}}``.
    ``prefix_keys`` (``(vocab,)`` bool, ``modules.core_prefix``): phase 1 also learns the labelled topic
    rows' targets before their first key (:func:`opening_targets`); then ``"core_prefix_targets"`` is added."""
    one, two = ordered_phases(order, route_labels, tc["steps"], core_prefix=prefix_keys is not None)
    y_core = None
    if prefix_keys is not None:
        topic = route_labels >= 0
        y_core = data.y.clone()
        y_core[topic] = torch.where(opening_targets(data.x[topic], data.y[topic], prefix_keys), data.y[topic],
                                    torch.full_like(data.y[topic], IGNORE))
    if not one or not two:
        raise ValueError("schedule 'ordered' needs general/unlabelled and labelled topic stories")
    K = mods.K
    mod_ids = {id(p) for p in mods.module_params()}

    def core_loss(net, b):                       # phase 1: core only, modules do not run
        n = len(b.index)
        fwd = torch.zeros(n, 1 + K)
        fwd[:, 0] = 1.0
        with mods.route(forward=fwd, learn=fwd.bool()):
            return token_losses(net, b.x, b.y).sum()

    logs = []
    for phase, (batches, loss_fn, sel, y_all) in enumerate((
            (one, core_loss, lambda n, p: id(p) not in mod_ids, y_core),
            (two, modular_loss(mods, route_labels, 1.0, 0.0, seed, "one", p_other=p_other),
             lambda n, p: id(p) in mod_ids, None))):
        c = TrainConfig(**{**tc, "steps": len(batches), "warmup": min(tc.get("warmup", 0), len(batches) // 10)},
                        desc=f"{desc} phase {phase + 1}")
        logs.append(train(model, _rows_batch(data, batches, y_all), c, loss_fn=loss_fn, params=sel, device=device))
    rows2 = torch.cat(two)
    res = {"phases": logs, "steps": [len(one), len(two)],
           "phase2_rows": {"topic": int((route_labels[rows2] >= 0).sum()), "general": int((route_labels[rows2] < 0).sum())}}
    if y_core is not None:                       # topic targets the core learned on / all topic targets
        topic = route_labels >= 0
        res["core_prefix_targets"] = [int((y_core[topic] != IGNORE).sum()), int((data.y[topic] != IGNORE).sum())]
    return res


def allowed_for(method: str, labels: torch.Tensor, unlabelled: torch.Tensor) -> torch.Tensor | None:
    if method.startswith("filter_"):
        what = method[len("filter_"):]
        if what == "all":
            return labels < 0
        if what == "partial":
            return ~((labels >= 0) & ~unlabelled)
        return labels != TOPIC_NAMES.index(what)
    return None


def eval_sets(model, sets: dict, names=SETS) -> dict:
    return {n: mean_loss(model, sets[n]) for n in names}


def config_name(on: tuple) -> str:
    return "+".join(on) if on else "none"


def evaluate_configs(model, mods, sets: dict, demix: bool = False, suffix: str = "") -> dict:
    """Held-out loss of every set under every on/off configuration (``suffix="_val"``: on the
    validation split; rows are keyed by the set name without the suffix)."""
    res = {}
    for on in mods.configurations():
        row = {}
        for n in SETS:
            if demix:  # oracle routing: a topic's stories to its expert when on, else the general MLP
                ctx = mods.using(on=[n], core=0.0) if n in on else mods.using(on=[])
            else:
                ctx = mods.using(on=list(on))
            with ctx:
                row[n] = mean_loss(model, sets[n + suffix])
        res[config_name(on)] = row
    return res


def general_token_ids(data: Stories, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Bool ``(vocab,)``: token ids that occur as a target in some general training story (the
    rest occur only in topic stories: the topics' own vocabulary)."""
    y = data.y[labels < 0]
    y = y[y >= 0]
    seen = torch.zeros(vocab_size, dtype=torch.bool)
    seen[y] = True
    return seen


@torch.no_grad()
def interference_by_token(model, mods, sets: dict, shared_ids: torch.Tensor) -> dict:
    """Diagnostic: for each module ``A`` and each other set ``n``, the change of ``n``'s held-out
    loss (nats/token; + = worse) when only ``A`` is switched off (against all on), split into
    target tokens that also occur in general stories (``shared``) and tokens that occur only in
    topic stories (``topic_only``)."""
    from gradroute.lm.data import full_batches

    def per_token(n, **kw):
        L, Y = [], []
        with mods.using(**kw):
            for b in full_batches(sets[n], 64):
                L.append(token_losses(model, b.x, b.y))
                Y.append(b.y)
        return torch.cat(L), torch.cat(Y)
    ref = {n: per_token(n) for n in SETS}
    out = {}
    for a in mods.domains:
        row = {}
        for n in SETS:
            if n == a:
                continue
            L1, _ = per_token(n, off=[a])
            L0, Y = ref[n]
            keep = Y >= 0
            shared = keep & shared_ids[Y.clamp(min=0)]
            only = keep & ~shared
            d = L1 - L0
            row[n] = {"all": float(d[keep].mean()), "shared": float(d[shared].mean()) if shared.any() else None,
                      "topic_only": float(d[only].mean()) if only.any() else None,
                      "topic_only_fraction": float(only.sum() / keep.sum())}
        out[a] = row
    return out


def _run_path(out: Path, method: str, seed: int) -> Path:
    return out / "runs" / f"{method}_s{seed}.json"


def _model_path(out: Path, method: str, seed: int) -> Path:
    return out / "models" / f"{method}_s{seed}.pt"


def _order(cfg, data, seed, allowed=None):
    return BatchOrder(data, cfg["batch_size"], seed, allowed=allowed)


def run_train(method: str, seed: int, cfg: dict, out: Path, device: str = "cpu") -> dict:
    """Train one method with one seed, evaluate, save the model; write ``runs/<method>_s<seed>.json``."""
    t0 = time.time()
    tok, data, labels, sets, _ = _prepare(_cfg_key(cfg))
    set_seed(seed)
    model = make_model(_spec(cfg, tok.vocab_size), seed)
    unl = unlabelled_subset(len(labels), cfg["unlabelled_fraction"], seed)
    tc = dict(cfg["train"])
    eval_fn, mods, loss_fn, rows_info, key_ids = None, None, None, None, None
    if method == "base":
        every = max(1, tc["steps"] // cfg["curve_points"])
        tc["eval_every"] = every
        eval_fn = lambda m: {f"{n}_val": mean_loss(m, sets[f"{n}_val"]) for n in SETS}
    if method in ("modular", "modular_partial"):
        mc = cfg["modules"]
        if method == "modular_partial" and mc.get("partial"):
            mc = {**mc, **mc["partial"]}        # the official partial-label schedule (fixed, not selected)
            for k in ORDERED_KEYS:
                mc.pop(k, None)                 # single phase, as fixed (the ordered schedule's options go too)
        schedule = _schedule(mc)
        route_labels = routing_labels(labels, unl if method == "modular_partial" else None)
        embed_rows = embed_rows_for(_module_embed(mc), data, route_labels, tok.vocab_size)
        rows_info = None if embed_rows is None else {t: int(v.numel()) for t, v in embed_rows.items()}
        key_ids = keys_for(mc.get("keys"), data, route_labels, tok.vocab_size)
        mods = attach_modules(model, cfg, method, embed_rows=embed_rows, keys=key_ids)
        loss_fn = modular_loss(mods, route_labels, mc["p_cr"], mc["p_as"], seed, mc.get("spread", "one"),
                               p_other=mc.get("p_other", 0.0))
    elif method == "demix":
        mods = attach_modules(model, cfg, method)
        loss_fn = demix_loss(mods, labels)
    allowed = allowed_for(method, labels, unl)
    order = _order(cfg, data, seed, allowed)
    phases = phase2_rows = prefix_targets = None
    if method in ("modular", "modular_partial") and schedule == "ordered":
        ordered = train_ordered(model, mods, data, order, route_labels, tc, seed, p_other=mc.get("p_other", 0.0),
                                desc=f"{method} s{seed}", device=device,
                                prefix_keys=_union_keys(key_ids, tok.vocab_size) if _core_prefix(mc) else None)
        phases = ordered["steps"]
        prefix_targets = ordered.get("core_prefix_targets")
        phase2_rows = ordered["phase2_rows"]
        logs = ordered["phases"]
        log = {"history": [h for lg in logs for h in lg["history"]], "wall_s": sum(lg["wall_s"] for lg in logs)}
    else:
        log = train(model, order, TrainConfig(**tc, desc=f"{method} s{seed}"), eval_fn=eval_fn,
                    **({} if loss_fn is None else {"loss_fn": loss_fn}), device=device)
    result = {"method": method, "seed": seed, "config": train_config(cfg),
              "stories_trained_on": int(order.m), "train_wall_s": log["wall_s"],
              "train_loss_first": log["history"][0]["loss"], "train_loss_final": log["history"][-1]["loss"]}
    if phases is not None:
        result["ordered_steps"] = phases                 # optimizer steps of phase 1 (core), phase 2 (modules)
        result["ordered_phase2_rows"] = phase2_rows     # phase 2's topic (and general: none) rows
    if prefix_targets is not None:
        result["core_prefix_targets"] = prefix_targets  # topic targets the core learned on (openings), of all
    if method == "base":
        result["curve"] = [e for e in log["evals"]]
    if method in ("modular", "modular_partial") and rows_info is not None:
        result["module_embed_rows"] = rows_info          # rows per topic's delta (training split only)
    if key_ids is not None:
        result["module_keys"] = {t: int(v.numel()) for t, v in key_ids.items()}   # key ids per topic (training split)
    model.eval()
    if mods is not None:
        result["configs"] = evaluate_configs(model, mods, sets, demix=method == "demix")
        result["val_configs"] = evaluate_configs(model, mods, sets, demix=method == "demix", suffix="_val")
        if method != "demix":
            result["interference_by_token"] = interference_by_token(model, mods, sets,
                                                                    general_token_ids(data, labels, tok.vocab_size))
        result["module_params"] = mods.num_params()
        result["core_params"] = sum(p.numel() for p in mods.core_params())
    else:
        result["losses"] = eval_sets(model, sets)
        result["val_losses"] = {n: mean_loss(model, sets[f"{n}_val"]) for n in SETS}
    result["params"] = sum(p.numel() for p in model.parameters())
    result["wall_s"] = time.time() - t0
    _model_path(out, method, seed).parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), _model_path(out, method, seed))
    write_json(_run_path(out, method, seed), result)
    return result


# ------------------------------------------------------------------------------------------
# post-hoc unlearning and the elicitation attack
# ------------------------------------------------------------------------------------------
class _Stop(Exception):
    pass


def _best_of(model, cfg_train: TrainConfig, order, eval_fn, score, patience: int | None, device, **kw):
    """Train with ``train()``; ``score(evals) -> float or None`` (lower is better; None = not
    allowed) picks the kept weights; stop after ``patience`` evaluations without improvement."""
    best = {"score": math.inf, "state": None, "step": None, "evals": None}
    since = [0]

    def ev(m):
        r = eval_fn(m)
        s = score(r)
        if s is not None and s < best["score"]:
            best.update(score=s, state={k: v.detach().clone() for k, v in m.state_dict().items()}, evals=r)
            since[0] = 0
        else:
            since[0] += 1
        return r

    def on_step(step, rec):
        if patience is not None and since[0] >= patience:
            raise _Stop
    steps_done = cfg_train.steps
    try:
        log = train(model, order, cfg_train, eval_fn=ev, on_step=on_step, distributed=False, device=device, **kw)
        evals = log["evals"]
    except _Stop:
        evals = None
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    return best, evals, steps_done


def gradient_ascent(base_model, cfg: dict, data: Stories, labels: torch.Tensor, unl: torch.Tensor, topic: int,
                    sets: dict, seed: int, device: str):
    """Post-hoc unlearning of ``topic`` from the base model: per step, minus the loss on a batch
    of its labelled training stories plus the loss on a batch of general ones. The kept weights:
    the highest topic validation loss among evaluations whose general validation loss is at most
    ``max_general_increase`` above the base model's (the starting point included)."""
    ac = cfg["ascent"]
    model = copy.deepcopy(base_model)
    name = TOPIC_NAMES[topic]
    lab_topic = labels == topic
    half = max(1, cfg["batch_size"] // 2)
    f_order = BatchOrder(data, half, seed + 1, allowed=lab_topic)
    r_order = BatchOrder(data, cfg["batch_size"] - half, seed + 2, allowed=labels < 0)

    def batch_at(step):
        fb, rb = f_order(step), r_order(step)
        from gradroute.lm.data import Batch
        cat = lambda a, b: torch.cat([a, b])
        extra = {"n_forget": fb.x.shape[0]}
        return Batch(cat(fb.x, rb.x), cat(fb.y, rb.y), cat(fb.keyword, rb.keyword), cat(fb.forget, rb.forget),
                     cat(fb.labelled, rb.labelled), cat(fb.index, rb.index), fb.n_tokens + rb.n_tokens, extra)

    def loss_fn(net, b):
        per = token_losses(net, b.x, b.y).sum(1)
        k = b.extra["n_forget"]
        return -per[:k].sum() + per[k:].sum()

    g0 = mean_loss(model, sets["general_val"])
    limit = g0 + ac["max_general_increase"]
    ev = lambda m: {"topic_val": mean_loss(m, sets[f"{name}_val"]), "general_val": mean_loss(m, sets["general_val"])}
    score = lambda r: -r["topic_val"] if r["general_val"] <= limit else None
    lr = cfg["train"]["lr"] * ac["lr_factor"]
    tcfg = TrainConfig(steps=ac["steps"], lr=lr, min_lr=lr, warmup=0, eval_every=ac["eval_every"],
                       desc=f"ascent s{seed}")
    best, _, _ = _best_of(model, tcfg, batch_at, ev, score, None, device, loss_fn=loss_fn)
    return model, {"kept": best["evals"], "general_val_base": g0}


def elicitation_attack(model, sets: dict, topic: str, cfg: dict, seed: int, device: str,
                       copy_model: bool = True) -> dict:
    """Full-batch AdamW on the held-out attack stories of ``topic`` at ``lr_factor`` x the
    training lr (constant), up to ``rounds`` steps, stopping after ``patience`` evaluations
    without a better validation loss; the weights with the best validation loss are kept (the
    unattacked model included) and their test loss reported. ``copy_model=False`` attacks ``model``
    itself (a model with modules attached, whose hooks a deep copy would leave bound to the original)."""
    a = cfg["attack"]
    m = copy.deepcopy(model) if copy_model else model
    pool = sets[f"{topic}_attack"]
    order = BatchOrder(pool, len(pool), seed + 99)
    lr = cfg["train"]["lr"] * a["lr_factor"]
    tcfg = TrainConfig(steps=a["rounds"], lr=lr, min_lr=lr, warmup=0, eval_every=1, desc=f"attack s{seed}")
    curve = []

    def ev(mm):
        r = {"val": mean_loss(mm, sets[f"{topic}_val"])}
        curve.append(r["val"])
        return r
    before = mean_loss(m, sets[topic])
    best, _, _ = _best_of(m, tcfg, order, ev, lambda r: r["val"], a["patience"], device)
    return {"before": before, "after": mean_loss(m, sets[topic]), "best_val": best["score"],
            "rounds_run": len(curve) - 1, "val_curve": curve,
            "general_after": mean_loss(m, sets["general"])}


def run_attacks(seed: int, cfg: dict, out: Path, device: str = "cpu") -> dict:
    """Per seed: gradient ascent from base, then the elicitation attack on modular (topic off,
    exported), topic-filtered, ascent and base."""
    t0 = time.time()
    tok, data, labels, sets, _ = _prepare(_cfg_key(cfg))
    set_seed(seed)
    topic = cfg["attack"]["topic"]
    k = TOPIC_NAMES.index(topic)
    spec = _spec(cfg, tok.vocab_size)
    load = lambda m, method: m.load_state_dict(torch.load(_model_path(out, method, seed), weights_only=True))
    base = make_model(spec, seed)
    load(base, "base")
    modular = make_model(spec, seed)
    mc = cfg["modules"]
    rl = routing_labels(labels, None)
    mods = attach_modules(modular, cfg, "modular", embed_rows=embed_rows_for(_module_embed(mc), data, rl, tok.vocab_size),
                          keys=keys_for(mc.get("keys"), data, rl, tok.vocab_size))
    load(modular, "modular")
    kept = [t for t in TOPIC_NAMES if t != topic]
    if mods.keys is not None:
        # a per-token gate cannot be merged into a stock model: the released model is the modular one with
        # the topic's module dropped (its parameters zeroed and switched off), the others on, attached
        with torch.no_grad():
            for p in mods.module_params(topic):
                p.zero_()
        mods.set(on=kept)
        released, release = modular, "attached"
    else:
        released, release = mods.export(on=kept), "export"   # stock model, topic module dropped
        mods.remove()
    filt = make_model(spec, seed)
    load(filt, f"filter_{topic}")
    unl = unlabelled_subset(len(labels), cfg["unlabelled_fraction"], seed)
    ascent, ainfo = gradient_ascent(base, cfg, data, labels, unl, k, sets, seed, device)
    res = {"seed": seed, "config": cfg, "topic": topic, "ascent": ainfo, "release": release,
           "ascent_losses": eval_sets(ascent, sets), "released_losses": eval_sets(released, sets)}
    for name, m in (("modular", released), (f"filter_{topic}", filt), ("ascent", ascent), ("base", base)):
        # the attached release is attacked in place: a deep copy would keep hooks bound to the original
        res.setdefault("attack", {})[name] = elicitation_attack(m, sets, topic, cfg, seed, device,
                                                                copy_model=m is not modular)
    res["wall_s"] = time.time() - t0
    write_json(_run_path(out, "attack", seed), res)
    return res


# ------------------------------------------------------------------------------------------
# compute ratio
# ------------------------------------------------------------------------------------------
def fit_power_law(steps, losses) -> dict:
    """Least squares ``L(s) = c + a * s**-b`` (s > 0)."""
    from scipy.optimize import curve_fit

    s = np.asarray(steps, float)
    L = np.asarray(losses, float)
    f = lambda x, a, b, c: c + a * np.power(x, -b)
    lo = float(L.min())
    p0 = (max(1e-3, float(L[0] - lo)) * float(s[0]) ** 0.5, 0.5, lo * 0.9)
    (a, b, c), _ = curve_fit(f, s, L, p0=p0, bounds=([1e-9, 1e-3, 0.0], [np.inf, 5.0, lo]), maxfev=20000)
    resid = L - f(s, a, b, c)
    return {"a": float(a), "b": float(b), "c": float(c), "rmse": float(np.sqrt(np.mean(resid ** 2)))}


CR_CAP = 10.0


def compute_ratio(loss: float, fit: dict, total_steps: int) -> float:
    """Steps the base model needs (on its fitted curve) to reach ``loss``, over ``total_steps``;
    losses at or below the fit's floor give :data:`CR_CAP`."""
    gap = loss - fit["c"]
    if gap <= 0:
        return CR_CAP
    return float(min(CR_CAP, (fit["a"] / gap) ** (1.0 / fit["b"]) / total_steps))


def base_fits(base_run: dict, warmup: int) -> dict:
    fits = {}
    for n in SETS:
        pts = [(e["step"], e[f"{n}_val"]) for e in base_run["curve"] if e["step"] > warmup]
        fits[n] = fit_power_law([p[0] for p in pts], [p[1] for p in pts])
    return fits


# ------------------------------------------------------------------------------------------
# schedule selection on the validation split
# ------------------------------------------------------------------------------------------
SELECT_RULE = ("on the validation split of the selection seeds (seed means), a candidate qualifies when "
               "(removal) for every topic t its val loss with only module t off is >= removal x the "
               "filter_t model's val loss on t, and (usefulness) for every topic t its val loss with only "
               "module t on is <= useful x the base model's val loss on t; among qualifying candidates the "
               "smallest interference (max over topics t and sets n != t of |L_n(all but t on) - "
               "L_n(all on)|); if none qualifies, the smallest worst shortfall max(removal / min_t removal "
               "ratio, max_t usefulness ratio / useful), ties by interference")


def select_schedule(cand_val: list, filter_val: dict, removal: float, base_val: dict | None = None,
                    useful: float | None = None) -> dict:
    """Apply :data:`SELECT_RULE`. ``cand_val[i]``: ``{config name: {set: val loss}}`` of candidate
    ``i``; ``filter_val[t]``: the ``filter_<t>`` model's val loss on topic ``t``; ``base_val[t]``:
    the base model's (``None``: no usefulness requirement)."""
    everything = config_name(tuple(TOPIC_NAMES))
    rows = []
    for i, cv in enumerate(cand_val):
        inter, ratio, use, by = 0.0, math.inf, 0.0, {}
        for t in TOPIC_NAMES:
            c = config_name(tuple(x for x in TOPIC_NAMES if x != t))
            change = max(abs(cv[c][n] - cv[everything][n]) for n in SETS if n != t)
            change_topics = max(abs(cv[c][n] - cv[everything][n]) for n in TOPIC_NAMES if n != t)
            r = cv[c][t] / filter_val[t]
            own = cv[config_name((t,))][t]
            by[t] = {"off_loss": cv[c][t], "filter_loss": filter_val[t], "ratio": r, "max_change_elsewhere": change,
                     "max_change_other_topics": change_topics, "own_on_loss": own}
            if base_val is not None:
                by[t].update(base_loss=base_val[t], useful_ratio=own / base_val[t])
                use = max(use, own / base_val[t])
            inter, ratio = max(inter, change), min(ratio, r)
        useful_ok = True if base_val is None or useful is None else use <= useful
        shortfall = removal / ratio if ratio > 0 else math.inf
        if base_val is not None and useful is not None:
            shortfall = max(shortfall, use / useful)
        rows.append({"candidate": i, "interference": inter,
                     "interference_topics": max(by[t]["max_change_other_topics"] for t in TOPIC_NAMES),
                     "removal_ratio_min": ratio,
                     "removal_ok": ratio >= removal, "useful_ratio_max": use if base_val is not None else None,
                     "useful_ok": useful_ok, "shortfall": shortfall,
                     "own_on_topic_loss": float(np.mean([by[t]["own_on_loss"] for t in TOPIC_NAMES])),
                     "all_on_general": cv[everything]["general"], "by_topic": by})
    ok = [r for r in rows if r["removal_ok"] and r["useful_ok"]]
    best = (min(ok, key=lambda r: r["interference"]) if ok
            else min(rows, key=lambda r: (r["shortfall"], r["interference"])))
    return {"chosen": best["candidate"], "any_qualifies": bool(ok), "any_removal_ok": any(r["removal_ok"] for r in rows),
            "rows": rows}


def _mean_configs(runs: list) -> dict:
    return {c: {n: float(np.mean([r["val_configs"][c][n] for r in runs])) for n in SETS} for c in runs[0]["val_configs"]}


# A candidate is a partial ``modules`` config merged into the profile's for that candidate's run (so
# every key reaches the run key: a run trained with other settings is retrained, never reused).
# ``width`` (ours): the module width of that candidate (a fraction of the MLP's
# hidden width, or an int unit count); absent: the profile's ``modules.width``.
CANDIDATE_KEYS = ("p_cr", "p_as", "spread", "p_other", "width", "module_embed", "keys") + ORDERED_KEYS
MAX_CANDIDATES = 12


def check_candidates(cands: list) -> None:
    """Clear errors for a bad ``modules.select.candidates`` list (before anything is trained)."""
    if not isinstance(cands, (list, tuple)):
        raise ValueError(f"modules.select.candidates: a list of schedules, got {cands!r}")
    if not cands or len(cands) > MAX_CANDIDATES:
        raise ValueError(f"modules.select.candidates: need 1 to {MAX_CANDIDATES} schedules, got {len(cands)}")
    for i, c in enumerate(cands):
        if not isinstance(c, dict):
            raise ValueError(f"modules.select.candidates[{i}]: a dict of schedule settings, got {c!r}")
        unknown = sorted(set(c) - set(CANDIDATE_KEYS))
        if unknown:
            raise ValueError(f"modules.select.candidates[{i}]: unknown key(s) {unknown}; allowed: {list(CANDIDATE_KEYS)}")
        w = c.get("width")
        if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float)) or w <= 0):
            raise ValueError(f"modules.select.candidates[{i}]: width must be a positive fraction of the MLP "
                             f"(float) or unit count (int), got {w!r}")
        # the values a run would refuse only when that candidate's training starts
        for p in ("p_cr", "p_as", "p_other"):
            v = c.get(p)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1):
                raise ValueError(f"modules.select.candidates[{i}]: {p} must be a number in [0, 1], got {v!r}")
        if c.get("spread", "one") not in ("one", "each"):
            raise ValueError(f"modules.select.candidates[{i}]: spread must be 'one' or 'each', got {c['spread']!r}")
        try:
            _keys(c.get("keys"))
            _module_embed(c)
            if any(k in c for k in ORDERED_KEYS):   # an ordered one states p_cr 1, p_as 0 itself
                mc = {k: c[k] for k in (*ORDERED_KEYS, "keys") if k in c}
                if c.get("schedule") == "ordered":       # (not the profile's p_cr 0.7)
                    mc.update(p_cr=c.get("p_cr"), p_as=c.get("p_as"))
                _schedule(mc)
        except ValueError as e:
            raise ValueError(f"modules.select.candidates[{i}]: {e}") from None


def not_applicable(cfg: dict, cand: dict) -> str | None:
    """Why candidate ``cand`` cannot be built on ``cfg``'s corpus (a row or key option whose topic has no such
    token, e.g. keys on the shared-vocabulary topics), or None."""
    mc = {**cfg["modules"], **cand}
    if not (_module_embed(mc) or _keys(mc.get("keys"))):
        return None
    tok, data, labels, _, _ = _prepare(_cfg_key(cfg))
    rl = routing_labels(labels, None)
    try:
        embed_rows_for(_module_embed(mc), data, rl, tok.vocab_size)
        keys_for(mc.get("keys"), data, rl, tok.vocab_size)
    except ValueError as e:
        return str(e)
    return None


def run_selection(cfg: dict, out: Path, device: str, workers: int, eval_seeds=()) -> dict:
    """Train the candidates and the single-topic filters on the selection seeds, pick the
    schedule by :data:`SELECT_RULE` on the validation split; resumable (``out/select``)."""
    sel = cfg["modules"]["select"]
    cands = sel["candidates"]
    check_candidates(cands)
    overlap = set(sel["seeds"]) & (set(range(cfg["seeds"])) | set(eval_seeds))
    if overlap:
        raise ValueError(f"modules.select.seeds {sorted(overlap)} are evaluation seeds; use other seeds")
    root = out / "select"
    skipped = {i: why for i, c in enumerate(cands) if (why := not_applicable(cfg, c))}
    usable = [i for i in range(len(cands)) if i not in skipped]
    if not usable:
        raise ValueError(f"modules.select.candidates: none can be built on this corpus: {skipped}")
    jobs, where = [], {}
    for s in sel["seeds"]:
        if sel.get("useful") is not None:
            jobs.append(("base", s, "filters"))
        for t in TOPIC_NAMES:
            jobs.append((f"filter_{t}", s, "filters"))
        for i in usable:
            jobs.append(("modular", s, f"c{i}"))

    def cand_cfg(tag):
        c = copy.deepcopy(cfg)
        if tag.startswith("c"):
            c["modules"].update(cands[int(tag[1:])])
        return c
    results = {}
    for tag in dict.fromkeys(j[2] for j in jobs):
        c = cand_cfg(tag)
        keys = [(m, s) for m, s, tg in jobs if tg == tag]
        done, todo = split_finished(keys, lambda m, s: _run_path(root / tag, m, s), train_config(c), verbose=False)
        done.update(run_jobs(todo, functools.partial(run_train, cfg=c, out=root / tag, device=device), workers,
                             desc=f"select {tag}"))
        for (m, s), r in done.items():
            results[(m, s, tag)] = r
    filter_val = {t: float(np.mean([results[(f"filter_{t}", s, "filters")]["val_losses"][t] for s in sel["seeds"]]))
                  for t in TOPIC_NAMES}
    cand_val = [_mean_configs([results[("modular", s, f"c{i}")] for s in sel["seeds"]]) for i in usable]
    base_val = None
    if sel.get("useful") is not None:
        base_val = {t: float(np.mean([results[("base", s, "filters")]["val_losses"][t] for s in sel["seeds"]]))
                    for t in TOPIC_NAMES}
    choice = select_schedule(cand_val, filter_val, sel["removal"], base_val, sel.get("useful"))
    for r in choice["rows"]:                         # indices into the full candidate list
        r["candidate"] = usable[r["candidate"]]
    choice["chosen"] = usable[choice["chosen"]]
    choice.update(skipped={str(i): why for i, why in skipped.items()}, rule=SELECT_RULE, seeds=sel["seeds"], removal=sel["removal"], useful=sel.get("useful"), candidates=cands,
                  schedule=cands[choice["chosen"]])
    return choice


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick",
                        help="quick (default: about 15 min on 2 CPU cores) or paper (a larger setting for a GPU)")
    parser.add_argument("--topic-vocab", choices=list(TOPIC_VOCABS), default="own",
                        help="topics with their own vocabulary (default) or SimpleStories-like topics made of "
                             "a topic-specific share of the general sentences (shared)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: range(profile seeds)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (override the profile)")
    parser.add_argument("--p-cr", type=float, default=None, help="core-freeze probability on labelled topic stories")
    parser.add_argument("--p-as", type=float, default=None, help="probability of one module on during general stories")
    parser.add_argument("--p-other", type=float, default=None,
                        help="probability that each other module runs, without learning, on a labelled topic "
                             "story (ours; default 0 = the official schedule)")
    parser.add_argument("--module-embed", choices=["topic-rows"], default=None,
                        help="with --keys: each topic's module also has its own token-embedding delta on the rows "
                             "of the topic's own tokens (ids in its training stories and in no general training "
                             "story), gated by its keys and trained with the module (ours; the headline's design)")
    parser.add_argument("--keys", choices=["topic-rows", "exclusive-rows"], default=None,
                        help="keyed modules (ours; the headline's design): a topic's module runs in a story only from "
                             "the first of its key tokens on: ids in its training stories and in no general one "
                             "(topic-rows) or also in no other topic's (exclusive-rows); modular models only")
    parser.add_argument("--core-prefix", action="store_true",
                        help="with --schedule ordered and --keys: phase 1 also trains the core on the topic "
                             "stories' openings, the targets before the story's first key of any topic (ours)")
    parser.add_argument("--width", type=float, default=None,
                        help="module width as a fraction of the MLP (default: the profile's 0.1); like --keys and "
                             "--core-prefix, an explicit setting: no selection")
    parser.add_argument("--spread", choices=["one", "each"], default=None,
                        help="general stories: one random module on with probability p_as (default), or each")
    parser.add_argument("--schedule", choices=list(SCHEDULES), default=None,
                        help="single (default: one phase, as the official unordered schedule) or ordered (ours, "
                             "after the official ordered schedule): phase 1 trains the core alone on the general "
                             "(and unlabelled) rows of every batch, phase 2 the modules alone, core frozen, on the "
                             "topic rows (p_cr 1, p_as 0; --p-other applies); modular model only")
    parser.add_argument("--no-select", action="store_true",
                        help="use the profile's schedule (or --p-cr/--p-as/--spread/--p-other) without selecting one on "
                             "the validation split")
    parser.add_argument("--attack-rounds", type=int, default=None, help="elicitation rounds (override the profile)")
    parser.add_argument("--attack-patience", type=int, default=None, help="elicitation patience (override the profile)")
    parser.add_argument("--no-attack", action="store_true", help="skip gradient ascent and the elicitation attack")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="parallel training processes on CPU (1 = in this process)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in this process (default: 1)")


def build_config(args: argparse.Namespace) -> dict:
    cfg = copy.deepcopy(PROFILES[args.profile])
    cfg["profile"] = args.profile
    cfg["corpus"]["topic_vocab"] = getattr(args, "topic_vocab", None) or "own"   # part of every run's key
    if args.steps is not None:
        if args.steps < 2:
            raise ValueError(f"--steps must be >= 2, got {args.steps}")
        cfg["train"]["steps"] = args.steps
        cfg["train"]["warmup"] = min(cfg["train"]["warmup"], args.steps // 10)
    for flag, key in (("p_cr", "p_cr"), ("p_as", "p_as"), ("p_other", "p_other")):
        v = getattr(args, flag, None)
        if v is not None:
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"--{flag.replace('_', '-')} must be in [0, 1], got {v}")
            cfg["modules"][key] = v
    for flag, key in (("attack_rounds", "rounds"), ("attack_patience", "patience")):
        v = getattr(args, flag, None)
        if v is not None:
            if v < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
            cfg["attack"][key] = v
    if args.spread is not None:
        cfg["modules"]["spread"] = args.spread
    if getattr(args, "module_embed", None):  # only when on: default configs (and resume keys) unchanged
        cfg["modules"]["module_embed"] = args.module_embed.replace("-", "_")
    if getattr(args, "keys", None):            # likewise
        cfg["modules"]["keys"] = args.keys.replace("-", "_")
    if getattr(args, "core_prefix", False):
        cfg["modules"]["core_prefix"] = True
    w = getattr(args, "width", None)
    if w is not None:
        if not 0 < w <= 4:
            raise ValueError(f"--width must be a fraction of the MLP in (0, 4], got {w}")
        cfg["modules"]["width"] = w
    if getattr(args, "schedule", None) == "ordered":   # only when on: default configs (and run keys) unchanged
        cfg["modules"]["schedule"] = "ordered"
        for flag, v in (("p_cr", 1.0), ("p_as", 0.0)):
            if getattr(args, flag, None) is None:
                cfg["modules"][flag] = v
        _schedule(cfg["modules"])                    # an explicit --p-cr / --p-as that contradicts it: an error
    if getattr(args, "core_prefix", False):
        _schedule(cfg["modules"])                    # --core-prefix needs --schedule ordered and --keys: an error
    _module_embed(cfg["modules"])                    # --module-embed needs --keys: an error
    if getattr(args, "no_select", False) or getattr(args, "core_prefix", False) or any(
            getattr(args, f, None) is not None for f in ("p_cr", "p_as", "spread", "p_other", "schedule", "keys", "width")):
        cfg["modules"].pop("select", None)     # an explicit schedule: no selection
    return cfg


def run(args: argparse.Namespace) -> dict:
    t0 = time.time()
    torch.set_num_threads(max(1, args.threads))
    cfg = build_config(args)
    device = str(resolve_device(args.device))
    out = Path(args.out)
    seeds = args.seeds if args.seeds is not None else list(range(cfg["seeds"]))
    methods = list(dict.fromkeys(["base", *args.methods]))        # base defines the compute ratio
    attack = not args.no_attack
    if attack:
        methods = list(dict.fromkeys([*methods, "modular", f"filter_{cfg['attack']['topic']}"]))
    _, data, labels, _, counts = _prepare(_cfg_key(cfg))
    print(f"corpus: {len(labels)} training stories; per topic {counts}")
    workers = 1 if device != "cpu" else max(1, args.workers)
    selection = None
    if cfg["modules"].get("select") and "modular" in methods:
        selection = run_selection(cfg, out, device, workers, seeds)
        cfg["modules"].update(selection["schedule"])
        print(f"module schedule chosen on the validation split: {selection['schedule']} "
              f"(candidate {selection['chosen']} of {len(selection['candidates'])})")
    jobs = [(m, s) for s in seeds for m in methods]
    results, todo = split_finished(jobs, lambda *k: _run_path(out, *k), train_config(cfg))
    results.update(run_jobs(todo, functools.partial(run_train, cfg=cfg, out=out, device=device), workers,
                            desc="modules runs"))
    attacks = {}
    if attack:
        akeys = [("attack", s) for s in seeds]
        done, todo = split_finished(akeys, lambda *k: _run_path(out, *k), cfg)
        attacks.update(done)
        attacks.update(run_jobs([(s,) for s in [k[1] for k in todo]],
                                functools.partial(run_attacks, cfg=cfg, out=out, device=device), workers,
                                desc="ascent + elicitation"))
        attacks = {k[1] if isinstance(k, tuple) and len(k) == 2 else k[0]: v for k, v in attacks.items()}
    summary = summarize(results, attacks, seeds, cfg)
    claims = check_claims(summary)
    metrics = {"experiment": "modules", "profile": cfg["profile"], "config": cfg, "seeds": seeds,
               "methods": methods, "corpus": counts, "selection": selection, "summary": summary, "claims": claims,
               "runs": {f"{m}_s{s}": {k: v for k, v in r.items() if k != "config"} for (m, s), r in results.items()},
               "attacks": {str(s): {k: v for k, v in r.items() if k != "config"} for s, r in attacks.items()},
               "wall_time_s": time.time() - t0}
    skipped = {int(i) for i in (selection or {}).get("skipped", {})}       # candidates this corpus cannot build
    cands = [c for i, c in enumerate((selection or {}).get("candidates") or []) if i not in skipped]
    # rows of each topic's embedding delta (fully labelled model; training split only), when any run uses them
    if any(_module_embed(c) for c in [cfg["modules"], *cands]):
        tok = _prepare(_cfg_key(cfg))[0]
        rows = embed_rows_for("topic_rows", data, routing_labels(labels, None), tok.vocab_size)
        metrics["module_embed_rows"] = {t: int(v.numel()) for t, v in rows.items()}
    write_json(out / "metrics.json", metrics)
    (out / "summary.md").write_text(summary_md(summary, claims, selection))
    make_figures(out, summary, results)
    print(summary_md(summary, claims, selection))
    print(f"wrote {out / 'metrics.json'} ({metrics['wall_time_s']:.0f} s)")
    return metrics


# ------------------------------------------------------------------------------------------
# summary
# ------------------------------------------------------------------------------------------
def _ci(values):
    return mean_ci([float(v) for v in values])


def summarize(results: dict, attacks: dict, seeds, cfg) -> dict:
    S = cfg["train"]["steps"]
    fits = {s: base_fits(results[("base", s)], cfg["train"]["warmup"]) for s in seeds if ("base", s) in results}
    cr = lambda s, n, L: compute_ratio(L, fits[s][n], S)
    summ: dict = {"fits": {str(s): f for s, f in fits.items()}, "steps": S,
                  "topic_vocab": cfg["corpus"].get("topic_vocab", "own")}
    # single-model losses and CRs
    flat = {}
    for (m, s), r in results.items():
        if "losses" in r:
            flat.setdefault(m, {}).setdefault("all", []).append((s, r["losses"]))
        else:
            for c, row in r["configs"].items():
                flat.setdefault(m, {}).setdefault(c, []).append((s, row))
    table = {}
    for m, by_c in flat.items():
        for c, rows in by_c.items():
            d = table.setdefault(m, {}).setdefault(c, {})
            for n in SETS:
                d[n] = {"loss": _ci([row[n] for _, row in rows]),
                        "cr": _ci([cr(s, n, row[n]) for s, row in rows]),
                        "loss_by_seed": {str(s): row[n] for s, row in rows}}
    summ["table"] = table
    # diagnostic: what switching one module off does to the other topics, by token class
    ibt = {}
    for (m, s), r in results.items():
        if "interference_by_token" not in r:
            continue
        d = r["interference_by_token"]
        pairs = [d[a][n] for a in d for n in d[a] if n != "general"]
        for key in ("all", "shared", "topic_only"):
            vals = [p[key] for p in pairs if p[key] is not None]
            if vals:
                ibt.setdefault(m, {}).setdefault(f"other topics: {key}", []).append(float(np.mean(vals)))
                ibt[m].setdefault(f"other topics: |{key}|", []).append(float(np.mean(np.abs(vals))))
        ibt.setdefault(m, {}).setdefault("general: all", []).append(float(np.mean([d[a]["general"]["all"] for a in d])))
    summ["interference_by_token"] = {m: {k: _ci(v) for k, v in d.items()} for m, d in ibt.items()}
    if attacks:
        att = {}
        for s, a in attacks.items():
            for name, r in a["attack"].items():
                t = a["topic"]
                att.setdefault(name, {"before": [], "after": [], "cr_before": [], "cr_after": [], "rounds": []})
                att[name]["before"].append(r["before"])
                att[name]["after"].append(r["after"])
                att[name]["cr_before"].append(cr(s, t, r["before"]))
                att[name]["cr_after"].append(cr(s, t, r["after"]))
                att[name]["rounds"].append(r["rounds_run"])
        summ["attack"] = {n: {k: _ci(v) for k, v in d.items()} for n, d in att.items()}
        summ["attack_topic"] = next(iter(attacks.values()))["topic"]
        asc = [a["ascent_losses"] for a in attacks.values()]
        summ["ascent_losses"] = {n: _ci([x[n] for x in asc]) for n in SETS}
    return summ


def _get(summary, method, config, set_name, key="loss"):
    return summary["table"].get(method, {}).get(config, {}).get(set_name, {}).get(key, {}).get("mean")


def _seeds_of(summary, method, config, set_name) -> dict:
    return summary["table"].get(method, {}).get(config, {}).get(set_name, {}).get("loss_by_seed", {})


def check_claims(summary: dict) -> dict:
    """The issue's "what it must show", on seed means (with 95% intervals over seeds)."""
    claims = {}
    T = summary["table"]
    if "modular" not in T:
        return claims
    everything = config_name(tuple(TOPIC_NAMES))
    configs = list(T["modular"])
    # 1. single module off vs its topic filtered
    single = {}
    for t in TOPIC_NAMES:
        if f"filter_{t}" not in T:
            continue
        c = config_name(tuple(x for x in TOPIC_NAMES if x != t))
        off_cr, filt_cr = _get(summary, "modular", c, t, "cr"), _get(summary, f"filter_{t}", "all", t, "cr")
        off_l, filt_l = _get(summary, "modular", c, t), _get(summary, f"filter_{t}", "all", t)
        others = {n: _get(summary, "modular", c, n) - _get(summary, "modular", everything, n)
                  for n in SETS if n != t}
        by_seed = {n: _seeds_of(summary, "modular", c, n) for n in SETS}
        ref = {n: _seeds_of(summary, "modular", everything, n) for n in SETS}
        worst = [max(abs(by_seed[n][sd] - ref[n][sd]) for n in SETS if n != t) for sd in by_seed[t]]
        off_ci = _ci(list(by_seed[t].values()))
        filt_ci = _ci(list(_seeds_of(summary, f"filter_{t}", "all", t).values()))
        single[t] = {"loss_off_ci": off_ci, "loss_filter_ci": filt_ci, "off_vs_filter_separate": bool(intervals_separate(off_ci, filt_ci)),
                     "max_change_elsewhere_ci": _ci(worst),
                     "max_change_elsewhere_below_0.05_ci": _ci(worst)["hi"] < 0.05 if len(worst) > 1 else None,
                     "cr_off": off_cr, "cr_filter": filt_cr, "loss_off": off_l, "loss_filter": filt_l,
                     "loss_within_10pct": abs(off_l - filt_l) <= 0.1 * filt_l,
                     "cr_within_0.1": abs(off_cr - filt_cr) <= 0.1,
                     "others_change": others, "others_below_0.05": all(abs(v) < 0.05 for v in others.values())}
    if single:
        claims["single module off ~ topic filtering (CR within 0.1), others change < 0.05 nats"] = {
            "holds": all(v["cr_within_0.1"] and v["others_below_0.05"] for v in single.values()), "by_topic": single}
    # 2. all 16 configurations: off topics vs that topic's filter, on topics and general vs everything on
    if all(f"filter_{t}" in T for t in TOPIC_NAMES):
        per = {}
        for c in configs:
            on = [] if c == "none" else c.split("+")
            off_ok = all(abs(_get(summary, "modular", c, t, "cr") - _get(summary, f"filter_{t}", "all", t, "cr")) <= 0.1
                         for t in TOPIC_NAMES if t not in on)
            keep = {n: _get(summary, "modular", c, n) - _get(summary, "modular", everything, n)
                    for n in [*on, "general"]}
            per[c] = {"off_topics_cr_within_0.1_of_filter": off_ok, "on_and_general_change": keep,
                      "on_and_general_below_0.05": all(abs(v) < 0.05 for v in keep.values())}
        claims["every one of the 16 configurations"] = {
            "holds": all(v["off_topics_cr_within_0.1_of_filter"] and v["on_and_general_below_0.05"]
                         for v in per.values()),
            "configs_holding": sum(v["off_topics_cr_within_0.1_of_filter"] and v["on_and_general_below_0.05"]
                                   for v in per.values()), "by_config": per}
    # 3. partial labels: removal at least as strong as filtering of the labelled data only
    if "modular_partial" in T and "filter_partial" in T:
        by = {}
        for t in TOPIC_NAMES:
            a = _ci(list(_seeds_of(summary, "modular_partial", "none", t).values()))
            b = _ci(list(_seeds_of(summary, "filter_partial", "all", t).values()))
            by[t] = {"modular_partial_off": a["mean"], "filter_partial": b["mean"], "modular_partial_off_ci": a,
                     "filter_partial_ci": b, "intervals_separate": bool(intervals_separate(a, b))}
        claims["50% unlabelled: modules off remove at least as much as filtering the labelled data"] = {
            "holds": all(v["modular_partial_off"] >= v["filter_partial"] for v in by.values()), "by_topic": by}
    # 4. elicitation: modules' recovered CR within 0.1 of filtering's
    if "attack" in summary:
        A, t = summary["attack"], summary["attack_topic"]
        f = A.get(f"filter_{t}")
        if f and "modular" in A:
            claims["after elicitation, modules ~ filtering (CR within 0.1)"] = {
                "holds": abs(A["modular"]["cr_after"]["mean"] - f["cr_after"]["mean"]) <= 0.1,
                "modular_cr_after": A["modular"]["cr_after"], "filter_cr_after": f["cr_after"],
                "ascent_cr_after": A.get("ascent", {}).get("cr_after"),
                "intervals_separate": (A["modular"]["cr_after"]["hi"] < f["cr_after"]["lo"]
                                       or f["cr_after"]["hi"] < A["modular"]["cr_after"]["lo"])}
    return claims


def _fmt(c: dict, digits=3) -> str:
    return format_ci(c, digits) + (" (n=1)" if c["n"] == 1 else "")


def main_table(summary: dict) -> tuple[list, list]:
    """Rows: each model / access profile; columns: per set loss and CR."""
    T = summary["table"]
    everything = config_name(tuple(TOPIC_NAMES))
    rows = []
    picks = [("base", "all", "base")]
    for m, label in (("modular", "modules"), ("modular_partial", "modules, 50% unlabelled"), ("demix", "DEMix")):
        if m in T:
            picks += [(m, everything, f"{label}: all on"), (m, "none", f"{label}: all off")]
            if m == "modular":
                picks += [(m, config_name(tuple(x for x in TOPIC_NAMES if x != t)), f"{label}: {t} off")
                          for t in TOPIC_NAMES]
    picks += [(m, "all", m) for m in T if m.startswith("filter_")]
    for m, c, label in picks:
        if m in T and c in T[m]:
            rows.append([label, *[f"{T[m][c][n]['loss']['mean']:.3f} / {T[m][c][n]['cr']['mean']:.2f}" for n in SETS]])
        if m == "modular" and c == everything and all(t in T[m] for t in TOPIC_NAMES):
            # usefulness: each topic with only its own module on (one profile per column)
            rows.append(["modules: only that topic's module on",
                         *[f"{T[m][t][t]['loss']['mean']:.3f} / {T[m][t][t]['cr']['mean']:.2f}" for t in TOPIC_NAMES],
                         "-"])
    return ["model / profile", *[f"{n} loss / CR" for n in SETS]], rows


def summary_md(summary: dict, claims: dict, selection: dict | None = None) -> str:
    h, rows = main_table(summary)
    vocab = summary.get("topic_vocab", "own")
    text = [f"Topic vocabulary: {vocab} ("
            + ("each topic has its own places, scenes, events and dialogue" if vocab == "own" else
               "SimpleStories-like: each topic uses a topic-specific share of the general sentences")
            + "; `--topic-vocab`).\n"]
    if selection:
        text.append(f"Module schedule {selection['schedule']}: candidate {selection['chosen']} of "
                    f"{len(selection['candidates'])}, chosen on the validation split (seeds {selection['seeds']}): "
                    f"{selection['rule']}.\n")
        text.append(markdown_table(
            ["candidate", "removal: min off/filter", "removal ok", "useful: max own-on/base", "useful ok",
             "interference (nats)", "interference, other topics only", "own module only: topic"],
            [[str(selection["candidates"][r["candidate"]]), f"{r['removal_ratio_min']:.2f}", str(r["removal_ok"]),
              "-" if r.get("useful_ratio_max") is None else f"{r['useful_ratio_max']:.2f}",
              str(r.get("useful_ok", True)), f"{r['interference']:.3f}",
              "-" if r.get("interference_topics") is None else f"{r['interference_topics']:.3f}",
              f"{r['own_on_topic_loss']:.2f}"]
             for r in selection["rows"]]) + "\n")
        for i, why in selection.get("skipped", {}).items():
            text.append(f"Candidate {i} {selection['candidates'][int(i)]} not trained: it cannot be built on this "
                        f"corpus ({why}).\n")
    text += ["### Held-out loss (nats/token) / compute ratio, seed means\n", markdown_table(h, rows)]
    if "attack" in summary:
        t = summary["attack_topic"]
        arows = [[n, _fmt(a["before"]), _fmt(a["after"]), _fmt(a["cr_before"], 2), _fmt(a["cr_after"], 2),
                  f"{a['rounds']['mean']:.0f}"] for n, a in summary["attack"].items()]
        text.append(f"\n### Elicitation attack on {t} (mean ± 95% CI half-width over seeds)\n")
        text.append(markdown_table([f"model ({t} removed)", f"{t} loss before", f"{t} loss after attack",
                                    "CR before", "CR after", "rounds run"], arows))
    if summary.get("interference_by_token"):
        text.append("\n### Switching one module off: change of the other sets' loss by token class (diagnostic)\n")
        text.append("Mean over modules A and other topics B of L_B(all but A on) - L_B(all on), nats/token "
                    "(+ = worse); `shared`: target tokens that also occur in general stories, `topic_only`: "
                    "tokens that occur only in topic stories. Seed means ± 95% CI half-width.\n")
        keys = ["other topics: all", "other topics: shared", "other topics: topic_only", "other topics: |all|",
                "general: all"]
        text.append(markdown_table(["model", *keys], [[m, *[_fmt(d[k]) if k in d else "-" for k in keys]]
                                                      for m, d in summary["interference_by_token"].items()]))
    text.append("\n### Claim checks\n")
    for k, v in claims.items():
        text.append(f"- {k}: **{'holds' if v['holds'] else 'fails'}**")
    return "\n".join(text) + "\n"


def make_figures(out: Path, summary: dict, results: dict) -> None:
    pyplot = plt()
    T = summary["table"]
    for m in ("modular", "modular_partial"):
        if m not in T:
            continue
        configs = sorted(T[m], key=lambda c: (0 if c == "none" else len(c.split("+")), c))
        M = np.array([[T[m][c][n]["loss"]["mean"] for n in SETS] for c in configs])
        fig, ax = pyplot.subplots(figsize=(7, 0.38 * len(configs) + 1.5))
        im = ax.imshow(M, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(SETS)), SETS)
        ax.set_yticks(range(len(configs)), [f"on: {c}" for c in configs], fontsize=8)
        for i in range(M.shape[0]):
            for j in range(M.shape[1]):
                ax.text(j, i, f"{M[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if M[i, j] < M.mean() else "black")
        fig.colorbar(im, ax=ax, label="held-out loss (nats/token), mean over seeds")
        ax.set_title(f"{m}: configuration x topic loss")
        savefig(fig, out / f"{m}_config_heatmap.png")
    base = [r for (mm, s), r in results.items() if mm == "base"]
    if base:
        fig, ax = pyplot.subplots(figsize=(6, 4))
        for n in SETS:
            pts = [(e["step"], e[f"{n}_val"]) for e in base[0]["curve"] if e["step"] > 0]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", ms=3, label=n)
            f = summary["fits"][str(base[0]["seed"])][n]
            xs = np.linspace(pts[0][0], pts[-1][0], 100)
            ax.plot(xs, f["c"] + f["a"] * xs ** -f["b"], "-", lw=1, color=ax.lines[-1].get_color())
        ax.set_xscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(f"base model, seed {base[0]['seed']}: learning curves and power-law fits")
        ax.legend(fontsize=7)
        savefig(fig, out / "base_curves.png")


def report(out: Path) -> dict:
    m = read_json(Path(out) / "metrics.json")
    summary, claims = m["summary"], m["claims"]
    verdict, checks = claim_summary(claims, "holds", "claim checks hold on seed means")
    h, rows = main_table(summary)
    cfg = m["config"]
    return {
        "title": "Module routing: composable topic modules switched off at inference (GRAM)",
        "claim": "Switching a topic's module off raises that topic's loss to the topic-filtered model's (CR within "
                 "0.1) while other topics and general stories change < 0.05 nats, in all 16 configurations; "
                 "with 50% unlabelled, removal >= filtering of the labelled data; after elicitation, modules ~ filtering.",
        "paper": "26M SimpleStories forget / elicited CR: modules 0.766 / 0.855, filtering 0.780 / 0.870, "
                 "MaxEnt 0.840 / 0.983; DEMix core CR 0.248; 400M with 50% labelled: modules 0.601 vs filtering 0.851.",
        "verdict": verdict,
        "detail": (f"{checks}. Profile {m['profile']}, topic vocabulary {cfg['corpus'].get('topic_vocab', 'own')}: "
                   f"{cfg['train']['steps']} steps of {cfg['batch_size']} stories, "
                   f"model {cfg['model']}, modules width {cfg['modules']['width']} of the MLP, p_cr "
                   f"{cfg['modules']['p_cr']}, p_as {cfg['modules']['p_as']}, spread "
                   f"{cfg['modules'].get('spread', 'one')}, p_other {cfg['modules'].get('p_other', 0.0)}"
                   + (", per-module token-embedding deltas on each topic's own token rows"
                      if cfg["modules"].get("module_embed") == "topic_rows" else "")
                   + (", ordered schedule (core, then modules)" if cfg["modules"].get("schedule") == "ordered" else "")
                   + (f", keyed modules (a module runs from the first {cfg['modules']['keys'].replace('_', '-')} "
                      "token of its topic in the story on; ours)" if cfg["modules"].get("keys") else "")
                   + (", the core also learns the topic stories' openings (before any key)"
                      if cfg["modules"].get("core_prefix") else "")
                   + (" (chosen on the validation split among " f"{len(m['selection']['candidates'])} candidates)"
                      if m.get("selection") else "")
                   + ("; 50%-unlabelled model: p_cr {p_cr}, p_as {p_as}, spread {spread} (official partial-label "
                      "schedule)".format(**cfg["modules"]["partial"]) if cfg["modules"].get("partial") else "")
                   + f", {len(m['seeds'])} seeds. "
                   "Cells: held-out loss (nats/token) / compute ratio, seed means."),
        "table": {"header": h, "rows": rows},
        "figures": [f for f in ("modular_config_heatmap.png", "modular_partial_config_heatmap.png", "base_curves.png")
                    if (Path(out) / f).exists()],
    }
