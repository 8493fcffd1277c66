import operator

import pytest

from gradroute.sweep import run_jobs, split_finished
from gradroute.utils import write_json


def test_split_finished_reuses_only_same_config(tmp_path, capsys):
    path_of = lambda m, s: tmp_path / f"{m}_{s}.json"
    write_json(path_of("a", 0), {"config": {"lr": 1}, "value": 3})
    write_json(path_of("a", 1), {"config": {"lr": 2}, "value": 4})
    results, todo = split_finished([("a", 0), ("a", 1), ("b", 0)], path_of, {"lr": 1})
    assert results == {("a", 0): {"config": {"lr": 1}, "value": 3}}
    assert todo == [("a", 1), ("b", 0)]
    out = capsys.readouterr().out
    assert "recomputing a_1.json" in out and "resuming: 1 of 3" in out


@pytest.mark.slow
def test_run_jobs_in_process_and_in_workers():
    jobs = [(2, 3), (4, 5), (6, 7)]
    expect = {(2, 3): 6, (4, 5): 20, (6, 7): 42}
    assert run_jobs(jobs, operator.mul, workers=1, show=False) == expect
    assert run_jobs(jobs, operator.mul, workers=2, show=False) == expect
    assert run_jobs([], operator.mul, workers=2, show=False) == {}
