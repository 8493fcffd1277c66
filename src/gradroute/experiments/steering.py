"""The steering scalar (paper section 4): route one token to residual dimension 0.

Wherever the next token to predict is the routed token (default: the most frequent
single-token name of the story corpus), the gradient arriving at the outputs of the
middle-to-late blocks (the last 5/8 of them, as blocks 6-15 of 16 in the paper) is masked to
residual dimension 0: there the network can learn to predict that token only through dim 0.
Nothing else changes. Then:

- the unembedding rows closest (cosine) to e0, both signs: how many of the top 20 on the routed
  token's side belong to the routed token's category (other names, or other places), fixed up
  front from the story generator; the same for an unrouted control;
- the loss change when dim 0 is zeroed at the routed blocks' outputs, on the routed token,
  on the other category tokens and on everything else;
- steering: sampling with a value added to dim 0 after one block (sign from the top-token
  list): how often the routed token and its category appear, steered vs unsteered;
- the same routing and steering on a Hugging Face GPT-2 built from a config (adapter path).

    gradroute run steering --out runs/steering                    # quick profile
    gradroute run steering --category places --token harbor       # another target
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import time
from pathlib import Path

import torch
import torch.nn as nn

import gradroute as gr
from gradroute.adapters import unwrap
from gradroute.lm.analysis import (category_words, masked_mean, per_token_losses, prepare_corpus,
                                   single_token_ids, token_counts, train_lm)
from gradroute.lm.data import IGNORE, Batch
from gradroute.lm.evaluate import sample_many
from gradroute.lm.methods import make_model
from gradroute.lm.train import TrainConfig, logits, token_losses
from gradroute.utils import claim_summary, markdown_table, plt, read_json, resolve_device, savefig, set_seed, write_json

DESCRIPTION = ("Steering scalar: route one token to residual dim 0 of the middle-to-late blocks; "
               "top tokens by cosine with e0, dim-0 ablation, steered sampling (ours and HF GPT-2).")

PROFILES = {
    # about 5 minutes on 2 shared CPU cores. 800 steps: at 200 the model has not yet learnt to
    # repeat a story's names (train loss 1.25), so there is nothing name-specific to localize.
    "quick": dict(
        corpus=dict(n_train=3000, n_eval=128, vocab_size=1024),
        model=dict(n_ctx=96, n_layer=4, n_head=4, d_model=64, d_mlp=256),
        train=dict(steps=800, lr=3e-3, warmup=40), batch_size=24,
        hf_steps=120, samples=64, sample_tokens=40, top_k=20),
    # a larger model, longer training (not run here)
    "paper": dict(
        corpus=dict(n_train=50_000, n_eval=512, vocab_size=4096),
        model=dict(n_ctx=256, n_layer=16, n_head=8, d_model=256, d_mlp=1024),
        train=dict(steps=3000, lr=1e-3, warmup=100), batch_size=64,
        hf_steps=1000, samples=256, sample_tokens=60, top_k=20),
}
PROMPT = "Once upon a time,"
DIM = 0


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
# one model: train, analyse, steer
# ------------------------------------------------------------------------------------------
def analyse(name: str, model: nn.Module, corpus, cfg: dict, target: int, related: set[int], blocks: list[str],
            steer_block: str, seed: int, log: dict) -> dict:
    tok = corpus.tok
    top = top_tokens(model, tok, related, target, cfg["top_k"])
    raw = top_tokens(model, tok, related, target, cfg["top_k"], effective=False)
    zero = zero_dim_losses(model, [corpus.general, corpus.topic], blocks, target, related)
    rms = residual_rms(model, corpus.general, steer_block)
    stats = lambda v: {"value": v, **sample_stats(
        steered_samples(model, tok, steer_block, v, cfg["samples"], cfg["sample_tokens"], seed), tok, target, related)}
    steering = {"unsteered": stats(0.0), "sweep": []}
    for scale in cfg["steer_scales"]:   # value = sign from the top-token list x scale x residual RMS
        v = top["sign"] * scale * rms
        steering["sweep"].append({"scale": scale, "steered": stats(v), "opposite_sign": stats(-v)})
    steering["best"] = max(steering["sweep"], key=lambda r: r["steered"]["with_target"])
    print(f"[{name}] related in top {cfg['top_k']}: {top['related_in_top']} (target rank {top['target_rank']}); "
          f"dim-0 zeroed: target {zero['target']['change']:+.3f}, other {zero['other']['change']:+.3f}; "
          f"samples with target: {steering['unsteered']['with_target']:.2f} -> "
          + ", ".join(f"{r['steered']['with_target']:.2f} (x{r['scale']:g})" for r in steering["sweep"]))
    hist = log["history"]
    return {"top_tokens": top, "top_tokens_raw_unembedding": {k: raw[k] for k in (
                "sign", "target_cosine", "target_rank", "related_in_top", "related_in_top_other_side")},
            "zero_dim0": zero, "steer_block": steer_block, "residual_rms": rms,
            "steering": steering, "train_loss_final": hist[-1]["loss"] if hist else None,
            "train_wall_s": log["wall_s"], "eval_loss": masked_mean(per_token_losses(model, corpus.general))}


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick",
                        help="quick (default, a few minutes on 2 CPU cores) or paper (larger, not run here)")
    parser.add_argument("--category", choices=["names", "places"], default="names",
                        help="the generator category of the routed token and of the related set")
    parser.add_argument("--token", default=None,
                        help="routed word (one token with a leading space); default: the category's most "
                             "frequent single-token word in the training stories")
    parser.add_argument("--first-block", type=int, default=None,
                        help="first routed block (default: n_layer * 3 // 8, as 6 of 16)")
    parser.add_argument("--steer-block", type=int, default=None, help="default: the first routed block")
    parser.add_argument("--steer-scales", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0],
                        help="steering values to try, in units of the residual RMS at that block; the sign "
                             "comes from the top-token list (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (override the profile)")
    parser.add_argument("--hf-steps", type=int, default=None, help="HF GPT-2 training steps; 0 skips it")
    parser.add_argument("--samples", type=int, default=None, help="samples per steering condition")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: these models gain little from more, and extra "
                             "threads slow down badly on a shared machine)")


def build_config(args) -> dict:
    cfg = copy.deepcopy(PROFILES[args.profile])
    cfg.update(profile=args.profile, category=args.category, token=args.token, first_block=args.first_block,
               steer_block=args.steer_block, steer_scales=[float(v) for v in args.steer_scales], seed=args.seed)
    if args.steps is not None:
        if args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
        cfg["train"]["steps"] = args.steps
        cfg["train"]["warmup"] = min(cfg["train"]["warmup"], args.steps // 10)
    for flag in ("hf_steps", "samples"):
        v = getattr(args, flag)
        if v is not None:
            if v < 0 or (flag == "samples" and v < 1):
                raise ValueError(f"--{flag.replace('_', '-')} out of range: {v}")
            cfg[flag] = v
    return cfg


def pick_target(corpus, category: str, word: str | None) -> tuple[str, int, dict[str, int]]:
    """The routed word and id, and the category's single-token words (the related set: the
    category's words other than the target)."""
    tok = corpus.tok
    ids = single_token_ids(tok, category_words(category))
    if word is None:
        counts = token_counts(corpus.train, tok.vocab_size)
        word = max(ids, key=lambda w: (int(counts[ids[w]]), -ids[w]))
    else:
        word = word.strip()
        got = tok.encode(" " + word)
        if len(got) != 1:
            raise ValueError(f"--token {word!r} is {len(got)} tokens with this tokenizer; choose a single-token word")
        ids.setdefault(word, got[0])
    return word, ids[word], {w: i for w, i in ids.items() if w != word}


def run(args: argparse.Namespace) -> dict:
    t0 = time.time()
    cfg = build_config(args)
    device = str(resolve_device(args.device))
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    c = cfg["corpus"]
    corpus = prepare_corpus(c["n_train"], c["n_eval"], 0, c["vocab_size"], cfg["model"]["n_ctx"])
    word, target, related_words = pick_target(corpus, cfg["category"], cfg["token"])
    related = set(related_words.values())
    print(f"routing {word!r} (id {target}) to residual dim {DIM}; related set: {len(related)} {cfg['category']}")
    spec = dict(cfg["model"], vocab_size=corpus.tok.vocab_size)
    tcfg = TrainConfig(**cfg["train"])
    models = {}
    for name, arch, routed, steps in (("routed", "gpt", True, tcfg.steps), ("control", "gpt", False, tcfg.steps),
                                      ("hf_gpt2_routed", "hf-gpt2", True, cfg["hf_steps"])):
        if steps == 0:
            continue
        set_seed(cfg["seed"])
        model = make_model(dict(spec, arch=arch), cfg["seed"])
        blocks = routed_block_names(model, cfg["first_block"])
        names = block_names(model)
        steer_block = names[cfg["steer_block"]] if cfg["steer_block"] is not None else blocks[0]
        mcfg = copy.copy(tcfg)
        mcfg.steps, mcfg.warmup = steps, min(tcfg.warmup, steps // 10)
        loss_fn = steering_loss(blocks, target) if routed else None
        model, log = train_lm(spec, corpus.train, mcfg, cfg["batch_size"], cfg["seed"], device=device, model=model,
                              desc=f"steering {name}", **({"loss_fn": loss_fn} if loss_fn else {}))
        models[name] = analyse(name, model, corpus, cfg, target, related, blocks, steer_block, cfg["seed"], log)
        models[name].update(arch=arch, routed=routed, routed_blocks=blocks)
    metrics = {"experiment": "steering", "profile": args.profile, "config": cfg, "corpus": corpus.counts,
               "target": {"word": word, "id": target}, "related_words": sorted(related_words),
               "models": models, "claims": check_claims(models), "wall_time_s": time.time() - t0}
    write_json(out / "metrics.json", metrics)
    make_figures(out, metrics)
    (out / "summary.md").write_text(summary_md(metrics))
    print(summary_md(metrics))
    print(f"wrote {out / 'metrics.json'} ({metrics['wall_time_s']:.0f} s)")
    return metrics


# ------------------------------------------------------------------------------------------
# reporting
# ------------------------------------------------------------------------------------------
def check_claims(models: dict) -> dict:
    claims = {}
    r, c = models.get("routed"), models.get("control")
    if r and c:
        claims["more related tokens near e0 than the control"] = {
            "holds": r["top_tokens"]["related_in_top"] > c["top_tokens"]["related_in_top"],
            "routed": r["top_tokens"]["related_in_top"], "control": c["top_tokens"]["related_in_top"]}
        claims["zeroing dim 0 hurts the routed token more than other tokens"] = {
            "holds": r["zero_dim0"]["target"]["change"] > 5 * max(r["zero_dim0"]["other"]["change"], 1e-3),
            "target": r["zero_dim0"]["target"]["change"], "other": r["zero_dim0"]["other"]["change"]}
    for name, m in models.items():
        if not m["routed"]:
            continue
        s = m["steering"]
        p0, p1, n = s["unsteered"]["with_target"], s["best"]["steered"]["with_target"], s["unsteered"]["samples"]
        se = ((p0 * (1 - p0) + p1 * (1 - p1)) / n) ** 0.5
        claims[f"steering raises the routed token's frequency ({name})"] = {
            "holds": p1 - p0 > 2 * max(se, 1e-9), "unsteered": p0, "steered_best": p1,
            "best_scale": s["best"]["scale"], "two_standard_errors": 2 * se}
    return claims


def _rows(metrics: dict) -> list[list]:
    rows = []
    for name, m in metrics["models"].items():
        t, z, s = m["top_tokens"], m["zero_dim0"], m["steering"]
        rows.append([name, f"{t['related_in_top']} / {len(t['positive'])}", t["target_rank"],
                     z["target"]["change"], z["related"]["change"], z["other"]["change"],
                     f"{s['unsteered']['with_target']:.2f} -> {s['best']['steered']['with_target']:.2f} "
                     f"(x{s['best']['scale']:g})",
                     f"{s['unsteered']['related_per_100_tokens']:.1f} -> "
                     f"{s['best']['steered']['related_per_100_tokens']:.1f}"])
    return rows


HEADER = ["model", "related in top 20", "target rank", "dim-0 zeroed: target", "related", "other",
          "samples with target (unsteered -> best steered, scale)", "related per 100 tokens"]


def summary_md(metrics: dict) -> str:
    lines = [f"# Steering scalar: routed token {metrics['target']['word']!r}\n",
             markdown_table(HEADER, _rows(metrics))]
    for name, m in metrics["models"].items():
        t = m["top_tokens"]
        side = "positive" if t["sign"] > 0 else "negative"
        toks = ", ".join(f"{x['token'].strip()}{'*' if x['related'] else ''}{'!' if x['target'] else ''}"
                         for x in t[side])
        lines.append(f"- **{name}**, {side} side of e0 (* related, ! target): {toks}")
        sw = ", ".join(f"x{r['scale']:g}: {r['steered']['with_target']:.2f} / opposite {r['opposite_sign']['with_target']:.2f}"
                       for r in m["steering"]["sweep"])
        lines.append(f"  - samples with the target, unsteered {m['steering']['unsteered']['with_target']:.2f}; {sw}")
        lines.append(f"  - unsteered sample: {m['steering']['unsteered']['examples'][0]!r}")
        lines.append(f"  - steered sample (x{m['steering']['best']['scale']:g}): "
                     f"{m['steering']['best']['steered']['examples'][0]!r}")
    return "\n".join(lines) + "\n"


def make_figures(out: Path, metrics: dict) -> None:
    pyplot = plt()
    models = metrics["models"]
    fig, axes = pyplot.subplots(1, len(models), figsize=(5 * len(models), 5), squeeze=False)
    for ax, (name, m) in zip(axes[0], models.items()):
        t = m["top_tokens"]
        lst = t["positive" if t["sign"] > 0 else "negative"]
        colors = ["tab:red" if x["target"] else "tab:orange" if x["related"] else "tab:gray" for x in lst]
        ax.barh(range(len(lst))[::-1], [abs(x["cosine"]) for x in lst], color=colors)
        ax.set_yticks(range(len(lst))[::-1], [repr(x["token"]) for x in lst], fontsize=7)
        ax.set_xlabel("|cosine(unembedding row, e0)|")
        ax.set_title(f"{name}: {t['related_in_top']} related (orange), target red", fontsize=9)
    savefig(fig, out / "top_tokens.png")

    fig, axes = pyplot.subplots(1, 2, figsize=(11, 3.8))
    names = list(models)
    x = torch.arange(len(names)).float()
    for i, g in enumerate(("target", "related", "other")):
        axes[0].bar(x + (i - 1) * 0.27, [models[n]["zero_dim0"][g]["change"] for n in names], 0.27, label=g)
    axes[0].set_xticks(x, names, fontsize=8)
    axes[0].set_ylabel("loss change when dim 0 is zeroed (nats)")
    axes[0].legend(fontsize=8)
    for n in names:
        st = models[n]["steering"]
        sc = [r["scale"] for r in st["sweep"]]
        line = axes[1].plot([0] + sc, [st["unsteered"]["with_target"]] + [r["steered"]["with_target"] for r in st["sweep"]],
                            marker="o", label=f"{n}")[0]
        axes[1].plot([0] + sc, [st["unsteered"]["with_target"]] + [r["opposite_sign"]["with_target"] for r in st["sweep"]],
                     marker="x", ls="--", color=line.get_color(), label=f"{n}, opposite sign")
    axes[1].set_xlabel("steering value (x residual RMS; sign from the top-token list)")
    axes[1].set_ylabel(f"fraction of samples with {metrics['target']['word']!r}")
    axes[1].legend(fontsize=8)
    savefig(fig, out / "ablation_and_steering.png")


def report(out: Path) -> dict:
    m = read_json(Path(out) / "metrics.json")
    claims = m["claims"]
    verdict, checks = claim_summary(claims, "holds", "checks hold")
    cfg = m["config"]
    return {
        "title": "Steering scalar (paper section 4)",
        "claim": "Routing one token to residual dim 0 localizes a broader feature: the unembedding rows closest "
                 "to e0 are the token's category; zeroing dim 0 hurts that token; adding to dim 0 steers "
                 "generation toward it.",
        "paper": "' California' routed to dim 0 of blocks 6-15 of 16: nearest unembeddings California, Californ, "
                 "Oregon, Colorado, Texas, Florida, Arizona, Sacramento, Los; steering toward California works.",
        "verdict": verdict,
        "detail": (f"{checks}. Routed token "
                   f"{m['target']['word']!r}, related set: the other {len(m['related_words'])} single-token "
                   f"{cfg['category']} of the generator. Profile {m['profile']}: {cfg['train']['steps']} steps "
                   f"of {cfg['batch_size']} stories, model {cfg['model']}, generated corpus."),
        "table": {"header": HEADER, "rows": _rows(m)},
        "figures": [f for f in ("top_tokens.png", "ablation_and_steering.png") if (Path(out) / f).exists()],
    }
