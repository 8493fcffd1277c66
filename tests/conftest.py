"""Shared test helpers: fixtures only (no test module imports another; see tests/test_layers.py for
the package's own layers). Blocks are grouped by topic; add new helpers as a new block."""
import os
import socket

import pytest
import torch

os.environ.setdefault("GRADROUTE_QUIET", "1")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture
def tiny_gpt():
    from gradroute.models import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, n_ctx=16, n_layer=2, n_head=2, d_model=16, d_mlp=32))


@pytest.fixture
def hf_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.fixture
def hf_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
    return transformers.LlamaForCausalLM(cfg).eval()


# ------------------------------------------------------------------------------------------
# multi-process: running a test body in 2 gloo processes (the DDP tests; marked slow)
# ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn2(worker, *args, tries: int = 2) -> None:
    """Call ``worker(rank, port, *args)`` in two processes on a free port. A worker that *raises*
    (a failed assertion, a wrong result) fails the test at once. A worker killed by a signal is
    retried once on a fresh port: gloo's threads sometimes abort at process teardown ("terminate
    called without an active exception", SIGABRT; seen once, in a clean-clone run of the suite on
    2 cores on 2026-11-30), which says nothing about routing. ``worker`` must be a module-level
    function of the test module (it is pickled by name)."""
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessExitedException

    for attempt in range(tries):
        try:
            mp.spawn(worker, args=(free_port(), *args), nprocs=2, join=True)
            return
        except ProcessExitedException as e:
            if e.signal_name is None or attempt == tries - 1:
                raise


@pytest.fixture
def spawn2():
    """``spawn2(worker, *args)``: ``worker(rank, port, *args)`` in 2 processes (see :func:`_spawn2`)."""
    return _spawn2
