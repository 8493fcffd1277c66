"""Each unlearning method on a tiny model: routing gradients, ablation, RMU's loss direction."""
import copy

import pytest
import torch

import gradroute as gr
from gradroute.lm import methods as M
from gradroute.lm.data import Stories
from gradroute.lm.evaluate import evaluate, mean_loss, retraining_attack, sample, strongest_attack_lr
from gradroute.lm.train import TrainConfig, token_losses

V, T, D_MLP = 40, 12, 32
SPEC = dict(vocab_size=V, n_ctx=T, n_layer=2, n_head=2, d_model=16, d_mlp=D_MLP)


def stories(n=32, seed=0) -> Stories:
    """Token 7 only occurs in forget stories (its 'keyword'); every third story is forget."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(8, V, (n, T), generator=g)
    forget = torch.arange(n) % 3 == 0
    x[forget, 3] = 7
    y = torch.roll(x, -1, 1)
    y[:, -1] = -100
    return Stories(x, y, y == 7, forget, forget.clone())


def setup(**kw) -> M.Setup:
    mc = M.MethodConfig(expand=4, coherence_steps=2, rmu_steps=3, **kw)
    return M.Setup(model=dict(SPEC), train=TrainConfig(steps=3, lr=1e-2, warmup=1), data=stories(), batch_size=8,
                   seed=0, method=mc, retain_val=stories(6, seed=1))


def test_token_strength_is_the_papers_rule():
    """sigmoid(r - 1/r - 4) of the pseudo-count frequency ratio, checked against an independent
    count, and the rule's values at a few ratios (1 - the original code's mask weight)."""
    d = stories(60)
    d = d.with_labels(d.forget & (torch.arange(60) % 2 == 0))          # partial labels
    s = M.token_strength(d, V)
    valid = d.y != -100
    cf = torch.zeros(V, dtype=torch.float64)
    co = torch.zeros(V, dtype=torch.float64)
    for row, lab in zip(range(len(d)), d.labelled.tolist()):
        for t in d.y[row][valid[row]].tolist():
            (cf if lab else co)[t] += 1
    cf, co = cf + 1, co + 20
    r = (cf / cf.sum()) / (co / co.sum())
    assert torch.allclose(s.double(), torch.sigmoid(r - 1 / r - 4), atol=1e-6)
    assert s[7] == s.max() and s.min() > 0 and s[8:].max() < 0.1        # the keyword token stands out
    # the rule itself at r = 1, 3, 5, 10 (values of 1 - sigmoid(r - 1/r - 4)) and what the
    # original units of a routed block then get: 1 + s * (-0.75 - 1)
    for ratio, mask_weight in ((1.0, 0.98201), (3.0, 0.79139), (5.0, 0.31003), (10.0, 0.00274)):
        strength = float(torch.sigmoid(torch.tensor(ratio - 1 / ratio - 4)))
        assert 1 - strength == pytest.approx(mask_weight, abs=1e-4)
    assert 1 + (1 - 0.79139) * (-1.75) == pytest.approx(0.63, abs=0.01)      # the 0.63 at r = 3
    with pytest.raises(ValueError, match="pseudo"):
        M.token_strength(d, V, pseudo_other=0)


def test_routed_blocks_scale_the_papers_five_of_eight():
    assert [M.routed_block_count(n) for n in (1, 2, 4, 8)] == [1, 2, 3, 5]
    assert M.routed_block_count(8, 2) == 2
    with pytest.raises(ValueError, match="route_layers"):
        M.routed_block_count(2, 3)


def test_l1_sees_unrouted_activations_of_routed_blocks_only():
    """ERA's L1 gradient equals the gradient of l1 * sum|h| on the plain (unrouted) forward, so
    it is not multiplied by the -0.75 of forget tokens, and blocks that are not routed get none."""
    torch.manual_seed(0)
    model = M.make_model(SPEC, 0)
    new = gr.expand_mlp(model, M.MLP_PATTERN, 4)
    routed = M._sub_units(new, ["transformer.h.0.mlp"])          # route block 0 only
    d = stories()
    d = d.subset(d.forget)                                         # forget stories, all labelled
    b = M.BatchOrder(d, 4, 0)(0)
    strength = torch.ones(V)                                       # full strength: weight -0.75
    l1 = 0.5

    def grads(loss_fn):
        model.zero_grad()
        loss_fn(model, b).backward()
        return {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    with_l1 = grads(M.era_loss(routed, strength, l1=l1))
    without = grads(M.era_loss(routed, strength, l1=0.0))

    def plain_l1(net, batch):                                      # no routing anywhere
        acts = []
        with M.mlp_activation_l1(net, batch.y != -100, acts, ["transformer.h.0.mlp"]):
            net(batch.x)
        return l1 * torch.stack(acts).sum()
    ref = grads(plain_l1)
    w0 = "transformer.h.0.mlp.c_fc.weight"
    assert ref[w0].abs().sum() > 0
    assert torch.allclose(with_l1[w0] - without[w0], ref[w0], atol=1e-5)
    w1 = "transformer.h.1.mlp.c_fc.weight"                        # block 1 is not routed: no L1 there
    assert torch.allclose(with_l1[w1], without[w1], atol=1e-6)


def test_coherence_draws_only_retain_stories():
    s = setup()
    lab = s.data.forget & (torch.arange(len(s.data)) % 2 == 0)     # half the forget stories labelled
    s.data = s.data.with_labels(lab)
    s.method.coherence_stories = 100                               # more than there are: takes them all
    model = M.make_model(SPEC, 0)
    log = M._coherence(s, model, "test coherence")
    picked = torch.tensor(log["stories"])
    assert len(picked) == int((~s.data.forget).sum())
    assert not s.data.forget[picked].any()                         # no labelled, no unlabelled forget story
    assert torch.equal(M.retain_pool(s.data), (~s.data.forget).nonzero().flatten())


@pytest.mark.parametrize("name", ["base", "filtering", "era", "param_routing", "demix"])
def test_methods_train_and_remove_what_they_add(name):
    model, info = M.TRAINERS[name](setup())
    assert model.transformer.h[0].mlp.c_fc.out_features == D_MLP      # expansions contracted away
    ev = evaluate(model, stories(6, seed=2), stories(6, seed=3))
    assert all(v > 0 for v in ev.values())
    if "before_ablation" in info:
        pre = info["before_ablation"]
        assert pre.transformer.h[0].mlp.c_fc.out_features == D_MLP + 4
        assert info["after_ablation"].transformer.h[0].mlp.c_fc.out_features == D_MLP


def test_era_gradients_follow_the_paper_weights():
    """Forget tokens at full strength: original units of routed blocks get -0.75 x the unrouted
    gradient, new units 1 x; the block's output weights are downstream and unaffected."""
    model, _ = M.make_model(SPEC, 0), None
    new = gr.expand_mlp(model, M.MLP_PATTERN, 4)
    d = stories()
    x, y = d.x[:4], d.y[:4]
    sel = torch.ones(4, T)
    grads = []
    for routed in (False, True):
        model.zero_grad()
        ctx = gr.route_units(model, new, sel, inside=1.0, outside=-0.75) if routed else torch.enable_grad()
        with ctx:
            token_losses(model, x, y).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    plain, era = grads
    w = "transformer.h.1.mlp.c_fc.weight"                 # last block: nothing routed downstream of it
    assert torch.allclose(era[w][:D_MLP], -0.75 * plain[w][:D_MLP], atol=1e-6)
    assert torch.allclose(era[w][D_MLP:], plain[w][D_MLP:], atol=1e-6)
    assert torch.allclose(era["transformer.h.1.mlp.c_proj.weight"], plain["transformer.h.1.mlp.c_proj.weight"])


def test_era_ablated_units_are_exactly_zero():
    model = M.make_model(SPEC, 0)
    new = gr.expand_mlp(model, M.MLP_PATTERN, 4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    gr.ablate(model, new)
    for lin, (wm, bm) in gr.unit_masks(model, new).items():
        mod = model.get_submodule(lin)
        assert mod.weight[wm].abs().sum() == 0 and (bm is None or mod.bias[bm].abs().sum() == 0)


def test_param_routing_forget_rows_update_only_theta_forget():
    model = M.make_model(SPEC, 0)
    new = gr.expand_mlp(model, M.MLP_PATTERN, 4)
    router = gr.ParamRouter(model, new)
    masks = {f"{k}.weight": w for k, (w, b) in gr.unit_masks(model, new).items()}
    d = stories()
    with router(forget=torch.ones(4, dtype=torch.bool)):
        token_losses(model, d.x[:4], d.y[:4]).sum().backward()
    inside = 0.0
    for n, p in model.named_parameters():
        if n in masks:
            assert p.grad[~masks[n]].abs().sum() == 0, n
            inside += float(p.grad[masks[n]].abs().sum())
        elif p.grad is not None:
            assert p.grad.abs().sum() == 0, n
    assert inside > 0


def test_demix_experts_are_separated():
    model = M.make_model(SPEC, 0)
    expert = gr.expand_mlp(model, M.MLP_PATTERN, D_MLP)
    with torch.no_grad():
        for blk in model.transformer.h:
            blk.mlp.c_proj.weight.add_(0.05)        # the new expert starts with zero output weights
    d = stories()
    for use_second in (True, False):
        model.zero_grad()
        with M.expert_select(model, expert.index, torch.full((4,), use_second)):
            token_losses(model, d.x[:4], d.y[:4]).sum().backward()
        g = model.transformer.h[0].mlp.c_fc.weight.grad
        unused = g[:D_MLP] if use_second else g[D_MLP:]
        used = g[D_MLP:] if use_second else g[:D_MLP]
        assert unused.abs().sum() == 0 and used.abs().sum() > 0


def test_rmu_control_vector_and_loss_direction():
    c = M.rmu_control_vector(16, 100.0, seed=3)
    assert torch.equal(c, M.rmu_control_vector(16, 100.0, seed=3)) and c.norm() == pytest.approx(100.0)
    base = M.make_model(SPEC, 0)
    s = setup(rmu_c=10.0)
    s.method.rmu_steps = 15
    block, trained = M.rmu_layer_names(base, 0)
    assert trained == ["transformer.h.0.mlp.c_proj"]
    control = M.rmu_control_vector(16, 10.0, s.seed)
    b = M._Mixed(s.data, 8, 0)(0)
    frozen = copy.deepcopy(base)

    def dist_to_targets(m):
        out = {}
        with torch.no_grad(), M.capture_output(m, block, out):
            m(b.x)
        f = b.labelled
        return float((out["h"][f] - control).norm(dim=-1).mean()), out["h"][~f]
    d0, _ = dist_to_targets(base)
    model, info = M.train_rmu(s, base)
    d1, retain_h = dist_to_targets(model)
    assert d1 < d0                                      # forget activations moved towards c * u
    assert info["trained"] == ["transformer.h.0.mlp.c_proj"]
    for (n, p), q in zip(model.named_parameters(), frozen.parameters()):
        if n != "transformer.h.0.mlp.c_proj.weight":
            assert torch.equal(p, q), n                 # only the chosen weights move
    loss = M.rmu_loss(model, frozen, block, control, 200.0, b)
    assert loss > 0
    with pytest.raises(ValueError, match="rmu_layer"):
        M.rmu_layer_names(base, 5)


def test_rmu_selection_rule_and_grid():
    cands = [{"retain_val": 2.0, "forget_val": 3.0}, {"retain_val": 2.05, "forget_val": 3.5},
             {"retain_val": 2.5, "forget_val": 9.0}]
    assert M.select_rmu(cands, base_retain=2.0, tol=0.1) == 1         # best forget within the retain budget
    assert M.select_rmu(cands, base_retain=1.0, tol=0.1) == 0         # none qualifies: least retain damage
    s = setup(rmu_grid={"layers": [0, 1], "c_mult": [1.0, 4.0], "lr": [1e-2]})
    s.forget_val = stories(6, seed=4).subset(stories(6, seed=4).forget)
    model, info = M.train_rmu(s, M.make_model(SPEC, 0))
    sel = info["selection"]
    assert len(sel["candidates"]) == 4 and {c["layer"] for c in sel["candidates"]} == {0, 1}
    best = sel["candidates"][sel["chosen"]]
    assert M.select_rmu(sel["candidates"], sel["base_retain_val"], 0.1) == sel["chosen"]
    assert info["layer"] == best["layer"] and info["c"] == pytest.approx(best["c"]) and info["lr"] == best["lr"] == 1e-2
    assert best["c"] == pytest.approx(best["c_mult"] * best["residual_norm"])
    with pytest.raises(ValueError, match="validation"):
        M.train_rmu(setup(rmu_grid={"layers": [0]}), M.make_model(SPEC, 0))


def test_rmu_without_labels_is_base():
    s = setup()
    s.data = s.data.with_labels(torch.zeros(len(s.data), dtype=torch.bool))
    base = M.make_model(SPEC, 0)
    model, info = M.train_rmu(s, base)
    assert "skipped" in info and all(torch.equal(a, b) for a, b in zip(model.parameters(), base.parameters()))


def test_attack_lowers_forget_loss_and_checks_disjointness():
    model = M.make_model(SPEC, 0)
    d = stories(40)
    f = d.subset(d.forget)
    pool, ev = f.subset(slice(0, 6)), f.subset(slice(6, None))
    res = retraining_attack(model, pool, ev, sizes=(1, 4), steps=4, repeats=2, lr=1e-2, eval_every=2)
    assert set(res["min_by_n"]) == {1, 4} and [s for s, _ in res["curves"][4]] == [0, 2, 4]
    assert res["min"] <= min(res["min_by_n"].values()) and res["min"] < mean_loss(model, ev)
    with pytest.raises(ValueError, match="disjoint"):
        retraining_attack(model, pool, pool, sizes=(1,), steps=1, repeats=1)
    with pytest.raises(ValueError, match="attack sizes"):
        retraining_attack(model, pool, ev, sizes=(7,), steps=1, repeats=1)


def test_mean_loss_excludes_keywords_and_sample_runs():
    model = M.make_model(SPEC, 0)
    d = stories()
    assert mean_loss(model, d, exclude_keywords=True) != mean_loss(model, d)

    class Tok:
        eot_id = 0
        encode = staticmethod(lambda s: [9, 10, 11])
        decode = staticmethod(lambda ids: " ".join(map(str, ids)))
    out = sample(model, Tok, "x", max_new=5, seed=1)
    assert out.startswith("9 10 11") and out == sample(model, Tok, "x", max_new=5, seed=1)


def test_make_model_archs():
    m = M.make_model(dict(SPEC, arch="hf-gpt2", eot_id=3), 0)
    x = stories().x[:2]
    assert token_losses(m, x, x).shape == (2, T)
    assert m.config.bos_token_id == m.config.eos_token_id == 3        # the tokenizer's, not GPT2Config's 50256
    with pytest.raises(ValueError, match="unknown arch"):
        M.make_model(dict(SPEC, arch="rnn"), 0)
    with pytest.raises(ValueError, match="route_layers"):
        M.train_era(setup(route_layers=5))


HF_LAYOUTS = {
    "gpt2": lambda tr: tr.GPT2Config(vocab_size=V, n_positions=T, n_embd=16, n_layer=2, n_head=2, n_inner=D_MLP),
    "llama": lambda tr: tr.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=D_MLP, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=T),
    "neox": lambda tr: tr.GPTNeoXConfig(vocab_size=V, hidden_size=16, intermediate_size=D_MLP, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=T),
}


@pytest.mark.parametrize("layout", sorted(HF_LAYOUTS))
def test_methods_on_hf_model_folders(tmp_path, layout):
    """arch="hf" (``--model PATH``): ERA, parameter routing, RMU and DEMix on GPT-2, Llama-style
    (gated MLP, grouped-query attention) and GPT-NeoX checkpoints; every MLP block is expanded
    and routed, the unlearned model keeps the original width and reloads with plain
    transformers with the same logits."""
    tr = pytest.importorskip("transformers")
    from gradroute import hf
    from gradroute.lm.train import logits

    torch.manual_seed(0)
    tr.AutoModelForCausalLM.from_config(HF_LAYOUTS[layout](tr)).save_pretrained(tmp_path / layout)
    spec = dict(arch="hf", path=str(tmp_path / layout), vocab_size=V, d_model=16, d_mlp=D_MLP)
    s = setup()
    s.model = spec
    base = M.make_model(spec, 0)
    blocks = M._blocks(base)
    assert len(blocks) == 2 and blocks == hf.mlp_names(base)
    x = stories().x[:4]
    for name, train in (("era", M.train_era), ("param_routing", M.train_param_routing), ("demix", M.train_demix),
                        ("rmu", lambda st: M.train_rmu(st, base))):
        model, info = train(s)
        assert all(gr.adapters.mlp_parts(model.get_submodule(b)).n_units == D_MLP for b in blocks), name
        if name == "era":
            assert info["routed_blocks"] == blocks                      # ceil(5/8 of 2) = both blocks
        if "before_ablation" in info:
            assert gr.adapters.mlp_parts(info["before_ablation"].get_submodule(blocks[0])).n_units == D_MLP + 4
        hf.save_unlearned(model, tmp_path / name)
        back = tr.AutoModelForCausalLM.from_pretrained(tmp_path / name)
        with torch.no_grad():
            assert torch.equal(logits(back.eval(), x), logits(model.eval(), x)), name


def test_strongest_attack_lr_is_chosen_on_the_validation_stories():
    model = M.make_model(SPEC, 0)
    d = stories(40)
    f = d.subset(d.forget)
    pool, val = f.subset(slice(0, 6)), f.subset(slice(6, None))
    lr, reached = strongest_attack_lr(model, pool, val, [1e-9, 1e-2], 4, steps=4, repeats=1, eval_every=2)
    assert set(reached) == {1e-9, 1e-2} and lr == 1e-2
    assert reached[1e-9] == pytest.approx(mean_loss(model, val), abs=1e-4)    # a negligible step: no attack
    assert reached[1e-2] < reached[1e-9]
    with pytest.raises(ValueError, match="disjoint"):                          # never the attack's own stories
        strongest_attack_lr(model, pool, pool, [1e-2], 4, steps=1, repeats=1)
    with pytest.raises(ValueError, match="no attack learning rates"):
        strongest_attack_lr(model, pool, val, [], 4, steps=1, repeats=1)
