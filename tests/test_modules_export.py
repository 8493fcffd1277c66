"""Module routing: export. Without modules the exported stock model equals the model with every module off;
merging modules equals switching them on; what cannot be merged exactly is a clear error."""
import pytest
import torch

import gradroute as gr
from gradroute.models import GPT


def test_export_without_modules_equals_modules_off(modkit):
    model = modkit.gpt().eval()
    mods = gr.add_modules(model, "transformer.h.*.mlp", modkit.DOMAINS)
    modkit.randomise_modules(mods)
    stock = mods.export()
    assert type(stock) is GPT and not any("aux_modules" in n for n, _ in stock.named_parameters())
    fresh = GPT(stock.config)
    fresh.load_state_dict(stock.state_dict())      # a stock checkpoint
    x = modkit.ids()
    with torch.no_grad(), mods.using(on=[]):
        off = model(x)[0]
    with torch.no_grad():
        assert torch.equal(stock(x)[0], off) and torch.equal(fresh(x)[0], off)
        assert not torch.allclose(model(x)[0], off, atol=1e-3)       # the original still has its modules
    mods.remove()
    with torch.no_grad():
        assert torch.equal(model(x)[0], off)                         # remove(): stock again, in place


@pytest.mark.parametrize("arch", ["gpt", "hf_gpt2"])
def test_merge_equals_modules_on(modkit, arch, request):
    model = modkit.gpt() if arch == "gpt" else request.getfixturevalue(arch)
    model.eval()
    mods = gr.add_modules(model, "transformer.h.*.mlp", modkit.DOMAINS)
    modkit.randomise_modules(mods)
    x = modkit.ids()
    for on in (["sea"], ["forest", "dino"], {"space": 0.5, "sea": 1.0}):
        merged = mods.export(on=on)
        assert not any("aux_modules" in n for n, _ in merged.named_parameters())
        with torch.no_grad(), mods.using(on=on):
            a = modkit.out(model, x)
        with torch.no_grad():
            b = modkit.out(merged, x)
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), on
    if arch == "gpt":  # the merged checkpoint loads into a stock GPT of the wider config
        merged = mods.export(on=["sea"])
        assert merged.config.d_mlp == 40 + mods.width["transformer.h.0.mlp"]
        fresh = GPT(merged.config)
        fresh.load_state_dict(merged.state_dict())
        with torch.no_grad(), mods.using(on=["sea"]):
            assert torch.allclose(fresh(x)[0], model(x)[0], atol=1e-5)
    mods.remove()


def test_merge_gated_mlp_is_a_clear_error(modkit, hf_llama):
    mods = gr.add_modules(hf_llama, "model.layers.*.mlp", modkit.DOMAINS)
    modkit.randomise_modules(mods)
    with pytest.raises(ValueError, match="gated MLP"):
        mods.export(on=["sea"])
    stock = mods.export()   # modules off: always exact
    x = modkit.ids()
    with torch.no_grad(), mods.using(on=[]):
        assert torch.equal(stock(input_ids=x).logits, hf_llama(input_ids=x).logits)
    mods.remove()


def test_keyed_export_refuses_kept_modules_and_exports_all_off(modkit):
    model = modkit.gpt()
    model.eval()
    mods = modkit.keyed(model)
    modkit.randomise_modules(mods)
    with pytest.raises(ValueError, match=rf"export\(on=\['sea'\]\): keyed modules cannot be merged"):
        mods.export(on=["sea"])
    stock = mods.export()
    x = modkit.ids()
    x[:, 0] = 12
    with torch.no_grad(), mods.using(on=[]):
        assert torch.equal(stock(x)[0], model(x)[0])
    assert not any("aux" in n for n, _ in stock.named_parameters())
    assert not stock._forward_pre_hooks_with_kwargs and not stock._forward_pre_hooks
    mods.remove()
    assert not model._forward_pre_hooks_with_kwargs
