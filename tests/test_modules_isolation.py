"""Module routing: optimizer isolation. An owner (the core, or one module with its embedding delta) that did not
learn on a step does not move at all under real optimizers (AdamW, SGD with momentum, weight decay), through
the shared training loop, and under DDP."""
import os

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import gradroute as gr
from gradroute.models import GPT, GPTConfig
from gradroute.modules import GENERAL, UNLABELLED



@pytest.mark.parametrize("optimizer", ["adamw", "sgd_momentum"])
def test_frozen_parameters_bit_identical_under_real_optimizers(modkit, optimizer):
    model = modkit.gpt()
    mods = gr.add_modules(model, "transformer.h.*.mlp", modkit.DOMAINS)
    opt = (torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1) if optimizer == "adamw"
           else torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=0.1))
    g = torch.Generator().manual_seed(0)
    # mixed steps first: every owner gets momentum / Adam moments
    modkit.routed_steps(model, mods, opt, [0, 1, 2, 3, GENERAL, UNLABELLED], 0, p_as=0.5, generator=g)
    core, forest, others = modkit.snapshot(mods.core_params()), modkit.snapshot(mods.module_params("forest")), \
        [modkit.snapshot(mods.module_params(d)) for d in modkit.DOMAINS[1:]]
    modkit.routed_steps(model, mods, opt, [0, 0, 0], 10, p_cr=1.0)   # only forest data, core frozen
    assert modkit.same(core, mods.core_params())
    for snap, d in zip(others, modkit.DOMAINS[1:]):
        assert modkit.same(snap, mods.module_params(d)), d
    assert not modkit.same(forest, mods.module_params("forest"))
    # the trap this guards against: zeroed gradients still move the core (moments, weight decay)
    for p in mods.core_params():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert not modkit.same(core, mods.core_params())
    mods.remove()


def test_isolation_in_the_shared_training_loop(modkit):
    from gradroute.lm.data import Batch
    from gradroute.lm.train import TrainConfig, token_losses, train

    model = modkit.gpt()
    mods = gr.add_modules(model, "transformer.h.*.mlp", modkit.DOMAINS)
    core, sea, dino = (modkit.snapshot(mods.core_params()), modkit.snapshot(mods.module_params("sea")),
                       modkit.snapshot(mods.module_params("dino")))

    def batch_at(step):
        x = modkit.ids(4, seed=step)
        z = torch.zeros(4, dtype=torch.bool)
        return Batch(x, x, z, z, z, torch.arange(4), int(x.numel()), {"labels": torch.tensor([0, 2, 2, 3])})

    def loss_fn(net, b):
        with mods.route(b.extra["labels"], p_cr=1.0):
            return token_losses(net, b.x, b.y).sum()

    train(model, batch_at, TrainConfig(steps=4, lr=1e-2, warmup=0, weight_decay=0.1), loss_fn=loss_fn)
    assert modkit.same(core, mods.core_params()) and modkit.same(sea, mods.module_params("sea"))
    assert not modkit.same(dino, mods.module_params("dino"))        # trained on its rows
    mods.remove()


def test_plain_training_without_routing_updates_everything(modkit):
    model = modkit.gpt()
    mods = gr.add_modules(model, "transformer.h.*.mlp", modkit.DOMAINS)
    modkit.randomise_modules(mods)
    before = modkit.snapshot(model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with torch.no_grad(), mods.route(torch.tensor([0, 0, 0, 0])):   # a routed evaluation learns nothing
        model(modkit.ids())
    model(modkit.ids(), modkit.ids())[1].backward()
    assert mods.learned_flags() is None
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    mods.remove()


def test_p_other_modules_do_not_move_under_adamw(modkit):
    """A module that only ran without learning since the last step is not stepped (moments, weight decay),
    also after it has moments from earlier steps."""
    model = modkit.gpt()
    mods = gr.add_modules(model, "transformer.h.*.mlp", modkit.DOMAINS)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    modkit.routed_steps(model, mods, opt, [0, 1, 2, 3, GENERAL], 0, p_as=0.5, generator=g)
    others = [modkit.snapshot(mods.module_params(d)) for d in modkit.DOMAINS[1:]]
    core, forest = modkit.snapshot(mods.core_params()), modkit.snapshot(mods.module_params("forest"))
    # forest rows only; every other module runs on them (p_other 1), core frozen
    modkit.routed_steps(model, mods, opt, [0, 0, 0], 20, p_cr=1.0, p_other=1.0)
    assert modkit.same(core, mods.core_params())
    for snap, d in zip(others, modkit.DOMAINS[1:]):
        assert modkit.same(snap, mods.module_params(d)), d
    assert not modkit.same(forest, mods.module_params("forest"))
    mods.remove()


def test_row_deltas_isolation_under_adamw(modkit):
    """Core-frozen forest-only steps under AdamW (after mixed steps gave every owner moments): the
    core (wte included) and the other modules' deltas and MLPs stay bit-identical; forest's moves."""
    model = modkit.gpt()
    mods = modkit.open_rows(model)
    modkit.randomise_modules(mods)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    modkit.routed_steps(model, mods, opt, [0, 1, 2, 3, GENERAL, UNLABELLED], 0, p_as=0.5, generator=g)
    core = mods.core_params()
    before, others = modkit.snapshot(core), [modkit.snapshot(mods.module_params(d)) for d in modkit.DOMAINS[1:]]
    forest = model.aux_embed.forest.weight.detach().clone()
    modkit.routed_steps(model, mods, opt, [0, 0, 0], 20, p_cr=1.0)
    assert modkit.same(before, core)
    for snap, d in zip(others, modkit.DOMAINS[1:]):
        assert modkit.same(snap, mods.module_params(d)), d
    assert not torch.equal(forest, model.aux_embed.forest.weight)


def test_keyed_isolation_under_adamw_bit_identical(modkit):
    model = modkit.gpt()
    mods = modkit.keyed(model)
    modkit.randomise_modules(mods)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    modkit.routed_steps(model, mods, opt, [0, 1, 2, 3, GENERAL], 0, p_as=0.5, generator=g)   # moments for everyone
    core, forest = modkit.snapshot(mods.core_params()), modkit.snapshot(mods.module_params("forest"))
    others = [modkit.snapshot(mods.module_params(d)) for d in modkit.DOMAINS[1:]]
    modkit.routed_steps(model, mods, opt, [0, 0, 0], 10, p_cr=1.0, p_other=1.0)   # forest data, others visit
    assert modkit.same(core, mods.core_params())
    for snap, d in zip(others, modkit.DOMAINS[1:]):
        assert modkit.same(snap, mods.module_params(d)), d
    assert not modkit.same(forest, mods.module_params("forest"))


# ------------------------------------------------------------------ DDP (2 gloo processes)
# same gradients as one process, every rank steps the same owners (learned flags all-reduced),
# frozen owners bit-identical
DDP_DOMAINS = ["a", "b", "c"]


# the keyed modules with embedding deltas run in the same processes: their gates are computed per rank from its
# own rows, their "learned" flags all-reduced with the core's
DDP_OPTIONS = {"plain": {}, "keyed": dict(keys={"a": list(range(0, 12)), "b": list(range(12, 30)), "c": list(range(40, 64))},
                                          embed_delta={"a": list(range(0, 20)), "b": list(range(10, 40)),
                                                       "c": list(range(30, 64))})}


def ddp_make(options="plain"):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_ctx=16, n_layer=2, n_head=2, d_model=16, d_mlp=32))
    mods = gr.add_modules(model, "transformer.h.*.mlp", DDP_DOMAINS, width=4, **DDP_OPTIONS[options])
    return model, mods


def ddp_data(step):
    x = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(step))
    # step 0: rank 0 holds domain-"a" rows only (core frozen there), rank 1 general rows: module "a"
    # learns on rank 0 alone, so the ranks must agree to step it. Step 1: only domain "b" rows.
    labels = torch.tensor([0, 0, GENERAL, GENERAL]) if step == 0 else torch.tensor([1, 1, 1, 1])
    return x, labels


def ddp_train_steps(net, mods, opt, rank=None):
    snaps = []
    for step in range(2):
        x, labels = ddp_data(step)
        if rank is not None:
            x, labels = x[2 * rank:2 * rank + 2], labels[2 * rank:2 * rank + 2]
        with mods.route(labels, p_cr=1.0):
            loss = net(x, x, reduction="sum")[1] / 32 * (1 if rank is None else 2)   # DDP averages
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        snaps.append({n: p.detach().clone() for n, p in mods.model.named_parameters()})
    return snaps


def ddp_worker(rank, port, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        for options in DDP_OPTIONS:
            model, mods = ddp_make(options)
            net = DDP(model)          # plain DDP: every parameter must be in each rank's graph
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
            snaps = ddp_train_steps(net, mods, opt, rank)
            mods.remove()
            torch.save(snaps, f"{path}.{options}.{rank}")
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_module_routing_under_ddp(tmp_path, spawn2):
    path = str(tmp_path / "snaps")
    spawn2(ddp_worker, path)
    r0, r1 = torch.load(f"{path}.plain.0"), torch.load(f"{path}.plain.1")
    model, mods = ddp_make()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    single = ddp_train_steps(model, mods, opt)
    for step in range(2):
        for n in single[step]:
            assert torch.equal(r0[step][n], r1[step][n]), (step, n)               # ranks agree
            assert torch.allclose(r0[step][n], single[step][n], atol=1e-6), (step, n)
    start = dict(ddp_make()[0].named_parameters())
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
    # keyed: the same agreement; on step 1 only b's module and delta move
    k0, k1 = torch.load(f"{path}.keyed.0"), torch.load(f"{path}.keyed.1")
    model, mods = ddp_make("keyed")
    single = ddp_train_steps(model, mods, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1))
    assert "aux_embed.b.weight" in single[1]
    for step in range(2):
        for n in single[step]:
            assert torch.equal(k0[step][n], k1[step][n]), (step, n)
            assert torch.allclose(k0[step][n], single[step][n], atol=1e-6), (step, n)
    for n in single[1]:
        moves = (".aux_modules.b." in n and not n.endswith("up.bias")) or n == "aux_embed.b.weight"
        assert torch.equal(k0[1][n], k0[0][n]) != moves, n
