"""`pip install gradroute` needs torch only: the core imports and routes with the experiments'
packages unavailable, and the package metadata puts those packages in the `experiments` extra."""
import os
import subprocess
import sys
import textwrap
from importlib import metadata

EXPERIMENT_ONLY = ("scipy", "matplotlib", "tqdm")

# A meta-path finder that makes the named top-level packages look uninstalled, then a routed
# backward through the core: route(), the module hook, surgery (expand, route units, ablate) and
# parameter routing, on the package's own small GPT.
SCRIPT = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = set(sys.argv[1].split(","))

    class Uninstalled(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
            return None

    sys.meta_path.insert(0, Uninstalled())
    import torch
    import gradroute as gr
    from gradroute.models import GPT, GPTConfig

    x = torch.randn(4, 3, requires_grad=True)
    gr.route(x, torch.tensor([1.0, 0.0, -1.0, 0.5])[:, None]).sum().backward()
    assert x.grad[:, 0].tolist() == [1.0, 0.0, -1.0, 0.5], x.grad

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, n_ctx=8, n_layer=1, n_head=2, d_model=16, d_mlp=32))
    units = gr.expand_mlp(model, "transformer.h.*.mlp", k=4)
    ids = torch.randint(0, 50, (2, 8))
    with gr.route_units(model, units, select=torch.tensor([True, False]), outside=0.0):
        with gr.routing(model, {"transformer.h.0.attn": 0.0}):
            model(ids, targets=ids)[1].backward()
    assert model.transformer.h[0].attn.q_proj.weight.grad.abs().sum() == 0   # attention routed off
    assert model.transformer.h[0].mlp.c_fc.weight.grad.abs().sum() > 0
    gr.ablate(model, units)
    router = gr.ParamRouter(model, units)
    with router(forget=torch.tensor([True, False])):
        model(ids, targets=ids)[1].backward()
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not loaded, loaded
    if "numpy" in BLOCKED:     # an experiment says which extra it needs
        from gradroute import experiments
        try:
            experiments.get("gridworld")
            raise AssertionError("the gridworld experiment imported without numpy")
        except ModuleNotFoundError as e:
            assert "gradroute[experiments]" in str(e), e
    print("routed without", ",".join(sorted(BLOCKED)))
""")


def _run(blocked):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", SCRIPT, ",".join(blocked)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_core_routes_without_the_experiment_packages():
    r = _run(EXPERIMENT_ONLY)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "routed without matplotlib,scipy,tqdm" in r.stdout


def test_core_routes_without_numpy_either():
    r = _run(EXPERIMENT_ONLY + ("numpy",))       # torch warns that it cannot use NumPy; routing does not care
    assert r.returncode == 0, r.stderr[-3000:]
    assert "routed without matplotlib,numpy,scipy,tqdm" in r.stdout


def test_the_blocker_blocks():
    """The script fails when a package it needs is blocked, so the passes above mean something."""
    r = _run(("torch",))
    assert r.returncode != 0 and "blocked" in r.stderr


def test_metadata_puts_experiment_packages_in_an_extra():
    reqs = metadata.requires("gradroute") or []
    base = [r for r in reqs if "extra ==" not in r]
    assert [r.split(">")[0].split("=")[0].strip() for r in base] == ["torch"], base
    experiments = " ".join(r for r in reqs if 'extra == "experiments"' in r)
    for name in EXPERIMENT_ONLY + ("numpy",):
        assert name in experiments, (name, reqs)
    assert any(r.startswith("gradroute[") and "experiments" in r and 'extra == "all"' in r for r in reqs), reqs
