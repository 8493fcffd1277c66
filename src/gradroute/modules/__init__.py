"""Module routing: per-domain auxiliary MLPs that can be switched off (GRAM, arXiv 2607.08077, section 8).

Every MLP matching a pattern gets one small gateless auxiliary MLP per *domain*, parallel to it (input ->
``up`` -> the MLP's activation -> ``down`` -> added to the MLP's output). ``down`` starts at zero, so adding
modules leaves the model's function unchanged (bit for bit). Then, per example of a mixed batch, a *forward
mask* says which modules run and a *learn mask* which owners learn (:func:`schedule_masks`). At inference any
subset of modules is switched on or off (float strengths allowed): K modules give 2**K access profiles.

    mods = gr.add_modules(model, "transformer.h.*.mlp", ["forest", "sea", "space", "dinosaurs"])
    opt = torch.optim.AdamW(model.parameters(), weight_decay=0.1)   # after add_modules
    with mods.route(labels, p_cr=1.0, p_as=0.25, generator=g):      # labels: (B,) ints
        model(x, y)[1].backward()
    opt.step()                                                      # isolation: owners that did not learn stay put
    with mods.using(off=["forest"]):                                # an access profile
        model(x)
    stock = mods.export(on={"sea": 1.0})   # a plain model: "sea" merged into the MLPs, the rest dropped

The parts, one job each: :mod:`.schedule` (labels -> masks, pure), :mod:`.keys` (keyed modules' gates),
:mod:`.deltas` (keyed modules' embedding deltas), :mod:`.isolation` (optimizer isolation), :mod:`.export`
(export and merge), :mod:`.moduleset` (the modules, their hooks and access profiles).
"""
from .deltas import EMBED_CONTAINER, EmbedDelta
from .keys import KEY_RULES, key_gates
from .moduleset import CONTAINER, AuxMLP, ModuleSet, add_modules
from .schedule import GENERAL, UNLABELLED, schedule_masks

__all__ = ["add_modules", "ModuleSet", "AuxMLP", "EmbedDelta", "schedule_masks", "key_gates", "GENERAL",
           "UNLABELLED", "CONTAINER", "EMBED_CONTAINER", "KEY_RULES"]
