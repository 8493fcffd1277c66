"""`gradroute run token-routing`: token selection is deterministic, routed tokens reach only the
chosen MLP units, ablation is complete (inputs and outputs), a tiny end-to-end run."""
import json

import pytest
import torch

from gradroute.cli import main
from gradroute.experiments import token_routing as T
from gradroute.lm.corpus import generate_stories
from gradroute.lm.data import Batch, encode_stories
from gradroute.lm.tokenizer import get_tokenizer
from gradroute.models import GPT, GPTConfig

TINY = dict(
    corpus=dict(n_train=150, n_eval=8, n_attack=4, n_general_train=8, vocab_size=300),
    model=dict(n_ctx=48, n_layer=2, n_head=2, d_model=16, d_mlp=32),
    train=dict(steps=2, lr=1e-2, warmup=1), batch_size=8,
    route=dict(n_tokens=4, min_count=2, blocks=1, units=8),
    finetune=dict(steps=2, lr=1e-3, batch_size=4),
    attack=dict(docs=2, steps=2, lr=1e-3, repeats=2))


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


def test_end_to_end_and_report(tiny, tmp_path):
    out = tmp_path / "out"
    assert main(["run", "token-routing", "--profile", "tiny", "--out", str(out), "--device", "cpu"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    for arm in ("routed", "control"):
        for k in ("topic_loss_increase", "topic_loss_increase_excluding_routed", "general_loss_increase"):
            assert isinstance(m[arm][k], float) and isinstance(m[arm][k + "_before_attack"], float)
        assert len(m[arm]["increase_runs_after_attack"]) == 2
    assert len(m["routed_tokens"]) == 4
    assert (out / "loss_increase.png").is_file() and (out / "summary.md").is_file()
    sec = T.report(out)
    assert sec["verdict"] in ("reproduced", "partly", "not") and sec["figures"] == ["loss_increase.png"]


def test_bad_flags(tiny, tmp_path):
    with pytest.raises(ValueError, match="units"):
        main(["run", "token-routing", "--profile", "tiny", "--out", str(tmp_path), "--units", "64"])
