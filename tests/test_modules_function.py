"""Module routing: adding modules leaves the model's function unchanged; bad options are refused before the
model changes (construction, keys, embedding-delta rows)."""
import pytest
import torch

import gradroute as gr
from gradroute.models import GPT, GPTConfig
from gradroute.modules import GENERAL, UNLABELLED

# overlapping rows, as topic-only tokens of different topics can be (the modkit fixture's ROWS)
ROWS = {"forest": [3, 5, 7, 9, 11], "sea": [9, 20, 21], "space": [30, 31, 32, 33], "dino": [5, 40]}
DOMAINS = list(ROWS)


@pytest.mark.parametrize("arch", ["gpt", "hf_gpt2", "hf_llama"])
def test_function_unchanged_after_adding_modules(modkit, arch, request):
    model = modkit.gpt() if arch == "gpt" else request.getfixturevalue(arch)
    model.eval()
    pattern = {"gpt": "transformer.h.*.mlp", "hf_gpt2": "transformer.h.*.mlp", "hf_llama": "model.layers.*.mlp"}[arch]
    x = modkit.ids()
    with torch.no_grad():
        before = modkit.out(model, x)
        mods = gr.add_modules(model, pattern, modkit.DOMAINS, width=0.1)
        after = modkit.out(model, x)
        with mods.route(torch.tensor([0, GENERAL, UNLABELLED, 3])):
            routed = modkit.out(model, x)
    assert torch.equal(before, after) and torch.equal(before, routed)
    n_mlp = 40 if arch == "gpt" else (64 if arch == "hf_gpt2" else 32)
    assert set(mods.width.values()) == {max(1, round(0.1 * n_mlp))}
    assert mods.num_params() > 0 and len(mods.blocks) == 2
    mods.remove()


def test_width_as_units_and_bad_arguments(modkit):
    model = modkit.gpt()
    mods = gr.add_modules(model, "transformer.h.*.mlp", 2, width=3)
    assert mods.domains == ["d0", "d1"] and set(mods.width.values()) == {3}
    with pytest.raises(ValueError, match="already has modules"):
        gr.add_modules(model, "transformer.h.*.mlp", 2)
    mods.remove()
    with pytest.raises(ValueError, match="identifiers"):
        gr.add_modules(modkit.gpt(), "transformer.h.*.mlp", ["a.b"])
    with pytest.raises(ValueError, match="repeat"):
        gr.add_modules(modkit.gpt(), "transformer.h.*.mlp", ["a", "a"])
    with pytest.raises(ValueError, match="width"):
        gr.add_modules(modkit.gpt(), "transformer.h.*.mlp", 2, width=0)
    with pytest.raises(TypeError):                   # the deleted options are gone, not ignored
        gr.add_modules(modkit.gpt(), "transformer.h.*.mlp", 2, gated=True)
    with pytest.raises(TypeError):
        gr.add_modules(modkit.gpt(), "transformer.h.*.mlp", 2, always_learn=["transformer.wte.weight"])
    with pytest.raises(gr.UnknownModuleError):
        gr.add_modules(modkit.gpt(), "transformer.h.*.mlpx", 2)
    mods = gr.add_modules(modkit.gpt(), "transformer.h.*.mlp", modkit.DOMAINS)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\)"):
        mods.masks(torch.tensor([0, 4]))
    with pytest.raises(TypeError, match="integers"):
        mods.masks(torch.tensor([0.0]))
    with pytest.raises(ValueError, match="p_cr"):
        mods.masks(torch.tensor([0]), p_cr=1.5)
    with pytest.raises(ValueError, match="unknown domain 'moon'"):
        mods.set(on=["moon"])
    with pytest.raises(ValueError, match=r"shape \(B, 5\)"):
        with mods.route(forward=torch.ones(2, 3), learn=torch.ones(2, 3, dtype=torch.bool)):
            pass


def test_add_modules_takes_at_most_eight_parameters():
    import inspect
    assert len(inspect.signature(gr.add_modules).parameters) <= 8


def test_refused_options_leave_the_model_unchanged(modkit):
    """A refused embed_delta raises before the model is changed (no modules or hooks left behind, so a corrected
    call works): untied embeddings, and deltas without keys."""
    untied = GPT(GPTConfig(vocab_size=64, n_ctx=16, n_layer=1, n_head=2, d_model=16, d_mlp=40, tie_embeddings=False))
    for model, kw, msg in ((untied, dict(keys=modkit.KEYS, embed_delta=modkit.ROWS), "tied"),
                           (modkit.gpt(), dict(embed_delta=modkit.ROWS), "pass keys= too")):
        names = [n for n, _ in model.named_parameters()]
        with pytest.raises(ValueError, match=msg):
            gr.add_modules(model, "transformer.h.*.mlp", modkit.DOMAINS, **kw)
        assert [n for n, _ in model.named_parameters()] == names
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
        gr.add_modules(model, "transformer.h.*.mlp", modkit.DOMAINS).remove()       # a corrected call works


def test_keyed_function_unchanged_at_init(modkit):
    modkit.function_unchanged(modkit.keyed, labels=(0, GENERAL, 2, 3))
    modkit.function_unchanged(modkit.open_rows)
    modkit.function_unchanged(lambda m: modkit.keyed(m, rows=False))


def test_row_deltas_are_compact_and_leave_the_function_unchanged(modkit):
    model, mods = modkit.function_unchanged(modkit.open_rows)
    x = modkit.ids()
    E = model.aux_embed
    for d in modkit.DOMAINS:
        assert E[d].weight.shape == (len(modkit.ROWS[d]), 16) and E[d].rows.tolist() == modkit.ROWS[d]
    state = model.state_dict()
    assert "aux_embed.forest.rows" in state and state["aux_embed.forest.weight"].shape == (5, 16)
    assert mods.num_params() == sum(p.numel() for p in mods.module_params())
    assert mods.num_params("forest") - mods.num_params("sea") == (5 - 3) * 16   # the MLP modules are equal
    # a checkpoint's rows are loaded with it (after a forward: the cached layout follows)
    other = modkit.gpt()
    omods = modkit.open_rows(other, {d: [r + 1 for r in modkit.ROWS[d]] for d in modkit.DOMAINS})
    modkit.randomise_modules(omods)
    with torch.no_grad():
        other.eval()
        with omods.using():
            want = other(x)[0]
        model(x)
        model.load_state_dict(other.state_dict())
        assert model.aux_embed.sea.rows.tolist() == [10, 21, 22]
        with mods.using():
            assert torch.equal(model(x)[0], want)


@pytest.mark.parametrize("rows, error, match", [
    ({**ROWS, "moon": [1]}, ValueError, "unknown domain"),
    ({d: ROWS[d] for d in DOMAINS[:3]}, ValueError, "no token ids for domain"),
    ({**ROWS, "sea": [3, 64]}, ValueError, "out of range"),
    ({**ROWS, "sea": [-1, 3]}, ValueError, "out of range"),
    ({**ROWS, "sea": []}, ValueError, "empty"),
    ({**ROWS, "sea": [1.5, 2.0]}, TypeError, "ints"),
    ({**ROWS, "sea": torch.zeros(10, dtype=torch.bool)}, ValueError, "bool mask"),
    ("forest", TypeError, "mapping"),
])
def test_bad_rows_are_clear_errors_and_leave_the_model_unchanged(modkit, rows, error, match):
    model = modkit.gpt()
    keys = set(model.state_dict())
    with pytest.raises(error, match=match):
        modkit.open_rows(model, rows)
    assert set(model.state_dict()) == keys
    mask = torch.zeros(64, dtype=torch.bool)
    mask[[2, 4]] = True
    mods = modkit.open_rows(model, {**modkit.ROWS, "sea": mask})                 # a bool mask is accepted
    assert model.aux_embed.sea.rows.tolist() == [2, 4]
    mods.remove()


def test_keyed_refuses_bad_options_before_changing_the_model(modkit):
    model = modkit.gpt()
    with pytest.raises(TypeError, match="keys must be a"):
        gr.add_modules(model, "transformer.h.*.mlp", modkit.DOMAINS, keys=[3, 4])
    with pytest.raises(ValueError, match=r"keys: no token ids for domain\(s\) \['dino'\]"):
        gr.add_modules(model, "transformer.h.*.mlp", modkit.DOMAINS, keys={d: modkit.KEYS[d] for d in modkit.DOMAINS[:3]})
    with pytest.raises(ValueError, match=r"keys\['sea'\]: token ids out of range \[0, 64\): \[64\]"):
        gr.add_modules(model, "transformer.h.*.mlp", modkit.DOMAINS, keys={**modkit.KEYS, "sea": [64]})
    assert not any("aux" in n for n, _ in model.named_parameters())
    assert not model._forward_pre_hooks_with_kwargs
    mods = modkit.keyed(model)
    with pytest.raises(RuntimeError, match="keyed modules need the token ids"):
        model.transformer.h[0].mlp(torch.zeros(1, 3, 16))    # an MLP called without a model forward
