"""`gradroute run lm-unlearning` end to end on a tiny profile; resume; records; bad flags."""
import json

import pytest

from gradroute.cli import main
from gradroute.experiments import lm_unlearning as E

TINY = dict(
    corpus=dict(n_train=120, n_eval=8, n_attack=4, n_val=4),
    tokenizer="bpe", vocab_size=300,
    model=dict(n_ctx=48, n_layer=2, n_head=2, d_model=16, d_mlp=32),
    train=dict(steps=2, lr=1e-2, warmup=1, ckpt_every=1, eval_every=1), batch_size=8,
    method=dict(expand=4, coherence_steps=1, rmu_steps=1, rmu_grid={"layers": [0, 1], "c_mult": [1.0, 3.0]}),
    attack=dict(sizes=[1, 4], steps=2, repeats=1, lr=1e-3, eval_every=1, batch_size=None, n_eval=4),
    seeds=1)


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    monkeypatch.setitem(E.PROFILES, "tiny", TINY)
    monkeypatch.setenv("GRADROUTE_CACHE", str(tmp_path / "cache"))


@pytest.mark.slow
def test_end_to_end_and_resume(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["run", "lm-unlearning", "--profile", "tiny", "--out", str(out), "--fractions", "0", "1",
            "--workers", "1", "--device", "cpu"]
    assert main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["runs"]) == 6 * 2
    for r in m["runs"]:
        assert {"method", "labelled_fraction", "seed", "retain_loss", "forget_loss",
                "forget_loss_after_attack", "forget_loss_no_keywords"} <= set(r)
        assert r["forget_loss_after_attack"] <= r["forget_loss"] + 1e-9
    by = {(r["method"], r["labelled_fraction"]): r for r in m["runs"]}
    assert by[("filtering", 0.0)]["forget_loss"] == by[("base", 0.0)]["forget_loss"]   # p=0: nothing dropped
    assert "era_p1_s0" in by[("era", 1.0)]["from_run"]
    for f in ("summary.md", "samples.md", "unlearning_vs_labelled_fraction.png", "relearning_curves.png"):
        assert (out / f).is_file(), f
    assert "Timmy went to the forest" in (out / "samples.md").read_text()
    capsys.readouterr()
    assert main(argv) == 0                                      # resume: every run is already there
    assert "resuming: 9 of 9 runs" in capsys.readouterr().out


def test_jobs_share_base():
    jobs = E.jobs_for(["base", "filtering", "rmu", "era"], [0.0, 0.5], [0, 1])
    assert jobs.count(("base", None, 0)) == 1
    assert ("filtering", 0.0, 0) not in jobs and ("era", 0.0, 0) in jobs and ("rmu", 0.5, 1) in jobs
    assert E.jobs_for(["era"], [0.5], [0]) == [("era", 0.5, 0)]


@pytest.mark.parametrize("flags,msg", [(["--fractions", "1.5"], "fractions"), (["--steps", "0"], "steps"),
                                       (["--attack-steps", "0"], "attack-steps")])
def test_bad_flags(tiny, tmp_path, flags, msg):
    with pytest.raises(ValueError, match=msg):
        main(["run", "lm-unlearning", "--profile", "tiny", "--out", str(tmp_path), *flags])


def test_claims_are_computed_from_summary():
    """The issue's checks on seed means, with whether the 95% intervals separate."""
    from gradroute.utils import mean_ci

    def mk(a, r, df=None, dr=None):
        d = {"forget_loss_after_attack": mean_ci(a), "retain_loss": mean_ci(r)}
        if df is not None:
            d.update(ablation_forget_raise=mean_ci(df), ablation_retain_raise=mean_ci(dr),
                     ablation_margin=mean_ci([f - 3 * x for f, x in zip(df, dr)]))
        return d
    summary = {"filtering": {"0.5": mk([2.0, 2.01, 1.99], [1.0] * 3), "1": mk([3.0] * 3, [1.0] * 3)},
               "era": {"0.5": mk([2.5, 2.6, 2.4], [1.2] * 3, [0.3, 0.4, 0.5], [0.01, 0.02, 0.0]),
                       "1": mk([2.8] * 3, [1.2] * 3)},
               "param_routing": {"0.5": mk([1.5, 2.7, 2.0], [1.1] * 3, [0.1, 0.1, 0.1], [0.05, 0.05, 0.05]),
                                 "1": mk([2.9] * 3, [1.1] * 3)}}
    c = E.check_claims(summary)
    era = c["era > filtering on robust unlearning at p=0.5"]
    assert era["holds"] and era["intervals_separate"] and era["n"] == 3
    pr = c["param_routing > filtering on robust unlearning at p=0.5"]
    assert pr["holds"] and not pr["intervals_separate"]             # mean above, interval overlaps
    assert c["era ablation raises forget >= 3x retain at p=0.5"]["holds"]
    assert not c["param_routing ablation raises forget >= 3x retain at p=0.5"]["holds"]   # 0.1 < 3 x 0.05
    assert not any("p=1" in k for k in c)                           # the checks are about 0 < p <= 0.5
    o = E.other_claims(summary)
    assert o["filtering most robust at p=1"]["holds"]
    assert not o["param_routing better trade-off than era"]["holds"]      # 2.07 < 2.5 robust forget at p=0.5
    runs = [{"method": m, "labelled_fraction": 0.5, "seed": s, "forget_loss_after_attack": v}
            for m, vals in (("filtering", [2.0, 2.1, 1.9]), ("era", [2.05, 2.16, 1.97])) for s, v in enumerate(vals)]
    paired = E.paired_vs_filtering(runs)
    assert paired["era"]["0.5"]["mean"] == pytest.approx(0.06) and paired["era"]["0.5"]["n"] == 3
    c = E.check_claims(summary, paired)["era > filtering on robust unlearning at p=0.5"]
    assert c["paired_interval_above_0"] and c["paired_difference"]["lo"] > 0     # 0.05, 0.06, 0.07
    one = {"filtering": {"0.5": mk([2.0], [1.0])}, "era": {"0.5": mk([2.5], [1.0])}}
    assert not E.check_claims(one)["era > filtering on robust unlearning at p=0.5"]["intervals_separate"]


def test_tables_say_n1_without_interval():
    from gradroute.utils import mean_ci

    text = E.summary_tables({"base": {"0": {"retain_loss": mean_ci([2.0])}}})
    assert "n=1" in text and "±" not in text and "2.000" in text
    text = E.summary_tables({"base": {"0": {"retain_loss": mean_ci([2.0, 2.2, 2.1])}}})
    assert "n=3" in text and "2.100 ± 0.248" in text


@pytest.mark.slow
def test_report_section(tiny, tmp_path):
    out = tmp_path / "o"
    main(["run", "lm-unlearning", "--profile", "tiny", "--out", str(out), "--fractions", "0.5", "1",
          "--methods", "filtering", "era", "param_routing", "--workers", "1", "--device", "cpu"])
    r = E.report(out)
    # 2 training steps learn nothing specific to the forget stories: the report says so instead of a verdict
    assert r["verdict"] == "not assessed (little to unlearn)" and r["detail"].startswith("WARNING: little to unlearn")
    assert len(r["table"]["rows"]) == 3 * 2 + 2 * 2 + 3           # + ablation rows + steps to recover
    assert r["table"]["rows"][-1][0] == "param_routing (attack steps to recover, n=4)"
    assert r["figures"] == ["unlearning_vs_labelled_fraction.png", "relearning_curves.png", "learning_curves.png"]
    assert "intervals" in r["detail"] and "n=1" in r["detail"]
    m = json.loads((out / "metrics.json").read_text())
    assert m["domain_check"]["learned"] is False and m["domain_check"]["n"] == 1
    assert set(m["claims"]) == {f"{meth} {what} at p=0.5" for meth in ("era", "param_routing")
                                for what in ("> filtering on robust unlearning", "ablation raises forget >= 3x retain")}
    run = json.loads((out / "runs" / "filtering_p0.5_s0.json").read_text())
    assert [e["step"] for e in run["learning_curve"]] == [0, 1, 2]            # eval_every=1 on 2 steps
    assert {"retain_val", "forget_val"} <= set(run["learning_curve"][0])
