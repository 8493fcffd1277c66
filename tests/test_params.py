import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

import gradroute as gr


def per_example_loss(model, ids, params=None):
    """Sum of token losses per example (B,), for our GPT or an HF causal LM."""
    out = model(ids) if params is None else functional_call(model, params, (ids,))
    logits = out[0] if isinstance(out, tuple) else out.logits
    lp = torch.log_softmax(logits[:, :-1].float(), -1)
    return -lp.gather(-1, ids[:, 1:, None]).squeeze(-1).sum(1)


def reference_grads(model, ids, router, forget, zero):
    """Backward each group separately, mask, sum."""
    named = dict(model.named_parameters())
    masks = {n: router.masks.get(n, torch.zeros_like(p, dtype=torch.bool)) for n, p in named.items()}
    total = {n: torch.zeros_like(p) for n, p in named.items()}
    rest = ~(forget | zero)
    for group, kind in ((rest, "n"), (forget, "f"), (zero, "z")):
        if not group.any():
            continue
        params = {n: p * (~masks[n]).to(p.dtype) for n, p in named.items()} if kind == "z" else None
        loss = per_example_loss(model, ids, params)[group].sum()
        gs = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
        for (n, p), g in zip(named.items(), gs):
            if g is None:
                continue
            if kind == "f":
                g = g * masks[n]
            total[n] += g
    return total


def routed_grads(model, ids, router, forget, zero):
    model.zero_grad()
    with router(forget=forget, zero=zero):
        per_example_loss(model, ids).sum().backward()
    return {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}


def check_equal(model, ids, router, forget, zero):
    ours = routed_grads(model, ids, router, forget, zero)
    ref = reference_grads(model, ids, router, forget, zero)
    for n in ref:
        assert torch.allclose(ours[n], ref[n], atol=1e-5, rtol=1e-4), n


@pytest.mark.parametrize("groups", ["mixed", "forget_only", "with_zero", "contiguous", "none"])
def test_matches_separate_backward_reference_ours(tiny_gpt, groups):
    units = gr.expand_mlp(tiny_gpt, "transformer.h.*.mlp", 4)
    with torch.no_grad():
        for p in tiny_gpt.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    router = gr.ParamRouter(tiny_gpt, units)
    ids = torch.randint(0, 64, (6, 8))
    forget = {"mixed": [1, 0, 1, 0, 0, 0], "forget_only": [1] * 6, "with_zero": [1, 0, 0, 1, 0, 0],
              "contiguous": [1, 1, 0, 0, 0, 0], "none": [0] * 6}[groups]
    zero = {"with_zero": [0, 0, 1, 0, 1, 0], "contiguous": [0, 0, 0, 0, 1, 1]}.get(groups, [0] * 6)
    check_equal(tiny_gpt, ids, router, torch.tensor(forget).bool(), torch.tensor(zero).bool())


def naive_per_position_grads(model, ids, router, forget):
    """Independent, slow reference for per-token routing: every parameter-owning module computes its
    output twice, with plain parameters and with route(p, mask) parameters, and each position takes
    the forget version where forget is set (the paper's formula applied to parameters)."""
    busy, hooks = [False], []
    full = {id(p): n for n, p in model.named_parameters()}

    def hook(mod, args, out):
        if busy[0]:
            return None
        routed = {n: gr.route(p, router.masks[full[id(p)]].float()) if full[id(p)] in router.masks else p.detach()
                  for n, p in mod.named_parameters(recurse=False)}
        busy[0] = True
        try:
            alt = functional_call(mod, routed, args)
        finally:
            busy[0] = False
        sel = forget.view(*forget.shape, *([1] * (out.ndim - forget.ndim)))
        return torch.where(sel, alt, out.expand_as(alt))

    for m in model.modules():
        if list(m.parameters(recurse=False)):
            hooks.append(m.register_forward_hook(hook))
    model.zero_grad()
    try:
        per_example_loss(model, ids).sum().backward()
    finally:
        for h in hooks:
            h.remove()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_matches_reference_hf_gpt2_heads_and_units(hf_gpt2):
    region = gr.unit_masks(hf_gpt2, gr.select_units(hf_gpt2, "transformer.h.*.mlp", slice(0, 8)))
    region.update(gr.unit_masks(hf_gpt2, gr.select_units(hf_gpt2, "transformer.h.1.attn", [0], kind="heads")))
    router = gr.ParamRouter(hf_gpt2, region)
    ids = torch.randint(0, 64, (3, 6))
    check_equal(hf_gpt2, ids, router, torch.tensor([True, False, False]), torch.tensor([False, False, True]))
    # per token: against the naive two-forward reference
    forget = torch.rand(3, 6, generator=torch.Generator().manual_seed(0)) < 0.4
    ours = routed_grads(hf_gpt2, ids, router, forget, torch.zeros_like(forget))
    ours = {n: g.clone() for n, g in ours.items()}
    ref = naive_per_position_grads(hf_gpt2, ids, router, forget)
    for n in ref:
        assert torch.allclose(ours[n], ref[n], atol=1e-5, rtol=1e-4), n


def test_matches_reference_llama(hf_llama):
    units = gr.expand_mlp(hf_llama, "model.layers.*.mlp", 4)
    router = gr.ParamRouter(hf_llama, units)
    ids = torch.randint(0, 64, (4, 6))
    check_equal(hf_llama, ids, router, torch.tensor([1, 0, 0, 1]).bool(), torch.tensor([0, 1, 0, 0]).bool())


def test_forget_data_updates_only_theta_forget(tiny_gpt):
    router = gr.ParamRouter(tiny_gpt, gr.linear_region(tiny_gpt, "transformer.h.0.mlp.c_fc", out_units=[0, 1]))
    ids = torch.randint(0, 64, (2, 8))
    with router(forget=torch.ones(2, dtype=torch.bool)):
        tiny_gpt(ids, ids)[1].backward()
    for n, p in tiny_gpt.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        if n == "transformer.h.0.mlp.c_fc.weight":
            assert torch.count_nonzero(g[2:]) == 0 and torch.count_nonzero(g[:2]) > 0
        elif n == "transformer.h.0.mlp.c_fc.bias":
            assert torch.count_nonzero(g[2:]) == 0 and torch.count_nonzero(g[:2]) > 0
        else:
            assert torch.count_nonzero(g) == 0, n


def test_zero_examples_run_without_theta_forget(tiny_gpt):
    units = gr.select_units(tiny_gpt, "transformer.h.*.mlp", slice(0, 8))
    router = gr.ParamRouter(tiny_gpt, units)
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        with router(zero=torch.tensor([True, False])):
            routed = tiny_gpt(ids)[0]
        plain = tiny_gpt(ids)[0]
        router.ablate()
        ablated = tiny_gpt(ids)[0]
    assert torch.allclose(routed[0], ablated[0], atol=1e-5)
    assert torch.allclose(routed[1], plain[1], atol=1e-5)
    assert not torch.allclose(plain[0], ablated[0])
    assert router.num_forget_params() == 2 * (8 * 16 + 8 + 16 * 8)


def test_forwards_restored_after_exception(tiny_gpt):
    router = gr.ParamRouter(tiny_gpt, gr.select_units(tiny_gpt, "transformer.h.*.mlp", [0]))
    with pytest.raises(RuntimeError):
        with router(forget=torch.ones(2, dtype=torch.bool)):
            raise RuntimeError("boom")
    assert all("forward" not in vars(m) for m in tiny_gpt.modules())


def test_errors(tiny_gpt):
    with pytest.raises(ValueError, match="unknown parameter"):
        gr.ParamRouter(tiny_gpt, {"transformer.h.0.mlp.cfc.weight": torch.ones(1, dtype=torch.bool)})
    with pytest.raises(ValueError, match="does not broadcast"):
        gr.ParamRouter(tiny_gpt, {"transformer.h.0.mlp.c_fc.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="non-empty"):
        gr.ParamRouter(tiny_gpt, {})
    with pytest.raises(ValueError, match="out_units"):
        gr.linear_region(tiny_gpt, "lm_head")
    router = gr.ParamRouter(tiny_gpt, gr.select_units(tiny_gpt, "transformer.h.*.mlp", [0]))
    with pytest.raises(ValueError, match="leading dims"):
        with router(forget=torch.ones(3, dtype=torch.bool)):
            tiny_gpt(torch.randint(0, 64, (2, 8)))
    with pytest.raises(ValueError, match="forget="):
        with router():
            pass

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))
            self.lin = nn.Linear(3, 3)

    with pytest.raises(TypeError, match="leaf module"):
        gr.ParamRouter(Odd(), {"lin.weight": torch.ones(3, 3, dtype=torch.bool)})


def test_unit_masks_cost_a_row_not_a_weight(hf_gpt2):
    # MLP units are rows of the input linear and columns of the reader: each mask is a vector expanded to the
    # weight's shape, so a large model's masks stay small (docs/scale.md counts on it)
    units = gr.expand_mlp(hf_gpt2, "transformer.h.*.mlp", 4)
    router = gr.ParamRouter(hf_gpt2, units)
    named = dict(hf_gpt2.named_parameters())
    for name, m in router.masks.items():
        assert m.shape == named[name].shape
        assert m.untyped_storage().nbytes() <= max(m.shape), (name, m.untyped_storage().nbytes())
    assert router.num_forget_params() == sum(int(m.sum()) for m in router.masks.values())
