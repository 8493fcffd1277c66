import argparse
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from gradroute import experiments, reproduce
from gradroute.utils import plt, savefig, write_json


def fake_module(name, calls, fail_first=False):
    mod = types.ModuleType(f"fake_{name}")

    def add_arguments(p):
        p.add_argument("--profile", default="quick")

    def run(args):
        calls.append(name)
        if fail_first and calls.count(name) == 1:
            raise KeyboardInterrupt  # simulated interruption mid-experiment
        fig, ax = plt().subplots(figsize=(2, 2))
        ax.plot([0, 1], [1, 0])
        savefig(fig, args.out / "curve.png")
        write_json(args.out / "metrics.json", {"value": 0.5, "profile": args.profile})

    def report(out):
        m = json.loads((out / "metrics.json").read_text())
        return {"title": f"Fake {name}", "claim": "value is one half", "paper": "0.5",
                "verdict": "reproduced" if m["value"] == 0.5 else "not", "detail": f"measured {m['value']}",
                "table": {"header": ["quantity", "ours", "paper"], "rows": [["value", m["value"], 0.5]]},
                "figures": ["curve.png"]}

    mod.add_arguments, mod.run, mod.report = add_arguments, run, report
    return mod


@pytest.fixture
def fakes(monkeypatch):
    calls = []
    mods = {"alpha": fake_module("alpha", calls), "beta": fake_module("beta", calls, fail_first=True)}
    monkeypatch.setattr(experiments, "EXPERIMENTS", {n: f"fake_{n}" for n in mods})
    monkeypatch.setattr(reproduce, "PLAN", {prof: {n: ("quick", []) for n in mods} for prof in reproduce.PROFILES})
    for n, m in mods.items():
        monkeypatch.setitem(sys.modules, f"fake_{n}", m)
    return calls


def args(out, **kw):
    ns = argparse.Namespace(profile="quick", out=Path(out), only=None, redo=[], device="cpu")
    ns.__dict__.update(kw)
    return ns


def test_report_and_resume_after_interruption(tmp_path, fakes):
    with pytest.raises(KeyboardInterrupt):
        reproduce.main(args(tmp_path))
    assert fakes == ["alpha", "beta"]
    assert (tmp_path / "alpha" / "done.json").exists() and not (tmp_path / "beta" / "done.json").exists()
    assert reproduce.main(args(tmp_path)) == 0
    assert fakes == ["alpha", "beta", "beta"]  # alpha not redone
    md = (tmp_path / "report.md").read_text()
    assert "Fake alpha" in md and "Fake beta" in md and "reproduced" in md and "gradroute run alpha" in md
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2
    assert reproduce.main(args(tmp_path)) == 0 and fakes.count("alpha") == 1
    assert reproduce.main(args(tmp_path, redo=["alpha"])) == 0 and fakes.count("alpha") == 2


def test_report_keeps_experiments_finished_earlier(tmp_path, fakes):
    with pytest.raises(KeyboardInterrupt):
        reproduce.main(args(tmp_path))                      # alpha finishes, beta is interrupted
    assert reproduce.main(args(tmp_path, only=["beta"])) == 0
    md = (tmp_path / "report.md").read_text()
    assert "Fake alpha" in md and "Fake beta" in md       # alpha kept though only beta ran now
    walls = [json.loads((tmp_path / n / "done.json").read_text())["wall_s"] for n in ("alpha", "beta")]
    assert f"Total wall time of the 2 finished experiment(s): {sum(walls):.0f} s" in md
    done = tmp_path / "alpha" / "done.json"                 # a result from another profile is left out
    done.write_text(json.dumps(dict(json.loads(done.read_text()), profile="paper")))
    assert reproduce.main(args(tmp_path, only=["beta"])) == 0
    assert "Fake alpha" not in (tmp_path / "report.md").read_text()


def test_corrupt_result_is_reported_and_kept(tmp_path, fakes, capsys):
    with pytest.raises(KeyboardInterrupt):
        reproduce.main(args(tmp_path))
    bad = tmp_path / "alpha" / "metrics.json"
    bad.write_text("{not json")
    assert reproduce.main(args(tmp_path)) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "not valid JSON" in err
    assert bad.read_text() == "{not json"                 # nothing finished is deleted
    assert (tmp_path / "beta" / "done.json").exists()     # the others still ran
    assert "corrupt result" in (tmp_path / "report.md").read_text()


def test_bad_input(tmp_path, fakes):
    with pytest.raises(SystemExit, match="unknown profile"):
        reproduce.main(args(tmp_path, profile="fast"))
    with pytest.raises(SystemExit, match="unknown experiment 'gamma'"):
        reproduce.main(args(tmp_path, only=["gamma"]))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit, match="cannot write"):
        reproduce.main(args(blocker / "sub"))


def test_html_renders_with_images_in_chromium(tmp_path, fakes):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium): HTML render check skipped")
    with pytest.raises(KeyboardInterrupt):
        reproduce.main(args(tmp_path))
    assert reproduce.main(args(tmp_path)) == 0
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
                          (tmp_path / "report.html").as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert 'data-images="2/2"' in dom


def test_claim_verdict_rule():
    from gradroute.utils import claim_verdict

    assert claim_verdict([True, True]) == "reproduced"
    assert claim_verdict([True, False]) == "partly"
    assert claim_verdict([True, False, False]) == "not"
    assert claim_verdict([]) == "not"


def test_claim_summary_sentence():
    from gradroute.utils import claim_summary

    verdict, text = claim_summary({"a": {"ok": True}, "b": {"ok": False}}, "ok", "checks hold")
    assert verdict == "partly" and text == "1 of 2 checks hold (a)"
    assert claim_summary({"a": {"ok": False}}, "ok")[1] == "0 of 1 checks hold (none)"
