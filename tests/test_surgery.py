import copy

import pytest
import torch

import gradroute as gr


def logits(model, ids):
    out = model(ids)
    return out[0] if isinstance(out, tuple) else out.logits


MODELS = {
    "ours": ("tiny_gpt", "transformer.h.*.mlp", "transformer.h.*.attn"),
    "gpt2": ("hf_gpt2", "transformer.h.*.mlp", "transformer.h.*.attn"),
    "llama": ("hf_llama", "model.layers.*.mlp", "model.layers.*.self_attn"),
}


@pytest.fixture(params=list(MODELS))
def case(request):
    fixture, mlp, attn = MODELS[request.param]
    return request.getfixturevalue(fixture), mlp, attn


def test_expand_keeps_function(case):
    model, mlp, attn = case
    ids = torch.randint(0, 64, (2, 7))
    before = logits(model, ids)
    units = gr.expand_mlp(model, mlp, 5)
    heads = gr.expand_attention(model, attn, 2)
    after = logits(model, ids)
    assert torch.allclose(before, after, atol=1e-5, rtol=1e-5)
    assert all(len(i) == 5 for i in units.index.values()) and len(units.index) == 2
    assert all(len(i) == 2 for i in heads.index.values())
    # new units are live: the reading linear's new (zero) columns receive gradient
    logits(model, ids).square().mean().backward()
    modules = dict(model.named_modules())
    from gradroute.adapters import mlp_parts

    readers = [f"{n}.{mlp_parts(modules[n]).output}" for n in units.index]
    assert len(readers) == 2
    for lin in readers:
        wm = gr.unit_masks(model, units)[lin][0]
        assert modules[lin].weight.grad[wm].abs().sum() > 0, lin


def test_ablate_zeroes_exactly_the_region(case):
    model, mlp, attn = case
    units = gr.expand_mlp(model, mlp, 3)
    heads = gr.expand_attention(model, attn, 2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gr.ablate(model, units)
    gr.ablate(model, heads)
    masks = {**{f"{k}.weight": v[0] for k, v in gr.unit_masks(model, units).items()},
             **{f"{k}.bias": v[1] for k, v in gr.unit_masks(model, units).items() if v[1] is not None}}
    for k, (w, b) in gr.unit_masks(model, heads).items():
        masks[f"{k}.weight"] = masks.get(f"{k}.weight", torch.zeros_like(w)) | w
        if b is not None:
            masks[f"{k}.bias"] = masks.get(f"{k}.bias", torch.zeros_like(b)) | b
    assert masks, "region is empty"
    for n, p in model.named_parameters():
        m = masks.get(n)
        if m is None:
            assert torch.equal(p, before[n]), n
        else:
            assert torch.all(p[m] == 0), n
            assert torch.equal(p[~m], before[n][~m]), n
            assert m.any() or n.endswith("bias"), n  # an output projection's bias is outside the region


def test_ablate_expanded_units_restores_original_function(case):
    model, mlp, _ = case
    ids = torch.randint(0, 64, (2, 7))
    ref = copy.deepcopy(model)
    units = gr.expand_mlp(model, mlp, 4)
    with torch.no_grad():  # train-like perturbation of everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    gr.ablate(model, units)
    contracted = copy.deepcopy(model)
    gr.contract(contracted, units)
    for (n, p), (_, q) in zip(contracted.named_parameters(), ref.named_parameters()):
        assert p.shape == q.shape, n
    assert torch.allclose(logits(model, ids), logits(contracted, ids), atol=1e-5)


def test_contract_heads_matches_ablate(tiny_gpt, hf_gpt2):
    for model, pattern in ((tiny_gpt, "transformer.h.*.attn"), (hf_gpt2, "transformer.h.*.attn")):
        ids = torch.randint(0, 64, (2, 7))
        heads = gr.select_units(model, pattern, [1], kind="heads")
        gr.ablate(model, heads)
        small = copy.deepcopy(model)
        gr.contract(small, heads)
        assert torch.allclose(logits(model, ids), logits(small, ids), atol=1e-5)


def test_gqa_expand_needs_group_multiple(hf_llama):
    with pytest.raises(ValueError, match="multiple of 2"):
        gr.expand_attention(hf_llama, "model.layers.*.self_attn", 1)


def test_surgery_errors(tiny_gpt):
    with pytest.raises(ValueError):
        gr.expand_mlp(tiny_gpt, "transformer.h.*.mlp", 0)
    with pytest.raises(gr.UnknownModuleError):
        gr.expand_mlp(tiny_gpt, "transformer.h.*.mpl", 2)
    with pytest.raises(TypeError, match="not a recognised MLP"):
        gr.expand_mlp(tiny_gpt, "transformer.h.*.attn", 2)
    with pytest.raises(ValueError, match="out of range"):
        gr.select_units(tiny_gpt, "transformer.h.*.mlp", [32])


def test_route_units_era_pattern(tiny_gpt):
    units = gr.expand_mlp(tiny_gpt, "transformer.h.*.mlp", 4)
    with torch.no_grad():  # as after some training: the new units write to the residual stream
        tiny_gpt.transformer.h[0].mlp.c_proj.weight[:, 32:] = 0.1
    ids = torch.randint(0, 64, (2, 5))
    forget = torch.tensor([True, False])
    x = {}
    h = tiny_gpt.transformer.h[0].mlp.c_proj.register_forward_pre_hook(lambda m, a: x.setdefault("h", a[0]))
    with gr.route_units(tiny_gpt, units, forget, outside=0.0):
        _, loss = tiny_gpt(ids, ids)
        x["h"].retain_grad()
        loss.backward()
    h.remove()
    g = x["h"].grad
    assert torch.count_nonzero(g[0, :, :32]) == 0       # forget example: only new units get gradient
    assert torch.count_nonzero(g[0, :, 32:]) > 0
    assert torch.count_nonzero(g[1, :, :32]) > 0        # retain example: everywhere
