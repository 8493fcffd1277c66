import re

import pytest
import torch
import torch.nn as nn

import gradroute as gr


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_plain_module_routes_output_per_example():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(2, 3)
    with gr.routing(net, {"0": torch.tensor([[1.0], [0.0]])}):
        net(x).sum().backward()
    routed = net[0].weight.grad.clone()
    net.zero_grad()
    net(x[:1]).sum().backward()  # example 1 has weight 0: only example 0 reaches layer 0
    assert torch.allclose(routed, net[0].weight.grad)
    assert net[2].weight.grad is not None


def test_equals_paper_formula_on_hf_gpt2(hf_gpt2):
    model = hf_gpt2
    ids = torch.randint(0, 64, (3, 8))
    w = torch.rand(3, 8, 1) * 1.75 - 0.75  # per token, in [-0.75, 1]
    with gr.routing(model, {"transformer.h.*": w}):
        model(ids, labels=ids).loss.backward()
    ours = grads(model)
    model.zero_grad()
    hooks = [blk.register_forward_hook(lambda m, a, o: (gr.route_reference(o[0], w), *o[1:]) if isinstance(o, tuple)
                                       else gr.route_reference(o, w)) for blk in model.transformer.h]
    model(ids, labels=ids).loss.backward()
    for h in hooks:
        h.remove()
    ref = grads(model)
    assert ours.keys() == ref.keys()
    for n in ours:
        assert torch.allclose(ours[n], ref[n], atol=1e-6), n


def test_routing_changes_gradient_not_value(hf_gpt2):
    ids = torch.randint(0, 64, (2, 8))
    base = hf_gpt2(ids).logits
    with gr.routing(hf_gpt2, {"transformer.h.0.mlp": 0.0}):
        out = hf_gpt2(ids, labels=ids)
        assert torch.equal(out.logits, base)
        out.loss.backward()
    assert torch.count_nonzero(hf_gpt2.transformer.h[0].mlp.c_fc.weight.grad) == 0
    assert torch.count_nonzero(hf_gpt2.transformer.h[1].mlp.c_fc.weight.grad) > 0


def test_llama_style_model_blocks_and_regex(hf_llama):
    ids = torch.randint(0, 64, (2, 6))
    with gr.routing(hf_llama, {re.compile(r"model\.layers\.\d+\.mlp"): 0.0,
                               "re:model\\.layers\\.1\\.self_attn": 0.0}):
        hf_llama(ids, labels=ids).loss.backward()
    layer0, layer1 = hf_llama.model.layers
    assert torch.count_nonzero(layer0.mlp.up_proj.weight.grad) == 0
    assert torch.count_nonzero(layer1.self_attn.q_proj.weight.grad) == 0
    assert torch.count_nonzero(layer0.self_attn.q_proj.weight.grad) > 0


def test_callable_weight_and_input_routing(tiny_gpt):
    ids = torch.randint(0, 64, (2, 5))
    seen = []

    def weight(h):
        seen.append(h.shape)
        return torch.zeros(h.shape[-1])

    with gr.routing(tiny_gpt, {"transformer.h.*.mlp.c_proj": weight}, on="input"):
        tiny_gpt(ids, ids)[1].backward()
    assert seen == [(2, 5, 32), (2, 5, 32)]
    blk = tiny_gpt.transformer.h[0]
    assert torch.count_nonzero(blk.mlp.c_fc.weight.grad) == 0  # upstream of the routed input
    assert torch.count_nonzero(blk.mlp.c_proj.weight.grad) > 0  # downstream still learns


def test_glob_star_is_one_component(tiny_gpt):
    names = [n for n, _ in gr.find_modules(tiny_gpt, "transformer.h.*.mlp")]
    assert names == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
    deep = [n for n, _ in gr.find_modules(tiny_gpt, "transformer.**.c_fc")]
    assert deep == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]


def test_unknown_pattern_lists_close_names(tiny_gpt):
    with pytest.raises(gr.UnknownModuleError, match=r"close names: .*transformer\.h\.0\.mlp"):
        with gr.routing(tiny_gpt, {"transformer.h.0.mpl": 0.0}):
            pass
    with pytest.raises(ValueError):
        with gr.routing(tiny_gpt, {}):
            pass
    with pytest.raises(ValueError, match="on must be"):
        with gr.routing(tiny_gpt, {"lm_head": 0.0}, on="side"):
            pass


def test_hooks_removed_after_exception(tiny_gpt):
    before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tiny_gpt.modules())
    with pytest.raises(RuntimeError, match="boom"):
        with gr.routing(tiny_gpt, {"transformer.h.*": 0.0, "transformer.h.0.mlp.c_proj": 1.0}):
            raise RuntimeError("boom")
    after = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tiny_gpt.modules())
    assert before == after == 0


def test_bad_weight_shape_names_module(tiny_gpt):
    ids = torch.randint(0, 64, (2, 5))
    with pytest.raises(ValueError, match=r"transformer\.h\.0.*\(3, 1, 1\)"):
        with gr.routing(tiny_gpt, {"transformer.h.0": torch.ones(3, 1, 1)}):
            tiny_gpt(ids)


def test_double_match_is_an_error(tiny_gpt):
    with pytest.raises(ValueError, match="more than one pattern"):
        with gr.routing(tiny_gpt, {"transformer.h.*": 0.0, "transformer.h.0": 1.0}):
            pass


def test_backward_after_exit_still_routed(tiny_gpt):
    ids = torch.randint(0, 64, (2, 5))
    with gr.routing(tiny_gpt, {"transformer.h.0.mlp": 0.0}):
        loss = tiny_gpt(ids, ids)[1]
    loss.backward()
    assert torch.count_nonzero(tiny_gpt.transformer.h[0].mlp.c_fc.weight.grad) == 0
