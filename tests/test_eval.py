"""``gradroute eval``: the local tasks' data, bad inputs, and lm-eval end to end on two tiny
saved GPT-2 models, offline."""
import json
import math
import os
import re
import sys

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from gradroute import cli  # noqa: E402
from gradroute.lm import eval as ev  # noqa: E402

MED = [("Fever", 'Fe"ver', "A disease marked by heat of the body and a quick pulse; as, a fever of the lungs."),
       ("Scalpel", 'Scal"pel', "A small knife used by surgeons in dissections and operations."),
       ("Tonic", 'Ton"ic', "A medicine that gives strength and tone to the body; a tonic for the blood."),
       ("Ulcer", 'Ul"cer', "An open sore of the skin, discharging pus; ulcers of the mouth."),
       ("Pulse", "Pulse", "The beating of the arteries, felt at the wrist, as the heart drives the blood."),
       ("Salve", "Salve", "An ointment for wounds and sores of the skin.")]
OTHER = [("Anchor", 'An"chor', "An iron instrument which holds a ship at rest in water."),
         ("Harrow", 'Har"row', "A frame set with teeth, drawn over plowed land to break the clods."),
         ("Lantern", 'Lan"tern', "A case in which a light is carried, with windows of glass or horn."),
         ("Meadow", 'Mead"ow', "A tract of low land where grass is grown for hay; meadows by the river."),
         ("Saddle", 'Sad"dle', "A seat for a rider on the back of a horse."),
         ("Kettle", 'Ket"tle', "A metallic vessel for boiling water over a fire.")]


def _entry(word, pron, definition, pos="n."):
    return f"{word} \\{pron}\\, {pos} {definition}"


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A folder laid out as ``gradroute run lm-unlearning --save-models`` leaves it: two tiny GPT-2
    models (different seeds) under models/, held-out documents under eval_data/."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from gradroute.hf import save_unlearned
    from gradroute.lm.tokenizer import wrap_tokenizer
    from gradroute.lm.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("run")
    forget = [{"text": _entry(w, p, "(Med.) " + d), "headword": w} for w, p, d in MED]
    retain = [{"text": _entry(w, p, d), "headword": w} for w, p, d in OTHER]
    _write_jsonl(root / "eval_data" / "forget.jsonl", forget)
    _write_jsonl(root / "eval_data" / "retain.jsonl", retain)
    tok = train_bpe([r["text"] for r in forget + retain], 300, cache=root / "tok")
    for seed, name in ((0, "base"), (1, "era")):
        torch.manual_seed(seed)
        eot = tok.hf.token_to_id("<|endoftext|>")
        cfg = transformers.GPT2Config(vocab_size=300, n_positions=128, n_embd=8, n_layer=1, n_head=2,
                                      n_inner=16, bos_token_id=eot, eos_token_id=eot)
        save_unlearned(transformers.GPT2LMHeadModel(cfg).eval(), root / "models" / name,
                       tokenizer=wrap_tokenizer(tok))
    return root


# ---------------------------------------------------------------------------------- the data
def test_split_entry_cuts_the_gcide_head_and_masks_the_word():
    med = 'Medicine \\Med"i*cine\\, n. [L. medicina.] The science of medicines; medicine chest.'
    # "medicina" does not start with "medicine"
    assert ev.split_entry(med, "Medicine") == ("Medicine", "n. [L. medicina.] The science of ___; ___ chest.")
    assert ev.split_entry(med, "Medicine", etymology=False) == ("Medicine", "n. The science of ___; ___ chest.")
    # nested letter marks inside an etymology; a short mark alone is no etymology
    assert ev.split_entry('Hemianaesthesia \\Hem`i*an`[ae]s*the"si*a\\, n. [Hemi- + an[ae]sthesia.] (Med.) '
                          "An[ae]sthesia of one side.", "Hemianaesthesia", etymology=False)[1] \
        == "n. (Med.) An[ae]sthesia of one side."
    assert ev.split_entry("Aphthae \\Aph\"th[ae]\\, n. pl. [ae] specks.", "Aphthae", False)[1] == "n. pl. [ae] specks."
    # more spellings with respellings; the index headword differs from the entry's word
    answer, d = ev.split_entry('Squinance \\Squin"ance\\ (skw[i^]n"ans), Squinancy \\Squin"an*cy\\ (-an*s[y^]), '
                               "n. (Med.) The quinsy. {Squinancy berries}, black currants.", "squinancy")
    assert answer == "Squinance" and d.startswith("n. (Med.) The quinsy.") and "{___ berries}" in d
    answer, d = ev.split_entry('Boil \\Boil\\, n. A hard tumor. {A blind boil}, one that fails.', "A blind boil")
    assert answer == "Boil" and d == "n. A hard tumor. {___}, one that fails."
    # plain text: the headword is the answer, cut from the start when it opens the text
    assert ev.split_entry("Gout: a painful disease; gouty joints.", "Gout") == ("Gout", "a painful disease; ___ joints.")


def test_headword_mc_items(tmp_path):
    recs = [{"text": _entry(w, p, d), "headword": w} for w, p, d in MED]
    recs.append({"text": "no headword here, skipped"})
    recs.append({"text": _entry("Fever", 'Fe"ver', MED[0][2]), "headword": "fever"})    # a duplicate: one item
    items = ev.build_headword_mc(recs)
    assert [it["headword"] for it in items] == [w for w, _, _ in MED]
    for it, (w, _, _) in zip(items, MED):
        assert len(it["choices"]) == 4 and len({c.lower() for c in it["choices"]}) == 4
        assert it["choices"][it["label"]] == w and sum(c == w for c in it["choices"]) == 1
        assert set(it["choices"]) <= {m[0] for m in MED}
        assert not re.search(re.escape(w), it["definition"], re.IGNORECASE)
        assert it["definition"].startswith("n. ")
    assert ev.build_headword_mc(recs) == items                           # fixed seed: the same file every time
    assert ev.build_headword_mc(recs, seed=1) != items
    assert len({it["label"] for it in items}) > 1                        # the answer's position varies
    long = ev.build_headword_mc([{"text": r["text"] + " more words" * 100, "headword": r["headword"]}
                                 for r in recs[:6]], max_chars=100)
    assert all(len(it["definition"]) <= 104 and it["definition"].endswith(" ...") for it in long)
    with pytest.raises(ev.EvalError, match=r"needs at least 4 distinct headwords, found 3.*somewhere\.jsonl"
                       r"|somewhere\.jsonl.*needs at least 4 distinct headwords, found 3"):
        ev.build_headword_mc(recs[:3], where="somewhere.jsonl")


def test_local_task_files(tmp_path, run_dir):
    pytest.importorskip("yaml")
    data = run_dir / "eval_data"
    written = ev.write_local_tasks(["gradroute_unlearning", "gradroute_headword", "gradroute_headword_question"],
                                   data, tmp_path / "t")
    # no topic.jsonl: the groups leave their topic tasks out
    assert written == ["gradroute_forget_ppl", "gradroute_retain_ppl", "gradroute_headword_mc",
                       "gradroute_headword_mc_retain", "gradroute_headword_question"]
    for split, rows in (("forget", MED), ("retain", OTHER)):
        lines = (tmp_path / "t" / f"headword_{split}.jsonl").read_text().splitlines()
        assert len(lines) == len(rows)
        for line, (w, _, d) in zip(lines, rows):
            it = json.loads(line)
            assert len(it["choices"]) == 4 and it["choices"][it["label"]] == w
            assert w.lower() not in it["definition"].lower() and it["definition"].startswith("n. ")
    yml = (tmp_path / "t" / "gradroute_headword_mc.yaml").read_text()
    assert "doc_to_text: label" in yml and "doc_to_target: definition" in yml     # headword first
    assert "Which word" in (tmp_path / "t" / "gradroute_headword_question.yaml").read_text()
    group = (tmp_path / "t" / "gradroute_unlearning.yaml").read_text()
    assert "gradroute_forget_ppl" in group and "gradroute_topic_ppl" not in group
    assert str((data / "forget.jsonl").resolve()) in (tmp_path / "t" / "gradroute_forget_ppl.yaml").read_text()
    # asked for by name, the topic task needs its file
    with pytest.raises(ev.EvalError, match=re.escape(str(data / "topic.jsonl"))):
        ev.write_local_tasks(["gradroute_topic_ppl"], data, tmp_path / "u")
    bad = tmp_path / "bad"
    _write_jsonl(bad / "forget.jsonl", [{"text": "ok"}])
    (bad / "forget.jsonl").write_text('{"text": "ok"}\n{"txt": 3}\n')
    with pytest.raises(ev.EvalError, match=r"forget\.jsonl:2: expected an object with a string 'text'"):
        ev.write_local_tasks(["gradroute_forget_ppl"], bad, tmp_path / "v")


def test_main_metric_and_side_by_side():
    assert ev.main_metric({"alias": "x", "acc,none": 0.25, "acc_stderr,none": 0.1, "acc_norm,none": 0.5}) == ("acc", 0.25)
    assert ev.main_metric({"word_perplexity,none": 99.0, "bits_per_byte,none": 2.0}) == ("bits_per_byte", 2.0)
    assert ev.main_metric({"f1,none": 0.5}) == ("f1", 0.5)
    table = ev.side_by_side({"base": {"results": {"t": {"acc,none": 0.25}, "g": {}}, "group_subtasks": {"g": ["t"]}},
                             "era": {"results": {"t": {"acc,none": 0.5}, "p": {"bits_per_byte,none": 12345.6}}}})
    assert table.splitlines() == ["| task | metric | base | era |", "|---|---|---|---|", "| t | acc | 0.2500 | 0.5000 |",
                                  "| p | bits_per_byte |  | 1.235e+04 |"]


# ---------------------------------------------------------------------------------- bad inputs
def _eval(capsys, *argv):
    rc = cli.main(["eval", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_missing_model_dir(tmp_path, capsys):
    rc, _, err = _eval(capsys, tmp_path / "nope", "--tasks", "gradroute_unlearning")
    assert rc == 2 and f"no model folder at {tmp_path / 'nope'}" in err


def test_model_dir_without_tokenizer(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    rc, _, err = _eval(capsys, tmp_path / "m", "--tasks", "gradroute_unlearning")
    assert rc == 2 and str(tmp_path / "m") in err and "no tokenizer" in err


def test_missing_data_folder(tmp_path, run_dir, capsys):
    rc, _, err = _eval(capsys, run_dir / "models" / "base", "--tasks", "gradroute_unlearning", "--data", tmp_path / "x")
    assert rc == 2 and f"--data {tmp_path / 'x'}: no such folder" in err


def test_default_data_folder_missing(tmp_path, run_dir, capsys):
    pytest.importorskip("lm_eval")
    import shutil

    shutil.copytree(run_dir / "models" / "base", tmp_path / "r" / "models" / "base")
    rc, _, err = _eval(capsys, tmp_path / "r" / "models" / "base", "--tasks", "gradroute_forget_ppl")
    assert rc == 2
    assert str(tmp_path / "r" / "eval_data" / "forget.jsonl") in err and "pass --data DIR" in err


def test_include_path_must_be_a_folder(tmp_path, run_dir, capsys):
    (tmp_path / "t.yaml").write_text("task: t\n")
    rc, _, err = _eval(capsys, run_dir / "models" / "base", "--tasks", "t", "--include-path", tmp_path / "t.yaml")
    assert rc == 2 and f"--include-path {tmp_path / 't.yaml'}: no such folder" in err


def test_unknown_local_task(run_dir, capsys):
    pytest.importorskip("lm_eval")
    rc, _, err = _eval(capsys, run_dir / "models" / "base", "--tasks", "gradroute_forget_pl")
    assert rc == 2 and "unknown task 'gradroute_forget_pl'" in err and "did you mean gradroute_forget_ppl" in err


def test_definition_longer_than_the_context(tmp_path, run_dir):
    import shutil

    m = tmp_path / "short"
    shutil.copytree(run_dir / "models" / "base", m)
    cfg = json.loads((m / "config.json").read_text())
    ev.write_local_tasks(["gradroute_headword_mc"], run_dir / "eval_data", tmp_path / "t")
    files = [tmp_path / "t" / "headword_forget.jsonl"]
    ev.check_mc_fits(m, files, 120)                                # 128 positions: fits
    (m / "config.json").write_text(json.dumps({**cfg, "n_positions": 8}))
    with pytest.raises(ev.EvalError, match=rf"{re.escape(str(m))}: the headword item for .* context is 8; lower --mc-chars"):
        ev.check_mc_fits(m, files, 120)


def test_without_lm_eval(run_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)           # import lm_eval raises ImportError
    rc, _, err = _eval(capsys, run_dir / "models" / "base", "--tasks", "gradroute_unlearning")
    assert rc == 2 and 'pip install "gradroute[eval]"' in err


# ---------------------------------------------------------------------------------- end to end
def _numbers(table_rows):
    return [float(c) for row in table_rows for c in row.split("|")[1:-1]
            if re.fullmatch(r"\s*-?\d+(\.\d+)?(e[-+]?\d+)?\s*", c)]


@pytest.mark.slow
def test_eval_two_models_local_and_user_tasks(tmp_path, run_dir, capsys):
    pytest.importorskip("lm_eval")
    # the user's own task, from their files
    _write_jsonl(tmp_path / "mine" / "docs.jsonl", [{"body": "A fever and an ulcer."}, {"body": "A saddle."}])
    (tmp_path / "mine" / "my_ppl.yaml").write_text(
        "task: my_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files: "
        f"{tmp_path / 'mine' / 'docs.jsonl'}\noutput_type: loglikelihood_rolling\ntest_split: train\n"
        "doc_to_text: ''\ndoc_to_target: body\nmetric_list:\n  - metric: bits_per_byte\n    aggregation: bits_per_byte\n"
        "    higher_is_better: false\n")
    out = tmp_path / "res" / "results.json"
    models = [run_dir / "models" / "base", run_dir / "models" / "era"]
    rc, printed, err = _eval(capsys, *models, "--tasks", "gradroute_unlearning", "gradroute_headword",
                             "gradroute_headword_question", "my_ppl",
                             "--include-path", tmp_path / "mine", "--device", "cpu", "--batch-size", "4",
                             "--out", out)
    assert rc == 0, err
    assert printed.count("## base") == 1 and printed.count("## era") == 1
    tables = printed.split("side by side:")[0]
    for t in ("gradroute_forget_ppl", "gradroute_retain_ppl", "gradroute_headword_mc", "gradroute_headword_mc_retain",
              "gradroute_headword_question", "my_ppl"):
        assert len(re.findall(rf"\|\s*(- )?{t}\s*\|", tables)) == 2, t     # a row in each model's table
    rows = [r for r in printed.splitlines() if r.startswith("|") and not r.startswith("|--")]
    nums = _numbers(rows)
    assert nums and all(math.isfinite(x) for x in nums)
    side = printed.split("side by side:")[1].splitlines()
    assert "| task | metric | base | era |" in side
    row = next(r for r in side if r.startswith("| gradroute_forget_ppl | bits_per_byte |"))
    assert all(float(c) > 0 for c in row.strip("| ").split(" | ")[2:])
    assert not any(r.startswith("| gradroute_unlearning") for r in side)      # groups without a metric: no row
    res = json.loads(out.read_text())
    assert list(res["results"]) == ["base", "era"] and res["data"] == str(run_dir / "eval_data")
    base, era = (res["results"][m]["results"]["gradroute_forget_ppl"]["bits_per_byte,none"] for m in ("base", "era"))
    assert base != era                                              # two models, two results
    for r in res["results"].values():
        for t in ("gradroute_headword_mc", "gradroute_headword_mc_retain", "gradroute_headword_question"):
            assert 0 <= r["results"][t]["acc,none"] <= 1 and r["n-samples"][t]["effective"] == len(MED)
        assert r["n-samples"]["gradroute_forget_ppl"]["effective"] == len(MED)
        assert math.isfinite(r["results"]["my_ppl"]["bits_per_byte,none"])
        assert r["results"]["gradroute_retain_ppl"]["word_perplexity,none"] > 1


@pytest.mark.slow
def test_unknown_task_searches_lm_evals_own(run_dir, capsys):
    pytest.importorskip("lm_eval")
    rc, _, err = _eval(capsys, run_dir / "models" / "base", "--tasks", "gradroute_unlearning", "no_such_task_xyz")
    assert rc == 2 and "unknown task 'no_such_task_xyz'" in err and "lm-eval's own tasks" in err


@pytest.mark.slow
def test_limit_and_one_model(tmp_path, run_dir, capsys):
    pytest.importorskip("lm_eval")
    out = tmp_path / "r.json"
    rc, printed, err = _eval(capsys, run_dir / "models" / "base", "--tasks", "gradroute_retain_ppl", "--limit", "2",
                             "--device", "cpu", "--out", out)
    assert rc == 0, err
    assert "side by side" not in printed                           # one model: its table only
    r = json.loads(out.read_text())["results"]["base"]
    assert list(r["results"]) == ["gradroute_retain_ppl"] and r["n-samples"]["gradroute_retain_ppl"]["effective"] == 2
