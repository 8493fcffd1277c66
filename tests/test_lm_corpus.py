"""Stories, the forget rule, loaders, tokenizers and the data pipeline of gradroute.lm."""
import json
import sys

import pytest
import torch

from gradroute.lm.corpus import (EOT, generate_stories, is_forget, is_forest_topic, keyword_spans, load_corpus,
                                 load_text_file, load_tinystories)
from gradroute.lm.data import IGNORE, BatchOrder, encode_stories
from gradroute.lm.tokenizer import get_tokenizer, gpt2_bpe, train_bpe


@pytest.mark.parametrize("text", ["A tree.", "TREES grew", "the Forest", "forests!", "a woodland", "Woodlands,",
                                  "under the tree's shade"])
def test_forget_rule_matches_keywords(text):
    assert is_forget(text)


@pytest.mark.parametrize("text", ["a treehouse", "the street", "the woods", "forestry work", "an owl and leaves",
                                  "wood land", "retrees"])
def test_forget_rule_ignores_related_words(text):
    assert not is_forget(text)


def test_keyword_spans():
    t = "The tree and the Forest."
    assert [t[a:b] for a, b in keyword_spans(t)] == ["tree", "Forest"]


def test_generator_is_deterministic_and_sliceable():
    a = generate_stories(50, seed=3)
    assert a == generate_stories(50, seed=3)
    assert a != generate_stories(50, seed=4)
    assert generate_stories(10, seed=3, start=20) == a[20:30]
    assert len(set(a)) == 50


def test_generator_topic_mix():
    s = generate_stories(2000, seed=0)
    frac = sum(map(is_forget, s)) / len(s)
    assert 0.15 < frac < 0.25
    topical_unlabelled = [x for x in s if is_forest_topic(x) and not is_forget(x)]
    assert len(topical_unlabelled) > 20          # absorption needs forest stories without keywords
    assert any(w in " ".join(topical_unlabelled) for w in ("owl", "squirrel", "leaves"))


def test_generator_bad_arguments():
    with pytest.raises(ValueError, match="n and start"):
        generate_stories(-1)
    with pytest.raises(ValueError, match="topic_fraction"):
        generate_stories(3, topic_fraction=1.5)


def test_load_text_file_formats(tmp_path):
    (tmp_path / "a.txt").write_text(f"One tree.{EOT}\nTwo cats.\n{EOT} ")
    assert load_text_file(tmp_path / "a.txt") == ["One tree.", "Two cats."]
    (tmp_path / "b.txt").write_text("First story.\n\nSecond story.\n")
    assert load_text_file(tmp_path / "b.txt") == ["First story.", "Second story."]
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "A forest."}) + "\n" + json.dumps("Plain.") + "\n")
    assert load_text_file(tmp_path / "c.jsonl") == ["A forest.", "Plain."]
    assert load_corpus(str(tmp_path / "b.txt"), 1, start=1) == ["Second story."]


def test_load_text_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_text_file(tmp_path / "missing.txt")
    (tmp_path / "e.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no stories"):
        load_text_file(tmp_path / "e.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_text_file(tmp_path / "bad.jsonl")
    (tmp_path / "nofield.jsonl").write_text('{"story": "x"}\n')
    with pytest.raises(ValueError, match="'text'"):
        load_text_file(tmp_path / "nofield.jsonl")
    (tmp_path / "few.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="3 needed"):
        load_corpus(str(tmp_path / "few.txt"), 3)


def test_tinystories_without_datasets_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="datasets"):
        load_tinystories(limit=2)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return train_bpe(generate_stories(300, seed=0), 400, tmp_path_factory.mktemp("tok"))


def test_bpe_round_trip_and_cache(bpe, tmp_path):
    texts = generate_stories(5, seed=9) + ["Ünïcode ✓ and a tree!"]
    for t in texts:
        assert bpe.decode(bpe.encode(t)) == t
    assert bpe.vocab_size == 400 and bpe.decode([bpe.eot_id]) == EOT
    cache = tmp_path / "c"
    a = train_bpe(["one tree two trees"] * 20, 300, cache)
    files = list(cache.iterdir())
    b = train_bpe(["one tree two trees"] * 20, 300, cache)      # loaded, not retrained
    assert list(cache.iterdir()) == files and a.encode("two trees") == b.encode("two trees")


def test_gpt2_bpe_round_trip():
    tok = gpt2_bpe()
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    t = "Once upon a time, Timmy went to the forest." + EOT
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.decode(tok.encode(t)) == t and tok.encode(t)[-1] == 50256


def test_tokenizer_bad_inputs():
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(["a"], 100)
    with pytest.raises(ValueError, match="at least one"):
        train_bpe([], 300)
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer("wordpiece")
    with pytest.raises(ValueError, match="texts="):
        get_tokenizer("bpe")


def test_encode_stories_keywords_and_padding(bpe):
    texts = ["The owl sat in a tree. The Forest was dark.", "A cat sat on a mat."]
    d = encode_stories(bpe, texts, 40)
    assert d.forget.tolist() == [True, False]
    kw = d.y[0][d.keyword[0]].tolist()
    assert "tree" in bpe.decode(kw) and "Forest" in bpe.decode(kw) and "owl" not in bpe.decode(kw)
    assert not d.keyword[1].any()
    n = len(bpe.encode(texts[1]))
    assert d.y[1, n - 1] == bpe.eot_id and (d.y[1, n:] == IGNORE).all()
    assert (d.x[:, 1:][d.y[:, :-1] != IGNORE] == d.y[:, :-1][d.y[:, :-1] != IGNORE]).all()
    with pytest.raises(ValueError, match="only forget stories"):
        d.with_labels(torch.tensor([False, True]))
    with pytest.raises(ValueError, match="n_ctx"):
        encode_stories(bpe, texts, 1)


def test_batch_order_paired_and_labelled_first(bpe):
    d = encode_stories(bpe, generate_stories(60, seed=1), 32)
    lab = d.forget.clone()
    d = d.with_labels(lab)
    full = BatchOrder(d, 8, seed=5)
    filt = BatchOrder(d, 8, seed=5, allowed=~lab)
    stream = torch.cat([full.indices(s) for s in range(7)])        # about one epoch
    kept = [int(i) for i in stream if not lab[i]]
    fstream = [int(i) for s in range(20) for i in filt.indices(s)][: len(kept)]
    assert kept == fstream                # same order, dropped stories left out
    b = full.batch_at(3)
    assert b.labelled.tolist() == sorted(b.labelled.tolist(), reverse=True)   # labelled rows first
    assert torch.equal(full.batch_at(3).x, BatchOrder(d, 8, seed=5).batch_at(3).x)
    assert b.n_tokens == int((b.y != IGNORE).sum())
    halves = [b.shard(r, 2) for r in range(2)]
    assert torch.equal(torch.cat([h.x for h in halves]), b.x) and halves[0].n_tokens == b.n_tokens
    with pytest.raises(ValueError, match="no stories left"):
        BatchOrder(d, 4, 0, allowed=torch.zeros(len(d), dtype=torch.bool))
    with pytest.raises(ValueError, match="batch_size"):
        BatchOrder(d, 0, 0)
