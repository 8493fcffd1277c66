"""Evaluation: losses on held-out stories (also with the forget keywords' tokens excluded, to
measure absorption), the retraining attack, and samples from a prompt."""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn

from .data import IGNORE, BatchOrder, Stories, full_batches
from .tokenizer import Tokenizer
from .train import TrainConfig, logits, token_losses, train

SAMPLE_PROMPT = "Once upon a time, Timmy went to the forest"


@torch.no_grad()
def mean_loss(model: nn.Module, data: Stories, exclude_keywords: bool = False, batch_size: int = 64) -> float:
    """Mean next-token loss (nats/token) over the target tokens of ``data``; with
    ``exclude_keywords`` the targets that are (part of) a forget keyword are left out."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    dev = next(model.parameters()).device
    for b in full_batches(data, batch_size):
        keep = b.y != IGNORE
        if exclude_keywords:
            keep &= ~b.keyword
        losses = token_losses(model, b.x.to(dev), b.y.to(dev)).cpu()
        total += float(losses[keep].sum())
        count += int(keep.sum())
    model.train(was)
    if count == 0:
        raise ValueError("no target tokens to evaluate")
    return total / count


def evaluate(model: nn.Module, retain: Stories, forget: Stories) -> dict:
    """``retain_loss``, ``forget_loss`` and ``forget_loss_no_keywords`` (forget stories, the six
    keywords' tokens excluded)."""
    return {"retain_loss": mean_loss(model, retain), "forget_loss": mean_loss(model, forget),
            "forget_loss_no_keywords": mean_loss(model, forget, exclude_keywords=True)}


def retraining_attack(model: nn.Module, pool: Stories, forget_eval: Stories, sizes=(1, 4, 16, 64),
                      steps: int = 40, repeats: int = 5, lr: float = 5e-5, eval_every: int = 1,
                      batch_size: int | None = None, seed: int = 0, device: str = "cpu") -> dict:
    """Fine-tune copies of ``model`` on ``n`` forget stories drawn from ``pool`` (all ``n`` in
    every step, or ``batch_size`` of them in turn; constant ``lr``) for ``steps`` steps, ``repeats`` times per ``n``; the forget
    loss on ``forget_eval`` is measured before and every ``eval_every`` steps. ``pool`` must be
    disjoint from ``forget_eval`` (checked on token rows).

    Returns ``min`` (lowest forget loss reached by any attack, the starting point included),
    ``min_by_n`` (per n, mean over repeats of each attack's minimum) and ``curves`` (per n, the
    mean curve ``[[step, loss], ...]``) and ``tokens_per_step`` (per n, target tokens in one
    attack step, mean over repeats)."""
    if steps < 1 or repeats < 1 or eval_every < 1:
        raise ValueError("steps, repeats and eval_every must be >= 1")
    sizes = [int(n) for n in sizes]
    if not sizes or min(sizes) < 1 or max(sizes) > len(pool):
        raise ValueError(f"attack sizes {sizes} must be in [1, {len(pool)}] (the attack pool's size)")
    if _overlap(pool, forget_eval):
        raise ValueError("the attack pool shares stories with the evaluation stories; they must be disjoint")
    ev = lambda m: {"forget_loss": mean_loss(m, forget_eval)}
    overall, by_n, curves, tokens = float("inf"), {}, {}, {}
    for n in sizes:
        mins, runs, per_step = [], [], []
        for r in range(repeats):
            g = torch.Generator().manual_seed(seed * 7919 + n * 131 + r)
            d = pool.subset(torch.randperm(len(pool), generator=g)[:n])
            order = BatchOrder(d, min(n, batch_size or n), seed + r)
            per_step.append(int((d.y != IGNORE).sum()) * min(n, batch_size or n) / n)
            m = copy.deepcopy(model)
            cfg = TrainConfig(steps=steps, lr=lr, min_lr=lr, warmup=0, eval_every=eval_every, desc=f"attack n={n}")
            log = train(m, order, cfg, eval_fn=ev, distributed=False, device=device)
            curve = [(e["step"], e["forget_loss"]) for e in log["evals"]]
            runs.append(curve)
            mins.append(min(v for _, v in curve))
        overall = min(overall, min(mins))
        by_n[n] = float(np.mean(mins))
        curves[n] = [[s, float(np.mean([c[i][1] for c in runs]))] for i, (s, _) in enumerate(runs[0])]
        tokens[n] = float(np.mean(per_step))
    return {"min": overall, "min_by_n": by_n, "curves": curves, "tokens_per_step": tokens}


def strongest_attack_lr(model: nn.Module, pool: Stories, forget_val: Stories, lrs, n: int, **attack) -> tuple[float, dict]:
    """The attack learning rate, among ``lrs``, whose attack on ``n`` stories brings the forget loss on
    the *validation* stories ``forget_val`` lowest (an attacker tunes its learning rate; the
    evaluation stories are never used for the choice). Returns ``(lr, {lr: lowest loss})``;
    ``attack`` holds :func:`retraining_attack`'s other arguments."""
    lrs = [float(lr) for lr in lrs]
    if not lrs:
        raise ValueError("no attack learning rates to choose from")
    reached = {lr: retraining_attack(model, pool, forget_val, sizes=[n], lr=lr, **attack)["min"] for lr in lrs}
    return min(reached, key=reached.get), reached


def _overlap(a: Stories, b: Stories) -> bool:
    rows = {tuple(r.tolist()) for r in b.x}
    return any(tuple(r.tolist()) in rows for r in a.x)


@torch.no_grad()
def sample(model: nn.Module, tok: Tokenizer, prompt: str = SAMPLE_PROMPT, max_new: int = 40,
           temperature: float = 0.8, seed: int = 0) -> str:
    """A continuation of ``prompt`` (seeded sampling; ``temperature=0`` is greedy)."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    ids = torch.tensor([tok.encode(prompt)], device=dev)
    n_ctx = _context(model)
    g = torch.Generator(device="cpu").manual_seed(seed)
    for _ in range(max_new):
        last = logits(model, ids[:, -n_ctx:])[0, -1].float().cpu()
        if temperature <= 0:
            nxt = int(last.argmax())
        else:
            nxt = int(torch.multinomial(torch.softmax(last / temperature, -1), 1, generator=g))
        if nxt == tok.eot_id:
            break
        ids = torch.cat([ids, torch.tensor([[nxt]], device=dev)], 1)
    model.train(was)
    return tok.decode(ids[0].tolist())


def _context(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    return (getattr(cfg, "n_ctx", None) or getattr(cfg, "n_positions", None)
            or getattr(cfg, "max_position_embeddings", None) or 1024)


@torch.no_grad()
def sample_many(model: nn.Module, tok: Tokenizer, prompt: str = SAMPLE_PROMPT, n: int = 8, max_new: int = 40,
                temperature: float = 0.8, seed: int = 0) -> list[str]:
    """``n`` continuations of ``prompt`` sampled together as one batch (seeded; ``temperature=0``
    is greedy); each is cut at its first ``<|endoftext|>``. Returns the full texts."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    ids = torch.tensor([tok.encode(prompt)] * n, device=dev)
    n_ctx = _context(model)
    g = torch.Generator(device="cpu").manual_seed(seed)
    for _ in range(max_new):
        last = logits(model, ids[:, -n_ctx:])[:, -1].float().cpu()
        nxt = last.argmax(-1) if temperature <= 0 else \
            torch.multinomial(torch.softmax(last / temperature, -1), 1, generator=g).squeeze(1)
        ids = torch.cat([ids, nxt.view(-1, 1).to(dev)], 1)
        if bool((ids == tok.eot_id).any(1).all()):
            break
    model.train(was)
    out = []
    for row in ids.tolist():
        if tok.eot_id in row:
            row = row[: row.index(tok.eot_id)]
        out.append(tok.decode(row))
    return out


def steps_to_recover(curve, target: float) -> float | None:
    """The first attack step at which the forget loss is back at ``target`` (the base model's
    forget loss) or below, from a curve ``[[step, loss], ...]`` (evaluations every few steps,
    step 0 first): the step of the first evaluation at or below ``target``, linearly
    interpolated from the evaluation before it. ``None`` when the curve never gets there
    (censored: "more than the attack's last step")."""
    prev = None
    for step, loss in curve:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return float(step)
            (s0, l0) = prev
            return float(s0 + (step - s0) * (l0 - target) / (l0 - loss))
        prev = (step, loss)
    return None


# The domain-learned check: thresholds on (fully filtered - base) forget loss. Below them the
# base model holds too little that is specific to the forget domain for an unlearning verdict to
# be about anything (docs/lm_unlearning.md, "Was there anything to unlearn?").
MIN_FORGET_GAP = 0.3        # nats/token
MIN_GAP_RATIO = 5.0         # forget gap / retain gap


def domain_check(base: list[dict], filtered: list[dict], min_gap: float = MIN_FORGET_GAP,
                 min_ratio: float = MIN_GAP_RATIO) -> dict:
    """Whether the base model learned something specific to the forget domain: per seed, the fully
    filtered model's (every labelled forget document removed) loss minus the base model's, on the
    forget, retain (and topic, when measured) evaluation sets, as mean and 95% interval over
    seeds. ``learned`` needs the forget gap >= ``min_gap`` and >= ``min_ratio`` x the retain gap;
    ``message`` says what was found and, when not learned, what to raise."""
    from ..utils import format_ci, mean_ci

    by_seed = {r["seed"]: r for r in base}
    pairs = [(by_seed[f["seed"]], f) for f in filtered if f["seed"] in by_seed]
    if not pairs:
        raise ValueError("domain_check needs base and fully filtered runs of the same seeds")
    gap = lambda k: mean_ci([f[k] - b[k] for b, f in pairs])
    out = {"forget_gap": gap("forget_loss"), "retain_gap": gap("retain_loss"), "n": len(pairs),
           "min_forget_gap": min_gap, "min_gap_ratio": min_ratio}
    if all("topic_loss" in b and "topic_loss" in f for b, f in pairs):
        out["topic_gap"] = gap("topic_loss")
    fg, rg = out["forget_gap"]["mean"], out["retain_gap"]["mean"]
    out["gap_ratio"] = fg / rg if rg > 0 else float("inf")
    out["learned"] = bool(fg >= min_gap and fg >= min_ratio * max(rg, 0.0))
    text = (f"fully filtered minus base: forget {format_ci(out['forget_gap'])} nats/token, retain "
            f"{format_ci(out['retain_gap'])}" + (f", topic {format_ci(out['topic_gap'])}" if "topic_gap" in out else "")
            + f" (n={len(pairs)} seed{'s' if len(pairs) != 1 else ''})")
    if out["learned"]:
        out["message"] = f"the base model learned the forget domain: {text}"
    else:
        out["message"] = (f"WARNING: little to unlearn: {text}; an unlearning verdict needs the forget gap >= "
                          f"{min_gap} nats and >= {min_ratio:g}x the retain gap. Raise --steps, the model size "
                          f"(--d-model, --n-layer) or --vocab-size, or label more of the domain.")
    return out
