"""Route a model's activations without editing its code: ``with gradroute.routing(model, spec): ...``."""
from __future__ import annotations

import contextlib
from typing import Callable, Mapping, Union

import torch
import torch.nn as nn

from .adapters import Pattern, find_modules
from .core import Weight, route

SpecValue = Union[Weight, Callable[[torch.Tensor], Weight]]


def _route_value(value, weight_spec: SpecValue, name: str):
    """Route ``value`` (a tensor, or a tuple/list whose first element is the hidden state)."""
    if isinstance(value, torch.Tensor):
        hidden = value
    elif isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        hidden = value[0]
    else:
        raise TypeError(f"cannot route {name}: it produced {type(value).__name__}; expected a tensor or "
                        "a tuple whose first element is the hidden-state tensor")
    try:
        if hasattr(weight_spec, "route"):  # a routing object (e.g. memory-light region routing)
            routed = weight_spec.route(hidden)
        else:
            routed = route(hidden, weight_spec(hidden) if callable(weight_spec) else weight_spec)
    except ValueError as e:
        raise ValueError(f"routing {name}: {e}") from None
    if hidden is value:
        return routed
    return type(value)((routed, *value[1:])) if isinstance(value, tuple) else [routed, *value[1:]]


@contextlib.contextmanager
def routing(model: nn.Module, spec: Mapping[Pattern, SpecValue], on: str = "output"):
    """Route the outputs (or inputs, ``on="input"``) of the modules named in ``spec``.

    ``spec`` maps a module name, glob (``transformer.h.*.mlp``; ``*`` is one dotted component,
    ``**`` any number) or regex (``re:...`` or a compiled pattern) to a weight (number or tensor
    broadcasting to the routed tensor) or a callable ``f(tensor) -> weight``. Modules returning
    tuples (Hugging Face blocks, attention) have their first element (the hidden state) routed.
    The forward pass is unchanged; backward may run inside or after the block. Hooks are removed
    on exit, also when the block raises. A pattern that matches nothing raises
    :class:`~gradroute.adapters.UnknownModuleError` listing close names.
    """
    if on not in ("output", "input"):
        raise ValueError(f"on must be 'output' or 'input', got {on!r}")
    if not spec:
        raise ValueError("routing() needs a non-empty spec {module pattern: weight}")
    targets: dict[str, tuple[nn.Module, SpecValue]] = {}
    for pattern, weight in spec.items():
        for name, module in find_modules(model, pattern):
            if name in targets:
                raise ValueError(f"module {name} is matched by more than one pattern in the routing spec")
            targets[name] = (module, weight)

    handles = []
    try:
        for name, (module, weight) in targets.items():
            if on == "output":
                def hook(mod, args, output, _w=weight, _n=name):
                    return _route_value(output, _w, _n)
                handles.append(module.register_forward_hook(hook))
            else:
                def pre_hook(mod, args, kwargs, _w=weight, _n=name):
                    if args:
                        return (_route_value(args[0], _w, _n), *args[1:]), kwargs
                    if "hidden_states" in kwargs:
                        return args, {**kwargs, "hidden_states": _route_value(kwargs["hidden_states"], _w, _n)}
                    raise TypeError(f"cannot route the input of {_n}: no positional input or hidden_states")
                handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        yield model
    finally:
        for h in handles:
            h.remove()
