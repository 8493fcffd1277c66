"""Gradient routing on a model sharded with FSDP2, launched with torchrun (one or many processes and nodes).

    torchrun --nproc_per_node 2 examples/fsdp_routing.py --routing parameter        # CPU: 2 gloo processes
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HEAD:29500 --rdzv_id run1 \\
        examples/fsdp_routing.py --routing module --d-model 2048 --layers 16          # 16 GPUs (nccl)

A Hugging Face GPT-2 built from a config (random tokens stand in for your data; every 4th example is "forget"
or, for module routing, labelled with a domain). Each rank trains on its own batch. What must happen before
``fully_shard``: ``expand_mlp`` / ``add_modules`` (they change the model's structure). After training:
parameter routing ablates theta_forget on the shards; module routing gathers a full state dict and exports
from an unsharded copy (``ModuleSet.export`` refuses a sharded model). See docs/scale.md.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import gradroute as gr


def build(args):
    import transformers

    torch.manual_seed(0)                     # the same initial model on every rank
    cfg = transformers.GPT2Config(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.d_model,
                                  n_layer=args.layers, n_head=max(1, args.d_model // 64))
    model = transformers.GPT2LMHeadModel(cfg)
    if args.routing == "module":
        return model, gr.add_modules(model, "transformer.h.*.mlp", ["a", "b"], width=0.1)
    return model, gr.expand_mlp(model, "transformer.h.*.mlp", args.units)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--routing", choices=["activation", "parameter", "module"], default="parameter")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4, help="examples per rank")
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--units", type=int, default=8, help="MLP units added per block (activation/parameter)")
    ap.add_argument("--bf16", action="store_true", help="FSDP2 mixed precision: bf16 compute, fp32 reduction")
    ap.add_argument("--out", default=None, help="rank 0 saves the gathered (ablated / exported) state dict here")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    try:
        model, extra = build(args)
        mesh = init_device_mesh(device.type, (world,))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if args.bf16 \
            else MixedPrecisionPolicy()
        model.to(device)
        for block in model.transformer.h:    # one shard group per block, then the root (embeddings, head)
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        router = gr.ParamRouter(model, extra) if args.routing == "parameter" else None
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        g = torch.Generator().manual_seed(1000 + rank)          # each rank its own data
        for step in range(args.steps):
            ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)
            forget = (torch.arange(args.batch) % 4 == 0).to(device)
            if args.routing == "activation":
                ctx = gr.route_units(model, extra, forget, outside=-0.75)
            elif args.routing == "parameter":
                ctx = router(forget=forget)
            else:
                labels = torch.tensor([0, gr.GENERAL, 1, gr.UNLABELLED] * args.batch)[:args.batch]
                ctx = extra.route(labels)
            with ctx:
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
            opt.step()                        # module routing: frozen owners' shards are kept out of the step
            opt.zero_grad()
            avg = loss.detach().clone()
            dist.all_reduce(avg)
            if rank == 0:
                print(f"step {step}: loss {float(avg) / world:.4f}", flush=True)
        if router is not None:
            router.ablate()                   # each rank zeroes theta_forget in its shard
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if args.routing == "module" and rank == 0:
            plain, mods = build(args)         # an unsharded copy with the same modules, then export
            plain.load_state_dict(sd)
            sd = mods.export(on=["a"]).state_dict()
        if rank == 0:
            print(f"done: {world} ranks, {sum(t.numel() for t in sd.values())} parameters in the gathered model")
            if args.out:
                torch.save(sd, args.out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
