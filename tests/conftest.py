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


# ------------------------------------------------------------------ module routing (tests/test_modules_*.py)
class _ModKit:
    """Shared helpers of the module-routing tests, handed out by the ``modkit`` fixture."""

    DOMAINS = ["forest", "sea", "space", "dino"]
    # overlapping rows, as topic-only tokens of different topics can be
    ROWS = {"forest": [3, 5, 7, 9, 11], "sea": [9, 20, 21], "space": [30, 31, 32, 33], "dino": [5, 40]}
    # every token id below 64 except the keys is "general"; the keys of two domains may share a token
    KEYS = {"forest": [3, 5, 7, 9, 11, 12], "sea": [9, 20, 21, 22], "space": [30, 31, 32, 33], "dino": [5, 40, 41]}
    # keys that open every gate at the first token: keyed modules that act everywhere
    OPEN = {d: list(range(64)) for d in DOMAINS}

    @staticmethod
    def gpt(seed=0):
        from gradroute.models import GPT, GPTConfig

        torch.manual_seed(seed)
        return GPT(GPTConfig(vocab_size=64, n_ctx=16, n_layer=2, n_head=2, d_model=16, d_mlp=40))

    @staticmethod
    def randomise_modules(mods, seed=1):
        """Modules start as no-ops (down = 0); give them weights so that they matter."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in mods.module_params():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    @staticmethod
    def ids(B=4, T=8, seed=2):
        return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(seed))

    def plain_ids(self, B=3, T=10, seed=0):
        """Token ids that are no domain's key."""
        allowed = torch.tensor(sorted(set(range(64)) - {t for v in self.KEYS.values() for t in v}))
        return allowed[torch.randint(len(allowed), (B, T), generator=torch.Generator().manual_seed(seed))]

    @staticmethod
    def out(model, x):
        from gradroute.models import GPT

        return model(x)[0] if isinstance(model, GPT) else model(input_ids=x).logits

    @staticmethod
    def snapshot(params):
        return [p.detach().clone() for p in params]

    @staticmethod
    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a, b))

    def routed_steps(self, model, mods, opt, labels, seed, n=3, **route):
        """``n`` optimizer steps, each on one routed batch with ``labels`` (inputs ``ids(B, seed=seed + s)``)."""
        labels = torch.tensor(labels)
        for s in range(n):
            x = self.ids(len(labels), seed=seed + s)
            with mods.route(labels, **route):
                model(x, x)[1].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    def keyed(self, model, rows=None, keys=None):
        """Keyed modules with embedding deltas (``rows`` default :attr:`ROWS`, ``rows=False``: none)."""
        import gradroute as gr

        rows = self.ROWS if rows is None else (None if rows is False else rows)
        return gr.add_modules(model, "transformer.h.*.mlp", self.DOMAINS, keys=self.KEYS if keys is None else keys,
                              embed_delta=rows)

    def open_rows(self, model, rows=None):
        """Keyed modules whose gates are open from the first token (:attr:`OPEN` keys), with embedding deltas on
        ``rows`` (default :attr:`ROWS`): the deltas act at every position."""
        return self.keyed(model, rows=rows, keys=self.OPEN)

    def function_unchanged(self, attach, labels=None):
        """A fresh model with ``attach(model)``'s modules computes what it did before, plain and under a routed
        pass with every kind of row; returns (model, modules)."""
        from gradroute.modules import GENERAL, UNLABELLED

        labels = (0, GENERAL, UNLABELLED, 3) if labels is None else labels
        model = self.gpt()
        model.eval()
        x = self.ids()
        with torch.no_grad():
            before = model(x)[0]
            mods = attach(model)
            assert torch.equal(before, model(x)[0])
            with mods.route(torch.tensor(labels), p_cr=1.0, p_as=1.0, spread="each",
                            generator=torch.Generator().manual_seed(0), p_other=0.5):
                assert torch.equal(before, model(x)[0])
        return model, mods

    @staticmethod
    def tiny_experiment(tmp_path, monkeypatch, steps, curve_points, modules, attack_rounds):
        """The modules experiment at toy size as the `quick` profile; returns (module, its parser)."""
        import argparse

        from gradroute.experiments import modules as E

        tiny = dict(
            corpus=dict(n_train=400, topic_fraction=0.1, n_eval=6, n_val=6, n_attack=6, n_general_eval=6),
            vocab_size=300, model=dict(n_ctx=48, n_layer=1, n_head=2, d_model=16, d_mlp=32),
            train=dict(steps=steps, lr=3e-3, warmup=1), batch_size=8, curve_points=curve_points,
            modules=modules, unlabelled_fraction=0.5,
            attack=dict(topic="sea", rounds=attack_rounds, patience=2, lr_factor=0.25),
            ascent=dict(steps=2, lr_factor=0.1, eval_every=1, max_general_increase=0.05), seeds=1)
        monkeypatch.setitem(E.PROFILES, "quick", tiny)
        monkeypatch.setenv("GRADROUTE_CACHE", str(tmp_path / "cache"))
        parser = argparse.ArgumentParser()
        parser.add_argument("--out")
        parser.add_argument("--device", default="cpu")
        E.add_arguments(parser)
        return E, parser


@pytest.fixture
def modkit():
    return _ModKit()

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
def tcp_port() -> int:
    """A free TCP port on 127.0.0.1 (for a torchrun rendezvous)."""
    return free_port()


@pytest.fixture(scope="session")
def spawn2():
    """``spawn2(worker, *args)``: ``worker(rank, port, *args)`` in 2 processes (see :func:`_spawn2`)."""
    return _spawn2
