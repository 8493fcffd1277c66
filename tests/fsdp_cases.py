"""Training cases run twice: sharded with FSDP2 over 2 gloo processes (each rank takes half of every batch) and in
one process on the whole batch. ``run(case, rank)`` returns what the test compares (full tensors, gathered).

The model: Hugging Face GPT-2 built from a config (2 blocks, d_model 16), +8 MLP units per block (parameter and
activation routing: ``expand_mlp``; module routing: 2 domains x 4 units). Sharded: ``fully_shard`` on each
block, then on the root, over a 2-process CPU mesh.
"""
from __future__ import annotations

import contextlib
import functools
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


def shard(model, bf16=False):
    """``fully_shard`` on each block, then the root; ``bf16``: FSDP2's mixed precision (bf16 gathered parameters
    and compute, fp32 gradient reduction and master parameters)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cpu", (2,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
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


@contextlib.contextmanager
def micro_batch(model, rank):
    """One micro-batch of several per step. FSDP2 reduce-scatters each micro-batch's gradient and adds it to the
    gradient held so far (``prev + (g0 + g1) / 2``); one process sums the halves of this micro-batch apart from
    what it held (``prev + (g0 / 2 + g1 / 2)``), the same float additions in the same order."""
    if rank is not None:
        yield
        return
    prev = {p: p.grad for p in model.parameters()}
    for p in model.parameters():
        p.grad = None
    yield
    for p, g in prev.items():
        if g is not None:
            p.grad = g if p.grad is None else g + p.grad


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


def routed_param_steps(rank, tokens=False, zero=False, accumulate=False, before=False, autocast=False,
                       checkpoint=False, ablate=False):
    """Parameter routing: ``STEPS`` AdamW steps (weight decay 0.1) on a sharded or a whole model. ``tokens``:
    per-token forget masks (else per example); ``zero``: some rows run with theta_forget zeroed; ``accumulate``:
    each step two micro-batches, routed differently (per example, then per token); ``before``: the router is
    built before sharding; ``autocast``: forward in bf16 autocast; ``checkpoint``: HF activation checkpointing;
    ``ablate``: ablate after training (on the shards)."""
    model, units = model_and_units()
    if checkpoint:
        model.activation_checkpointing_enable({"use_reentrant": False})
        assert model.is_activation_checkpointing
        model.train()
    router = gr.ParamRouter(model, units) if before else None
    model = shard(model) if rank is not None else model
    router = router or gr.ParamRouter(model, units)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(5)
    for s in range(STEPS):
        micro = [(tokens, 10 + s)] + ([(not tokens, 20 + s)] if accumulate else [])
        for per_token, seed in micro:
            shape = (B, T) if per_token else (B,)
            forget = torch.rand(shape, generator=g) < 0.4
            z = (torch.rand(shape, generator=g) < 0.4) & ~forget if zero else None
            with micro_batch(model, rank):
                for r, w in halves(rank):
                    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
                    with router(forget=half(forget, r), zero=None if z is None else half(z, r)), ctx:
                        (w * loss(model, half(ids(seed), r))).backward()
        opt.step()
        opt.zero_grad()
    if ablate:
        router.ablate()
    out = full_state(model)
    if ablate:
        out["_region"] = {n: m.clone() for n, m in router.masks.items()}
    return out


def routed_activation_steps(rank, autocast=False, checkpoint=False):
    model, units = model_and_units()
    if checkpoint:
        model.activation_checkpointing_enable({"use_reentrant": False})
        assert model.is_activation_checkpointing
        model.train()
    model = shard(model) if rank is not None else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(5)
    for s in range(STEPS):
        forget = torch.rand(B, T, generator=g) < 0.4
        for r, w in halves(rank):
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
            with gr.route_units(model, units, half(forget, r), outside=-0.75), ctx:
                (w * loss(model, half(ids(10 + s), r))).backward()
        opt.step()
        opt.zero_grad()
    return full_state(model)


def case_param_mixed_precision(rank):
    """FSDP2 mixed precision (bf16 parameters in compute): one AdamW step (no weight decay) on an all-forget
    batch moves theta_forget and leaves every other parameter bit for bit (its gradient is exactly 0)."""
    model, units = model_and_units()
    model = shard(model, bf16=True) if rank is not None else model
    router = gr.ParamRouter(model, units)
    before = full_state(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for r, w in halves(rank):
        with router(forget=torch.ones(2, dtype=torch.bool)):
            (w * loss(model, half(ids(10), r))).backward()
    opt.step()
    return {"before": before, "after": full_state(model),
            "region": {n: m.clone() for n, m in router.masks.items()}}


def case_module_mixed_precision(rank):
    """FSDP2 mixed precision with module routing: the isolation of frozen owners holds bit for bit."""
    model, mods = model_and_units(modules=True)
    model = shard(model, bf16=True) if rank is not None else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    out = {"step0": full_state(model)}
    for s in range(STEPS):
        for r, w in halves(rank):
            with mods.route(half(torch.tensor(LABELS[s]), r), p_as=0.5, generator=torch.Generator().manual_seed(s)):
                (w * loss(model, half(ids(10 + s), r))).backward()
        opt.step()
        opt.zero_grad()
        out[f"step{s + 1}"] = full_state(model)
    return out


def case_surgery(rank):
    """On a sharded model: ``gr.ablate`` zeroes each rank's shard of the units; ``expand_mlp`` and
    ``add_modules`` refuse (they change the structure FSDP2 has sharded)."""
    model, units = model_and_units()
    model = shard(model) if rank is not None else model
    gr.ablate(model, units)
    out = {"state": full_state(model)}
    if rank is not None:
        for what, call in (("expand_mlp", lambda: gr.expand_mlp(model, "transformer.h.*.mlp", 2)),
                           ("add_modules", lambda: gr.add_modules(model, "transformer.h.*.mlp", 2))):
            try:
                call()
                out[f"{what} error"] = ""
            except ValueError as e:
                out[f"{what} error"] = str(e)
    return out


# module routing: the labels of each step; step 1 is all domain "a" (p_cr = 1): the core and module "b" learn
# nothing there, and optimizer isolation must keep them bit for bit (AdamW with weight decay would move them)
LABELS = [[0, gr.GENERAL, 1, gr.UNLABELLED], [0, 0, 0, 0], [1, gr.GENERAL, 0, 1]]
LABELS2 = [[gr.UNLABELLED, 1, gr.GENERAL, 0], [0, 0, 0, 0], [gr.GENERAL, gr.GENERAL, 1, 1]]


def routed_module_steps(rank, accumulate=False, autocast=False, checkpoint=False):
    """Module routing: ``STEPS`` AdamW steps (weight decay 0.1); the full parameters after every step, and
    logits of this rank's first half batch (rank 0 and one process: half 0) under ``using``."""
    model, mods = model_and_units(modules=True)
    if checkpoint:
        model.activation_checkpointing_enable({"use_reentrant": False})
        assert model.is_activation_checkpointing
        model.train()
    model = shard(model) if rank is not None else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    out = {"step0": full_state(model)}
    for s in range(STEPS):
        micro = [(LABELS[s], 10 + s)] + ([(LABELS2[s], 20 + s)] if accumulate else [])
        for labels, seed in micro:
            with micro_batch(model, rank):
                for r, w in halves(rank):
                    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
                    with mods.route(half(torch.tensor(labels), r), p_as=0.5,
                                    generator=torch.Generator().manual_seed(seed)), ctx:
                        (w * loss(model, half(ids(seed), r))).backward()
        opt.step()
        opt.zero_grad()
        out[f"step{s + 1}"] = full_state(model)
    model.eval()
    r = 0 if rank is None else rank
    with torch.no_grad():
        for on in (["a"], ["b"], None, []):
            with mods.using(on):
                out[f"using {on}"] = model(input_ids=half(ids(99), r)).logits
    return out


def case_module_keyed(rank):
    """Keyed modules with embedding deltas on our GPT (tied embeddings, in the root's shard group): routed steps
    freeze the core on some rows, so parameter routing runs through the embedding (a non-linear owner)."""
    from gradroute.models import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_ctx=16, n_layer=2, n_head=2, d_model=16, d_mlp=32))
    keys = {"a": [3, 5, 7, 9], "b": [9, 20, 21]}
    mods = gr.add_modules(model, "transformer.h.*.mlp", DOMAINS, width=4, keys=keys, embed_delta=keys)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in mods.module_params():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model = shard(model) if rank is not None else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    out = {}
    for s in range(STEPS):
        for r, w in halves(rank):
            with mods.route(half(torch.tensor(LABELS[s]), r), p_cr=0.5, generator=torch.Generator().manual_seed(s)):
                x = half(ids(10 + s), r)
                (w * model(x, x)[1]).backward()
        opt.step()
        opt.zero_grad()
        out[f"step{s + 1}"] = full_state(model)
    return out


def case_module_export(rank):
    """``export``/``remove`` refuse a sharded model; a gathered full state dict loaded into an unsharded model
    with the same modules exports what one process exports."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model, mods = model_and_units(modules=True)
    model = shard(model) if rank is not None else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for r, w in halves(rank):
        with mods.route(half(torch.tensor(LABELS[0]), r)):
            (w * loss(model, half(ids(10), r))).backward()
    opt.step()
    out = {}
    if rank is not None:
        for what, call in (("export", lambda: mods.export(["a"])), ("remove", mods.remove)):
            try:
                call()
                out[f"{what} error"] = ""
            except ValueError as e:
                out[f"{what} error"] = str(e)
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        plain, mods = model_and_units(modules=True)
        plain.load_state_dict(sd)
    for on in (["a"], []):
        exported = mods.export(on)
        out[f"export {on}"] = {n: t.detach().clone() for n, t in exported.state_dict().items()}
        out[f"export {on} logits"] = exported(input_ids=ids(99)).logits.detach()
    return out
# the same routed steps under different options: {case: (steps function, its options)}
VARIANTS = {
    "param": (routed_param_steps, {}),
    "param_tokens_zero": (routed_param_steps, {"tokens": True, "zero": True}),
    "param_accumulate": (routed_param_steps, {"accumulate": True, "zero": True}),
    "param_ablate": (routed_param_steps, {"before": True, "ablate": True}),
    "param_bf16": (routed_param_steps, {"tokens": True, "zero": True, "autocast": True}),
    "param_checkpoint": (routed_param_steps, {"zero": True, "checkpoint": True}),
    "activation": (routed_activation_steps, {}),
    "activation_bf16": (routed_activation_steps, {"autocast": True}),
    "activation_checkpoint": (routed_activation_steps, {"checkpoint": True}),
    "module": (routed_module_steps, {}),
    "module_accumulate": (routed_module_steps, {"accumulate": True}),
    "module_bf16": (routed_module_steps, {"autocast": True}),
    "module_checkpoint": (routed_module_steps, {"checkpoint": True}),
}
CASES = {**{name[5:]: fn for name, fn in globals().items() if name.startswith("case_")},
         **{name: functools.partial(fn, **kw) for name, (fn, kw) in VARIANTS.items()}}


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
