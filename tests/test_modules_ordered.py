"""The experiment's ordered schedule (``--schedule ordered``; ours, after the official
``do_routed_ordered``; docs/modules.md diagnosis point 13): phase 1 trains the core alone, phase 2
the modules alone with the core frozen, through the one training loop."""
import pytest
import torch

from test_modules import _same, _snapshot, _tiny_experiment, randomise_modules


def _setup(tmp_path, monkeypatch, steps=6):
    E, parser = _tiny_experiment(tmp_path, monkeypatch, steps=steps, curve_points=2,
                                 modules=dict(width=0.25, p_cr=0.7, p_as=0.5, spread="one"), attack_rounds=1)
    monkeypatch.setitem(E.PROFILES["quick"], "vocab_size", 600)   # at 300 every token occurs in general stories
    return E, parser


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


def test_phase1_never_updates_modules_phase2_never_updates_the_core(tmp_path, monkeypatch):
    E, parser = _setup(tmp_path, monkeypatch)
    cfg = E.build_config(parser.parse_args(["--out", "x"]))
    tok, data, labels, _, _ = E._prepare(E._cfg_key(cfg))
    rl = E.routing_labels(labels, None)
    model = E.make_model(E._spec(cfg, tok.vocab_size), 0)
    rows = E.embed_rows_for("topic_rows", data, rl, tok.vocab_size)
    mods = E.attach_modules(model, cfg, "modular", module_embed="topic_rows", embed_rows=rows)
    randomise_modules(mods)                  # weight decay on a module in phase 1 would now move it
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
