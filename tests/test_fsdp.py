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

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, spawn2):
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
    flat = lambda d: {f"{k}/{n}": t for k, v in d.items() for n, t in (v.items() if isinstance(v, dict) else [("", v)])}  # noqa: E731
    g, w = flat(got), flat(want)
    differ = {k: (g[k].float() - w[k].float()).abs().max().item() for k in w if not torch.equal(g[k], w[k])}
    assert not differ, f"{case}: sharded run differs from one process: {differ}"
    return got, want


def test_plain_fsdp_equals_one_process(sharded):
    check_equal("plain", sharded)


def test_parameter_routing_under_fsdp_equals_one_process(sharded):
    check_equal("param", sharded)


def test_parameter_routing_per_token_with_zero_rows_under_fsdp(sharded):
    check_equal("param_tokens_zero", sharded)


def test_parameter_routing_accumulating_two_differently_routed_micro_batches_under_fsdp(sharded):
    check_equal("param_accumulate", sharded)


def test_parameter_routing_with_bf16_autocast_under_fsdp(sharded):
    check_equal("param_bf16", sharded)


def test_parameter_routing_with_activation_checkpointing_under_fsdp(sharded):
    check_equal("param_checkpoint", sharded)


def test_ablate_after_fsdp_training_gives_the_one_process_model(sharded):
    # the router was built before fully_shard: masks follow the parameters by name
    got, want = check_equal("param_ablate", sharded)
    region = want["_region"]
    assert any(m.any() for m in region.values())
    for n, m in region.items():
        assert not got[n][m].any(), n                      # theta_forget is zero in the gathered model
        assert got[n][~m].abs().sum() > 0, n               # and nothing else was zeroed


def test_activation_routing_under_fsdp_equals_one_process(sharded):
    check_equal("activation", sharded)


def check_modules(case, sharded):
    got, want = check_equal(case, sharded)
    # step 2 (all examples domain "a"): the core and module "b" are bit-identical, module "a" moved
    before, after = got["step1"], got["step2"]
    moved = {n for n in after if not torch.equal(before[n], after[n])}
    assert moved and all(".aux_modules.a." in n for n in moved), sorted(moved)
    assert any(".aux_modules.a." in n for n in moved)
    # every other step moves the core and both modules
    for s in (1, 3):
        a, b = got[f"step{s - 1}"], got[f"step{s}"]
        assert not torch.equal(a["transformer.wte.weight"], b["transformer.wte.weight"])
        assert not torch.equal(a["transformer.h.0.mlp.aux_modules.b.down.weight"],
                               b["transformer.h.0.mlp.aux_modules.b.down.weight"])
    # using(): switches act on the sharded model as in one process, and they matter
    assert not torch.equal(got["using ['a']"], got["using ['b']"])
    assert not torch.equal(got["using None"], got["using []"])


def test_module_routing_under_fsdp_equals_one_process_with_isolation(sharded):
    check_modules("module", sharded)


def test_module_routing_accumulating_two_differently_routed_micro_batches_under_fsdp(sharded):
    check_modules("module_accumulate", sharded)


def test_module_routing_with_bf16_autocast_under_fsdp(sharded):
    check_modules("module_bf16", sharded)


def test_module_routing_with_activation_checkpointing_under_fsdp(sharded):
    check_modules("module_checkpoint", sharded)


def pop_refusals(got: dict, calls, advice: str) -> None:
    """Each of ``calls`` refused the sharded model, naming itself and what to do instead (``advice``)."""
    for what in calls:
        msg = got.pop(f"{what} error")
        assert f"{what}() on a model sharded with FSDP2" in msg and advice in msg, msg


def test_module_export_refuses_a_sharded_model_and_works_from_the_gathered_state(sharded):
    got = sharded["module_export"]
    assert "error" not in got, got.get("error")
    pop_refusals(got, ("export", "remove"), "full_state_dict=True")
    want = single("module_export")
    assert got.keys() == want.keys()
    for k in want:
        if isinstance(want[k], dict):
            assert want[k].keys() == got[k].keys()
            assert all(torch.equal(want[k][n], got[k][n]) for n in want[k]), k
        else:
            assert torch.equal(want[k], got[k]), k


def test_activation_routing_with_bf16_autocast_under_fsdp(sharded):
    check_equal("activation_bf16", sharded)


def test_activation_routing_with_activation_checkpointing_under_fsdp(sharded):
    check_equal("activation_checkpoint", sharded)


def test_keyed_modules_with_embedding_deltas_under_fsdp(sharded):
    got, _ = check_equal("module_keyed", sharded)
    # the deltas (root shard group) trained
    assert not torch.equal(got["step3"]["aux_embed.a.weight"], torch.zeros_like(got["step3"]["aux_embed.a.weight"]))


def test_unit_ablation_and_structural_changes_on_a_sharded_model(sharded):
    got = sharded["surgery"]
    assert "error" not in got, got.get("error")
    pop_refusals(got, ("expand_mlp", "add_modules"), "before fully_shard")
    want = single("surgery")
    assert all(torch.equal(got["state"][n], want["state"][n]) for n in want["state"])
    assert not got["state"]["transformer.h.0.mlp.c_fc.weight"][:, -8:].any()     # the 8 new units' rows


def test_overhead_benchmark_fsdp_mode_prints_its_json():
    # runs the 2-rank benchmark at toy size; the ratios are measured, never asserted
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "routing_overhead.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(script), "--fsdp", "--reps", "1", "--batch", "2", "--seq", "16"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    for k in ("fsdp_activation_ratio", "fsdp_parameter_ratio", "fsdp_module_ratio"):
        assert res[k] > 0, res
    assert res["ranks"] == 2 and res["cpu"]


def test_parameter_routing_with_fsdp_mixed_precision_updates_only_the_region(sharded):
    # bf16 compute differs from the fp32 run in value, so this checks the routing itself, exactly
    got = sharded["param_mixed_precision"]
    assert "error" not in got, got.get("error")
    moved = stayed = 0
    for n, before in got["before"].items():
        after, m = got["after"][n], got["region"].get(n)
        if m is None:
            assert torch.equal(before, after), n
            stayed += 1
        else:
            assert torch.equal(before[~m], after[~m]), n
            moved += not torch.equal(before[m], after[m])   # (the new units' input rows get no gradient yet:
    assert moved and stayed                                  # their output columns start at zero)


def test_module_routing_with_fsdp_mixed_precision_keeps_frozen_owners(sharded):
    got = sharded["module_mixed_precision"]
    assert "error" not in got, got.get("error")
    before, after = got["step1"], got["step2"]
    moved = {n for n in after if not torch.equal(before[n], after[n])}
    assert moved and all(".aux_modules.a." in n for n in moved), sorted(moved)
    assert not torch.equal(got["step2"]["transformer.wte.weight"], got["step3"]["transformer.wte.weight"])


def test_torchrun_example_trains_ablates_and_saves_the_gathered_model(tmp_path, tcp_port):
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "fsdp_routing.py"
    out = tmp_path / "ablated.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(tcp_port), str(script), "--routing", "parameter",
                          "--steps", "2", "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "done: 2 ranks" in run.stdout
    sd = torch.load(out)
    # the 8 added units of each block, ablated (Conv1D weights are (in, out)): c_fc outputs, c_proj inputs
    assert not sd["transformer.h.0.mlp.c_fc.weight"][:, -8:].any()
    assert not sd["transformer.h.1.mlp.c_proj.weight"][-8:].any()
    assert sd["transformer.h.0.mlp.c_fc.weight"][:, :-8].abs().sum() > 0


def test_routing_trainer_under_accelerate_fsdp2_matches_one_process(tmp_path, tcp_port):
    # examples/hf_trainer_fsdp.py: RoutingTrainer with fsdp_config version 2 on 2 gloo processes (Accelerate's FSDP2
    # preparation, switched on for CPU by the example) against the same global batches in one process
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("accelerate")
    safetensors = pytest.importorskip("safetensors.torch")
    script = Path(__file__).resolve().parents[1] / "examples" / "hf_trainer_fsdp.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    runs = {"one": [sys.executable, str(script)],
            "two": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(tcp_port), str(script)]}
    got = {}
    for name, cmd in runs.items():
        run = subprocess.run([*cmd, "--out", str(tmp_path / name), "--steps", "3"], capture_output=True, text=True,
                             env=env, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        got[name] = (json.loads((tmp_path / name / "result.json").read_text()),
                     safetensors.load_file(tmp_path / name / "model" / "model.safetensors"))
    (one, w1), (two, w2) = got["one"], got["two"]
    assert one["processes"] == 1 and one["fully_shard_on"] == []
    assert two["processes"] == 2 and two["fsdp_version"] == 2
    assert {"(root)", "model.layers.0", "model.layers.1"} <= set(two["fully_shard_on"])
    assert w1.keys() == w2.keys()
    assert w2["model.layers.0.mlp.gate_proj.weight"].shape == (128, 64)     # the 16 added units were contracted away
    # float summation order only (measured 4.9e-7 after 4 steps; without routing the weights move by 7.5e-3)
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5
    assert max(abs(a - b) for a, b in zip(one["losses"], two["losses"])) < 1e-5
