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

    python benchmarks/routing_overhead.py --fsdp [--reps 10]

FSDP2 mode: 2 gloo processes on CPU, our GPT sharded with fully_shard (each block, then the root),
each rank a batch of its own. Rows: plain FSDP2 step, activation and parameter routing (as above) on
the expanded model; module routing (2 domains, mixed labels, so parameter routing freezes the core on
the domain rows) against a plain step of the same model with its modules on. One step's time is the
slower rank's; variants are interleaved step by step. The last line is JSON with fsdp_activation_ratio,
fsdp_parameter_ratio, fsdp_module_ratio and the CPU model.
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
from gradroute.utils import cpu_model, resolve_device
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


def fsdp_worker(rank, port, path, reps, batch, seq):
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        mesh = init_device_mesh("cpu", (2,))
        cfg = GPTConfig(vocab_size=1024, n_ctx=seq, n_layer=2, n_head=4, d_model=128, d_mlp=512)

        def sharded(model):
            for block in model.transformer.h:
                fully_shard(block, mesh=mesh)
            return fully_shard(model, mesh=mesh)

        torch.manual_seed(0)
        model = GPT(cfg)
        units = gr.expand_mlp(model, "transformer.h.*.mlp", 32)
        router = gr.ParamRouter(model, units)
        model = sharded(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        torch.manual_seed(0)
        mmodel = GPT(cfg)
        mods = gr.add_modules(mmodel, "transformer.h.*.mlp", ["a", "b"], width=16)
        mmodel = sharded(mmodel)
        mopt = torch.optim.AdamW(mmodel.parameters(), lr=1e-4)

        g = torch.Generator().manual_seed(rank)
        ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
        forget_tok = torch.rand(batch, seq, generator=g) < 0.2
        forget_ex = torch.arange(batch) % 2 == 0
        labels = torch.tensor([0, gr.GENERAL, 1, gr.UNLABELLED] * batch)[:batch]
        variants = {
            "plain": (model, opt, contextlib.nullcontext),
            "activation": (model, opt, lambda: gr.route_units(model, units, forget_tok, outside=-0.75)),
            "parameter": (model, opt, lambda: router(forget=forget_ex)),
            "module_plain": (mmodel, mopt, contextlib.nullcontext),
            "module": (mmodel, mopt, lambda: mods.route(labels)),
        }
        times = {k: [] for k in variants}
        for rep in range(reps + 2):
            for name, (m, o, ctx) in variants.items():
                dist.barrier()
                t0 = time.perf_counter()
                o.zero_grad(set_to_none=True)
                with ctx():
                    m(ids, ids)[1].backward()
                o.step()
                dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                dist.all_reduce(dt, op=dist.ReduceOp.MAX)          # the step ends when the slower rank's does
                if rep >= 2:  # warm-up
                    times[name].append(float(dt))
        if rank == 0:
            med = {k: statistics.median(v) for k, v in times.items()}
            with open(path, "w") as f:
                json.dump({"median_s": med, "batch_per_rank": batch, "seq": seq, "reps": reps}, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def fsdp_main(args):
    import os
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "fsdp.json")
        mp.spawn(fsdp_worker, args=(port, path, args.reps, args.batch, args.seq), nprocs=2, join=True)
        with open(path) as f:
            res = json.load(f)
    med = res["median_s"]
    print(f"FSDP2, 2 gloo ranks on CPU ({cpu_model()}), torch {torch.__version__}, 1 thread per rank, "
          f"batch {args.batch}x{args.seq} per rank, {args.reps} interleaved reps")
    for k, v in med.items():
        print(f"{k:13s} {1000 * v:10.1f} ms")
    summary = {
        "fsdp_activation_ratio": med["activation"] / med["plain"],
        "fsdp_parameter_ratio": med["parameter"] / med["plain"],
        "fsdp_module_ratio": med["module"] / med["module_plain"],
        "ranks": 2, "backend": "gloo", "device": "cpu", "cpu": cpu_model(), "torch": torch.__version__,
        "reps": args.reps, "batch_per_rank": args.batch, "seq": args.seq,
    }
    print(json.dumps(summary))
    return summary


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=None, help="interleaved reps (default 20)")
    ap.add_argument("--batch", type=int, default=None, help="batch (default 8; --fsdp: per rank)")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default 128)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--fsdp", action="store_true", help="2 ranks with FSDP2 on CPU (gloo); see above")
    args = ap.parse_args(argv)
    for k, plain, fsdp in (("reps", 20, 20), ("batch", 8, 8), ("seq", 128, 128)):
        if getattr(args, k) is None:
            setattr(args, k, fsdp if args.fsdp else plain)
    if args.fsdp:
        return fsdp_main(args)
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
