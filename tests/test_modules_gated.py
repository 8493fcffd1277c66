"""Gated modules (``add_modules(..., gated=True)``; ours, a departure from the paper's gateless modules;
docs/modules.md diagnosis point 19) and the experiment's ``modules.gated`` candidate key."""
import math

import pytest
import torch
import torch.nn.functional as F

import gradroute as gr
from gradroute.modules import CONTAINER, GENERAL

from test_modules import DOMAINS, gpt, ids, randomise_modules
from test_modules_ordered import _forest_rows, _ordered_model, _setup, check_ordered_key
from test_modules_rows import ROWS, attach_leaves_function_unchanged


def _gated(model, rows=ROWS):
    return gr.add_modules(model, "transformer.h.*.mlp", DOMAINS, embed_delta=rows, gated=True)


def _inputs(model, mods):
    """Hooks recording the input of every block's MLP and of lm_head."""
    rec, hooks = {}, []
    for name, mlp in mods.blocks:
        hooks.append(mlp.register_forward_pre_hook(lambda m, a, n=name: rec.__setitem__(n, a[0])))
    hooks.append(model.lm_head.register_forward_pre_hook(lambda m, a: rec.__setitem__("head", a[0])))
    return rec, hooks


def test_gated_function_unchanged_at_init_and_gates_start_at_one_half():
    model, mods = attach_leaves_function_unchanged(_gated, labels=(0, GENERAL, 2, 3))
    for _, mlp in mods.blocks:
        for d in DOMAINS:
            g = getattr(mlp, CONTAINER)[d].gate
            assert g.weight.shape == (1, 16) and torch.equal(g.weight, torch.zeros_like(g.weight))
            assert float(torch.sigmoid(g.bias.detach())) == 0.5
    # the gate belongs to its module's owner; ungated modules have none
    assert all(any(p is getattr(mlp, CONTAINER)[d].gate.weight for p in mods.module_params(d))
               for _, mlp in mods.blocks for d in DOMAINS)
    assert getattr(gr.add_modules(gpt(), "transformer.h.*.mlp", DOMAINS).blocks[0][1], CONTAINER)["sea"].gate is None
    with pytest.raises(TypeError, match="gated must be True or False"):
        gr.add_modules(gpt(), "transformer.h.*.mlp", DOMAINS, gated=1)


def test_gate_multiplies_module_output_and_delta_logits_per_token():
    model = gpt()
    model.eval()
    mods = _gated(model)
    randomise_modules(mods)                       # gates too: they differ per token
    x = ids()
    rec, hooks = _inputs(model, mods)
    with torch.no_grad():
        with mods.using(on=[]):
            model(x)
            off = {n: mlp.__class__.forward(mlp, rec[n]) for n, mlp in mods.blocks}
        with mods.using(on=["forest"]):
            logits = model(x)[0]
            mlp_out = {}
            for n, mlp in mods.blocks:
                a = getattr(mlp, CONTAINER)["forest"]
                g = torch.sigmoid(rec[n] @ a.gate.weight.T + a.gate.bias)
                assert float(g.max() - g.min()) > 0.05      # a per-token gate, not a constant
                mlp_out[n] = (mlp.__class__.forward(mlp, rec[n])
                              + g * F.linear(a.act(F.linear(rec[n], a.up.weight, a.up.bias)), a.down.weight))
                assert torch.allclose(mlp(rec[n]), mlp_out[n], atol=1e-6)
            # logits: the core head + the last block's forest gate x h D_forest^T on forest's rows
            last = getattr(mods.blocks[-1][1], CONTAINER)["forest"]
            g = torch.sigmoid(rec[mods.blocks[-1][0]] @ last.gate.weight.T + last.gate.bias)
            h = rec["head"]
            want = F.linear(h, model.lm_head.weight)
            want[..., ROWS["forest"]] += g * (h @ model.aux_embed.forest.weight.T)
            assert torch.allclose(logits, want, atol=1e-5)
            # gates at 0 silence the module's MLPs (the delta, whose input part is not gated, set to 0)
            model.aux_embed.forest.weight.zero_()
            for _, mlp in mods.blocks:
                getattr(mlp, CONTAINER)["forest"].gate.bias.fill_(-1e4)
            closed = model(x)[0]
            assert not torch.allclose(closed, logits, atol=1e-3)
            with mods.using(on=[]):
                nothing = model(x)[0]
        assert torch.allclose(closed, nothing, atol=1e-5)
    for h_ in hooks:
        h_.remove()


def _gated_model(tmp_path, monkeypatch):
    E, _, model, mods, data, rl = _ordered_model(tmp_path, monkeypatch, gated=True)
    return E, model, mods, data, rl


def test_gated_loss_is_own_alone_lm_plus_gate_bce_and_visitors_learn_only_their_gates(tmp_path, monkeypatch):
    E, model, mods, data, rl = _gated_model(tmp_path, monkeypatch)
    idx, b = _forest_rows(data, rl)
    loss_fn = E.gated_loss(mods, rl, 0, p_other=1.0)          # every other module visits the forest rows
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, b)
    loss.backward()
    # independent: forest alone LM loss + BCE of every module's gate (forest 1, visitors 0), all modules on
    K = len(mods.domains)
    alone = torch.zeros(len(idx), 1 + K)
    alone[:, :2] = 1.0
    rec, hooks = _inputs(model, mods)
    with torch.no_grad():
        with mods.route(forward=alone, learn=alone.bool()):
            lm = E.token_losses(model, b.x, b.y).sum()
        with mods.using():
            model(b.x)
    for h in hooks:
        h.remove()
    tok = b.y >= 0
    bce = 0.0
    for n, mlp in mods.blocks:
        for k, d in enumerate(mods.domains):
            gt = getattr(mlp, CONTAINER)[d].gate
            z = (rec[n] @ gt.weight.T + gt.bias).squeeze(-1)
            bce += F.binary_cross_entropy_with_logits(z, torch.full_like(z, float(k == 0)), reduction="none")[tok].sum()
    assert math.isclose(float(loss.detach()), float((lm + bce / len(mods.blocks)).detach()), rel_tol=1e-4)
    # visitors: only their gates got a gradient; the core none; forest's MLP and gate both
    for d in mods.domains[1:]:
        for n, mlp in mods.blocks:
            a = getattr(mlp, CONTAINER)[d]
            assert a.gate.weight.grad is not None and float(a.gate.weight.grad.abs().sum()) > 0
            assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in (a.up.weight, a.down.weight))
    f = getattr(mods.blocks[0][1], CONTAINER)["forest"]
    assert float(f.down.weight.grad.abs().sum()) > 0 and float(f.gate.weight.grad.abs().sum()) > 0
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in mods.core_params())
    flags = mods.learned_flags()
    assert flags.tolist() == [False, True, True, True, True]   # the visitors' gates are kept by the isolation


def test_gated_key_checks_run_key_and_partial(tmp_path, monkeypatch):
    E, parser = _setup(tmp_path, monkeypatch, steps=4)
    O = dict(schedule="ordered", p_cr=1.0, p_as=0.0, p_other=0.5, module_embed="topic_rows", gated=True)
    E.check_candidates([dict(O, aux_ratio=2.0), dict(O, p_other=1.0), dict(O)])
    with pytest.raises(ValueError, match=r"candidates\[0\]: modules.gated must be true or false"):
        E.check_candidates([dict(O, gated=1)])
    with pytest.raises(ValueError, match=r"candidates\[0\]: modules.gated .* no lam, quiet or own_alone"):
        E.check_candidates([dict(O, lam=1.0)])
    with pytest.raises(ValueError, match=r"candidates\[0\]: modules.gated .* needs modules.schedule 'ordered'"):
        E.check_candidates([dict(gated=True)])
    with pytest.raises(ValueError, match="gated has its own"):
        E.ordered_module_loss(None, None, 0, lam=1.0, gated=True)
    # absent by default: earlier run keys unchanged; ungated is another run; the partial model is ungated
    check_ordered_key(E, parser, tmp_path, "gated", dict(aux_ratio=2.0, gated=True, module_embed="topic_rows"),
                      lambda mc: {k: v for k, v in mc.items() if k != "gated"})


def test_gated_forward_keeps_no_gate_or_graph_alive_after_it():
    """The last block's gates (kept for the delta's logit term) are dropped at the end of the forward:
    the ModuleSet holds no tensor (nor the graph behind it) until the next forward."""
    import gc
    import weakref
    model = gpt()
    mods = _gated(model)
    seen = []
    last = mods.blocks[-1][1]
    h = last.register_forward_pre_hook(lambda m, a: seen.append(weakref.ref(a[0])))
    for ctx in (mods.using(on=["forest"]), mods.route([0, GENERAL, 2, 3])):
        seen.clear()
        with ctx:
            out = model(ids())[0]
        assert out.requires_grad
        del out
        gc.collect()
        assert seen and seen[0]() is None, "the last block's input is still alive after the forward"
    h.remove()
