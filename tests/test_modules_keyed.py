"""Keyed modules (``add_modules(..., keys=...)``; ours, a departure from the paper's gateless modules;
docs/modules.md diagnosis point 20): a module runs at a position only once one of its key tokens has
occurred in the sequence."""
import pytest
import torch

import gradroute as gr
from gradroute.modules import CONTAINER, GENERAL

from test_modules import DOMAINS, _routed_steps, _same, _snapshot, gpt, ids, randomise_modules
from test_modules_gated import _gated
from test_modules_rows import ROWS, attach_leaves_function_unchanged

# every token id below 64 except the keys is "general"; the keys of two domains may share a token
KEYS = {"forest": [3, 5, 7, 9, 11, 12], "sea": [9, 20, 21, 22], "space": [30, 31, 32, 33], "dino": [5, 40, 41]}


def _keyed(model, rows=ROWS, keys=KEYS):
    return gr.add_modules(model, "transformer.h.*.mlp", DOMAINS, embed_delta=rows, keys=keys)


def _plain_ids(B=3, T=10, seed=0):
    """Token ids that are no domain's key."""
    allowed = torch.tensor(sorted(set(range(64)) - {t for v in KEYS.values() for t in v}))
    g = torch.Generator().manual_seed(seed)
    return allowed[torch.randint(len(allowed), (B, T), generator=g)]


def test_keyed_function_unchanged_at_init():
    attach_leaves_function_unchanged(_keyed, labels=(0, GENERAL, 2, 3))
    attach_leaves_function_unchanged(lambda m: _keyed(m, rows=False))


def test_key_gates_open_at_the_first_key_and_stay_open():
    mods = _keyed(gpt())
    x = torch.tensor([[1, 2, 12, 2, 2, 40],       # forest key at 2, dino key at 5
                      [5, 2, 2, 2, 2, 2],         # 5 is a key of forest and dino
                      [1, 1, 1, 1, 1, 1]])        # no key
    g = mods.key_gates(x)
    assert g.shape == (4, 3, 6) and g.dtype == torch.bool
    assert g[0, 0].tolist() == [False, False, True, True, True, True]
    assert g[3, 0].tolist() == [False] * 5 + [True]
    assert g[0, 1].all() and g[3, 1].all() and not g[1, 1].any() and not g[2, 1].any()
    assert not g[:, 2].any()


@pytest.mark.parametrize("rows", [ROWS, True], ids=["key-rows", "full-vocabulary"])
def test_keyed_module_changes_nothing_before_its_keys_and_acts_after(rows):
    """Full-vocabulary deltas too: the input delta of a token that is not a key acts only once the gate is open."""
    model = gpt()
    model.eval()
    mods = _keyed(model, rows=rows)
    randomise_modules(mods)
    plain = _plain_ids()
    keyed = plain.clone()
    keyed[:, 4] = 12                                  # a forest key (only forest's) at position 4
    with torch.no_grad():
        with mods.using(on=[]):
            off_plain, off_keyed = model(plain)[0], model(keyed)[0]
        with mods.using(on=None):                     # every module on
            on_plain, on_keyed = model(plain)[0], model(keyed)[0]
        with mods.using(on=["sea", "space", "dino"]):
            others_keyed = model(keyed)[0]
    # text without any key: every module switched on changes nothing, bit for bit
    assert torch.equal(on_plain, off_plain)
    # forest's key at 4: positions 0-3 untouched, 4 on changed by forest only
    assert torch.equal(on_keyed[:, :4], off_keyed[:, :4])
    assert (on_keyed[:, 4:] - off_keyed[:, 4:]).abs().amax() > 1e-3
    assert torch.equal(others_keyed, off_keyed)


def test_keyed_gate_open_everywhere_equals_the_ungated_module():
    """A sequence starting with a key: the keyed modules compute what ungated ones with the same weights do."""
    model, ref = gpt(), gpt()
    model.eval(), ref.eval()
    mods = _keyed(model)
    plain_mods = gr.add_modules(ref, "transformer.h.*.mlp", DOMAINS, embed_delta=ROWS)
    randomise_modules(mods)
    ref.load_state_dict(model.state_dict())
    x = _plain_ids()
    x[:, 0] = 12                                      # forest key first: forest's gate is open everywhere
    with torch.no_grad(), mods.using(on=["forest"]), plain_mods.using(on=["forest"]):
        assert torch.allclose(model(x)[0], ref(x)[0], atol=1e-6)


# the per-token gates, learned (gated=True, point 19) or keyed: the same guarantees
ATTACH = {"gated": lambda m: _gated(m), "keyed": lambda m: _keyed(m)}


def _random(kind):
    """A model in eval mode with ``kind`` modules given random weights."""
    model = gpt()
    model.eval()
    mods = ATTACH[kind](model)
    randomise_modules(mods)
    return model, mods


@pytest.mark.parametrize("kind", ATTACH)
def test_gated_or_keyed_routed_pass_equals_inference_strengths(kind):
    model, mods = _random(kind)
    x = ids()
    x[:, 2] = 9                                       # forest's and sea's key
    fwd = torch.tensor([[1.0, 1, 1, 0, 1]] * 4)
    with torch.no_grad():
        with mods.using(on=["forest", "sea", "dino"]):
            want = model(x)[0]
        with mods.route(forward=fwd, learn=fwd.bool()):
            got = model(x)[0]
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("kind", ATTACH)
def test_gated_or_keyed_export_refuses_kept_modules_and_exports_all_off(kind):
    model, mods = _random(kind)
    with pytest.raises(ValueError, match=rf"export\(on=\['sea'\]\): {kind} modules cannot be merged"):
        mods.export(on=["sea"])
    stock = mods.export()
    x = ids()
    x[:, 0] = 12
    with torch.no_grad(), mods.using(on=[]):
        assert torch.equal(stock(x)[0], model(x)[0])
    assert not any("aux" in n for n, _ in stock.named_parameters())
    assert not stock._forward_pre_hooks_with_kwargs and not stock._forward_pre_hooks
    mods.remove()
    assert not model._forward_pre_hooks_with_kwargs


@pytest.mark.parametrize("kind", ATTACH)
def test_gated_or_keyed_isolation_under_adamw_bit_identical(kind):
    model = gpt()
    mods = ATTACH[kind](model)
    randomise_modules(mods)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    _routed_steps(model, mods, opt, [0, 1, 2, 3, GENERAL], 0, p_as=0.5, generator=g)   # moments for everyone
    core, forest = _snapshot(mods.core_params()), _snapshot(mods.module_params("forest"))
    others = [_snapshot(mods.module_params(d)) for d in DOMAINS[1:]]
    gate = getattr(mods.blocks[0][1], CONTAINER)["forest"].gate
    gate0 = None if gate is None else gate.weight.detach().clone()
    _routed_steps(model, mods, opt, [0, 0, 0], 10, p_cr=1.0, p_other=1.0)   # forest data, others visit
    assert _same(core, mods.core_params())
    for snap, d in zip(others, DOMAINS[1:]):
        assert _same(snap, mods.module_params(d)), d
    assert not _same(forest, mods.module_params("forest"))
    assert (gate is None) == (kind == "keyed") and (gate is None or not torch.equal(gate0, gate.weight))


def test_keyed_refuses_bad_options_before_changing_the_model():
    model = gpt()
    with pytest.raises(ValueError, match="keys and gated are two kinds of gate"):
        gr.add_modules(model, "transformer.h.*.mlp", DOMAINS, keys=KEYS, gated=True)
    with pytest.raises(TypeError, match="keys must be a"):
        gr.add_modules(model, "transformer.h.*.mlp", DOMAINS, keys=[3, 4])
    with pytest.raises(ValueError, match=r"keys: no token ids for domain\(s\) \['dino'\]"):
        gr.add_modules(model, "transformer.h.*.mlp", DOMAINS, keys={d: KEYS[d] for d in DOMAINS[:3]})
    with pytest.raises(ValueError, match=r"keys\['sea'\]: token ids out of range \[0, 64\): \[64\]"):
        gr.add_modules(model, "transformer.h.*.mlp", DOMAINS, keys={**KEYS, "sea": [64]})
    assert not any("aux" in n for n, _ in model.named_parameters())
    assert not model._forward_pre_hooks_with_kwargs
    mods = _keyed(model)
    with pytest.raises(RuntimeError, match="keyed modules need the token ids"):
        model.transformer.h[0].mlp(torch.zeros(1, 3, 16))    # an MLP called without a model forward


def test_keyed_on_hf_gpt2_reads_input_ids(hf_gpt2):
    model = hf_gpt2
    mods = gr.add_modules(model, "transformer.h.*.mlp", DOMAINS, keys=KEYS)
    randomise_modules(mods)
    plain = _plain_ids()
    keyed = plain.clone()
    keyed[:, 3] = 30                                  # a space key
    with torch.no_grad():
        with mods.using(on=[]):
            off_plain, off_keyed = model(input_ids=plain).logits, model(input_ids=keyed).logits
        with mods.using(on=["space"]):
            on_plain, on_keyed = model(input_ids=plain).logits, model(input_ids=keyed).logits
    assert torch.equal(on_plain, off_plain)
    assert torch.equal(on_keyed[:, :3], off_keyed[:, :3])
    assert (on_keyed[:, 3:] - off_keyed[:, 3:]).abs().amax() > 1e-4


# ---- the experiment's ``modules.keys``
from test_modules_ordered import _setup, check_ordered_key  # noqa: E402


def test_keys_key_checks_run_key_and_partial(tmp_path, monkeypatch):
    E, parser = _setup(tmp_path, monkeypatch)
    O = dict(schedule="ordered", p_cr=1.0, p_as=0.0, module_embed="topic_rows", keys="topic_rows")
    E.check_candidates([O, dict(O, module_embed="exclusive_rows", keys="exclusive_rows"), dict(keys="topic_rows")])
    with pytest.raises(ValueError, match=r"candidates\[0\]: modules.keys must be 'topic_rows' or 'exclusive_rows'"):
        E.check_candidates([dict(O, keys=True)])
    with pytest.raises(ValueError, match=r"candidates\[1\]: modules.keys and modules.gated are two kinds of gate"):
        E.check_candidates([O, dict(O, gated=True)])
    # absent by default (earlier run keys unchanged); keyed is another run; unlike the ordered options the
    # partial-label model keeps it (architecture), with keys from its own labelled stories
    cfg, out, r = check_ordered_key(E, parser, tmp_path, "keys", dict(keys="topic_rows", module_embed="topic_rows"),
                                    lambda mc: {k: v for k, v in mc.items() if k != "keys"})
    p = E._run_path(out, "modular_partial", 0)
    import json
    part = json.loads(p.read_text())
    assert part["config"]["modules"]["keys"] == "topic_rows"
    tok, data, labels, _, _ = E._prepare(E._cfg_key(cfg))
    full = E.keys_for("topic_rows", data, E.routing_labels(labels, None), tok.vocab_size)
    assert r["module_keys"] == {t: int(v.numel()) for t, v in full.items()}
    assert part["module_keys"] != r["module_keys"]          # fewer labelled stories, fewer keys
    # a keyed module changes nothing on general text: every configuration's general loss is the same
    gen = {c: row["general"] for c, row in r["configs"].items()}
    assert len(set(gen.values())) == 1, gen


@pytest.mark.parametrize("gate", [dict(keys="topic_rows"), dict(gated=True)], ids=["keyed", "gated"])
def test_keyed_or_gated_headline_attacks_the_attached_release(tmp_path, monkeypatch, gate):
    """Keyed or gated modules cannot be merged into a stock model: the attack runs on the modular model with
    the attacked topic's module zeroed and switched off, the others on; before the attack it computes what
    the modular model does in that configuration."""
    import json
    E, parser = _setup(tmp_path, monkeypatch, steps=4)
    real = E.build_config

    def keyed_config(args):
        cfg = real(args)
        cfg["modules"].update(gate, module_embed="topic_rows")
        return cfg
    monkeypatch.setattr(E, "build_config", keyed_config)
    out = tmp_path / "o"
    args = parser.parse_args(["--out", str(out), "--schedule", "ordered", "--no-select", "--workers", "1",
                              "--methods", "base", "modular"])
    E.run(args)
    att = json.loads(E._run_path(out, "attack", 0).read_text())
    mod = json.loads(E._run_path(out, "modular", 0).read_text())
    topic = att["topic"]
    assert att["release"] == "attached"
    kept = E.config_name(tuple(t for t in E.TOPIC_NAMES if t != topic))
    for n, v in att["released_losses"].items():
        assert abs(v - mod["configs"][kept][n]) < 1e-5, n
    assert att["attack"]["modular"]["before"] == pytest.approx(mod["configs"][kept][topic], abs=1e-5)


def test_opening_targets_stop_at_the_first_key_input_or_target():
    from gradroute.experiments.modules import IGNORE, opening_targets
    keys = torch.zeros(10, dtype=torch.bool)
    keys[[7, 8]] = True
    x = torch.tensor([[1, 2, 3, 7, 2, 2], [1, 2, 3, 4, 5, 6], [8, 1, 1, 1, 1, 1]])
    y = torch.tensor([[2, 3, 7, 2, 2, 1], [2, 3, 4, 5, 6, IGNORE], [1, 1, 1, 1, 1, 1]])
    got = opening_targets(x, y, keys)
    assert got.tolist() == [[True, True, False, False, False, False],      # target 7 is the key itself
                            [True, True, True, True, True, False],         # no key; the ignored target is not one
                            [False] * 6]                                   # the story opens with a key


def test_core_prefix_phase1_learns_topic_openings_only(tmp_path, monkeypatch):
    E, parser = _setup(tmp_path, monkeypatch)
    cfg = E.build_config(parser.parse_args(["--out", "x"]))
    tok, data, labels, _, _ = E._prepare(E._cfg_key(cfg))
    rl = E.routing_labels(labels, None)
    key_ids = E.keys_for("exclusive_rows", data, rl, tok.vocab_size)
    union = E._union_keys(key_ids, tok.vocab_size)
    model = E.make_model(E._spec(cfg, tok.vocab_size), 0)
    mods = E.attach_modules(model, cfg, "modular", keys=key_ids)
    seen = []
    real = E.train

    def spy(m, batch_at, c, **kw):
        seen.append([batch_at(s) for s in range(c.steps)])
        return real(m, batch_at, c, **kw)
    monkeypatch.setattr(E, "train", spy)
    order = E._order(cfg, data, 0)
    res = E.train_ordered(model, mods, data, order, rl, dict(cfg["train"]), 0, prefix_keys=union)
    one, two = seen
    rows1 = torch.cat([b.index for b in one])
    assert torch.equal(torch.sort(rows1).values, torch.sort(torch.cat([order.indices(s) for s in range(6)])).values)
    n_kept = 0
    for b in one:
        topic = rl[b.index] >= 0
        assert torch.equal(b.y[~topic], data.y[b.index][~topic])            # general rows: every target
        want = torch.where(E.opening_targets(b.x[topic], data.y[b.index][topic], union), data.y[b.index][topic],
                           torch.full_like(b.y[topic], E.IGNORE))
        assert torch.equal(b.y[topic], want)
        # no key of any topic is ever a target the core learns, nor follows one in its story
        kept = b.y[topic][b.y[topic] != E.IGNORE]
        assert not union[kept].any()
        n_kept += int((b.y[topic] != E.IGNORE).sum())
        assert b.n_tokens == int((b.y != E.IGNORE).sum())
    assert 0 < n_kept and res["core_prefix_targets"][0] >= n_kept
    assert all(torch.equal(b.y, data.y[b.index]) for b in two)             # phase 2: the modules see whole stories
    with pytest.raises(ValueError, match=r"core_prefix .* needs modules.schedule 'ordered' and modules.keys"):
        E.check_candidates([dict(schedule="ordered", p_cr=1.0, p_as=0.0, core_prefix=True)])


def test_selection_skips_candidates_that_cannot_be_built_on_the_corpus(tmp_path, monkeypatch):
    """At vocabulary 300 every token occurs in general stories: a keyed candidate has no key to use
    (as on the shared-vocabulary topics); the selection records why and chooses among the others."""
    from test_modules import _tiny_experiment
    keyed = dict(schedule="ordered", p_cr=1.0, p_as=0.0, keys="exclusive_rows", core_prefix=True)
    plain = dict(p_cr=1.0, p_as=0.5, spread="one")
    sel = dict(seeds=[7], removal=0.9, useful=1.1, candidates=[keyed, plain])
    E, parser = _tiny_experiment(tmp_path, monkeypatch, steps=4, curve_points=2,
                                 modules=dict(width=0.1, p_cr=0.5, p_as=0.1, spread="one", select=sel), attack_rounds=1)
    cfg = E.build_config(parser.parse_args(["--out", "x"]))
    assert "has no token outside the general stories" in E.not_applicable(cfg, keyed)
    assert E.not_applicable(cfg, plain) is None
    s = E.run_selection(cfg, tmp_path / "o", "cpu", 1, eval_seeds=[0])
    assert list(s["skipped"]) == ["0"] and s["chosen"] == 1 and s["schedule"] == plain
    assert [r["candidate"] for r in s["rows"]] == [1]
    assert not (tmp_path / "o" / "select" / "c0").exists()
    # the whole run: the skipped candidate is named in the summary, and nothing else asks for its keys or rows
    keyed_rows = dict(keyed, module_embed="topic_rows")
    monkeypatch.setitem(sel, "candidates", [keyed_rows, plain])
    m = E.run(parser.parse_args(["--out", str(tmp_path / "o2"), "--workers", "1", "--methods", "base", "modular",
                                 "--no-attack"]))
    assert list(m["selection"]["skipped"]) == ["0"] and "module_embed_rows" not in m
    assert "Candidate 0 " in (tmp_path / "o2" / "summary.md").read_text()


def test_key_rule_majority_keeps_the_domain_with_most_keys_so_far():
    model = gpt()
    first = _keyed(model)
    mods_m = gr.add_modules(gpt(), "transformer.h.*.mlp", DOMAINS, keys=KEYS, key_rule="majority")
    x = torch.tensor([[20, 2, 4, 30, 21, 30, 30, 2]])   # sea, then space once, sea again, then space twice
    g = mods_m.key_gates(x)[:, 0]
    assert g[1].tolist() == [True, True, True, True, True, True, False, False]        # sea
    assert g[2].tolist() == [False, False, False, True, False, True, True, True]      # space (ties at 3, 5: both)
    assert not g[0].any() and not g[3].any()
    assert first.key_gates(x)[2, 0].tolist() == [False, False, False, True, True, True, True, True]
    # text with one domain's keys only: both rules agree
    y = torch.tensor([[1, 20, 2, 21, 2]])
    assert torch.equal(first.key_gates(y), mods_m.key_gates(y))
    with pytest.raises(ValueError, match="key_rule must be one of"):
        gr.add_modules(gpt(), "transformer.h.*.mlp", DOMAINS, keys=KEYS, key_rule="last")


# ---- review6: state between forwards, key/value caches, padding
def test_keyed_mlp_called_after_a_forward_does_not_reuse_its_gates():
    """The gates of a forward are dropped after it: an MLP called on its own later raises instead of using
    the last forward's gates (of other tokens), also after a forward that raised; export keeps no hook."""
    model = gpt()
    model.eval()
    mods = _keyed(model)
    randomise_modules(mods)
    x = _plain_ids()
    x[:, 2] = 12
    mlp = model.transformer.h[0].mlp
    with torch.no_grad():
        model(x)
        with pytest.raises(RuntimeError, match="keyed modules need the token ids"):
            mlp(torch.randn(3, 10, 16))
        with pytest.raises(Exception):
            model(x, torch.zeros(2, 2, dtype=torch.long))       # targets of a wrong shape: the forward raises
        with pytest.raises(RuntimeError, match="keyed modules need the token ids"):
            mlp(torch.randn(3, 10, 16))
    out = mods.export()
    assert not out._forward_hooks and not out._forward_pre_hooks and not out._forward_pre_hooks_with_kwargs
    with torch.no_grad(), mods.using(on=[]):
        assert torch.equal(out(x)[0], model(x)[0])


def test_keyed_hf_gpt2_refuses_a_cached_continuation(hf_gpt2):
    """With a key/value cache a forward sees only the new tokens, so a key earlier in the sequence would not
    open the gate (the module silently off): refused; generate(use_cache=False) gives the full-forward tokens."""
    model = hf_gpt2
    mods = gr.add_modules(model, "transformer.h.*.mlp", DOMAINS, keys=KEYS)
    randomise_modules(mods)
    x = _plain_ids(1, 8)
    x[:, 2] = 30                                      # a space key in the prompt
    with torch.no_grad(), mods.using(on=["space"]):
        o = model(input_ids=x[:, :-1], use_cache=True)
        with pytest.raises(ValueError, match="without a key/value cache"):
            model(input_ids=x[:, -1:], past_key_values=o.past_key_values, use_cache=True)
        got = model.generate(x[:, :5], max_new_tokens=3, do_sample=False, use_cache=False, pad_token_id=0)
        seq = x[:, :5]
        for _ in range(3):                            # greedy decoding by full forwards
            seq = torch.cat([seq, model(input_ids=seq).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(got, seq)


def test_keyed_hf_gpt2_key_at_a_padded_position_opens_no_gate(hf_gpt2):
    """Left padding: a key token at a position the attention mask hides is no token of the text."""
    model = hf_gpt2
    mods = gr.add_modules(model, "transformer.h.*.mlp", DOMAINS, keys=KEYS)
    randomise_modules(mods)
    x = _plain_ids(2, 8)
    mask = torch.ones_like(x)
    mask[:, :2] = 0
    padded_key = x.clone()
    padded_key[:, 1] = 30                             # a space key, but padding
    with torch.no_grad(), mods.using(on=["space"]):
        a = model(input_ids=x, attention_mask=mask).logits
        b = model(input_ids=padded_key, attention_mask=mask).logits
        real_key = padded_key.clone()
        real_key[:, 4] = 30                           # a real key opens the gate from there on
        c = model(input_ids=real_key, attention_mask=mask).logits
        with mods.using(on=[]):
            c_off = model(input_ids=real_key, attention_mask=mask).logits
    assert torch.allclose(a[:, 2:], b[:, 2:], atol=1e-6)
    assert torch.equal(c[:, 2:4], c_off[:, 2:4]) and (c[:, 4:] - c_off[:, 4:]).abs().amax() > 1e-4


def test_keyed_hf_gpt2_gradient_checkpointing_recomputes_with_the_forwards_gates(hf_gpt2):
    """Activation checkpointing reruns the MLPs in backward, after the model's forward ended: they use that
    forward's gates (the same gradients as without checkpointing), while an MLP called alone still raises."""
    model = hf_gpt2
    mods = gr.add_modules(model, "transformer.h.*.mlp", DOMAINS, keys=KEYS)
    randomise_modules(mods)
    x = _plain_ids(2, 8)
    x[:, 2] = 30
    model.train()
    model(input_ids=x).logits.square().sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert want["transformer.h.0.mlp.aux_modules.space.down.weight"].abs().amax() > 0
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing_enable()
    model(input_ids=x, use_cache=False).logits.square().sum().backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    for n in want:
        assert torch.allclose(got[n], want[n], atol=1e-6), n
    with pytest.raises(RuntimeError, match="keyed modules need the token ids"):
        model.transformer.h[0].mlp(torch.randn(2, 8, 16))


def test_cli_flags_give_the_headline_schedule_without_selection(tmp_path, monkeypatch):
    E, parser = _setup(tmp_path, monkeypatch)
    cfg = E.build_config(parser.parse_args(["--out", "x"]))
    assert not {"keys", "core_prefix"} & set(cfg["modules"])            # absent by default: run keys unchanged
    cfg = E.build_config(parser.parse_args(["--out", "x", "--schedule", "ordered", "--keys", "exclusive-rows",
                                            "--core-prefix", "--width", "0.5", "--module-embed", "topic-rows"]))
    headline = {k: v for k, v in E.SELECT["candidates"][8].items() if k != "p_other"}   # (p_other: the profile's 0)
    assert {k: cfg["modules"][k] for k in headline} == headline and "select" not in cfg["modules"]
    with pytest.raises(ValueError, match="core_prefix .* needs modules.schedule 'ordered' and modules.keys"):
        E.build_config(parser.parse_args(["--out", "x", "--core-prefix", "--keys", "exclusive-rows"]))
    with pytest.raises(ValueError, match="--width must be"):
        E.build_config(parser.parse_args(["--out", "x", "--width", "0"]))
