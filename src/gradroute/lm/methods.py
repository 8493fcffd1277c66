"""Unlearning methods, each a small function on top of ``gradroute`` and the shared loop.

Every method takes a :class:`Setup` (model shape, training schedule, the training stories with
their labels, seed) and returns the final model and a dict of extra facts. The labelled forget
stories are the only forget information a method gets; unlabelled forget stories are retain
data as far as it knows (partial oversight).

- ``base``: all stories.
- ``filtering``: drop the labelled forget stories (same order for the rest), from scratch.
- ``era``: Expand every MLP by ``expand`` units, Route (first ``route_layers`` blocks, default
  ``ceil(5/8 n_layer)`` = the paper's 0-4 of 8, on MLP hidden activations): new units weight 1
  for every token, original units weight down to ``era_outside`` (-0.75) on the target tokens
  of labelled stories, by the paper's strength rule ``sigmoid(r - 1/r - 4)`` of the token's
  frequency ratio ``r`` (labelled forget vs other stories, with pseudo-counts), L1 on the
  *unrouted* MLP activations of the routed blocks; Ablate the new units (removed), coherence
  fine-tune on retain stories.
- ``param_routing``: the SGTM-style variant: expand the MLPs the same way; labelled forget
  stories update only those units' parameters (:class:`gradroute.ParamRouter`), other stories
  update everything; ablate them, coherence fine-tune.
- ``rmu``: from the base model, fine-tune the MLP output weights of the blocks up to
  ``rmu_layer`` so that residual activations there on labelled forget stories match ``c * u``
  (``u`` a fixed random unit vector sampled once) while activations on other stories match a
  frozen copy (weight ``alpha``). With ``rmu_grid`` the layer and ``c`` (as a multiple of the
  base model's residual norm there) are chosen on the validation split (:func:`select_rmu`).
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
    route_layers: int | None = None  # ERA: route the first k blocks (default ceil(5/8 of them): 0-4 of 8)
    era_outside: float = -0.75       # ERA: weight of original units on forget tokens
    strength_scale: float = 1.0      # ERA token strength sigmoid(scale * (r - 1/r) + bias) (the paper's)
    strength_bias: float = -4.0
    pseudo_forget: float = 1.0       # pseudo-counts added to every token's count (forget / other stories)
    pseudo_other: float = 20.0
    l1: float = 1e-4                 # ERA: L1 on the unrouted MLP activations of the routed blocks
    coherence_steps: int = 40        # after ablation: fine-tune on retain stories, keep the best
    coherence_stories: int = 64
    coherence_lr: float = 5e-5
    rmu_layer: int | None = None     # default: n_layer // 2 - 1 (an early-middle block)
    rmu_c: float = 100.0
    rmu_alpha: float = 200.0
    rmu_lr: float = 5e-4
    rmu_steps: int = 500
    rmu_grid: dict | None = None     # {"layers": [...], "c_mult": [...]}: choose on validation (select_rmu)
    rmu_retain_tol: float = 0.1      # selection rule: retain_val loss may rise at most this (nats/token)


@dataclass
class Setup:
    model: dict                      # GPTConfig fields, plus arch="gpt" | "hf-gpt2" | "hf" (+ path), eot_id
    train: TrainConfig
    data: Stories                    # training stories, ``labelled`` set for this run
    batch_size: int
    seed: int
    method: MethodConfig = field(default_factory=MethodConfig)
    retain_val: Stories | None = None   # for the coherence fine-tune's "keep the best" (and RMU's selection)
    forget_val: Stories | None = None   # held-out forget stories for RMU's selection (never the evaluation set)
    out_dir: Path | None = None
    resume: bool = False
    device: str = "cpu"


def make_model(spec: dict, seed: int) -> nn.Module:
    """``gradroute.models.GPT`` (``arch="gpt"``, default), a Hugging Face GPT-2 built from the
    same shape (``arch="hf-gpt2"``), initialised from ``seed``, or any Hugging Face causal LM
    from a local folder (``arch="hf"``, ``path=``: a checkpoint's weights, or a config-only
    folder initialised from ``seed``; :func:`gradroute.hf.load_causal_lm`), in float32.
    ``eot_id``: the tokenizer's end-of-text id, written into the HF GPT-2 config's bos/eos ids
    (GPT2Config's default 50256 lies outside a small vocabulary)."""
    spec = dict(spec)
    arch = spec.pop("arch", "gpt")
    eot = spec.pop("eot_id", None)
    torch.manual_seed(seed)
    if arch == "gpt":
        return GPT(GPTConfig(**spec))
    if arch == "hf-gpt2":
        import transformers

        ids = {} if eot is None else {"bos_token_id": eot, "eos_token_id": eot}
        cfg = transformers.GPT2Config(vocab_size=spec["vocab_size"], n_positions=spec["n_ctx"],
                                      n_embd=spec["d_model"], n_layer=spec["n_layer"], n_head=spec["n_head"],
                                      n_inner=spec["d_mlp"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
        return transformers.GPT2LMHeadModel(cfg)
    if arch == "hf":
        from .. import hf

        if not spec.get("path"):
            raise ValueError("arch 'hf' needs path= (a Hugging Face model folder)")
        log = hf.require_transformers().utils.logging
        shown = log.is_progress_bar_enabled()
        log.disable_progress_bar()              # a "Loading weights" bar per run only clutters logs
        try:
            model, _ = hf.load_causal_lm(spec["path"], seed=seed, torch_dtype=torch.float32)
        finally:
            if shown:
                log.enable_progress_bar()
        return model
    raise ValueError(f"unknown arch {arch!r}; use 'gpt', 'hf-gpt2' or 'hf' (with path=)")


def hf_model_spec(path, n_ctx: int) -> dict:
    """The model spec of ``--model PATH`` (``arch="hf"``), checked now so that a bad folder
    fails before any training: the folder must hold a Hugging Face causal LM (weights, or a
    config only) and its own tokenizer, matching the model (:func:`gradroute.hf.load_causal_lm`).
    Records the shape the methods need (``d_model``, ``d_mlp`` of the first MLP block,
    ``n_layer`` MLP blocks, ``vocab_size`` = embedding rows) and ``n_ctx`` capped at the
    model's positions."""
    from .. import hf
    from .tokenizer import model_tokenizer

    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise hf.ModelFolderError(f"--model {path}: no model folder there (expected a folder with config.json, as "
                                  "written by save_pretrained)")
    model_tokenizer(folder)                   # the folder's own (fast) tokenizer, or a clear error
    model, _ = hf.load_causal_lm(folder, torch_dtype=torch.float32)     # checks the tokenizer against the model
    blocks = hf.mlp_names(model)
    cfg = model.config
    positions = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None) or n_ctx
    first = unwrap(model).get_submodule(blocks[0])
    return {"path": str(folder), "n_ctx": int(min(n_ctx, positions)),
            "vocab_size": int(model.get_input_embeddings().weight.shape[0]),
            "d_model": int(model.get_input_embeddings().weight.shape[1]),
            "d_mlp": int(mlp_parts(first, blocks[0]).n_units), "n_layer": len(blocks),
            "model_type": getattr(cfg, "model_type", type(model).__name__),
            "weights": "checkpoint" if any((folder / f).is_file() for f in hf.WEIGHT_FILES) else "config only"}


def mlp_pattern(model: nn.Module) -> str:
    """The MLP blocks to expand / route / ablate: ``transformer.h.*.mlp`` on our GPT and HF
    GPT-2, every MLP block :func:`gradroute.hf.mlp_pattern` recognises on other HF layouts
    (Llama/Qwen gated MLPs, GPT-NeoX, ...)."""
    from ..models.gpt import GPT

    root = unwrap(model)
    if isinstance(root, GPT) or type(root).__name__ == "GPT2LMHeadModel":
        return MLP_PATTERN
    from .. import hf

    return hf.mlp_pattern(root)


def _blocks(model: nn.Module) -> list[str]:
    return [n for n, _ in gr.find_modules(model, mlp_pattern(model), kind="MLP")]


def _sub_units(units: gr.Units, names: list[str]) -> gr.Units:
    return gr.Units(units.kind, {n: units.index[n] for n in names}, {n: units.n_units[n] for n in names})


def _run_train(setup: Setup, model, order, loss_fn=None, tag="train", **kw) -> dict:
    """The shared loop for a method's main training. With ``train.eval_every`` and the
    validation split in ``setup``, the learning curve (``retain_val``, ``forget_val`` losses) is
    recorded in the log's ``evals``."""
    from .evaluate import mean_loss

    model.to(setup.device)
    out = None if setup.out_dir is None else Path(setup.out_dir) / tag
    cfg = copy.copy(setup.train)
    cfg.desc = tag
    if "eval_fn" not in kw and cfg.eval_every and setup.retain_val is not None and setup.forget_val is not None:
        rv, fv = setup.retain_val, setup.forget_val
        kw["eval_fn"] = lambda m: {"retain_val": mean_loss(m, rv), "forget_val": mean_loss(m, fv)}
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
def token_strength(data: Stories, vocab_size: int, scale: float = 1.0, bias: float = -4.0,
                   pseudo_forget: float = 1.0, pseudo_other: float = 20.0) -> torch.Tensor:
    """Per token id, how strongly to route it as a forget token, in (0, 1): the paper's rule
    ``sigmoid(scale * (r - 1/r) + bias)`` (``1 -`` the original code's mask weight), where ``r``
    is the token's relative frequency among the target tokens of labelled forget stories over
    its relative frequency in the other stories, each count plus a pseudo-count (a uniform prior:
    ``pseudo_forget`` per token for the forget counts, ``pseudo_other`` for the others).

    With the paper's values (1, -4, 1, 20) a token at r = 1 gets 0.018, at r = 3 0.21 (original
    units' weight 1 + 0.21 * (-0.75 - 1) = 0.63), at r = 5 0.69, at r = 8 0.98."""
    if pseudo_forget <= 0 or pseudo_other <= 0:
        raise ValueError(f"pseudo-counts must be > 0, got {pseudo_forget}, {pseudo_other}")
    valid = data.y != IGNORE
    lab = data.labelled.unsqueeze(1) & valid
    oth = ~data.labelled.unsqueeze(1) & valid
    cf = torch.bincount(data.y[lab], minlength=vocab_size).double() + pseudo_forget
    co = torch.bincount(data.y[oth], minlength=vocab_size).double() + pseudo_other
    r = (cf / cf.sum()) / (co / co.sum())
    return torch.sigmoid(scale * (r - 1 / r) + bias).float()


@contextlib.contextmanager
def mlp_activation_l1(model: nn.Module, mask: torch.Tensor, out: list, blocks: list[str] | None = None):
    """Collects ``sum |h|`` of the MLP hidden activations ``h`` of ``blocks`` (default: every
    block) over the positions in ``mask`` into ``out`` (a list, one scalar per block) while
    active. The hook is put *before* any other forward pre-hook on the reading linear, so it
    sees ``h`` before routing: the penalty's gradient is never scaled by a routing weight."""
    hooks = []
    for name in (_blocks(model) if blocks is None else blocks):
        mlp = unwrap(model).get_submodule(name)
        reader = getattr(mlp, mlp_parts(mlp, name).output)

        def pre(mod, args):
            h = args[0]
            out.append((h.abs().sum(-1) * mask.to(h.dtype)).sum())
        hooks.append(reader.register_forward_pre_hook(pre, prepend=True))
    try:
        yield out
    finally:
        for h in hooks:
            h.remove()


def retain_pool(data: Stories) -> torch.Tensor:
    """Indices of the stories the coherence fine-tune may use: retain stories (not matching the
    forget rule), as the paper's coherence set of 64 retain stories; never an unlabelled forget
    story."""
    return (~data.forget).nonzero().flatten()


def _coherence(setup: Setup, model, tag: str) -> dict:
    """Fine-tune on ``coherence_stories`` retain training stories (:func:`retain_pool`), keeping
    the weights with the lowest retain validation loss (the unmodified model included)."""
    from .evaluate import mean_loss

    mc = setup.method
    if mc.coherence_steps <= 0:
        return {}
    pool = retain_pool(setup.data)
    if pool.numel() == 0:
        raise ValueError("no retain stories for the coherence fine-tune")
    g = torch.Generator().manual_seed(setup.seed + 7)
    pick = pool[torch.randperm(pool.numel(), generator=g)[: mc.coherence_stories]]
    d = setup.data.subset(pick)
    order = BatchOrder(d, min(setup.batch_size, len(d)), setup.seed)
    cfg = TrainConfig(steps=mc.coherence_steps, lr=mc.coherence_lr, min_lr=mc.coherence_lr, warmup=0,
                      eval_every=max(1, mc.coherence_steps // 8) if setup.retain_val is not None else 0,
                      select_best="retain_val" if setup.retain_val is not None else None, desc=tag)
    val = setup.retain_val
    ev = None if val is None else (lambda m: {"retain_val": mean_loss(m, val)})
    log = train(model, order, cfg, eval_fn=ev, distributed=False, device=setup.device)
    log["stories"] = pick.tolist()
    return log


def era_loss(routed: gr.Units, strength: torch.Tensor, outside: float = -0.75, l1: float = 1e-4):
    """ERA's ``loss_fn``: on labelled rows, target token ``t`` routes with strength
    ``strength[t]`` (original units of ``routed`` blocks get ``1 + s * (outside - 1)``, new
    units 1); plus ``l1`` times the summed |MLP activations| of the routed blocks, read before
    routing (the paper's unrouted L1 on the routed layers)."""
    blocks = list(routed.index)

    def loss_fn(net, b: Batch):
        y = b.y.clamp_min(0)
        select = strength[y] * (b.labelled.unsqueeze(1) & (b.y != IGNORE))
        acts: list = []
        with gr.route_units(net, routed, select, inside=1.0, outside=outside), \
                mlp_activation_l1(net, b.y != IGNORE, acts, blocks if l1 else []):
            loss = token_losses(net, b.x, b.y).sum()
        return loss + l1 * torch.stack(acts).sum() if l1 else loss
    return loss_fn


def routed_block_count(n_layer: int, route_layers: int | None = None) -> int:
    """Blocks ERA routes: ``route_layers``, or by default ``ceil(5 n / 8)``: the paper's layers
    0-4 of 8 (5 of 8), scaled; both blocks of a 2-block model, 3 of 4."""
    k = route_layers if route_layers is not None else max(1, math.ceil(n_layer * 5 / 8))
    if not 1 <= k <= n_layer:
        raise ValueError(f"route_layers must be in [1, {n_layer}], got {k}")
    return k


def _ablation_stage(info: dict, model) -> None:
    """Keep a copy of the model right after ablation, before the coherence fine-tune."""
    info["after_ablation"] = copy.deepcopy(model)


def train_era(setup: Setup):
    mc = setup.method
    model = make_model(setup.model, setup.seed)
    new = gr.expand_mlp(model, mlp_pattern(model), mc.expand)
    blocks = _blocks(model)
    k = routed_block_count(len(blocks), mc.route_layers)
    routed = _sub_units(new, blocks[:k])
    strength = token_strength(setup.data, setup.model["vocab_size"], mc.strength_scale, mc.strength_bias,
                              mc.pseudo_forget, mc.pseudo_other).to(setup.device)
    loss_fn = era_loss(routed, strength, mc.era_outside, mc.l1)
    log = _run_train(setup, model, BatchOrder(setup.data, setup.batch_size, setup.seed), loss_fn)
    info = {"train": log, "before_ablation": copy.deepcopy(model), "routed_blocks": blocks[:k],
            "routed_token_strength_mean": float(strength.mean())}
    gr.ablate(model, new)
    gr.contract(model, new)
    _ablation_stage(info, model)
    info["coherence"] = _coherence(setup, model, "era coherence")
    return model, info


# ------------------------------------------------------------------------------------------
# parameter routing
# ------------------------------------------------------------------------------------------
def param_routing_loss(router: gr.ParamRouter):
    """Parameter routing's ``loss_fn``: labelled rows update only ``theta_forget``. Handed another
    model than the router's (``train``'s FSDP2-sharded copy), it routes that one with a router
    built on it from the same masks (a router acts on the modules it was built on)."""
    current = {"model": unwrap(router.model), "router": router}

    def loss_fn(net, b: Batch):
        if unwrap(net) is not current["model"]:
            current.update(model=unwrap(net), router=gr.ParamRouter(net, router.masks))
        with current["router"](forget=b.labelled):
            return token_losses(net, b.x, b.y).sum()
    return loss_fn


def train_param_routing(setup: Setup):
    mc = setup.method
    model = make_model(setup.model, setup.seed)
    new = gr.expand_mlp(model, mlp_pattern(model), mc.expand)
    router = gr.ParamRouter(model, new)
    log = _run_train(setup, model, BatchOrder(setup.data, setup.batch_size, setup.seed), param_routing_loss(router))
    info = {"train": log, "before_ablation": copy.deepcopy(model), "forget_params": router.num_forget_params()}
    router.ablate()
    gr.contract(model, new)
    _ablation_stage(info, model)
    info["coherence"] = _coherence(setup, model, "param_routing coherence")
    return model, info


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
    forget_expert = gr.expand_mlp(model, mlp_pattern(model), d_mlp)

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


@torch.no_grad()
def residual_norm(model: nn.Module, block: str, data: Stories, batch_size: int = 64) -> float:
    """Mean L2 norm of the residual stream after ``block`` over the target positions of ``data``
    (RMU's ``c`` is chosen as a multiple of it, so that it scales with the model)."""
    from .data import full_batches

    dev = next(model.parameters()).device
    total, count = 0.0, 0
    for b in full_batches(data, batch_size):
        out: dict = {}
        with capture_output(model, block, out):
            logits(model, b.x.to(dev))
        valid = (b.y != IGNORE).to(dev)
        total += float(out["h"].norm(dim=-1)[valid].sum())
        count += int(valid.sum())
    return total / max(count, 1)


def _rmu_once(setup: Setup, base_model: nn.Module, layer: int, c: float, tag: str = "rmu", lr: float | None = None):
    mc = setup.method
    model = copy.deepcopy(base_model).to(setup.device)
    block, trained = rmu_layer_names(model, layer)
    frozen = copy.deepcopy(base_model).to(setup.device).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    control = rmu_control_vector(setup.model["d_model"], c, setup.seed).to(setup.device)
    cfg = copy.copy(setup.train)
    lr = mc.rmu_lr if lr is None else lr
    cfg.steps, cfg.lr, cfg.min_lr, cfg.warmup, cfg.desc = mc.rmu_steps, lr, lr, 0, tag
    cfg.eval_every, cfg.select_best = 0, None
    out = None if setup.out_dir is None else Path(setup.out_dir) / tag
    log = train(model, _Mixed(setup.data, setup.batch_size, setup.seed), cfg,
                loss_fn=lambda net, b: rmu_loss(net, frozen, block, control, mc.rmu_alpha, b),
                params=lambda n, p: any(n.startswith(t + ".") for t in trained) and n.endswith("weight"),
                out_dir=out, resume=setup.resume, device=setup.device)
    return model, {"train": log, "layer": layer, "c": c, "lr": lr, "trained": trained}


def select_rmu(candidates: list[dict], base_retain: float, tol: float) -> int:
    """The selection rule for RMU's layer and ``c`` on the validation split: among candidates
    whose ``retain_val`` loss is at most ``base_retain + tol``, the highest ``forget_val`` loss;
    if none qualifies, the smallest ``retain_val`` loss. Returns the index."""
    if not candidates:
        raise ValueError("select_rmu() got no candidates")
    ok = [i for i, c in enumerate(candidates) if c["retain_val"] <= base_retain + tol]
    if ok:
        return max(ok, key=lambda i: candidates[i]["forget_val"])
    return min(range(len(candidates)), key=lambda i: candidates[i]["retain_val"])


def train_rmu(setup: Setup, base_model: nn.Module):
    """RMU from ``base_model``. With ``method.rmu_grid`` (``{"layers": [...], "c_mult": [...],
    "lr": [...]}``, lr optional: default ``rmu_lr``) and both validation splits in ``setup``,
    every (layer, c = c_mult x the base model's mean residual norm at that layer on
    ``retain_val``, lr) is trained and :func:`select_rmu` picks one by ``retain_val`` /
    ``forget_val`` losses; otherwise ``rmu_layer``, ``rmu_c`` and ``rmu_lr`` are used."""
    from .evaluate import mean_loss

    mc = setup.method
    base_model = base_model.to(setup.device)
    if not setup.data.labelled.any():
        return copy.deepcopy(base_model), {"skipped": "no labelled forget stories: RMU leaves the base model unchanged"}
    n_layer = len(_blocks(base_model))
    grid = mc.rmu_grid
    if grid and (setup.retain_val is None or setup.forget_val is None):
        raise ValueError("rmu_grid needs setup.retain_val and setup.forget_val (the validation split)")
    if not grid:
        layer = mc.rmu_layer if mc.rmu_layer is not None else max(0, n_layer // 2 - 1)
        return _rmu_once(setup, base_model, layer, mc.rmu_c)
    unknown = set(grid) - {"layers", "c_mult", "lr"}
    if unknown:
        raise ValueError(f"rmu_grid has unknown keys {sorted(unknown)}; use 'layers', 'c_mult' and 'lr'")
    base_retain = mean_loss(base_model, setup.retain_val)
    base_forget = mean_loss(base_model, setup.forget_val)
    cands, models = [], []
    for layer in grid.get("layers", [max(0, n_layer // 2 - 1)]):
        block, _ = rmu_layer_names(base_model, layer)
        norm = residual_norm(base_model, block, setup.retain_val)
        for mult in grid.get("c_mult", [1.0]):
            for lr in grid.get("lr", [mc.rmu_lr]):
                model, info = _rmu_once(setup, base_model, layer, mult * norm, tag=f"rmu_l{layer}_c{mult:g}_lr{lr:g}",
                                        lr=lr)
                cands.append({"layer": layer, "c_mult": mult, "c": mult * norm, "lr": lr, "residual_norm": norm,
                              "retain_val": mean_loss(model, setup.retain_val),
                              "forget_val": mean_loss(model, setup.forget_val)})
                models.append((model, info))
    best = select_rmu(cands, base_retain, mc.rmu_retain_tol)
    model, info = models[best]
    info["selection"] = {"rule": f"max forget_val loss s.t. retain_val loss <= base + {mc.rmu_retain_tol:g}",
                         "base_retain_val": base_retain, "base_forget_val": base_forget,
                         "candidates": cands, "chosen": best}
    return model, info


TRAINERS: dict[str, Callable] = {"base": train_base, "filtering": train_filtering, "era": train_era,
                                 "param_routing": train_param_routing, "demix": train_demix}
