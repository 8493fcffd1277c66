"""Cost of routing a training step, measured side by side in one run.

Rows, per model (our small GPT and Hugging Face GPT-2 built from a config):
  plain        ordinary step (forward, backward, AdamW)
  activation   ERA-style activation routing of MLP hidden units, per-token weights (gr.route_units)
  parameter    parameter routing (gr.ParamRouter), half the batch labelled forget
  formula      the paper's w*x + (1-w)*x.detach() at the same places (reference implementation)
Variants are interleaved step by step so machine noise hits them alike; medians are reported.
Memory: bytes saved for backward (the activation memory a step holds), via saved-tensor hooks;
on CUDA also the peak allocated memory.

    python benchmarks/routing_overhead.py [--reps 20] [--device cpu]

The last line is a JSON object with activation_ratio and parameter_ratio (routed / plain median
step time, over all models; the worse model counts).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time

import torch

import gradroute as gr
from gradroute.utils import resolve_device
from gradroute.models import GPT, GPTConfig


def build_models(device):
    torch.manual_seed(0)
    ours = GPT(GPTConfig(vocab_size=4096, n_ctx=128, n_layer=4, n_head=4, d_model=256, d_mlp=1024))
    models = {"gpt (ours)": (ours, "transformer.h.*.mlp", lambda m, ids: m(ids, ids)[1])}
    try:
        import transformers

        cfg = transformers.GPT2Config(vocab_size=4096, n_positions=128, n_embd=256, n_layer=4, n_head=4)
        hf = transformers.GPT2LMHeadModel(cfg)
        models["hf gpt2"] = (hf, "transformer.h.*.mlp", lambda m, ids: m(ids, labels=ids).loss)
    except ImportError:
        print("transformers not installed: HF GPT-2 rows skipped", file=sys.stderr)
    return {k: (m.to(device), p, f) for k, (m, p, f) in models.items()}


@contextlib.contextmanager
def formula_routing(model, units, select):
    """The paper's formula at the same edges route_units uses (reference for cost)."""
    from gradroute.adapters import mlp_parts

    mods = dict(model.named_modules())
    handles = []
    for name, idx in units.index.items():
        parts = mlp_parts(mods[name])
        w = gr.region_weights(select, idx, parts.n_units).unsqueeze(-2) if select.ndim == 1 else \
            gr.region_weights(select, idx, parts.n_units)
        w = w.to(next(model.parameters()).device)
        handles.append(getattr(mods[name], parts.output).register_forward_pre_hook(
            lambda m, a, w=w: (gr.route_reference(a[0], w),)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def saved_bytes(fn):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    return loss, total[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    results = {}
    for mname, (base, pattern, loss_fn) in build_models(device).items():
        model = copy.deepcopy(base)
        units = gr.expand_mlp(model, pattern, 64)
        router = gr.ParamRouter(model, units)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 4096, (args.batch, args.seq), generator=g).to(device)
        forget_tok = (torch.rand(args.batch, args.seq, generator=g) < 0.2)
        forget_ex = torch.arange(args.batch) % 2 == 0

        contexts = {
            "plain": lambda: contextlib.nullcontext(),
            "activation": lambda: gr.route_units(model, units, forget_tok.to(device), outside=-0.75),
            "parameter": lambda: router(forget=forget_ex.to(device)),
            "formula": lambda: formula_routing(model, units, forget_tok.to(device)),
        }
        times = {k: [] for k in contexts}
        mem = {}
        for rep in range(args.reps + 2):
            for name, ctx in contexts.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                with ctx():
                    loss, nbytes = saved_bytes(lambda: loss_fn(model, ids))
                    loss.backward()
                opt.step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                if rep >= 2:  # warm-up
                    times[name].append(dt)
                mem[name] = {"saved_bytes": nbytes}
                if device.type == "cuda":
                    mem[name]["peak_bytes"] = torch.cuda.max_memory_allocated()
        med = {k: statistics.median(v) for k, v in times.items()}
        results[mname] = {k: {"median_s": med[k], "ratio": med[k] / med["plain"],
                              "saved_bytes_ratio": mem[k]["saved_bytes"] / mem["plain"]["saved_bytes"],
                              **({"peak_ratio": mem[k]["peak_bytes"] / mem["plain"]["peak_bytes"]}
                                 if device.type == "cuda" else {})}
                          for k in times}

    print(f"device: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"batch {args.batch}x{args.seq}, {args.reps} interleaved reps")
    print(f"{'model':12s} {'variant':11s} {'median ms':>10s} {'time ratio':>11s} {'saved-mem ratio':>16s}")
    for mname, rows in results.items():
        for k, r in rows.items():
            print(f"{mname:12s} {k:11s} {1000 * r['median_s']:10.1f} {r['ratio']:11.3f} {r['saved_bytes_ratio']:16.3f}"
                  + (f"  peak {r['peak_ratio']:.3f}" if "peak_ratio" in r else ""))
    summary = {
        "activation_ratio": max(r["activation"]["ratio"] for r in results.values()),
        "parameter_ratio": max(r["parameter"]["ratio"] for r in results.values()),
        "formula_ratio": max(r["formula"]["ratio"] for r in results.values()),
        "activation_saved_mem_ratio": max(r["activation"]["saved_bytes_ratio"] for r in results.values()),
        "parameter_saved_mem_ratio": max(r["parameter"]["saved_bytes_ratio"] for r in results.values()),
        "device": str(device),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
