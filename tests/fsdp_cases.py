"""Training cases run twice: sharded with FSDP2 over 2 gloo processes (each rank takes half of every batch) and in
one process on the whole batch. ``run(case, rank)`` returns what the test compares (full tensors, gathered).

The model: Hugging Face GPT-2 built from a config (2 blocks, d_model 16), +8 MLP units per block (parameter and
activation routing: ``expand_mlp``; module routing: 2 domains x 4 units). Sharded: ``fully_shard`` on each
block, then on the root, over a 2-process CPU mesh.
"""
from __future__ import annotations

import os
import traceback

import torch

import gradroute as gr

B, T, STEPS = 4, 8, 3
DOMAINS = ["a", "b"]


def model_and_units(modules=False):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg)
    if modules:
        mods = gr.add_modules(model, "transformer.h.*.mlp", DOMAINS, width=4)
        g = torch.Generator().manual_seed(1)          # modules start as no-ops (down = 0): make them matter
        with torch.no_grad():
            for p in mods.module_params():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        return model, mods
    return model, gr.expand_mlp(model, "transformer.h.*.mlp", 8)


def shard(model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full(t):
    """A parameter or gradient as one full tensor (gathered from the shards under FSDP2)."""
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def full_state(model):
    return {n: full(p) for n, p in model.named_parameters()}


def ids(seed):
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(seed))


def halves(rank):
    """``[(half, loss scale)]`` one process works through for one step: its own half under FSDP2 (the
    reduce-scatter averages the ranks' gradients), both halves at half weight in one process. The one-process
    gradient is then ``g0 / 2 + g1 / 2`` where FSDP2's is ``(g0 + g1) / 2``: equal bit for bit (scaling by a
    power of two is exact), so the two runs can be compared exactly."""
    return [(rank, 1.0)] if rank is not None else [(0, 0.5), (1, 0.5)]


def half(t, r):
    return t[2 * r: 2 * r + 2]


def loss(model, x):
    return model(input_ids=x, labels=x).loss


# ---------------------------------------------------------------------------------------------- cases
def case_plain(rank):
    model, _ = model_and_units()
    model = shard(model) if rank is not None else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for s in range(STEPS):
        for r, w in halves(rank):
            (w * loss(model, half(ids(10 + s), r))).backward()
        opt.step()
        opt.zero_grad()
    return full_state(model)


def case_param(rank):
    model, units = model_and_units()
    model = shard(model) if rank is not None else model
    router = gr.ParamRouter(model, units)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    forget = torch.tensor([True, False, False, True])
    for s in range(STEPS):
        for r, w in halves(rank):
            with router(forget=half(forget, r)):
                (w * loss(model, half(ids(10 + s), r))).backward()
        opt.step()
        opt.zero_grad()
    return full_state(model)


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}


def run(case: str, rank):
    """The result of ``case`` (``{name: tensor}``), or ``{"error": traceback}`` where it raised."""
    torch.set_num_threads(1)
    try:
        return CASES[case](rank)
    except Exception:
        return {"error": traceback.format_exc()}


def worker(rank, port, path, cases):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        out = {}
        for c in cases:
            out[c] = run(c, rank)
            dist.barrier()
        if rank == 0:
            torch.save(out, path)
        dist.barrier()
    finally:
        dist.destroy_process_group()
