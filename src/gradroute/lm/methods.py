"""Unlearning methods, each a small function on top of ``gradroute`` and the shared loop.

Every method takes a :class:`Setup` (model shape, training schedule, the training stories with
their labels, seed) and returns the final model and a dict of extra facts. The labelled forget
stories are the only forget information a method gets; unlabelled forget stories are retain
data as far as it knows (partial oversight).

- ``base``: all stories.
- ``filtering``: drop the labelled forget stories (same order for the rest), from scratch.
- ``era``: Expand every MLP by ``expand`` units, Route (first ``route_layers`` blocks, on MLP
  hidden activations): new units weight 1 for every token, original units weight down to
  ``era_outside`` (-0.75) on the target tokens of labelled stories that are much more frequent
  in labelled forget stories than elsewhere (strength from the frequency ratio), L1 on MLP
  activations; Ablate the new units (removed), coherence fine-tune.
- ``param_routing``: the SGTM-style variant: expand the MLPs the same way; labelled forget
  stories update only those units' parameters (:class:`gradroute.ParamRouter`), other stories
  update everything; ablate them, coherence fine-tune.
- ``rmu``: from the base model, fine-tune the MLP output weights of the blocks up to
  ``rmu_layer`` so that residual activations there on labelled forget stories match ``c * u``
  (``u`` a fixed random unit vector sampled once) while activations on other stories match a
  frozen copy (weight ``alpha``).
- ``demix``: every MLP gets a second expert of the same size; a story's label picks the expert
  (forward and backward); the forget expert is deleted at the end.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

import gradroute as gr
from ..adapters import unwrap
from ..models import GPT, GPTConfig
from .data import IGNORE, Batch, BatchOrder, Stories
from ..adapters import mlp_parts
from .train import TrainConfig, logits, token_losses, train

METHODS = ("base", "filtering", "era", "param_routing", "rmu", "demix")
MLP_PATTERN = "transformer.h.*.mlp"


@dataclass
class MethodConfig:
    expand: int = 64                 # ERA / parameter routing: new MLP units per block
    route_layers: int | None = None  # ERA: route the first k blocks (default: 5/8 of them, as 0-4 of 8)
    era_outside: float = -0.75       # ERA: weight of original units on forget tokens
    era_ratio: float = 10.0          # ERA: frequency ratio (forget vs other) at which routing is full
    l1: float = 1e-4                 # ERA: L1 on MLP activations
    coherence_steps: int = 40        # after ablation: fine-tune on retain stories, keep the best
    coherence_stories: int = 64
    coherence_lr: float = 5e-5
    rmu_layer: int | None = None     # default: n_layer // 2 - 1 (an early-middle block)
    rmu_c: float = 100.0
    rmu_alpha: float = 200.0
    rmu_lr: float = 5e-4
    rmu_steps: int = 500


@dataclass
class Setup:
    model: dict                      # GPTConfig fields, plus arch="gpt" | "hf-gpt2"
    train: TrainConfig
    data: Stories                    # training stories, ``labelled`` set for this run
    batch_size: int
    seed: int
    method: MethodConfig = field(default_factory=MethodConfig)
    retain_val: Stories | None = None   # for the coherence fine-tune's "keep the best"
    out_dir: Path | None = None
    resume: bool = False
    device: str = "cpu"


def make_model(spec: dict, seed: int) -> nn.Module:
    """``gradroute.models.GPT`` (``arch="gpt"``, default) or a Hugging Face GPT-2 built from the
    same shape (``arch="hf-gpt2"``), initialised from ``seed``."""
    spec = dict(spec)
    arch = spec.pop("arch", "gpt")
    torch.manual_seed(seed)
    if arch == "gpt":
        return GPT(GPTConfig(**spec))
    if arch == "hf-gpt2":
        import transformers

        cfg = transformers.GPT2Config(vocab_size=spec["vocab_size"], n_positions=spec["n_ctx"],
                                      n_embd=spec["d_model"], n_layer=spec["n_layer"], n_head=spec["n_head"],
                                      n_inner=spec["d_mlp"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return transformers.GPT2LMHeadModel(cfg)
    raise ValueError(f"unknown arch {arch!r}; use 'gpt' or 'hf-gpt2'")


def _blocks(model: nn.Module) -> list[str]:
    return [n for n, _ in gr.find_modules(model, MLP_PATTERN, kind="MLP")]


def _sub_units(units: gr.Units, names: list[str]) -> gr.Units:
    return gr.Units(units.kind, {n: units.index[n] for n in names}, {n: units.n_units[n] for n in names})


def _run_train(setup: Setup, model, order, loss_fn=None, tag="train", **kw) -> dict:
    model.to(setup.device)
    out = None if setup.out_dir is None else Path(setup.out_dir) / tag
    cfg = copy.copy(setup.train)
    cfg.desc = tag
    return train(model, order, cfg, out_dir=out, resume=setup.resume, device=setup.device,
                 **({} if loss_fn is None else {"loss_fn": loss_fn}), **kw)


# ------------------------------------------------------------------------------------------
# base and filtering
# ------------------------------------------------------------------------------------------
def train_base(setup: Setup):
    model = make_model(setup.model, setup.seed)
    log = _run_train(setup, model, BatchOrder(setup.data, setup.batch_size, setup.seed))
    return model, {"train": log}


def train_filtering(setup: Setup):
    model = make_model(setup.model, setup.seed)
    order = BatchOrder(setup.data, setup.batch_size, setup.seed, allowed=~setup.data.labelled)
    log = _run_train(setup, model, order)
    return model, {"train": log, "stories_dropped": int(setup.data.labelled.sum())}


# ------------------------------------------------------------------------------------------
# ERA
# ------------------------------------------------------------------------------------------
def token_strength(data: Stories, vocab_size: int, ratio: float = 10.0) -> torch.Tensor:
    """Per token id, how strongly to route it as a forget token, in [0, 1]: 0 when it is no more
    frequent (per token) in labelled forget stories than in the others, 1 when it is ``ratio``
    times more frequent or more, log-linear in between (add-one smoothing)."""
    if ratio <= 1:
        raise ValueError(f"ratio must be > 1, got {ratio}")
    valid = data.y != IGNORE
    lab = data.labelled.unsqueeze(1) & valid
    oth = ~data.labelled.unsqueeze(1) & valid
    cf = torch.bincount(data.y[lab], minlength=vocab_size).double() + 1
    co = torch.bincount(data.y[oth], minlength=vocab_size).double() + 1
    r = (cf / cf.sum()) / (co / co.sum())
    return (r.log() / math.log(ratio)).clamp(0, 1).float()


@contextlib.contextmanager
def mlp_activation_l1(model: nn.Module, mask: torch.Tensor, out: list):
    """Collects ``sum |h|`` of MLP hidden activations over the positions in ``mask`` into
    ``out`` (a list, one scalar per block) while active."""
    hooks = []
    for name in _blocks(model):
        mlp = unwrap(model).get_submodule(name)
        reader = getattr(mlp, mlp_parts(mlp, name).output)

        def pre(mod, args):
            h = args[0]
            out.append((h.abs().sum(-1) * mask.to(h.dtype)).sum())
        hooks.append(reader.register_forward_pre_hook(pre))
    try:
        yield out
    finally:
        for h in hooks:
            h.remove()


def _coherence(setup: Setup, model, tag: str) -> dict:
    """Fine-tune on ``coherence_stories`` retain-treated (unlabelled) training stories, keeping
    the weights with the lowest retain validation loss (the unmodified model included)."""
    from .evaluate import mean_loss

    mc = setup.method
    if mc.coherence_steps <= 0:
        return {}
    pool = (~setup.data.labelled).nonzero().flatten()
    g = torch.Generator().manual_seed(setup.seed + 7)
    pick = pool[torch.randperm(pool.numel(), generator=g)[: mc.coherence_stories]]
    d = setup.data.subset(pick)
    order = BatchOrder(d, min(setup.batch_size, len(d)), setup.seed)
    cfg = TrainConfig(steps=mc.coherence_steps, lr=mc.coherence_lr, min_lr=mc.coherence_lr, warmup=0,
                      eval_every=max(1, mc.coherence_steps // 8) if setup.retain_val is not None else 0,
                      select_best="retain_val" if setup.retain_val is not None else None, desc=tag)
    val = setup.retain_val
    ev = None if val is None else (lambda m: {"retain_val": mean_loss(m, val)})
    return train(model, order, cfg, eval_fn=ev, distributed=False, device=setup.device)


def era_loss(routed: gr.Units, strength: torch.Tensor, outside: float = -0.75, l1: float = 1e-4):
    """ERA's ``loss_fn``: on labelled rows, target token ``t`` routes with strength
    ``strength[t]`` (original units of ``routed`` blocks get ``1 + s * (outside - 1)``, new
    units 1); plus ``l1`` times the summed |MLP activations| of every block."""
    def loss_fn(net, b: Batch):
        y = b.y.clamp_min(0)
        select = strength[y] * (b.labelled.unsqueeze(1) & (b.y != IGNORE))
        acts: list = []
        with gr.route_units(net, routed, select, inside=1.0, outside=outside), \
                mlp_activation_l1(net, b.y != IGNORE, acts):
            loss = token_losses(net, b.x, b.y).sum()
        return loss + l1 * torch.stack(acts).sum() if l1 else loss
    return loss_fn


def train_era(setup: Setup):
    mc = setup.method
    model = make_model(setup.model, setup.seed)
    new = gr.expand_mlp(model, MLP_PATTERN, mc.expand)
    blocks = _blocks(model)
    k = mc.route_layers if mc.route_layers is not None else max(1, round(len(blocks) * 5 / 8))
    if not 1 <= k <= len(blocks):
        raise ValueError(f"route_layers must be in [1, {len(blocks)}], got {k}")
    routed = _sub_units(new, blocks[:k])
    strength = token_strength(setup.data, setup.model["vocab_size"], mc.era_ratio).to(setup.device)
    loss_fn = era_loss(routed, strength, mc.era_outside, mc.l1)
    log = _run_train(setup, model, BatchOrder(setup.data, setup.batch_size, setup.seed), loss_fn)
    pre = copy.deepcopy(model)
    gr.ablate(model, new)
    gr.contract(model, new)
    coh = _coherence(setup, model, "era coherence")
    return model, {"train": log, "before_ablation": pre, "coherence": coh, "routed_blocks": blocks[:k],
                   "routed_token_strength_mean": float(strength.mean())}


# ------------------------------------------------------------------------------------------
# parameter routing
# ------------------------------------------------------------------------------------------
def param_routing_loss(router: gr.ParamRouter):
    """Parameter routing's ``loss_fn``: labelled rows update only ``theta_forget``."""
    def loss_fn(net, b: Batch):
        with router(forget=b.labelled):
            return token_losses(net, b.x, b.y).sum()
    return loss_fn


def train_param_routing(setup: Setup):
    mc = setup.method
    model = make_model(setup.model, setup.seed)
    new = gr.expand_mlp(model, MLP_PATTERN, mc.expand)
    router = gr.ParamRouter(model, new)
    log = _run_train(setup, model, BatchOrder(setup.data, setup.batch_size, setup.seed), param_routing_loss(router))
    pre = copy.deepcopy(model)
    router.ablate()
    gr.contract(model, new)
    coh = _coherence(setup, model, "param_routing coherence")
    return model, {"train": log, "before_ablation": pre, "coherence": coh,
                   "forget_params": router.num_forget_params()}


# ------------------------------------------------------------------------------------------
# DEMix
# ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def expert_select(model: nn.Module, experts: dict[str, torch.Tensor], use_second: torch.Tensor):
    """Per example, let only one MLP expert run: the units in ``experts[block]`` for rows where
    ``use_second``, the other units elsewhere (masking the hidden activations, so the unused
    expert neither contributes nor learns)."""
    hooks = []
    sel = use_second.view(-1, 1, 1)
    for name, idx in experts.items():
        mlp = unwrap(model).get_submodule(name)
        parts = mlp_parts(mlp, name)
        second = gr.region_mask(idx, parts.n_units).to(use_second.device)

        def pre(mod, args, second=second):
            keep = torch.where(sel, second, ~second).to(args[0].dtype)
            return (args[0] * keep,)
        hooks.append(getattr(mlp, parts.output).register_forward_pre_hook(pre))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def train_demix(setup: Setup):
    model = make_model(setup.model, setup.seed)
    d_mlp = setup.model["d_mlp"]
    forget_expert = gr.expand_mlp(model, MLP_PATTERN, d_mlp)

    def loss_fn(net, b: Batch):
        with expert_select(net, forget_expert.index, b.labelled):
            return token_losses(net, b.x, b.y).sum()

    log = _run_train(setup, model, BatchOrder(setup.data, setup.batch_size, setup.seed), loss_fn)
    gr.ablate(model, forget_expert)
    gr.contract(model, forget_expert)
    return model, {"train": log}


# ------------------------------------------------------------------------------------------
# RMU
# ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def capture_output(model: nn.Module, name: str, out: dict):
    mod = unwrap(model).get_submodule(name)

    def hook(m, args, output):
        out["h"] = output[0] if isinstance(output, tuple) else output
    h = mod.register_forward_hook(hook)
    try:
        yield out
    finally:
        h.remove()


def rmu_control_vector(d_model: int, c: float, seed: int) -> torch.Tensor:
    """``c * u``, ``u`` a uniform [0, 1) vector normalised to unit length (as the original RMU);
    sampled once per run."""
    g = torch.Generator().manual_seed(seed + 31337)
    u = torch.rand(d_model, generator=g)
    return c * u / u.norm()


def rmu_layer_names(model: nn.Module, layer: int) -> tuple[str, list[str]]:
    """The residual block whose output RMU steers, and the MLP output projections it trains
    (blocks ``layer - 2 .. layer``)."""
    blocks = _blocks(model)
    if not 0 <= layer < len(blocks):
        raise ValueError(f"rmu_layer must be in [0, {len(blocks) - 1}], got {layer}")
    block = blocks[layer].rsplit(".", 1)[0]
    root = unwrap(model)
    return block, [f"{b}.{mlp_parts(root.get_submodule(b), b).output}" for b in blocks[max(0, layer - 2): layer + 1]]


def rmu_loss(model, frozen, block: str, control: torch.Tensor, alpha: float, b: Batch) -> torch.Tensor:
    """Summed over target tokens: forget rows ``mean_d (h - c u)^2``, other rows
    ``alpha * mean_d (h - h_frozen)^2``, with ``h`` the residual stream after ``block``."""
    cur, ref = {}, {}
    valid = (b.y != IGNORE).to(control.dtype)
    with capture_output(model, block, cur):
        logits(model, b.x)
    with torch.no_grad(), capture_output(frozen, block, ref):
        logits(frozen, b.x)
    h = cur["h"]
    target = torch.where(b.labelled.view(-1, 1, 1), control.to(h.dtype).expand_as(h), ref["h"])
    w = torch.where(b.labelled, 1.0, alpha).to(h.dtype).view(-1, 1)
    return (((h - target) ** 2).mean(-1) * w * valid).sum()


class _Mixed:
    """Batches of half labelled-forget, half other stories (RMU's two streams)."""

    def __init__(self, data: Stories, batch_size: int, seed: int):
        half = max(1, batch_size // 2)
        self.f = BatchOrder(data, half, seed, allowed=data.labelled)
        self.r = BatchOrder(data, batch_size - half, seed + 1, allowed=~data.labelled)
        self.data = data

    def __call__(self, step: int) -> Batch:
        idx = torch.cat([self.f.indices(step), self.r.indices(step)])
        d = self.data
        y = d.y[idx]
        return Batch(d.x[idx], y, d.keyword[idx], d.forget[idx], d.labelled[idx], idx, int((y != IGNORE).sum()))


def train_rmu(setup: Setup, base_model: nn.Module):
    mc = setup.method
    model = copy.deepcopy(base_model).to(setup.device)
    if not setup.data.labelled.any():
        return model, {"skipped": "no labelled forget stories: RMU leaves the base model unchanged"}
    n_layer = len(_blocks(model))
    layer = mc.rmu_layer if mc.rmu_layer is not None else max(0, n_layer // 2 - 1)
    block, trained = rmu_layer_names(model, layer)
    frozen = copy.deepcopy(base_model).to(setup.device).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    d_model = setup.model["d_model"]
    control = rmu_control_vector(d_model, mc.rmu_c, setup.seed).to(setup.device)
    cfg = copy.copy(setup.train)
    cfg.steps, cfg.lr, cfg.min_lr, cfg.warmup, cfg.desc = mc.rmu_steps, mc.rmu_lr, mc.rmu_lr, 0, "rmu"
    out = None if setup.out_dir is None else Path(setup.out_dir) / "rmu"
    log = train(model, _Mixed(setup.data, setup.batch_size, setup.seed), cfg,
                loss_fn=lambda net, b: rmu_loss(net, frozen, block, control, mc.rmu_alpha, b),
                params=lambda n, p: any(n.startswith(t + ".") for t in trained) and n.endswith("weight"),
                out_dir=out, resume=setup.resume, device=setup.device)
    return model, {"train": log, "layer": layer, "trained": trained}


TRAINERS: dict[str, Callable] = {"base": train_base, "filtering": train_filtering, "era": train_era,
                                 "param_routing": train_param_routing, "demix": train_demix}
