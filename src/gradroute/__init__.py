"""gradroute: gradient routing for PyTorch.

    import gradroute as gr
    y = gr.route(x, w)                       # value x, gradient w * upstream
    with gr.routing(model, {"transformer.h.*.mlp": w}):
        model(ids).loss.backward()
"""
from .core import route, route_reference
from .masks import example_weights, label_subset, region_mask, region_weights, token_mask

__version__ = "0.1.0"

__all__ = [
    "route", "route_reference",
    "region_mask", "region_weights", "example_weights", "token_mask", "label_subset",
]
