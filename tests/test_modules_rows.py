"""Per-module embedding deltas restricted to given token rows (``embed_delta={domain: ids}``; ours,
docs/modules.md diagnosis points 9-10) and the experiment's ``--module-embed topic-rows`` /
``exclusive-rows``."""
import pytest
import torch

import gradroute as gr
from gradroute.models import GPT
from gradroute.modules import GENERAL, UNLABELLED

from test_modules import DOMAINS, _routed_steps, _same, _snapshot, _tiny_experiment, gpt, ids, randomise_modules

# overlapping rows, as topic-only tokens of different topics can be
ROWS = {"forest": [3, 5, 7, 9, 11], "sea": [9, 20, 21], "space": [30, 31, 32, 33], "dino": [5, 40]}


def _attach(model, rows=ROWS):
    return gr.add_modules(model, "transformer.h.*.mlp", DOMAINS, embed_delta=rows)


def attach_leaves_function_unchanged(attach, labels=(0, GENERAL, UNLABELLED, 3)):
    """A fresh model with ``attach(model)``'s modules computes what it did before, plain and under a
    routed pass with every kind of row; returns (model, modules)."""
    model = gpt()
    model.eval()
    x = ids()
    with torch.no_grad():
        before = model(x)[0]
        mods = attach(model)
        assert torch.equal(before, model(x)[0])
        with mods.route(torch.tensor(labels), p_cr=1.0, p_as=1.0, spread="each",
                        generator=torch.Generator().manual_seed(0), p_other=0.5):
            assert torch.equal(before, model(x)[0])
    return model, mods


def test_row_deltas_are_compact_and_leave_the_function_unchanged():
    model, mods = attach_leaves_function_unchanged(_attach)
    x = ids()
    E = model.aux_embed
    for d in DOMAINS:
        assert E[d].weight.shape == (len(ROWS[d]), 16) and E[d].rows.tolist() == ROWS[d]
    state = model.state_dict()
    assert "aux_embed.forest.rows" in state and state["aux_embed.forest.weight"].shape == (5, 16)
    assert mods.num_params() == sum(p.numel() for p in mods.module_params())
    assert mods.num_params("forest") - mods.num_params("sea") == (5 - 3) * 16   # the MLP modules are equal
    # a checkpoint's rows are loaded with it (after a forward: the cached layout follows)
    other = gpt()
    omods = _attach(other, {d: [r + 1 for r in ROWS[d]] for d in DOMAINS})
    randomise_modules(omods)
    with torch.no_grad():
        other.eval()
        with omods.using():
            want = other(x)[0]
        model(x)
        model.load_state_dict(other.state_dict())
        assert model.aux_embed.sea.rows.tolist() == [10, 21, 22]
        with mods.using():
            assert torch.equal(model(x)[0], want)
    # a full-vocabulary delta (True) keeps its checkpoint keys: no rows buffer
    full = gr.add_modules(gpt(), "transformer.h.*.mlp", DOMAINS, embed_delta=True)
    assert not any(k.endswith(".rows") for k in full.model.state_dict())


def test_rows_layout_follows_rows_replaced_not_copied():
    """The cached rows layout follows rows that replace the buffer (``load_state_dict(assign=True)``,
    or a plain assignment): a new tensor whose version counter equals the old one's is still new."""
    x = ids()
    other = gpt()
    omods = _attach(other, {d: [r + 1 for r in ROWS[d]] for d in DOMAINS})
    randomise_modules(omods)
    other.eval()
    with torch.no_grad():
        with omods.using():
            want = other(x)[0]
        for how in ("assign", "setattr"):
            model = gpt()
            model.eval()
            mods = _attach(model)
            model(x)                                           # the layout of ROWS is cached
            state = {k: v.clone() for k, v in other.state_dict().items()}
            if how == "assign":
                model.load_state_dict(state, assign=True)
            else:
                model.load_state_dict({k: v for k, v in state.items() if not k.endswith(".rows")}, strict=False)
                for d in DOMAINS:
                    model.aux_embed[d].rows = state[f"aux_embed.{d}.rows"]
            assert model.aux_embed.sea.rows.tolist() == [10, 21, 22]
            with mods.using():
                assert torch.equal(model(x)[0], want), how


def test_rows_equal_a_full_delta_that_is_zero_elsewhere_gradient_only_on_rows():
    """Same function and gradients as a full-vocabulary delta that is zero outside the rows: the
    row parameter's gradient is the full delta's gradient on those rows, in a mixed routed batch
    where a module runs on a row without learning from it."""
    rows_model, full_model = gpt(), gpt()
    rmods = _attach(rows_model)
    fmods = gr.add_modules(full_model, "transformer.h.*.mlp", DOMAINS, embed_delta=True)
    randomise_modules(rmods)
    with torch.no_grad():
        for (n, p), q in zip(rows_model.named_parameters(), full_model.parameters()):
            if n.startswith("aux_embed."):
                q.zero_()
                q[torch.tensor(ROWS[n.split(".")[1]])] = p
            else:
                q.copy_(p)
    x = ids(3, seed=5)
    x[:, :4] = torch.tensor([3, 9, 30, 40])          # row tokens on the input too
    fwd = torch.tensor([[1., 1, 0, 0, 0], [1, 1, 1, 0, 1], [1, 0, 0, 1, 0]])
    learn = torch.tensor([[True, True, False, False, False], [False, False, True, False, True],
                          [True, False, False, True, False]])
    grads = []
    for model, mods in ((rows_model, rmods), (full_model, fmods)):
        with mods.route(forward=fwd, learn=learn):
            logits, loss = model(x, x)
        loss.backward()
        grads.append((logits, {d: model.aux_embed[d].weight.grad for d in DOMAINS}))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-5)
    for d in DOMAINS:
        g_rows, g_full = grads[0][1][d], grads[1][1][d]
        assert torch.allclose(g_rows, g_full[torch.tensor(ROWS[d])], atol=1e-5), d
    # forest learns on row 0 only, and its full delta's gradient reaches rows it does not have
    outside = torch.ones(64, dtype=torch.bool)
    outside[torch.tensor(ROWS["forest"])] = False
    assert grads[1][1]["forest"][outside].abs().sum() > 0 and grads[0][1]["forest"].abs().sum() > 0


def test_all_rows_mapping_is_the_full_vocabulary_delta():
    """The full-vocabulary case is the mapping with every row: same outputs, bit for bit."""
    a, b = gpt(), gpt()
    ma = gr.add_modules(a, "transformer.h.*.mlp", DOMAINS, embed_delta=True)
    mb = gr.add_modules(b, "transformer.h.*.mlp", DOMAINS, embed_delta={d: torch.arange(64) for d in DOMAINS})
    randomise_modules(ma)
    b.load_state_dict(a.state_dict(), strict=False)
    x = ids()
    fwd = torch.tensor([[1., 1, 0, 0, 0], [1, 0, 1, 1, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    with torch.no_grad():
        for m, mods in ((a, ma), (b, mb)):
            with mods.route(forward=fwd, learn=fwd.bool()):
                m.routed = m(x)[0]
            with mods.using(off=["sea"]):
                m.off = m(x)[0]
    assert torch.equal(a.routed, b.routed) and torch.equal(a.off, b.off)


def test_off_module_contributes_nothing_and_only_its_rows_move():
    """A delta switched off (per example, or at inference) contributes nothing; switched on, with
    the MLP modules silent, it moves only the logits of its own rows on a text without its tokens."""
    model = gpt()
    model.eval()
    mods = _attach(model)
    randomise_modules(mods)
    with torch.no_grad():
        for _, mlp in mods.blocks:                   # only the embedding deltas act
            for m in mlp.aux_modules.values():
                m.down.weight.zero_()
    x = ids(4, seed=3)
    x[torch.isin(x, torch.tensor(ROWS["forest"]))] = 1      # no forest token on the input
    with torch.no_grad():
        with mods.using(on=[]):
            none = model(x)[0]
        with mods.using(on=["forest"]):
            forest = model(x)[0]
        cols = torch.zeros(64, dtype=torch.bool)
        cols[torch.tensor(ROWS["forest"])] = True
        assert torch.equal(forest[..., ~cols], none[..., ~cols])
        assert not torch.allclose(forest[..., cols], none[..., cols])
        fwd = torch.tensor([[1., 1, 0, 0, 0], [1, 0, 1, 1, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 1]])
        with mods.route(forward=fwd, learn=fwd.bool()):
            routed = model(x)[0]
        model.aux_embed.forest.weight.zero_()
        with mods.route(forward=fwd, learn=fwd.bool()):
            routed0 = model(x)[0]
    forest_on = fwd[:, 1].bool()
    assert torch.equal(routed0[~forest_on], routed[~forest_on])
    assert not torch.allclose(routed0[forest_on], routed[forest_on])


def test_row_deltas_isolation_under_adamw():
    """Core-frozen forest-only steps under AdamW (after mixed steps gave every owner moments): the
    core (wte included) and the other modules' deltas and MLPs stay bit-identical; forest's moves."""
    model = gpt()
    mods = _attach(model)
    randomise_modules(mods)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    _routed_steps(model, mods, opt, [0, 1, 2, 3, GENERAL, UNLABELLED], 0, p_as=0.5, generator=g)
    core = mods.core_params()
    before, others = _snapshot(core), [_snapshot(mods.module_params(d)) for d in DOMAINS[1:]]
    forest = model.aux_embed.forest.weight.detach().clone()
    _routed_steps(model, mods, opt, [0, 0, 0], 20, p_cr=1.0)
    assert _same(before, core)
    for snap, d in zip(others, DOMAINS[1:]):
        assert _same(snap, mods.module_params(d)), d
    assert not torch.equal(forest, model.aux_embed.forest.weight)


def test_row_deltas_export_merges_into_their_rows():
    model = gpt()
    model.eval()
    mods = _attach(model)
    randomise_modules(mods)
    x = ids()
    x[:, :3] = torch.tensor([5, 9, 31])
    with torch.no_grad():
        for on in (["forest", "sea"], {"sea": 0.5, "dino": 1.0}):
            stock = mods.export(on=on)
            assert type(stock) is GPT and not hasattr(stock, "aux_embed")
            assert stock.lm_head.weight is stock.transformer.wte.weight
            with mods.using(on=on):
                assert torch.allclose(stock(x)[0], model(x)[0], atol=1e-5)
            changed = (stock.transformer.wte.weight != model.transformer.wte.weight).any(1)
            allowed = torch.zeros(64, dtype=torch.bool)
            for d in on:
                allowed[torch.tensor(ROWS[d])] = True
            assert changed.any() and not (changed & ~allowed).any()
        plain = mods.export()
        with mods.using(on=[]):
            assert torch.equal(plain(x)[0], model(x)[0])
    mods.remove()
    assert not any(k.startswith("aux_embed") for k in model.state_dict())


@pytest.mark.parametrize("rows, error, match", [
    ({**ROWS, "moon": [1]}, ValueError, "unknown domain"),
    ({d: ROWS[d] for d in DOMAINS[:3]}, ValueError, "no token ids for domain"),
    ({**ROWS, "sea": [3, 64]}, ValueError, "out of range"),
    ({**ROWS, "sea": [-1, 3]}, ValueError, "out of range"),
    ({**ROWS, "sea": []}, ValueError, "empty"),
    ({**ROWS, "sea": [1.5, 2.0]}, TypeError, "ints"),
    ({**ROWS, "sea": torch.zeros(10, dtype=torch.bool)}, ValueError, "bool mask"),
    ("forest", TypeError, "mapping"),
])
def test_bad_rows_are_clear_errors_and_leave_the_model_unchanged(rows, error, match):
    model = gpt()
    keys = set(model.state_dict())
    with pytest.raises(error, match=match):
        _attach(model, rows)
    assert set(model.state_dict()) == keys
    mask = torch.zeros(64, dtype=torch.bool)
    mask[[2, 4]] = True
    mods = _attach(model, {**ROWS, "sea": mask})                 # a bool mask is accepted
    assert model.aux_embed.sea.rows.tolist() == [2, 4]
    mods.remove()


# ------------------------------------------------------------------ the experiment
def test_topic_only_token_ids_from_labelled_training_stories(tmp_path, monkeypatch):
    E, parser = _tiny_experiment(tmp_path, monkeypatch, steps=2, curve_points=2,
                                 modules=dict(width=0.1, p_cr=1.0, p_as=0.5, spread="one"), attack_rounds=1)
    monkeypatch.setitem(E.PROFILES["quick"], "vocab_size", 600)   # at 300 every token occurs in general stories
    cfg = E.build_config(parser.parse_args(["--out", "x"]))
    tok, data, labels, _, _ = E._prepare(E._cfg_key(cfg))
    V = tok.vocab_size
    rows = E.topic_only_token_ids(data, E.routing_labels(labels, None), V)
    general = E.story_token_ids(data, labels < 0, V)
    for k, t in enumerate(E.TOPIC_NAMES):
        r = rows[t]
        assert r.numel() > 0 and not general[r].any()
        assert E.story_token_ids(data, labels == k, V)[r].all()
    # hidden labels: a topic story whose label is hidden counts for neither side
    unl = E.unlabelled_subset(len(labels), 0.5, 0)
    part = E.topic_only_token_ids(data, E.routing_labels(labels, unl), V)
    vis = E.routing_labels(labels, unl)
    for k, t in enumerate(E.TOPIC_NAMES):
        assert E.story_token_ids(data, vis == k, V)[part[t]].all()
        assert not E.story_token_ids(data, vis == GENERAL, V)[part[t]].any()


def test_module_embed_topic_rows_flag_config_run_key_metrics_and_attack(tmp_path, monkeypatch):
    E, parser = _tiny_experiment(tmp_path, monkeypatch, steps=3, curve_points=2,
                                 modules=dict(width=0.1, p_cr=1.0, p_as=0.5, spread="one"), attack_rounds=1)
    monkeypatch.setitem(E.PROFILES["quick"], "vocab_size", 600)   # at 300 every token occurs in general stories
    build = lambda *a: E.build_config(parser.parse_args(["--out", "x", *a]))["modules"]
    assert "module_embed" not in build()
    assert build("--module-embed")["module_embed"] is True and build("--module-embed", "vocab")["module_embed"] is True
    assert build("--module-embed", "topic-rows")["module_embed"] == "topic_rows"
    with pytest.raises(SystemExit):
        build("--module-embed", "rows")
    with pytest.raises(ValueError, match="module_embed"):
        E._module_embed("rows")
    common = ["--out", str(tmp_path / "o"), "--workers", "1", "--methods", "modular"]
    full = E.run(parser.parse_args([*common, "--no-attack", "--module-embed"]))
    assert "module_embed_rows" not in full
    m = E.run(parser.parse_args([*common, "--module-embed", "topic-rows"]))   # with the attack
    run_file = tmp_path / "o" / "runs" / "modular_s0.json"
    assert E.read_json(run_file)["config"]["modules"]["module_embed"] == "topic_rows"   # retrained: own key
    counts = m["module_embed_rows"]
    assert set(counts) == set(E.TOPIC_NAMES) and all(v > 0 for v in counts.values())
    assert m["runs"]["modular_s0"]["module_embed_rows"] == counts
    state = torch.load(tmp_path / "o" / "models" / "modular_s0.pt", weights_only=True)
    assert all(state[f"aux_embed.{t}.weight"].shape[0] == counts[t] for t in E.TOPIC_NAMES)
    assert m["runs"]["modular_s0"]["configs"] != full["runs"]["modular_s0"]["configs"]
    assert "modular" in m["attacks"]["0"]["attack"]
    assert "own token rows" in E.report(tmp_path / "o")["detail"]


# ------------------------------------------------------------------ exclusive rows (point 10)
def _hand_corpus():
    """Six hand-built stories of 3 tokens (vocab 12): one general, one per topic, one hidden."""
    from gradroute.lm.data import Stories
    x = torch.tensor([[0, 1, 2], [0, 4, 5], [5, 7, 8], [9, 9, 10], [11, 4, 11], [6, 10, 3], [2, 7, 2]])
    y = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, -1], [9, 10, 1], [4, 11, 11], [10, 3, 3], [7, 2, 2]])
    z = torch.zeros_like(x, dtype=torch.bool)
    data = Stories(x, y, z, torch.zeros(len(x), dtype=torch.bool), torch.zeros(len(x), dtype=torch.bool))
    #                         general  forest sea space dinosaurs hidden  sea
    route = torch.tensor([GENERAL, 0, 1, 2, 3, UNLABELLED, 1])
    return data, route


def test_exclusive_rows_on_a_hand_built_corpus():
    from gradroute.experiments import modules as E
    data, route = _hand_corpus()
    as_lists = lambda d: {t: v.tolist() for t, v in d.items()}
    forest, sea, space, dino = E.TOPIC_NAMES
    # topic-only: in the topic's labelled stories, in no general story (the hidden story counts for no side)
    assert as_lists(E.topic_only_token_ids(data, route, 12)) == {forest: [4, 5, 6], sea: [5, 7, 8],
                                                                 space: [9, 10], dino: [4, 11]}
    # exclusive: moreover in no other topic's labelled story (5: forest and sea; 4: forest and dinosaurs)
    excl = E.topic_only_token_ids(data, route, 12, exclusive=True)
    assert as_lists(excl) == {forest: [6], sea: [7, 8], space: [9, 10], dino: [11]}
    assert as_lists(E.embed_rows_for("exclusive_rows", data, route, 12)) == as_lists(excl)
    assert as_lists(E.embed_rows_for("topic_rows", data, route, 12)) == as_lists(E.topic_only_token_ids(data, route, 12))
    assert E.embed_rows_for(True, data, route, 12) is None and E.embed_rows_for(None, data, route, 12) is None
    # a topic with no token of its own is a clear error naming the option and the topic
    route2 = route.clone()
    route2[4] = 0                                   # the dinosaur story becomes forest: dinosaurs has no story
    with pytest.raises(ValueError, match=f"exclusive_rows: topic {dino}"):
        E.topic_only_token_ids(data, route2, 12, exclusive=True)
    data.x[1, 0], data.y[1, 2] = 5, 5               # forest's only exclusive token (6) becomes sea's 5
    with pytest.raises(ValueError, match=f"exclusive_rows: topic {forest}"):
        E.topic_only_token_ids(data, route, 12, exclusive=True)
    assert E.topic_only_token_ids(data, route, 12)[forest].tolist() == [4, 5]   # still topic-only rows


def test_module_embed_exclusive_rows_flag_config_run_key_and_metrics(tmp_path, monkeypatch):
    E, parser = _tiny_experiment(tmp_path, monkeypatch, steps=3, curve_points=2,
                                 modules=dict(width=0.1, p_cr=1.0, p_as=0.5, spread="each"), attack_rounds=1)
    monkeypatch.setitem(E.PROFILES["quick"], "vocab_size", 600)   # at 300 every token occurs in general stories
    cfg = E.build_config(parser.parse_args(["--out", "x", "--module-embed", "exclusive-rows"]))
    assert cfg["modules"]["module_embed"] == "exclusive_rows"
    assert E._module_embed("exclusive_rows") == "exclusive_rows"
    common = ["--out", str(tmp_path / "o"), "--workers", "1", "--methods", "modular", "--no-attack"]
    topic = E.run(parser.parse_args([*common, "--module-embed", "topic-rows"]))
    m = E.run(parser.parse_args([*common, "--module-embed", "exclusive-rows"]))
    run_file = tmp_path / "o" / "runs" / "modular_s0.json"
    assert E.read_json(run_file)["config"]["modules"]["module_embed"] == "exclusive_rows"   # retrained: own key
    tok, data, labels, _, _ = E._prepare(E._cfg_key(cfg))
    rows = E.embed_rows_for("exclusive_rows", data, E.routing_labels(labels, None), tok.vocab_size)
    counts = m["module_embed_rows_exclusive_rows"]
    assert counts == {t: int(v.numel()) for t, v in rows.items()} and "module_embed_rows" not in m
    assert m["runs"]["modular_s0"]["module_embed_rows"] == counts
    assert all(counts[t] <= topic["module_embed_rows"][t] for t in E.TOPIC_NAMES)
    flat = torch.cat(list(rows.values()))
    assert flat.numel() == torch.unique(flat).numel()            # no row belongs to two topics
    state = torch.load(tmp_path / "o" / "models" / "modular_s0.pt", weights_only=True)
    assert all(state[f"aux_embed.{t}.rows"].tolist() == rows[t].tolist() for t in E.TOPIC_NAMES)
    assert "exclusive to each topic" in E.report(tmp_path / "o")["detail"]


# ------------------------------------------------------------------ module width per candidate (point 11)
def _units(state):
    """Units of the forest module in block 0 (rows of its ``up`` weight)."""
    return state["transformer.h.0.mlp.aux_modules.forest.up.weight"].shape[0]


def test_candidate_width_reaches_run_key_headline_and_attack(tmp_path, monkeypatch):
    """A selection candidate's ``width`` trains that candidate at that width (absent: the profile's),
    is part of its run key (a run at another width is retrained, never reused), and, when chosen,
    is the headline model's width, with which the attack stage reloads it."""
    E, parser = _tiny_experiment(tmp_path, monkeypatch, steps=3, curve_points=2,
                                 modules=dict(width=0.1, p_cr=1.0, p_as=0.5, spread="each"), attack_rounds=1)
    out = tmp_path / "o"
    cfg = E.build_config(parser.parse_args(["--out", str(out), "--seeds", "9", "--no-attack"]))
    sel = dict(seeds=[9], removal=0.9, useful=1.1, candidates=[dict(p_cr=1.0, p_as=0.5, spread="each", width=0.5),
                                                              dict(p_cr=1.0, p_as=0.5, spread="each")])
    cfg["modules"]["select"] = sel
    s = E.run_selection(cfg, out, "cpu", 1)
    run = lambda i: E.read_json(out / "select" / f"c{i}" / "runs" / "modular_s9.json")
    model = lambda i: torch.load(out / "select" / f"c{i}" / "models" / "modular_s9.pt", weights_only=True)
    assert run(0)["config"]["modules"]["width"] == 0.5 and run(1)["config"]["modules"]["width"] == 0.1
    assert _units(model(0)) == 16 and _units(model(1)) == 3            # d_mlp 32: round(0.5 x 32), round(0.1 x 32)
    assert run(0)["module_params"] > run(1)["module_params"] and run(0)["core_params"] == run(1)["core_params"]
    assert s["candidates"][0]["width"] == 0.5
    # another width for candidate 0 in the same folder: retrained at that width, never reused
    cfg["modules"]["select"]["candidates"][0]["width"] = 0.25
    E.run_selection(cfg, out, "cpu", 1)
    assert run(0)["config"]["modules"]["width"] == 0.25 and _units(model(0)) == 8 and _units(model(1)) == 3
    # chosen (the only candidate): the headline model and the attack's reload use its width
    monkeypatch.setitem(E.PROFILES["quick"]["modules"], "select",
                        dict(seeds=[9], removal=0.9, useful=1.1,
                             candidates=[dict(p_cr=1.0, p_as=0.5, spread="each", width=0.5)]))
    m = E.run(parser.parse_args(["--out", str(tmp_path / "h"), "--workers", "1", "--methods", "modular"]))
    assert m["config"]["modules"]["width"] == 0.5 and m["selection"]["schedule"]["width"] == 0.5
    assert _units(torch.load(tmp_path / "h" / "models" / "modular_s0.pt", weights_only=True)) == 16
    assert "modular" in m["attacks"]["0"]["attack"]


@pytest.mark.parametrize("cands, match", [
    ([], "need 1 to 12"),
    ([dict(p_cr=1.0)] * 13, "need 1 to 12 schedules, got 13"),
    ([dict(p_cr=1.0), dict(p_cr=1.0, widht=0.5)], r"candidates\[1\]: unknown key\(s\) \['widht'\]"),
    ([dict(p_cr=1.0, width=0)], r"candidates\[0\]: width must be a positive"),
    ([dict(p_cr=1.0, width=True)], "width must be a positive"),
    ([dict(p_cr=1.0, width="wide")], "width must be a positive"),
    (["p_cr"], r"candidates\[0\]: a dict"),
    (None, "a list of schedules, got None"),
    # values that only the candidate's own training would refuse, after others have trained
    ([dict(p_cr=1.0), dict(module_embed="topic-rows")], r"candidates\[1\]: modules.module_embed must be"),
    ([dict(p_cr=1.5)], r"candidates\[0\]: p_cr must be a number in \[0, 1\], got 1.5"),
    ([dict(p_other=-0.1)], "p_other must be a number"),
    ([dict(spread="all")], "spread must be 'one' or 'each'"),
    ([dict(embed_free="yes")], "embed_free must be true or false"),
])
def test_bad_selection_candidates_are_clear_errors(cands, match):
    from gradroute.experiments import modules as E
    with pytest.raises(ValueError, match=match):
        E.check_candidates(cands)
    E.check_candidates([dict(p_cr=1.0, width=0.5)] * 12)            # up to 12, with widths, is fine
    E.check_candidates(E.SELECT["candidates"])                       # the defaults pass
