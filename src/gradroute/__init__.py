"""gradroute: gradient routing for PyTorch.

    import gradroute as gr
    y = gr.route(x, w)                       # value x, gradient w * upstream
    with gr.routing(model, {"transformer.h.*.mlp": w}):
        model(ids).loss.backward()
"""
from .adapters import UnknownModuleError, find_modules
from .core import route, route_factored, route_reference
from .hooks import routing
from .modules import GENERAL, UNLABELLED, ModuleSet, add_modules
from .masks import example_weights, label_subset, region_mask, region_weights, token_mask
from .params import ParamRouter, linear_region
from .surgery import (Units, ablate, contract, expand_attention, expand_mlp, route_units, select_units,
                      unit_masks)

__version__ = "0.1.0"

__all__ = [
    "route", "route_factored", "route_reference", "routing", "find_modules", "UnknownModuleError",
    "region_mask", "region_weights", "example_weights", "token_mask", "label_subset",
    "ParamRouter", "linear_region",
    "Units", "expand_mlp", "expand_attention", "select_units", "unit_masks", "ablate", "contract",
    "route_units",
    "add_modules", "ModuleSet", "UNLABELLED", "GENERAL",
]
