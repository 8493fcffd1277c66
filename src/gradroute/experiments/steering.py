"""The steering scalar (arXiv 2410.04332, sec. 4.2.1): route one token to residual dimension 0.

Wherever the next token to predict is the routed token, the gradient arriving at the outputs
of the middle-to-late blocks (the last 5/8 of them, as blocks 6-15 of 16 in the paper) is
masked to residual dimension 0: there the network can learn to predict that token only through
dim 0. Nothing else changes. Two routed tokens, each in its own model, next to one unrouted
control model (same seed, data order and schedule):

- the *topical* token (default ``' forest'``, a place word that the generator's forest stories
  are about, like the paper's ``' California'``): the one the claim checks are about;
- a *name* (default ``' Ella'``): a documented negative control. The generator draws names
  independently of the story's content, so there is no Ella feature to localize.

For each (model, token): the rank of the token among all unembedding rows by cosine with e0,
how many of the 20 rows closest to e0 (on the token's side) are words of its category (the
generator's place words, or its names), fixed up front; the loss change when dim 0 is zeroed
at the routed blocks' outputs (on the token, its category and everything else); and the
steering curve: the fraction of sampled continuations containing the token when a value (a
multiple of the residual RMS, sign from the top-token list) is added to dim 0 after the first
routed block. The control is analysed for both tokens. Every (model, seed) is one resumable
job (``--out``/runs/*.json), run in ``--workers`` processes.

    gradroute run steering --out runs/steering                          # quick profile, 3 seeds
    gradroute run steering --token harbor --control-token Spot --seeds 0
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import os
import time
from pathlib import Path

import torch
import torch.nn as nn

import gradroute as gr
from gradroute.adapters import unwrap
from gradroute.lm.analysis import (category_words, fmt_ci, intervals_separate, masked_mean, per_token_losses,
                                   prepare_corpus, single_token_ids, train_lm)
from gradroute.lm.data import IGNORE, Batch
from gradroute.lm.evaluate import sample_many
from gradroute.lm.methods import make_model
from gradroute.lm.train import TrainConfig, logits, token_losses
from gradroute.sweep import run_jobs, split_finished
from gradroute.utils import (claim_summary, markdown_table, mean_ci, plt, read_json, resolve_device, savefig,
                             set_seed, write_json)

DESCRIPTION = ("Steering scalar: route a topical token (and a name, as a negative control) to residual dim 0 "
               "of the middle-to-late blocks; rank by cosine with e0, category words near e0, dim-0 ablation, "
               "steering curve; vs an unrouted control.")

PROFILES = {
    # 800 steps: at 300 the routed ' forest' ranked 105th by cosine with e0 and the unrouted control
    # had as many place words near e0 as the routed model (11 vs 10): nothing localized yet.
    "quick": dict(
        corpus=dict(n_train=3000, n_eval=128, vocab_size=1024),
        model=dict(n_ctx=96, n_layer=4, n_head=4, d_model=64, d_mlp=256),
        train=dict(steps=800, lr=3e-3, warmup=40), batch_size=24,
        hf_steps=0, samples=64, sample_tokens=40, top_k=20, seeds=3, name_seeds=1),
    # a larger model, longer training (not run here)
    "paper": dict(
        corpus=dict(n_train=50_000, n_eval=512, vocab_size=4096),
        model=dict(n_ctx=256, n_layer=16, n_head=8, d_model=256, d_mlp=1024),
        train=dict(steps=3000, lr=1e-3, warmup=100), batch_size=64,
        hf_steps=1000, samples=256, sample_tokens=60, top_k=20, seeds=3, name_seeds=3),
}
PROMPT = "Once upon a time,"
DIM = 0
TOPICAL, NEGATIVE = "topical", "name"      # the two routed tokens' roles
ARMS = (TOPICAL, NEGATIVE, "control")


# ------------------------------------------------------------------------------------------
# routing, ablation, steering
# ------------------------------------------------------------------------------------------
def block_names(model: nn.Module) -> list[str]:
    return [n for n, _ in gr.find_modules(model, "transformer.h.*", kind="block")]


def routed_block_names(model: nn.Module, first: int | None = None) -> list[str]:
    """Blocks ``first ..`` the last (default: the last 5/8, as blocks 6-15 of 16)."""
    names = block_names(model)
    first = len(names) * 3 // 8 if first is None else first
    if not 0 <= first < len(names):
        raise ValueError(f"first routed block must be in [0, {len(names) - 1}], got {first}")
    return names[first:]


def steering_loss(blocks: list[str], target: int, dim: int = DIM):
    """``loss_fn`` for the shared loop: at positions whose target is ``target`` the gradient
    entering the outputs of ``blocks`` is masked to residual dimension ``dim``."""
    def loss_fn(net, b: Batch):
        select = b.y == target
        weight = lambda h: gr.region_weights(select, [dim], h.shape[-1])   # (B, T, d_model)
        with gr.routing(net, {name: weight for name in blocks}):
            return token_losses(net, b.x, b.y).sum()
    return loss_fn


@contextlib.contextmanager
def edit_dim(model: nn.Module, blocks: list[str], fn, dim: int = DIM):
    """While active, replace residual dimension ``dim`` at the outputs of ``blocks`` by
    ``fn(value)`` (ours and HF blocks: tensor or tuple outputs)."""
    root = unwrap(model)

    def hook(mod, args, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h.clone()
        h[..., dim] = fn(h[..., dim])
        return (h, *out[1:]) if isinstance(out, tuple) else h
    handles = [root.get_submodule(n).register_forward_hook(hook) for n in blocks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def unembedding(model: nn.Module, effective: bool = True) -> torch.Tensor:
    """The unembedding ``(vocab, d_model)``; ``effective``: with the final LayerNorm's gain folded
    in and the mean row subtracted (TransformerLens' default ``fold_ln`` + ``center_unembed``),
    so that row ``i`` dotted with a residual direction is that direction's effect on logit ``i``
    relative to the others."""
    root = unwrap(model)
    W = root.lm_head.weight.detach().float().cpu()
    if not effective:
        return W
    W = W * root.transformer.ln_f.weight.detach().float().cpu()
    return W - W.mean(0, keepdim=True)


def top_tokens(model: nn.Module, tok, related: set[int], target: int, k: int, dim: int = DIM,
               effective: bool = True) -> dict:
    """Cosine of every unembedding row with ``e_dim``; the top ``k`` tokens on each side and the
    side of the routed token (its sign picks the steering direction)."""
    W = unembedding(model, effective)
    cos = W[:, dim] / W.norm(dim=1).clamp_min(1e-12)
    sign = 1 if float(cos[target]) >= 0 else -1
    sides = {}
    for name, s in (("positive", 1), ("negative", -1)):
        order = torch.argsort(-s * cos, stable=True)[:k].tolist()
        sides[name] = [{"token": tok.decode([i]), "id": i, "cosine": float(cos[i]),
                        "related": i in related, "target": i == target} for i in order]
    chosen = sides["positive" if sign > 0 else "negative"]
    rank = int((sign * cos > sign * cos[target]).sum()) + 1
    return {"sign": sign, "target_cosine": float(cos[target]), "target_rank": rank, **sides,
            "related_in_top": sum(t["related"] for t in chosen),
            "related_in_top_other_side": sum(t["related"] for t in sides["negative" if sign > 0 else "positive"])}


def zero_dim_losses(model: nn.Module, sets, blocks: list[str], target: int, related: set[int]) -> dict:
    """Mean loss on the routed token, the other category tokens and all other tokens, with and
    without dim 0 zeroed at the outputs of ``blocks``."""
    ys = torch.cat([s.y for s in sets])
    groups = {"target": ys == target, "related": torch.isin(ys, torch.tensor(sorted(related))),
              "other": (ys != target) & ~torch.isin(ys, torch.tensor(sorted(related)))}
    base = torch.cat([per_token_losses(model, s) for s in sets])
    with edit_dim(model, blocks, torch.zeros_like):
        zero = torch.cat([per_token_losses(model, s) for s in sets])
    out = {}
    for g, m in groups.items():
        b, z = masked_mean(base, m), masked_mean(zero, m)
        out[g] = {"loss": b, "loss_dim0_zeroed": z, "change": z - b, "tokens": int((m & (ys != IGNORE)).sum())}
    return out


@torch.no_grad()
def residual_rms(model: nn.Module, data, block: str) -> float:
    """RMS of the residual stream after ``block`` on ``data`` (the steering value's unit)."""
    got = []
    h = unwrap(model).get_submodule(block).register_forward_hook(
        lambda m, a, o: got.append((o[0] if isinstance(o, tuple) else o).detach()))
    try:
        logits(model, data.x[:32].to(next(model.parameters()).device))
    finally:
        h.remove()
    return float(got[0].float().pow(2).mean().sqrt())


def steered_samples(model: nn.Module, tok, block: str, value: float, n: int, max_new: int, seed: int) -> list[str]:
    """``n`` seeded continuations of the prompt, with ``value`` added to dim 0 after ``block``."""
    ctx = edit_dim(model, [block], lambda v: v + value) if value else contextlib.nullcontext()
    with ctx:
        return [t[len(PROMPT):] for t in sample_many(model, tok, PROMPT, n=n, max_new=max_new, seed=seed)]


def sample_stats(texts: list[str], tok, target: int, related: set[int]) -> dict:
    ids = [tok.encode(t) for t in texts]
    n_tok = max(1, sum(map(len, ids)))
    return {"samples": len(texts),
            "with_target": sum(target in s for s in ids) / len(ids),
            "with_related": sum(any(i in related for i in s) for s in ids) / len(ids),
            "target_per_100_tokens": 100 * sum(s.count(target) for s in ids) / n_tok,
            "related_per_100_tokens": 100 * sum(sum(i in related for i in s) for s in ids) / n_tok,
            "examples": texts[:2]}


# ------------------------------------------------------------------------------------------
# targets
# ------------------------------------------------------------------------------------------
def resolve_target(tok, category: str, word: str) -> dict:
    """The routed word (one token with a leading space), its id and its category's other
    single-token words (the related set, fixed from the story generator before training)."""
    word = word.strip()
    got = tok.encode(" " + word)
    if len(got) != 1:
        raise ValueError(f"token {word!r} is {len(got)} tokens with this tokenizer; choose a single-token word")
    related = {w: i for w, i in single_token_ids(tok, category_words(category)).items() if i != got[0]}
    return {"word": word, "id": got[0], "category": category, "related": related}


def targets_of(cfg: dict, tok) -> dict:
    out = {TOPICAL: resolve_target(tok, cfg["category"], cfg["token"])}
    if cfg["control_token"]:
        out[NEGATIVE] = resolve_target(tok, cfg["control_category"], cfg["control_token"])
    return out


# ------------------------------------------------------------------------------------------
# one (model, token): top tokens, dim-0 ablation, steering curve
# ------------------------------------------------------------------------------------------
def steering_curve(model: nn.Module, tok, block: str, unit: float, sign: int, scales, target: int,
                   related: set[int], n: int, max_new: int, seed: int) -> dict:
    """Fraction of ``n`` samples containing ``target`` with ``sign * scale * unit`` added to dim 0
    after ``block``, for scale 0 and each of ``scales`` (same sampling seed for every value), and
    with the opposite sign at the largest scale."""
    def at(value):
        return {"value": value, **sample_stats(steered_samples(model, tok, block, value, n, max_new, seed),
                                               tok, target, related)}
    points = [{"scale": 0.0, **at(0.0)}] + [{"scale": float(s), **at(sign * s * unit)} for s in scales]
    top = max(scales)
    return {"points": points, "opposite_sign": {"scale": -float(top), **at(-sign * top * unit)}}


def analyse(model: nn.Module, corpus, cfg: dict, target: dict, blocks: list[str], steer_block: str,
            seed: int) -> dict:
    tok, tid = corpus.tok, target["id"]
    related = set(target["related"].values())
    top = top_tokens(model, tok, related, tid, cfg["top_k"])
    raw = top_tokens(model, tok, related, tid, cfg["top_k"], effective=False)
    zero = zero_dim_losses(model, [corpus.general, corpus.topic], blocks, tid, related)
    rms = residual_rms(model, corpus.general, steer_block)
    curve = steering_curve(model, tok, steer_block, rms, top["sign"], cfg["steer_scales"], tid, related,
                           cfg["samples"], cfg["sample_tokens"], seed)
    return {"top_tokens": top,
            "top_tokens_raw_unembedding": {k: raw[k] for k in ("sign", "target_cosine", "target_rank",
                                                               "related_in_top", "related_in_top_other_side")},
            "zero_dim0": zero, "steer_block": steer_block, "residual_rms": rms, "steering": curve}


def _line(arm: str, seed: int, word: str, a: dict) -> str:
    t, z, c = a["top_tokens"], a["zero_dim0"], a["steering"]
    return (f"[{arm} seed {seed}] {word!r}: rank {t['target_rank']}, category words in top "
            f"{len(t['positive'])}: {t['related_in_top']}; dim 0 zeroed: token {z['target']['change']:+.3f}, "
            f"other {z['other']['change']:+.3f}; samples with it: "
            + ", ".join(f"{p['with_target']:.2f} (x{p['scale']:g})" for p in c["points"]))


# ------------------------------------------------------------------------------------------
# jobs: one trained model each, resumable
# ------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def _corpus(n_train: int, n_eval: int, vocab_size: int, n_ctx: int):
    return prepare_corpus(n_train, n_eval, 0, vocab_size, n_ctx)


def corpus_of(cfg: dict):
    c = cfg["corpus"]
    return _corpus(c["n_train"], c["n_eval"], c["vocab_size"], cfg["model"]["n_ctx"])


def _job_path(out: Path, arm: str, seed: int) -> Path:
    return Path(out) / "runs" / f"{arm}-seed{seed}.json"


def jobs_for(cfg: dict, seeds: list[int]) -> list[tuple[str, int]]:
    """Per seed: the topical model and the control; the name model for the first ``name_seeds``
    seeds; the HF GPT-2 model (``hf_steps`` > 0) for the first seed."""
    jobs = []
    for i, s in enumerate(seeds):
        jobs.append((TOPICAL, s))
        if cfg["control_token"] and i < cfg["name_seeds"]:
            jobs.append((NEGATIVE, s))
        jobs.append(("control", s))
    if cfg["hf_steps"]:
        jobs.append(("hf_gpt2_" + TOPICAL, seeds[0]))
    return jobs


def job_config(cfg: dict) -> dict:
    """What a job's result depends on: the config without the choice of which jobs to run."""
    return {k: v for k, v in cfg.items() if k != "name_seeds"}


def run_job(arm: str, seed: int, cfg: dict, out: Path, device: str) -> dict:
    """Train one model (``topical`` / ``name``: that token routed; ``control``: unrouted;
    ``hf_gpt2_topical``: a Hugging Face GPT-2 with the topical token routed) and analyse it for
    its token (the control: for both). Writes ``out/runs/<arm>-seed<seed>.json``."""
    t0 = time.time()
    corpus = corpus_of(cfg)
    targets = targets_of(cfg, corpus.tok)
    hf = arm.startswith("hf_gpt2_")
    role = arm[len("hf_gpt2_"):] if hf else arm
    spec = dict(cfg["model"], vocab_size=corpus.tok.vocab_size, arch="hf-gpt2" if hf else "gpt")
    set_seed(seed)
    model = make_model(spec, seed)
    blocks = routed_block_names(model, cfg["first_block"])
    steer_block = block_names(model)[cfg["steer_block"]] if cfg["steer_block"] is not None else blocks[0]
    tcfg = TrainConfig(**cfg["train"])
    if hf:
        tcfg.steps, tcfg.warmup = cfg["hf_steps"], min(tcfg.warmup, cfg["hf_steps"] // 10)
    extra = {} if role == "control" else {"loss_fn": steering_loss(blocks, targets[role]["id"])}
    evals = lambda m: {"general_loss": masked_mean(per_token_losses(m, corpus.general.subset(slice(0, 32)))),
                       "topic_loss": masked_mean(per_token_losses(m, corpus.topic.subset(slice(0, 32))))}
    model, log = train_lm(spec, corpus.train, tcfg, cfg["batch_size"], seed, device=device, model=model,
                          desc=f"steering {arm} seed {seed}", eval_fn=evals, eval_every=max(1, tcfg.steps // 8),
                          **extra)
    roles = list(targets) if role == "control" else [role]
    analysis = {}
    for r in roles:
        analysis[r] = analyse(model, corpus, cfg, targets[r], blocks, steer_block, seed)
        print(_line(arm, seed, targets[r]["word"], analysis[r]), flush=True)
    hist = log["history"]
    every = max(1, len(hist) // 50)
    rec = {"config": job_config(cfg), "arm": arm, "seed": seed, "routed": role != "control", "arch": spec["arch"],
           "routed_blocks": blocks, "analysis": analysis,
           "train_loss_final": hist[-1]["loss"] if hist else None,
           "train_curve": [[h["step"], h["loss"]] for h in hist[every - 1::every]],
           "held_out_curve": log["evals"], "train_wall_s": log["wall_s"], "wall_s": time.time() - t0}
    write_json(_job_path(out, arm, seed), rec)
    return rec


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick",
                        help="quick (default, about 5 minutes on 2 CPU cores) or paper (larger, not run here)")
    parser.add_argument("--token", default="forest",
                        help="the topical routed word, one token with a leading space (default: %(default)s)")
    parser.add_argument("--category", choices=["names", "places"], default="places",
                        help="the generator category counted near e0 for --token (default: %(default)s)")
    parser.add_argument("--control-token", default="Ella",
                        help="the negative-control routed word (a name; default: %(default)s); 'none' skips it")
    parser.add_argument("--control-category", choices=["names", "places"], default="names")
    parser.add_argument("--name-seeds", type=int, default=None,
                        help="train the negative-control (name) model for the first N seeds only (profile: quick 1, "
                             "paper 3); the unrouted control is analysed for it at every seed")
    parser.add_argument("--first-block", type=int, default=None,
                        help="first routed block (default: n_layer * 3 // 8, as 6 of 16)")
    parser.add_argument("--steer-block", type=int, default=None, help="default: the first routed block")
    parser.add_argument("--steer-scales", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0],
                        help="steering values, in units of the residual RMS at that block; the sign comes from "
                             "the top-token list (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (override the profile)")
    parser.add_argument("--hf-steps", type=int, default=None,
                        help="also train a Hugging Face GPT-2 with the topical token routed (first seed); 0 skips")
    parser.add_argument("--samples", type=int, default=None, help="samples per steering value")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: range(profile seeds)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="parallel training processes on CPU, one thread each (1 = in this process)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads in this process (default 1: these models gain little from more)")


def build_config(args) -> dict:
    cfg = copy.deepcopy(PROFILES[args.profile])
    control = None if str(args.control_token).lower() == "none" else args.control_token
    cfg.update(profile=args.profile, token=args.token.strip(), category=args.category,
               control_token=control.strip() if control else None, control_category=args.control_category,
               first_block=args.first_block, steer_block=args.steer_block,
               steer_scales=[float(v) for v in args.steer_scales])
    if not cfg["steer_scales"] or min(cfg["steer_scales"]) <= 0:
        raise ValueError(f"--steer-scales must be positive, got {args.steer_scales}")
    if args.steps is not None:
        if args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
        cfg["train"]["steps"] = args.steps
        cfg["train"]["warmup"] = min(cfg["train"]["warmup"], args.steps // 10)
    for flag in ("hf_steps", "samples", "name_seeds"):
        v = getattr(args, flag)
        if v is not None:
            if v < 0 or (flag == "samples" and v < 1):
                raise ValueError(f"--{flag.replace('_', '-')} out of range: {v}")
            cfg[flag] = v
    return cfg


def run(args: argparse.Namespace) -> dict:
    t0 = time.time()
    cfg = build_config(args)
    device = str(resolve_device(args.device))
    if args.threads < 1 or args.workers < 1:
        raise ValueError(f"--threads and --workers must be >= 1, got {args.threads} / {args.workers}")
    torch.set_num_threads(args.threads)
    seeds = args.seeds if args.seeds is not None else list(range(cfg.pop("seeds")))
    cfg.pop("seeds", None)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must be distinct, got {seeds}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = corpus_of(cfg)                           # tokenizer cached on disk before the workers start
    targets = targets_of(cfg, corpus.tok)
    for role, t in targets.items():
        print(f"{role} token {t['word']!r} (id {t['id']}) routed to residual dim {DIM}; "
              f"category set: {len(t['related'])} single-token {t['category']}")
    jobs = jobs_for(cfg, seeds)
    results, todo = split_finished(jobs, lambda a, s: _job_path(out, a, s), job_config(cfg))
    workers = 1 if device != "cpu" else args.workers
    results.update(run_jobs(todo, functools.partial(run_job, cfg=cfg, out=out, device=device), workers,
                            desc="steering models"))
    summary = summarize(results, seeds, targets)
    metrics = {"experiment": "steering", "profile": args.profile, "config": cfg, "seeds": seeds,
               "corpus": corpus.counts,
               "targets": {r: {k: v for k, v in t.items() if k != "related"} | {"related_words": sorted(t["related"])}
                           for r, t in targets.items()},
               "summary": summary, "runs": {f"{a}-seed{s}": _brief(results[(a, s)]) for a, s in jobs},
               "claims": check_claims(summary), "wall_time_s": time.time() - t0,
               "train_wall_s_total": sum(r["train_wall_s"] for r in results.values())}
    write_json(out / "metrics.json", metrics)
    make_figures(out, metrics, results)
    (out / "summary.md").write_text(summary_md(metrics))
    print(summary_md(metrics))
    print(f"wrote {out / 'metrics.json'} ({metrics['wall_time_s']:.0f} s)")
    return metrics


# ------------------------------------------------------------------------------------------
# aggregation over seeds
# ------------------------------------------------------------------------------------------
def _brief(rec: dict) -> dict:
    """A run's record without its config (kept once in metrics.json)."""
    return {k: v for k, v in rec.items() if k != "config"}


def summarize(results: dict, seeds: list[int], targets: dict) -> dict:
    """Per token role and model (``routed`` / ``control``): per-seed values and their mean_ci."""
    out = {}
    for role in targets:
        out[role] = {}
        for model, arm in (("routed", role), ("control", "control")):
            recs = [results[(arm, s)]["analysis"][role] for s in seeds if (arm, s) in results]
            per_seed = {
                "target_rank": [a["top_tokens"]["target_rank"] for a in recs],
                "related_in_top": [a["top_tokens"]["related_in_top"] for a in recs],
                "zero_dim0_target": [a["zero_dim0"]["target"]["change"] for a in recs],
                "zero_dim0_related": [a["zero_dim0"]["related"]["change"] for a in recs],
                "zero_dim0_other": [a["zero_dim0"]["other"]["change"] for a in recs],
                "steer_opposite": [a["steering"]["opposite_sign"]["with_target"] for a in recs],
            }
            scales = [p["scale"] for p in recs[0]["steering"]["points"]]
            for i, sc in enumerate(scales):
                per_seed[f"steer_x{sc:g}"] = [a["steering"]["points"][i]["with_target"] for a in recs]
            out[role][model] = {"per_seed": per_seed, "scales": scales,
                                "seeds": [s for s in seeds if (arm, s) in results],
                                **{k: mean_ci(v) for k, v in per_seed.items()}}
    hf = [k for k in results if k[0].startswith("hf_gpt2_")]
    if hf:
        a = results[hf[0]]["analysis"][TOPICAL]
        out["hf_gpt2_" + TOPICAL] = {"seed": hf[0][1], "target_rank": a["top_tokens"]["target_rank"],
                                     "related_in_top": a["top_tokens"]["related_in_top"],
                                     "zero_dim0_target": a["zero_dim0"]["target"]["change"],
                                     "zero_dim0_other": a["zero_dim0"]["other"]["change"],
                                     "steering": [[p["scale"], p["with_target"]] for p in a["steering"]["points"]]}
    return out


# ------------------------------------------------------------------------------------------
# reporting
# ------------------------------------------------------------------------------------------
def _sep(a: dict, b: dict) -> str:
    s = intervals_separate(a, b)
    return "n=1, no interval" if s is None else ("95% intervals separate" if s else "95% intervals overlap")


def check_claims(summary: dict) -> dict:
    """The claim checks, on the topical token only (the name is a negative control)."""
    r, c = summary[TOPICAL]["routed"], summary[TOPICAL]["control"]
    ranks = r["per_seed"]["target_rank"]
    n = len(ranks)
    top = max(r["scales"])
    lift = [a - b for a, b in zip(r["per_seed"][f"steer_x{top:g}"], r["per_seed"]["steer_x0"])]
    lift_ci = mean_ci(lift)
    return {
        "topical routed token ranks in the top 3 by cosine with e0 (every seed)": {
            "holds": max(ranks) <= 3, "ranks": ranks, "n": n,
            "intervals": "n=1, no interval" if n == 1 else f"every seed checked, worst rank {max(ranks)}"},
        "category words in the top 20: routed >= 2x the control (means)": {
            "holds": r["related_in_top"]["mean"] >= 2 * c["related_in_top"]["mean"] and r["related_in_top"]["mean"] > 0,
            "routed": r["related_in_top"], "control": c["related_in_top"],
            "intervals": _sep(r["related_in_top"], c["related_in_top"]), "n": n},
        "zeroing dim 0 costs the routed token >= 5x more than other tokens (means)": {
            "holds": r["zero_dim0_target"]["mean"] > 5 * max(r["zero_dim0_other"]["mean"], 1e-3),
            "target": r["zero_dim0_target"], "other": r["zero_dim0_other"],
            "intervals": _sep(r["zero_dim0_target"], r["zero_dim0_other"]), "n": n},
        f"steering (x{top:g} residual RMS) raises the share of samples with the token": {
            "holds": lift_ci["mean"] > 0 and (n == 1 or lift_ci["lo"] > 0),
            "lift": lift_ci, "intervals": "n=1, no interval" if n == 1 else
            ("95% interval of the lift excludes 0" if lift_ci["lo"] > 0 else "95% interval of the lift includes 0"),
            "n": n},
    }


def _rows(m: dict) -> list[list]:
    rows = []
    for role, t in m["targets"].items():
        for model in ("routed", "control"):
            s = m["summary"][role][model]
            top = max(s["scales"])
            rows.append([f"{t['word']!r} ({'topical' if role == TOPICAL else 'name, negative control'}), {model}",
                         fmt_ci(s["target_rank"], 1), fmt_ci(s["related_in_top"], 1),
                         fmt_ci(s["zero_dim0_target"], 3, True), fmt_ci(s["zero_dim0_other"], 3, True),
                         fmt_ci(s["steer_x0"], 2), fmt_ci(s[f"steer_x{top:g}"], 2)])
    return rows


def header(m: dict) -> list[str]:
    top = max(m["config"]["steer_scales"])
    k = m["config"]["top_k"]
    return ["token, model", "rank by cosine with e0 (of vocab)", f"category words in top {k}",
            "dim 0 zeroed: loss change on the token (nats)", "on other tokens (nats)",
            "share of samples with the token, unsteered", f"steered x{top:g} residual RMS"]


def summary_md(m: dict) -> str:
    lines = [f"# Steering scalar: {', '.join(repr(t['word']) for t in m['targets'].values())} routed to dim 0\n",
             f"Mean [95% interval] over seeds {m['seeds']} (n={len(m['seeds'])}).\n", markdown_table(header(m), _rows(m))]
    for name, c in m["claims"].items():
        lines.append(f"- {'HOLDS' if c['holds'] else 'FAILS'}: {name}" + (f" ({c['intervals']})" if "intervals" in c else "")
                     + (f"; ranks {c['ranks']}" if "ranks" in c else ""))
    run0 = m["runs"].get(f"{TOPICAL}-seed{m['seeds'][0]}")
    if run0:
        t = run0["analysis"][TOPICAL]["top_tokens"]
        side = "positive" if t["sign"] > 0 else "negative"
        toks = ", ".join(f"{x['token'].strip()}{'*' if x['related'] else ''}{'!' if x['target'] else ''}" for x in t[side])
        lines.append(f"\nTop {len(t[side])} on the routed token's side of e0, topical model, seed {m['seeds'][0]} "
                     f"(* category word, ! routed token): {toks}")
    hf = m["summary"].get("hf_gpt2_" + TOPICAL)
    if hf:
        lines.append(f"\nHF GPT-2 (seed {hf['seed']}, {m['config']['hf_steps']} steps), topical token: rank "
                     f"{hf['target_rank']}, category words in top 20: {hf['related_in_top']}, dim 0 zeroed "
                     f"{hf['zero_dim0_target']:+.3f} vs other {hf['zero_dim0_other']:+.3f} (n=1).")
    return "\n".join(lines) + "\n"


def make_figures(out: Path, metrics: dict, results: dict) -> None:
    pyplot = plt()
    seeds, targets, summ = metrics["seeds"], metrics["targets"], metrics["summary"]
    # top tokens of the first seed: routed and control, for each token
    fig, axes = pyplot.subplots(len(targets), 2, figsize=(10, 4.8 * len(targets)), squeeze=False)
    for row, role in enumerate(targets):
        for col, arm in enumerate((role, "control")):
            t = results[(arm, seeds[0])]["analysis"][role]["top_tokens"]
            lst = t["positive" if t["sign"] > 0 else "negative"]
            ax = axes[row][col]
            colors = ["tab:red" if x["target"] else "tab:orange" if x["related"] else "tab:gray" for x in lst]
            ax.barh(range(len(lst))[::-1], [abs(x["cosine"]) for x in lst], color=colors)
            ax.set_yticks(range(len(lst))[::-1], [repr(x["token"]) for x in lst], fontsize=7)
            ax.set_xlabel("|cosine(unembedding row, e0)|")
            ax.set_title(f"{'routed ' + repr(targets[role]['word']) if arm != 'control' else 'unrouted control'}: "
                         f"{t['related_in_top']} {targets[role]['category']} (orange), "
                         f"{targets[role]['word']!r} rank {t['target_rank']} (red), seed {seeds[0]}", fontsize=8)
    savefig(fig, out / "top_tokens.png")

    # steering curves (mean and 95% interval over seeds) and the dim-0 ablation
    fig, axes = pyplot.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]
    for role, t in targets.items():
        for model, ls in (("routed", "-"), ("control", "--")):
            s = summ[role][model]
            ys = [s[f"steer_x{sc:g}"] for sc in s["scales"]]
            mean = [y["mean"] for y in ys]
            line = ax.plot(s["scales"], mean, ls, marker="o",
                           label=f"{t['word']!r}, {'routed' if model == 'routed' else 'unrouted control'}")[0]
            if len(seeds) > 1:
                ax.fill_between(s["scales"], [y["lo"] for y in ys], [y["hi"] for y in ys],
                                color=line.get_color(), alpha=0.15)
    ax.set_xlabel("steering value added to dim 0 (x residual RMS, sign from the top-token list)")
    ax.set_ylabel("fraction of samples containing the token")
    ax.set_title(f"steering curve, mean over {len(seeds)} seed(s)" + (", 95% interval" if len(seeds) > 1 else ""),
                 fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1]
    labels, x = [], 0
    for role, t in targets.items():
        for model in ("routed", "control"):
            s = summ[role][model]
            for j, (k, col) in enumerate((("zero_dim0_target", "tab:red"), ("zero_dim0_other", "tab:gray"))):
                ci = s[k]
                err = None if ci["n"] == 1 else [[ci["mean"] - ci["lo"]], [ci["hi"] - ci["mean"]]]
                ax.bar(x + (j - 0.5) * 0.38, ci["mean"], 0.38, yerr=err, color=col,
                       label=("the token" if j == 0 else "other tokens") if x == 0 else None)
            labels.append(f"{t['word']}\n{model}")
            x += 1
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_yscale("symlog", linthresh=0.01)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylabel("loss change when dim 0 is zeroed (nats/token, symlog)")
    ax.legend(fontsize=8)
    savefig(fig, out / "ablation_and_steering.png")

    # learning curves: the models learned the corpus before the analysis
    fig, ax = pyplot.subplots(figsize=(6, 4))
    for (arm, seed), r in sorted(results.items()):
        if r["held_out_curve"]:
            ax.plot([e["step"] for e in r["held_out_curve"]], [e["topic_loss"] for e in r["held_out_curve"]],
                    alpha=0.7, label=f"{arm} seed {seed}, held-out topic")
    ax.set_xlabel("training step")
    ax.set_yscale("log")
    ax.set_ylabel("held-out loss (nats/token, 32 topic stories, log)")
    ax.legend(fontsize=6)
    savefig(fig, out / "learning_curves.png")


def report(out: Path) -> dict:
    m = read_json(Path(out) / "metrics.json")
    claims = m["claims"]
    verdict, checks = claim_summary(claims, "holds", "checks hold")
    cfg, n = m["config"], len(m["seeds"])
    t, neg = m["targets"][TOPICAL], m["targets"].get(NEGATIVE)
    notes = "; ".join(f"{name}: {c['intervals']}" for name, c in claims.items() if "intervals" in c)
    ranks = claims[next(iter(claims))]["ranks"]
    neg_txt = ""
    if neg:
        s, c = m["summary"][NEGATIVE]["routed"], m["summary"][NEGATIVE]["control"]
        neg_txt = (f" Negative control {neg['word']!r} (a name, drawn independently of the story): rank "
                   f"{fmt_ci(s['target_rank'], 1)}, names in top {cfg['top_k']} {fmt_ci(s['related_in_top'], 1)} "
                   f"vs control {fmt_ci(c['related_in_top'], 1)} (not part of the verdict).")
    return {
        "title": "Steering scalar (arXiv 2410.04332, sec. 4.2.1)",
        "claim": "Routing one topical token to residual dim 0 localizes a broader feature: the token ranks near the "
                 "top by cosine with e0, the unembedding rows closest to e0 are its category; zeroing dim 0 hurts "
                 "that token; adding to dim 0 steers generation toward it.",
        "paper": "' California' routed to dim 0 of blocks 6-15 of 16: nearest unembeddings California (1st), Californ, "
                 "Oregon, Colorado, Texas, Florida, Arizona, Sacramento, Los; steering toward California works.",
        "verdict": verdict,
        "detail": (f"{checks}. Topical token {t['word']!r} (ranks per seed {ranks}); category: the generator's "
                   f"{len(t['related_words'])} single-token {t['category']}. {notes}.{neg_txt} n={n} seeds "
                   f"{m['seeds']}; profile {m['profile']}: {cfg['train']['steps']} steps of {cfg['batch_size']} "
                   f"stories, model {cfg['model']}, generated corpus; cells: mean [95% interval] (n)."),
        "table": {"header": header(m), "rows": _rows(m)},
        "figures": [f for f in ("top_tokens.png", "ablation_and_steering.png", "learning_curves.png")
                    if (Path(out) / f).exists()],
    }
