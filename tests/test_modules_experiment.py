"""The module-routing experiment (``gradroute run modules``): the topic corpus, the compute ratio, the selection
rule and stage, the flags and run keys, keys and embedding rows from the training split, the ordered schedule,
the attached release; end-to-end runs at toy size are marked slow."""
import hashlib
import math
import re

import pytest
import torch

import gradroute as gr
from gradroute.modules import GENERAL, UNLABELLED


def test_default_story_generator_output_unchanged():
    from gradroute.lm.corpus import generate_stories

    text = "\x00".join(generate_stories(500, seed=0) + generate_stories(300, seed=7, start=40, topic_fraction=0.5))
    # sha256 of the same call on main before the multi-topic generator was added
    assert hashlib.sha256(text.encode()).hexdigest() == \
        "168001f0019bbdb033d8237a87446eb81e6352f88a3810f6328823becf3a1592"


def test_topic_generator():
    from gradroute.lm.corpus import TOPICS, generate_topic_stories

    texts, labels = generate_topic_stories(1000, seed=0)
    assert (texts, labels) == generate_topic_stories(1000, seed=0)
    assert generate_topic_stories(10, seed=0, start=5) == (texts[5:15], labels[5:15])
    counts = {k: labels.count(k) for k in range(-1, 4)}
    assert all(60 < counts[k] < 140 for k in range(4)) and counts[-1] > 500
    for k, name in enumerate(TOPICS):
        own = [t for t, l in zip(texts, labels) if l == k]
        scenes = [s.split("{A}")[-1].rstrip(".") for s in TOPICS[name]["scenes"]]
        assert all(any(s in t for s in scenes) for t in own), name
        others = [t for t, l in zip(texts, labels) if l != k]
        assert not any(s in t for s in scenes for t in others[:200]), name
    with pytest.raises(ValueError, match="unknown topics"):
        generate_topic_stories(2, topics=("moon",))
    with pytest.raises(ValueError, match="topic_fraction"):
        generate_topic_stories(2, topic_fraction=0.5)


def test_default_topic_generator_output_unchanged():
    from gradroute.lm.corpus import generate_topic_stories

    texts, labels = generate_topic_stories(4000, seed=0)
    # sha256 of the same call on main before the topic_vocab option was added
    assert hashlib.sha256(("\n".join(texts[:500]) + str(labels[:500])).encode()).hexdigest() == \
        "246313ad0686f0e7e4343105eb12440a471a1b11fab5de8b80fde060e4581739"
    assert (texts, labels) == generate_topic_stories(4000, seed=0, topic_vocab="own")


def _words(text):
    return set(re.findall(r"[A-Za-z]+|[^\sA-Za-z]", text))


def test_shared_topic_vocabulary_uses_only_general_words():
    import copy

    from gradroute.lm import corpus as C

    before = copy.deepcopy(C.TOPICS)
    own_t, own_l = C.generate_topic_stories(3000, seed=0)
    texts, labels = C.generate_topic_stories(3000, seed=0, topic_vocab="shared")
    assert C.TOPICS == before                          # the own table is not touched
    assert labels == own_l                             # same labels and general stories
    assert all(a == b for a, b, l in zip(own_t, texts, labels) if l == C.GENERAL_TOPIC)
    general = set().union(*(_words(t) for t, l in zip(texts, labels) if l == C.GENERAL_TOPIC))
    shared_topic = [t for t, l in zip(texts, labels) if l != C.GENERAL_TOPIC]
    own_topic = [t for t, l in zip(own_t, own_l) if l != C.GENERAL_TOPIC]
    assert len(shared_topic) > 800
    for t in shared_topic:                             # every word of a shared-topic story is general
        assert _words(t) <= general, (t, _words(t) - general)
    assert all(_words(t) - general for t in own_topic)  # while own-vocabulary topics are not
    # the topics differ: each uses its own share of the general events, none of another topic's
    for k, name in enumerate(C.TOPIC_NAMES):
        mine = [e.split("{A}")[-1].split("{")[0] for e in C.SHARED_TOPICS[name]["events"]]
        stories = [t for t, l in zip(texts, labels) if l == k]
        assert stories and all(any(e in t for e in mine) for t in stories), name
        for j, other in enumerate(C.TOPIC_NAMES):
            if j != k:
                assert not set(C.SHARED_TOPICS[name]["events"]) & set(C.SHARED_TOPICS[other]["events"])
                assert not set(C.SHARED_TOPICS[name]["dialogue"]) & set(C.SHARED_TOPICS[other]["dialogue"])
                assert not set(C.SHARED_TOPICS[name]["places"]) & set(C.SHARED_TOPICS[other]["places"])
    with pytest.raises(ValueError, match="topic_vocab"):
        C.generate_topic_stories(2, topic_vocab="mixed")


def test_compute_ratio_inverts_the_fitted_curve():
    from gradroute.experiments.modules import CR_CAP, compute_ratio, fit_power_law

    steps = [10, 20, 40, 80, 160, 320]
    losses = [2.0 + 5.0 * s ** -0.7 for s in steps]
    fit = fit_power_law(steps, losses)
    assert fit["rmse"] < 1e-3
    for s in (15, 100, 320):
        assert compute_ratio(2.0 + 5.0 * s ** -0.7, fit, 320) == pytest.approx(s / 320, rel=0.02)
    assert compute_ratio(fit["c"] - 0.1, fit, 320) == CR_CAP


def test_experiment_labels_and_filters():
    from gradroute.experiments.modules import allowed_for, routing_labels, unlabelled_subset

    labels = torch.tensor([0, 1, -1, 3, -1, 0])
    unl = torch.tensor([True, False, True, False, False, False])
    assert routing_labels(labels, None).tolist() == [0, 1, GENERAL, 3, GENERAL, 0]
    assert routing_labels(labels, unl).tolist() == [UNLABELLED, 1, UNLABELLED, 3, GENERAL, 0]
    assert allowed_for("filter_forest", labels, unl).tolist() == [False, True, True, True, True, False]
    assert allowed_for("filter_all", labels, unl).tolist() == [False, False, True, False, True, False]
    # partial: only labelled topic stories are dropped
    assert allowed_for("filter_partial", labels, unl).tolist() == [True, False, True, False, True, False]
    assert allowed_for("modular", labels, unl) is None
    m = unlabelled_subset(1000, 0.5, seed=3)
    assert int(m.sum()) == 500 and torch.equal(m, unlabelled_subset(1000, 0.5, seed=3))


def test_select_schedule_rule():
    from gradroute.experiments.modules import SETS, TOPIC_NAMES, config_name, select_schedule

    def cand(off_topic, elsewhere, own=1.0):
        """val losses: all on 1.0 everywhere; with one module off its topic at off_topic, others moved;
        with only one module on, its topic at ``own``."""
        res = {}
        for on in [tuple(TOPIC_NAMES)] + [tuple(x for x in TOPIC_NAMES if x != t) for t in TOPIC_NAMES] + \
                [(t,) for t in TOPIC_NAMES]:
            row = {n: 1.0 for n in SETS}
            for t in TOPIC_NAMES:
                if t not in on and len(on) == len(TOPIC_NAMES) - 1:
                    row = {n: (off_topic if n == t else 1.0 + elsewhere) for n in SETS}
            if len(on) == 1:
                row[on[0]] = own
            res[config_name(on)] = row
        return res
    filt = {t: 4.0 for t in TOPIC_NAMES}
    # candidate 0: weak removal but no interference; 1: removal ok, interference 0.3; 2: removal ok, 0.1
    out = select_schedule([cand(2.0, 0.0), cand(3.8, 0.3), cand(3.7, -0.1)], filt, removal=0.9)
    assert out["chosen"] == 2 and out["any_removal_ok"]
    assert [r["removal_ok"] for r in out["rows"]] == [False, True, True]
    assert out["rows"][1]["interference"] == pytest.approx(0.3)
    # none removes enough: the strongest removal is taken
    out = select_schedule([cand(2.0, 0.0), cand(3.0, 0.5)], filt, removal=0.9)
    assert out["chosen"] == 1 and not out["any_removal_ok"]
    # usefulness (own module only vs base): a candidate that removes but whose modules did not learn
    # their topic does not qualify; the useful one with removal ok is taken despite more interference
    base = {t: 1.0 for t in TOPIC_NAMES}
    out = select_schedule([cand(3.8, 0.1, own=3.0), cand(3.7, 0.3, own=1.05)], filt, 0.9, base, useful=1.1)
    assert out["chosen"] == 1 and out["any_qualifies"]
    assert [r["useful_ok"] for r in out["rows"]] == [False, True]
    assert out["rows"][0]["useful_ratio_max"] == pytest.approx(3.0)
    # nobody qualifies: the smallest worst shortfall (removal 0.9/0.5 = 1.8 vs usefulness 1.5/1.1 = 1.36)
    out = select_schedule([cand(4.0, 0.0, own=5.0), cand(2.0, 0.0, own=1.0), cand(3.2, 0.2, own=1.5)], filt, 0.9,
                          base, useful=1.1)
    assert not out["any_qualifies"] and out["chosen"] == 2
    assert out["rows"][2]["shortfall"] == pytest.approx(1.5 / 1.1)


def test_interference_by_token_splits_shared_and_topic_only(modkit):
    from gradroute.experiments.modules import SETS, TOPIC_NAMES, general_token_ids, interference_by_token
    from gradroute.lm.data import Stories

    g = torch.Generator().manual_seed(0)

    def stories(lo, hi, n=3, T=16):
        x = torch.randint(lo, hi, (n, T), generator=g)
        y = torch.cat([x[:, 1:], torch.full((n, 1), -100)], 1)
        z = torch.zeros(n, dtype=torch.bool)
        return Stories(x, y, torch.zeros_like(x, dtype=torch.bool), z, z)
    # general stories use tokens 0..31; topic stories 0..63 (so 32..63 are topic-only)
    train = stories(0, 32, n=4)
    labels = torch.full((4,), -1)
    shared = general_token_ids(train, labels, 64)
    assert shared[:32].any() and not shared[32:].any()
    sets = {n: stories(0, 64) for n in TOPIC_NAMES}
    sets["general"] = train
    model = modkit.gpt()
    mods = gr.add_modules(model, "transformer.h.*.mlp", list(TOPIC_NAMES))
    model.eval()
    res = interference_by_token(model, mods, sets, shared)
    assert set(res) == set(TOPIC_NAMES) and all(t not in res[t] for t in TOPIC_NAMES)
    assert all(v["all"] == 0.0 for a in res for v in res[a].values())      # zero-initialised modules: no effect
    modkit.randomise_modules(mods)
    res = interference_by_token(model, mods, sets, shared)
    d = res["forest"]["sea"]
    assert d["all"] != 0.0
    f = d["topic_only_fraction"]
    assert 0 < f < 1 and d["all"] == pytest.approx((1 - f) * d["shared"] + f * d["topic_only"], abs=1e-5)
    assert res["forest"]["general"]["topic_only"] is None and res["forest"]["general"]["topic_only_fraction"] == 0


@pytest.mark.slow
def test_experiment_end_to_end_tiny(modkit, tmp_path, monkeypatch):
    E, parser = modkit.tiny_experiment(tmp_path, monkeypatch, steps=8, curve_points=4,
                                 modules=dict(width=0.1, p_cr=1.0, p_as=0.25), attack_rounds=3)
    args = parser.parse_args(["--out", str(tmp_path / "o"), "--workers", "1", "--methods", "base", "modular",
                              "filter_sea", "demix", "modular_partial", "filter_partial"])
    m = E.run(args)
    T = m["summary"]["table"]
    assert len(T["modular"]) == 16 and len(T["demix"]) == 16
    assert set(T["modular"]["none"]) == set(E.SETS)
    assert "sea" in m["summary"]["attack_topic"] and set(m["summary"]["attack"]) == {"modular", "filter_sea",
                                                                                      "ascent", "base"}
    assert any("single module off" in k for k in m["claims"])
    assert any("50% unlabelled" in k for k in m["claims"])     # the partial-label claim is checked
    rep = E.report(tmp_path / "o")
    assert rep["figures"] and rep["table"]["rows"] and rep["verdict"] in ("reproduced", "partly", "not")
    assert (tmp_path / "o" / "modular_config_heatmap.png").exists()
    again = E.run(args)           # resumable: finished runs are loaded, not retrained
    assert again["summary"]["table"]["modular"] == T["modular"]


@pytest.mark.slow
def test_experiment_selects_schedule_on_validation(modkit, tmp_path, monkeypatch):
    sel = dict(seeds=[7], removal=0.9, useful=1.1, candidates=[dict(p_cr=1.0, p_as=0.5, spread="one"),
                                                   dict(p_cr=0.7, p_as=0.5, spread="each")])
    E, parser = modkit.tiny_experiment(tmp_path, monkeypatch, steps=6, curve_points=3,
                                 modules=dict(width=0.1, p_cr=0.5, p_as=0.1, spread="one", select=sel),
                                 attack_rounds=2)
    args = parser.parse_args(["--out", str(tmp_path / "o"), "--workers", "1", "--methods", "base", "modular",
                              "--no-attack"])
    m = E.run(args)
    s = m["selection"]
    assert s["seeds"] == [7] and len(s["rows"]) == 2 and s["schedule"] == sel["candidates"][s["chosen"]]
    # the headline runs use the chosen schedule, and the selection runs are separate (val split, seed 7)
    assert {k: m["config"]["modules"][k] for k in ("p_cr", "p_as", "spread")} == s["schedule"]
    assert (tmp_path / "o" / "select" / "c1" / "runs" / "modular_s7.json").exists()
    # usefulness needs the base model of the selection seed (trained with the filters)
    assert (tmp_path / "o" / "select" / "filters" / "runs" / "base_s7.json").exists()
    assert all(r["useful_ratio_max"] > 0 for r in s["rows"]) and s["useful"] == 1.1
    assert "interference_by_token" in m["runs"]["modular_s0"]
    assert "val_configs" in m["runs"]["modular_s0"] and set(m["seeds"]) == {0}
    # an explicit schedule skips selection; a selection seed that is also an evaluation seed is refused
    args2 = parser.parse_args(["--out", str(tmp_path / "o2"), "--workers", "1", "--methods", "modular",
                               "--no-attack", "--p-cr", "1.0", "--seeds", "0"])
    assert E.run(args2)["selection"] is None
    args3 = parser.parse_args(["--out", str(tmp_path / "o3"), "--workers", "1", "--methods", "modular",
                               "--no-attack", "--seeds", "7"])
    with pytest.raises(ValueError, match="evaluation seeds"):
        E.run(args3)


@pytest.mark.slow
def test_topic_vocab_flag_reaches_config_report_and_run_key(modkit, tmp_path, monkeypatch):
    E, parser = modkit.tiny_experiment(tmp_path, monkeypatch, steps=2, curve_points=2,
                                 modules=dict(width=0.1, p_cr=1.0, p_as=0.5), attack_rounds=1)
    assert parser.parse_args(["--out", "x"]).topic_vocab == "own"
    assert E.build_config(parser.parse_args(["--out", "x"]))["corpus"]["topic_vocab"] == "own"
    common = ["--out", str(tmp_path / "o"), "--workers", "1", "--methods", "base", "modular", "--no-attack"]
    m = E.run(parser.parse_args([*common, "--topic-vocab", "shared"]))
    assert m["config"]["corpus"]["topic_vocab"] == "shared" and m["summary"]["topic_vocab"] == "shared"
    assert "Topic vocabulary: shared" in (tmp_path / "o" / "summary.md").read_text()
    assert "topic vocabulary shared" in E.report(tmp_path / "o")["detail"]
    run_file = tmp_path / "o" / "runs" / "base_s0.json"
    assert E.read_json(run_file)["config"]["corpus"]["topic_vocab"] == "shared"
    # the same out directory with the other vocabulary retrains instead of resuming the shared runs
    own = E.run(parser.parse_args(common))
    assert E.read_json(run_file)["config"]["corpus"]["topic_vocab"] == "own"
    assert own["runs"]["base_s0"]["val_losses"] != m["runs"]["base_s0"]["val_losses"]
    with pytest.raises(SystemExit):
        parser.parse_args([*common, "--topic-vocab", "mixed"])


@pytest.mark.slow
def test_partial_label_runs_use_the_official_partial_schedule(modkit, tmp_path, monkeypatch):
    E, parser = modkit.tiny_experiment(tmp_path, monkeypatch, steps=2, curve_points=2,
                                 modules=dict(width=0.1, p_cr=0.7, p_as=0.5, spread="each", p_other=0.5,
                                              partial=dict(p_cr=1.0, p_as=0.2, spread="one", p_other=0.0)),
                                 attack_rounds=1)
    seen = {}
    real = E.modular_loss

    def spy(mods, route_labels, p_cr, p_as, seed, spread="one", p_other=0.0):
        seen[bool((route_labels == UNLABELLED).any())] = (p_cr, p_as, spread, p_other)
        return real(mods, route_labels, p_cr, p_as, seed, spread, p_other=p_other)
    monkeypatch.setattr(E, "modular_loss", spy)
    args = parser.parse_args(["--out", str(tmp_path / "o"), "--workers", "1", "--methods", "modular",
                              "modular_partial", "--no-attack"])
    E.run(args)
    assert seen == {False: (0.7, 0.5, "each", 0.5), True: (1.0, 0.2, "one", 0.0)}
    assert E.PROFILES["paper"]["modules"]["partial"] == E.PARTIAL


@pytest.mark.slow
def test_p_other_flag_reaches_config_and_run_key(modkit, tmp_path, monkeypatch):
    """--p-other is part of the config and of every run's resume key; p_other 0 trains exactly the
    model that the schedule without p_other trains."""
    E, parser = modkit.tiny_experiment(tmp_path, monkeypatch, steps=3, curve_points=2,
                                 modules=dict(width=0.1, p_cr=0.7, p_as=0.5, spread="one"), attack_rounds=1)
    cfg = E.build_config(parser.parse_args(["--out", "x", "--p-other", "0.5"]))
    assert cfg["modules"]["p_other"] == 0.5 and "select" not in cfg["modules"]
    assert E.PROFILES["paper"]["modules"]["p_other"] == 0.0 and E.PARTIAL["p_other"] == 0.0
    with pytest.raises(ValueError, match="p-other"):
        E.build_config(parser.parse_args(["--out", "x", "--p-other", "2"]))
    common = ["--out", str(tmp_path / "o"), "--workers", "1", "--methods", "modular", "--no-attack"]
    without = E.run(parser.parse_args(common))["runs"]["modular_s0"]
    run_file = tmp_path / "o" / "runs" / "modular_s0.json"
    assert "p_other" not in E.read_json(run_file)["config"]["modules"]
    zero = E.run(parser.parse_args([*common, "--p-other", "0"]))["runs"]["modular_s0"]
    assert E.read_json(run_file)["config"]["modules"]["p_other"] == 0.0        # retrained under its own key
    assert zero["configs"] == without["configs"] and zero["val_configs"] == without["val_configs"]
    one = E.run(parser.parse_args([*common, "--p-other", "1"]))
    assert E.read_json(run_file)["config"]["modules"]["p_other"] == 1.0
    assert one["runs"]["modular_s0"]["configs"] != without["configs"]
    assert "p_other 1.0" in E.report(tmp_path / "o")["detail"]


# ------------------------------------------------------------------ keys and embedding rows


def test_topic_only_token_ids_from_labelled_training_stories(modkit, tmp_path, monkeypatch):
    E, parser = modkit.tiny_experiment(tmp_path, monkeypatch, steps=2, curve_points=2,
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


@pytest.mark.slow
def test_module_embed_topic_rows_flag_config_run_key_metrics_and_attack(modkit, tmp_path, monkeypatch):
    E, parser = modkit.tiny_experiment(tmp_path, monkeypatch, steps=3, curve_points=2,
                                 modules=dict(width=0.1, p_cr=1.0, p_as=0.5, spread="one"), attack_rounds=1)
    monkeypatch.setitem(E.PROFILES["quick"], "vocab_size", 600)   # at 300 every token occurs in general stories
    build = lambda *a: E.build_config(parser.parse_args(["--out", "x", *a]))["modules"]
    assert "module_embed" not in build()
    assert build("--keys", "topic-rows", "--module-embed", "topic-rows")["module_embed"] == "topic_rows"
    for gone in ([], ["vocab"], ["exclusive-rows"]):                  # the deleted variants are gone
        with pytest.raises(SystemExit):
            build("--keys", "topic-rows", "--module-embed", *gone)
    with pytest.raises(ValueError, match="module_embed 'topic_rows' .* needs modules.keys"):
        build("--module-embed", "topic-rows")
    with pytest.raises(ValueError, match="module_embed must be 'topic_rows'"):
        E._module_embed({"module_embed": "rows", "keys": "topic_rows"})
    common = ["--out", str(tmp_path / "o"), "--workers", "1", "--methods", "modular", "--keys", "topic-rows"]
    full = E.run(parser.parse_args([*common, "--no-attack"]))
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
    assert "modular" in m["attacks"]["0"]["attack"] and m["attacks"]["0"]["release"] == "attached"
    assert "own token rows" in E.report(tmp_path / "o")["detail"]


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
    assert as_lists(E.keys_for("exclusive_rows", data, route, 12)) == as_lists(excl)
    assert as_lists(E.keys_for("topic_rows", data, route, 12)) == as_lists(E.topic_only_token_ids(data, route, 12))
    assert as_lists(E.embed_rows_for("topic_rows", data, route, 12)) == as_lists(E.topic_only_token_ids(data, route, 12))
    assert E.embed_rows_for(False, data, route, 12) is None and E.keys_for(None, data, route, 12) is None
    # a topic with no token of its own is a clear error naming the option and the topic
    route2 = route.clone()
    route2[4] = 0                                   # the dinosaur story becomes forest: dinosaurs has no story
    with pytest.raises(ValueError, match=f"exclusive_rows: topic {dino}"):
        E.topic_only_token_ids(data, route2, 12, exclusive=True)
    data.x[1, 0], data.y[1, 2] = 5, 5               # forest's only exclusive token (6) becomes sea's 5
    with pytest.raises(ValueError, match=f"exclusive_rows: topic {forest}"):
        E.topic_only_token_ids(data, route, 12, exclusive=True)
    assert E.topic_only_token_ids(data, route, 12)[forest].tolist() == [4, 5]   # still topic-only rows


def _units(state):
    """Units of the forest module in block 0 (rows of its ``up`` weight)."""
    return state["transformer.h.0.mlp.aux_modules.forest.up.weight"].shape[0]


@pytest.mark.slow
def test_candidate_width_reaches_run_key_headline_and_attack(modkit, tmp_path, monkeypatch):
    """A selection candidate's ``width`` trains that candidate at that width (absent: the profile's),
    is part of its run key (a run at another width is retrained, never reused), and, when chosen,
    is the headline model's width, with which the attack stage reloads it."""
    E, parser = modkit.tiny_experiment(tmp_path, monkeypatch, steps=3, curve_points=2,
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
    ([dict(p_cr=1.0), dict(module_embed="topic-rows", keys="topic_rows")], r"candidates\[1\]: modules.module_embed must be"),
    ([dict(module_embed="topic_rows")], r"candidates\[0\]: .*needs modules.keys"),
    ([dict(keys=True)], r"candidates\[0\]: modules.keys must be 'topic_rows' or 'exclusive_rows'"),
    ([dict(p_cr=1.5)], r"candidates\[0\]: p_cr must be a number in \[0, 1\], got 1.5"),
    ([dict(p_other=-0.1)], "p_other must be a number"),
    ([dict(spread="all")], "spread must be 'one' or 'each'"),
    # the deleted designs' keys are unknown now
    ([dict(embed_free=True)], r"unknown key\(s\) \['embed_free'\]"),
    ([dict(schedule="ordered", p_cr=1.0, p_as=0.0, lam=1.0)], r"unknown key\(s\) \['lam'\]"),
    ([dict(schedule="ordered", p_cr=1.0, p_as=0.0, gated=True)], r"unknown key\(s\) \['gated'\]"),
])
def test_bad_selection_candidates_are_clear_errors(cands, match):
    from gradroute.experiments import modules as E
    with pytest.raises(ValueError, match=match):
        E.check_candidates(cands)
    E.check_candidates([dict(p_cr=1.0, width=0.5)] * 12)            # up to 12, with widths, is fine
    E.check_candidates(E.SELECT["candidates"])                       # the defaults pass


# ------------------------------------------------------------------ the ordered schedule


def _setup(modkit, tmp_path, monkeypatch, steps=6):
    E, parser = modkit.tiny_experiment(tmp_path, monkeypatch, steps=steps, curve_points=2,
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


def test_phases_split_exactly_the_single_phase_batches(modkit, tmp_path, monkeypatch):
    E, parser = _setup(modkit, tmp_path, monkeypatch)
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


def _ordered_model(modkit, tmp_path, monkeypatch):
    """A tiny keyed modular model with topic-row deltas and randomised modules (so
    weight decay or a stray step would move them), with its experiment, config, data and routing labels."""
    E, parser = _setup(modkit, tmp_path, monkeypatch)
    cfg = E.build_config(parser.parse_args(["--out", "x"]))
    tok, data, labels, _, _ = E._prepare(E._cfg_key(cfg))
    rl = E.routing_labels(labels, None)
    model = E.make_model(E._spec(cfg, tok.vocab_size), 0)
    rows = E.embed_rows_for("topic_rows", data, rl, tok.vocab_size)
    keys = E.keys_for("topic_rows", data, rl, tok.vocab_size)
    mods = E.attach_modules(model, cfg, "modular", embed_rows=rows, keys=keys)
    modkit.randomise_modules(mods)
    return E, cfg, model, mods, data, rl


def test_phase1_never_updates_modules_phase2_never_updates_the_core(modkit, tmp_path, monkeypatch):
    E, cfg, model, mods, data, rl = _ordered_model(modkit, tmp_path, monkeypatch)
    mod, core = mods.module_params(), mods.core_params()
    snaps, calls = [], []
    real = E.train

    def spy(m, batch_at, c, **kw):
        before = (modkit.snapshot(core), modkit.snapshot(mod))
        log = real(m, batch_at, c, **kw)
        snaps.append((before, (modkit.snapshot(core), modkit.snapshot(mod))))
        calls.append([batch_at(s).index for s in range(c.steps)])
        return log
    monkeypatch.setattr(E, "train", spy)
    res = E.train_ordered(model, mods, data, E._order(cfg, data, 0), rl, dict(cfg["train"]), 0, p_other=0.5)
    assert len(snaps) == 2 and res["steps"] == [len(calls[0]), len(calls[1])]
    (c0, m0), (c1, m1) = snaps[0]
    assert modkit.same(m0, m1), "phase 1 moved a module"
    assert not modkit.same(c0, c1), "phase 1 did not train the core"
    (c1b, m1b), (c2, m2) = snaps[1]
    assert modkit.same(c1b, c2), "phase 2 moved the core"
    assert all(not torch.equal(a, b) for a, b in zip(m1b, m2)), "phase 2 left a module (or delta) unchanged"
    assert all((rl[i] < 0).all() for i in calls[0]) and all((rl[i] >= 0).all() for i in calls[1])
    for p in model.parameters():             # the loop gives back every parameter trainable
        assert p.requires_grad


@pytest.mark.slow
def test_ordered_flag_config_run_key_and_candidates(modkit, tmp_path, monkeypatch):
    E, parser = _setup(modkit, tmp_path, monkeypatch, steps=4)
    build = lambda *a: E.build_config(parser.parse_args(["--out", "x", *a]))["modules"]
    assert "schedule" not in build()                                   # default configs unchanged
    m = build("--schedule", "ordered")
    assert m["schedule"] == "ordered" and m["p_cr"] == 1.0 and m["p_as"] == 0.0 and "select" not in m
    assert "schedule" not in build("--schedule", "single")
    with pytest.raises(ValueError, match="needs p_cr 1.0 and p_as 0.0"):
        build("--schedule", "ordered", "--p-cr", "0.7")
    with pytest.raises(ValueError, match="modules.schedule must be one of"):
        E._schedule({"schedule": "two-phase"})
    E.check_candidates([dict(schedule="ordered", p_cr=1.0, p_as=0.0, p_other=0.5, module_embed="topic_rows",
                             keys="topic_rows")])
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


def test_core_prefix_phase1_learns_topic_openings_only(modkit, tmp_path, monkeypatch):
    E, parser = _setup(modkit, tmp_path, monkeypatch)
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


@pytest.mark.slow
def test_keys_key_checks_run_key_and_partial(modkit, tmp_path, monkeypatch):
    E, parser = _setup(modkit, tmp_path, monkeypatch)
    O = dict(schedule="ordered", p_cr=1.0, p_as=0.0, module_embed="topic_rows", keys="topic_rows")
    E.check_candidates([O, dict(O, keys="exclusive_rows"), dict(keys="topic_rows")])
    with pytest.raises(ValueError, match=r"candidates\[0\]: modules.keys must be 'topic_rows' or 'exclusive_rows'"):
        E.check_candidates([dict(O, keys=True)])
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


@pytest.mark.slow
def test_keyed_headline_attacks_the_attached_release(modkit, tmp_path, monkeypatch):
    """Keyed modules cannot be merged into a stock model: the attack runs on the modular model with
    the attacked topic's module zeroed and switched off, the others on; before the attack it computes what
    the modular model does in that configuration."""
    import json
    E, parser = _setup(modkit, tmp_path, monkeypatch, steps=4)
    real = E.build_config

    def keyed_config(args):
        cfg = real(args)
        cfg["modules"].update(keys="topic_rows", module_embed="topic_rows")
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


@pytest.mark.slow
def test_selection_skips_candidates_that_cannot_be_built_on_the_corpus(modkit, tmp_path, monkeypatch):
    """At vocabulary 300 every token occurs in general stories: a keyed candidate has no key to use
    (as on the shared-vocabulary topics); the selection records why and chooses among the others."""
    keyed = dict(schedule="ordered", p_cr=1.0, p_as=0.0, keys="exclusive_rows", core_prefix=True)
    plain = dict(p_cr=1.0, p_as=0.5, spread="one")
    sel = dict(seeds=[7], removal=0.9, useful=1.1, candidates=[keyed, plain])
    E, parser = modkit.tiny_experiment(tmp_path, monkeypatch, steps=4, curve_points=2,
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


def test_cli_flags_give_the_headline_schedule_without_selection(modkit, tmp_path, monkeypatch):
    E, parser = _setup(modkit, tmp_path, monkeypatch)
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
