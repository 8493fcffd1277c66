"""`gradroute run steering`: the routed token's gradient reaches only dim 0 at the routed
blocks; top-token and ablation helpers; a tiny end-to-end run and its report section."""
import json

import pytest
import torch

from gradroute.cli import main
from gradroute.experiments import steering as S
from gradroute.lm.data import Batch
from gradroute.models import GPT, GPTConfig

TINY = dict(
    corpus=dict(n_train=150, n_eval=8, vocab_size=400),
    model=dict(n_ctx=48, n_layer=3, n_head=2, d_model=16, d_mlp=32),
    train=dict(steps=2, lr=1e-2, warmup=1), batch_size=8,
    hf_steps=2, samples=2, sample_tokens=4, top_k=5)
FLAGS = ["--steer-scales", "1", "4"]


def _batch(y):
    x = torch.randint(0, 64, y.shape, generator=torch.Generator().manual_seed(1))
    z = torch.zeros(y.shape[0], dtype=torch.bool)
    return Batch(x, y, torch.zeros_like(y, dtype=torch.bool), z, z, torch.arange(y.shape[0]), int(y.numel()))


def test_routed_token_gradient_only_through_dim0():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_ctx=16, n_layer=3, n_head=2, d_model=16, d_mlp=32))
    blocks = S.routed_block_names(model, first=1)
    assert blocks == ["transformer.h.1", "transformer.h.2"]
    target = 5
    y = torch.randint(6, 64, (3, 12), generator=torch.Generator().manual_seed(0))
    y[0, 3] = y[1, 7] = y[2, 11] = target
    grads = {}

    def keep(name):
        def hook(mod, args, out):
            out.register_hook(lambda g: grads.__setitem__(name, g.detach().clone()))
        return hook
    for i in range(3):  # registered before the routing hooks: sees the gradient after routing
        model.transformer.h[i].register_forward_hook(keep(f"transformer.h.{i}"))
    S.steering_loss(blocks, target)(model, _batch(y)).backward()
    at = y == target
    for name in blocks:
        g = grads[name]
        assert g[at][:, 1:].abs().max() == 0, name              # only dim 0 at routed positions
        assert g[at][:, 0].abs().min() > 0
        assert g[~at][:, 1:].abs().max() > 0                      # other positions untouched
    assert grads["transformer.h.0"][at][:, 1:].abs().max() > 0     # earlier blocks are not routed


def test_routing_changes_nothing_without_the_target():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_ctx=16, n_layer=2, n_head=2, d_model=16, d_mlp=32))
    y = torch.randint(6, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    b = _batch(y)
    S.steering_loss(S.routed_block_names(model), 5)(model, b).backward()
    routed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    from gradroute.lm.train import lm_loss
    lm_loss(model, b).backward()
    assert all(torch.allclose(a, p.grad) for a, p in zip(routed, model.parameters()))


def test_top_tokens_and_zeroed_dim():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_ctx=16, n_layer=2, n_head=2, d_model=16, d_mlp=32))
    with torch.no_grad():
        model.lm_head.weight[7] = 0
        model.lm_head.weight[7, 0] = -3.0            # token 7 is -e0
        model.lm_head.weight[9, 0] = -2.0            # a related token close to -e0
    tok = type("T", (), {"decode": staticmethod(lambda ids: f"<{ids[0]}>")})()
    top = S.top_tokens(model, tok, related={9}, target=7, k=3)
    assert top["sign"] == -1 and top["target_rank"] == 1
    assert top["negative"][0]["id"] == 7 and top["negative"][1]["id"] == 9 and top["related_in_top"] == 1
    raw = S.top_tokens(model, tok, related={9}, target=7, k=3, effective=False)
    assert raw["target_rank"] == 1 and raw["sign"] == -1
    x = torch.randint(0, 64, (1, 8))
    with S.edit_dim(model, ["transformer.h.1"], torch.zeros_like):
        seen = {}
        h = model.transformer.h[1].register_forward_hook(lambda m, a, o: seen.setdefault("o", o))
        # hooks run in order: ours (registered second) sees the edited output
        model(x)
        h.remove()
    assert seen["o"][..., 0].abs().max() == 0


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    monkeypatch.setitem(S.PROFILES, "tiny", TINY)
    monkeypatch.setenv("GRADROUTE_CACHE", str(tmp_path / "cache"))


def test_end_to_end_and_report(tiny, tmp_path):
    out = tmp_path / "out"
    assert main(["run", "steering", "--profile", "tiny", "--out", str(out), "--device", "cpu", *FLAGS]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["models"]) == {"routed", "control", "hf_gpt2_routed"}
    for r in m["models"].values():
        assert {"top_tokens", "zero_dim0", "steering"} <= set(r)
        assert len(r["top_tokens"]["positive"]) == 5 and r["top_tokens"]["sign"] in (1, -1)
        assert {"target", "related", "other"} == set(r["zero_dim0"])
        assert {"unsteered", "sweep", "best"} == set(r["steering"])
        assert [x["scale"] for x in r["steering"]["sweep"]] == [1.0, 4.0]
        assert r["steering"]["unsteered"]["samples"] == 2
    assert m["target"]["word"] not in m["related_words"]
    for f in ("top_tokens.png", "ablation_and_steering.png", "summary.md"):
        assert (out / f).is_file(), f
    sec = S.report(out)
    assert sec["verdict"] in ("reproduced", "partly", "not") and sec["table"]["rows"]
    assert set(sec["figures"]) == {"top_tokens.png", "ablation_and_steering.png"}


def test_bad_token(tiny, tmp_path):
    with pytest.raises(ValueError, match="single-token"):
        main(["run", "steering", "--profile", "tiny", "--out", str(tmp_path), "--token", "Supercalifragilistic"])


def test_sample_many_matches_sample_when_greedy(tmp_path):
    from gradroute.lm.corpus import generate_stories
    from gradroute.lm.evaluate import sample, sample_many
    from gradroute.lm.tokenizer import get_tokenizer

    tok = get_tokenizer("bpe", texts=generate_stories(50), vocab_size=300, cache=tmp_path)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_ctx=32, n_layer=1, n_head=2, d_model=16, d_mlp=16))
    many = sample_many(model, tok, "Once upon", n=3, max_new=6, temperature=0)
    assert many == [sample(model, tok, "Once upon", max_new=6, temperature=0)] * 3
    assert len(set(sample_many(model, tok, "Once upon", n=4, max_new=6, seed=1))) > 1
