import json

import pytest

from gradroute.cli import main


@pytest.mark.slow
def test_demo_runs_and_writes_metrics(tmp_path, capsys):
    assert main(["demo", "--steps", "3", "--out", str(tmp_path)]) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["seed"] == 0 and m["steps"] == 3
    for name in ("routed", "control"):
        assert set(m[name]) == {"topic_a_loss", "topic_b_loss", "topic_a_loss_ablated", "topic_b_loss_ablated"}
    assert "Ablation raised topic-B loss" in capsys.readouterr().out


def test_unknown_experiment_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "mnsit"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown experiment 'mnsit'" in err and "mnist" in err


def test_run_without_experiment_lists_them(capsys):
    assert main(["run", "--help"]) == 0
    assert "experiments:" in capsys.readouterr().out
