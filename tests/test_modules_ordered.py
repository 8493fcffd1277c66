"""The experiment's ordered schedule (``--schedule ordered``; ours, after the official
``do_routed_ordered``; docs/modules.md diagnosis point 13): phase 1 trains the core alone, phase 2
the modules alone with the core frozen, through the one training loop."""
import math

import pytest
import torch

from gradroute.lm.data import Batch
from test_modules import _same, _snapshot, _tiny_experiment, randomise_modules


def _setup(tmp_path, monkeypatch, steps=6):
    E, parser = _tiny_experiment(tmp_path, monkeypatch, steps=steps, curve_points=2,
                                 modules=dict(width=0.25, p_cr=0.7, p_as=0.5, spread="one"), attack_rounds=1)
    monkeypatch.setitem(E.PROFILES["quick"], "vocab_size", 600)   # at 300 every token occurs in general stories
    return E, parser


def check_ordered_key(E, parser, tmp_path, key, updates, other_modules, p_other="0.5"):
    """An ordered-schedule option ``key``: absent from default configs (earlier run keys unchanged); set
    with ``updates`` it trains and reaches the run key; ``other_modules(modules config)`` is another run;
    the single-phase partial-label model drops it. Returns (config, output folder, the modular run)."""
    cfg = E.build_config(parser.parse_args(["--out", "x", "--schedule", "ordered", "--p-other", p_other]))
    assert key not in cfg["modules"]
    cfg["modules"].update(updates, partial=dict(p_cr=1.0, p_as=0.2, spread="one", p_other=0.0))
    out = tmp_path / "o"
    r = E.run_train("modular", 0, cfg, out)
    assert r["config"]["modules"][key] == updates[key] and math.isfinite(r["train_loss_final"])
    other = {**cfg, "modules": other_modules(cfg["modules"])}
    done, todo = E.split_finished([("modular", 0)], lambda m, s: E._run_path(out, m, s), E.train_config(other),
                                  verbose=False)
    assert todo == [("modular", 0)] and not done
    p = E.run_train("modular_partial", 0, cfg, out)            # single phase: the option is dropped
    assert "ordered_steps" not in p and "ordered_steps" in r
    return cfg, out, r


def _without(key):
    return lambda mc: {k: v for k, v in mc.items() if k != key}


def test_phases_split_exactly_the_single_phase_batches(tmp_path, monkeypatch):
    E, parser = _setup(tmp_path, monkeypatch)
    cfg = E.build_config(parser.parse_args(["--out", "x"]))
    _, data, labels, _, _ = E._prepare(E._cfg_key(cfg))
    unl = E.unlabelled_subset(len(labels), 0.5, 0)
    for hidden in (None, unl):
        rl = E.routing_labels(labels, hidden)
        order = E._order(cfg, data, 0)
        one, two = E.ordered_phases(order, rl, 6)
        assert all((rl[b] < 0).all() for b in one) and all((rl[b] >= 0).all() for b in two)
        single = torch.cat([order.indices(s) for s in range(6)]).sort().values
        assert torch.equal(torch.cat([*one, *two]).sort().values, single)      # the same stories, once each
        if hidden is not None:                                                 # hidden labels train the core
            assert any(bool((rl[b] == E.UNLABELLED).any()) for b in one)


def _ordered_model(tmp_path, monkeypatch, gated=False):
    """A tiny modular model with topic-row deltas (and gates if ``gated``) and randomised modules (so
    weight decay or a stray step would move them), with its experiment, config, data and routing labels."""
    E, parser = _setup(tmp_path, monkeypatch)
    cfg = E.build_config(parser.parse_args(["--out", "x"]))
    tok, data, labels, _, _ = E._prepare(E._cfg_key(cfg))
    rl = E.routing_labels(labels, None)
    model = E.make_model(E._spec(cfg, tok.vocab_size), 0)
    rows = E.embed_rows_for("topic_rows", data, rl, tok.vocab_size)
    mods = E.attach_modules(model, cfg, "modular", module_embed="topic_rows", embed_rows=rows, gated=gated)
    randomise_modules(mods)
    return E, cfg, model, mods, data, rl


def test_phase1_never_updates_modules_phase2_never_updates_the_core(tmp_path, monkeypatch):
    E, cfg, model, mods, data, rl = _ordered_model(tmp_path, monkeypatch)
    mod, core = mods.module_params(), mods.core_params()
    snaps, calls = [], []
    real = E.train

    def spy(m, batch_at, c, **kw):
        before = (_snapshot(core), _snapshot(mod))
        log = real(m, batch_at, c, **kw)
        snaps.append((before, (_snapshot(core), _snapshot(mod))))
        calls.append([batch_at(s).index for s in range(c.steps)])
        return log
    monkeypatch.setattr(E, "train", spy)
    res = E.train_ordered(model, mods, data, E._order(cfg, data, 0), rl, dict(cfg["train"]), 0, p_other=0.5)
    assert len(snaps) == 2 and res["steps"] == [len(calls[0]), len(calls[1])]
    (c0, m0), (c1, m1) = snaps[0]
    assert _same(m0, m1), "phase 1 moved a module"
    assert not _same(c0, c1), "phase 1 did not train the core"
    (c1b, m1b), (c2, m2) = snaps[1]
    assert _same(c1b, c2), "phase 2 moved the core"
    assert all(not torch.equal(a, b) for a, b in zip(m1b, m2)), "phase 2 left a module (or delta) unchanged"
    assert all((rl[i] < 0).all() for i in calls[0]) and all((rl[i] >= 0).all() for i in calls[1])
    for p in model.parameters():             # the loop gives back every parameter trainable
        assert p.requires_grad


def test_ordered_flag_config_run_key_and_candidates(tmp_path, monkeypatch):
    E, parser = _setup(tmp_path, monkeypatch, steps=4)
    build = lambda *a: E.build_config(parser.parse_args(["--out", "x", *a]))["modules"]
    assert "schedule" not in build()                                   # default configs unchanged
    m = build("--schedule", "ordered")
    assert m["schedule"] == "ordered" and m["p_cr"] == 1.0 and m["p_as"] == 0.0 and "select" not in m
    assert "schedule" not in build("--schedule", "single")
    with pytest.raises(ValueError, match="needs p_cr 1.0 and p_as 0.0"):
        build("--schedule", "ordered", "--p-cr", "0.7")
    with pytest.raises(ValueError, match="modules.schedule must be one of"):
        E._schedule({"schedule": "two-phase"})
    E.check_candidates([dict(schedule="ordered", p_cr=1.0, p_as=0.0, p_other=0.5, module_embed="topic_rows")])
    with pytest.raises(ValueError, match=r"candidates\[0\]: modules.schedule must be one of"):
        E.check_candidates([dict(schedule="two-phase")])
    with pytest.raises(ValueError, match=r"candidates\[0\]: .*needs p_cr 1.0 and p_as 0.0"):
        E.check_candidates([dict(schedule="ordered")])           # would inherit the profile's p_cr 0.7
    common = ["--out", str(tmp_path / "o"), "--workers", "1", "--methods", "modular", "--no-attack"]
    single = E.run(parser.parse_args([*common, "--p-cr", "1.0", "--p-as", "0.0"]))
    run_file = tmp_path / "o" / "runs" / "modular_s0.json"
    assert "schedule" not in E.read_json(run_file)["config"]["modules"]
    ordered = E.run(parser.parse_args([*common, "--schedule", "ordered"]))
    r = E.read_json(run_file)
    assert r["config"]["modules"]["schedule"] == "ordered"                # retrained under its own key
    assert len(r["ordered_steps"]) == 2 and min(r["ordered_steps"]) > 0
    assert ordered["runs"]["modular_s0"]["configs"] != single["runs"]["modular_s0"]["configs"]


# ---- diagnosis point 14 (A): general stories in phase 2 (``modules.aux_ratio``, the official core_aux_ratio)
def test_aux_ratio_phase2_takes_the_same_batch_general_rows(tmp_path, monkeypatch):
    E, parser = _setup(tmp_path, monkeypatch)
    cfg = E.build_config(parser.parse_args(["--out", "x"]))
    _, data, labels, _, _ = E._prepare(E._cfg_key(cfg))
    rl = E.routing_labels(labels, E.unlabelled_subset(len(labels), 0.5, 0))
    order = E._order(cfg, data, 0)
    one0, two0 = E.ordered_phases(order, rl, 6)
    one, two = E.ordered_phases(order, rl, 6, aux_ratio=2.0)
    assert all(torch.equal(a, b) for a, b in zip(one0, one))                  # phase 1 unchanged
    assert len(two) == len(two0) and any(len(b) > len(b0) for b, b0 in zip(two, two0))
    s = 0
    for b0, b in zip(two0, two):
        while not bool(torch.isin(b0, order.indices(s)).all()):
            s += 1
        batch = order.indices(s)
        n_gen = int((rl[batch] == E.GENERAL).sum())
        assert torch.equal(b[:len(b0)], b0)                                     # topic rows first, as before
        aux = b[len(b0):]
        assert len(aux) == min(n_gen, round(2.0 * len(b0)))
        assert (rl[aux] == E.GENERAL).all() and bool(torch.isin(aux, batch).all())   # labelled general, same batch
        s += 1


def test_aux_masks_one_module_per_general_row_and_gradient_only_to_it(tmp_path, monkeypatch):
    E, parser = _setup(tmp_path, monkeypatch)
    cfg = E.build_config(parser.parse_args(["--out", "x"]))
    tok, data, labels, _, _ = E._prepare(E._cfg_key(cfg))
    model = E.make_model(E._spec(cfg, tok.vocab_size), 0)
    mods = E.attach_modules(model, cfg, "modular")
    G = E.GENERAL
    lab = torch.tensor([2, 0, G, G, G, G, G])
    fwd, learn = E.aux_masks(mods, lab, torch.Generator().manual_seed(0))
    ref_f, ref_l = mods.masks(lab[:2], 1.0, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(fwd[:2], ref_f) and torch.equal(learn[:2], ref_l)     # topic rows: point 13's masks
    assert not learn[:, 0].any() and (fwd[:, 0] == 1).all()                  # core runs, learns nowhere
    gen_mods = [int(r[1:].nonzero()) for r in fwd[2:]]                        # exactly one module per general row
    assert gen_mods == [2, 0, 2, 0, 2] and torch.equal(learn[2:, 1:], fwd[2:, 1:].bool())
    # a batch of forest (0) rows and general rows: the gradient reaches module 0 only, never the core
    randomise_modules(mods)
    rl = E.routing_labels(labels, None)
    idx = torch.cat([(rl == 0).nonzero().flatten()[:2], (rl == G).nonzero().flatten()[:4]])
    loss_fn = E.ordered_module_loss(mods, rl, 0, p_other=0.0, aux_ratio=2.0)
    b = Batch(data.x[idx], data.y[idx], data.keyword[idx], data.forget[idx], data.labelled[idx], idx, 1)
    model.zero_grad(set_to_none=True)
    loss_fn(model, b).backward()
    for k, d in enumerate(E.TOPIC_NAMES):
        g = [p.grad for p in mods.module_params(d)]
        moved = any(x is not None and bool(x.abs().sum() > 0) for x in g)
        assert moved == (k == 0), d
    assert all(p.grad is None or not bool(p.grad.abs().sum() > 0) for p in mods.core_params())


def test_aux_ratio_key_checks_and_run_key(tmp_path, monkeypatch):
    E, parser = _setup(tmp_path, monkeypatch, steps=4)
    O = dict(schedule="ordered", p_cr=1.0, p_as=0.0)
    E.check_candidates([dict(O, aux_ratio=2.0, module_embed="topic_rows")])
    with pytest.raises(ValueError, match=r"candidates\[0\]: modules.aux_ratio .* needs modules.schedule 'ordered'"):
        E.check_candidates([dict(aux_ratio=2.0)])
    with pytest.raises(ValueError, match=r"candidates\[0\]: modules.aux_ratio must be a number"):
        E.check_candidates([dict(O, aux_ratio=-1)])
    cfg = E.build_config(parser.parse_args(["--out", "x", "--schedule", "ordered"]))
    cfg["modules"]["aux_ratio"] = 2.0
    r = E.run_train("modular", 0, cfg, tmp_path / "o")
    assert r["config"]["modules"]["aux_ratio"] == 2.0                       # in the run key
    rows = r["ordered_phase2_rows"]
    assert rows["general"] > 0 and rows["general"] <= 2 * rows["topic"]


# ---- diagnosis point 14 (B): "leave others alone" (``modules.lam``; ours)
def _b_setup(tmp_path, monkeypatch):
    E, _, model, mods, data, rl = _ordered_model(tmp_path, monkeypatch)
    return E, model, mods, data, rl


def _grads(model, mods, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    nz = lambda ps: any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in ps)
    return {d: nz(mods.module_params(d)) for d in mods.domains}, nz(mods.core_params())


def test_leave_alone_kl_gradient_reaches_only_the_visitor(tmp_path, monkeypatch):
    E, model, mods, data, rl = _b_setup(tmp_path, monkeypatch)
    idx = (rl == 0).nonzero().flatten()[:3]                   # forest stories
    fwd = torch.zeros(3, 5)
    fwd[:, 0] = 1.0
    fwd[:, 1] = 1.0                                           # the own module runs (forest)
    fwd[:, 3] = 1.0                                           # space visits
    visit = E.visitors(fwd, rl[idx])
    assert visit[:, 2].all() and visit.sum() == 3             # only space is a visitor
    kl = E.leave_alone_kl(model, mods, data.x[idx], data.y[idx], fwd, visit)
    assert float(kl.detach()) > 0
    mod_g, core_g = _grads(model, mods, kl)
    assert mod_g == {"forest": False, "sea": False, "space": True, "dinosaurs": False} and not core_g
    delta = mods.module_params("space")[-1]                     # the visitor's embedding delta learns too
    assert delta.grad is not None and bool(delta.grad.abs().sum() > 0)
    # the reference is the model without the visitor: a visitor that is a no-op has zero KL
    with torch.no_grad():
        for p in mods.module_params("space"):
            p.zero_()
    assert abs(E.leave_alone_kl(model, mods, data.x[idx], data.y[idx], fwd, visit).item()) < 1e-4


def test_leave_alone_on_own_stories_is_the_lm_loss_and_lam_reaches_the_run_key(tmp_path, monkeypatch):
    E, model, mods, data, rl = _b_setup(tmp_path, monkeypatch)
    idx = torch.cat([(rl == 0).nonzero().flatten()[:2], (rl == 2).nonzero().flatten()[:2]])
    b = Batch(data.x[idx], data.y[idx], data.keyword[idx], data.forget[idx], data.labelled[idx], idx, 1)
    plain = E.ordered_module_loss(mods, rl, 0)(model, b)                      # point 13's phase 2
    ours = E.ordered_module_loss(mods, rl, 0, lam=1.0)(model, b)              # no visitors: the same objective
    assert torch.allclose(plain, ours)
    g_plain = _grads(model, mods, E.ordered_module_loss(mods, rl, 0)(model, b))
    g_ours = _grads(model, mods, E.ordered_module_loss(mods, rl, 0, lam=1.0)(model, b))
    assert g_plain == g_ours == ({"forest": True, "sea": False, "space": True, "dinosaurs": False}, False)
    # with general rows (aux_ratio) and lam: the LM term stays the own stories'; general rows add the KL
    gidx = torch.cat([idx, (rl == E.GENERAL).nonzero().flatten()[:4]])
    bg = Batch(data.x[gidx], data.y[gidx], data.keyword[gidx], data.forget[gidx], data.labelled[gidx], gidx, 1)
    with_kl = E.ordered_module_loss(mods, rl, 0, aux_ratio=2.0, lam=1.0)(model, bg)
    twice = E.ordered_module_loss(mods, rl, 0, aux_ratio=2.0, lam=2.0)(model, bg)
    assert with_kl.item() > plain.item() and torch.allclose(twice - with_kl, with_kl - plain, rtol=1e-4)
    with pytest.raises(ValueError, match=r"candidates\[0\]: modules.lam .* needs modules.schedule 'ordered'"):
        E.check_candidates([dict(lam=1.0)])
    with pytest.raises(ValueError, match="modules.lam must be a number"):
        E._lam({"lam": -1})
    E.check_candidates([dict(schedule="ordered", p_cr=1.0, p_as=0.0, lam=1.0, aux_ratio=2.0, p_other=0.5)])


def test_lam_run_trains_and_records_its_key(tmp_path, monkeypatch):
    E, parser = _setup(tmp_path, monkeypatch, steps=4)
    cfg = E.build_config(parser.parse_args(["--out", "x", "--schedule", "ordered", "--p-other", "0.5"]))
    cfg["modules"].update(aux_ratio=2.0, lam=1.0, partial=dict(p_cr=1.0, p_as=0.2, spread="one", p_other=0.0))
    r = E.run_train("modular", 0, cfg, tmp_path / "o")
    assert r["config"]["modules"]["lam"] == 1.0 and r["config"]["modules"]["aux_ratio"] == 2.0
    assert math.isfinite(r["train_loss_first"]) and math.isfinite(r["train_loss_final"])
    p = E.run_train("modular_partial", 0, cfg, tmp_path / "o")        # stays single-phase: the options are dropped
    assert "ordered_steps" not in p and "ordered_steps" in r


# ---- diagnosis point 15: the own module learns its topic alone (``modules.own_alone``; ours)
def _module_grads(model, mods, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    g = {d: [None if p.grad is None else p.grad.clone() for p in mods.module_params(d)] for d in mods.domains}
    core = [p.grad for p in mods.core_params() if p.grad is not None and bool(p.grad.abs().sum() > 0)]
    return g, core


def _close(a, b):
    z = lambda t, r: torch.zeros_like(r) if t is None else t
    return all(torch.allclose(z(x, y if y is not None else x), z(y, x if x is not None else y), atol=1e-6, rtol=1e-4)
               for x, y in zip(a, b))


def _zero(gs):
    return all(g is None or not bool(g.abs().sum() > 0) for g in gs)


def _forest_rows(data, rl, n=3):
    """The first ``n`` forest stories as one batch (their indices, the batch)."""
    idx = (rl == 0).nonzero().flatten()[:n]
    return idx, Batch(data.x[idx], data.y[idx], data.keyword[idx], data.forget[idx], data.labelled[idx], idx, 1)


def _forest_alone_lm(E, model, mods, b):
    """The LM loss of forest rows with core + the forest module alone, only the forest module learning."""
    alone = torch.zeros(len(b.x), 1 + len(mods.domains))
    alone[:, :2] = 1.0
    learn = torch.zeros_like(alone, dtype=torch.bool)
    learn[:, 1] = True
    with mods.route(forward=alone, learn=learn):
        return E.token_losses(model, b.x, b.y).sum()


def test_own_alone_lm_gradient_is_the_model_with_visitors_off_and_visitors_learn_only_the_kl(tmp_path, monkeypatch):
    E, model, mods, data, rl = _b_setup(tmp_path, monkeypatch)
    idx, b = _forest_rows(data, rl)                            # p_other 1: the others all visit
    loss = E.ordered_module_loss(mods, rl, 0, p_other=1.0, lam=1.0, own_alone=True)(model, b)
    ours, core = _module_grads(model, mods, loss)
    assert not core                                            # the core learns nowhere
    alone = torch.zeros(3, 5)
    alone[:, :2] = 1.0                                         # core + forest: the usefulness configuration
    with mods.route(forward=alone, learn=alone.bool() & torch.tensor([False, True, False, False, False])):
        lm = E.token_losses(model, b.x, b.y).sum()
    fwd = torch.ones(3, 5)
    visit = E.visitors(fwd, rl[idx])
    kl = E.leave_alone_kl(model, mods, b.x, b.y, fwd, visit)   # its own no_grad reference
    assert torch.allclose(loss, lm + kl, rtol=1e-5)
    g_lm, _ = _module_grads(model, mods, lm)
    g_kl, _ = _module_grads(model, mods, kl)
    assert _close(ours["forest"], g_lm["forest"]) and not _zero(ours["forest"])   # the LM gradient, visitors off
    for d in ("sea", "space", "dinosaurs"):                    # visitors: the KL gradient only
        assert _close(ours[d], g_kl[d]) and not _zero(ours[d]) and _zero(g_lm[d])
    assert _zero(g_kl["forest"])
    # point 14's objective (own module next to the visitors) gives the forest module another gradient
    old, _ = _module_grads(model, mods, E.ordered_module_loss(mods, rl, 0, p_other=1.0, lam=1.0)(model, b))
    assert not _close(old["forest"], ours["forest"])
    # mixed batch (two topics, general rows via aux_ratio): the gradient is LM (visitors off) + lam x KL
    gidx = torch.cat([idx[:2], (rl == 1).nonzero().flatten()[:2], (rl == E.GENERAL).nonzero().flatten()[:4]])
    bg = Batch(data.x[gidx], data.y[gidx], data.keyword[gidx], data.forget[gidx], data.labelled[gidx], gidx, 1)
    lab = rl[gidx]
    mixed, core = _module_grads(model, mods, E.ordered_module_loss(mods, rl, 0, p_other=1.0, aux_ratio=2.0, lam=3.0,
                                                                   own_alone=True)(model, bg))
    assert not core
    fwd, learn = E.aux_masks(mods, lab, E._step_generator(0, gidx), 1.0)
    visit = E.visitors(fwd, lab)
    assert visit[4:].any(1).all()                              # every general row has its visitor
    own = learn.clone()
    own[:, 1:] &= ~visit
    with mods.route(forward=E.without_visitors(fwd, visit), learn=own):
        lm = E.token_losses(model, bg.x, bg.y)[:4].sum()       # the LM loss of the four topic rows
    g_lm, _ = _module_grads(model, mods, lm)
    g_kl, _ = _module_grads(model, mods, 3.0 * E.leave_alone_kl(model, mods, bg.x, bg.y, fwd, visit))
    for d in mods.domains:
        s = [None if a is None and c is None else (0 if a is None else a) + (0 if c is None else c)
             for a, c in zip(g_lm[d], g_kl[d])]
        assert _close(mixed[d], s), d


def test_own_alone_key_checks_run_key_and_partial(tmp_path, monkeypatch):
    E, parser = _setup(tmp_path, monkeypatch, steps=4)
    O = dict(schedule="ordered", p_cr=1.0, p_as=0.0, lam=1.0, aux_ratio=2.0, p_other=0.5, module_embed="topic_rows")
    E.check_candidates([dict(O, own_alone=True)])
    with pytest.raises(ValueError, match=r"candidates\[0\]: modules.own_alone .* needs modules.schedule 'ordered' and "
                                         r"modules.lam > 0"):
        E.check_candidates([dict(O, own_alone=True, lam=0.0)])
    with pytest.raises(ValueError, match=r"candidates\[0\]: modules.own_alone .* needs"):
        E.check_candidates([dict(own_alone=True)])                # single phase
    with pytest.raises(ValueError, match=r"candidates\[0\]: modules.own_alone must be true or false"):
        E.check_candidates([dict(O, own_alone=1)])
    with pytest.raises(ValueError, match="needs lam > 0"):
        E.ordered_module_loss(None, None, 0, own_alone=True)
    # absent by default: point 14's runs keep their key; a run without it is not reused
    check_ordered_key(E, parser, tmp_path, "own_alone", dict(aux_ratio=2.0, lam=1.0, own_alone=True),
                      _without("own_alone"))


# ---- diagnosis point 16: one KL per visitor (``modules.kl`` "each"; ours)
def _pairwise_kl(E, model, mods, x, y, fwd, lab):
    """The reference, one (row, visitor) at a time in a Python loop: KL(own module alone || own + v)."""
    visit = E.visitors(fwd, lab)
    total, per = 0.0, {}
    for r, v in visit.nonzero().tolist():
        only = torch.zeros_like(visit[r:r + 1])
        only[0, v] = True
        f = E.without_visitors(fwd[r:r + 1], visit[r:r + 1] & ~only)
        k = E.leave_alone_kl(model, mods, x[r:r + 1], y[r:r + 1], f, only)    # its own no_grad reference
        per[v] = per.get(v, 0.0) + k
        total = total + k
    return total, per


def test_kl_each_gives_each_visitor_the_gradient_of_its_own_pairwise_kl(tmp_path, monkeypatch):
    E, model, mods, data, rl = _b_setup(tmp_path, monkeypatch)
    idx, b = _forest_rows(data, rl)                            # p_other 1: the others all visit
    loss = E.ordered_module_loss(mods, rl, 0, p_other=1.0, lam=1.0, own_alone=True, kl="each")(model, b)
    ours, core = _module_grads(model, mods, loss)
    assert not core                                            # the core learns nowhere
    lm = _forest_alone_lm(E, model, mods, b)
    fwd = torch.ones(3, 5)
    total, per = _pairwise_kl(E, model, mods, b.x, b.y, fwd, rl[idx])
    assert sorted(per) == [1, 2, 3]                            # sea, space, dinosaurs visit every row
    assert torch.allclose(loss, lm + total, rtol=1e-5)
    g_lm, _ = _module_grads(model, mods, lm)
    assert _close(ours["forest"], g_lm["forest"]) and not _zero(ours["forest"])   # the own module: LM only
    for v, d in ((1, "sea"), (2, "space"), (3, "dinosaurs")):
        g_v, core_v = _module_grads(model, mods, per[v])
        assert not core_v and _zero(g_v["forest"])             # its KL reaches neither the core nor the own module
        assert all(_zero(g_v[o]) for o in mods.domains if o not in (d, "forest"))   # nor the other visitors
        assert _close(ours[d], g_v[d]) and not _zero(ours[d]), d
    # the joint KL (point 15) gives the visitors another gradient: the option is not ignored
    joint, _ = _module_grads(model, mods, E.ordered_module_loss(mods, rl, 0, p_other=1.0, lam=1.0,
                                                                own_alone=True)(model, b))
    assert _close(joint["forest"], ours["forest"]) and not _close(joint["sea"], ours["sea"])
    # mixed batch (two topics, p_other 0.5 draws, general rows via aux_ratio, lam 3): batched = the loop
    gidx = torch.cat([idx[:2], (rl == 2).nonzero().flatten()[:2], (rl == E.GENERAL).nonzero().flatten()[:4]])
    bg = Batch(data.x[gidx], data.y[gidx], data.keyword[gidx], data.forget[gidx], data.labelled[gidx], gidx, 1)
    lab = rl[gidx]
    mixed, core = _module_grads(model, mods, E.ordered_module_loss(mods, rl, 0, p_other=0.5, aux_ratio=2.0, lam=3.0,
                                                                   own_alone=True, kl="each")(model, bg))
    assert not core
    fwd, learn = E.aux_masks(mods, lab, E._step_generator(0, gidx), 0.5)
    visit = E.visitors(fwd, lab)
    own = learn.clone()
    own[:, 1:] &= ~visit
    with mods.route(forward=E.without_visitors(fwd, visit), learn=own):
        lm = E.token_losses(model, bg.x, bg.y)[:4].sum()
    total, _ = _pairwise_kl(E, model, mods, bg.x, bg.y, fwd, lab)
    want, _ = _module_grads(model, mods, lm + 3.0 * total)
    for d in mods.domains:
        assert _close(mixed[d], want[d]), d


def test_kl_key_checks_run_key_and_partial(tmp_path, monkeypatch):
    E, parser = _setup(tmp_path, monkeypatch, steps=4)
    O = dict(schedule="ordered", p_cr=1.0, p_as=0.0, lam=1.0, aux_ratio=2.0, p_other=1.0, module_embed="topic_rows",
             own_alone=True)
    E.check_candidates([dict(O, kl="each"), dict(O, kl="joint")])
    with pytest.raises(ValueError, match=r"candidates\[0\]: modules.kl must be one of"):
        E.check_candidates([dict(O, kl="pairwise")])
    with pytest.raises(ValueError, match=r"candidates\[0\]: modules.kl 'each' .* needs .*modules.own_alone true"):
        E.check_candidates([{k: v for k, v in dict(O, kl="each").items() if k != "own_alone"}])
    with pytest.raises(ValueError, match=r"candidates\[0\]: modules.kl 'each' .* needs"):
        E.check_candidates([dict(kl="each")])                  # single phase
    with pytest.raises(ValueError, match="needs own_alone"):
        E.ordered_module_loss(None, None, 0, lam=1.0, kl="each")
    # absent by default: point 15's runs keep their key; the joint-KL run is another run
    check_ordered_key(E, parser, tmp_path, "kl", dict(aux_ratio=2.0, lam=1.0, own_alone=True, kl="each"),
                      _without("kl"), p_other="1.0")


# ---- diagnosis point 17: the visitors learn silence (``modules.quiet``; ours)
def _loop_sizes(E, model, mods, x, y, on_names, r, v):
    """The penalty of visitor ``v`` on row ``r`` alone, computed in a loop: the row run with ``on_names`` on
    (inference strengths), inputs caught by hooks of its own, the terms summed token by token
    (:func:`_loop_terms`, below, gives the three terms)."""
    mod, logit, inp = _loop_terms(E, model, mods, x, y, on_names, r, v)
    return mod + logit + inp


def test_quiet_each_visitor_learns_the_gradient_of_its_size_and_nothing_else_does(tmp_path, monkeypatch):
    E, model, mods, data, rl = _b_setup(tmp_path, monkeypatch)
    idx, b = _forest_rows(data, rl)                            # p_other 1: the others all visit
    loss = E.ordered_module_loss(mods, rl, 0, p_other=1.0, own_alone=True, quiet=0.5)(model, b)
    ours, core = _module_grads(model, mods, loss)
    assert not core                                            # the core learns nowhere
    lm = _forest_alone_lm(E, model, mods, b)
    per = {v: sum(_loop_sizes(E, model, mods, b.x, b.y, list(mods.domains), r, v) for r in range(3)) for v in (1, 2, 3)}
    assert all(float(p.detach()) > 0 for p in per.values())
    assert torch.allclose(loss, lm + 0.5 * sum(per.values()), rtol=1e-4)
    g_lm, _ = _module_grads(model, mods, lm)
    assert _close(ours["forest"], g_lm["forest"]) and not _zero(ours["forest"])   # the own module: LM only
    for v, d in ((1, "sea"), (2, "space"), (3, "dinosaurs")):
        g_v, core_v = _module_grads(model, mods, 0.5 * per[v])
        assert not core_v and _zero(g_v["forest"])             # its penalty reaches neither the core nor the own module
        assert all(_zero(g_v[o]) for o in mods.domains if o not in (d, "forest"))   # nor the other visitors
        assert _close(ours[d], g_v[d]) and not _zero(ours[d]), d
        assert ours[d][-1] is not None and bool(ours[d][-1].abs().sum() > 0)      # its delta learns too
    # on own-topic stories without visitors nothing changes: point 13's phase-2 loss and gradients
    oidx = torch.cat([idx[:2], (rl == 2).nonzero().flatten()[:2]])
    bo = Batch(data.x[oidx], data.y[oidx], data.keyword[oidx], data.forget[oidx], data.labelled[oidx], oidx, 1)
    plain = E.ordered_module_loss(mods, rl, 0)(model, bo)
    quiet = E.ordered_module_loss(mods, rl, 0, own_alone=True, quiet=0.5)(model, bo)
    assert torch.allclose(plain, quiet)
    g_plain, _ = _module_grads(model, mods, E.ordered_module_loss(mods, rl, 0)(model, bo))
    g_quiet, _ = _module_grads(model, mods, E.ordered_module_loss(mods, rl, 0, own_alone=True, quiet=0.5)(model, bo))
    for d in mods.domains:
        assert _close(g_plain[d], g_quiet[d]), d
    # general rows (aux_ratio): each runs one module, which learns only its penalty there; the isolation keeps it
    gidx = torch.cat([idx[:2], (rl == E.GENERAL).nonzero().flatten()[:3]])
    bg = Batch(data.x[gidx], data.y[gidx], data.keyword[gidx], data.forget[gidx], data.labelled[gidx], gidx, 1)
    mods._pending = None
    g, core = _module_grads(model, mods, E.ordered_module_loss(mods, rl, 0, aux_ratio=2.0, own_alone=True,
                                                                quiet=0.5)(model, bg))
    assert not core and not _zero(g["forest"])
    assert mods.learned_flags().tolist() == [False, True, False, False, False]     # general rows run forest in turn
    with torch.no_grad():                                      # a silent visitor has zero penalty
        for p in mods.module_params("sea"):
            p.zero_()
    assert E.quiet_penalty(model, mods, b.x, b.y, torch.ones(3, 5), E.visitors(torch.ones(3, 5), rl[idx])
                           & torch.tensor([False, True, False, False])).item() == 0.0


def test_quiet_key_checks_run_key_and_partial(tmp_path, monkeypatch):
    E, parser = _setup(tmp_path, monkeypatch, steps=4)
    O = dict(schedule="ordered", p_cr=1.0, p_as=0.0, aux_ratio=2.0, p_other=0.5, module_embed="topic_rows",
             own_alone=True)
    E.check_candidates([dict(O, quiet=0.47), dict(O, quiet=4.7, p_other=1.0)])
    with pytest.raises(ValueError, match=r"candidates\[0\]: modules.quiet .*mutually exclusive with lam"):
        E.check_candidates([dict(O, quiet=0.47, lam=1.0)])
    with pytest.raises(ValueError, match=r"candidates\[0\]: modules.quiet .* needs .*modules.own_alone true"):
        E.check_candidates([{k: v for k, v in dict(O, quiet=0.47).items() if k != "own_alone"}])
    with pytest.raises(ValueError, match=r"candidates\[0\]: modules.quiet must be a number"):
        E.check_candidates([dict(O, quiet=-1.0)])
    with pytest.raises(ValueError, match=r"candidates\[0\]: modules.own_alone .* needs"):
        E.check_candidates([dict(O)])                          # own_alone needs lam or quiet
    with pytest.raises(ValueError, match="needs own_alone"):
        E.ordered_module_loss(None, None, 0, quiet=1.0)
    # absent by default: points 14-16 keep their keys; another weight is another run
    check_ordered_key(E, parser, tmp_path, "quiet",
                      dict(aux_ratio=2.0, own_alone=True, quiet=0.47, module_embed="topic_rows"),
                      lambda mc: {**mc, "quiet": 4.7})


# ---- diagnosis point 18: one weight per term of the quiet penalty (``modules.quiet_norm``; ours)
def _loop_terms(E, model, mods, x, y, on_names, r, v):
    """The three terms of :func:`_loop_sizes` (module outputs, delta logit term, input delta), each the
    mean over the row's target tokens of a squared norm."""
    from gradroute.lm.data import IGNORE
    from gradroute.modules import CONTAINER, EMBED_CONTAINER
    caught = {}
    hooks = [mlp.register_forward_pre_hook(lambda m, a, n=n: caught.__setitem__(n, a[0].detach()))
             for n, mlp in mods.blocks]
    hooks.append(model.lm_head.register_forward_hook(lambda m, a, o: caught.__setitem__("h", a[0].detach())))
    with torch.no_grad(), mods.using(on=on_names):
        model(x[r:r + 1])
    for h in hooks:
        h.remove()
    d = mods.domains[v]
    D = getattr(model, EMBED_CONTAINER)[d]
    full = torch.zeros(model.lm_head.weight.shape[0], D.weight.shape[1]).index_add(0, D.rows, D.weight)
    tokens = [t for t in range(x.shape[1]) if int(y[r, t]) != IGNORE]
    mod = sum(sum(getattr(mlp, CONTAINER)[d](caught[n][0, t]).pow(2).sum() for t in tokens) / len(tokens)
              for n, mlp in mods.blocks)
    logit = sum((full @ caught["h"][0, t]).pow(2).sum() for t in tokens) / len(tokens)
    inp = sum(full[int(x[r, t])].pow(2).sum() for t in tokens) / len(tokens)
    return mod, logit, inp


def test_quiet_norm_weighs_each_term_and_each_visitor_gets_the_weighted_sum_of_its_term_gradients(tmp_path, monkeypatch):
    E, model, mods, data, rl = _b_setup(tmp_path, monkeypatch)
    from gradroute.modules import EMBED_CONTAINER
    idx = (rl == 0).nonzero().flatten()[:3]                    # forest stories; p_other 1: the others all visit
    x = data.x[idx].clone()
    for v in (1, 2, 3):                                        # a token of each visitor's rows: its input term is > 0
        x[:, 2 * v] = getattr(model, EMBED_CONTAINER)[mods.domains[v]].rows[0]
    b = Batch(x, data.y[idx], data.keyword[idx], data.forget[idx], data.labelled[idx], idx, 1)
    from gradroute.lm.data import IGNORE
    assert bool((b.y[:, 2:7] != IGNORE).all())
    W = (3.0, 0.25, 7.0)                                       # module, delta_logit, delta_input: all different
    norm = dict(zip(E.QUIET_TERMS, W))
    loss = E.ordered_module_loss(mods, rl, 0, p_other=1.0, own_alone=True, quiet=0.5, quiet_norm=W)(model, b)
    ours, core = _module_grads(model, mods, loss)
    assert not core
    lm = _forest_alone_lm(E, model, mods, b)
    terms = {v: [_loop_terms(E, model, mods, b.x, b.y, list(mods.domains), r, v) for r in range(3)] for v in (1, 2, 3)}
    per = {v: [sum(t[i] for t in ts) for i in range(3)] for v, ts in terms.items()}      # per visitor, per term
    assert all(float(p.detach()) > 0 for ps in per.values() for p in ps)
    assert torch.allclose(sum(per[1]), sum(_loop_sizes(E, model, mods, b.x, b.y, list(mods.domains), r, 1)
                                           for r in range(3)), rtol=1e-5)               # the split sums to point 17's
    weighted = sum(w * p for ps in per.values() for w, p in zip(W, ps))
    assert torch.allclose(loss, lm + 0.5 * weighted, rtol=1e-4)
    unweighted = E.ordered_module_loss(mods, rl, 0, p_other=1.0, own_alone=True, quiet=0.5)(model, b)
    assert torch.allclose(unweighted, lm + 0.5 * sum(p for ps in per.values() for p in ps), rtol=1e-4)
    assert not torch.allclose(loss, unweighted)
    g_lm, _ = _module_grads(model, mods, lm)
    assert _close(ours["forest"], g_lm["forest"])              # the own module: LM only, weights or not
    for v, d in ((1, "sea"), (2, "space"), (3, "dinosaurs")):
        gs = [_module_grads(model, mods, 0.5 * sum(_loop_terms(E, model, mods, b.x, b.y, list(mods.domains), r, v)[i]
                                                   for r in range(3)))[0][d] for i in range(3)]   # one backward per term
        want = [None if all(g[j] is None for g in gs) else
                sum(w * (torch.zeros_like(next(x[j] for x in gs if x[j] is not None)) if g[j] is None else g[j])
                    for w, g in zip(W, gs)) for j in range(len(gs[0]))]
        assert _close(ours[d], want), d
        assert not _zero(gs[0]) and not _zero(gs[1]) and not _zero(gs[2])         # every term reaches the visitor
    # visitor_sizes: split gives the unweighted terms, weights multiply them in QUIET_TERMS order
    with E.module_inputs(mods) as rec, torch.no_grad(), mods.using(on=list(mods.domains)):
        model(b.x)
    pr, pv = torch.arange(3), torch.ones(3, dtype=torch.long)
    s = E.visitor_sizes(mods, rec, b.x, b.y, pr, pv, split=True)
    assert s.shape == (3, 3)
    assert torch.allclose(E.visitor_sizes(mods, rec, b.x, b.y, pr, pv, W), (s * torch.tensor(W)).sum(1))
    assert torch.allclose(E.visitor_sizes(mods, rec, b.x, b.y, pr, pv), s.sum(1))
    with pytest.raises(ValueError, match="one factor per term"):
        E.visitor_sizes(mods, rec, b.x, b.y, pr, pv, (1.0, 2.0))
    assert E._quiet_norm(dict(schedule="ordered", own_alone=True, quiet=1.0, quiet_norm=norm)) == W


def test_quiet_norm_key_checks_and_run_key(tmp_path, monkeypatch):
    E, parser = _setup(tmp_path, monkeypatch, steps=4)
    O = dict(schedule="ordered", p_cr=1.0, p_as=0.0, aux_ratio=2.0, p_other=0.5, module_embed="topic_rows",
             own_alone=True, quiet=1.0)
    N = {"module": 59.54, "delta_logit": 0.48, "delta_input": 701.83}
    E.check_candidates([dict(O, quiet_norm=N), dict(O, quiet=10.0, quiet_norm=N, p_other=1.0)])
    for bad in ({"module": 1.0, "delta_logit": 1.0}, dict(N, extra=1.0), dict(N, module=0.0), dict(N, module=True),
                [59.54, 0.48, 701.83], "term"):
        with pytest.raises(ValueError, match=r"candidates\[0\]: modules.quiet_norm must be a dict .*delta_logit"):
            E.check_candidates([dict(O, quiet_norm=bad)])
    with pytest.raises(ValueError, match=r"candidates\[0\]: modules.quiet_norm .* needs modules.quiet > 0"):
        E.check_candidates([dict(O, quiet=0.0, own_alone=False, lam=1.0, quiet_norm=N)])
    with pytest.raises(ValueError, match=r"candidates\[0\]: unknown key"):
        E.check_candidates([dict(O, quiet_terms=N)])
    with pytest.raises(ValueError, match="quiet_norm .* needs quiet > 0"):
        E.ordered_module_loss(None, None, 0, quiet_norm=(1.0, 1.0, 1.0))
    # absent by default: point 17 keeps its run keys; other weights are another run
    cfg, out, _ = check_ordered_key(E, parser, tmp_path, "quiet_norm",
                                    dict(aux_ratio=2.0, own_alone=True, quiet=1.0, quiet_norm=N,
                                         module_embed="topic_rows"),
                                    lambda mc: {**mc, "quiet_norm": dict(N, module=1.0)})
    same, _ = E.split_finished([("modular", 0)], lambda m, s: E._run_path(out, m, s), E.train_config(cfg),
                               verbose=False)
    assert list(same) == [("modular", 0)]                      # the same weights: the run is reused
