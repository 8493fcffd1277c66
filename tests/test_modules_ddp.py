"""Module routing under DistributedDataParallel (2 gloo processes): same gradients as one process,
every rank steps the same owners (learned flags all-reduced), frozen owners bit-identical."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import gradroute as gr
from gradroute.models import GPT, GPTConfig
from gradroute.modules import GENERAL

DOMAINS = ["a", "b", "c"]


def make():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_ctx=16, n_layer=2, n_head=2, d_model=16, d_mlp=32))
    mods = gr.add_modules(model, "transformer.h.*.mlp", DOMAINS, width=4)
    return model, mods


def data(step):
    x = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(step))
    # step 0: rank 0 holds domain-"a" rows only (core frozen there), rank 1 general rows: module "a"
    # learns on rank 0 alone, so the ranks must agree to step it. Step 1: only domain "b" rows.
    labels = torch.tensor([0, 0, GENERAL, GENERAL]) if step == 0 else torch.tensor([1, 1, 1, 1])
    return x, labels


def train_steps(net, mods, opt, rank=None):
    snaps = []
    for step in range(2):
        x, labels = data(step)
        if rank is not None:
            x, labels = x[2 * rank:2 * rank + 2], labels[2 * rank:2 * rank + 2]
        with mods.route(labels, p_cr=1.0):
            loss = net(x, x, reduction="sum")[1] / 32 * (1 if rank is None else 2)   # DDP averages
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        snaps.append({n: p.detach().clone() for n, p in mods.model.named_parameters()})
    return snaps


def worker(rank, port, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        model, mods = make()
        net = DDP(model)          # plain DDP: every parameter must be in each rank's graph
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        snaps = train_steps(net, mods, opt, rank)
        torch.save(snaps, f"{path}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_module_routing_under_ddp(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = str(tmp_path / "snaps")
    mp.spawn(worker, args=(port, path), nprocs=2, join=True)
    r0, r1 = torch.load(f"{path}.0"), torch.load(f"{path}.1")
    model, mods = make()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    single = train_steps(model, mods, opt)
    for step in range(2):
        for n in single[step]:
            assert torch.equal(r0[step][n], r1[step][n]), (step, n)               # ranks agree
            assert torch.allclose(r0[step][n], single[step][n], atol=1e-6), (step, n)
    start = dict(make()[0].named_parameters())
    for n in single[0]:
        moved = not torch.equal(single[0][n], start[n])
        if ".aux_modules.b." in n or ".aux_modules.c." in n:
            assert not moved, n                      # no rows for them on step 0
        elif ".aux_modules.a.up." not in n:   # (up gets zero gradient while down is still 0)
            assert moved, n
        if ".aux_modules.b." not in n:                # step 1: only module "b" learns
            assert torch.equal(r0[1][n], r0[0][n]), n
        elif not n.endswith("up.bias"):               # (its up.bias: zero gradient and no decay)
            assert not torch.equal(r0[1][n], r0[0][n]), n
