"""`gradroute run token-routing`: token selection is deterministic, routed tokens reach only the
chosen MLP units, ablation is complete (inputs and outputs), a tiny end-to-end run."""
import json

import numpy as np
import pytest
import torch

from gradroute.cli import main
from gradroute.experiments import token_routing as T
from gradroute.lm.corpus import generate_stories
from gradroute.lm.analysis import fmt_ci, intervals_separate, whole_word_ids, whole_word_rates
from gradroute.lm.data import IGNORE, Batch, Stories, encode_stories
from gradroute.lm.tokenizer import get_tokenizer
from gradroute.models import GPT, GPTConfig

TINY = dict(
    corpus=dict(n_train=150, n_eval=8, n_attack=4, n_general_train=8, vocab_size=300),
    model=dict(n_ctx=48, n_layer=2, n_head=2, d_model=16, d_mlp=32),
    train=dict(steps=2, lr=1e-2, warmup=1), batch_size=8,
    route=dict(n_tokens=4, min_count=2, blocks=1, units=8, tokens="whole-words", min_whole_rate=0.9),
    finetune=dict(steps=2, lr=1e-3, batch_size=4),
    attack=dict(docs=2, steps=2, lr=1e-3, repeats=2), seeds=2)


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    monkeypatch.setitem(T.PROFILES, "tiny", TINY)
    monkeypatch.setenv("GRADROUTE_CACHE", str(tmp_path / "cache"))


def _model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, n_ctx=16, n_layer=3, n_head=2, d_model=16, d_mlp=32))


def test_token_selection_deterministic(tiny, tmp_path):
    texts = generate_stories(200, seed=3)
    tok = get_tokenizer("bpe", texts=texts, vocab_size=700, cache=tmp_path / "tok")
    data = encode_stories(tok, texts, 64)
    a = T.select_topic_tokens(data, tok.vocab_size, 10, 3, exclude=(tok.eot_id,))
    b = T.select_topic_tokens(data, tok.vocab_size, 10, 3, exclude=(tok.eot_id,))
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    c = T.select_topic_tokens(data.subset(perm), tok.vocab_size, 10, 3, exclude=(tok.eot_id,))
    assert a == b == c and len(set(a)) == 10 and tok.eot_id not in a
    words = {tok.decode([i]).strip() for i in a}
    assert {"forest", "tree"} & words                   # the topic's keywords score highest
    s = T.topic_token_scores(data, tok.vocab_size, 3)
    assert all(s[i] >= s[j] for i in a for j in range(tok.vocab_size) if j not in a and j != tok.eot_id)
    with pytest.raises(ValueError, match="min_count"):
        T.select_topic_tokens(data, tok.vocab_size, 10, 10**9)


def test_routed_tokens_reach_only_the_units():
    model = _model()
    units = T.routed_units(model, blocks=2, units=8)
    assert sorted(units.index) == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
    y = torch.full((2, 10), 5)                            # every target is routed
    x = torch.randint(0, 64, (2, 10))
    z = torch.zeros(2, dtype=torch.bool)
    b = Batch(x, y, torch.zeros_like(y, dtype=torch.bool), z, z, torch.arange(2), 20)
    T.token_routing_loss(units, torch.tensor([5, 9]))(model, b).backward()
    for i in range(3):
        g = model.transformer.h[i].mlp.c_fc.weight.grad
        if i < 2:   # routed blocks: units 8.. get no gradient from routed tokens
            assert g[8:].abs().max() == 0 and g[:8].abs().max() > 0
        else:
            assert g[8:].abs().max() > 0


def test_ablation_is_complete():
    model = _model()
    units = T.routed_units(model, blocks=2, units=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    import gradroute as gr
    gr.ablate(model, units)
    for i in range(3):
        mlp = model.transformer.h[i].mlp
        pre = f"transformer.h.{i}.mlp"
        if i < 2:
            assert mlp.c_fc.weight[:8].abs().max() == 0 and mlp.c_fc.bias[:8].abs().max() == 0   # inputs
            assert mlp.c_proj.weight[:, :8].abs().max() == 0                                      # outputs
        else:
            assert torch.equal(mlp.c_fc.weight, before[f"{pre}.c_fc.weight"])
        assert torch.equal(mlp.c_fc.weight[8:], before[f"{pre}.c_fc.weight"][8:])
        assert torch.equal(mlp.c_proj.weight[:, 8:], before[f"{pre}.c_proj.weight"][:, 8:])
    # the ablated units stay dead when training continues (no gradient reaches them)
    x = torch.randint(0, 64, (2, 10))
    model(x, x)[1].backward()
    assert model.transformer.h[0].mlp.c_fc.weight.grad[:8].abs().max() == 0
    assert model.transformer.h[0].mlp.c_proj.weight.grad[:, :8].abs().max() == 0


@pytest.mark.slow
def test_end_to_end_and_report(tiny, tmp_path):
    out = tmp_path / "out"
    argv = ["run", "token-routing", "--profile", "tiny", "--out", str(out), "--device", "cpu", "--workers", "1"]
    assert main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["seeds"] == [0, 1] and set(m["runs"]) == {"routed-seed0", "control-seed0", "routed-seed1", "control-seed1"}
    for arm in ("routed", "control"):
        for k in ("topic_loss_increase", "topic_loss_increase_excluding_routed", "general_loss_increase"):
            for suffix in ("", "_before_attack"):
                ci = m["summary"][arm][k + suffix]
                assert ci["n"] == 2 and ci["lo"] <= ci["mean"] <= ci["hi"]
                assert ci["per_seed"] == [m["runs"][f"{arm}-seed{s}"][k + suffix] for s in (0, 1)]
        run = m["runs"][f"{arm}-seed0"]
        assert len(run["increase_runs_after_attack"]) == 2
        assert run["held_out_curve"][0]["step"] == 0 and run["held_out_curve"][-1]["step"] == 2
    assert len(m["routed_tokens"]) == 4
    assert all(t["token"].strip().isalpha() for t in m["routed_tokens"])      # whole words only
    assert (out / "loss_increase.png").is_file() and (out / "summary.md").is_file()
    assert all("intervals" in c for c in m["claims"].values())
    sec = T.report(out)
    assert sec["verdict"] in ("reproduced", "partly", "not") and sec["figures"] == ["loss_increase.png"]
    assert "n=2" in sec["detail"]
    cost = m["summary"]["routed"]["general_loss_increase"]["mean"]
    assert f"general text rises {cost:+.3f} after the attack" in sec["detail"]      # the cost is stated
    mtime = (out / "runs" / "routed-seed1.json").stat().st_mtime_ns        # resumable: nothing retrained
    assert main(argv) == 0
    assert (out / "runs" / "routed-seed1.json").stat().st_mtime_ns == mtime


def test_bad_flags(tiny, tmp_path):
    with pytest.raises(ValueError, match="units"):
        main(["run", "token-routing", "--profile", "tiny", "--out", str(tmp_path), "--units", "64"])


# ------------------------------------------------------------------------------------------
# whole-word token selection
# ------------------------------------------------------------------------------------------
class FakeTok:
    """A tokenizer with a hand-made vocabulary (only ``decode`` and ``vocab_size`` are used)."""
    VOCAB = ["<|endoftext|>", " forest", " th", "rough", " the", ".", " owl", " ran", " a", " ho", "llow",
             " tree", "The"]
    eot_id = 0
    vocab_size = len(VOCAB)

    def decode(self, ids):
        return "".join(self.VOCAB[i] for i in ids)

    def id(self, text):
        return self.VOCAB.index(text)


def _stories(rows: list[list[str]], forget: list[bool], tok: FakeTok) -> Stories:
    """Rows of token texts -> Stories (x = row[:-1], y = row[1:], padded with IGNORE)."""
    T = max(map(len, rows)) - 1
    x = torch.zeros(len(rows), T, dtype=torch.long)
    y = torch.full((len(rows), T), IGNORE)
    for i, r in enumerate(rows):
        ids = [tok.id(t) for t in r]
        x[i, :len(ids) - 1] = torch.tensor(ids[:-1])
        y[i, :len(ids) - 1] = torch.tensor(ids[1:])
    f = torch.tensor(forget)
    return Stories(x, y, torch.zeros_like(y, dtype=torch.bool), f, torch.zeros_like(f))


def _fragment_corpus(tok: FakeTok) -> Stories:
    # forget stories: "ran through the forest ... the hollow tree" (fragments ' th' 'rough', ' ho' 'llow'
    # occur more often than any whole topic word); other stories: "ran the owl." etc.
    forget_row = ["<|endoftext|>", "The", " ran", " th", "rough", " the", " forest", ".", " ran", " th", "rough",
                  " the", " ho", "llow", " tree", ".", " th", "rough", " the", " ho", "llow", ".", "<|endoftext|>"]
    other_row = ["<|endoftext|>", "The", " owl", " ran", ".", " the", " owl", ".", " th", ".", "<|endoftext|>"]
    owl_forget = ["<|endoftext|>", "The", " owl", " ran", " th", "rough", " the", " forest", " owl",
                  "<|endoftext|>"]
    rows = [forget_row] * 6 + [owl_forget] * 2 + [other_row] * 8
    return _stories(rows, [True] * 8 + [False] * 8, tok)


def test_whole_word_rates_on_a_constructed_case():
    tok = FakeTok()
    data = _fragment_corpus(tok)
    count, rate = whole_word_rates(data, tok)
    i = tok.id
    # ' th' is a word only in the other rows (" th ." : 8 times) against 6*3 + 2 fragment uses
    assert int(count[i(" th")]) == 6 * 3 + 2 + 8 and float(rate[i(" th")]) == pytest.approx(8 / 28)
    assert float(rate[i("rough")]) == 0.0 and float(rate[i("llow")]) == 0.0 and float(rate[i(" ho")]) == 0.0
    # ' forest' is followed by '.' or ' owl' (a new word): always whole; ' owl' at a row's end (before
    # <|endoftext|>) too; 'The' after <|endoftext|> starts a word although it has no leading space
    for w in (" forest", " owl", " tree", "The", " the"):
        assert float(rate[i(w)]) == 1.0, w
    mask = whole_word_ids(data, tok)
    assert {tok.VOCAB[j] for j in mask.nonzero().flatten().tolist()} == {
        " forest", " the", " owl", " ran", " tree", "The"}      # '.' and <|endoftext|> do not look like words
    assert whole_word_ids(data, tok, min_rate=0.25)[i(" th")]        # a lower bar admits ' th' (rate 0.29)
    with pytest.raises(ValueError, match="min_rate"):
        whole_word_ids(data, tok, min_rate=0.0)


def test_whole_words_replace_fragments_in_the_selection():
    tok = FakeTok()
    data = _fragment_corpus(tok)
    plain = T.select_topic_tokens(data, tok.vocab_size, 3, 2, exclude=(tok.eot_id,))
    assert {tok.VOCAB[j] for j in plain} <= {"rough", " ho", "llow", " th"}      # fragments win the raw score
    whole = T.select_topic_tokens(data, tok.vocab_size, 2, 2, exclude=(tok.eot_id,),
                                  allowed=whole_word_ids(data, tok))
    assert [tok.VOCAB[j] for j in whole] == [" forest", " tree"]
    with pytest.raises(ValueError, match="eligible"):
        T.select_topic_tokens(data, tok.vocab_size, 8, 2, allowed=whole_word_ids(data, tok))
    with pytest.raises(ValueError, match="mask"):
        T.select_topic_tokens(data, tok.vocab_size, 2, 2, allowed=torch.ones(3, dtype=torch.bool))


def test_whole_words_on_the_story_bpe(tmp_path):
    import re

    texts = generate_stories(300, seed=3)
    tok = get_tokenizer("bpe", texts=texts, vocab_size=700, cache=tmp_path / "tok")
    data = encode_stories(tok, texts, 64)
    whole = T.select_topic_tokens(data, tok.vocab_size, 12, 3, exclude=(tok.eot_id,),
                                  allowed=whole_word_ids(data, tok))
    joined = " ".join(texts)
    for j in whole:   # each routed token is a word of the stories, seen as a whole word
        w = tok.decode([j]).strip()
        assert w.isalpha() and re.search(rf"\b{w}\b", joined), w
    anyt = T.select_topic_tokens(data, tok.vocab_size, 12, 3, exclude=(tok.eot_id,))
    _, rate = whole_word_rates(data, tok)
    assert any(float(rate[j]) < 0.9 for j in anyt)          # without the restriction, fragments get in
    assert all(float(rate[j]) >= 0.9 for j in whole)


def test_interval_helpers_and_claims():
    from gradroute.utils import mean_ci
    one = mean_ci([0.05])
    assert fmt_ci(one, 3, True) == "+0.050 (n=1)" and intervals_separate(one, one) is None
    a, b = mean_ci([0.10, 0.11, 0.12]), mean_ci([0.01, 0.02, 0.03])
    assert intervals_separate(a, b) is True and intervals_separate(a, mean_ci([0.0, 0.1, 0.2])) is False
    assert fmt_ci(a, 2) == f"0.11 [{a['lo']:.2f}, {a['hi']:.2f}] (n=3)"
    # claims from constructed per-seed results: the excluding-routed increase beats general by 0.04 on
    # average and the control's by 0.05
    ex, g, t = "topic_loss_increase_excluding_routed", "general_loss_increase", "topic_loss_increase"
    res = {}
    for s, (rx, rg, cx) in enumerate([(0.06, 0.02, 0.01), (0.07, 0.03, 0.02), (0.05, 0.01, 0.01)]):
        for arm, vals in (("routed", {ex: rx, g: rg, t: rx + 0.05}), ("control", {ex: cx, g: 0.01, t: cx})):
            res[(arm, s)] = {k + suf: v for k, v in vals.items() for suf in ("", "_before_attack")}
    summ = T.summarize(res, [0, 1, 2])
    claims = T.check_claims(summ)
    names = list(claims)
    assert claims[names[0]]["holds"] and claims[names[1]]["holds"]
    assert summ["differences"]["routed excluding-routed minus routed general"]["mean"] == pytest.approx(0.04)
    assert "n=3" in claims[names[0]]["intervals"]
    res[("routed", 2)][ex] = 0.0       # one seed without absorption: the mean drops below the bar
    assert not T.check_claims(T.summarize(res, [0, 1, 2]))[names[0]]["holds"]
    one = T.check_claims(T.summarize(res, [0]))
    assert all(c["intervals"] == "n=1, no interval" for c in one.values())


# ------------------------------------------------------------------------------------------
# topic-words selection, --routed-tokens, validation split, reuse of pre-trained models
# ------------------------------------------------------------------------------------------
def test_forest_vocabulary_is_the_generators_forest_words():
    import re

    from gradroute.lm import corpus as C

    forest = " ".join(C.FOREST_NAME_KW + C.FOREST_NAME_PLAIN + C.FOREST_KW + C.FOREST_PLAIN + C.FOREST_EVENTS
                      + C.FOREST_DIALOGUE).lower()
    general = " ".join(C.EVENTS + C.DIALOGUE + C.ENDINGS + C.WEATHER + C.OBJECTS + C.PLACES + C.FAMILY + C.ADJ
                       + C.FEEL + C.COLORS + [k for k, _ in C.ANIMALS]).lower()
    for w in T.FOREST_TOPIC_WORDS:      # every word is the forest's (or a forget keyword), none is general
        assert re.search(rf"\b{w}s?\b", forest) or w in C.FORGET_WORDS, w   # or its plural
        assert not re.search(rf"\b{w}\b", general), w
    assert "bird" not in T.FOREST_TOPIC_WORDS and "see" not in T.FOREST_TOPIC_WORDS


def _story_corpus(tmp_path, n=300, vocab=1024):
    texts = generate_stories(n, seed=3)
    tok = get_tokenizer("bpe", texts=texts, vocab_size=vocab, cache=tmp_path / "tok")
    return tok, encode_stories(tok, texts, 64)


def test_topic_words_rule_keeps_only_the_vocabulary(tmp_path):
    from types import SimpleNamespace

    tok, data = _story_corpus(tmp_path)
    corpus = SimpleNamespace(tok=tok, train=data)
    rc = dict(n_tokens=20, min_count=3, tokens="topic-words", min_whole_rate=0.9, vocabulary=list(T.FOREST_TOPIC_WORDS))
    ids = T.routed_token_ids(corpus, rc)
    words = [tok.decode([i]) for i in ids]
    assert 0 < len(ids) <= 20 and {" forest", " tree", " owl"} <= set(words)
    assert all(w.strip() in T.FOREST_TOPIC_WORDS and w.startswith(" ") for w in words)
    s = T.topic_token_scores(data, tok.vocab_size, 3)
    assert [float(s[i]) for i in ids] == sorted((float(s[i]) for i in ids), reverse=True)   # best score first
    # the score alone ranks forest-only function words (' see', ' far' of "to see far away") among the
    # topic nouns; the vocabulary keeps them out
    free = T.routed_token_ids(corpus, dict(rc, tokens="whole-words"))
    assert set(tok.decode([i]) for i in free) - set(words) - {" " + w for w in T.FOREST_TOPIC_WORDS}
    assert len(T.routed_token_ids(corpus, dict(rc, n_tokens=3))) == 3
    with pytest.raises(ValueError, match="eligible"):       # no vocabulary word is a token: a clear error
        T.routed_token_ids(corpus, dict(rc, vocabulary=["zebra"]))
    with pytest.raises(ValueError, match="route tokens must be one of"):
        T.routed_token_ids(corpus, dict(rc, tokens="nouns"))


def test_routed_words_to_token_ids(tmp_path):
    from gradroute.lm.analysis import word_token_ids

    tok, data = _story_corpus(tmp_path)
    ids = word_token_ids(tok, ["forest", " owl", "tree"], data)
    assert [tok.decode([i]) for i in ids] == [" forest", " owl", " tree"]
    assert word_token_ids(tok, ["forest"]) == ids[:1]                 # no data: no occurrence checks
    multi = next(w for w in ("woodpeckers", "mushrooms", "squirrel", "acorns") if len(tok.encode(" " + w)) > 1)
    with pytest.raises(ValueError, match=rf"'{multi}' is not one token"):
        word_token_ids(tok, ["forest", multi], data)
    with pytest.raises(ValueError, match="'!' is token '!'|'!' is not one token"):
        word_token_ids(tok, ["!"], data)
    with pytest.raises(ValueError, match="given twice"):
        word_token_ids(tok, ["owl", "owl"], data)
    with pytest.raises(ValueError, match="no words"):
        word_token_ids(tok, [], data)
    # a token that is mostly a fragment ("th" of "through"-like splits) names its whole-word rate
    count, rate = whole_word_rates(data, tok)
    frag = next(i for i in range(tok.vocab_size) if count[i] >= 5 and float(rate[i]) < 0.5
                and tok.decode([i]).startswith(" ") and tok.decode([i])[1:].isalpha()
                and tok.encode(tok.decode([i])) == [i])
    with pytest.raises(ValueError, match="whole word in only"):
        word_token_ids(tok, [tok.decode([frag]).strip()], data)
    never = next(i for i in range(tok.vocab_size) if count[i] == 0 and tok.decode([i]).startswith(" ")
                 and tok.decode([i])[1:].isalpha() and tok.encode(tok.decode([i])) == [i])
    with pytest.raises(ValueError, match="never occurs"):
        word_token_ids(tok, [tok.decode([never]).strip()], data)


def test_validation_split_is_disjoint_and_leaves_the_evaluation_sets(tmp_path, monkeypatch):
    from gradroute.lm.analysis import prepare_corpus

    monkeypatch.setenv("GRADROUTE_CACHE", str(tmp_path / "cache"))
    a = prepare_corpus(150, 8, 4, 300, 48, n_general_train=8)
    b = prepare_corpus(150, 8, 4, 300, 48, n_general_train=8, n_val=6)
    assert a.val_topic is None and len(b.val_topic) == 6 and len(b.val_general) == 6
    for name in ("topic", "general", "attack_pool", "general_train"):
        assert torch.equal(getattr(a, name).x, getattr(b, name).x), name
    rows = lambda s: {tuple(r.tolist()) for r in s.x}
    for name in ("topic", "general", "attack_pool", "general_train"):
        assert not rows(getattr(b, name)) & (rows(b.val_topic) | rows(b.val_general)), name
    assert not rows(b.train) & (rows(b.val_topic) | rows(b.val_general))
    assert b.val_topic.forget.all() and not b.val_general.forget.any()


@pytest.mark.slow
def test_routed_tokens_flag_validation_and_model_reuse(tiny, tmp_path):
    out = tmp_path / "out"
    base = ["run", "token-routing", "--profile", "tiny", "--out", str(out), "--device", "cpu", "--workers", "1",
            "--seeds", "0"]
    monkey_val = dict(TINY["corpus"], n_val=6, n_train=300, vocab_size=1024)
    T.PROFILES["tiny"] = dict(TINY, corpus=monkey_val)
    assert main(base + ["--routed-tokens", "forest", "tree"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert [t["token"] for t in m["routed_tokens"]] == [" forest", " tree"] and m["config"]["route"]["tokens"] == "given"
    assert m["routed_tokens"][0]["count_other_train"] == 0 and m["routed_share_of_general_targets"] == 0.0
    for arm in ("routed", "control"):
        assert m["summary"][arm]["val_topic_loss_increase_excluding_routed"]["n"] == 1
    assert set(m["summary"]["validation"]) == {"margin over general", "margin over control", "criterion"}
    models = {p.name: p.stat().st_mtime_ns for p in (out / "models").iterdir()}
    assert len(models) == 2
    # another selection: the control's pre-trained model is reused, the routed one is new
    assert main(base + ["--routed-tokens", "forest", "owl"]) == 0
    after = {p.name: p.stat().st_mtime_ns for p in (out / "models").iterdir()}
    control = [k for k in models if k.startswith("control")]
    assert len(after) == 3 and after[control[0]] == models[control[0]]
    m2 = json.loads((out / "metrics.json").read_text())
    # same control model, evaluated with the new exclusion set: its general increase is unchanged
    g = "general_loss_increase"
    assert m2["summary"]["control"][g]["mean"] == pytest.approx(m["summary"]["control"][g]["mean"], abs=1e-6)
    with pytest.raises(ValueError, match="'zzzq'"):
        main(base + ["--routed-tokens", "forest", "zzzq"])


def test_diagnostic_split_of_nonrouted_targets(monkeypatch):
    from types import SimpleNamespace

    x = torch.zeros(1, 4, dtype=torch.long)
    no = torch.zeros(1, 4, dtype=torch.bool)
    topic = Stories(x, torch.tensor([[5, 6, 7, IGNORE]]), no, torch.ones(1, dtype=torch.bool), torch.zeros(1, dtype=torch.bool))
    general = Stories(x, torch.tensor([[6, 6, 8, IGNORE]]), no, torch.zeros(1, dtype=torch.bool),
                      torch.zeros(1, dtype=torch.bool))
    corpus = SimpleNamespace(topic=topic, general=general, general_train=general, val_topic=None, val_general=None)
    assert T.general_token_ids(corpus).tolist() == [6, 8]
    # per-token losses 1, 2, 3 on targets 5, 6, 7 (NaN at padding)
    monkeypatch.setattr(T, "per_token_losses", lambda m, d: torch.tensor([[1.0, 2.0, 3.0, float("nan")]]))
    out = T.losses(None, corpus, torch.tensor([5]))
    # routed 5 is out; 7 never occurs in general text (topical), 6 does (shared)
    assert out["topic_excluding_routed"] == pytest.approx(2.5)
    assert out["topic_topical"] == pytest.approx(3.0) and out["topic_shared"] == pytest.approx(2.0)


# ------------------------------------------------------------------------------------------
# real text: --profile real (GCIDE's medical entries) and --corpus FILE, through the user-corpus path
# ------------------------------------------------------------------------------------------
def _gcide_entries(path, n_med=48, n_anat=32, n_other=200):
    """A tiny GCIDE entries file (as `gradroute data gcide` writes it): Med entries use ' disease',
    ' remedy', ' tumor' and ' medicine' often and ' fever' twice in all; Anat entries name bones and
    nerves; the others are general words."""
    import random

    from gradroute.lm import gcide

    rng = random.Random(0)
    general = "the a of to and in is by or as with from for on at water light stone ship song law".split()
    medical = "disease remedy tumor medicine".split()
    body = "bone nerve muscle joint".split()
    rows = []
    for i in range(n_med + n_anat + n_other):
        kind = "Med" if i < n_med else "Anat" if i < n_med + n_anat else None
        words = [rng.choice(general + (medical if kind == "Med" else body if kind else [])) for _ in range(30)]
        if i in (0, 1):
            words.append("fever")
        text = f"Word{i} \\Word{i}\\, n. " + (f"({kind}.) " if kind else "") + " ".join(words) + "."
        rows.append({"headword": f"Word{i}", "text": text, "fields": [kind] if kind else []})
    gcide.write_jsonl(rows, path)
    return path


REAL_TINY = dict(TINY, route=dict(TINY["route"], tokens="topic-words", vocabulary=list(T.MEDICAL_WORDS)), seeds=1)


def _args(argv):
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--out")
    p.add_argument("--device", default="cpu")
    T.add_arguments(p)
    return p.parse_args(argv)


def test_real_profile_corpus_through_the_user_corpus_path(tmp_path, monkeypatch):
    from gradroute.lm.user_corpus import size_for_corpus

    monkeypatch.setitem(T.PROFILES, "real", REAL_TINY)
    monkeypatch.setenv("GRADROUTE_CACHE", str(tmp_path / "cache"))
    entries = _gcide_entries(tmp_path / "entries.jsonl.gz")
    cfg = T.build_config(_args(["--profile", "real", "--gcide", str(entries)]))
    ud = cfg["user_data"]
    assert ud["rule"]["label_field"] == "label" and ud["rule"]["topic_field"] == "topic"
    assert ud["sizes"] == {"forget": 8, "attack_pool": 4, "forget_val": 6, "retain": 8, "retain_val": 8, "topic": 8}
    # the vocabulary and steps are the shared sizing rule's, from the training documents
    sized = {"train": {"steps": TINY["train"]["steps"]}, "batch_size": TINY["batch_size"]}
    size_for_corpus(sized, np.full(cfg["sizing"]["train_documents"], 1))
    assert cfg["train"]["steps"] == sized["train"]["steps"] == cfg["sizing"]["steps"]
    assert cfg["vocab_size"] == cfg["sizing"]["vocab_size"]
    assert cfg["sizing"]["train_documents"] == 280 - 8 - 4 - 6 - 8 - 8 - 8
    c = T.corpus_of(cfg)
    text = lambda s: [c.tok.decode([int(t) for t in row if t != c.tok.eot_id]) for row in s.x]
    assert all("(Med.)" in t for t in text(c.topic) + text(c.attack_pool))             # topic text: held-out Med
    assert all("(Med.)" not in t and "(Anat.)" not in t for t in text(c.general) + text(c.general_train))
    assert len(c.related) == 8 and all("(Anat.)" in t for t in text(c.related))         # the related field
    assert len(c.general_train) == 8 and c.val_topic is None and c.val_general is None
    heads = lambda s: {t.split()[0] for t in text(s)}
    held = [heads(getattr(c, k)) for k in ("topic", "attack_pool", "general", "general_train", "related")]
    assert sum(map(len, held)) == len(set().union(*held)) == 36                           # disjoint held-out sets
    assert not heads(c.train) & set().union(*held)                                       # none is trained on
    assert int(c.train.forget.sum()) == 48 - 8 - 4 - 6                                    # Med entries left to train on
    with pytest.raises(ValueError, match="--save-models"):
        T.build_config(_args(["--profile", "real", "--gcide", str(entries), "--save-models"]))


def test_medical_words_are_selected_by_the_topic_words_rule(tmp_path, monkeypatch):
    monkeypatch.setitem(T.PROFILES, "real", REAL_TINY)
    monkeypatch.setenv("GRADROUTE_CACHE", str(tmp_path / "cache"))
    cfg = T.build_config(_args(["--profile", "real", "--gcide", str(_gcide_entries(tmp_path / "e.jsonl"))]))
    assert cfg["route"]["vocabulary"] == list(T.MEDICAL_WORDS)
    c = T.corpus_of(cfg)
    rc = dict(cfg["route"], n_tokens=20)
    ids = T.routed_token_ids(c, rc)
    assert {c.tok.decode([i]) for i in ids} == {" disease", " remedy", " tumor", " medicine"}
    s = T.topic_token_scores(c.train, c.tok.vocab_size, rc["min_count"])
    assert [float(s[i]) for i in ids] == sorted((float(s[i]) for i in ids), reverse=True)
    report = {r["word"]: r for r in T.vocabulary_report(c, rc, ids)}
    assert list(report) == list(T.MEDICAL_WORDS)
    assert {w for w, r in report.items() if r["status"] == "routed"} == {"disease", "remedy", "tumor", "medicine"}
    assert report["cathartic"]["status"].startswith("not one token") and report["cathartic"]["token_id"] is None
    assert all(report[w]["count_forget_train"] >= rc["min_count"] for w in ("disease", "remedy"))
    # at most n_tokens, the best first; the others are said to be outside
    two = T.routed_token_ids(c, dict(rc, n_tokens=2))
    assert two == ids[:2]
    assert sum(r["status"] == "outside the best 2" for r in T.vocabulary_report(c, dict(rc, n_tokens=2), two)) == 2
    # a word too rare in forget documents is named with its count, when it is a whole-word token
    rare = dict(rc, min_count=10**6)
    with pytest.raises(ValueError, match="eligible.*--topic-vocabulary"):
        T.routed_token_ids(c, rare)
    assert all("times in forget documents" in r["status"] for r in T.vocabulary_report(c, rare, [])
               if r["word"] in ("disease", "remedy"))
    # the written list names diseases and their treatment, not the body (anatomy/physiology) or surgery
    assert not {"blood", "skin", "heart", "nerve", "muscle", "bone", "gland", "tissue", "surgery"} & set(T.MEDICAL_WORDS)


def test_real_profile_without_the_dictionary_says_how_to_get_it(tmp_path, monkeypatch):
    from gradroute.lm import gcide

    monkeypatch.setenv("GRADROUTE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GRADROUTE_GCIDE", raising=False)
    monkeypatch.setattr(gcide, "DICTD_DIR", tmp_path / "no-dictd")
    with pytest.raises(gcide.GcideMissing, match="apt-get install dict-gcide"):
        main(["run", "token-routing", "--profile", "real", "--out", str(tmp_path / "out")])
    with pytest.raises(gcide.GcideMissing, match="nowhere.jsonl does not exist"):
        main(["run", "token-routing", "--profile", "real", "--gcide", str(tmp_path / "nowhere.jsonl"),
              "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_user_corpus_end_to_end_with_related_fields(tiny, tmp_path):
    from gradroute.lm import gcide

    med = tmp_path / "med.jsonl"
    gcide.write_jsonl(gcide.domain_corpus(gcide.read_entries(_gcide_entries(tmp_path / "e.jsonl"))), med)
    out = tmp_path / "out"
    argv = ["run", "token-routing", "--profile", "tiny", "--corpus", str(med), "--label-field", "label",
            "--topic-field", "topic", "--tokens", "topic-words", "--topic-vocabulary", "disease", "tumor", "zebra",
            "--steps", "2", "--seeds", "0", "--attack-repeats", "1", "--out", str(out), "--device", "cpu",
            "--workers", "1"]
    assert main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert {t["token"] for t in m["routed_tokens"]} == {" disease", " tumor"}
    assert m["routed_tokens"][0]["score"] >= m["routed_tokens"][1]["score"]
    assert [r["word"] for r in m["topic_vocabulary"]] == ["disease", "tumor", "zebra"]
    assert m["corpus"]["forget_documents"] == 48 and m["corpus"]["topic_documents"] == 32
    assert m["routed_share_of_related_targets"] == 0.0
    for arm in ("routed", "control"):
        for k in T.RELATED_KEYS:
            assert m["summary"][arm][k]["n"] == 1 and k + "_before_attack" in m["summary"][arm]
    run = m["runs"]["routed-seed0"]
    assert run["related_loss_increase"] == pytest.approx(
        run["ablated"]["after_attack"]["related"] - run["intact"]["after_attack"]["related"])
    assert "Related fields" in (out / "summary.md").read_text()
    sec = T.report(out)
    assert "Related fields nobody labelled" in sec["detail"] and "label" in sec["detail"]
    with pytest.raises(ValueError, match="--topic-vocabulary is the candidate list"):
        main(argv + ["--tokens", "whole-words"])
