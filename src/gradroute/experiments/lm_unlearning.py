"""Language-model unlearning under partial labels (arXiv 2410.04332, sec. 4.2.2, plus parameter routing).

A small GPT is trained on children's stories; stories matching the forget rule (tree, forest,
woodland...) are the forget set, of which only a fraction p is labelled. Six methods:
base, data filtering, ERA (expand, route, ablate), parameter routing (SGTM-style), RMU and
DEMix. Each is evaluated on held-out retain and forget stories, with the keyword tokens
excluded (absorption), and under a retraining attack (fine-tuning on n forget stories; the
minimum forget loss reached).

    gradroute run lm-unlearning --out runs/lm                       # quick profile, whole sweep
    gradroute run lm-unlearning --profile paper --out runs/lm_paper  # the paper's sizes
    gradroute run lm-unlearning --methods base era --fractions 0.5 --seeds 0
    torchrun --nproc_per_node=2 -m gradroute.cli run lm-unlearning --workers 1 ...   # DDP
    torchrun --nproc_per_node=2 -m gradroute.cli run lm-unlearning --fsdp ...        # FSDP2 (docs/scale.md)
    gradroute run lm-unlearning --corpus docs/ --label-field label --model my_llama/ --save-models
                                  # a Hugging Face model folder with its own tokenizer (docs/your_data.md)

Shared data per seed: the same label subset (nested across p) and the same batch order for
every method. Base training does not depend on p: it is trained once per seed and its record
repeated for each p; so is filtering at p = 0 and RMU at p = 0 (no labelled data: both are the
base model). Results go to ``--out``: runs/*.json per training run (resumable: finished runs
are skipped, interrupted ones continue from their checkpoint), metrics.json, summary.md,
samples.md and figures.
"""
from __future__ import annotations

import argparse
import copy
import functools
import os
import time
from pathlib import Path

import numpy as np
import torch

import gradroute as gr
from gradroute.lm import gcide
from gradroute.lm import methods as M
from gradroute.lm import user_corpus
from gradroute.lm.corpus import load_corpus, split_counts
from gradroute.lm.data import encode_stories
from gradroute.lm.evaluate import (SAMPLE_PROMPT, domain_check, evaluate, retraining_attack, sample, steps_to_recover,
                                   strongest_attack_lr)
from gradroute.lm.tokenizer import get_tokenizer, model_tokenizer
from gradroute.lm.train import TrainConfig, init_distributed, rank_world
from gradroute.sweep import run_jobs, split_finished
from gradroute.utils import (claim_summary, format_ci, markdown_table, mean_ci, plt, read_json, resolve_device,
                             savefig, set_seed, write_json)

DESCRIPTION = ("LM unlearning under partial labels: base, data filtering, ERA, parameter routing, "
               "RMU and DEMix on children's stories, with a retraining attack.")

FRACTIONS = [0.0, 0.1, 0.25, 0.5, 1.0]
# RMU's layer and c (a multiple of the base model's residual norm there) are chosen per run on the
# validation split by methods.select_rmu; the grid is scaled to the model's depth
# (and the fine-tune lr: at the quick profile's 3e-3 no candidate moved forget_val loss by more
# than 0.001 nats in a first run, docs/lm_unlearning.md)
RMU_GRID = {"quick": {"layers": [0, 1], "c_mult": [3.0, 10.0], "lr": [3e-3, 3e-2]},
            "paper": {"layers": [1, 3, 5], "c_mult": [3.0, 10.0], "lr": [5e-4, 5e-3]}}
PROFILES = {
    # a 2-block model trained until it has learned the forget topic (base learning curve: forget
    # validation loss 6.9 -> 1.0 at step 200, 0.45 at 800 of a 1,000-step run; docs/lm_unlearning.md);
    # `gradroute reproduce --profile quick` runs 5 methods x p in {0.1, 0.5} x 3 seeds of it
    "quick": dict(
        corpus=dict(n_train=3000, n_eval=128, n_attack=64, n_val=32),
        tokenizer="bpe", vocab_size=1024,
        model=dict(n_ctx=96, n_layer=2, n_head=4, d_model=64, d_mlp=256),
        train=dict(steps=800, lr=3e-3, warmup=10, ckpt_every=200, eval_every=50), batch_size=24,
        method=dict(expand=32, l1=1e-4, coherence_steps=8, coherence_lr=3e-4, rmu_steps=40, rmu_lr=3e-3,
                    rmu_grid=RMU_GRID["quick"]),
        attack=dict(sizes=[1, 4, 16, 64], steps=16, repeats=1, lr=3e-4, eval_every=4, batch_size=8, n_eval=32),
        seeds=3, size_from_corpus=True),
    # the paper's sizes (TinyStories-28M shape, 5000 steps of 80 stories, GPT-2/Neo vocabulary)
    "paper": dict(
        corpus=dict(n_train=200_000, n_eval=1000, n_attack=256, n_val=256),
        tokenizer="gpt2", vocab_size=50257,
        model=dict(n_ctx=256, n_layer=8, n_head=16, d_model=512, d_mlp=2048),
        train=dict(steps=5000, lr=5e-4, warmup=100, ckpt_every=500, eval_every=250), batch_size=80,
        method=dict(expand=64, l1=1e-4, coherence_steps=40, coherence_lr=5e-5, rmu_steps=500, rmu_lr=5e-4,
                    rmu_grid=RMU_GRID["paper"]),
        attack=dict(sizes=[1, 4, 16, 64], steps=40, repeats=5, lr=5e-5, eval_every=1, batch_size=None, n_eval=256),
        seeds=5),
}
# the real-text profile: the quick profile sized from the corpus (user_corpus.size_for_corpus), with an
# attack three times as long so that the steps each method needs to get back to the base model's forget
# loss can be counted (docs/real_text.md)
PROFILES["real"] = copy.deepcopy(PROFILES["quick"])
PROFILES["real"]["attack"].update(steps=48, lr_grid=[3e-4, 1e-3, 3e-3])
REAL_METHODS = ("base", "filtering", "era", "param_routing", "rmu")
REAL_FRACTIONS = (0.1, 0.5)
TRAIN_STREAM, EVAL_STREAM = 0, 1    # generated corpus: seeds of the training and held-out streams


# ------------------------------------------------------------------------------------------
# data (built once per process)
# ------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def _prepare(cfg_key: str):
    import json

    cfg = json.loads(cfg_key)
    if "user_data" in cfg:                      # a user's corpus and forget rule (issue 12)
        return user_corpus.prepare(cfg)
    c = cfg["corpus"]
    train_texts = load_corpus(cfg["source"], c["n_train"], seed=TRAIN_STREAM)
    # held-out stories: a different generated stream, or the stories after the training ones
    if cfg["source"] == "generated":
        held = load_corpus("generated", 12 * c["n_eval"] + 10 * (c["n_attack"] + c["n_val"]), seed=EVAL_STREAM)
    else:
        held = load_corpus(cfg["source"], 10 * (c["n_eval"] + c["n_attack"] + c["n_val"]), start=c["n_train"])
    tok = (model_tokenizer(cfg["model"]["path"]) if cfg["tokenizer"] == "model"
           else get_tokenizer(cfg["tokenizer"], texts=train_texts, vocab_size=cfg["vocab_size"]))
    n_ctx = cfg["model"]["n_ctx"]
    train = encode_stories(tok, train_texts, n_ctx)
    seen = set(train_texts)
    held = [t for t in dict.fromkeys(held) if t not in seen]          # disjoint from training
    h = encode_stories(tok, held, n_ctx)
    f_idx, r_idx = h.forget.nonzero().flatten(), (~h.forget).nonzero().flatten()
    need_f, need_r = c["n_eval"] + c["n_attack"] + c["n_val"], c["n_eval"] + c["n_val"]
    if len(f_idx) < need_f or len(r_idx) < need_r:
        raise ValueError(f"held-out corpus too small: {len(f_idx)} forget / {len(r_idx)} retain stories, "
                         f"need {need_f} / {need_r}")
    sets = {"retain": h.subset(r_idx[:c["n_eval"]]), "retain_val": h.subset(r_idx[c["n_eval"]:need_r]),
            "forget": h.subset(f_idx[:c["n_eval"]]),
            "attack_pool": h.subset(f_idx[c["n_eval"]:c["n_eval"] + c["n_attack"]]),
            "forget_val": h.subset(f_idx[c["n_eval"] + c["n_attack"]:need_f])}
    return tok, train, sets, split_counts(train_texts)


def _cfg_key(cfg: dict) -> str:
    import json

    return json.dumps({k: cfg[k] for k in ("source", "corpus", "tokenizer", "vocab_size", "model", "user_data")
                       if k in cfg}, sort_keys=True)


# ------------------------------------------------------------------------------------------
# one training run
# ------------------------------------------------------------------------------------------
def _run_path(out: Path, method: str, p, seed: int) -> Path:
    return out / "runs" / (f"{method}_s{seed}.json" if p is None else f"{method}_p{p:g}_s{seed}.json")


def run_one(method: str, p: float | None, seed: int, cfg: dict, out: Path, device: str = "cpu") -> dict:
    """Train ``method`` at labelled fraction ``p`` (None for base) with ``seed``; evaluate,
    attack, sample; write ``out/runs/<run>.json`` (rank 0) and return it."""
    t0 = time.time()
    tok, train_data, sets, _ = _prepare(_cfg_key(cfg))
    set_seed(seed)
    labelled = gr.label_subset(train_data.forget, p or 0.0, torch.Generator().manual_seed(seed))
    data = train_data.with_labels(labelled)
    # --model: the folder's shape (vocab_size = its embedding rows) was recorded by build_config
    mspec = {"vocab_size": tok.vocab_size, **cfg["model"], "arch": cfg.get("arch", "gpt"), "eot_id": tok.eot_id}
    name = _run_path(out, method, p, seed).stem
    setup = M.Setup(model=mspec, train=TrainConfig(**cfg["train"]), data=data, batch_size=cfg["batch_size"],
                    seed=seed, method=M.MethodConfig(**cfg["method"]), retain_val=sets["retain_val"],
                    forget_val=sets["forget_val"], out_dir=out / "ckpt" / name, resume=True, device=device)
    if method == "rmu":
        base = M.make_model(mspec, seed)
        base.load_state_dict(torch.load(out / "models" / f"base_s{seed}.pt", weights_only=True))
        model, info = M.train_rmu(setup, base)
    else:
        model, info = M.TRAINERS[method](setup)
    model.to(device)
    rank, _ = rank_world()
    result = {"method": method, "labelled_fraction": p, "seed": seed, "config": cfg,
              "labelled_stories": int(labelled.sum()), "forget_stories": int(train_data.forget.sum())}
    ev = evaluate(model, sets["retain"], sets["forget"])
    ev.update(user_corpus.extra_metrics(model, sets))     # topic_loss with --topic-field
    samples = {"final": sample(model, tok, SAMPLE_PROMPT, seed=seed)}
    for stage in ("before_ablation", "after_ablation"):
        if stage in info:
            m = info[stage].to(device)
            stage_ev = {**evaluate(m, sets["retain"], sets["forget"]), **user_corpus.extra_metrics(m, sets)}
            ev.update({f"{k}_{stage}": v for k, v in stage_ev.items()})
            samples[stage] = sample(m, tok, SAMPLE_PROMPT, seed=seed)
    if "before_ablation" in info:    # what ablating the routed units alone does (before coherence)
        ev["ablation_forget_raise"] = ev["forget_loss_after_ablation"] - ev["forget_loss_before_ablation"]
        ev["ablation_retain_raise"] = ev["retain_loss_after_ablation"] - ev["retain_loss_before_ablation"]
    a = cfg["attack"]
    common = dict(steps=a["steps"], repeats=a["repeats"], eval_every=a["eval_every"], batch_size=a["batch_size"],
                  seed=seed, device=device)
    lr = a["lr"]
    if a.get("lr_grid"):         # the strongest attack on this model, chosen on the forget validation split
        lr, reached = strongest_attack_lr(model, sets["attack_pool"], sets["forget_val"], a["lr_grid"],
                                          max(a["sizes"]), **common)
        result["attack_lr"], result["attack_lr_selection"] = lr, {str(k): v for k, v in reached.items()}
    attack = retraining_attack(model, sets["attack_pool"], sets["forget"].subset(slice(0, a["n_eval"])),
                               sizes=a["sizes"], lr=lr, **common)
    result.update(ev)
    result["forget_loss_after_attack"] = attack["min"]
    for n, v in attack["min_by_n"].items():
        result[f"forget_loss_after_attack_n{n}"] = v
    result["attack_curves"] = attack["curves"]
    result["attack_tokens_per_step"] = attack["tokens_per_step"]
    result["samples"] = samples
    tl = info.get("train", {})
    result["train_loss_final"] = tl["history"][-1]["loss"] if tl.get("history") else None
    result["train_wall_s"] = tl.get("wall_s")
    result["train_processes"] = tl.get("world", 1)     # processes and sharding of the main training
    result["train_fsdp"] = bool(tl.get("fsdp"))
    result["learning_curve"] = tl.get("evals", [])       # retain_val / forget_val every eval_every steps
    if "selection" in info:
        result["rmu_selection"] = info["selection"]
    if "c" in info:
        result["rmu_c"] = info["c"]
    result["wall_s"] = time.time() - t0
    for k in ("forget_params", "stories_dropped", "layer", "skipped"):
        if k in info:
            result[k] = info[k]
    if rank == 0:
        if method == "base":
            (out / "models").mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), out / "models" / f"base_s{seed}.pt")
        if cfg.get("user_data", {}).get("save_models"):
            result["saved_model"] = str(user_corpus.save_model(model, tok, out / "models" / name))
        write_json(_run_path(out, method, p, seed), result)
    return result


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick",
                        help="quick (default; the full sweep of 6 methods x 5 p x 3 seeds is 72 runs, an estimated 60 CPU-minutes; "
                             "reproduce runs 5 methods x p in {0.1, 0.5}: 16 CPU-minutes measured), paper (paper sizes) "
                             "or real (the GCIDE dictionary's medical entries, see --gcide and docs/real_text.md)")
    parser.add_argument("--methods", nargs="+", choices=M.METHODS, default=None,
                        help=f"default: all ({' '.join(M.METHODS)}); profile real: {' '.join(REAL_METHODS)}")
    parser.add_argument("--fractions", nargs="+", type=float, default=None,
                        help=f"labelled fractions p of the forget stories (default: {FRACTIONS}; profile real: "
                             f"{REAL_FRACTIONS})")
    gcide.add_argument(parser)
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: range(profile seeds)")
    parser.add_argument("--corpus", default="generated",
                        help="generated (default, offline), tinystories (HF hub, needs `datasets`) or a "
                             "path to a .txt/.jsonl file of stories")
    parser.add_argument("--tokenizer", choices=["bpe", "gpt2"], default=None, help="override the profile")
    parser.add_argument("--arch", choices=["gpt", "hf-gpt2"], default="gpt",
                        help="our GPT (default) or a Hugging Face GPT-2 of the same shape")
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="a Hugging Face causal LM folder (weights, or config.json only: trained from scratch) "
                             "with its own tokenizer; replaces --arch and --tokenizer (GPT-2, Llama/Qwen, GPT-NeoX "
                             "layouts; see docs/your_data.md)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps (override the profile; with --corpus PATH, default: sized to the corpus)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="BPE vocabulary (override the profile; with --corpus PATH, default: sized to the corpus)")
    parser.add_argument("--d-model", type=int, default=None,
                        help="model width; the MLP is 4x, heads keep the profile's width (override the profile)")
    parser.add_argument("--n-layer", type=int, default=None, help="transformer blocks (override the profile)")
    parser.add_argument("--lr", type=float, default=None,
                        help="training learning rate (override the profile; cosine floor lr/10), e.g. lower for "
                             "a pretrained --model")
    parser.add_argument("--attack-steps", type=int, default=None, help="override the profile")
    parser.add_argument("--attack-repeats", type=int, default=None, help="override the profile")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="parallel training processes on CPU (1 = in this process; forced under torchrun)")
    parser.add_argument("--fsdp", action="store_true",
                        help="under torchrun (2 or more processes): train sharded with FSDP2 (fully_shard per block, "
                             "then the root) instead of DDP; evaluation, ablation and the attack run on the "
                             "gathered, unsharded model on every rank (docs/scale.md)")
    parser.add_argument("--no-domain-check", action="store_true",
                        help="skip the fully filtered reference runs (filtering at p = 1) that say whether the "
                             "base model learned anything specific to the forget domain")
    user_corpus.add_arguments(parser)


def _real_text_defaults(args: argparse.Namespace) -> None:
    """``--profile real``: the GCIDE medical corpus through the user-corpus path
    (:func:`gcide.use_real_corpus`); the profile's methods and fractions unless given."""
    gcide.use_real_corpus(args)
    args.methods = args.methods or list(REAL_METHODS)
    args.fractions = args.fractions or list(REAL_FRACTIONS)


def set_steps(cfg: dict, steps: int) -> None:
    cfg["train"]["steps"] = steps
    cfg["train"]["warmup"] = min(cfg["train"]["warmup"], steps // 10)


def set_width(cfg: dict, d_model: int) -> None:
    """Model width ``d_model`` with the MLP at 4x and heads of the profile's head width."""
    m = cfg["model"]
    head_dim = m["d_model"] // m["n_head"]
    if d_model % head_dim:
        raise ValueError(f"--d-model must be a multiple of the head width {head_dim}, got {d_model}")
    m.update(d_model=d_model, d_mlp=4 * d_model, n_head=d_model // head_dim)


def build_config(args: argparse.Namespace) -> dict:
    if args.profile == "real":
        _real_text_defaults(args)
    args.methods = args.methods or list(M.METHODS)
    args.fractions = args.fractions or list(FRACTIONS)
    cfg = copy.deepcopy(PROFILES[args.profile])
    cfg["profile"], cfg["source"], cfg["arch"] = args.profile, args.corpus, args.arch
    if args.tokenizer:
        cfg["tokenizer"] = args.tokenizer
    for flag, lo in (("steps", 1), ("vocab_size", 64), ("d_model", 8), ("n_layer", 1)):
        v = getattr(args, flag, None)
        if v is not None and v < lo:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= {lo}, got {v}")
    if getattr(args, "model", None) and any(getattr(args, f, None) for f in ("vocab_size", "d_model", "n_layer")):
        raise ValueError("--model brings its own shape and tokenizer: drop --vocab-size / --d-model / --n-layer")
    if getattr(args, "model", None):
        if args.arch != "gpt" or args.tokenizer:
            raise ValueError("--model brings its own architecture and tokenizer: drop --arch / --tokenizer")
        cfg["arch"], cfg["tokenizer"] = "hf", "model"
        cfg["model"] = M.hf_model_spec(args.model, cfg["model"]["n_ctx"])
        cfg.pop("vocab_size", None)
    if args.steps is not None:
        set_steps(cfg, args.steps)
    if getattr(args, "fsdp", False):
        cfg["train"]["fsdp"] = True
    if getattr(args, "vocab_size", None):
        cfg["vocab_size"] = args.vocab_size
    if getattr(args, "d_model", None):
        set_width(cfg, args.d_model)
    if getattr(args, "n_layer", None):
        cfg["model"]["n_layer"] = args.n_layer
    if getattr(args, "lr", None) is not None:
        if args.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {args.lr}")
        cfg["train"]["lr"] = args.lr
    for flag, key in (("attack_steps", "steps"), ("attack_repeats", "repeats")):
        v = getattr(args, flag)
        if v is not None:
            if v < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
            cfg["attack"][key] = v
    bad = [p for p in args.fractions if not 0.0 <= p <= 1.0]
    if bad:
        raise ValueError(f"--fractions must be in [0, 1], got {bad}")
    if user_corpus.is_user_corpus(args.corpus):
        user_corpus.configure(cfg, args)
        sizes, a = cfg["user_data"]["sizes"], cfg["attack"]        # the attack sizes, shrunk to the pool
        a["sizes"] = sorted({min(int(n), sizes["attack_pool"]) for n in a["sizes"]})
        a["n_eval"] = min(a["n_eval"], sizes["forget"])
    return cfg


def jobs_for(methods, fractions, seeds, domain_check: bool = False) -> list[tuple[str, float | None, int]]:
    """Training runs needed: base once per seed (also for filtering/RMU at p = 0), the rest per p;
    with ``domain_check`` also base and filtering at p = 1 (every labelled forget story removed)."""
    jobs = []
    need_base = domain_check or any(m == "base" or m == "rmu" or (m == "filtering" and 0.0 in fractions)
                                    for m in methods)
    for s in seeds:
        if need_base:
            jobs.append(("base", None, s))
        for p in fractions:
            for m in methods:
                if m == "base" or (m in ("filtering", "rmu") and p == 0.0):
                    continue
                jobs.append((m, p, s))
        if domain_check and ("filtering", 1.0, s) not in jobs:
            jobs.append(("filtering", 1.0, s))
    return jobs


def run(args: argparse.Namespace) -> dict:
    t0 = time.time()
    cfg = build_config(args)
    rank, world = init_distributed()
    if cfg["train"].get("fsdp") and world < 2:
        raise ValueError("--fsdp shards the model over torchrun's processes, and this is one process: launch with "
                         "`torchrun --nproc_per_node N -m gradroute.cli run lm-unlearning --fsdp ...` (N >= 2), "
                         "or drop --fsdp")
    device = str(resolve_device(args.device))
    out = Path(args.out)
    seeds = args.seeds if args.seeds is not None else list(range(cfg["seeds"]))
    fractions = sorted(set(args.fractions))
    jobs = jobs_for(args.methods, fractions, seeds, domain_check=not args.no_domain_check)
    _, train_data, _, counts = _prepare(_cfg_key(cfg))     # build tokenizer + data once, before workers
    if rank == 0:
        print(f"corpus: {counts['stories']} training stories, {counts['forget']} match the forget rule "
              f"({100 * counts['forget_fraction']:.1f}%)")
    results, todo = split_finished(jobs, lambda *k: _run_path(out, *k), cfg, verbose=rank == 0)
    workers = 1 if world > 1 or device != "cpu" else max(1, args.workers)
    job = functools.partial(run_one, cfg=cfg, out=out, device=device)
    # RMU starts from the base model, so it runs after every base run; the other methods run beside
    # the base runs (base first in the queue), so no worker waits for the last base run
    for phase, desc in ((sorted([k for k in todo if k[0] != "rmu"], key=lambda k: k[0] != "base"), "lm-unlearning runs"),
                        ([k for k in todo if k[0] == "rmu"], "lm-unlearning RMU runs")):
        results.update(run_jobs(phase, job, workers, desc=desc, show=rank == 0))
    if rank != 0:
        return {}
    runs = records(results, args.methods, fractions, seeds)
    summary = summarize(runs)
    domain = None
    if not args.no_domain_check:
        domain = domain_check([results[("base", None, s)] for s in seeds], [results[("filtering", 1.0, s)] for s in seeds])
    metrics = {"experiment": "lm-unlearning", "profile": args.profile, "config": cfg, "seeds": seeds,
               "fractions": fractions, "methods": list(args.methods), "corpus": counts,
               "domain_check": domain,
               "runs": runs, "summary": summary, "claims": check_claims(summary, paired_vs_filtering(runs)),
               "other_claims": other_claims(summary), "rmu_selection": rmu_selections(results),
               "wall_time_s": time.time() - t0, "world_size": world,
               "train_wall_s_total": sum(r.get("wall_s", 0) for r in results.values())}
    write_json(out / "metrics.json", metrics)
    (out / "summary.md").write_text(summary_tables(summary))
    (out / "samples.md").write_text(samples_md(results))
    if "user_data" in cfg:
        (out / "evaluation.md").write_text(user_corpus.evaluation_table(runs))
        if cfg["user_data"]["save_models"]:     # the held-out documents, for `gradroute eval MODEL --data`
            user_corpus.write_eval_data(cfg, out / "eval_data")
    make_figures(out, summary, results)
    print(summary_tables(summary))
    if domain is not None:
        print(domain["message"])
    print(f"wrote {out / 'metrics.json'} ({metrics['wall_time_s']:.0f} s)")
    return metrics


# ------------------------------------------------------------------------------------------
# reporting
# ------------------------------------------------------------------------------------------
RECORD_KEYS = ("retain_loss", "forget_loss", "forget_loss_no_keywords", "topic_loss", "forget_loss_after_attack")
STAGE_SUFFIXES = ("_before_ablation", "_after_ablation")     # ERA / parameter routing: before the coherence fine-tune
RECOVERY_PREFIXES = ("attack_steps_to_base_n", "attack_tokens_to_base_n", "attack_recovered_n")
ABLATION_KEYS = ("ablation_forget_raise", "ablation_retain_raise", "ablation_margin")
MUST_SHOW = ("era", "param_routing")        # the methods the checks are about


def records(results: dict, methods, fractions, seeds) -> list[dict]:
    """Flat records, one per (method, p, seed); base (and filtering / RMU at p = 0) repeat the
    base run's numbers."""
    out = []
    for s in seeds:
        for p in fractions:
            for m in methods:
                key = ("base", None, s) if m == "base" or (m in ("filtering", "rmu") and p == 0.0) else (m, p, s)
                r = results[key]
                rec = {"method": m, "labelled_fraction": p, "seed": s}
                rec.update({k: v for k, v in r.items() if isinstance(v, (int, float)) and k not in ("seed",)
                            and k != "labelled_fraction"})
                if "ablation_forget_raise" in rec:   # > 0 where forget rises >= 3x as much as retain
                    rec["ablation_margin"] = rec["ablation_forget_raise"] - 3 * rec["ablation_retain_raise"]
                base = results.get(("base", None, s))
                if base is not None:
                    rec.update(recovery(r["attack_curves"], base["attack_curves"], r.get("attack_tokens_per_step")))
                rec["from_run"] = _run_path(Path("."), *key).stem
                out.append(rec)
    return out


def _curve(curves: dict, n):
    return curves.get(str(n), curves.get(int(n)))


def recovery(curves: dict, base_curves: dict, tokens_per_step: dict | None = None) -> dict:
    """Per attack size n: ``attack_steps_to_base_n{n}``, the fine-tuning steps until the forget
    loss is back at the base model's (its curve's starting point), and the tokens that took
    (``attack_tokens_to_base_n{n}``); a run whose curve never gets there records
    ``attack_recovered_n{n}`` = 0 and the attack's length as a lower bound (censored)."""
    out = {}
    for n in curves:
        curve, base = _curve(curves, n), _curve(base_curves, n)
        if not curve or not base:
            continue
        steps = steps_to_recover(curve, base[0][1])
        out[f"attack_recovered_n{n}"] = int(steps is not None)
        out[f"attack_steps_to_base_n{n}"] = float(curve[-1][0]) if steps is None else steps
        if tokens_per_step and _curve(tokens_per_step, n):
            out[f"attack_tokens_to_base_n{n}"] = out[f"attack_steps_to_base_n{n}"] * _curve(tokens_per_step, n)
    return out


def summarize(runs: list[dict]) -> dict:
    """``{method: {p: {metric: mean_ci over seeds}}}``."""
    out: dict = {}
    for r in runs:
        d = out.setdefault(r["method"], {}).setdefault(f"{r['labelled_fraction']:g}", {})
        for k in [k for k in r if k in RECORD_KEYS + ABLATION_KEYS or k.startswith(RECOVERY_PREFIXES)
                  or k.endswith(STAGE_SUFFIXES)]:
            d.setdefault(k, []).append(r[k])
    return {m: {p: {k: mean_ci(v) for k, v in d.items()} for p, d in sorted(ps.items(), key=lambda kv: float(kv[0]))}
            for m, ps in out.items()}


def paired_vs_filtering(runs: list[dict], key: str = "forget_loss_after_attack") -> dict:
    """``{method: {p: mean_ci over seeds of (method - filtering)}}`` for ``key``: seeds share the
    label subset and the batch order, so the per-seed difference is the paired comparison."""
    by = {(r["method"], f"{r['labelled_fraction']:g}", r["seed"]): r.get(key) for r in runs}
    out: dict = {}
    for (m, p, seed), v in by.items():
        f = by.get(("filtering", p, seed))
        if m in ("filtering", "base") or v is None or f is None:
            continue
        out.setdefault(m, {}).setdefault(p, []).append(v - f)
    return {m: {p: mean_ci(d) for p, d in ps.items()} for m, ps in out.items()}


def _separate(a: dict, b: dict) -> bool:
    """True when the 95% interval of ``a`` lies wholly above that of ``b`` (both need n >= 2)."""
    return a.get("n", 1) >= 2 and b.get("n", 1) >= 2 and a["lo"] > b["hi"]


def check_claims(summary: dict, paired: dict | None = None) -> dict:
    """The issue's "what it must show" checks, on seed means, each also saying whether the 95%
    intervals separate: at every labelled fraction 0 < p <= 0.5, (a) ERA and parameter routing
    reach a higher minimum forget loss after the retraining attack than data filtering, and (b)
    ablating their routed units raises forget loss at least 3x as much as retain loss. With
    ``paired`` (:func:`paired_vs_filtering`) the (a) records also carry the per-seed paired
    difference's interval (information; the verdict is on the means)."""
    claims = {}
    stat = lambda m, p, k: summary.get(m, {}).get(p, {}).get(k)
    ps = sorted({p for d in summary.values() for p in d}, key=float)
    for m in MUST_SHOW:
        for p in [p for p in ps if 0 < float(p) <= 0.5]:
            a, f = stat(m, p, "forget_loss_after_attack"), stat("filtering", p, "forget_loss_after_attack")
            if a is not None and f is not None:
                claims[f"{m} > filtering on robust unlearning at p={p}"] = {
                    "holds": a["mean"] > f["mean"], "intervals_separate": _separate(a, f), "n": a["n"],
                    m: a, "filtering": f,
                    "retain_cost_vs_filtering": stat(m, p, "retain_loss")["mean"] - stat("filtering", p, "retain_loss")["mean"]}
                d = (paired or {}).get(m, {}).get(p)
                if d is not None:
                    claims[f"{m} > filtering on robust unlearning at p={p}"].update(
                        paired_difference=d, paired_interval_above_0=d["n"] >= 2 and d["lo"] > 0)
            df, dr = stat(m, p, "ablation_forget_raise"), stat(m, p, "ablation_retain_raise")
            if df is not None and dr is not None:
                margin = stat(m, p, "ablation_margin")
                claims[f"{m} ablation raises forget >= 3x retain at p={p}"] = {
                    "holds": df["mean"] > 0 and df["mean"] >= 3 * dr["mean"],
                    "intervals_separate": margin["n"] >= 2 and margin["lo"] > 0, "n": df["n"],
                    "forget_raise": df, "retain_raise": dr, "margin_forget_minus_3x_retain": margin}
    return claims


def other_claims(summary: dict) -> dict:
    """The paper's other statements, checked on seed means where the sweep has the data (not
    part of the verdict): filtering most robust at p = 1; parameter routing Pareto-dominates
    ERA (robust forget loss and retain loss) at every p > 0."""
    claims = {}
    get = lambda m, p, k: summary.get(m, {}).get(p, {}).get(k, {}).get("mean")
    ps = sorted({p for d in summary.values() for p in d}, key=float)
    if "1" in ps:
        vals = {m: get(m, "1", "forget_loss_after_attack") for m in summary if m != "base"}
        vals = {m: v for m, v in vals.items() if v is not None}
        if "filtering" in vals:
            claims["filtering most robust at p=1"] = {"holds": vals["filtering"] >= max(vals.values()), **vals}
    if "era" in summary and "param_routing" in summary:
        wins = {}
        for p in [p for p in ps if float(p) > 0]:
            e = (get("era", p, "forget_loss_after_attack"), get("era", p, "retain_loss"))
            q = (get("param_routing", p, "forget_loss_after_attack"), get("param_routing", p, "retain_loss"))
            if None not in e + q:
                wins[p] = {"param_routing_dominates": q[0] >= e[0] and q[1] <= e[1],
                           "era_dominates": e[0] >= q[0] and e[1] <= q[1],
                           "era": {"robust_forget": e[0], "retain": e[1]},
                           "param_routing": {"robust_forget": q[0], "retain": q[1]}}
        claims["param_routing better trade-off than era"] = {
            "holds": bool(wins) and all(w["param_routing_dominates"] for w in wins.values()), "by_p": wins}
    return claims


TABLES = (("retain_loss", "Retain loss (nats/token; lower = less alignment tax)"),
          ("forget_loss", "Forget loss after unlearning (higher = more unlearned)"),
          ("forget_loss_no_keywords", "Forget loss, keyword tokens excluded (absorption)"),
          ("forget_loss_after_attack", "Forget loss after the retraining attack, minimum reached "
                                       "(higher = more robust)"),
          ("ablation_forget_raise", "Ablation alone (before coherence fine-tune): forget loss raise"),
          ("ablation_retain_raise", "Ablation alone (before coherence fine-tune): retain loss raise"))


def _n_text(summary: dict) -> str:
    ns = sorted({c["n"] for ps in summary.values() for d in ps.values() for c in d.values()})
    if ns == [1]:
        return "n=1 seed (no interval)"
    return f"mean ± 95% CI half-width (Student t) over n={'/'.join(map(str, ns))} seeds"


def summary_tables(summary: dict) -> str:
    ps = sorted({p for d in summary.values() for p in d}, key=float)
    text = []
    for key, title in TABLES:
        rows = []
        for m in [m for m in M.METHODS if m in summary]:
            cells = [summary[m].get(p, {}).get(key) for p in ps]
            if all(c is None for c in cells):
                continue
            rows.append([m, *["" if c is None else format_ci(c) for c in cells]])
        if rows:
            text.append(f"### {title}\n\n{_n_text(summary)}, per labelled fraction p\n\n"
                        + markdown_table(["method", *[f"p={p}" for p in ps]], rows))
    return "\n".join(text)


def samples_md(results: dict) -> str:
    lines = [f"# Samples from \"{SAMPLE_PROMPT}\"\n"]
    for (m, p, s), r in sorted(results.items(), key=lambda kv: (kv[0][2], M.METHODS.index(kv[0][0]), kv[0][1] or 0)):
        if s != min(k[2] for k in results):
            continue
        tag = f"{m}" + ("" if p is None else f", p={p:g}") + f", seed {s}"
        for k, v in r["samples"].items():
            lines.append(f"- **{tag}** ({k.replace('_', ' ')}): {v}")
    return "\n".join(lines) + "\n"


def rmu_selections(results: dict) -> list[dict]:
    """Per RMU run: the validation-split candidates and the chosen (layer, c)."""
    out = []
    for (m, p, seed), r in sorted(results.items(), key=lambda kv: (kv[0][2], kv[0][1] or 0)):
        if m == "rmu" and "rmu_selection" in r:
            sel = r["rmu_selection"]
            best = sel["candidates"][sel["chosen"]]
            out.append({"labelled_fraction": p, "seed": seed, "layer": best["layer"], "c_mult": best["c_mult"],
                        "c": best["c"], "lr": best.get("lr"), "rule": sel["rule"], "candidates": sel["candidates"],
                        "base_retain_val": sel["base_retain_val"], "base_forget_val": sel["base_forget_val"]})
    return out


def make_figures(out: Path, summary: dict, results: dict) -> None:
    pyplot = plt()
    fig, axes = pyplot.subplots(1, 3, figsize=(14, 4))
    for ax, (key, title) in zip(axes, (("forget_loss", "Unlearning: forget loss"),
                                       ("forget_loss_after_attack", "Robust unlearning: forget loss after attack"),
                                       ("retain_loss", "Retain loss"))):
        for m in [m for m in M.METHODS if m in summary]:
            ps = sorted(summary[m], key=float)
            x = [float(p) for p in ps]
            y = [summary[m][p][key]["mean"] for p in ps]
            ax.plot(x, y, marker="o", label=m)
            ax.fill_between(x, [summary[m][p][key]["lo"] for p in ps], [summary[m][p][key]["hi"] for p in ps],
                            alpha=0.12)
        ax.set_xlabel("labelled fraction p of forget stories")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("loss (nats/token)")
    axes[0].legend(fontsize=8)
    savefig(fig, out / "unlearning_vs_labelled_fraction.png")
    learning_curves_figure(out, results)

    # relearning curves at the p closest to 0.5, mean over seeds, one panel per attack size
    ps = sorted({k[1] for k in results if k[1] is not None})
    if not ps:
        return
    p0 = min(ps, key=lambda p: abs(p - 0.5))
    sizes = sorted({int(n) for r in results.values() for n in r["attack_curves"]})
    fig, axes = pyplot.subplots(1, len(sizes), figsize=(4 * len(sizes), 3.6), squeeze=False)
    for ax, n in zip(axes[0], sizes):
        for m in M.METHODS:
            keys = [k for k in results if (k[0] == m and k[1] == p0) or (m == "base" and k[0] == "base")]
            curves = [results[k]["attack_curves"].get(str(n), results[k]["attack_curves"].get(n)) for k in keys]
            curves = [c for c in curves if c]
            if not curves:
                continue
            L = min(len(c) for c in curves)
            ax.plot([c[0] for c in curves[0][:L]], np.mean([[c[1] for c in cv[:L]] for cv in curves], 0), label=m)
        starts = [_curve(r["attack_curves"], n)[0][1] for k, r in results.items() if k[0] == "base"]
        if starts:          # steps to recover count the attack steps until a curve reaches this line
            ax.axhline(float(np.mean(starts)), color="gray", ls="--", lw=0.8, label="base model (recovery target)")
        ax.set_title(f"retraining on n={n} forget stories", fontsize=9)
        ax.set_xlabel("attack step")
    axes[0][0].set_ylabel(f"forget loss (p={p0:g}, mean over seeds)")
    axes[0][0].legend(fontsize=7)
    savefig(fig, out / "relearning_curves.png")


def learning_curves_figure(out: Path, results: dict) -> Path | None:
    """Base model (and filtering at the largest p) learning curves on the held-out validation
    retain and forget stories, one thin line per seed and the mean."""
    pyplot = plt()
    groups = {"base": [r for k, r in results.items() if k[0] == "base"]}
    ps = sorted({k[1] for k in results if k[0] == "filtering" and k[1] is not None})
    if ps:
        groups[f"filtering p={ps[-1]:g}"] = [r for k, r in results.items() if k[0] == "filtering" and k[1] == ps[-1]]
    groups = {g: [r["learning_curve"] for r in rs if r.get("learning_curve")] for g, rs in groups.items()}
    groups = {g: c for g, c in groups.items() if c}
    if not groups:
        return None
    fig, ax = pyplot.subplots(figsize=(6.5, 4))
    for (g, curves), ls in zip(groups.items(), ("-", "--")):
        for key, color in (("retain_val", "tab:blue"), ("forget_val", "tab:red")):
            L = min(len(c) for c in curves)
            x = [e["step"] for e in curves[0][:L]]
            for c in curves:
                ax.plot(x, [e[key] for e in c[:L]], color=color, ls=ls, lw=0.5, alpha=0.4)
            ax.plot(x, np.mean([[e[key] for e in c[:L]] for c in curves], 0), color=color, ls=ls,
                    label=f"{g}: {key.replace('_val', '')} (validation, mean of {len(curves)})")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out loss (nats/token, log scale)")
    ax.set_title("Held-out learning curves: base model and data filtering", fontsize=10)
    ax.legend(fontsize=7)
    return savefig(fig, out / "learning_curves.png")


def _corpus_text(m: dict) -> str:
    ud = m["config"].get("user_data")
    if ud is None:
        return "generated corpus"
    return f"corpus {m['corpus'].get('source')} ({m['corpus'].get('rule')})"


def _largest_attack(m: dict) -> int:
    return max(m["config"]["attack"]["sizes"])


def recovery_cell(stats: dict, recovered: dict | None, attack_steps: int) -> str:
    """Steps to recover as text: the mean ± 95% half-width, or '>= S' when a seed never got back."""
    if recovered is not None and recovered["mean"] < 1:
        return f">= {attack_steps}" if recovered["mean"] == 0 else f">= {format_ci(stats, 1)} ({recovered['mean']:.0%} recovered)"
    return format_ci(stats, 1)


def report(out: Path) -> dict:
    """This experiment's section of ``gradroute reproduce``'s report: the issue's checks (robust
    unlearning vs filtering, ablation effect) at every 0 < p <= 0.5, with 95% intervals."""
    m = read_json(Path(out) / "metrics.json")
    summary, claims = m["summary"], m["claims"]
    ps = sorted({p for d in summary.values() for p in d}, key=float)
    rows = [[f"{meth} ({short})", *[format_ci(summary[meth][p][key]) if key in summary[meth].get(p, {}) else ""
                                     for p in ps]]
            for key, short in (("forget_loss_after_attack", "forget after attack"), ("retain_loss", "retain"),
                               ("topic_loss", "related fields (topic)"),
                               ("ablation_forget_raise", "ablation: forget raise"),
                               ("ablation_retain_raise", "ablation: retain raise"))
            for meth in M.METHODS if meth in summary and any(key in summary[meth].get(p, {}) for p in ps)]
    n_big, attack_steps = _largest_attack(m), m["config"]["attack"]["steps"]
    k, rk = f"attack_steps_to_base_n{n_big}", f"attack_recovered_n{n_big}"
    rows += [[f"{meth} (attack steps to recover, n={n_big})",
              *[recovery_cell(summary[meth][p][k], summary[meth][p].get(rk), attack_steps)
                if k in summary[meth].get(p, {}) else "" for p in ps]]
             for meth in M.METHODS if meth in summary and meth != "base"]
    verdict, checks = claim_summary(claims, "holds", "checks hold on seed means")
    domain = m.get("domain_check")
    if domain is not None and not domain["learned"]:        # a verdict about nothing is no verdict
        verdict = "not assessed (little to unlearn)"
    sep = [name for name, c in claims.items() if c.get("intervals_separate")]
    lines = []
    for name, c in claims.items():
        if "forget_raise" in c:
            nums = (f"forget raise {format_ci(c['forget_raise'])}, retain raise {format_ci(c['retain_raise'])}")
        else:
            meth = name.split(" ")[0]
            nums = f"{format_ci(c[meth])} vs filtering {format_ci(c['filtering'])}"
            if "paired_difference" in c:
                nums += f"; per-seed paired difference {format_ci(c['paired_difference'])}"
        lines.append(f"{name}: {'holds' if c['holds'] else 'FAILS'} ({nums}; intervals "
                     f"{'separate' if c.get('intervals_separate') else 'overlap'})")
    cfg = m["config"]
    n = len(m["seeds"])
    return {
        "title": "Language-model unlearning under partial labels (arXiv 2410.04332, sec. 4.2.2, + parameter routing)",
        "claim": "At every labelled fraction 0 < p <= 0.5, ERA and parameter routing reach a higher minimum "
                 "forget loss after the retraining attack than data filtering, and ablating their routed units "
                 "raises forget loss at least 3x more than retain loss.",
        "paper": "Below full labelling ERA beats filtering, RMU and DEMix on unlearning and robust unlearning; "
                 "filtering is most robust at full labelling; ERA forget 1.91 vs base 1.47, retain 1.67 vs 1.59. "
                 "SGTM reports Pareto dominance over ERA.",
        "verdict": verdict,
        "detail": ((domain["message"] + ". " if domain else "")
                   + f"{checks}; 95% intervals separate for {len(sep)} of {len(claims)}. " + "; ".join(lines) + ". "
                   f"Profile {m['profile']}: {cfg['train']['steps']} steps of {cfg['batch_size']} stories, "
                   f"model {cfg['model']}, {n} seed{'s' if n != 1 else ''} ({'n=1, no interval' if n == 1 else 'mean ± 95% CI'}), "
                   f"{_corpus_text(m)}. Table: loss in nats/token; steps to recover: attack steps until the forget "
                   f"loss is back at the base model's (n={_largest_attack(m)} attack documents; '>= S' where some "
                   f"seed never got there in S steps)."),
        "table": {"header": ["method (metric)", *[f"p={p}" for p in ps]], "rows": rows},
        "figures": [f for f in ("unlearning_vs_labelled_fraction.png", "relearning_curves.png", "learning_curves.png")
                    if (Path(out) / f).exists()],
    }
