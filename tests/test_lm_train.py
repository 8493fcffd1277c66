"""The shared LM training loop: schedule, resume, keep-best, DDP equivalence, bad inputs."""
import os

import pytest
import torch
import torch.distributed as dist

import gradroute as gr
from gradroute.lm.data import Batch, BatchOrder, Stories
from gradroute.lm.train import TrainConfig, token_losses, train
from gradroute.models import GPT, GPTConfig


V, T = 32, 12


def tiny_data(n=24, seed=0) -> Stories:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (n, T), generator=g)
    y = torch.roll(x, -1, 1)
    y[:, -2:] = -100
    forget = torch.arange(n) % 3 == 0
    return Stories(x, y, torch.zeros_like(x, dtype=torch.bool), forget, forget.clone())


def tiny_model(seed=0, expand=0):
    torch.manual_seed(seed)
    m = GPT(GPTConfig(vocab_size=V, n_ctx=T, n_layer=2, n_head=2, d_model=16, d_mlp=32))
    units = gr.expand_mlp(m, "transformer.h.*.mlp", expand) if expand else None
    return m, units


def routed_loss(units):
    def loss_fn(net, b: Batch):
        with gr.route_units(net, units, b.labelled, outside=-0.75):
            return token_losses(net, b.x, b.y).sum()
    return loss_fn


CFG = dict(steps=6, lr=1e-2, warmup=2, eval_every=2, ckpt_every=2)


def test_lr_schedule():
    c = TrainConfig(steps=100, lr=1.0, warmup=10)
    assert c.lr_at(0) == pytest.approx(0.1) and c.lr_at(9) == pytest.approx(1.0)
    assert c.lr_at(10) == pytest.approx(1.0) and c.lr_at(100) == pytest.approx(0.1)
    assert c.lr_at(55) == pytest.approx(0.55)


@pytest.mark.parametrize("kw", [dict(steps=-1), dict(lr=0), dict(warmup=-1), dict(grad_clip=0.0)])
def test_bad_config(kw):
    with pytest.raises(ValueError):
        TrainConfig(**{"steps": 3, **kw})


def test_resume_gives_identical_weights(tmp_path):
    data = tiny_data()
    ev = lambda m: {"loss": float(token_losses(m, data.x, data.y).sum())}
    ref, units = tiny_model(expand=4)
    full = train(ref, BatchOrder(data, 8, 1), TrainConfig(**CFG), loss_fn=routed_loss(units), eval_fn=ev)

    m, units = tiny_model(expand=4)

    def crash(step, rec):
        if step == 5:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train(m, BatchOrder(data, 8, 1), TrainConfig(**CFG), loss_fn=routed_loss(units), eval_fn=ev,
              out_dir=tmp_path, on_step=crash)
    assert (tmp_path / "ckpt.pt").is_file()
    m2, units = tiny_model(seed=123, expand=4)          # fresh process: different init, restored from ckpt
    res = train(m2, BatchOrder(data, 8, 1), TrainConfig(**CFG), loss_fn=routed_loss(units), eval_fn=ev,
                out_dir=tmp_path, resume=True)
    for (n, a), b in zip(ref.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), n
    assert [h["loss"] for h in res["history"]] == [h["loss"] for h in full["history"]]
    assert [e["step"] for e in res["evals"]] == [0, 2, 4, 6]
    steps = [l for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(steps) == 6 + 4 and not (tmp_path / "ckpt.pt").exists()
    with pytest.raises(ValueError, match="6-step run"):
        train(m2, BatchOrder(data, 8, 1), TrainConfig(**CFG), out_dir=tmp_path, on_step=crash) if False else None
        torch.save({"steps": 6}, tmp_path / "ckpt.pt")
        train(m2, BatchOrder(data, 8, 1), TrainConfig(**{**CFG, "steps": 9}), out_dir=tmp_path, resume=True)


def test_select_best_and_frozen_params():
    data = tiny_data()
    m, _ = tiny_model()
    calls = iter([5.0, 1.0, 9.0, 9.0])
    before = m.transformer.wte.weight.detach().clone()
    res = train(m, BatchOrder(data, 8, 1), TrainConfig(steps=3, lr=1e-2, warmup=0, eval_every=1, select_best="v"),
                eval_fn=lambda _: {"v": next(calls)}, params=lambda n, p: "mlp" in n)
    assert res["best_step"] == 1
    assert torch.equal(m.transformer.wte.weight, before) and m.transformer.wte.weight.requires_grad
    with pytest.raises(KeyError, match="select_best"):
        train(m, BatchOrder(data, 8, 1), TrainConfig(steps=1, select_best="nope"), eval_fn=lambda _: {"v": 1.0})
    with pytest.raises(ValueError, match="no trainable"):
        train(m, BatchOrder(data, 8, 1), TrainConfig(steps=1), params=lambda n, p: False)


def test_hf_model_loss_matches_manual(hf_gpt2):
    x = torch.randint(0, 64, (2, 8))
    y = torch.roll(x, -1, 1)
    y[:, -1] = -100
    l = token_losses(hf_gpt2, x, y)
    ref = torch.nn.functional.cross_entropy(hf_gpt2(input_ids=x).logits[:, :-1].flatten(0, 1), y[:, :-1].flatten(),
                                            reduction="sum")
    assert l.shape == (2, 8) and l[:, -1].eq(0).all() and torch.allclose(l.sum(), ref, atol=1e-4)


# ---------------------------------------------------------------- DDP: 2 gloo processes
def _ddp_worker(rank, port, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        out = {}
        for mode in MODES:
            assert _train_for_ddp(mode)["world"] == 2
            out[mode] = _train_for_ddp.model.state_dict()
        if rank == 0:
            torch.save(out, path)
        dist.barrier()  # both ranks done communicating before the group is torn down
    finally:
        dist.destroy_process_group()


MODES = ("activation", "param")


def _train_for_ddp(mode):
    data = tiny_data(n=20)
    m, units = tiny_model(expand=4)
    if mode == "activation":
        loss_fn = routed_loss(units)
    else:
        router = gr.ParamRouter(m, units)

        def loss_fn(net, b):
            with router(forget=b.labelled):
                return token_losses(net, b.x, b.y).sum()
    res = train(m, BatchOrder(data, 7, 2), TrainConfig(steps=4, lr=1e-2, warmup=1), loss_fn=loss_fn)
    _train_for_ddp.model = m
    return res


@pytest.mark.slow
def test_ddp_matches_single_process(spawn2, tmp_path):
    """Activation routing (ERA) and parameter routing, trained 4 steps by 2 gloo processes (7-row
    batches split 4 + 3 rows) == one process, up to float rounding."""
    path = tmp_path / "ddp.pt"
    spawn2(_ddp_worker, str(path))
    ddp = torch.load(path)
    for mode in MODES:
        assert _train_for_ddp(mode)["world"] == 1
        single = _train_for_ddp.model.state_dict()
        for n, v in ddp[mode].items():
            assert torch.allclose(v, single[n], atol=2e-5, rtol=1e-4), (mode, n)


def test_progress_in_a_file_is_readable(monkeypatch, capsys):
    """Output redirected: inner (leave=False) bars are not drawn, outer ones rarely, plain width."""
    from gradroute import utils

    monkeypatch.delenv("GRADROUTE_QUIET", raising=False)
    monkeypatch.setattr(utils, "_stderr_is_terminal", lambda: False)
    inner = utils.progress(range(3), leave=False)
    outer = utils.progress(range(3), desc="runs")
    assert inner.disable and not outer.disable
    assert outer.mininterval >= 30 and outer.ncols == 100
    monkeypatch.setattr(utils, "_stderr_is_terminal", lambda: True)
    assert not utils.progress(range(3), leave=False).disable


def test_format_ci_has_no_interval_for_one_value():
    from gradroute.utils import format_ci, mean_ci

    assert format_ci(mean_ci([1.5])) == "1.500"
    assert format_ci(mean_ci([1.0, 2.0])) == f"1.500 ± {12.706 * 0.5:.3f}"


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_output_layer_only_at_targets_gives_the_same_losses_and_gradients(reduction):
    """``only_targets`` skips the output layer at ignored positions (padding) without changing
    the loss or any gradient; with a hook on the output layer every position runs."""
    data = tiny_data()
    data.y[::2, 5:] = -100                       # ragged documents, as in a padded batch
    grads = []
    for only in (False, True):
        m, _ = tiny_model()
        logits, loss = m(data.x, data.y, reduction=reduction, only_targets=only)
        assert (logits is None) == only
        (loss.sum() if reduction == "none" else loss).backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    (l0, g0), (l1, g1) = grads
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-6)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-5, msg=n)    # summation order
    m, _ = tiny_model()
    seen = []
    m.lm_head.register_forward_hook(lambda mod, a, o: seen.append(o.shape))
    logits, _ = m(data.x, data.y, reduction="none", only_targets=True)
    assert seen == [(len(data), T, V)] and logits.shape == (len(data), T, V)
    torch.testing.assert_close(token_losses(m, data.x, data.y), m(data.x, data.y, reduction="none")[1])
