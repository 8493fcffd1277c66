"""Real text: the GCIDE converter (on a tiny dictd pair written here), the domain corpus, the
domain-learned check, the steps-to-recover metric, and `reproduce --profile real` without the
dictionary."""
import gzip
import json

import numpy as np
import pytest

from gradroute.experiments import lm_unlearning as E
from gradroute.lm import gcide
from gradroute.lm.evaluate import domain_check, steps_to_recover
from gradroute.lm.sources import CorpusError
from gradroute.lm.user_corpus import SIZING

ENTRIES = [
    ("Aspirin", "Aspirin \\As\"pi*rin\\, n. (Med.) A drug that relieves pain and fever.\n   [1913 Webster]\n"),
    ("Femur", "Femur \\Fe\"mur\\, n. (Anat.) The thigh bone.\n   [WordNet 1.5]\n"),
    ("Oak", "Oak \\Oak\\, n. (Bot.) A tree of the genus Quercus, bearing acorns.\n   [PJC]\n"),
    ("Sail", "Sail \\Sail\\, n. (Naut.) A sheet of canvas spread to the wind.\n"),
    ("Fever", "Fever \\Fe\"ver\\, n. (Med.) (Physiol.) A rise of the body's temperature above the normal.\n"),
    ("Tiny", "Tiny \\Ti\"ny\\\n"),                                     # under 20 characters: dropped
]


def number(v: int) -> str:
    digits = ""
    while True:
        digits = gcide.B64[v % 64] + digits
        v //= 64
        if v == 0:
            return digits


def write_dictd(folder, entries=ENTRIES, extra_index=()):
    """A dictd pair: gcide.dict.dz (gzip) and gcide.index; each headword once, plus one alias
    line pointing at the first entry's record (a duplicate record is kept once)."""
    folder.mkdir(parents=True, exist_ok=True)
    data, lines = b"", []
    for head, text in entries:
        raw = text.encode()
        lines.append(f"{head}\t{number(len(data))}\t{number(len(raw))}")
        data += raw
    lines.insert(1, lines[0].replace(entries[0][0], entries[0][0].lower()))
    (folder / "gcide.index").write_text("\n".join([*lines, *extra_index]) + "\n")
    with gzip.open(folder / "gcide.dict.dz", "wb") as fh:
        fh.write(data)
    return folder


def test_dictd_numbers_round_trip():
    for v in (0, 1, 63, 64, 4095, 123456789):
        assert gcide.decode_number(number(v)) == v
    assert gcide.decode_number("BA") == 64
    with pytest.raises(ValueError, match="not a dictd base-64 digit"):
        gcide.decode_number("A-")


def test_convert_tiny_dictionary(tmp_path):
    d = write_dictd(tmp_path / "dictd")
    out = tmp_path / "gcide.jsonl.gz"
    assert gcide.convert(out, d) == 5                          # the alias is one record; "Tiny" is dropped
    rows = [json.loads(line) for line in gzip.open(out, "rt")]
    assert [r["headword"] for r in rows] == ["Aspirin", "Femur", "Oak", "Sail", "Fever"]
    assert rows[0]["text"] == "Aspirin \\As\"pi*rin\\, n. (Med.) A drug that relieves pain and fever."
    assert rows[0]["fields"] == ["Med"] and rows[4]["fields"] == ["Med", "Physiol"]
    assert all("[" not in r["text"] and "\n" not in r["text"] for r in rows)   # markers and line breaks gone
    assert gcide.read_entries(out) == rows


def test_convert_errors_name_the_line_and_offset(tmp_path):
    d = write_dictd(tmp_path / "a", extra_index=["Ghost\tZZZ\tBA"])
    with pytest.raises(CorpusError, match=rf"gcide.index:8: entry 'Ghost' at offset {25 * 64 * 64 + 25 * 64 + 25} "
                                          r"\(length 64\) lies outside"):
        gcide.convert(tmp_path / "x.jsonl", d)
    d = write_dictd(tmp_path / "b", extra_index=["Broken\tAB"])
    with pytest.raises(CorpusError, match=r"gcide.index:8: expected 'headword<TAB>offset<TAB>length', got 2"):
        gcide.convert(tmp_path / "x.jsonl", d)
    d = write_dictd(tmp_path / "c", extra_index=["Bad\tA!\tB"])
    with pytest.raises(CorpusError, match=r"gcide.index:8: bad offset/length 'A!'/'B'"):
        gcide.convert(tmp_path / "x.jsonl", d)
    with pytest.raises(gcide.GcideMissing, match="apt-get install dict-gcide"):
        gcide.convert(tmp_path / "x.jsonl", tmp_path / "nowhere")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "fields": []}\n{"text": 3}\n')
    with pytest.raises(CorpusError, match=r"bad.jsonl:2: an entry needs a 'text' string"):
        gcide.read_entries(bad)


def test_domain_corpus_and_cli(tmp_path, capsys):
    from gradroute.cli import main

    d = write_dictd(tmp_path / "dictd")
    out = tmp_path / "med.jsonl"
    assert main(["data", "gcide", "--dictd", str(d), "--domain", "Med", "--out", str(out)]) == 0
    assert "2 labelled forget (Med), 1 topical" in capsys.readouterr().out
    docs = [json.loads(line) for line in out.read_text().splitlines()]
    by = {r["headword"]: r for r in docs}
    assert by["Aspirin"]["label"] == "forget" and by["Fever"]["label"] == "forget"   # Med wins over Physiol
    assert by["Femur"]["topic"] is True and "label" not in by["Femur"]
    assert "label" not in by["Oak"] and "topic" not in by["Oak"]
    again = gcide.domain_corpus(list(gcide.iter_entries(*gcide.dictd_pair(d))), "Med")
    assert again == docs                                      # deterministic
    with pytest.raises(ValueError, match="also among the related"):
        gcide.domain_corpus([], "Anat")
    assert main(["data", "gcide", "--dictd", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "apt-get install dict-gcide" in capsys.readouterr().out


def test_steps_to_recover_on_a_hand_made_curve():
    curve = [[0, 3.0], [4, 2.6], [8, 2.2], [12, 1.8]]
    assert steps_to_recover(curve, 3.5) == 0.0                 # already at or below the base model
    assert steps_to_recover(curve, 2.6) == 4.0                 # reached exactly at an evaluation
    assert steps_to_recover(curve, 2.0) == pytest.approx(10.0)  # halfway between 2.2 (step 8) and 1.8 (step 12)
    assert steps_to_recover(curve, 1.5) is None                # never: censored
    rec = E.recovery({"4": curve, "1": [[0, 3.0], [4, 2.9]]}, {"4": [[0, 2.0]], "1": [[0, 2.0]]}, {"4": 100.0})
    assert rec["attack_steps_to_base_n4"] == pytest.approx(10.0) and rec["attack_recovered_n4"] == 1
    assert rec["attack_tokens_to_base_n4"] == pytest.approx(1000.0)
    assert rec["attack_recovered_n1"] == 0 and rec["attack_steps_to_base_n1"] == 4.0   # lower bound


def test_domain_check_says_whether_there_was_anything_to_unlearn():
    base = [{"seed": s, "forget_loss": 3.0, "retain_loss": 3.5, "topic_loss": 3.2} for s in range(3)]
    learned = [{"seed": s, "forget_loss": 3.5 + 0.01 * s, "retain_loss": 3.52, "topic_loss": 3.3} for s in range(3)]
    c = domain_check(base, learned)
    assert c["learned"] and c["forget_gap"]["mean"] == pytest.approx(0.51) and c["n"] == 3
    assert c["topic_gap"]["mean"] == pytest.approx(0.1) and "learned the forget domain" in c["message"]
    little = [{"seed": s, "forget_loss": 3.2, "retain_loss": 3.55} for s in range(3)]
    c = domain_check(base, little)
    assert not c["learned"] and c["message"].startswith("WARNING: little to unlearn") and "--steps" in c["message"]
    shared = [{"seed": s, "forget_loss": 3.4, "retain_loss": 3.6} for s in range(3)]      # 0.4 vs 0.1: under 5x
    assert not domain_check(base, shared)["learned"]
    with pytest.raises(ValueError, match="same seeds"):
        domain_check(base, [{"seed": 9, "forget_loss": 1, "retain_loss": 1}])


def test_jobs_add_the_fully_filtered_reference():
    jobs = E.jobs_for(["era"], [0.5], [0, 1], domain_check=True)
    assert jobs == [("base", None, 0), ("era", 0.5, 0), ("filtering", 1.0, 0),
                    ("base", None, 1), ("era", 0.5, 1), ("filtering", 1.0, 1)]
    assert E.jobs_for(["filtering"], [1.0], [0], domain_check=True).count(("filtering", 1.0, 0)) == 1


def test_reproduce_real_profile_skips_without_the_dictionary(tmp_path, monkeypatch, capsys):
    from gradroute import reproduce

    monkeypatch.setenv("GRADROUTE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GRADROUTE_GCIDE", raising=False)
    monkeypatch.setattr(gcide, "DICTD_DIR", tmp_path / "no-dictd")
    p = __import__("argparse").ArgumentParser()
    reproduce.add_arguments(p)
    assert reproduce.main(p.parse_args(["--profile", "real", "--out", str(tmp_path / "rep")])) == 0
    printed = capsys.readouterr().out
    for name in ("lm-unlearning", "token-routing"):                # both real-text experiments
        assert f"{name}: skipped: the GCIDE dictionary was not found" in printed
    report = (tmp_path / "rep" / "report.md").read_text()
    assert report.count("| skipped |") == 2 and "apt-get install dict-gcide" in report


def test_size_for_corpus_rule():
    from gradroute.lm.user_corpus import size_for_corpus

    cfg = {"train": {"steps": 800}, "batch_size": 24, "vocab_size": 1024}
    chosen = size_for_corpus(cfg, np.full(20_000, 250))                  # 5M characters, 20k documents
    assert cfg["vocab_size"] == chosen["vocab_size"] == 8192
    assert cfg["train"]["steps"] == chosen["steps"] == min(SIZING["max_steps"], int(np.ceil(SIZING["epochs"] * 20_000 / 24)))
    small = {"train": {"steps": 800}, "batch_size": 24, "vocab_size": 1024}
    size_for_corpus(small, np.full(600, 300))                            # a small corpus keeps the profile's sizes
    assert small["vocab_size"] == SIZING["vocab"][0] and small["train"]["steps"] == 800
    mid = {"train": {"steps": 800}, "batch_size": 24, "vocab_size": 1024}
    size_for_corpus(mid, np.full(4000, 250))                             # 1M characters: in between
    assert mid["vocab_size"] == 2048
    given = {"train": {"steps": 50}, "batch_size": 24, "vocab_size": 300}
    chosen = size_for_corpus(given, np.full(20_000, 250), explicit={"steps", "vocab_size"})
    assert given == {"train": {"steps": 50}, "batch_size": 24, "vocab_size": 300} and "steps" not in chosen


def write_entries(path, n_med=40, n_anat=30, n_other=160):
    import random

    rng = random.Random(0)
    words = "the a of to and in is by or as with from for on at body water light stone tree ship song law".split()
    med = "fever pain drug dose wound blood disease remedy pulse tumor".split()
    rows = []
    for i in range(n_med + n_anat + n_other):
        kind = "Med" if i < n_med else "Anat" if i < n_med + n_anat else None
        vocab = words + (med if kind else [])
        text = f"Word{i} \\Word{i}\\, n. " + (f"({kind}.) " if kind else "") + " ".join(rng.choice(vocab) for _ in range(30))
        rows.append({"headword": f"Word{i}", "text": text, "fields": [kind] if kind else []})
    gcide.write_jsonl(rows, path)
    return path


def test_real_profile_runs_through_the_user_corpus_path(tmp_path, monkeypatch, capsys):
    from gradroute.cli import main

    tiny = dict(corpus=dict(n_train=0, n_eval=8, n_attack=4, n_val=4), tokenizer="bpe", vocab_size=300,
                model=dict(n_ctx=48, n_layer=2, n_head=2, d_model=16, d_mlp=32),
                train=dict(steps=2, lr=1e-2, warmup=1, ckpt_every=1), batch_size=8,
                method=dict(expand=4, coherence_steps=1, rmu_steps=1),
                attack=dict(sizes=[1, 4], steps=4, repeats=1, lr=1e-3, eval_every=2, batch_size=None, n_eval=4),
                seeds=1, size_from_corpus=True)
    monkeypatch.setitem(E.PROFILES, "real", tiny)
    monkeypatch.setenv("GRADROUTE_CACHE", str(tmp_path / "cache"))
    E._prepare.cache_clear()
    entries = write_entries(tmp_path / "entries.jsonl.gz")
    out = tmp_path / "out"
    assert main(["run", "lm-unlearning", "--profile", "real", "--gcide", str(entries), "--methods", "base",
                 "filtering", "era", "--fractions", "0.5", "--workers", "1", "--device", "cpu", "--out", str(out)]) == 0
    E._prepare.cache_clear()
    m = json.loads((out / "metrics.json").read_text())
    ud = m["config"]["user_data"]
    assert ud["rule"]["label_field"] == "label" and ud["rule"]["topic_field"] == "topic"
    assert m["corpus"]["forget_documents"] == 40 and m["corpus"]["topic_documents"] == 30
    assert m["config"]["sizing"]["train_documents"] == m["corpus"]["stories"]
    assert m["config"]["train"]["steps"] == max(2, int(np.ceil(SIZING["epochs"] * m["corpus"]["stories"] / 8)))
    assert {"forget_gap", "retain_gap", "topic_gap", "learned", "message"} <= set(m["domain_check"])
    assert m["domain_check"]["message"] in capsys.readouterr().out
    era = next(r for r in m["runs"] if r["method"] == "era")
    assert {"topic_loss", "attack_steps_to_base_n4", "attack_recovered_n4", "attack_tokens_to_base_n4",
            "topic_loss_before_ablation", "topic_loss_after_ablation", "forget_loss_after_ablation"} <= set(era)
    assert {"topic_loss_after_ablation", "retain_loss_before_ablation"} <= set(m["summary"]["era"]["0.5"])
    assert E.report(out)["table"]["rows"]
