"""Token-routed unlearning with absorption (arXiv 2410.04332, sec. 4.2.3, the "virology" experiment).

A handful of forget-topic tokens (at most 20, as the paper's 20 hand-picked virology words) are
routed *as prediction targets* to a block of MLP units (units 0..k-1) in the early blocks:
wherever the next token is a routed token, the gradient through the other units of those MLPs
is 0. Which tokens (``--tokens``; :func:`routed_token_ids`): ``topic-words`` (default) the words
of the forest topic's vocabulary :data:`FOREST_TOPIC_WORDS` that are single whole-word tokens,
ranked by the smoothed frequency ratio between forget-rule and other training stories;
``whole-words`` the top tokens by that ratio among all whole-word tokens
(:func:`gradroute.lm.analysis.whole_word_ids`); ``any`` BPE fragments allowed; or exactly the
words of ``--routed-tokens WORD ...``. Nothing else is routed; no story labels are used in
training. Then, for the routed model and an unrouted control trained identically:

1. ablate those units *completely* (their input rows and biases and their output columns:
   ``gradroute.ablate``), fine-tune briefly on general stories;
2. the same fine-tune on the intact model (the paired reference);
3. a retraining attack on 2 topic stories (several draws) for both;
4. loss increase (ablated minus intact) on held-out topic stories, on the same stories with the
   routed tokens' targets excluded (absorption: the effect is not just on routed tokens), and
   on held-out general stories, before and after the attack.

The evaluation stories, the attack stories, the fine-tuning stories and a validation split (for
choices made before evaluation: ``val_`` keys) are disjoint. Every (arm, seed) is one resumable
job (``--out``/runs/*.json; pre-trained models in ``--out``/models/, reused when only the token
selection or the evaluation changes) run in ``--workers`` processes; results are means over
seeds with 95% intervals.

    gradroute run token-routing --out runs/token_routing          # quick profile, 3 seeds
    gradroute run token-routing --tokens whole-words              # the frequency-ratio selection
    gradroute run token-routing --routed-tokens forest tree owl   # your own words

On real text (``--profile real``, docs/real_text.md): the GCIDE dictionary's medical entries through
the user-corpus path of ``gradroute run lm-unlearning --corpus`` (:mod:`gradroute.lm.user_corpus`),
routing the written medical vocabulary :data:`MEDICAL_WORDS`; or any corpus with a forget rule
(``--corpus FILE --label-field label --topic-field topic``). There, topic text = held-out forget
documents, general text = held-out retain (or, with only forget labels, unlabelled) documents
without the topic field, the fine-tuning text = the retain validation set, and held-out documents
of the topic field (related fields nobody labelled) are evaluated too (``related_`` keys).

    gradroute run token-routing --profile real --gcide gcide.jsonl.gz --out runs/token_routing_real
    gradroute run token-routing --corpus med.jsonl --label-field label --topic-field topic \\
        --topic-vocabulary disease fever remedy
"""
from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import gradroute as gr
from gradroute.lm import gcide, user_corpus
from gradroute.lm.analysis import (Corpus, fmt_ci, intervals_separate, masked_mean, per_token_losses, prepare_corpus,
                                   single_token_ids, token_counts, train_lm, whole_word_ids, whole_word_rates,
                                   word_token_ids)
from gradroute.lm.data import Batch, Stories
from gradroute.lm.methods import make_model
from gradroute.lm.train import TrainConfig, token_losses
from gradroute.sweep import run_jobs, split_finished
from gradroute.utils import (claim_summary, markdown_table, mean_ci, plt, read_json, resolve_device, savefig,
                             set_seed, write_json)

DESCRIPTION = ("Token-routed unlearning: route up to 20 topical whole-word tokens to MLP units of the early blocks, ablate "
               "them completely, fine-tune, retraining attack; loss increase on topic (with and without the "
               "routed tokens) vs general text, routed vs control.")

PROFILES = {
    # a few minutes on 2 shared CPU cores
    "quick": dict(
        corpus=dict(n_train=3000, n_eval=128, n_attack=16, n_general_train=64, vocab_size=1024, n_val=128),
        model=dict(n_ctx=96, n_layer=4, n_head=4, d_model=64, d_mlp=256),
        train=dict(steps=800, lr=3e-3, warmup=40), batch_size=24,
        # tokens and units chosen on the validation split (docs/token_routing.md): the topic vocabulary
        # (17 tokens qualify) and units 0-127 of blocks 0-1 (16, 32, 64, 128 measured)
        route=dict(n_tokens=20, min_count=20, blocks=2, units=128, tokens="topic-words", min_whole_rate=0.9),
        # fine-tune / attack lr: at 3e-4 (or 1e-4) the fine-tune alone raised the *intact* model's topic
        # loss by 0.1 (0.03) and 20 steps on 2 stories by 0.4 (0.1); at 3e-5 both leave it near where it was
        finetune=dict(steps=32, lr=3e-5, batch_size=8),
        attack=dict(docs=2, steps=20, lr=3e-5, repeats=3), seeds=3),
    # the paper's schedule after training (32 fine-tuning steps, 20 attack steps on 2 documents)
    # on a larger model (not run here)
    "paper": dict(
        corpus=dict(n_train=50_000, n_eval=512, n_attack=64, n_general_train=512, vocab_size=4096, n_val=512),
        model=dict(n_ctx=256, n_layer=8, n_head=8, d_model=256, d_mlp=1024),
        train=dict(steps=3000, lr=1e-3, warmup=100), batch_size=64,
        route=dict(n_tokens=20, min_count=50, blocks=4, units=80, tokens="topic-words", min_whole_rate=0.9),
        finetune=dict(steps=32, lr=5e-5, batch_size=32),
        attack=dict(docs=2, steps=20, lr=5e-5, repeats=5), seeds=3),
}
# The forest topic's vocabulary, the counterpart of the paper's hand-picked virology words: the
# nouns of the story generator's forest sentences (lm/corpus.py FOREST_*) that name the forest, its
# plants and their parts, its animals and its paths and streams. Left out: words the generator also
# uses outside the forest ("bird" is a pet there, "home", "rocks", "wind", "night", "feet") and
# things that are merely in a forest sentence ("hut", "noise", "sunlight"). Only the words that are
# single whole-word tokens of the tokenizer can be routed (17 of these with the quick corpus).
FOREST_TOPIC_WORDS = (
    "forest", "forests", "woodland", "woodlands", "woods", "tree", "trees", "oak", "oaks", "pine", "pines",
    "ferns", "moss", "mushrooms", "bark", "branch", "branches", "leaves", "twigs", "sticks", "acorn", "acorns",
    "cone", "owl", "squirrel", "deer", "fox", "rabbit", "woodpeckers", "birds", "nest", "path", "stream", "log",
    "bushes")
# The medical vocabulary of the real-text profile (the GCIDE dictionary's "(Med.)" entries), written
# before any run, as the paper's virology words were picked by hand: words that name diseases, what
# they do to a patient, and their treatment. Left out: words that name the body rather than its
# diseases (blood, skin, heart, nerve, muscle, gland, tissue, bone, pulse, secretion: anatomy and
# physiology, the unlabelled related fields whose absorption is measured), the surgeon's words
# (surgery, incision: Surg is a related field), and words whose dictionary senses are mostly not
# medical (affection, plaster, tonic, operation, acute, case). Disease words overlap pathology
# (Pathol, a related field), so the related fields are also reported without the routed tokens.
MEDICAL_WORDS = (
    "disease", "diseases", "diseased", "malady", "disorder", "infection", "epidemic", "fever", "inflammation",
    "ulcer", "ulcers", "tumor", "swelling", "wound", "wounds", "pain", "painful", "symptom", "symptoms", "chronic",
    "remedy", "remedies", "medicine", "medicines", "medicinal", "drug", "drugs", "dose", "doses", "cure", "cures",
    "treatment", "patient", "patients", "physician", "physicians", "ointment", "purgative", "cathartic", "emetic")
# the real-text profile: the quick profile's model, routing and schedule on the GCIDE medical corpus,
# its vocabulary and pre-training steps sized to the corpus (user_corpus.size_for_corpus, as
# lm-unlearning's real profile), routing the medical vocabulary
PROFILES["real"] = copy.deepcopy(PROFILES["quick"])
PROFILES["real"]["route"]["vocabulary"] = list(MEDICAL_WORDS)
PAPER = {"topic_loss_increase": 0.182, "topic_loss_increase_excluding_routed": 0.171, "general_loss_increase": 0.032}
KEYS = ("topic_loss_increase", "topic_loss_increase_excluding_routed", "general_loss_increase")


# ------------------------------------------------------------------------------------------
# token selection and routing
# ------------------------------------------------------------------------------------------
def topic_token_scores(data: Stories, vocab_size: int, min_count: int) -> torch.Tensor:
    """Per token id: log of its smoothed frequency in forget-rule stories over its frequency in
    the other stories, ``log((c_f + 1) / (N_f + V)) - log((c_o + 1) / (N_o + V))``; ``-inf`` for
    tokens seen fewer than ``min_count`` times as targets of forget-rule stories."""
    cf = token_counts(data, vocab_size, data.forget).double()
    co = token_counts(data, vocab_size, ~data.forget).double()
    score = ((cf + 1) / (cf.sum() + vocab_size)).log() - ((co + 1) / (co.sum() + vocab_size)).log()
    return score.masked_fill(cf < min_count, -math.inf)


def select_topic_tokens(data: Stories, vocab_size: int, n: int, min_count: int,
                        exclude: tuple[int, ...] = (), allowed: torch.Tensor | None = None,
                        at_most: bool = False) -> list[int]:
    """The ``n`` highest-scoring tokens (ties: lower id first), skipping ``exclude`` and, when
    ``allowed`` (a bool mask over the vocabulary) is given, every token it marks False. Fewer
    than ``n`` eligible tokens raise ``ValueError`` unless ``at_most`` (then all eligible ones,
    at least one)."""
    score = topic_token_scores(data, vocab_size, min_count)
    if exclude:
        score[list(exclude)] = -math.inf
    if allowed is not None:
        if allowed.shape != (vocab_size,):
            raise ValueError(f"allowed must be a bool mask of shape ({vocab_size},), got {tuple(allowed.shape)}")
        score = score.masked_fill(~allowed.bool(), -math.inf)
    order = sorted(range(vocab_size), key=lambda i: (-float(score[i]), i))
    picked = [i for i in order[:n] if score[i] > -math.inf]
    if len(picked) < n and not (at_most and picked):
        raise ValueError(f"only {len(picked)} eligible tokens occur >= {min_count} times in forget stories; "
                         f"lower min_count or n_tokens")
    return picked


def routed_units(model: nn.Module, blocks: int, units: int) -> gr.Units:
    """MLP units ``0..units-1`` of blocks ``0..blocks-1``."""
    n_layer = len(gr.find_modules(model, "transformer.h.*.mlp", kind="MLP"))
    if not 1 <= blocks <= n_layer:
        raise ValueError(f"route blocks must be in [1, {n_layer}], got {blocks}")
    return gr.select_units(model, f"re:transformer\\.h\\.({'|'.join(map(str, range(blocks)))})\\.mlp", slice(0, units))


def token_routing_loss(units: gr.Units, routed_ids: torch.Tensor):
    """``loss_fn`` for the shared loop: where the target is a routed token, the gradient through
    the MLP units of the routed blocks reaches only ``units`` (weight 1 there, 0 elsewhere)."""
    def loss_fn(net, b: Batch):
        select = torch.isin(b.y, routed_ids.to(b.y.device))
        with gr.route_units(net, units, select, inside=1.0, outside=0.0):
            return token_losses(net, b.x, b.y).sum()
    return loss_fn


# ------------------------------------------------------------------------------------------
# evaluation pipeline
# ------------------------------------------------------------------------------------------
PARTS = ("topic", "topic_excluding_routed", "general")
SPLITS = (("", "topic", "general"), ("val_", "val_topic", "val_general"))   # evaluation; validation
# diagnostics (not claims): the evaluation topic stories' non-routed targets split into tokens that
# never occur in general text ("topical": the forest sentences' other words) and the rest ("shared")
DIAG_PARTS = ("topic_topical", "topic_shared")
DIAG_KEYS = ("topical_nonrouted_loss_increase", "shared_nonrouted_loss_increase")
# a user corpus with an evaluation-only topic field: its held-out documents (GCIDE: the related fields)
RELATED_PARTS = ("related", "related_excluding_routed")
RELATED_KEYS = ("related_loss_increase", "related_loss_increase_excluding_routed")


def general_token_ids(corpus) -> torch.Tensor:
    """Token ids seen as targets in the held-out general stories that are not evaluated (the
    fine-tuning set and, when present, the validation set)."""
    ys = [d.y for d in (corpus.general_train, corpus.val_general) if d is not None]
    y = torch.cat([t.flatten() for t in ys])
    return torch.unique(y[y >= 0])


def losses(model: nn.Module, corpus, routed_ids: torch.Tensor) -> dict:
    """Mean next-token loss on the held-out topic stories (all targets, and without the routed
    tokens' targets) and general stories; the same on the validation split (``val_`` keys) when
    the corpus has one, and on the related fields' documents (``related``, also without the
    routed tokens' targets) when it has them."""
    out = {}
    if getattr(corpus, "related", None) is not None:
        rel = per_token_losses(model, corpus.related)
        out.update(related=masked_mean(rel),
                   related_excluding_routed=masked_mean(rel, ~torch.isin(corpus.related.y, routed_ids)))
    for prefix, topic_set, general_set in SPLITS:
        topic_data = getattr(corpus, topic_set)
        if topic_data is None:
            continue
        topic = per_token_losses(model, topic_data)
        nonrouted = ~torch.isin(topic_data.y, routed_ids)
        out.update({prefix + "topic": masked_mean(topic),
                    prefix + "topic_excluding_routed": masked_mean(topic, nonrouted),
                    prefix + "general": masked_mean(per_token_losses(model, getattr(corpus, general_set)))})
        if not prefix and corpus.general_train is not None:
            shared = torch.isin(topic_data.y, general_token_ids(corpus))
            out.update(topic_topical=masked_mean(topic, nonrouted & ~shared),
                       topic_shared=masked_mean(topic, nonrouted & shared))
    return out


def finetune(model: nn.Module, data: Stories, spec: dict, seed: int, device: str, tag: str) -> nn.Module:
    cfg = TrainConfig(steps=spec["steps"], lr=spec["lr"], min_lr=spec["lr"], warmup=0)
    return train_lm({}, data, cfg, spec["batch_size"], seed, device=device, model=model, desc=tag)[0]


def attack_docs(pool: Stories, n: int, repeat: int, seed: int) -> Stories:
    g = torch.Generator().manual_seed(seed * 7919 + 17 * repeat + 1)
    return pool.subset(torch.randperm(len(pool), generator=g)[:n])


def evaluate_arm(name: str, model: nn.Module, units: gr.Units, corpus, routed_ids: torch.Tensor, cfg: dict,
                 seed: int, device: str) -> dict:
    """Ablated vs intact, after fine-tuning and after each attack draw; increases = ablated - intact."""
    out = {"before_ablation": losses(model, corpus, routed_ids)}
    variants = {}
    for variant in ("ablated", "intact"):
        m = copy.deepcopy(model)
        if variant == "ablated":
            gr.ablate(m, units)
            out["ablated_no_finetune"] = losses(m, corpus, routed_ids)
        m = finetune(m, corpus.general_train, cfg["finetune"], seed, device, f"{name} {variant} fine-tune")
        res = {"after_finetune": losses(m, corpus, routed_ids)}
        a = cfg["attack"]
        runs = []
        for r in range(a["repeats"]):
            docs = attack_docs(corpus.attack_pool, a["docs"], r, seed)
            acfg = {"steps": a["steps"], "lr": a["lr"], "batch_size": a["docs"]}
            runs.append(losses(finetune(copy.deepcopy(m), docs, acfg, seed + r, device, f"{name} {variant} attack"),
                               corpus, routed_ids))
        res["after_attack"] = {k: float(np.mean([x[k] for x in runs])) for k in runs[0]}
        res["after_attack_runs"] = runs
        variants[variant] = res
    out.update(variants)
    for stage, suffix in (("after_attack", ""), ("after_finetune", "_before_attack")):
        ab, it = variants["ablated"][stage], variants["intact"][stage]
        for prefix in ("", "val_"):
            for key, part in zip(KEYS + DIAG_KEYS + RELATED_KEYS, PARTS + DIAG_PARTS + RELATED_PARTS):
                if prefix + part in ab:
                    out[prefix + key + suffix] = ab[prefix + part] - it[prefix + part]
    # attack draws: per-draw increases, for their spread
    out["increase_runs_after_attack"] = [
        {k: a[p] - i[p] for k, p in zip(KEYS, PARTS)}
        for a, i in zip(variants["ablated"]["after_attack_runs"], variants["intact"]["after_attack_runs"])]
    print(f"[{name}] loss increase after attack: topic {out['topic_loss_increase']:+.3f}, topic w/o routed "
          f"{out['topic_loss_increase_excluding_routed']:+.3f}, general {out['general_loss_increase']:+.3f}")
    return out


# ------------------------------------------------------------------------------------------
# token choice and jobs
# ------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def _corpus(key: str):
    c = json.loads(key)
    if "user_data" in c:
        return _user_corpus(c)
    return prepare_corpus(c["n_train"], c["n_eval"], c["n_attack"], c["vocab_size"], c["n_ctx"], **_corpus_args(c))


USER_CORPUS_KEYS = ("user_data", "source", "tokenizer", "vocab_size", "model")


def corpus_of(cfg: dict):
    if "user_data" in cfg:
        return _corpus(json.dumps({k: cfg[k] for k in USER_CORPUS_KEYS}, sort_keys=True))
    return _corpus(json.dumps(dict(cfg["corpus"], n_ctx=cfg["model"]["n_ctx"]), sort_keys=True))


def _user_corpus(cfg: dict) -> Corpus:
    """A user's corpus (``--corpus``, ``--profile real``) through :func:`user_corpus.prepare`, as
    this experiment's sets: held-out forget documents are the topic text, retain documents the
    general text, the retain validation set the fine-tuning text; the related fields (the topic
    field's held-out documents) when there are any; no validation split."""
    tok, train, sets, counts = user_corpus.prepare(cfg)
    return Corpus(tok, train, sets["forget"], sets["retain"], sets["attack_pool"], sets["retain_val"], counts,
                  related=sets.get("topic"))


def _configure_user_corpus(cfg: dict, args: argparse.Namespace) -> None:
    """Turn the profile into a user-corpus configuration (:func:`user_corpus.configure`): its
    evaluation and attack sizes as held-out targets, its fine-tuning size as the retain validation
    set's (``--n-val``), our BPE at a vocabulary and pre-training length sized to the corpus
    (:func:`user_corpus.size_for_corpus`) unless ``--steps`` is given."""
    c = cfg["corpus"]
    cfg.update(source=args.corpus, tokenizer="bpe", vocab_size=c["vocab_size"], size_from_corpus=True,
               corpus={"n_eval": c["n_eval"], "n_attack": c["n_attack"], "n_val": c["n_general_train"]})
    user_corpus.configure(cfg, args)


def _corpus_args(c: dict):
    return dict(n_general_train=c["n_general_train"], n_val=c.get("n_val", 0))


TOKEN_RULES = ("topic-words", "whole-words", "any", "given")


def routed_token_ids(corpus, rc: dict) -> list[int]:
    """The routed tokens of the training stories under the route config ``rc["tokens"]``:

    - ``"topic-words"``: the words of ``rc["vocabulary"]`` (a topic vocabulary, like the paper's
      hand-picked virology words; default :data:`FOREST_TOPIC_WORDS`) that are single whole-word
      tokens seen >= ``min_count`` times in forget-rule stories, at most ``n_tokens`` of them, the
      highest :func:`topic_token_scores` first;
    - ``"whole-words"``: the top ``n_tokens`` by :func:`topic_token_scores` among all whole-word
      tokens (rate ``min_whole_rate``); ``"any"``: among all tokens, BPE fragments included;
    - ``"given"``: exactly the words ``rc["words"]`` (:func:`gradroute.lm.analysis.word_token_ids`:
      each must be one whole-word token of the training stories).

    ``<|endoftext|>`` is never routed."""
    tok = corpus.tok
    rule = rc["tokens"]
    if rule not in TOKEN_RULES:
        raise ValueError(f"route tokens must be one of {', '.join(TOKEN_RULES)}, got {rule!r}")
    if rule == "given":
        return word_token_ids(tok, rc["words"], corpus.train, rc["min_whole_rate"])
    allowed = whole_word_ids(corpus.train, tok, rc["min_whole_rate"]) if rule != "any" else None
    if rule == "topic-words":
        vocab = torch.zeros(tok.vocab_size, dtype=torch.bool)
        vocab[list(single_token_ids(tok, rc["vocabulary"]).values())] = True
        allowed = allowed & vocab
    try:
        return select_topic_tokens(corpus.train, tok.vocab_size, rc["n_tokens"], rc["min_count"],
                                   exclude=(tok.eot_id,), allowed=allowed, at_most=rule == "topic-words")
    except ValueError as e:
        if rule != "topic-words":
            raise
        raise ValueError(f"{e}: no word of the topic vocabulary ({', '.join(rc['vocabulary'][:6])}, ...) is a "
                         "whole-word token seen that often in forget documents; give the topic's words with "
                         "--topic-vocabulary, exact words with --routed-tokens, or use --tokens whole-words") from None


def vocabulary_report(corpus, rc: dict, ids: list[int]) -> list[dict]:
    """Per word of the topic vocabulary (rule ``topic-words``): its token, how often it is a target
    in forget training documents, and ``status``: ``routed`` or why not (not one token, mostly a
    fragment, too rare in forget documents, or outside the best ``n_tokens``)."""
    tok, V = corpus.tok, corpus.tok.vocab_size
    single = single_token_ids(tok, rc["vocabulary"])
    _, rate = whole_word_rates(corpus.train, tok)
    whole = whole_word_ids(corpus.train, tok, rc["min_whole_rate"])
    cf = token_counts(corpus.train, V, corpus.train.forget)
    rows = []
    for w in rc["vocabulary"]:
        i = single.get(w.strip())
        if i is None:
            status = "not one token (" + "|".join(tok.decode([j]) for j in tok.encode(" " + w.strip())) + ")"
        elif i in ids:
            status = "routed"
        elif not whole[i]:
            status = f"a whole word in {float(rate[i]):.0%} of its occurrences"
        elif cf[i] < rc["min_count"]:
            status = f"{int(cf[i])} times in forget documents (< {rc['min_count']})"
        else:
            status = f"outside the best {rc['n_tokens']}"
        rows.append({"word": w, "token_id": i, "count_forget_train": None if i is None else int(cf[i]),
                     "status": status})
    return rows


def _job_path(out: Path, arm: str, seed: int) -> Path:
    return Path(out) / "runs" / f"{arm}-seed{seed}.json"


def _pretrained_path(out: Path, arm: str, seed: int, cfg: dict, routed_ids: list[int]) -> tuple[Path, dict]:
    """Where the pre-trained model of (arm, seed) is kept, keyed by everything its training depends
    on: the control's does not depend on the routed tokens, so a run that changes only the token
    selection (or the evaluation) trains the control once."""
    rc = cfg["route"]
    key = {"arm": arm, "seed": seed, "model": cfg["model"], "train": cfg["train"], "batch_size": cfg["batch_size"],
           "corpus": {k: v for k, v in cfg["corpus"].items() if k in ("n_train", "vocab_size")}}
    if "user_data" in cfg:
        key["data"] = {k: cfg[k] for k in USER_CORPUS_KEYS if k != "model"}
    if arm == "routed":
        key.update(routed_ids=list(routed_ids), blocks=rc["blocks"], units=rc["units"])
    h = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(out) / "models" / f"{arm}-seed{seed}-{h}.pt", key


def run_job(arm: str, seed: int, cfg: dict, out: Path, device: str) -> dict:
    """Train one arm (``routed`` or the unrouted ``control``) and run the ablation / fine-tune /
    attack pipeline; writes ``out/runs/<arm>-seed<seed>.json``. The pre-trained model is kept in
    ``out/models/`` and reused by later runs whose training is the same (:func:`_pretrained_path`)."""
    t0 = time.time()
    corpus = corpus_of(cfg)
    rc = cfg["route"]
    ids = routed_token_ids(corpus, rc)
    routed_ids = torch.tensor(ids)
    spec = dict(cfg["model"], vocab_size=corpus.tok.vocab_size)
    set_seed(seed)
    model = make_model(spec, seed)
    units = routed_units(model, rc["blocks"], rc["units"])
    path, key = _pretrained_path(out, arm, seed, cfg, ids)
    saved = torch.load(path, map_location="cpu") if path.exists() else None
    if saved is not None and saved.get("key") == key:
        model.load_state_dict(saved["state_dict"])
        model.to(device)
        log = saved["log"]
        print(f"[{arm} seed {seed}] pre-trained model loaded from {path}")
    else:
        extra = {"loss_fn": token_routing_loss(units, routed_ids)} if arm == "routed" else {}
        tcfg = TrainConfig(**cfg["train"])
        evals = lambda m: {"general_loss": masked_mean(per_token_losses(m, corpus.general.subset(slice(0, 32)))),
                           "topic_loss": masked_mean(per_token_losses(m, corpus.topic.subset(slice(0, 32))))}
        model, log = train_lm(spec, corpus.train, tcfg, cfg["batch_size"], seed, device=device, model=model,
                              desc=f"token-routing {arm} seed {seed}", eval_fn=evals,
                              eval_every=max(1, tcfg.steps // 8), **extra)
        log = {k: log[k] for k in ("history", "evals", "wall_s")}
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "log": log},
                   path)
    set_seed(seed)                   # the same evaluation whether the model was trained or loaded
    rec = evaluate_arm(f"{arm} seed {seed}", model, units, corpus, routed_ids, cfg, seed, device)
    hist = log["history"]
    every = max(1, len(hist) // 50)
    rec.update(config=cfg, arm=arm, seed=seed, pretrained=str(path), train_loss_final=hist[-1]["loss"] if hist else None,
               train_curve=[[h["step"], h["loss"]] for h in hist[every - 1::every]], held_out_curve=log["evals"],
               train_wall_s=log["wall_s"], wall_s=time.time() - t0)
    write_json(_job_path(out, arm, seed), rec)
    return rec


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick",
                        help="quick (default, about 5 minutes on 2 CPU cores), paper (larger, not run here) or real "
                             "(the GCIDE dictionary's medical entries, about 15 minutes on 2 CPU cores; see --gcide "
                             "and docs/real_text.md)")
    gcide.add_argument(parser)
    parser.add_argument("--corpus", default="generated",
                        help="generated (default: the story generator) or a path to your corpus (.jsonl/.txt/"
                             "folder, with a forget rule: --label-field / --forget-words; docs/your_data.md)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (override the profile)")
    parser.add_argument("--n-tokens", type=int, default=None, help="routed topic tokens (override the profile)")
    parser.add_argument("--tokens", choices=[r for r in TOKEN_RULES if r != "given"], default=None,
                        help="how the routed tokens are chosen: topic-words (the forest topic's vocabulary, like "
                             "the paper's hand-picked words), whole-words (top score among all whole-word tokens) "
                             "or any (BPE fragments included); see docs/token_routing.md")
    parser.add_argument("--routed-tokens", nargs="+", metavar="WORD", default=None,
                        help="route exactly these words (each must be one whole-word token of the training "
                             "stories, e.g. --routed-tokens forest tree owl); overrides --tokens and --n-tokens")
    parser.add_argument("--topic-vocabulary", nargs="+", metavar="WORD", default=None,
                        help="rule topic-words: the topic's candidate words (default: the forest topic's words; "
                             "profile real: the medical words MEDICAL_WORDS)")
    parser.add_argument("--units", type=int, default=None, help="routed MLP units per block (override)")
    parser.add_argument("--route-blocks", type=int, default=None, help="route blocks 0..N-1 (override)")
    parser.add_argument("--attack-repeats", type=int, default=None, help="attack draws (override)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: range(profile seeds)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="parallel training processes on CPU, one thread each (1 = in this process)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads in this process (default 1: these models gain little from more)")
    user_corpus.add_arguments(parser)


def build_config(args) -> dict:
    if args.profile == "real":
        gcide.use_real_corpus(args)
    cfg = copy.deepcopy(PROFILES[args.profile])
    cfg.update(profile=args.profile)
    for flag, (sec, key) in (("steps", ("train", "steps")), ("n_tokens", ("route", "n_tokens")),
                             ("units", ("route", "units")), ("route_blocks", ("route", "blocks")),
                             ("attack_repeats", ("attack", "repeats"))):
        v = getattr(args, flag)
        if v is not None:
            if v < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
            cfg[sec][key] = v
    if args.tokens is not None:
        cfg["route"]["tokens"] = args.tokens
    if getattr(args, "routed_tokens", None):
        cfg["route"].update(tokens="given", words=[w.strip() for w in args.routed_tokens])
    if cfg["route"]["tokens"] == "topic-words":
        if getattr(args, "topic_vocabulary", None):
            cfg["route"]["vocabulary"] = [w.strip() for w in args.topic_vocabulary]
        cfg["route"].setdefault("vocabulary", list(FOREST_TOPIC_WORDS))
    elif getattr(args, "topic_vocabulary", None):
        raise ValueError("--topic-vocabulary is the candidate list of --tokens topic-words; drop it or --tokens / "
                         "--routed-tokens")
    else:
        cfg["route"].pop("vocabulary", None)
    corpus = getattr(args, "corpus", "generated")
    if user_corpus.is_user_corpus(corpus):
        if args.save_models:
            raise ValueError("--save-models is an lm-unlearning option; token-routing keeps its models in --out/models")
        _configure_user_corpus(cfg, args)
    elif corpus != "generated":
        raise ValueError(f"--corpus {corpus}: token-routing runs on the generated stories or a corpus file/folder")
    cfg["train"]["warmup"] = min(cfg["train"]["warmup"], cfg["train"]["steps"] // 10)
    if cfg["route"]["units"] >= cfg["model"]["d_mlp"]:
        raise ValueError(f"--units must be below d_mlp ({cfg['model']['d_mlp']})")
    return cfg


def run(args: argparse.Namespace) -> dict:
    t0 = time.time()
    cfg = build_config(args)
    device = str(resolve_device(args.device))
    if args.threads < 1 or args.workers < 1:
        raise ValueError(f"--threads and --workers must be >= 1, got {args.threads} / {args.workers}")
    torch.set_num_threads(args.threads)
    seeds = args.seeds if args.seeds is not None else list(range(cfg["seeds"]))
    cfg.pop("seeds")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must be distinct, got {seeds}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = corpus_of(cfg)                       # tokenizer cached on disk before the workers start
    tok, V = corpus.tok, corpus.tok.vocab_size
    rc = cfg["route"]
    ids = routed_token_ids(corpus, rc)
    scores = topic_token_scores(corpus.train, V, rc["min_count"])
    cf = token_counts(corpus.train, V, corpus.train.forget)
    co = token_counts(corpus.train, V, ~corpus.train.forget)
    routed_ids = torch.tensor(ids)
    topic_targets = corpus.topic.y[corpus.topic.y >= 0]
    general_targets = corpus.general.y[corpus.general.y >= 0]
    print(f"routed tokens ({rc['tokens']}): " + ", ".join(repr(tok.decode([i])) for i in ids))
    vocab = vocabulary_report(corpus, rc, ids) if rc["tokens"] == "topic-words" else None
    if vocab:
        print("not routed: " + "; ".join(f"{r['word']}: {r['status']}" for r in vocab if r["status"] != "routed"))
    jobs = [(arm, s) for s in seeds for arm in ("routed", "control")]
    results, todo = split_finished(jobs, lambda a, s: _job_path(out, a, s), cfg)
    workers = 1 if device != "cpu" else args.workers
    results.update(run_jobs(todo, functools.partial(run_job, cfg=cfg, out=out, device=device), workers,
                            desc="token-routing models"))
    summary = summarize(results, seeds)
    metrics = {"experiment": "token-routing", "profile": args.profile, "config": cfg, "seeds": seeds,
               "corpus": corpus.counts,
               "routed_tokens": [{"token": tok.decode([i]), "id": i, "score": float(scores[i]),
                                  "count_forget_train": int(cf[i]), "count_other_train": int(co[i])} for i in ids],
               "routed_share_of_topic_targets": float(torch.isin(topic_targets, routed_ids).float().mean()),
               "routed_share_of_general_targets": float(torch.isin(general_targets, routed_ids).float().mean()),
               "topic_vocabulary": vocab,
               "topical_nonrouted_share_of_topic_targets": float(
                   (~torch.isin(topic_targets, routed_ids) & ~torch.isin(topic_targets, general_token_ids(corpus)))
                   .float().mean()),
               "routed_blocks": list(range(rc["blocks"])), "routed_units_per_block": rc["units"],
               "paper": PAPER, "summary": summary,
               "runs": {f"{a}-seed{s}": {k: v for k, v in results[(a, s)].items() if k != "config"} for a, s in jobs},
               "claims": check_claims(summary), "wall_time_s": time.time() - t0,
               "train_wall_s_total": sum(r["train_wall_s"] for r in results.values())}
    if corpus.related is not None:
        related_targets = corpus.related.y[corpus.related.y >= 0]
        metrics["routed_share_of_related_targets"] = float(torch.isin(related_targets, routed_ids).float().mean())
    write_json(out / "metrics.json", metrics)
    make_figure(out, metrics)
    (out / "summary.md").write_text(summary_md(metrics))
    print(summary_md(metrics))
    print(f"wrote {out / 'metrics.json'} ({metrics['wall_time_s']:.0f} s)")
    return metrics


# ------------------------------------------------------------------------------------------
# aggregation and reporting
# ------------------------------------------------------------------------------------------
STAGES = (("", "after the attack"), ("_before_attack", "after ablation + fine-tune"))
MARGIN = 0.03   # nats: the bar for "exceeds"


def summarize(results: dict, seeds: list[int]) -> dict:
    """Per arm and key (``KEYS`` and their ``_before_attack`` versions): per-seed values and mean_ci;
    plus the paired per-seed differences the claims compare."""
    out = {}
    for arm in ("routed", "control"):
        out[arm] = {}
        for suffix, _ in STAGES:
            for prefix in ("", "val_"):
                for k in KEYS + DIAG_KEYS + RELATED_KEYS:
                    if prefix + k + suffix not in results[(arm, seeds[0])]:
                        continue
                    v = [results[(arm, s)][prefix + k + suffix] for s in seeds]
                    out[arm][prefix + k + suffix] = {"per_seed": v, **mean_ci(v)}
    ex = "topic_loss_increase_excluding_routed"
    r, c = out["routed"], out["control"]
    if "val_" + ex in r:
        # the validation split's absorption margins (after the attack), for choices made before evaluation
        m_gen = [a - b for a, b in zip(r["val_" + ex]["per_seed"], r["val_general_loss_increase"]["per_seed"])]
        m_ctl = [a - b for a, b in zip(r["val_" + ex]["per_seed"], c["val_" + ex]["per_seed"])]
        out["validation"] = {"margin over general": mean_ci(m_gen), "margin over control": mean_ci(m_ctl),
                             "criterion": min(float(np.mean(m_gen)), float(np.mean(m_ctl)))}
    out["differences"] = {
        "routed excluding-routed minus routed general": mean_ci(
            [a - b for a, b in zip(r[ex]["per_seed"], r["general_loss_increase"]["per_seed"])]),
        "routed excluding-routed minus control excluding-routed": mean_ci(
            [a - b for a, b in zip(r[ex]["per_seed"], c[ex]["per_seed"])]),
        "routed topic minus control topic": mean_ci(
            [a - b for a, b in zip(r["topic_loss_increase"]["per_seed"], c["topic_loss_increase"]["per_seed"])]),
    }
    rx = RELATED_KEYS[1]
    if rx in r:     # absorption into the related fields nobody labelled, beyond general damage and the control
        out["differences"].update({
            "routed related-excluding-routed minus routed general": mean_ci(
                [a - b for a, b in zip(r[rx]["per_seed"], r["general_loss_increase"]["per_seed"])]),
            "routed related-excluding-routed minus control related-excluding-routed": mean_ci(
                [a - b for a, b in zip(r[rx]["per_seed"], c[rx]["per_seed"])])})
    return out


def _interval_note(a: dict, b: dict, diff: dict) -> str:
    sep = intervals_separate(a, b)
    if sep is None:
        return "n=1, no interval"
    return (f"95% intervals {'separate' if sep else 'overlap'}; paired difference "
            f"{fmt_ci(diff, 3, True)}")


def check_claims(summary: dict) -> dict:
    r, c, d = summary["routed"], summary["control"], summary["differences"]
    ex = "topic_loss_increase_excluding_routed"
    n = r[ex]["n"]
    return {
        f"absorption: topic-without-routed-tokens increase exceeds the general increase by >= {MARGIN} (routed, "
        "after attack, means)": {
            "holds": r[ex]["mean"] - r["general_loss_increase"]["mean"] >= MARGIN,
            "topic_excluding_routed": r[ex], "general": r["general_loss_increase"],
            "intervals": _interval_note(r[ex], r["general_loss_increase"],
                                        d["routed excluding-routed minus routed general"]), "n": n},
        f"absorption: topic-without-routed-tokens increase exceeds the control's by >= {MARGIN} (after attack, "
        "means)": {
            "holds": r[ex]["mean"] - c[ex]["mean"] >= MARGIN, "routed": r[ex], "control": c[ex],
            "intervals": _interval_note(r[ex], c[ex], d["routed excluding-routed minus control excluding-routed"]),
            "n": n},
        "topic loss rises more than 2x the general loss (routed, after attack, means)": {
            "holds": r["topic_loss_increase"]["mean"] > 2 * max(r["general_loss_increase"]["mean"], 0.0)
                     and r["topic_loss_increase"]["mean"] > 0,
            "topic": r["topic_loss_increase"], "general": r["general_loss_increase"],
            "intervals": _interval_note(r["topic_loss_increase"], r["general_loss_increase"],
                                        mean_ci([a - b for a, b in zip(r["topic_loss_increase"]["per_seed"],
                                                                       r["general_loss_increase"]["per_seed"])])),
            "n": n},
        "routing is what localizes: topic increase routed > control (after attack, means)": {
            "holds": r["topic_loss_increase"]["mean"] > c["topic_loss_increase"]["mean"],
            "routed": r["topic_loss_increase"], "control": c["topic_loss_increase"],
            "intervals": _interval_note(r["topic_loss_increase"], c["topic_loss_increase"],
                                        d["routed topic minus control topic"]), "n": n},
    }


def _rows(m: dict) -> list[list]:
    rows = []
    for arm in ("routed", "control"):
        for suffix, stage in STAGES[::-1]:
            rows.append([f"{arm}, {stage}", *[fmt_ci(m["summary"][arm][k + suffix], 3, True) for k in KEYS]])
    rows.append(["paper (0.7B, after the attack)", *[f"{PAPER[k]:+.3f}" for k in KEYS]])
    return rows


HEADER = ["model, stage", "topic (nats/token)", "topic, routed tokens' targets excluded (nats/token)",
          "general (nats/token)"]


def summary_md(m: dict) -> str:
    toks = ", ".join(repr(t["token"]) for t in m["routed_tokens"])
    lines = [f"# Token-routed unlearning: loss increase from ablating the routed units (ablated - intact)\n",
             f"Routed tokens ({len(m['routed_tokens'])}, {m['config']['route']['tokens']}, "
             f"{100 * m['routed_share_of_topic_targets']:.1f}% of topic targets): {toks}\n",
             f"Mean [95% interval] over seeds {m['seeds']} (n={len(m['seeds'])}).\n",
             markdown_table(HEADER, _rows(m))]
    for name, c in m["claims"].items():
        lines.append(f"- {'HOLDS' if c['holds'] else 'FAILS'}: {name} ({c['intervals']})")
    if DIAG_KEYS[0] in m["summary"]["routed"]:
        lines.append(f"\nDiagnostics, topic stories' non-routed targets split in two: tokens never seen in general text "
                     f"({100 * m['topical_nonrouted_share_of_topic_targets']:.1f}% of topic targets) and the rest; "
                     "loss increase after the attack:\n")
        lines.append(markdown_table(["model", "topical non-routed", "shared with general text"], [
            [arm, *[fmt_ci(m["summary"][arm][k], 3, True) for k in DIAG_KEYS]] for arm in ("routed", "control")]))
    if RELATED_KEYS[0] in m["summary"]["routed"]:
        d = m["summary"]["differences"]
        lines.append(f"\nRelated fields (held-out documents of the evaluation-only field, never labelled; "
                     f"{100 * m['routed_share_of_related_targets']:.1f}% of their targets are routed tokens), "
                     "loss increase:\n")
        lines.append(markdown_table(["model, stage", "related fields", "related fields, routed tokens' targets excluded"], [
            [f"{arm}, {stage}", *[fmt_ci(m["summary"][arm][k + suffix], 3, True) for k in RELATED_KEYS]]
            for arm in ("routed", "control") for suffix, stage in STAGES[::-1]]))
        lines.append("\nRouted, after the attack, related fields without routed tokens minus general: "
                     f"{fmt_ci(d['routed related-excluding-routed minus routed general'], 3, True)}; minus the "
                     f"control's: {fmt_ci(d['routed related-excluding-routed minus control related-excluding-routed'], 3, True)}")
    if m.get("topic_vocabulary"):
        lines.append("\nTopic vocabulary, words not routed: " + "; ".join(
            f"{r['word']} ({r['status']})" for r in m["topic_vocabulary"] if r["status"] != "routed"))
    val = m["summary"].get("validation")
    if val:
        rows = [[f"{arm}, {stage}", *[fmt_ci(m["summary"][arm]["val_" + k + suffix], 3, True) for k in KEYS]]
                for arm in ("routed", "control") for suffix, stage in STAGES[::-1]]
        lines += ["\nValidation split (held-out stories disjoint from the evaluation, attack and fine-tuning "
                  "sets; for choices made before evaluation):\n", markdown_table(HEADER, rows),
                  f"\nValidation absorption margins after the attack (routed, topic without routed tokens): over "
                  f"general {fmt_ci(val['margin over general'], 3, True)}, over the control "
                  f"{fmt_ci(val['margin over control'], 3, True)}; criterion (smaller mean) {val['criterion']:+.3f}"]
    return "\n".join(lines) + "\n"


def make_figure(out: Path, m: dict) -> None:
    pyplot = plt()
    fig, axes = pyplot.subplots(1, 3, figsize=(16, 3.8))
    axes[1].sharey(axes[0])
    labels = ["topic", "topic w/o routed", "general"]
    x = np.arange(3)
    n = len(m["seeds"])
    for ax, (suffix, title) in zip(axes, STAGES[::-1]):
        for i, arm in enumerate(("routed", "control")):
            cis = [m["summary"][arm][k + suffix] for k in KEYS]
            err = None if n == 1 else np.array([[c["mean"] - c["lo"] for c in cis], [c["hi"] - c["mean"] for c in cis]])
            ax.bar(x + (i - 0.5) * 0.38, [c["mean"] for c in cis], 0.38, yerr=err, capsize=3, label=arm)
        if not suffix:
            ax.scatter(x, [PAPER[k] for k in KEYS], marker="_", s=600, color="k", label="paper (0.7B)", zorder=3)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xticks(x, labels)
        ax.set_title(f"{title}; mean over {n} seed(s)" + (", 95% interval" if n > 1 else ", n=1"), fontsize=9)
    axes[0].set_ylabel("loss increase (ablated - intact, nats/token)")
    axes[1].legend(fontsize=8)
    ax = axes[2]
    for key, r in sorted(m["runs"].items()):
        curve = r.get("held_out_curve") or []
        if curve:
            ax.plot([e["step"] for e in curve], [e["topic_loss"] for e in curve], alpha=0.7, label=f"{key}, topic")
            ax.plot([e["step"] for e in curve], [e["general_loss"] for e in curve], ls="--", alpha=0.7,
                    label=f"{key}, general")
    ax.set_xlabel("pre-training step")
    ax.set_yscale("log")
    ax.set_ylabel("held-out loss (32 stories, nats/token, log)")
    ax.set_title("learning curves before ablation", fontsize=9)
    ax.legend(fontsize=5)
    savefig(fig, out / "loss_increase.png")


def report(out: Path) -> dict:
    m = read_json(Path(out) / "metrics.json")
    claims = m["claims"]
    verdict, checks = claim_summary(claims, "holds", "checks hold")
    cfg, n = m["config"], len(m["seeds"])
    notes = "; ".join(f"{'holds' if c['holds'] else 'fails'}: {name}: {c['intervals']}" for name, c in claims.items())
    related = ""
    if RELATED_KEYS[0] in m["summary"]["routed"]:
        r, c = m["summary"]["routed"], m["summary"]["control"]
        related = (f" Related fields nobody labelled (held-out documents of the evaluation-only field) rise "
                   f"{fmt_ci(r[RELATED_KEYS[0]], 3, True)}, without the routed tokens' targets "
                   f"{fmt_ci(r[RELATED_KEYS[1]], 3, True)} (control {fmt_ci(c[RELATED_KEYS[1]], 3, True)}) after "
                   "the attack.")
    corpus = (f"the corpus {m['corpus']['source']} ({m['corpus']['rule']})" if "rule" in m["corpus"]
              else "generated stories")
    return {
        "title": "Token-routed unlearning with absorption (arXiv 2410.04332, sec. 4.2.3, 'virology')",
        "claim": "Routing a few topic tokens to MLP units of the early blocks and ablating those units raises the "
                 "loss on topic text far more than on general text, also on the topic's non-routed tokens, and "
                 "the effect survives a short retraining attack.",
        "paper": "0.7B model, 20 virology tokens to units 0-79 of blocks 0-7: after ablation, 32 fine-tuning and "
                 "20 retraining steps on 2 documents: topic +0.182, topic without routed tokens +0.171, general +0.032.",
        "verdict": verdict,
        "detail": (f"{checks}. Each check ({notes}). n={n} seeds {m['seeds']}; profile {m['profile']}, {corpus}: "
                   f"{cfg['train']['steps']} steps of {cfg['batch_size']} documents, model {cfg['model']}, "
                   f"{len(m['routed_tokens'])} routed {cfg['route']['tokens']} tokens "
                   f"({', '.join(repr(t['token']) for t in m['routed_tokens'])}) to units "
                   f"0-{cfg['route']['units'] - 1} of blocks 0-{cfg['route']['blocks'] - 1}; increases are ablated "
                   f"minus intact after the same fine-tune and attack, mean over {cfg['attack']['repeats']} attack "
                   f"draws per seed; cells: mean [95% interval] (n). Cost: the ablation removes "
                   f"{cfg['route']['units']} of {cfg['model']['d_mlp']} MLP units "
                   f"({cfg['route']['units'] / cfg['model']['d_mlp']:.0%}) in {cfg['route']['blocks']} of "
                   f"{cfg['model']['n_layer']} blocks; general text rises "
                   f"{m['summary']['routed']['general_loss_increase']['mean']:+.3f} after the attack (paper "
                   f"{PAPER['general_loss_increase']:+.3f}; the unrouted control, same units ablated, "
                   f"{m['summary']['control']['general_loss_increase']['mean']:+.3f})." + related),
        "table": {"header": HEADER, "rows": _rows(m)},
        "figures": [f for f in ("loss_increase.png",) if (Path(out) / f).exists()],
    }
