"""Training speed of the LM unlearning methods and of the training loop, side by side in one run.

Part 1, the loop (``--loop``, default on): tokens/s of base training through THE loop
(``lm.train.train``) as it is now ("after": multi-tensor AdamW, log lines written in chunks),
through the loop as it was before ("before": a copy of its per-step work with the per-parameter
AdamW loop and one log-file open per step), and through the current loop on a
``torch.compile``-d model ("compiled": steady-state tokens/s, plus the compile time and the
number of steps after which compiling pays off). Rounds of each are interleaved; medians of
per-step times. Ratios are against "before".

Part 2, the methods: times one optimizer step (forward, backward, clip, AdamW) of our GPT with the loss functions
the experiment trains with: base (plain LM loss), ERA (activation routing on the first blocks +
L1, +k MLP units) and parameter routing (SGTM-style, +k MLP units), on real story batches with
a fraction of labelled forget rows (put first, as the training loop does). Steps are interleaved
(base, era, param, base, ...) so machine load hits all alike; medians. Reports training tokens/s
(target tokens) and each routed step's time relative to base. One more row, ``base_all_positions``,
is base training with the output layer run at every position, padding included (as before
``only_targets``); ``only_targets_speedup`` is its time over base's, with the batches' fraction of
target positions beside it. Last line: JSON, with the CPU model.

    .venv/bin/python benchmarks/lm_speed.py                 # quick-profile model size
    .venv/bin/python benchmarks/lm_speed.py --size paper --steps 5
    .venv/bin/python benchmarks/lm_speed.py --no-loop --corpus ../shared/data/gcide_entries.jsonl.gz --vocab 8192
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

import gradroute as gr
from gradroute.lm import methods as M
from gradroute.lm.corpus import generate_stories
from gradroute.lm.data import BatchOrder, encode_stories
from gradroute.lm.tokenizer import train_bpe
from gradroute.lm.train import TrainConfig, lm_loss, make_optimizer, train
from gradroute.utils import cpu_model

SIZES = {"quick": dict(n_ctx=96, n_layer=2, n_head=4, d_model=64, d_mlp=256, expand=32, batch=24, vocab=1024),
         "medium": dict(n_ctx=128, n_layer=4, n_head=4, d_model=256, d_mlp=1024, expand=64, batch=32, vocab=2048),
         "paper": dict(n_ctx=256, n_layer=8, n_head=16, d_model=512, d_mlp=2048, expand=64, batch=80, vocab=4096)}


def legacy_loop(model, order, cfg: TrainConfig, log_path: Path, stamps: list) -> None:
    """The loop's per-step work before this change (reference): per-parameter AdamW, one JSON
    line appended with a file open per step; otherwise as ``train`` (schedule, clip, record)."""
    named = list(model.named_parameters())
    decay = [p for n, p in named if p.ndim >= 2]
    other = [p for n, p in named if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas, foreach=False)
    model.train()
    for step in range(cfg.steps):
        lr = cfg.lr_at(step)
        for g in opt.param_groups:
            g["lr"] = lr
        b = order(step)
        loss = lm_loss(model, b) / b.n_tokens
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_([p for _, p in named], cfg.grad_clip))
        opt.step()
        with open(log_path, "a") as f:
            f.write(json.dumps({"step": step + 1, "loss": float(loss.detach()), "lr": lr, "grad_norm": gnorm}) + "\n")
        stamps.append(time.perf_counter())


def loop_benchmark(spec: dict, order, steps: int, rounds: int, compile_too: bool) -> dict:
    """Per-step times of base training through the loop before / after / compiled."""
    cfg = TrainConfig(steps=steps, lr=3e-3, warmup=10)
    kinds = ["before", "after"] + (["compiled"] if compile_too else [])
    per_step = {k: [] for k in kinds}
    compile_s = None
    tmp = Path(tempfile.mkdtemp(prefix="lm_speed_"))
    for r in range(rounds):
        for k in kinds:
            model = M.make_model(spec, r)
            stamps = [time.perf_counter()]
            if k == "before":
                legacy_loop(model, order, cfg, tmp / f"legacy{r}.jsonl", stamps)
            else:
                net = torch.compile(model) if k == "compiled" else model
                train(net, order, cfg, out_dir=tmp / f"{k}{r}", on_step=lambda s, rec: stamps.append(time.perf_counter()))
            dts = [b - a for a, b in zip(stamps, stamps[1:])]
            if k == "compiled" and r == 0:
                compile_s = dts[0] - statistics.median(dts[2:])        # first step pays the compile
            per_step[k] += dts[2:]                                     # drop warm-up steps
    med = {k: statistics.median(v) for k, v in per_step.items()}
    tok = statistics.mean(order(s).n_tokens for s in range(steps))
    out = {"steps_per_round": steps, "rounds": rounds, "tokens_per_step": tok,
           "step_ms": {k: 1000 * v for k, v in med.items()},
           "train_tokens_per_s": {k: tok / v for k, v in med.items()},
           "speedup_vs_before": {k: med["before"] / v for k, v in med.items()}}
    if compile_too:
        gain = med["after"] - med["compiled"]
        out["compile_s"] = compile_s
        out["compile_breaks_even_after_steps"] = math.ceil(compile_s / gain) if gain > 0 else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="quick")
    ap.add_argument("--steps", type=int, default=15, help="timed steps per method (after 2 warm-up steps)")
    ap.add_argument("--labelled", type=float, default=0.1, help="fraction of batch rows that are labelled forget")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-loop", dest="loop", action="store_false", help="skip part 1 (loop before/after)")
    ap.add_argument("--loop-steps", type=int, default=40, help="steps per round of part 1")
    ap.add_argument("--loop-rounds", type=int, default=2)
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="part 1 without torch.compile")
    ap.add_argument("--vocab", type=int, default=None, help="BPE size (default: the size's)")
    ap.add_argument("--corpus", default=None, help="a JSONL(.gz) of documents with a 'text' field to time on (first "
                    "--docs of them; e.g. ../shared/data/gcide_entries.jsonl.gz) instead of generated stories")
    ap.add_argument("--docs", type=int, default=6000)
    args = ap.parse_args()
    if args.steps < 1 or not 0 <= args.labelled <= 1:
        ap.error("--steps must be >= 1 and --labelled in [0, 1]")
    torch.set_num_threads(args.threads)
    z = SIZES[args.size]
    if args.corpus:
        from gradroute.lm.sources import iter_json_lines
        texts = [d["text"] for _, d in itertools.islice(iter_json_lines(args.corpus), args.docs)]
    else:
        texts = generate_stories(2000, seed=0)
    tok = train_bpe(texts, args.vocab or z["vocab"])
    data = encode_stories(tok, texts, z["n_ctx"])
    n_lab = round(args.labelled * z["batch"])
    order = BatchOrder(data, z["batch"], seed=0)
    spec = dict(vocab_size=tok.vocab_size, n_ctx=z["n_ctx"], n_layer=z["n_layer"], n_head=z["n_head"],
                d_model=z["d_model"], d_mlp=z["d_mlp"])
    cfg = TrainConfig(steps=1)
    loop = None
    if args.loop:
        if args.device != "cpu":
            ap.error("part 1 (--loop) is a CPU measurement; pass --no-loop with --device")
        loop = loop_benchmark(spec, order, args.loop_steps, args.loop_rounds, args.compile)
        print(f"training loop, base model ({args.size}, {args.threads} thread(s)), {loop['tokens_per_step']:.0f} "
              f"target tokens/step, medians over {args.loop_rounds} x {args.loop_steps} steps:")
        for k in loop["step_ms"]:
            print(f"  {k:9s} {loop['step_ms'][k]:8.1f} ms/step  {loop['train_tokens_per_s'][k]:9.0f} tokens/s  "
                  f"x{loop['speedup_vs_before'][k]:.2f} vs before")
        if "compile_s" in loop:
            print(f"  torch.compile: {loop['compile_s']:.1f} s to compile; pays off after "
                  f"{loop['compile_breaks_even_after_steps']} steps per process")

    def setup(kind):
        model = M.make_model(spec, 0).to(args.device)
        if kind == "base":
            return model, lm_loss
        if kind == "base_all_positions":
            return model, lambda m, b: m(b.x, b.y, reduction="none")[1].sum()
        new = gr.expand_mlp(model, M.MLP_PATTERN, z["expand"])
        if kind == "era":
            blocks = [n for n, _ in gr.find_modules(model, M.MLP_PATTERN, kind="MLP")]
            k = M.routed_block_count(len(blocks))
            routed = gr.Units("mlp", {b: new.index[b] for b in blocks[:k]}, {b: new.n_units[b] for b in blocks[:k]})
            strength = M.token_strength(data.with_labels(data.forget), tok.vocab_size).to(args.device)
            return model, M.era_loss(routed, strength)
        return model, M.param_routing_loss(gr.ParamRouter(model, new))

    kinds = ["base", "era", "param_routing", "base_all_positions"]
    runs = {}
    for k in kinds:
        model, loss_fn = setup(k)
        runs[k] = (model, loss_fn, make_optimizer(list(model.named_parameters()), cfg))
    times = {k: [] for k in kinds}
    tokens, positions = [], []
    for step in range(args.steps + 2):
        b = order.batch_at(step)
        lab = torch.zeros(len(b.labelled), dtype=torch.bool)
        lab[:n_lab] = True                                    # labelled rows first
        b.labelled = lab
        b = b.to(args.device)
        for k in kinds:
            model, loss_fn, opt = runs[k]
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            loss = loss_fn(model, b) / b.n_tokens
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if step >= 2:
                times[k].append(time.perf_counter() - t)
        if step >= 2:
            tokens.append(b.n_tokens)
            positions.append(b.y.numel())
    med = {k: statistics.median(v) for k, v in times.items()}
    tok_per_step = statistics.mean(tokens)
    res = {"size": args.size, "corpus": args.corpus or "generated", "vocab": tok.vocab_size, "batch": z["batch"], "n_ctx": z["n_ctx"], "labelled_rows": n_lab,
           "threads": args.threads, "device": args.device, "steps": args.steps,
           "params_base": sum(p.numel() for p in runs["base"][0].parameters()),
           "step_ms": {k: 1000 * v for k, v in med.items()},
           "train_tokens_per_s": {k: tok_per_step / v for k, v in med.items()},
           "overhead_vs_base": {k: med[k] / med["base"] for k in kinds if k != "base"}, "loop": loop,
           "target_fraction": sum(tokens) / sum(positions),
           "only_targets_speedup": med["base_all_positions"] / med["base"], "cpu": cpu_model()}
    print(f"{args.size}: batch {z['batch']} x {z['n_ctx']} ({tok_per_step:.0f} target tokens), "
          f"{n_lab} labelled rows, {args.threads} thread(s)")
    for k in kinds:
        print(f"  {k:14s} {1000 * med[k]:8.1f} ms/step  {tok_per_step / med[k]:9.0f} tokens/s  "
              f"x{med[k] / med['base']:.2f} vs base")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
