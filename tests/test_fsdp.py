"""Routing under FSDP2 (``fully_shard`` per block, then the root; 2 gloo processes on CPU) against the same steps in
one process. All 2-process cases run in one spawn (a module fixture); each test checks its case.

Exact comparison: the one-process run accumulates the two half batches at loss weight 1/2 (see
``fsdp_cases.halves``), which gives FSDP2's averaged gradient bit for bit, so parameters must be equal
(``torch.equal``) after every AdamW step.
"""
import pytest
import torch

pytest.importorskip("transformers")

import fsdp_cases as C  # noqa: E402
from distributed import spawn2  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    path = tmp_path_factory.mktemp("fsdp") / "results.pt"
    spawn2(C.worker, str(path), list(C.CASES))
    return torch.load(path)


def single(case):
    out = C.run(case, None)
    assert "error" not in out, out.get("error")
    return out


def check_equal(case, sharded):
    got = sharded[case]
    assert "error" not in got, got.get("error")
    want = single(case)
    assert got.keys() == want.keys()
    differ = {k: (got[k] - want[k]).abs().max().item() for k in want if not torch.equal(got[k], want[k])}
    assert not differ, f"{case}: sharded run differs from one process: {differ}"
    return got, want


def test_plain_fsdp_equals_one_process(sharded):
    check_equal("plain", sharded)


def test_parameter_routing_under_fsdp_equals_one_process(sharded):
    check_equal("param", sharded)
