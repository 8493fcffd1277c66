"""Users' corpora, labels and held-out sets: file formats, forget rules, splits by counts down
to 0.5% forget documents, the token cache, clear errors, and the CLI end to end on a corpus
with 1% forget documents (keyword list; label field with a topic field and saved models)."""
import json

import numpy as np
import pytest
import torch

from gradroute.cli import main
from gradroute.experiments import lm_unlearning as E
from gradroute.lm import sources, user_corpus
from gradroute.lm.corpus import generate_stories
from gradroute.lm.labels import FORGET, RETAIN, UNLABELLED, ForgetRule, LabelError, rule_from_args
from gradroute.lm.sources import CorpusError, iter_documents
from gradroute.lm.user_corpus import write_example_corpus
from gradroute.lm.splits import SplitError, SplitTargets, plan_splits

TINY = dict(
    corpus=dict(n_train=0, n_eval=8, n_attack=4, n_val=4),
    tokenizer="bpe", vocab_size=300,
    model=dict(n_ctx=48, n_layer=2, n_head=2, d_model=16, d_mlp=32),
    train=dict(steps=2, lr=1e-2, warmup=1, ckpt_every=1), batch_size=8,
    method=dict(expand=4, coherence_steps=1, rmu_steps=1),
    attack=dict(sizes=[1, 4], steps=2, repeats=1, lr=1e-3, eval_every=1, batch_size=None, n_eval=4),
    seeds=1)
METHODS = ["base", "filtering", "era", "param_routing"]


def make_corpus(path, n=600, n_forget=6, n_topic=20, parts=1):
    """The tutorial's example corpus (docs/your_data.md) at a small size: ``n`` documents,
    ``n_forget`` labelled "forget" (forest stories naming it), ``n_topic`` forest stories with no
    keyword and no label ("topic": true), the others every second one labelled "retain".
    Returns the folder (``parts`` JSONL files) or, with ``parts=1``, its one file."""
    folder = write_example_corpus(path, n=n, forget=n_forget / n, topic=n_topic / n, parts=parts)
    return folder if parts > 1 else folder / "part-0.jsonl"


@pytest.fixture
def env(monkeypatch, tmp_path):
    monkeypatch.setitem(E.PROFILES, "tiny", TINY)
    monkeypatch.setenv("GRADROUTE_CACHE", str(tmp_path / "cache"))
    E._prepare.cache_clear()
    yield tmp_path
    E._prepare.cache_clear()


def _run(out, *flags):
    return main(["run", "lm-unlearning", "--profile", "tiny", "--out", str(out), "--methods", *METHODS,
                 "--fractions", "1", "--workers", "1", "--device", "cpu", *flags])


# ------------------------------------------------------------------------------------------
# CLI end to end, 1% forget documents
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_keyword_list_one_percent(env, capsys):
    corpus = make_corpus(env / "docs")                                    # one .jsonl file
    assert corpus.suffix == ".jsonl"
    assert _run(env / "out", "--corpus", str(corpus), "--forget-words", "tree", "forest,woodland") == 0
    m = json.loads((env / "out" / "metrics.json").read_text())
    c = m["corpus"]
    assert c["documents"] == 600 and c["forget_documents"] == 6            # 1% forget
    assert c["held_out"]["forget"] == 1 and c["held_out"]["attack_pool"] == 1 and c["held_out"]["forget_val"] == 1
    assert c["forget"] == 3                                               # the rest trains
    assert c["rule"] == "keywords tree, forest, woodland"
    assert m["config"]["attack"]["sizes"] == [1]                           # shrunk to the attack pool
    assert sorted(r["method"] for r in m["runs"]) == sorted(METHODS)
    for r in m["runs"]:
        assert np.isfinite([r["retain_loss"], r["forget_loss"], r["forget_loss_after_attack"]]).all()
    by = {r["method"]: r for r in m["runs"]}
    assert by["filtering"]["stories_dropped"] == 3
    table = (env / "out" / "evaluation.md").read_text()
    assert "| param_routing | 1 | 1 |" in table and "topic_loss" not in table
    assert "585 training stories, 3 match the forget rule (0.5%)" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_label_field_topic_and_saved_models(env):
    transformers = pytest.importorskip("transformers")
    corpus = make_corpus(env / "docs", parts=2)                           # a folder of 2 JSONL files
    assert _run(env / "out", "--corpus", str(corpus), "--label-field", "label", "--topic-field", "topic",
                "--arch", "hf-gpt2", "--save-models") == 0
    m = json.loads((env / "out" / "metrics.json").read_text())
    c = m["corpus"]
    assert c["forget_documents"] == 6 and c["topic_documents"] == 20 and c["held_out"]["topic"] == 8
    assert c["unlabelled_documents"] == (600 - 26) // 2 + 20 and c["retain_source"] == "retain"
    assert all("topic_loss" in r for r in m["runs"])
    assert "topic_loss" in (env / "out" / "evaluation.md").read_text()
    # the saved unlearned model loads in plain transformers and scores what the run recorded
    from gradroute.lm.evaluate import mean_loss

    tok, train, sets, _ = user_corpus.prepare(m["config"])
    rec = json.loads((env / "out" / "runs" / "param_routing_p1_s0.json").read_text())
    model = transformers.AutoModelForCausalLM.from_pretrained(rec["saved_model"])
    assert model.config.n_inner == 32                                    # the 4 routed units were removed
    assert model.config.eos_token_id == tok.eot_id                       # not GPT2Config's 50256
    assert mean_loss(model, sets["forget"]) == pytest.approx(rec["forget_loss"], abs=1e-5)
    assert mean_loss(model, sets["topic"]) == pytest.approx(rec["topic_loss"], abs=1e-5)
    hf_tok = transformers.AutoTokenizer.from_pretrained(rec["saved_model"])
    assert hf_tok.encode("Once upon a time") == tok.encode("Once upon a time")
    # the held-out documents for `gradroute eval --data`: the evaluation sets, none of them trained on
    data = {k: [json.loads(line) for line in (env / "out" / "eval_data" / f"{k}.jsonl").read_text().splitlines()]
            for k in ("forget", "retain", "topic")}
    assert [len(data[k]) for k in ("forget", "retain", "topic")] == [c["held_out"]["forget"], c["held_out"]["retain"], 8]
    assert all(d["label"] == "forget" for d in data["forget"])
    for k in ("forget", "retain", "topic"):      # the same documents, in the same order, as the evaluation sets
        for d, row in zip(data[k], sets[k].x):
            ids = tok.encode(d["text"])[:8]
            assert row[:len(ids)].tolist() == ids


# ------------------------------------------------------------------------------------------
# sources and the token cache
# ------------------------------------------------------------------------------------------
def test_formats(tmp_path):
    (tmp_path / "a.txt").write_text("First one.\n\nSecond one.\n")
    (tmp_path / "b.txt").write_text("Doc one\nstill one<|endoftext|>Doc two")
    assert [d.text for d in iter_documents(tmp_path / "a.txt")] == ["First one.", "Second one."]
    assert [d.text for d in iter_documents(tmp_path / "b.txt")] == ["Doc one\nstill one", "Doc two"]
    (tmp_path / "c.jsonl").write_text('{"body": "x y", "label": "forget"}\n"plain string"\n', encoding="utf-8")
    docs = list(iter_documents(tmp_path / "c.jsonl", text_field="body"))
    assert docs[0].record == {"body": "x y", "label": "forget", "text": "x y"} and docs[0].where.endswith("c.jsonl:1")
    assert docs[1].text == "plain string"
    # a folder: .txt files are one document each, with their sub-folder as a field
    f = tmp_path / "folder"
    (f / "forget").mkdir(parents=True)
    (f / "retain").mkdir()
    (f / "forget" / "1.txt").write_text("A tree.\nTwo lines.")
    (f / "retain" / "2.txt").write_text("A cat.")
    (f / "more.jsonl").write_text('{"text": "From jsonl."}\n')
    docs = list(iter_documents(f))
    assert [(d.text, d.record.get("folder")) for d in docs] == [
        ("A tree.\nTwo lines.", "forget"), ("From jsonl.", None), ("A cat.", "retain")]


def test_parquet_and_datasets_folder(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"text": ["one doc", "two doc", ""], "label": ["forget", None, "retain"]})
    pq.write_table(table, tmp_path / "d.parquet")
    docs = list(iter_documents(tmp_path / "d.parquet"))
    assert [(d.text, d.record["label"]) for d in docs] == [("one doc", "forget"), ("two doc", None)]
    assert docs[1].where.endswith("d.parquet:row 1")
    # the layout datasets' save_to_disk writes: state.json + Arrow stream files; a DatasetDict on top
    ds = tmp_path / "ds" / "train"
    ds.mkdir(parents=True)
    with pa.OSFile(str(ds / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (ds / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (tmp_path / "ds" / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    assert [d.text for d in iter_documents(tmp_path / "ds")] == ["one doc", "two doc"]
    with pytest.raises(CorpusError, match="no split 'test'"):
        list(iter_documents(tmp_path / "ds", split="test"))
    with pytest.raises(CorpusError, match=r"d.parquet: no text column 'body' \(columns: text, label\)"):
        list(iter_documents(tmp_path / "d.parquet", text_field="body"))


def test_token_cache_is_reused_and_memory_mapped(env, monkeypatch):
    corpus = make_corpus(env / "docs", n=200, n_forget=8, n_topic=4)
    cfg = E.build_config(_args(corpus, ["--label-field", "label"]))
    tok, train, sets, counts = user_corpus.prepare(cfg)
    assert len(train) + sum(len(s) for s in sets.values()) == 200
    assert int(train.forget.sum()) + sum(len(sets[k]) for k in ("forget", "attack_pool", "forget_val")) == 8
    x_file = counts["token_cache"] + "/x.npy"
    assert np.load(x_file, mmap_mode="r").shape == (200, 48)
    assert isinstance(np.load(x_file, mmap_mode="r"), np.memmap)
    # rows decode back to the documents, in the order train then each held-out set
    first = next(d for d in iter_documents(corpus))
    assert tok.decode([i for i in train.x[0].tolist() if i != tok.eot_id]).startswith(first.text[:40])
    # second time: nothing is tokenized again
    import os

    stamp = os.stat(x_file).st_mtime_ns
    _, train2, _, counts2 = user_corpus.prepare(cfg)
    assert os.stat(x_file).st_mtime_ns == stamp
    assert counts2["token_cache"] == counts["token_cache"] and torch.equal(train2.y, train.y)


def test_keyword_tokens_marked(tmp_path):
    from gradroute.lm.tokenizer import train_bpe

    tok = train_bpe(generate_stories(50, seed=1), 300, cache=tmp_path)
    docs = [sources.Doc(t, {"text": t}, f"mem:{i}") for i, t in enumerate(["A tall tree stood there.", "No match."])]
    rule = ForgetRule(words=["tree"])
    folder = sources.tokenize_to_cache(iter(docs), np.array([1, 0]), tok, 24, rule.spans, tmp_path / "c")
    s = sources.stories_from_cache(folder, slice(0, 2), torch.tensor([False, True]))
    assert not s.keyword[0].any()
    marked = [tok.decode([int(t)]) for t in s.y[1][s.keyword[1]]]
    assert "".join(marked).strip() == "tree"
    n = len(tok.encode("A tall tree stood there."))
    assert (s.y[1] != -100).sum() == n and s.y[1][n - 1] == tok.eot_id      # ends with <|endoftext|>


def _args(corpus, flags):
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--out")
    p.add_argument("--device", default="cpu")
    E.add_arguments(p)
    return p.parse_args(["--profile", "tiny", "--corpus", str(corpus), *flags])


# ------------------------------------------------------------------------------------------
# labels and splits
# ------------------------------------------------------------------------------------------
def test_rules():
    r = ForgetRule(label_field="label", words=["tree"], topic_field="topic")
    assert r.status({"text": "a tree", "label": "retain"}) == RETAIN           # the label field wins
    assert r.status({"text": "a tree"}) == FORGET and r.status({"text": "a cat", "label": None}) == RETAIN
    assert ForgetRule(label_field="label").status({"text": "a tree"}) == UNLABELLED
    assert r.spans("Trees and a tree.") == [(12, 16)]
    assert r.is_topic({"text": "", "topic": "yes"}) and not r.is_topic({"text": "", "topic": "false"})
    assert ForgetRule(regex=r"\bbio\w*").status({"text": "Biology class"}) == FORGET
    fn = ForgetRule(fn=lambda rec: True if "owl" in rec["text"] else None)
    assert fn.status({"text": "an owl"}) == FORGET and fn.status({"text": "a cat"}) == UNLABELLED
    assert rule_from_args().words == ("tree", "trees", "forest", "forests", "woodland", "woodlands")
    with pytest.raises(LabelError, match=r"docs.jsonl:7: field 'label' is 'maybe'"):
        r.status({"text": "x", "label": "maybe"}, "docs.jsonl:7")
    with pytest.raises(LabelError, match="not a valid regular expression"):
        ForgetRule(regex="(unclosed")
    with pytest.raises(LabelError, match="x.jsonl:2: the forget callable returned 3"):
        ForgetRule(fn=lambda rec: 3).status({"text": "x"}, "x.jsonl:2")


def test_splits_down_to_half_a_percent():
    status = np.full(1000, RETAIN, dtype=np.int8)
    status[[3, 250, 500, 750, 999]] = FORGET                                  # 0.5% forget
    plan = plan_splits(status, np.zeros(1000, bool), SplitTargets(), seed=0)
    idx = plan["index"]
    assert plan["sizes"]["forget"] == 1 and plan["sizes"]["attack_pool"] == 1 and plan["sizes"]["forget_val"] == 1
    assert (status[idx["train"]] == FORGET).sum() == 2
    assert set(idx["forget"]) | set(idx["attack_pool"]) | set(idx["forget_val"]) < {3, 250, 500, 750, 999}
    every = np.concatenate(list(idx.values()))
    assert np.array_equal(np.sort(every), np.arange(1000))                    # a partition
    with pytest.raises(SplitError, match="has 5 forget documents; the held-out sets need 3 .* \\+ 2"):
        plan_splits(status, np.zeros(1000, bool), SplitTargets(forget=3, attack_pool=2))
    status[[3, 250]] = RETAIN
    with pytest.raises(SplitError, match="has 3 forget document.*at least 4"):
        plan_splits(status, np.zeros(1000, bool), SplitTargets())
    # only "forget" labels: retain sets come from unlabelled documents, and say so
    s = np.full(100, UNLABELLED, dtype=np.int8)
    s[:10] = FORGET
    assert plan_splits(s, np.zeros(100, bool), SplitTargets())["retain_source"] == "unlabelled"


# ------------------------------------------------------------------------------------------
# clear errors for bad input
# ------------------------------------------------------------------------------------------
def test_bad_input_errors(env):
    corpus = make_corpus(env / "docs", n=100, n_forget=5, n_topic=2)
    with pytest.raises(LabelError, match=r"part-0.jsonl: no document has the label field 'kind' \(fields of "
                                         r"the first document, .*part-0.jsonl:1: text"):
        E.build_config(_args(corpus, ["--label-field", "kind"]))
    (env / "empty.jsonl").write_text("\n\n")
    with pytest.raises(CorpusError, match="empty.jsonl contains no documents"):
        E.build_config(_args(env / "empty.jsonl", []))
    with pytest.raises(LabelError, match=r"part-0.jsonl: no forget documents under the rule \(keywords zebra\) "
                                         "among 100 documents"):
        E.build_config(_args(corpus, ["--forget-words", "zebra"]))
    (env / "bad.jsonl").write_text('{"text": "ok", "label": "forget"}\n{"text": "x", "label": "yes"}\n')
    with pytest.raises(LabelError, match=r"bad.jsonl:2: field 'label' is 'yes'"):
        E.build_config(_args(env / "bad.jsonl", ["--label-field", "label"]))
    (env / "broken.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(CorpusError, match=r"broken.jsonl:2: not valid JSON"):
        E.build_config(_args(env / "broken.jsonl", []))
    (env / "notext.jsonl").write_text('{"body": "ok"}\n')
    with pytest.raises(CorpusError, match=r"notext.jsonl:1: no text field 'text' \(fields: body\)"):
        E.build_config(_args(env / "notext.jsonl", []))
    with pytest.raises(FileNotFoundError, match="corpus .*missing.jsonl does not exist"):
        E.build_config(_args(env / "missing.jsonl", []))
    with pytest.raises(SplitError, match="has 5 forget documents"):
        E.build_config(_args(corpus, ["--label-field", "label", "--n-eval", "4"]))
    with pytest.raises(LabelError, match="no document has a true evaluation field 'subject'"):
        E.build_config(_args(corpus, ["--label-field", "label", "--topic-field", "subject"]))
    with pytest.raises(ValueError, match="--model brings its own shape"):
        E.build_config(_args(corpus, ["--label-field", "label", "--model", str(env), "--vocab-size", "512"]))


# ------------------------------------------------------------------------------------------
# --model PATH: a user's Hugging Face model folder with its own tokenizer
# ------------------------------------------------------------------------------------------
def _llama_tokenizer(n_vocab=300):
    """A Llama-like fast tokenizer trained offline: <s> BOS prepended, </s> EOS, no pad token and
    no <|endoftext|> (so nothing in the pipeline may assume our own tokenizer's EOT)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(generate_stories(80, seed=5), trainers.BpeTrainer(
        vocab_size=n_vocab, special_tokens=["<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>")


def _llama_folder(path, tok, vocab=300, weights=True):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    if weights:
        model.save_pretrained(path)
    else:
        cfg.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.slow
def test_cli_model_folder_llama_saved_and_reloaded(env):
    """--model with a tiny Llama-style checkpoint (gated MLP, grouped-query attention) and its own
    tokenizer: base, ERA and parameter routing through the CLI; the saved unlearned models load
    with AutoModelForCausalLM and score the recorded losses."""
    transformers = pytest.importorskip("transformers")
    from gradroute.lm.evaluate import mean_loss
    from gradroute.lm.tokenizer import ModelTokenizer

    tok = _llama_tokenizer()
    folder = _llama_folder(env / "llama", tok)
    corpus = make_corpus(env / "docs")
    assert main(["run", "lm-unlearning", "--profile", "tiny", "--out", str(env / "out"), "--methods", "base", "era",
                 "param_routing", "--fractions", "1", "--workers", "1", "--device", "cpu", "--corpus", str(corpus),
                 "--label-field", "label", "--model", str(folder), "--save-models"]) == 0
    m = json.loads((env / "out" / "metrics.json").read_text())
    spec = m["config"]["model"]
    assert m["config"]["arch"] == "hf" and m["config"]["tokenizer"] == "model"
    assert spec["model_type"] == "llama" and spec["weights"] == "checkpoint"
    assert (spec["d_model"], spec["d_mlp"], spec["n_layer"], spec["vocab_size"], spec["n_ctx"]) == (16, 32, 2, 300, 48)
    t, train, sets, _ = user_corpus.prepare(m["config"])
    assert isinstance(t, ModelTokenizer) and t.eot_id == tok.eos_token_id
    assert int(train.x[0, 0]) == tok.bos_token_id                          # the model's own encoding (BOS first)
    for name in ("base_s0", "era_p1_s0", "param_routing_p1_s0"):
        rec = json.loads((env / "out" / "runs" / f"{name}.json").read_text())
        model = transformers.AutoModelForCausalLM.from_pretrained(rec["saved_model"])
        assert type(model).__name__ == "LlamaForCausalLM"
        assert model.config.intermediate_size == 32                       # ERA's / routing's new units removed
        assert mean_loss(model, sets["retain"]) == pytest.approx(rec["retain_loss"], abs=1e-5)
        assert mean_loss(model, sets["forget"]) == pytest.approx(rec["forget_loss"], abs=1e-5)
        back = transformers.AutoTokenizer.from_pretrained(rec["saved_model"])
        assert back.encode("Once upon a time") == tok.encode("Once upon a time")
    base = transformers.AutoModelForCausalLM.from_pretrained(folder)
    trained = transformers.AutoModelForCausalLM.from_pretrained(env / "out" / "models" / "base_s0")
    assert not torch.equal(base.lm_head.weight, trained.lm_head.weight)     # fine-tuned from the checkpoint


def test_cli_model_folder_errors(env):
    from gradroute.hf import ModelFolderError

    corpus = make_corpus(env / "docs", n=200, n_forget=8, n_topic=0)
    run = lambda *f: _run(env / "out", "--corpus", str(corpus), "--label-field", "label", *f)
    with pytest.raises(ModelFolderError, match="--model .*nowhere: no model folder"):
        run("--model", str(env / "nowhere"))
    tok = _llama_tokenizer()
    notok = _llama_folder(env / "notok", tok)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (notok / f).unlink(missing_ok=True)
    with pytest.raises(ModelFolderError, match="notok has no tokenizer files"):
        run("--model", str(notok))
    small = _llama_folder(env / "small", tok, vocab=200, weights=False)  # a 300-token tokenizer, 200 embeddings
    with pytest.raises(ModelFolderError, match=r"tokenizer does not match the model: .*small has 300 tokens but "
                                                r".*small embeds only 200"):
        run("--model", str(small))
    with pytest.raises(ValueError, match="drop --arch"):
        run("--model", str(notok), "--arch", "hf-gpt2")
    assert E.build_config(_args(corpus, ["--label-field", "label", "--lr", "1e-4"]))["train"]["lr"] == 1e-4
    with pytest.raises(ValueError, match="--lr must be > 0"):
        E.build_config(_args(corpus, ["--label-field", "label", "--lr", "0"]))


def test_model_tokenizer_interface(tmp_path):
    """ModelTokenizer gives the pipeline's interface over a model's own tokenizer: BOS kept,
    a post-processor's trailing EOS dropped (the pipeline appends eot_id itself), offsets kept;
    a tokenizer without eos uses its pad token; one with neither is refused, naming the folder."""
    from tokenizers import processors

    from gradroute.lm.tokenizer import ModelTokenizer, model_tokenizer

    tok = _llama_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)])
    tok.save_pretrained(tmp_path / "t")
    t = model_tokenizer(tmp_path / "t")
    text = "Once upon a time"
    enc = t.encode_batch([text])[0]
    assert enc.ids[0] == t.transformers.bos_token_id and enc.ids[-1] != t.eot_id == tok.eos_token_id
    assert t.encode(text) == enc.ids and len(enc.offsets) == len(enc.ids)
    assert text[enc.offsets[-1][0]:enc.offsets[-1][1]].strip() in text and t.vocab_size == len(tok)
    assert t.decode(enc.ids).endswith(text) and t.decode(enc.ids).startswith("<s>")
    nopad = _llama_tokenizer()
    nopad.eos_token, nopad.pad_token = None, "<s>"
    assert ModelTokenizer(nopad, "x").eot_id == nopad.pad_token_id
    nopad.pad_token = None
    with pytest.raises(ValueError, match="somewhere: the tokenizer has neither an eos nor a pad token"):
        ModelTokenizer(nopad, "somewhere")
