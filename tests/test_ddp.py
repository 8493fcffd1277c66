"""Routing inside DistributedDataParallel: 2 gloo processes give the single-process gradients."""
import os

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import gradroute as gr
from gradroute.models import GPT, GPTConfig

pytestmark = pytest.mark.slow          # every test here runs 2 processes


def make_model():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_ctx=16, n_layer=2, n_head=2, d_model=16, d_mlp=32))
    units = gr.expand_mlp(model, "transformer.h.*.mlp", 4)
    return model, units


def batch(forget_first=False):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (4, 8), generator=g)
    # forget_first: rank 0's rows are all forget, so its non-region parameters get zero gradient
    forget = torch.tensor([True, True, False, False] if forget_first else [True, False, False, True])
    return ids, forget


def step(model, units, ids, forget, mode):
    if mode == "activation":
        with gr.route_units(model, units, forget, outside=-0.75):
            loss = model(ids, ids)[1]
            loss.backward()
    else:
        router = gr.ParamRouter(model, units)
        with router(forget=forget):
            loss = model(ids, ids)[1]
            loss.backward()


def worker(rank, port, path, mode, forget_first=False):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        model, units = make_model()
        ddp = DDP(model)
        ids, forget = batch(forget_first)
        sl = slice(2 * rank, 2 * rank + 2)
        step(ddp, units, ids[sl], forget[sl], mode)
        if rank == 0:
            torch.save({n: p.grad for n, p in model.named_parameters()}, path)
        dist.barrier()  # both ranks done communicating before the group is torn down
    finally:
        dist.destroy_process_group()


def run_both(spawn2, tmp_path, mode, forget_first=False):
    path = tmp_path / f"{mode}.pt"
    spawn2(worker, str(path), mode, forget_first)
    ddp_grads = torch.load(path)
    model, units = make_model()
    ids, forget = batch(forget_first)
    step(model, units, ids, forget, mode)
    for n, p in model.named_parameters():
        assert torch.allclose(ddp_grads[n], p.grad, atol=1e-6), n


def test_activation_routing_under_ddp(spawn2, tmp_path):
    run_both(spawn2, tmp_path, "activation")


def test_parameter_routing_under_ddp(spawn2, tmp_path):
    run_both(spawn2, tmp_path, "param")


def test_parameter_routing_under_ddp_with_an_all_forget_rank(spawn2, tmp_path):
    # plain DDP (find_unused_parameters=False): every parameter must stay in each rank's graph
    run_both(spawn2, tmp_path, "param", forget_first=True)


def _abort_once(rank, port, marker):
    """rank 1 dies by SIGABRT on the first attempt only (like gloo's teardown abort)."""
    import signal
    if rank == 1:
        with open(marker, "a") as f:         # one character per attempt
            f.write("x")
        if os.path.getsize(marker) == 1:
            os.kill(os.getpid(), signal.SIGABRT)


def _raise(rank, port, marker):
    if rank == 0:
        with open(marker, "a") as f:         # one character per attempt
            f.write("x")
        raise AssertionError("a wrong result must fail the test, not be retried")


def test_spawn2_retries_a_signal_death_once_but_never_a_raised_error(spawn2, tmp_path):
    from torch.multiprocessing.spawn import ProcessRaisedException

    marker = tmp_path / "tries"
    spawn2(_abort_once, str(marker))
    assert marker.read_text() == "xx"                     # killed once, then passed
    marker2 = tmp_path / "raised"
    with pytest.raises(ProcessRaisedException, match="must fail the test"):
        spawn2(_raise, str(marker2))
    assert marker2.read_text() == "x"                     # not retried
