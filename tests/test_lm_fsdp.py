"""`gradroute run lm-unlearning --fsdp` (FSDP2 inside the shared training loop) on 2 gloo processes against the
same run in one process, and the loop's sharded checkpoint / resume.

Tolerance: the sharded run sums each half batch on its own rank and averages the two gradients (a different float
summation order than one process), so weights drift apart by float rounding, amplified by AdamW over the steps.
At this toy size the losses agreed to 4.8e-7 at most (2026-12, torch 2.13); a parameter router left on the unsharded
model (so that the sharded copy trains unrouted) moved param_routing's losses by 2.3e-2. :data:`TOL` sits in between
(docs/scale.md has the same comparison at the quick profile's size).
"""
import json
import os

import pytest
import torch
import torch.distributed as dist

from gradroute.cli import main
from gradroute.experiments import lm_unlearning as E

pytestmark = pytest.mark.slow          # 2 processes

TOL = 1e-4        # nats/token
TINY = dict(
    corpus=dict(n_train=160, n_eval=8, n_attack=4, n_val=4),
    tokenizer="bpe", vocab_size=300,
    model=dict(n_ctx=48, n_layer=2, n_head=2, d_model=16, d_mlp=32),
    train=dict(steps=8, lr=1e-2, warmup=1, ckpt_every=3, eval_every=4), batch_size=8,
    method=dict(expand=4, coherence_steps=2, rmu_steps=2, rmu_grid={"layers": [0], "c_mult": [3.0]}),
    attack=dict(sizes=[1, 4], steps=2, repeats=1, lr=1e-3, eval_every=1, batch_size=None, n_eval=4),
    seeds=1)
ARGS = ["--profile", "tiny", "--fractions", "0.5", "--no-domain-check", "--workers", "1", "--device", "cpu"]
LOSSES = ("retain_loss", "forget_loss", "forget_loss_no_keywords", "forget_loss_after_attack", "train_loss_final")


def _experiment_worker(rank, port, out, cache):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", GRADROUTE_CACHE=cache, GRADROUTE_QUIET="1")
    torch.set_num_threads(1)
    E.PROFILES["tiny"] = TINY
    try:
        assert main(["run", "lm-unlearning", *ARGS, "--out", out, "--fsdp"]) == 0
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_lm_unlearning_fsdp_on_2_processes_matches_one_process(spawn2, tmp_path, monkeypatch):
    monkeypatch.setitem(E.PROFILES, "tiny", TINY)
    cache = str(tmp_path / "cache")
    monkeypatch.setenv("GRADROUTE_CACHE", cache)
    assert main(["run", "lm-unlearning", *ARGS, "--out", str(tmp_path / "one")]) == 0  # also builds the cache
    spawn2(_experiment_worker, str(tmp_path / "fsdp"), cache)
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "fsdp"))
    assert two["world_size"] == 2 and len(one["runs"]) == len(two["runs"]) == len(E.M.METHODS)
    worst = {}
    for a, b in zip(one["runs"], two["runs"]):
        assert (a["method"], a["from_run"]) == (b["method"], b["from_run"])
        assert (a["train_processes"], a["train_fsdp"]) == (1, False)
        assert (b["train_processes"], b["train_fsdp"]) == (2, True), b["method"]     # really sharded
        keys = [k for k in a if k.startswith(LOSSES)]
        assert "forget_loss_after_attack" in keys and set(keys) <= set(b)
        if a["method"] in ("era", "param_routing"):
            assert {"forget_loss_before_ablation", "retain_loss_after_ablation"} <= set(keys)
        for k in keys:
            worst[a["method"], k] = abs(a[k] - b[k])
    bad = {k: d for k, d in worst.items() if not d <= TOL}
    assert not bad, f"2-process --fsdp run differs from one process by more than {TOL}: {bad}"


def test_fsdp_flag_in_one_process_says_how_to_launch(tmp_path, monkeypatch):
    monkeypatch.setitem(E.PROFILES, "tiny", TINY)
    monkeypatch.setenv("GRADROUTE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"--fsdp .* one process: launch with `torchrun --nproc_per_node N"):
        main(["run", "lm-unlearning", *ARGS, "--out", str(tmp_path / "x"), "--fsdp"])


# ---------------------------------------------------------------- the loop: sharded checkpoint and resume
class _Stop(Exception):
    pass


def _train_sharded(out, stop_at=None, resume=False):
    import gradroute as gr
    from gradroute.lm.data import BatchOrder, Stories
    from gradroute.lm.methods import param_routing_loss
    from gradroute.lm.train import TrainConfig, token_losses, train
    from gradroute.models import GPT, GPTConfig

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 32, (20, 12), generator=g)
    y = torch.roll(x, -1, 1)
    labelled = torch.arange(20) % 3 == 0
    data = Stories(x, y, torch.zeros_like(x, dtype=torch.bool), labelled, labelled.clone())
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, n_ctx=12, n_layer=2, n_head=2, d_model=16, d_mlp=32))
    router = gr.ParamRouter(model, gr.expand_mlp(model, "transformer.h.*.mlp", 4))
    cfg = TrainConfig(steps=5, lr=1e-2, warmup=1, ckpt_every=2, eval_every=2, select_best="loss", fsdp=True)
    ev = lambda net: {"loss": float(token_losses(net, data.x, data.y).mean())}       # noqa: E731

    def on_step(step, rec):
        if step == stop_at:
            raise _Stop
    res = train(model, BatchOrder(data, 6, 1), cfg, loss_fn=param_routing_loss(router), eval_fn=ev, out_dir=out,
                resume=resume, on_step=on_step)
    assert res["fsdp"] and not any(type(p).__name__ == "DTensor" for p in model.parameters())
    return model.state_dict(), res


def _resume_worker(rank, port, out, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        whole, res = _train_sharded(os.path.join(out, "whole"))
        with pytest.raises(_Stop):
            _train_sharded(os.path.join(out, "cut"), stop_at=3)        # after the checkpoint at step 2
        resumed, res2 = _train_sharded(os.path.join(out, "cut"), resume=True)
        if rank == 0:
            torch.save({"whole": whole, "resumed": resumed, "best": (res["best_step"], res2["best_step"]),
                        "history": (res["history"], res2["history"])}, path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_sharded_training_resumes_from_its_checkpoint_to_the_same_weights(spawn2, tmp_path):
    path = tmp_path / "r.pt"
    spawn2(_resume_worker, str(tmp_path), str(path))
    got = torch.load(path)
    assert got["whole"].keys() == got["resumed"].keys()
    for k, v in got["whole"].items():
        assert torch.equal(v, got["resumed"][k]), k
    assert got["best"][0] == got["best"][1] and got["history"][0] == got["history"][1]
