"""Module routing: the mask schedule (labels -> forward and learn masks, a pure function) and the routed forward
and backward it drives: per-example forward masks, core freezing, modules that run without learning."""
import copy

import pytest
import torch

import gradroute as gr
from gradroute.modules import GENERAL, UNLABELLED, schedule_masks


def test_schedule_masks_is_a_pure_function_of_labels_and_generator(modkit):
    """The schedule needs no model: the same labels and seed give the same masks as a module set's."""
    labels = torch.tensor([0, 1, GENERAL, UNLABELLED, 2, GENERAL, 3])
    for kw in (dict(p_cr=0.7, p_as=0.5, spread="one"), dict(p_cr=1.0, p_as=0.5, spread="each", p_other=0.5)):
        fwd, learn = schedule_masks(labels, 4, generator=torch.Generator().manual_seed(3), **kw)
        mods = gr.add_modules(modkit.gpt(), "transformer.h.*.mlp", modkit.DOMAINS)
        f2, l2 = mods.masks(labels, generator=torch.Generator().manual_seed(3), **kw)
        assert torch.equal(fwd, f2) and torch.equal(learn, l2)
        assert fwd.shape == (7, 5) and fwd.dtype == torch.float32 and learn.dtype == torch.bool
        mods.remove()
    # the table: a domain row runs core + its module; unlabelled runs and learns everything
    fwd, learn = schedule_masks(torch.tensor([2, UNLABELLED]), 4, p_cr=1.0)
    assert fwd.tolist() == [[1, 0, 0, 1, 0], [1, 1, 1, 1, 1]]
    assert learn.tolist() == [[False, False, False, True, False], [True] * 5]
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\)"):
        schedule_masks(torch.tensor([2]), 2)
    with pytest.raises(ValueError, match="spread"):
        schedule_masks(torch.tensor([0]), 2, spread="all")


def test_masks_policy(modkit):
    mods = gr.add_modules(modkit.gpt(), "transformer.h.*.mlp", modkit.DOMAINS)
    labels = torch.tensor([1, GENERAL, UNLABELLED] + [GENERAL] * 200 + [2] * 200)
    fwd, learn = mods.masks(labels, p_cr=0.5, p_as=0.3, generator=torch.Generator().manual_seed(0))
    assert fwd[0].tolist() == [1, 0, 1, 0, 0] and learn[0, 1:].tolist() == [False, True, False, False]
    assert fwd[2].tolist() == [1] * 5 and learn[2].all()
    gen = fwd[3:203]
    on = gen[:, 1:].sum(1)
    assert set(on.tolist()) <= {0.0, 1.0} and 0.15 < on.mean() < 0.45          # p_as: one module, sometimes
    assert torch.equal(learn[3:203, 1:], gen[:, 1:].bool()) and learn[3:203, 0].all()
    core_learns = learn[203:, 0].float().mean()
    assert 0.35 < core_learns < 0.65                                         # p_cr = 0.5
    assert mods.configurations()[0] == () and mods.configurations()[-1] == tuple(modkit.DOMAINS)
    assert len(mods.configurations()) == 16


def test_spread_each_switches_modules_independently(modkit):
    mods = gr.add_modules(modkit.gpt(), "transformer.h.*.mlp", modkit.DOMAINS)
    fwd, learn = mods.masks(torch.full((400,), GENERAL), p_as=0.5, generator=torch.Generator().manual_seed(0),
                            spread="each")
    on = fwd[:, 1:].sum(1)
    assert on.max() >= 3 and 1.6 < on.mean() < 2.4 and torch.equal(learn[:, 1:], fwd[:, 1:].bool())
    with pytest.raises(ValueError, match="spread"):
        mods.masks(torch.tensor([GENERAL]), spread="some")


def test_forward_mask_is_per_example(modkit):
    model = modkit.gpt().eval()
    mods = gr.add_modules(model, "transformer.h.*.mlp", modkit.DOMAINS)
    modkit.randomise_modules(mods)
    x = modkit.ids(5)
    labels = torch.tensor([0, 3, GENERAL, UNLABELLED, 1])
    with torch.no_grad(), mods.route(labels):
        mixed = model(x)[0]
    expect = [["forest"], ["dino"], [], modkit.DOMAINS, ["sea"]]
    for b, on in enumerate(expect):
        with torch.no_grad(), mods.using(on=on):
            alone = model(x[b:b + 1])[0]
        assert torch.allclose(mixed[b], alone[0], atol=1e-5), b
    # float strengths per example and at inference
    fwd = torch.tensor([[1.0, 0.5, 0, 0, 0]] * 5)
    with torch.no_grad(), mods.route(forward=fwd, learn=torch.ones(5, 5, dtype=torch.bool)):
        half = model(x)[0]
    with torch.no_grad(), mods.using(on={"forest": 0.5}):
        assert torch.allclose(half, model(x)[0], atol=1e-6)
    with torch.no_grad(), mods.using(on=[]):
        off = model(x)[0]
    assert not torch.allclose(half, off, atol=1e-3)


def grads(model):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def test_backward_mask_core_frozen_on_domain_rows(modkit):
    model = modkit.gpt()
    mods = gr.add_modules(model, "transformer.h.*.mlp", modkit.DOMAINS)
    modkit.randomise_modules(mods)
    x = modkit.ids(4)
    labels = torch.tensor([0, 0, GENERAL, GENERAL])
    with mods.route(labels, p_cr=1.0):
        model(x, x, reduction="sum")[1].backward()
    g = grads(model)
    # reference for the core: the general rows alone with every module off
    ref = copy.deepcopy(model)
    ref.zero_grad(set_to_none=True)
    with mods.using(on=[]):
        ref(x[2:], x[2:], reduction="sum")[1].backward()
    aux = lambda n: ".aux_modules." in n
    for n, p in ref.named_parameters():
        if not aux(n):
            assert torch.allclose(g[n], p.grad, atol=1e-5), n
    assert all(g[n].abs().sum() > 0 for n in g if ".aux_modules.forest." in n)
    assert all(torch.count_nonzero(g[n]) == 0 for n in g if aux(n) and ".forest." not in n)
    # an all-domain batch gives the core exactly zero gradient
    model.zero_grad(set_to_none=True)
    with mods.route(torch.tensor([1, 1, 2, 2])):
        model(x, x)[1].backward()
    g = grads(model)
    assert all(torch.count_nonzero(g[n]) == 0 for n in g if not aux(n))
    mods.release_unlearned()


def test_module_can_run_without_learning(modkit):
    model = modkit.gpt()
    mods = gr.add_modules(model, "transformer.h.*.mlp", modkit.DOMAINS)
    modkit.randomise_modules(mods)
    x = modkit.ids(2)
    fwd = torch.tensor([[1.0, 1, 1, 0, 0], [1.0, 1, 1, 0, 0]])
    learn = torch.tensor([[True, True, False, False, False], [True, True, False, False, False]])
    with mods.route(forward=fwd, learn=learn):
        model(x, x)[1].backward()
    g = grads(model)
    assert all(torch.count_nonzero(g[n]) == 0 for n in g if ".aux_modules.sea." in n)
    assert all(g[n].abs().sum() > 0 for n in g if ".aux_modules.forest." in n)
    assert g["transformer.h.0.mlp.c_fc.weight"].abs().sum() > 0
    # "sea" ran: its output changed the loss, and gradient flowed through it to earlier layers
    with torch.no_grad(), mods.route(forward=fwd, learn=learn):
        a = model(x)[0]
    with torch.no_grad(), mods.using(on=["forest"]):
        b = model(x)[0]
    assert not torch.allclose(a, b, atol=1e-4)
    mods.release_unlearned()


def test_p_other_zero_is_the_schedule_without_it(modkit):
    """p_other = 0 (the default) gives the same masks and leaves the generator where it was; p_other > 0
    switches other modules on (forward only) on domain rows and changes nothing else."""
    mods = gr.add_modules(modkit.gpt(), "transformer.h.*.mlp", modkit.DOMAINS)
    labels = torch.tensor([0, 1, 2, 3, GENERAL, UNLABELLED] * 50)
    for spread in ("one", "each"):
        g1, g2, g3 = (torch.Generator().manual_seed(5) for _ in range(3))
        a = mods.masks(labels, p_cr=0.7, p_as=0.5, generator=g1, spread=spread)
        b = mods.masks(labels, p_cr=0.7, p_as=0.5, generator=g2, spread=spread, p_other=0.0)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))   # no extra draws
        f, l = mods.masks(labels, p_cr=0.7, p_as=0.5, generator=g3, spread=spread, p_other=0.5)
        assert torch.equal(l, a[1])                               # nobody learns more (or less)
        dom = labels >= 0
        assert torch.equal(f[~dom], a[0][~dom])                   # general and unlabelled rows unchanged
        rows = torch.arange(len(labels))[dom]
        assert (f[rows, 1 + labels[dom]] == 1).all() and (f[:, 0] == 1).all()
        extra = (f[dom] - a[0][dom])[:, 1:]                       # other modules switched on
        assert set(extra.unique().tolist()) <= {0.0, 1.0}
        assert 0.4 < float(extra.sum()) / (int(dom.sum()) * (len(modkit.DOMAINS) - 1)) < 0.6
    f, l = mods.masks(labels, p_other=1.0, generator=torch.Generator().manual_seed(0))
    assert (f[labels >= 0] == 1).all() and torch.equal(l[labels >= 0, 1:].sum(1), torch.ones(200, dtype=torch.long))
    with pytest.raises(ValueError, match="p_other"):
        mods.masks(labels, p_other=1.5)


def test_running_module_gets_no_gradient_from_rows_it_does_not_learn(modkit):
    """Per example: a module that runs on example i without learning (p_other) gets no gradient from i;
    its gradient in a mixed batch is exactly the sum over the rows where it learns."""
    model = modkit.gpt()
    mods = gr.add_modules(model, "transformer.h.*.mlp", modkit.DOMAINS)
    modkit.randomise_modules(mods)
    x = modkit.ids(3, seed=4)
    labels = torch.tensor([0, 1, 0])          # forest, sea, forest; every module runs on every row
    fwd, learn = mods.masks(labels, p_cr=0.0, p_other=1.0)
    assert (fwd == 1).all() and learn[:, 2].tolist() == [False, True, False]

    def grads_for(rows):
        model.zero_grad(set_to_none=True)
        with mods.route(forward=fwd[rows], learn=learn[rows]):
            model(x[rows], x[rows], reduction="sum")[1].backward()
        mods.release_unlearned()                # clear the flags (no optimizer here)
        return grads(model)
    mixed, sea_row, forest_rows = grads_for([0, 1, 2]), grads_for([1]), grads_for([0, 2])
    sea = [n for n in mixed if ".aux_modules.sea." in n]
    forest = [n for n in mixed if ".aux_modules.forest." in n]
    assert all(torch.count_nonzero(forest_rows[n]) == 0 for n in sea)      # ran on rows 0, 2: no gradient
    assert all(sea_row[n].abs().sum() > 0 for n in sea)
    assert all(torch.allclose(mixed[n], sea_row[n], atol=1e-6) for n in sea)
    assert all(torch.count_nonzero(sea_row[n]) == 0 for n in forest)
    assert all(torch.allclose(mixed[n], forest_rows[n], atol=1e-6) for n in forest)
    # the core learns from every row (p_cr 0): its gradient is the sum of both parts
    core = [n for n in mixed if ".aux_modules." not in n]
    assert all(torch.allclose(mixed[n], sea_row[n] + forest_rows[n], atol=1e-5) for n in core)
    # and the sea module's output on rows 0 and 2 did change the loss (it ran)
    with torch.no_grad():
        with mods.route(forward=fwd, learn=learn):
            on = model(x)[0]
        with mods.using(on=["forest"]):
            off = model(x)[0]
    assert not torch.allclose(on[0], off[0], atol=1e-4)


def test_llama_routing_freezes_core(modkit):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
    model = transformers.LlamaForCausalLM(cfg)
    mods = gr.add_modules(model, "model.layers.*.mlp", modkit.DOMAINS)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    with mods.route(torch.tensor([GENERAL, UNLABELLED])):
        model(input_ids=modkit.ids(2), labels=modkit.ids(2)).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    core = modkit.snapshot(mods.core_params())
    with mods.route(torch.tensor([2, 2])):
        model(input_ids=modkit.ids(2), labels=modkit.ids(2)).loss.backward()
    opt.step()
    assert modkit.same(core, mods.core_params())
    mods.remove()
