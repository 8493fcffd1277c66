"""`gradroute run steering`: the routed token's gradient reaches only dim 0 at the routed
blocks; top-token and ablation helpers; a tiny end-to-end run and its report section."""
import json

import pytest
import torch

from gradroute.cli import main
from gradroute.experiments import steering as S
from gradroute.lm.analysis import category_words
from gradroute.lm.data import Batch
from gradroute.models import GPT, GPTConfig

TINY = dict(
    corpus=dict(n_train=150, n_eval=8, vocab_size=700),
    model=dict(n_ctx=48, n_layer=3, n_head=2, d_model=16, d_mlp=32),
    train=dict(steps=2, lr=1e-2, warmup=1), batch_size=8,
    hf_steps=2, samples=2, sample_tokens=4, top_k=5, seeds=2, name_seeds=1)
FLAGS = ["--steer-scales", "1", "4", "--workers", "1"]


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


@pytest.mark.slow
def test_end_to_end_and_report(tiny, tmp_path):
    out = tmp_path / "out"
    assert main(["run", "steering", "--profile", "tiny", "--out", str(out), "--device", "cpu", *FLAGS]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["seeds"] == [0, 1]
    assert set(m["runs"]) == {"topical-seed0", "name-seed0", "control-seed0", "topical-seed1",
                              "control-seed1", "hf_gpt2_topical-seed0"}          # the name model: first seed only
    assert m["summary"]["name"]["routed"]["target_rank"]["n"] == 1 and m["summary"]["name"]["control"]["seeds"] == [0, 1]
    assert m["targets"]["topical"]["word"] == "forest" and m["targets"]["name"]["word"] == "Ella"
    assert "forest" not in m["targets"]["topical"]["related_words"]
    assert set(m["targets"]["topical"]["related_words"]) <= set(category_words("places"))
    assert set(m["runs"]["control-seed0"]["analysis"]) == {"topical", "name"}     # the control, for both tokens
    assert set(m["runs"]["topical-seed0"]["analysis"]) == {"topical"}
    for r in m["runs"].values():
        for a in r["analysis"].values():
            assert len(a["top_tokens"]["positive"]) == 5 and a["top_tokens"]["sign"] in (1, -1)
            assert {"target", "related", "other"} == set(a["zero_dim0"])
            assert [p["scale"] for p in a["steering"]["points"]] == [0.0, 1.0, 4.0]
            assert a["steering"]["opposite_sign"]["scale"] == -4.0
        assert r["held_out_curve"][0]["step"] == 0 and r["held_out_curve"][-1]["step"] == 2
    s = m["summary"]["topical"]["routed"]
    assert s["target_rank"]["n"] == 2 and s["per_seed"]["target_rank"] == [
        m["runs"][f"topical-seed{i}"]["analysis"]["topical"]["top_tokens"]["target_rank"] for i in (0, 1)]
    for f in ("top_tokens.png", "ablation_and_steering.png", "learning_curves.png", "summary.md"):
        assert (out / f).is_file(), f
    sec = S.report(out)
    assert sec["verdict"] in ("reproduced", "partly", "not") and len(sec["table"]["rows"]) == 4
    assert "n=2" in sec["detail"] and "intervals" in sec["detail"]
    # resumable: a second run loads the finished models instead of training them again
    mtime = (out / "runs" / "topical-seed0.json").stat().st_mtime_ns
    assert main(["run", "steering", "--profile", "tiny", "--out", str(out), "--device", "cpu", *FLAGS]) == 0
    assert (out / "runs" / "topical-seed0.json").stat().st_mtime_ns == mtime


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


# ------------------------------------------------------------------------------------------
# the metrics on tiny constructed cases
# ------------------------------------------------------------------------------------------
class WordTok:
    """Words are tokens: ``encode`` splits on spaces (each word keeps its leading space)."""
    def __init__(self, words):
        self.words = list(words)

    def encode(self, text):
        return [self.words.index(" " + w) for w in text.split()]

    def decode(self, ids):
        return "".join(self.words[i] for i in ids)


def test_sample_stats_counts():
    tok = WordTok([" the", " forest", " park", " beach", " owl"])
    texts = ["the forest forest owl", "the park owl", "owl owl", "the beach park forest"]
    st = S.sample_stats(texts, tok, target=1, related={2, 3})
    assert st["samples"] == 4 and st["with_target"] == 0.5            # samples 0 and 3
    assert st["with_related"] == 0.5                                  # samples 1 and 3
    assert st["target_per_100_tokens"] == pytest.approx(100 * 3 / 13)
    assert st["related_per_100_tokens"] == pytest.approx(100 * 3 / 13)


def test_zero_dim_losses_groups():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=16, n_ctx=12, n_layer=2, n_head=2, d_model=8, d_mlp=16))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 16, (4, 10), generator=g)
    y = torch.randint(0, 16, (4, 10), generator=g)
    y[:, :3] = torch.tensor([3, 5, 7])
    y[3, 8:] = -100                                                    # padding is ignored
    z = torch.zeros(4, dtype=torch.bool)
    from gradroute.lm.data import Stories
    data = Stories(x, y, torch.zeros_like(y, dtype=torch.bool), z, z)
    blocks = ["transformer.h.1"]
    out = S.zero_dim_losses(model, [data], blocks, target=3, related={5, 7})
    base = S.per_token_losses(model, data)
    with S.edit_dim(model, blocks, torch.zeros_like):
        zero = S.per_token_losses(model, data)
    valid = y != -100
    for name, m in (("target", y == 3), ("related", (y == 5) | (y == 7)),
                    ("other", valid & (y != 3) & (y != 5) & (y != 7))):
        assert out[name]["tokens"] == int((m & valid).sum())
        assert out[name]["loss"] == pytest.approx(float(base[m & valid].mean()), abs=1e-6)
        assert out[name]["change"] == pytest.approx(float((zero - base)[m & valid].mean()), abs=1e-6)
    assert out["other"]["change"] != 0                                 # dim 0 was really zeroed


def _fake_results(ranks, related_routed, related_control, zero_t=(0.5,), zero_o=(0.01,)):
    def analysis(rank, rel, zt, zo):
        pts = [{"scale": s, "with_target": f} for s, f in ((0.0, 0.1), (4.0, 0.6))]
        return {"top_tokens": {"target_rank": rank, "related_in_top": rel},
                "zero_dim0": {"target": {"change": zt}, "related": {"change": 0.0}, "other": {"change": zo}},
                "steering": {"points": pts, "opposite_sign": {"with_target": 0.0}}}
    res = {}
    n = len(ranks)
    zt = list(zero_t) * n if len(zero_t) == 1 else zero_t
    zo = list(zero_o) * n if len(zero_o) == 1 else zero_o
    for s in range(n):
        res[("topical", s)] = {"analysis": {"topical": analysis(ranks[s], related_routed[s], zt[s], zo[s])}}
        res[("control", s)] = {"analysis": {"topical": analysis(200, related_control[s], 0.01, 0.01)}}
    return res


def test_summary_and_claims_on_constructed_results():
    tgt = {"topical": {}}
    summ = S.summarize(_fake_results([1, 2, 3], [12, 10, 11], [4, 5, 3]), [0, 1, 2], tgt)
    r = summ["topical"]["routed"]
    assert r["target_rank"]["n"] == 3 and r["related_in_top"]["mean"] == 11 and r["scales"] == [0.0, 4.0]
    claims = S.check_claims(summ)
    names = list(claims)
    assert all(c["holds"] for c in claims.values())
    assert claims[names[1]]["intervals"] == "95% intervals separate"
    # one seed ranks 4th: the top-3 check fails; control close to half the routed count: the 2x check fails
    summ = S.summarize(_fake_results([1, 4, 2], [12, 10, 11], [6, 5, 6]), [0, 1, 2], tgt)
    claims = S.check_claims(summ)
    assert not claims[names[0]]["holds"] and claims[names[0]]["ranks"] == [1, 4, 2]
    assert not claims[names[1]]["holds"]
    # dim-0 ablation must hurt the token 5x more than the rest
    summ = S.summarize(_fake_results([1, 1, 1], [9, 9, 9], [2, 2, 2], zero_t=(0.04,), zero_o=(0.01,)), [0, 1, 2], tgt)
    assert not S.check_claims(summ)[names[2]]["holds"]
    # one seed: no intervals anywhere
    one = S.check_claims(S.summarize(_fake_results([1], [12], [4]), [0], tgt))
    assert all(c["intervals"] == "n=1, no interval" for c in one.values())
